"""``ingest --array N``: plan the conversion once, then submit it to Slurm as a job array.

The submitting command lists the source, reads the first section's header to learn
the stack's shape, writes the dataset's info and the plan of units (units.py) to the
results directory, and submits N tasks that run the units (array_task.py) and a
finishing job that builds the upper scales, uploads and verifies. A rerun submits only the
units that are not recorded as finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from . import (
    array_state,
    errors,
    fetch_input,
    ingest,
    ingest_ngs,
    layout,
    remote_file,
    sections,
    slurm,
    sources,
    unit_setup,
    units,
)
from .array_state import ArrayRun, split_evenly
from .progress import format_bytes
from .swift import ObjectInfo

logger = logging.getLogger(__name__)

# The options that steer the submission itself; the tasks get the rest of the argv.
SUBMIT_ONLY = {"--array": 1, "--wait": 0, "--sbatch-option": 1, "--dry-run": 0, "--restart": 0}
ERROR_BY_EXIT_CODE: dict[int, type[errors.HbpError]] = {
    errors.EXIT_USAGE: errors.UsageError,
    errors.EXIT_SOURCE: errors.FetchError,
    errors.EXIT_CONVERSION: errors.ConversionError,
    errors.EXIT_UPLOAD: errors.UploadError,
    errors.EXIT_INTERRUPTED: errors.Interrupted,
}
# Asked of Slurm beyond a job's planned work: the interpreter, libraries, upload buffers.
JOB_BASE_BYTES = 512 << 20
# The first section is fetched whole to plan from up to this size; a larger one is
# read by ranges, only what its header's parsers read: the submission does not
# fetch a whole 14 GB section. More than HEADER_LIMIT read that way, it is fetched.
WHOLE_SECTION_BYTES = 1 << 20
HEADER_LIMIT = 64 << 20
# How Slurm ended a task that could not say why itself.
EXIT_CODE_OF_STATE = {
    "CANCELLED": errors.EXIT_INTERRUPTED,
    "TIMEOUT": errors.EXIT_INTERRUPTED,
    "PREEMPTED": errors.EXIT_INTERRUPTED,
    "NODE_FAIL": errors.EXIT_INTERRUPTED,
    "OUT_OF_MEMORY": errors.EXIT_CONVERSION,
}


@dataclasses.dataclass(frozen=True)
class ArrayOptions:
    """How ``ingest --array`` submits: tasks, sbatch options, unit size, waiting."""

    tasks: int
    at_once: int | None = None  # at most this many tasks running (sbatch --array=...%M)
    sbatch_options: tuple[str, ...] = ()
    sections_per_unit: int | None = None
    wait: bool = False
    poll_seconds: float = 5.0

    def __post_init__(self) -> None:
        if self.tasks < 1 or (self.at_once is not None and self.at_once < 1):
            raise errors.UsageError(f"--array {self.tasks}: give at least one task")


def add_array_options(parser) -> None:
    """Adds the options of ``ingest --array`` (a Slurm job array instead of one process)."""
    group = parser.add_argument_group(
        "job array (Slurm)",
        "Run the conversion as N Slurm array tasks plus a finishing job;\n"
        "this command only plans and submits (run it on the login node).",
    )
    group.add_argument(
        "--array",
        default=None,
        metavar="N[%M]",
        help="submit a job array of N tasks (at most M running at once), each "
        "fetching, converting and uploading its share of the units, and a finishing "
        "job that builds the upper scales, verifies the container and writes the "
        "report (needs sbatch)",
    )
    group.add_argument(
        "--wait",
        action="store_true",
        help="with --array: wait for the finishing job and exit with the run's exit code",
    )
    group.add_argument(
        "--sbatch-option",
        action="append",
        default=None,
        metavar="OPT",
        help="with --array: pass OPT to sbatch for every job (repeatable), e.g. "
        "--sbatch-option=--partition=batch --sbatch-option=--time=2:00:00",
    )
    group.add_argument(
        "--sections-per-unit",
        type=int,
        default=None,
        metavar="K",
        help="with --array: units of at least K sections (rounded up to the chunk "
        "grid), building every scale that depth allows (default: as deep as keeps "
        "two units a task, e.g. 128 sections for 512 on 2 tasks)",
    )


def array_options_from_args(args) -> ArrayOptions:
    """Returns the --array options, checked."""
    if args.sections_per_unit is not None and args.sections_per_unit < 1:
        raise errors.UsageError("--sections-per-unit must be at least 1")
    tasks, percent, at_once = args.array.partition("%")
    if not tasks.isdigit() or (percent and not at_once.isdigit()):
        raise errors.UsageError(f"--array {args.array!r}: give a task count N or N%M, e.g. 16%4")
    return ArrayOptions(
        tasks=int(tasks),
        at_once=int(at_once) if at_once else None,
        sbatch_options=tuple(args.sbatch_option or ()),
        sections_per_unit=args.sections_per_unit,
        wait=args.wait,
    )


def task_argv(argv: list[str]) -> list[str]:
    """Returns ingest's argv without the options that only steer the submission."""
    result, skip = [], 0
    for word in argv:
        if skip:
            skip -= 1
            continue
        name, has_value, _ = word.partition("=")
        if name in SUBMIT_ONLY:
            skip = 0 if has_value else SUBMIT_ONLY[name]
            continue
        result.append(word)
    return result


def _job_command(verb: str, results_dir: Path, submission: int) -> tuple[str, ...]:
    """Returns the argv a job runs: this interpreter, the task module, its arguments."""
    return (
        sys.executable,
        "-m",
        "hbp_image_tasks.array_task",
        verb,
        str(results_dir.resolve()),
        "--submission",
        str(submission),
    )


def user_cpus(user_options: tuple[str, ...]) -> str | None:
    """Returns the CPUs per task the user's sbatch options ask for (``--cpus-per-task=N``
    or ``-cN``, as written), None when they do not say."""
    for option in user_options:
        if option.startswith("--cpus-per-task"):
            return option.partition("=")[2]
        if option.startswith("-c") and not option.startswith("--"):
            return option[2:].lstrip("=")
    return None


def task_jobs(options: ingest.IngestOptions, user_options: tuple[str, ...]) -> int:
    """Returns the workers of each job: --jobs, else the user's --cpus-per-task, else 1
    (what Slurm gives a job that asks for no CPUs)."""
    if options.jobs:
        return options.jobs
    cpus = user_cpus(user_options)
    return int(cpus) if cpus and cpus.isdigit() and int(cpus) > 0 else 1


def cpus_option(user_options: tuple[str, ...], jobs: int) -> tuple[str, ...]:
    """Returns sbatch's --cpus-per-task for a job of ``jobs`` workers, unless the
    user's options already say how many CPUs to allocate."""
    return () if user_cpus(user_options) is not None else (f"--cpus-per-task={jobs}",)


def memory_option(user_options: tuple[str, ...], work_bytes: int) -> tuple[str, ...]:
    """Returns sbatch's --mem for a job whose work holds ``work_bytes``, unless the
    user's options already say how much memory to allocate."""
    if any(option.startswith("--mem") for option in user_options):
        return ()
    return (f"--mem={-(-(work_bytes + JOB_BASE_BYTES) // (1 << 20))}M",)


def job_requests(
    run: ArrayRun,
    submission: int,
    task_count: int,
    array: ArrayOptions,
    name: str,
    plan: units.Plan,
    jobs: int = 1,
) -> tuple[slurm.JobRequest | None, slurm.JobRequest]:
    """Returns the array's request (None when no unit is left) and the finishing job's,
    each asking for ``jobs`` CPUs and the memory its work needs."""
    user = array.sbatch_options
    cpus = cpus_option(user, jobs)
    tasks = None
    if task_count:
        tasks = slurm.JobRequest(
            f"{name}-units",
            _job_command("task", run.results_dir, submission),
            run.logs / "task-%A_%a.log",
            array=slurm.array_spec(task_count, array.at_once),
            options=cpus + memory_option(user, plan.unit_memory) + user,
        )
    finish = slurm.JobRequest(
        f"{name}-finish",
        _job_command("finish", run.results_dir, submission),
        run.logs / "finish-%j.log",
        options=cpus + memory_option(user, plan.finishing_memory) + user,
    )
    return tasks, finish


def load_or_make_plan(
    options: ingest.IngestOptions, checked: ingest.Preflight, run: ArrayRun, array: ArrayOptions
) -> dict:
    """Returns the saved plan for these inputs, or makes, writes and returns a new one."""
    saved = run.read_plan()
    if saved is not None and saved.get("inputs") == checked.inputs:
        return saved
    if saved is not None:
        changed = ", ".join(ingest.differing_inputs(saved.get("inputs", {}), checked.inputs))
        raise errors.UsageError(
            f"{options.results_dir} holds the plan of an --array run with other inputs "
            f"(changed: {changed}); rerun with --restart to delete it and start over"
        )
    with contextlib.ExitStack() as stack:
        # A dry run reads what it must into a temporary directory and writes nothing.
        scratch = None
        if options.dry_run:
            scratch = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        if options.stacks:
            found = _stack_input(options, checked, scratch)
        else:
            found = _volume_input(options, scratch)
    info, held = found.info, found.held_bytes
    limit = options_memory_limit(options)
    if limit is not None and held >= limit:
        raise errors.UsageError(
            f"--memory-limit {format_bytes(limit)} is below the {format_bytes(held)} of "
            f"samples each task holds of the compressed volume {options.source}"
        )
    plan = units.plan_units(
        info,
        None if limit is None else limit - held,
        task_jobs(options, array.sbatch_options),
        sections_per_unit=array.sections_per_unit,
        whole_sections=found.whole_sections,
        tasks=array.tasks,
        bands=found.bands,
    )
    # A compressed volume is held whole by each task (sources.VolumeSource).
    plan = dataclasses.replace(plan, unit_memory=plan.unit_memory + held)
    document = {"inputs": checked.inputs, **found.entries, "info": info, "plan": plan.to_dict()}
    if not options.dry_run:
        # Unfinished until the finishing job writes the complete marker.
        state = layout.ConversionState(layout.fingerprint_of(checked.inputs))
        layout.write_conversion_state(options.results_dir, state)
        unit_setup.write_info(options.results_dir, info, options.parameters)
        hand_over_planning_section(options.download_dir, plan)
        run.write_plan(document)
    return document


@dataclasses.dataclass(frozen=True)
class PlannedInput:
    """What the plan needs to know of the input, and what the tasks read it from."""

    info: dict
    whole_sections: bool  # each worker decodes whole sections to get a region
    bands: bool  # regions are read by rows: full-width bands cost least
    held_bytes: int  # samples each task holds besides its units' buffers
    entries: dict  # the plan's "sections" (listing entries) or "volume" (a path)


def _stack_input(
    options: ingest.IngestOptions, checked: ingest.Preflight, scratch: Path | None
) -> PlannedInput:
    """Returns a section stack's input, its shape and sample type from the first section."""
    ordered = unit_setup.ordered_sections(checked.objects, options.order_file)
    with tempfile.TemporaryDirectory(prefix="hbp-header-") as head_dir:
        first = _planning_copy(options, checked, ordered[0], Path(head_dir), scratch)
        stack = sources.StackSource([first])
        return PlannedInput(
            unit_setup.stack_info(first, len(ordered), options.parameters),
            whole_sections=not stack.reads_regions,
            bands=stack.reads_rows,
            held_bytes=0,
            entries={"sections": [[i.name, i.bytes, i.hash] for i in ordered]},
        )


def _planning_copy(
    options: ingest.IngestOptions,
    checked: ingest.Preflight,
    section: ObjectInfo,
    head_dir: Path,
    scratch: Path | None,
) -> Path:
    """Returns a local copy of the first section that tells its size, samples and
    layout: for a section above WHOLE_SECTION_BYTES, a sparse file of what its
    header's parsers read (:func:`header_copy`), else, or when that fails, the whole
    section."""
    if section.bytes > WHOLE_SECTION_BYTES:
        copy = header_copy(checked.source, section, head_dir)
        if copy is not None:
            return copy.path
    directory = scratch or options.download_dir / layout.PLANNING_SECTION_DIR_NAME
    return fetch_sections(options, [section], directory, checked.source)[0][0]


@dataclasses.dataclass(frozen=True)
class HeaderCopy:
    """A sparse local copy of a section's header blocks, and what reading them cost."""

    path: Path
    bytes_read: int
    requests: int


def header_copy(
    container: fetch_input.SourceContainer, section: ObjectInfo, destination: Path
) -> HeaderCopy | None:
    """Returns the HeaderCopy at ``destination``/the section's name: a sparse file of
    the section's size holding the blocks its header's parsers read by ranges (a TIFF's
    directory may lie at its end); None when they cannot be read so or the copy tells
    otherwise. A fetch that fails after its retries raises FetchError."""
    _, _, opener = container
    remote = remote_file.RangeFile(opener, section.name, section.bytes, HEADER_LIMIT)
    try:
        facts = sections.header_facts(remote)
    except (errors.InputError, remote_file.RangeUnavailable) as exc:
        return _whole_for_planning(section, str(exc))
    if remote.failure is not None:  # swallowed by a parser, which then judged wrongly
        return _whole_for_planning(section, str(remote.failure))
    path = destination / section.name
    path.parent.mkdir(parents=True, exist_ok=True)
    remote.write_sparse(path)
    try:
        same = sections.header_facts(path) == facts
    except errors.InputError:
        same = False
    if not same:  # a parser read past what it read through the remote file
        return _whole_for_planning(section, "its parsers read beyond the blocks fetched")
    logger.info(
        "planning from the header of %s (%s of %s read in %d requests)",
        section.name,
        format_bytes(remote.fetched),
        format_bytes(section.bytes),
        remote.requests,
    )
    return HeaderCopy(path, remote.fetched, remote.requests)


def _whole_for_planning(section: ObjectInfo, why: str) -> None:
    logger.info(
        "fetching %s whole to plan from: its header was not read by ranges (%s)", section.name, why
    )


def hand_over_planning_section(download_dir: Path, plan: units.Plan) -> None:
    """Makes the directory of the first section, fetched whole to plan from, the
    directory of the first z range: the unit that reads it finds it verified there
    instead of downloading it again (a section of a 1 um scan is ~14 GB)."""
    planning = download_dir / layout.PLANNING_SECTION_DIR_NAME
    if not planning.is_dir():
        return
    z1 = min(unit.box.stop[2] for unit in plan.units if unit.box.start[2] == 0)
    target = layout.sections_directory(download_dir, 0, z1)
    if target.exists():  # an earlier run's units fetched there
        shutil.rmtree(planning)
    else:
        planning.rename(target)


def _volume_input(options: ingest.IngestOptions, scratch: Path | None) -> PlannedInput:
    """Returns a single volume's input, fetched once into the download directory (on
    the shared file system), where every task reads it."""
    directory = scratch or options.download_dir
    fetch_input.fetch(
        options.source,
        directory,
        jobs=options.transfers,
        settings=ingest.fetch_settings(options),
        show_progress=False,
    )
    path = Path(layout.read_fetch_manifest(directory / layout.FETCH_MANIFEST_NAME)[0][1])
    volume = ingest_ngs.open_input(path, options.parameters, None, jobs=1)
    return PlannedInput(
        unit_setup.source_info(volume, volume.size, options.parameters),
        whole_sections=False,
        bands=volume.reads_rows,
        held_bytes=volume.held_bytes,
        entries={"volume": str(path.resolve())},
    )


def options_memory_limit(options: ingest.IngestOptions) -> int | None:
    """Returns the memory budget of one unit (None: no limit, whole-plane units)."""
    return getattr(options, "memory_limit", None)


def fetch_sections(
    options: ingest.IngestOptions,
    objects: list,
    directory: Path,
    container: fetch_input.SourceContainer,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[list[Path], int]:
    """Fetches ``objects`` (listing entries) of the opened source ``container`` into
    ``directory``; returns their paths and how many were downloaded (the others
    were there, verified)."""
    result = fetch_input.fetch(
        options.source,
        directory,
        stacks=True,
        filter_regex=options.filter_regex,
        jobs=options.transfers,
        settings=ingest.fetch_settings(options),
        show_progress=False,
        should_stop=should_stop,
        objects=objects,
        container=container,
    )
    return [directory / item.name for item in objects], result.downloaded


def check_no_active_jobs(run: ArrayRun) -> None:
    """Refuses to submit while jobs of an earlier submission still run or wait."""
    numbers = run.submissions()
    if not numbers:
        return
    record = run.read_submission(numbers[-1])
    for key in ("array_job", "finish_job"):
        job = record.get(key)
        if not job:
            continue
        state = slurm.job_state(slurm.show_job(job))
        if state not in slurm.FINAL_STATES and state not in (slurm.NEVER_RUNS, "UNKNOWN"):
            raise errors.UsageError(
                f"job {job} of the earlier submission is still {state}: wait for it "
                f"(squeue -j {job}) or cancel it (scancel {job}) before submitting again"
            )


def submit(
    options: ingest.IngestOptions,
    array: ArrayOptions,
    argv: list[str],
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Plans and submits the array and its finishing job; returns what was submitted.

    With ``array.wait`` also waits for the finishing job and returns the run report.
    """
    if not options.dry_run:
        slurm.find_command("sbatch")
    checked = ingest.preflight(options)
    run = ArrayRun(options.results_dir)
    if not options.dry_run:
        check_no_active_jobs(run)
    if options.restart and not options.dry_run:
        logger.warning("--restart: deleting the earlier run in %s", options.results_dir)
        ingest.clear_directory(options.results_dir)
    plan_document = load_or_make_plan(options, checked, run, array)
    plan = units.Plan.from_dict(plan_document["plan"])
    if array.tasks > len(plan.units):
        raise errors.UsageError(
            f"--array {array.tasks}: the plan has only {len(plan.units)} unit(s); give "
            f"--array {len(plan.units)} or less (or smaller units: --sections-per-unit)"
        )
    finished = run.finished_units()
    remaining = [unit.id for unit in plan.units if unit.id not in finished]
    task_count = min(array.tasks, len(remaining))
    number = (run.submissions() or [0])[-1] + 1
    name = f"hbp-ingest-{options.results_dir.resolve().name}"
    jobs = task_jobs(options, array.sbatch_options)
    tasks, finish = job_requests(run, number, task_count, array, name, plan, jobs)
    record: dict[str, Any] = {
        "argv": task_argv(argv),
        "cwd": str(Path.cwd()),
        "jobs": jobs,
        "report": str(Path(options.report_path).resolve()),
        "tasks": split_evenly(remaining, task_count) if task_count else [],
        "array_job": None,
        "finish_job": None,
    }
    log_plan(plan, len(finished), len(remaining), task_count)
    if options.dry_run:
        return dry_run_summary(plan, remaining, tasks, finish, record)
    submit_jobs(run, number, record, tasks, finish)
    summary = {
        "status": "submitted",
        "submission": number,
        "array_job": record["array_job"],
        "finish_job": record["finish_job"],
        "units": len(plan.units),
        "units_left": len(remaining),
        "tasks": task_count,
        "logs": str(run.logs),
    }
    if array.wait:
        return wait_for_run(run, number, array.poll_seconds, should_stop)
    return summary


def log_plan(plan: units.Plan, finished: int, remaining: int, task_count: int) -> None:
    """Logs the plan's units and how many of them this submission runs."""
    logger.info(
        "plan: %d unit(s) of up to %s, %d finished, %d left for %d task(s); the "
        "finishing job builds scale(s) %s",
        len(plan.units),
        "x".join(map(str, plan.units[0].box.shape)),
        finished,
        remaining,
        task_count,
        ", ".join(map(str, plan.finishing_scales)) or "none",
    )


def submit_jobs(
    run: ArrayRun,
    number: int,
    record: dict[str, Any],
    tasks: slurm.JobRequest | None,
    finish: slurm.JobRequest,
) -> None:
    """Submits the array (if units are left) and the finishing job after it; records both."""
    run.write_submission(number, record)
    run.logs.mkdir(parents=True, exist_ok=True)
    if tasks is not None:
        record["array_job"] = slurm.submit(tasks)
        finish = dataclasses.replace(finish, after_ok=record["array_job"])
    record["finish_job"] = slurm.submit(finish)
    run.write_submission(number, record)


def dry_run_summary(
    plan: units.Plan,
    remaining: list[str],
    tasks: slurm.JobRequest | None,
    finish: slurm.JobRequest,
    record: dict,
) -> dict[str, Any]:
    """Returns the plan and the sbatch command lines a real run would submit."""
    commands = []
    if tasks is not None:
        commands.append(shlex.join(slurm.sbatch_argv(tasks)))
        finish = dataclasses.replace(finish, after_ok="<array job id>")
    commands.append(shlex.join(slurm.sbatch_argv(finish)))
    return {
        "status": "dry-run",
        "units": [unit.to_dict() for unit in plan.units],
        "units_left": remaining,
        "finishing_scales": list(plan.finishing_scales),
        "tasks": record["tasks"],
        "sbatch": commands,
    }


def wait_for_run(
    run: ArrayRun, number: int, poll_seconds: float, should_stop: Callable[[], bool] | None
) -> dict[str, Any]:
    """Waits for the finishing job; returns its report or raises the error that ended the run."""
    record = run.read_submission(number)
    report = Path(record["report"])
    outcome_path = run.outcome_path(f"finish-{record['finish_job']}")
    since = time.time()

    def ending() -> bool:
        # The finishing job writes the report, then its outcome, then cleans up.
        return outcome_path.exists() or _modified_since(report, since)

    state = slurm.wait(record["finish_job"], poll_seconds, should_stop, ending=ending)
    if state == "COMPLETED" or (state == "UNKNOWN" and report.is_file()):
        # The report, not the outcome file: --cleanup deleted the results directory.
        return json.loads(report.read_text(encoding="utf-8"))
    outcome = run.outcomes(f"finish-{record['finish_job']}").get(f"finish-{record['finish_job']}")
    if outcome is not None and outcome.get("exit_code") == errors.EXIT_OK:
        return outcome["report"]
    if outcome is not None:
        raise _error(
            outcome["exit_code"], f"finishing job {record['finish_job']}: {outcome['message']}"
        )
    if record.get("array_job"):
        failure = task_failure(run, record["array_job"])
        if failure is not None:
            raise failure
    raise errors.ConversionError(
        f"finishing job {record['finish_job']} ended {state} without a report; see "
        f"{run.logs}/finish-{record['finish_job']}.log"
    )


def _modified_since(path: Path, since: float) -> bool:
    """Returns whether ``path`` exists and changed after ``since`` (epoch seconds)."""
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def task_failure(run: ArrayRun, array_job: str) -> errors.HbpError | None:
    """Returns the error of the first failed task of ``array_job``, None when none failed."""
    for job, outcome in run.outcomes(f"task-{array_job}_").items():
        if outcome and outcome.get("exit_code") != errors.EXIT_OK:
            return _error(outcome["exit_code"], f"{job}: {outcome['message']}{RERUN_HINT}")
    for task in slurm.show_job(array_job):
        state = task.get("JobState", "")
        if state in slurm.FINAL_STATES and state != "COMPLETED":
            code = EXIT_CODE_OF_STATE.get(state, errors.EXIT_CONVERSION)
            where = f"task-{array_job}_{task.get('ArrayTaskId', '?')}"
            return _error(code, f"{where} ended {state}{RERUN_HINT}")
    return None


RERUN_HINT = "; the other units' work is kept: run the same command again to resubmit the rest"


def _error(code: int, message: str) -> errors.HbpError:
    """Returns the package error that exits with ``code``."""
    error_type = ERROR_BY_EXIT_CODE.get(code, errors.ConversionError)
    return error_type(message)


def print_summary(summary: dict[str, Any]) -> None:
    """Prints what was submitted and how to follow it (or the dry run's plan)."""
    if summary.get("status") == "dry-run":
        print(json.dumps(summary, indent=2))
        return
    jobs = [job for job in (summary["array_job"], summary["finish_job"]) if job]
    print(
        f"submitted {summary['tasks']} task(s) for {summary['units_left']} of "
        f"{summary['units']} unit(s): array job {summary['array_job'] or '-'}, "
        f"finishing job {summary['finish_job']}"
    )
    print(f"follow them:  squeue -j {','.join(jobs)}")
    print(f"their output: {summary['logs']}/")
    print("after a failure, run the same command again: finished units are kept")


__all__ = ["ArrayOptions", "array_state", "print_summary", "submit", "task_argv"]
