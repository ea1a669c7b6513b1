"""sbatch command lines, and submission, state and waiting on the local Slurm."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from hbp_image_tasks import slurm
from hbp_image_tasks.errors import UsageError


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, []),
        ({"array": "0-3"}, ["--array=0-3"]),
        (
            {"after_ok": "42"},
            ["--dependency=afterok:42", "--kill-on-invalid-dep=yes"],
        ),
        (
            {"options": ("--partition=batch", "--time=1:00:00")},
            ["--partition=batch", "--time=1:00:00"],
        ),
    ],
)
def test_sbatch_argv_names_the_job_its_output_and_wraps_the_command(fields, expected):
    request = slurm.JobRequest(
        "hbp-x", ("python", "-m", "mod", "dir with space"), Path("/r/%A_%a.log"), **fields
    )
    argv = slurm.sbatch_argv(request)
    assert argv[:4] == ["sbatch", "--parsable", "--job-name=hbp-x", "--output=/r/%A_%a.log"]
    assert argv[4:-2] == expected
    assert argv[-2] == "--wrap"
    assert shlex.split(argv[-1]) == ["exec", "python", "-m", "mod", "dir with space"]


def test_sbatch_option_that_is_not_an_option_is_refused():
    with pytest.raises(UsageError, match="'batch' is not an sbatch option"):
        slurm.JobRequest("x", ("true",), Path("o"), options=("batch",))


@pytest.mark.parametrize("count, spec", [(1, "0-0"), (4, "0-3")])
def test_array_spec_covers_tasks_zero_to_count_minus_one(count, spec):
    assert slurm.array_spec(count) == spec


def test_no_sbatch_on_path_is_a_one_line_usage_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SlurmError, match="sbatch not found on PATH"):
        slurm.submit(slurm.JobRequest("x", ("true",), tmp_path / "o"))


@pytest.mark.parametrize(
    "states, expected",
    [
        (["COMPLETED", "COMPLETED"], "COMPLETED"),
        (["COMPLETED", "RUNNING"], "RUNNING"),
        (["COMPLETED", "FAILED", "CANCELLED"], "FAILED"),
        ([], "UNKNOWN"),
    ],
)
def test_job_state_is_the_worst_final_state_once_all_tasks_ended(states, expected):
    assert slurm.job_state([{"JobState": s} for s in states]) == expected


@pytest.fixture
def slurm_env(local_slurm, monkeypatch):
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.slurm_conf))
    return local_slurm


def python_job(name: str, tmp_path: Path, code: str, **fields) -> slurm.JobRequest:
    command = (sys.executable, "-c", code)
    return slurm.JobRequest(name, command, tmp_path / f"{name}-%A_%a.log", **fields)


def test_array_and_dependent_job_run_in_order(slurm_env, tmp_path):
    code = f"import os; open({str(tmp_path)!r} + '/task-' + os.environ['SLURM_ARRAY_TASK_ID'], 'w')"
    array = slurm.submit(python_job("tasks", tmp_path, code, array=slurm.array_spec(3)))
    check = f"import os; assert len(os.listdir({str(tmp_path)!r})) >= 3"
    after = slurm.submit(python_job("after", tmp_path, check, after_ok=array))
    assert slurm.wait(after, poll_seconds=0.5) == "COMPLETED"
    assert slurm.wait(array, poll_seconds=0.5) == "COMPLETED"
    assert sorted(p.name for p in tmp_path.glob("task-*")) == ["task-0", "task-1", "task-2"]


def test_job_after_a_failed_array_task_never_runs(slurm_env, tmp_path):
    code = "import os, sys; sys.exit(int(os.environ['SLURM_ARRAY_TASK_ID']) == 1)"
    array = slurm.submit(python_job("tasks", tmp_path, code, array=slurm.array_spec(2)))
    marker = tmp_path / "ran"
    after = slurm.submit(
        python_job("after", tmp_path, f"open({str(marker)!r}, 'w')", after_ok=array)
    )
    assert slurm.wait(array, poll_seconds=0.5) == "FAILED"
    assert slurm.wait(after, poll_seconds=0.5) in ("CANCELLED", slurm.NEVER_RUNS)
    assert not marker.exists()


def test_cancelled_job_ends_cancelled(slurm_env, tmp_path):
    job = slurm.submit(python_job("sleeper", tmp_path, "import time; time.sleep(60)"))
    slurm.cancel(job)
    assert slurm.wait(job, poll_seconds=0.5) == "CANCELLED"


class FakeClock:
    """A job that runs until ``ends`` seconds of fake time, seen through scontrol."""

    def __init__(self, ends: float):
        self.now, self.ends, self.polls = 0.0, ends, 0

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def show_job(self, job_id: str) -> list[dict[str, str]]:
        self.polls += 1
        return [{"JobState": "COMPLETED" if self.now >= self.ends else "RUNNING"}]


@pytest.mark.parametrize("with_ending", [False, True])
def test_wait_ends_soon_after_the_job_once_its_outcome_file_appears(monkeypatch, with_ending):
    clock = FakeClock(ends=12.0)
    monkeypatch.setattr(slurm, "show_job", clock.show_job)
    # The job writes its outcome 0.3 s before Slurm reports it ended.
    ending = (lambda: clock.now >= clock.ends - 0.3) if with_ending else None
    assert slurm.wait("7", poll_seconds=5.0, sleep=clock.sleep, ending=ending) == "COMPLETED"
    if with_ending:
        assert clock.now - clock.ends < 0.3
    else:  # polls at 0.5 s growing to 5 s: seen up to one poll late
        assert clock.now - clock.ends > 3.0
    assert clock.polls < 20  # never a poll per tick
