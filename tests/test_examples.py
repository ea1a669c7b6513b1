"""The UNICORE job description and the Slurm script run ``ingest`` with valid arguments."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

from hbp_image_tasks import ingest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SEED_FILTER = r"data/raw/original/pm31\d{2}o.png"
SEED_SOURCE = (
    "https://object.cscs.ch/v1/AUTH_61499a61052f419abad475045aaf88f9/img-svc-bigbrain-input"
)


def shell_words(command_line: str, environment: dict[str, str]) -> list[str]:
    """Returns the argv that bash makes of ``command_line`` (as a batch script would)."""
    result = subprocess.run(
        ["bash", "-c", f'printf "%s\\0" {command_line}'],
        capture_output=True,
        env={"PATH": os.environ["PATH"], **environment},
        check=True,
    )
    return result.stdout.decode().split("\0")[:-1]


def check_seed_arguments(args) -> None:
    assert args.source == SEED_SOURCE
    assert args.stacks and args.cleanup
    assert args.filter == SEED_FILTER
    assert args.container == "test_wrapper2"
    assert args.jobs == 16
    assert json.loads(args.parameters)["voxel_unit"] == "um"


def test_unicore_job_is_valid_json_whose_arguments_parse_with_ingest():
    job = json.loads((EXAMPLES / "unicore-job.json").read_text())
    assert job["Executable"] == "ingest"
    assert job["Environment"]["SWIFT_SETTINGS"] == "../.os_settings"
    assert int(job["Resources"]["CPUsPerNode"]) >= 1 and job["Resources"]["Runtime"]
    # UNICORE writes Executable and Arguments into the job's bash script.
    argv = shell_words(" ".join(job["Arguments"]), {"SLURM_CPUS_ON_NODE": "16"})
    args = ingest.parse_command_line(argv)
    check_seed_arguments(args)
    assert not Path(args.destination).is_absolute()


def test_sbatch_script_runs_ingest_with_the_allocated_cpus(tmp_path):
    recorder = tmp_path / "bin" / "ingest"
    recorder.parent.mkdir()
    recorder.write_text(
        '#!/bin/bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n'
        'printf "%s" "$SWIFT_SETTINGS" > "$ARGV_FILE.settings"\n'
    )
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    argv_file = tmp_path / "argv"
    subprocess.run(
        ["bash", str(EXAMPLES / "ingest.sbatch")],
        check=True,
        env={
            "PATH": f"{recorder.parent}:{os.environ['PATH']}",
            "SLURM_CPUS_PER_TASK": "16",
            "ARGV_FILE": str(argv_file),
        },
    )
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    check_seed_arguments(ingest.parse_command_line(argv))
    assert Path(f"{argv_file}.settings").read_text() == "../.os_settings"


def check_array_arguments(args) -> None:
    check_seed_arguments(args)
    assert args.array == "64" and not args.wait
    assert "--cpus-per-task=16" in args.sbatch_option
    assert any(option.startswith("--time=") for option in args.sbatch_option)


def test_unicore_array_job_submits_from_the_login_node_with_arguments_that_parse(tmp_path):
    job = json.loads((EXAMPLES / "unicore-array-job.json").read_text())
    assert job["Job type"] == "ON_LOGIN_NODE" and job["Executable"] == "ingest"
    argv = shell_words(" ".join(job["Arguments"]), {})
    check_array_arguments(ingest.parse_command_line(argv))


def test_array_script_runs_ingest_array_with_sbatch_options(tmp_path):
    recorder = tmp_path / "bin" / "ingest"
    recorder.parent.mkdir()
    recorder.write_text('#!/bin/bash\nprintf "%s\\0" "$@" > "$ARGV_FILE"\n')
    recorder.chmod(recorder.stat().st_mode | stat.S_IXUSR)
    argv_file = tmp_path / "argv"
    subprocess.run(
        ["bash", str(EXAMPLES / "ingest-array.sh")],
        check=True,
        env={"PATH": f"{recorder.parent}:{os.environ['PATH']}", "ARGV_FILE": str(argv_file)},
    )
    argv = argv_file.read_bytes().decode().split("\0")[:-1]
    check_array_arguments(ingest.parse_command_line(argv))
