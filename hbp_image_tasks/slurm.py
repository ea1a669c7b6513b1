"""Slurm through its commands: sbatch command lines, submission, job state and waiting.

Knows nothing of conversions: callers give the argv a job runs. Works without
Slurm accounting (no sacct): state comes from ``scontrol show job``.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Callable

from .errors import Interrupted, UsageError

logger = logging.getLogger(__name__)

COMMAND_TIMEOUT = 60.0
# States after which a job (or array task) never runs again.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
    }
)
# A pending job whose afterok dependency failed waits forever with this reason.
NEVER_RUNS = "DependencyNeverSatisfied"


class SlurmError(UsageError):
    """sbatch, squeue or scontrol is missing or refused a request."""


@dataclasses.dataclass(frozen=True)
class JobRequest:
    """One sbatch submission: what runs, under which name, where its output goes."""

    name: str
    command: tuple[str, ...]
    output: Path
    array: str | None = None  # e.g. "0-3" or "1,4,7"
    after_ok: str | None = None  # job id the job waits for (afterok)
    options: tuple[str, ...] = ()  # the user's --sbatch-option values, passed as given

    def __post_init__(self) -> None:
        if not self.command:
            raise ValueError("a job needs a command")
        bad = [o for o in self.options if not o.startswith("-")]
        if bad:
            raise UsageError(
                f"--sbatch-option {bad[0]!r} is not an sbatch option (write e.g. "
                "--sbatch-option=--partition=batch)"
            )


def array_spec(count: int, at_once: int | None = None) -> str:
    """Returns sbatch's --array value for tasks 0..count-1, at most ``at_once`` running."""
    if count < 1:
        raise ValueError(f"an array needs at least one task, not {count}")
    return f"0-{count - 1}" + (f"%{at_once}" if at_once else "")


def sbatch_argv(request: JobRequest, sbatch: str = "sbatch") -> list[str]:
    """Returns the sbatch command line that submits ``request``."""
    argv = [sbatch, "--parsable", f"--job-name={request.name}", f"--output={request.output}"]
    if request.array:
        argv.append(f"--array={request.array}")
    if request.after_ok:
        argv += [f"--dependency=afterok:{request.after_ok}", "--kill-on-invalid-dep=yes"]
    argv += list(request.options)
    # exec: the job's signals (scancel, walltime) reach the command itself.
    argv += ["--wrap", "exec " + shlex.join(request.command)]
    return argv


def find_command(name: str) -> str:
    """Returns the path of a Slurm command, or raises SlurmError (no Slurm here)."""
    found = shutil.which(name)
    if not found:
        raise SlurmError(
            f"{name} not found on PATH: --array submits to Slurm, run it on a "
            "cluster's login node (or start scripts/local-slurm)"
        )
    return found


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    """Runs a Slurm command; raises SlurmError when it cannot run or times out."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{argv[0]} failed: {exc}") from None


def submit(request: JobRequest) -> str:
    """Submits ``request`` with sbatch; returns the job id."""
    argv = sbatch_argv(request, find_command("sbatch"))
    logger.debug("submitting: %s", shlex.join(argv))
    result = _run(argv)
    if result.returncode != 0:
        message = (result.stderr.strip().splitlines() or ["no message"])[-1]
        raise SlurmError(f"sbatch refused job {request.name}: {message}")
    # --parsable prints "ID" or "ID;CLUSTER".
    job_id = result.stdout.strip().split(";")[0]
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed no job id for {request.name}: {result.stdout!r}")
    logger.info("submitted %s as job %s", request.name, job_id)
    return job_id


def parse_show_job(text: str) -> list[dict[str, str]]:
    """Returns one dict of fields per record of ``scontrol show job -o``."""
    records = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if sep:
                fields[key] = value
        records.append(fields)
    return records


def show_job(job_id: str) -> list[dict[str, str]]:
    """Returns scontrol's records of a job (one per array task); [] when Slurm forgot it."""
    result = _run([find_command("scontrol"), "show", "job", "-o", str(job_id)])
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return []
        raise SlurmError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    return parse_show_job(result.stdout)


def job_state(records: Sequence[dict[str, str]]) -> str:
    """Returns one state for a job's records: the worst final one once all are final."""
    states = [r.get("JobState", "UNKNOWN") for r in records]
    if not states:
        return "UNKNOWN"
    if any(r.get("Reason") == NEVER_RUNS for r in records):
        return NEVER_RUNS
    if not all(s in FINAL_STATES for s in states):
        return "RUNNING" if "RUNNING" in states else states[0]
    failed = [s for s in states if s != "COMPLETED"]
    return failed[0] if failed else "COMPLETED"


def wait(
    job_id: str,
    poll_seconds: float = 5.0,
    should_stop: Callable[[], bool] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    ending: Callable[[], bool] | None = None,
) -> str:
    """Waits until job ``job_id`` (all its tasks) ended or can never run; returns its state.

    Polls every 0.5 s at first, then less often, up to every ``poll_seconds``.
    ``ending`` (cheap, e.g. whether the job's outcome file exists) is asked every
    ``ENDING_TICK`` seconds in between; once it is true, polling starts over at
    that tick, so the wait ends about when the job does, not up to a poll later.
    Returns ``UNKNOWN`` when Slurm forgot the job (MinJobAge passed): the caller
    then decides from the files the job left.
    """
    last = None
    delay = min(0.5, poll_seconds)
    while True:
        state = job_state(show_job(job_id))
        if state != last:
            logger.info("job %s: %s", job_id, state)
            last = state
        if state in FINAL_STATES or state in (NEVER_RUNS, "UNKNOWN"):
            return state
        if should_stop and should_stop():
            raise Interrupted(f"stopped waiting for job {job_id} (it keeps running)")
        if ending is not None and ending():
            ending, delay = None, ENDING_TICK
        if ending is None:
            sleep(delay)
        else:
            _sleep_until(ending, delay, sleep)
        delay = min(poll_seconds, delay * 1.5)


ENDING_TICK = 0.1


def _sleep_until(ending: Callable[[], bool], seconds: float, sleep: Callable[[float], None]):
    """Sleeps ``seconds``, or less once ``ending()`` is true."""
    while seconds > 0 and not ending():
        sleep(min(ENDING_TICK, seconds))
        seconds -= ENDING_TICK


def cancel(job_id: str) -> None:
    """Cancels a job (all its array tasks)."""
    result = _run([find_command("scancel"), str(job_id)])
    if result.returncode != 0:
        raise SlurmError(f"scancel {job_id} failed: {result.stderr.strip()}")
