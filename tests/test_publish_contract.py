"""The publish contract: a conversion is uploaded only once it has finished.

Real ingest_ngs processes are stopped by SIGKILL and SIGTERM at named points
(HBP_IMAGE_TASKS_STOP_AT), upload_results must then refuse their destination
and upload nothing; the same ingest_ngs command resumes, the output equals an
uninterrupted conversion's, and upload_results publishes it to the local Swift.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from swiftclient.exceptions import ClientException

from hbp_image_tasks import errors, faults, ingest_ngs, layout, upload_results
from hbp_image_tasks.ingest_ngs import convert
from hbp_image_tasks.parameters import ConversionParameters

swift = pytest.mark.swift

# 40 sections, one chunk (8) deep per slab: 5 slabs.
PARAMETERS = '{"chunk_size": 8, "voxel_size": [1, 1, 1]}'
SLABS = 5


def write_sections(directory: Path, count: int = 40, seed: int = 3) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for z in range(count):
        plane = rng.integers(0, 255, size=(24, 32), dtype=np.uint8)
        Image.fromarray(plane).save(directory / f"s{z:03d}.png")


def dataset_files(destination: Path) -> dict[str, bytes]:
    """Returns every file that would be published (no hidden names), by relative path."""
    return {
        path.relative_to(destination).as_posix(): path.read_bytes()
        for path in sorted(destination.rglob("*"))
        if path.is_file() and not any(part.startswith(".") for part in path.parts[-2:])
    }


def run_ingest_ngs(
    source: Path, destination: Path, stop_at: str | None, *options: str
) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop(faults.ENVIRONMENT_VARIABLE, None)
    if stop_at:
        env[faults.ENVIRONMENT_VARIABLE] = stop_at
    return subprocess.run(
        [sys.executable, "-m", "hbp_image_tasks.ingest_ngs", str(source)]
        + ["--destination", str(destination), "--parameters", PARAMETERS, "--jobs", "2"]
        + ["--no-progress", *options],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """Returns a stack of sections and the files of its uninterrupted conversion."""
    root = tmp_path_factory.mktemp("contract")
    write_sections(root / "in")
    assert (
        ingest_ngs.main([str(root / "in"), "-d", str(root / "whole"), "--parameters", PARAMETERS])
        == 0
    )
    return root / "in", dataset_files(root / "whole")


def upload_main(results: Path, container: str, settings: Path) -> int:
    return upload_results.main(
        [str(results), "--container", container, "--settings", str(settings)]
    )


@swift
@pytest.mark.parametrize(
    "stop_at, code, message",
    [
        ("started:SIGKILL", -9, "has not finished"),
        ("slab-2:SIGKILL", -9, "has not finished"),
        ("slab-2:SIGTERM", errors.EXIT_INTERRUPTED, f"stopped by SIGTERM after slab 2/{SLABS}"),
        (
            f"slab-{SLABS - 1}:SIGTERM",
            errors.EXIT_INTERRUPTED,
            f"stopped by SIGTERM after slab {SLABS - 1}/{SLABS}",
        ),
        ("chunks-written:SIGKILL", -9, "has not finished"),
    ],
)
def test_stopped_conversion_is_refused_then_resumed_and_published(
    stack,
    tmp_path,
    stop_at,
    code,
    message,
    swift_settings_file,
    unique_container,
    swift_client,
    capsys,
):
    source, whole = stack
    results = tmp_path / "results"
    stopped = run_ingest_ngs(source, results, stop_at)
    assert stopped.returncode == code, stopped.stderr
    assert dataset_files(results) != whole or stop_at.startswith("chunks-written")
    container = unique_container()
    capsys.readouterr()
    assert upload_main(results, container, swift_settings_file) == errors.EXIT_USAGE
    error = capsys.readouterr().err.strip()
    assert message in error and "run the same ingest_ngs" in error
    assert len(error.splitlines()) == 1
    with pytest.raises(
        ClientException, match="404"
    ):  # nothing was uploaded, not even the container
        swift_client.head_container(container)

    resumed = run_ingest_ngs(source, results, None)
    assert resumed.returncode == 0, resumed.stderr
    assert dataset_files(results) == whole
    assert upload_main(results, container, swift_settings_file) == 0
    _, listing = swift_client.get_container(container)
    assert len(listing) == len(whole)


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
def test_stop_after_the_complete_marker_leaves_a_publishable_conversion(
    stack, tmp_path, signal_name
):
    source, whole = stack
    results = tmp_path / "results"
    stopped = run_ingest_ngs(source, results, f"marker-written:{signal_name}")
    # SIGTERM after the last chunk has nothing left to stop: the conversion finishes.
    assert stopped.returncode == (-9 if signal_name == "SIGKILL" else 0), stopped.stderr
    assert layout.conversion_status(results).kind == layout.COMPLETE
    assert dataset_files(results) == whole
    rerun = run_ingest_ngs(source, results, None)
    assert rerun.returncode == 0 and "already complete" in rerun.stderr
    assert not layout.has_conversion_state(results)


def test_sigterm_after_the_last_chunk_finishes_the_conversion(stack, tmp_path):
    source, whole = stack
    results = tmp_path / "results"
    finished = run_ingest_ngs(source, results, "chunks-written:SIGTERM")
    assert finished.returncode == 0, finished.stderr
    assert layout.check_publishable(results).kind == layout.COMPLETE
    assert dataset_files(results) == whole


def small_conversion(source: Path, destination: Path, **changes) -> None:
    params = ConversionParameters(chunk_size=8, voxel_size=(1, 1, 1)).replace(**changes)
    convert(source, destination, params, jobs=2, show_progress=False)


def test_marker_of_an_older_run_is_refused_when_info_changed(stack, tmp_path):
    source, _ = stack
    results = tmp_path / "results"
    small_conversion(source, results)
    info = results / layout.INFO_NAME
    info.write_text(info.read_text().replace('"chunk_sizes"', '"chunk_sizes" ', 1))
    with pytest.raises(errors.InputError, match="older run"):
        layout.check_publishable(results)


def test_later_conversion_of_other_parameters_makes_the_earlier_marker_void(stack, tmp_path):
    source, _ = stack
    results = tmp_path / "results"
    small_conversion(source, results)
    with pytest.raises(errors.Interrupted):
        convert(
            source,
            results,
            ConversionParameters(chunk_size=8, voxel_size=(2, 2, 2)),
            jobs=1,
            show_progress=False,
            should_stop=lambda: True,
        )
    status = layout.conversion_status(results)
    assert status.kind == layout.STOPPED and not status.publishable


def test_dataset_of_another_tool_is_published_as_it_is(tmp_path):
    (tmp_path / "info").write_text("{}")
    assert layout.check_publishable(tmp_path).kind == layout.FOREIGN


def test_marker_of_the_first_format_is_trusted_without_a_state(stack, tmp_path):
    source, _ = stack
    results = tmp_path / "results"
    small_conversion(source, results)
    marker = layout.read_complete_marker(results)
    del marker["info_sha256"], marker["format"]
    (results / layout.COMPLETE_MARKER_NAME).write_text(json.dumps(marker))
    assert layout.conversion_status(results).kind == layout.COMPLETE
    layout.write_conversion_state(results, layout.ConversionState(marker["fingerprint"]))
    assert layout.conversion_status(results).kind == layout.UNFINISHED


# A budget of half the single pass: the 40 sections are converted in units (units.py).
UNITS = ("--memory-limit", "12KiB")


@swift
@pytest.mark.parametrize(
    "stop_at, code, message",
    [
        ("started:SIGTERM", errors.EXIT_INTERRUPTED, "stopped by SIGTERM"),
        ("chunks-written:SIGKILL", -9, "has not finished"),
    ],
)
def test_stopped_conversion_in_units_is_refused_then_resumed_and_published(
    stack,
    tmp_path,
    stop_at,
    code,
    message,
    swift_settings_file,
    unique_container,
    swift_client,
    capsys,
):
    source, whole = stack
    results = tmp_path / "results"
    stopped = run_ingest_ngs(source, results, stop_at, *UNITS)
    assert stopped.returncode == code, stopped.stderr
    assert "units of up to" in stopped.stderr
    container = unique_container()
    capsys.readouterr()
    assert upload_main(results, container, swift_settings_file) == errors.EXIT_USAGE
    assert message in capsys.readouterr().err
    with pytest.raises(ClientException, match="404"):
        swift_client.head_container(container)

    resumed = run_ingest_ngs(source, results, None, *UNITS)
    assert resumed.returncode == 0, resumed.stderr
    assert dataset_files(results) == whole
    assert upload_main(results, container, swift_settings_file) == 0
