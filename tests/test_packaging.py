"""The package installs from a source distribution and gives its console scripts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ("fetch_input", "ingest_ngs", "upload_results", "ingest", "check_viewer")


def setup_py_version() -> str:
    """Returns the version as the operators' deployment recipe extracts it."""
    result = subprocess.run(
        "grep version setup.py | cut -d= -f2 | cut -d\\' -f2",
        shell=True,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout


def test_version_recipe_extracts_exactly_one_version():
    output = setup_py_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+\n", output), repr(output)


def test_installed_metadata_matches_setup_py_version():
    from importlib import metadata

    assert metadata.version("hbp-image-tasks") == setup_py_version().strip()


def test_readme_deployment_recipe_names_the_real_sdist_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "dist/hbp_image_tasks-${VERSION}.tar.gz" in readme
    assert "dist/hbp-image-tasks-" not in readme


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> Path:
    """Builds the sdist the way the README says: python setup.py sdist."""
    work = tmp_path_factory.mktemp("sdist")
    tree = work / "tree"
    shutil.copytree(
        ROOT,
        tree,
        ignore=shutil.ignore_patterns(
            # what .gitignore leaves out: servers' state (sockets too), venvs, builds
            ".git",
            ".venv*",
            ".tox",
            ".local-*",
            ".demo",
            "*.egg-info",
            "__pycache__",
            "build",
            "dist",
            "test-artifacts",
        ),
    )
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(work / "dist")],
        cwd=tree,
        check=True,
        capture_output=True,
    )
    version = setup_py_version().strip()
    import setuptools

    # PEP 625 names (underscores) since setuptools 69.3; the README says so.
    modern = tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (69, 3)
    name = "hbp_image_tasks" if modern else "hbp-image-tasks"
    path = work / "dist" / f"{name}-{version}.tar.gz"
    assert path.exists(), sorted(p.name for p in (work / "dist").iterdir())
    return path


def test_sdist_contains_package_scripts_and_settings_example(sdist):
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for expected in (
        "setup.py",
        "pyproject.toml",
        "README.md",
        ".os_settings.example",
        "hbp_image_tasks/settings.py",
        "scripts/run-tests",
        "scripts/local-swift",
        "scripts/demo",
        "examples/unicore-job.json",
    ):
        assert expected in names


@pytest.mark.slow
def test_sdist_installs_offline_from_a_wheelhouse_and_gives_the_commands(sdist, tmp_path):
    """The cluster recipe: wheels built where PyPI is reachable, installed with --no-index."""
    wheelhouse = tmp_path / "wheelhouse"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "-w",
            str(wheelhouse),
            str(sdist),
            "setuptools",
            "wheel",
        ],
        capture_output=True,
        text=True,
    )
    if build.returncode != 0:
        if os.environ.get("CI") == "true":
            pytest.fail(f"could not build the wheelhouse: {build.stderr[-2000:]}")
        pytest.skip("no package index reachable to build the wheelhouse")
    for wheel in wheelhouse.glob("hbp_image_tasks-*.whl"):
        wheel.unlink()  # the cluster installs the sdist itself, not our wheel
    target = tmp_path / "cluster-venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    environment["PIP_CONFIG_FILE"] = os.devnull
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--find-links",
            str(wheelhouse),
            str(sdist),
        ],
        check=True,
        env=environment,
        capture_output=True,
    )
    for command in COMMANDS:
        result = subprocess.run(
            [str(target / "bin" / command), "--help"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert f"usage: {command}" in result.stdout
