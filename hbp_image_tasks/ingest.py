"""ingest: fetch, convert and upload in one resumable process.

This is what the image service's UNICORE (or Slurm) jobs run. It checks every
option before any long work, records finished steps in a state file so that a
killed job resumes where it stopped, and cleans up only after a verified upload.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from . import cli, errors, fetch_input, ingest_ngs, layout, upload_results
from .atomic import write_json_atomically
from .parameters import SCHEMA_HELP, ConversionParameters, parse_parameters
from .progress import format_bytes, format_duration
from .settings import SwiftSettings, add_settings_option, load_settings_from
from .swift import SwiftConnection

logger = logging.getLogger(__name__)

STEPS = ("fetch", "convert", "upload")
DISK_MARGIN = 1.05  # free space asked for beyond the bytes still to download
REPORTED_DEPENDENCIES = (
    "neuroglancer-scripts",
    "numpy",
    "Pillow",
    "nibabel",
    "python-swiftclient",
    "keystoneauth1",
    "requests",
    "tqdm",
)

EPILOG = f"""\
example (the image service's job):
  SOURCE_URL=https://object.cscs.ch/v1/AUTH_61499a61052f419abad475045aaf88f9/img-svc-bigbrain-input
  SWIFT_SETTINGS='../.os_settings' ingest --source "$SOURCE_URL" \\
    --download-dir $SOURCE --results-dir $RESULTS --stacks \\
    --filter 'data/raw/original/pm31\\d{{2}}o.png' \\
    --parameters "$PARAMS" --container test_wrapper2 --cleanup

  A single volume instead of a stack (no --stacks; the URL is downloaded as is):
  ingest --source https://host/path/colin27T1_seg.nii.gz --download-dir src \\
    --results-dir out --parameters '{{"type": "segmentation"}}' --container colin

resuming:
  The state of the run is kept in RESULTS_DIR/{layout.INGEST_STATE_NAME}. After a kill
  (walltime, node failure) submit the same command again: finished steps are
  skipped and unfinished ones continue. Different inputs or parameters for the
  same RESULTS_DIR are refused; --restart starts over.

{SCHEMA_HELP}
{cli.exit_codes_help("ingest")}"""


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """Everything one ingest run needs, validated by ``options_from_args``."""

    source: str
    download_dir: Path
    results_dir: Path
    parameters: ConversionParameters
    stacks: bool = False
    filter_regex: str | None = None
    order_file: Path | None = None
    container: str | None = None
    settings: SwiftSettings | None = None
    source_private: bool = False
    upload: bool = True
    upload_options: upload_results.UploadOptions = upload_results.UploadOptions()
    jobs: int | None = None
    transfers: int | None = None
    memory_limit: int | None = None
    cleanup: bool = False
    restart: bool = False
    dry_run: bool = False
    report_path: Path | None = None
    show_progress: bool = True


def build_parser() -> argparse.ArgumentParser:
    """Returns ``ingest``'s parser, built from the step commands' own option helpers."""
    parser = argparse.ArgumentParser(
        prog="ingest",
        # --container is required unless --no-upload, which argparse cannot say by itself.
        usage="%(prog)s [options] --source URL --download-dir DIR --results-dir DIR\n"
        "              (--container NAME | --no-upload)",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "--source",
        required=True,
        metavar="URL",
        help="what to ingest: with --stacks the URL of a Swift container "
        "(https://HOST/v1/AUTH_<project>/<container>), else the URL of one "
        "file (a volume)",
    )
    fetch_input.add_selection_options(
        parser.add_argument_group(fetch_input.FETCH_GROUP), destination_flag="--download-dir"
    )
    ingest_ngs.add_conversion_options(parser)
    upload = parser.add_argument_group(upload_results.UPLOAD_GROUP)
    # --container is required by upload_results, but not with --no-upload.
    upload_results.add_target_options(upload, container_required=False)
    add_settings_option(upload)
    upload_results.add_publish_options(upload)
    add_job_options(parser.add_argument_group("job"))
    from . import array_job

    array_job.add_array_options(parser)
    cli.add_logging_options(parser)
    return parser


def add_job_options(job: argparse._ArgumentGroup) -> None:
    """Adds the options of ``ingest`` itself: the results, what to run, the report."""
    job.add_argument(
        "--results-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="where the precomputed dataset is written, with the job's state "
        f"({layout.INGEST_STATE_NAME}) and report ({layout.INGEST_REPORT_NAME})",
    )
    job.add_argument(
        "--source-private",
        action="store_true",
        help="read the --source container (--stacks) with the Swift credentials of "
        "--settings/$SWIFT_SETTINGS (default: anonymously, as a public container)",
    )
    job.add_argument(
        "--no-upload",
        action="store_true",
        help="fetch and convert only; --container is then not needed",
    )
    job.add_argument(
        "--cleanup",
        action="store_true",
        help="after the upload was verified, delete the download and results "
        "directories (never after a failure); with --array, each unit also "
        "deletes the files it uploaded (the finishing job verifies them in the "
        "container), and each z range's sections go once all its units are finished",
    )
    job.add_argument(
        "--restart",
        action="store_true",
        help="forget an earlier run in RESULTS_DIR (its state and dataset) and "
        "start over; needed when the inputs or parameters changed",
    )
    job.add_argument(
        "--report",
        type=Path,
        metavar="FILE",
        default=None,
        help=f"where to write the JSON run report (default: RESULTS_DIR/"
        f"{layout.INGEST_REPORT_NAME}, or ./ingest-report.json with --cleanup)",
    )
    job.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print what would be done, without writing",
    )
    cli.add_jobs_option(job, "parallel workers decoding sections and writing chunks")
    job.add_argument(
        "--transfers",
        type=cli.positive_int,
        default=None,
        metavar="N",
        help="parallel downloads and uploads; they wait on the network more than on a "
        f"core, so --jobs does not limit them (default: {fetch_input.DEFAULT_JOBS} downloads; "
        f"uploads as upload_results, {upload_results.DEFAULT_UPLOAD_JOBS_HELP})",
    )


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses ``ingest``'s command line."""
    return build_parser().parse_args(argv)


def options_from_args(args: argparse.Namespace) -> IngestOptions:
    """Validates the parsed options (except remote checks) into ``IngestOptions``."""
    upload = not args.no_upload
    if upload and not args.container:
        raise errors.UsageError("--container is required (or pass --no-upload)")
    if args.cleanup and not upload:
        raise errors.UsageError(
            "--cleanup needs an upload to verify first: drop --no-upload or --cleanup"
        )
    if args.source_private and not args.stacks:
        raise errors.UsageError(
            "--source-private reads a Swift container (--stacks); a single --source URL "
            "is fetched without credentials"
        )
    if args.container:
        upload_results.validate_container_name(args.container)
    parameters = parse_parameters(args.parameters)
    settings = None
    if upload or args.source_private:
        settings = load_settings_from(args.settings, required=True)
    report = args.report
    if report is None:
        report = (
            Path("ingest-report.json").resolve()
            if args.cleanup
            else layout.ingest_report_path(args.results_dir)
        )
    return IngestOptions(
        source=args.source,
        download_dir=Path(args.destination),
        results_dir=Path(args.results_dir),
        parameters=parameters,
        stacks=args.stacks,
        filter_regex=args.filter,
        order_file=getattr(args, "order_file", None),
        memory_limit=ingest_ngs.memory_limit_from(args),
        container=args.container,
        settings=settings,
        source_private=args.source_private,
        upload=upload,
        # ingest --dry-run stops before the upload step; the upload itself is real.
        upload_options=dataclasses.replace(
            upload_results.UploadOptions.from_args(args), dry_run=False
        ),
        jobs=args.jobs,
        transfers=args.transfers,
        cleanup=args.cleanup,
        restart=args.restart,
        dry_run=args.dry_run,
        report_path=report,
        show_progress=cli.verbosity(args) >= 0,
    )


def existing_ancestor(path: Path) -> Path:
    """Returns ``path`` or its nearest ancestor that exists (what a mkdir would use)."""
    while not path.exists():
        path = path.parent
    return path


def check_writable(directory: Path, dry_run: bool) -> None:
    """Creates ``directory`` (unless a dry run) and proves a file can be written there."""
    existing = existing_ancestor(directory)
    if not existing.is_dir():
        raise errors.UsageError(f"{existing} is not a directory")
    if dry_run:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise errors.UsageError(f"{existing} is not writable")
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise errors.UsageError(f"cannot write in {directory}: {exc.strerror}") from None


def missing_download_bytes(objects, download_dir: Path) -> int:
    """Returns the bytes still to download (files of the right size count as there)."""
    return sum(item.bytes for item in objects if not fetch_input.has_right_size(download_dir, item))


def check_free_space(directory: Path, needed: int) -> None:
    """Refuses to start a download that cannot fit on the file system."""
    existing = existing_ancestor(directory)
    free = shutil.disk_usage(existing).free
    if needed * DISK_MARGIN > free:
        raise errors.UsageError(
            f"not enough free disk in {existing}: the download needs "
            f"{format_bytes(needed)} (+5 %), {format_bytes(free)} are free"
        )


def inputs_fingerprint(options: IngestOptions, listing: str) -> dict[str, Any]:
    """Returns what identifies this run's inputs (the state refuses to mix them)."""
    return {
        "source": options.source,
        "stacks": options.stacks,
        "filter": options.filter_regex,
        "order_file": str(options.order_file) if options.order_file else None,
        "listing": listing,
        "parameters": json.loads(options.parameters.to_json()),
    }


class RunState:
    """The job's progress through its steps, saved atomically after each one."""

    def __init__(
        self, results_dir: Path, inputs: dict[str, Any], steps: dict[str, Any] | None = None
    ):
        self.results_dir = results_dir
        self.inputs = inputs
        self.steps: dict[str, Any] = steps or {}

    @classmethod
    def load(cls, results_dir: Path) -> RunState | None:
        """Returns the state saved in ``results_dir``, or None when there is none."""
        data = layout.read_ingest_state(results_dir)
        if data is None:
            return None
        return cls(results_dir, data["inputs"], data["steps"])

    def done(self, step: str, target: Any = None) -> bool:
        """True when ``step`` finished, for the same ``target``, in this or an earlier run."""
        record = self.steps.get(step, {})
        return bool(record.get("done")) and record.get("target") == target

    def finish(self, step: str, result: dict[str, Any], seconds: float, target: Any = None) -> None:
        """Records ``step`` as finished (for ``target``) and saves the state."""
        self.steps[step] = {
            "done": True,
            "seconds": round(seconds, 3),
            "finished": now(),
            "result": result,
            "target": target,
        }
        self.save()

    def forget(self, step: str) -> None:
        """Marks ``step`` (and so its output) as to be redone."""
        self.steps.pop(step, None)
        self.save()

    def save(self) -> None:
        """Writes the state atomically."""
        layout.write_ingest_state(self.results_dir, self.inputs, self.steps)


def now() -> str:
    """Returns the current UTC time in ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def differing_inputs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Returns the names of the inputs that changed since the saved run."""
    return sorted(key for key in set(saved) | set(current) if saved.get(key) != current.get(key))


def clear_directory(directory: Path) -> None:
    """Deletes everything inside ``directory`` (not the directory itself)."""
    if not directory.is_dir():
        return
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def versions() -> dict[str, str]:
    """Returns the versions of this package and of its main dependencies."""
    found = {}
    for name in ("hbp-image-tasks",) + REPORTED_DEPENDENCIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def banner(number: int, total: int, title: str) -> None:
    """Logs a step banner that stands out in a batch log."""
    logger.info("==== step %d/%d: %s ====", number, total, title)


@dataclasses.dataclass
class Preflight:
    """What the pre-flight checks found: the upload's connection, the source
    container opened (stacks), the selection and the inputs' fingerprint."""

    connection: SwiftConnection | None
    source: fetch_input.SourceContainer | None
    objects: list | None
    listing: str
    inputs: dict[str, Any]


def preflight(options: IngestOptions) -> Preflight:
    """Checks everything that can fail fast, before any long work."""
    connection = None
    if options.settings is not None:
        connection = SwiftConnection(options.settings, error_type=errors.UploadError)
    check_writable(options.download_dir, options.dry_run)
    check_writable(options.results_dir, options.dry_run)
    if options.upload and not options.restart:
        # Units of an earlier --array --cleanup run left their files only there.
        upload_results.check_released_target(
            options.results_dir, options.container, options.upload_options.prefix
        )
    if options.order_file is not None and not options.order_file.is_file():
        raise errors.UsageError(f"--order-file {options.order_file} does not exist")
    if connection is not None:
        storage_url = connection.check_credentials()
        logger.info("credentials accepted; storage URL %s", storage_url)
    source = objects = None
    if options.stacks:
        # The source shares the upload's login: one Keystone token for the run.
        source = fetch_input.open_container(
            options.source, fetch_settings(options), options.transfers, login=connection
        )
        objects = fetch_input.select_objects(options.source, options.filter_regex, container=source)
        logger.info(
            "source: %d objects selected, %s",
            len(objects),
            format_bytes(sum(item.bytes for item in objects)),
        )
        check_free_space(
            options.download_dir, missing_download_bytes(objects, options.download_dir)
        )
        listing = fetch_input.selection_fingerprint(objects)
    else:
        listing = hashlib.sha256(options.source.encode()).hexdigest()
    return Preflight(connection, source, objects, listing, inputs_fingerprint(options, listing))


def fetch_settings(options: IngestOptions) -> SwiftSettings | None:
    """Returns the credentials to read the source with (None: anonymously)."""
    return options.settings if options.source_private else None


def open_state(options: IngestOptions, inputs: dict[str, Any]) -> RunState | None:
    """Returns the run's state, refusing other inputs; None when there is none yet."""
    state = RunState.load(options.results_dir)
    if state is not None and state.inputs != inputs:
        if not options.restart:
            raise errors.UsageError(
                f"{options.results_dir} holds a run with other inputs (changed: "
                f"{', '.join(differing_inputs(state.inputs, inputs))}); to start "
                f"over with these, rerun with --restart (it deletes the dataset in "
                f"{options.results_dir})"
            )
        return None
    return state


class StepRunner:
    """Runs the steps in order, skipping those the state records as done."""

    def __init__(self, state: RunState, steps: list[str]):
        self.state = state
        self.steps = steps
        self.seconds: dict[str, float] = {}

    def run(self, step: str, work: Callable[[], Any], target: Any = None) -> dict[str, Any]:
        """Runs ``work`` unless ``step`` is done for ``target``; returns its summary."""
        banner(self.steps.index(step) + 1, len(self.steps), step)
        if self.state.done(step, target):
            logger.info("%s: already done in an earlier run, skipping", step)
            return self.state.steps[step]["result"]
        clock = time.monotonic()
        try:
            result = work()
        except errors.HbpError:
            raise
        except Exception as exc:  # a failure nobody mapped: name the step
            error_type = {
                "fetch": errors.FetchError,
                "convert": errors.ConversionError,
                "upload": errors.UploadError,
            }[step]
            logger.debug("%s failed", step, exc_info=True)
            raise error_type(f"{step} failed: {type(exc).__name__}: {exc}") from exc
        self.seconds[step] = time.monotonic() - clock
        summary = result.to_dict()
        self.state.finish(step, summary, self.seconds[step], target)
        logger.info("%s: done in %s", step, format_duration(self.seconds[step]))
        return summary


def ingest(options: IngestOptions, should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Runs the whole chain; returns the run report (also written as JSON)."""
    started, started_clock = now(), time.monotonic()
    should_stop = should_stop or (lambda: False)
    checked = preflight(options)
    state = open_state(options, checked.inputs)
    if options.dry_run:
        return dry_run_report(options, checked.objects, state)
    state = start_state(options, state, checked.inputs)
    runner = StepRunner(state, ["fetch", "convert"] + (["upload"] if options.upload else []))
    fetched = runner.run("fetch", lambda: run_fetch(options, checked, should_stop))
    if state.done("convert") and not ingest_ngs.is_complete(options.results_dir):
        logger.warning("the dataset in %s is incomplete: converting again", options.results_dir)
        state.forget("convert")
        state.forget("upload")
    converted = runner.run("convert", lambda: run_convert(options, should_stop))
    uploaded = None
    if options.upload:
        # Done only for the same destination: another container uploads again.
        target = {
            "storage_url": checked.connection.storage_url,
            "container": options.container,
            "prefix": options.upload_options.prefix,
        }
        uploaded = runner.run("upload", lambda: run_upload(options, checked, should_stop), target)
    report = run_report(
        options,
        state,
        runner,
        checked.listing,
        fetched,
        converted,
        uploaded,
        started,
        started_clock,
    )
    write_json_atomically(options.report_path, report)
    if options.cleanup:
        for directory in (options.download_dir, options.results_dir):
            logger.info("--cleanup: deleting %s", directory)
            shutil.rmtree(directory)
    return report


def start_state(options: IngestOptions, state: RunState | None, inputs: dict[str, Any]) -> RunState:
    """Returns the state to run with: the earlier run's, or a new one (--restart clears)."""
    if options.restart:
        logger.warning("--restart: deleting the earlier run in %s", options.results_dir)
        clear_directory(options.results_dir)
        state = None
    if state is None:
        state = RunState(options.results_dir, inputs)
        state.save()
    return state


def run_fetch(
    options: IngestOptions, checked: Preflight, should_stop: Callable[[], bool]
) -> fetch_input.FetchResult:
    """The fetch step: the objects selected in the pre-flight, into the download dir."""
    return fetch_input.fetch(
        options.source,
        options.download_dir,
        stacks=options.stacks,
        filter_regex=options.filter_regex,
        jobs=options.transfers,
        settings=fetch_settings(options),
        show_progress=options.show_progress,
        should_stop=should_stop,
        objects=checked.objects,
        container=checked.source,
    )


def run_convert(
    options: IngestOptions, should_stop: Callable[[], bool]
) -> ingest_ngs.ConversionResult:
    """The convert step: the download into the results dir."""
    return ingest_ngs.convert(
        conversion_source(options),
        options.results_dir,
        options.parameters,
        jobs=options.jobs,
        show_progress=options.show_progress,
        should_stop=should_stop,
        order_file=options.order_file,
        memory_limit=options.memory_limit,
    )


def run_upload(
    options: IngestOptions, checked: Preflight, should_stop: Callable[[], bool]
) -> upload_results.UploadResult:
    """The upload step: the results dir to the container, verified."""
    return upload_results.upload(
        options.results_dir,
        options.container,
        checked.connection,
        options.upload_options,
        jobs=options.transfers,
        show_progress=options.show_progress,
        should_stop=should_stop,
    )


def run_report(
    options: IngestOptions,
    state: RunState,
    runner: StepRunner,
    listing: str,
    fetched: dict,
    converted: dict,
    uploaded: dict | None,
    started: str,
    started_clock: float,
) -> dict[str, Any]:
    """Returns the JSON run report."""
    return {
        "status": "success",
        "started": started,
        "finished": now(),
        "wall_seconds": round(time.monotonic() - started_clock, 3),
        "inputs": {
            "source": options.source,
            "stacks": options.stacks,
            "filter": options.filter_regex,
            "listing_fingerprint": listing,
            "files": fetched.get("files"),
            "bytes": fetched.get("bytes"),
        },
        "parameters": json.loads(options.parameters.to_json()),
        "steps": {
            step: {
                "seconds": state.steps[step].get("seconds"),
                "resumed_from_earlier_run": step not in runner.seconds,
                "result": state.steps[step]["result"],
            }
            for step in runner.steps
        },
        "outputs": converted,
        "public_url": uploaded.get("public_url") if uploaded else None,
        "neuroglancer_link": uploaded.get("neuroglancer_link") if uploaded else None,
        "retries": sum(
            int((state.steps[step]["result"] or {}).get("retries") or 0) for step in runner.steps
        ),
        "versions": versions(),
    }


def conversion_source(options: IngestOptions) -> Path:
    """Returns what the converter reads: the download dir (stack) or the one file."""
    if options.stacks:
        return options.download_dir
    manifest = options.download_dir / layout.FETCH_MANIFEST_NAME
    return layout.read_fetch_manifest(manifest)[0][1]


def dry_run_report(options: IngestOptions, objects, state: RunState | None) -> dict[str, Any]:
    """Returns (and logs) what a real run would do."""
    plan = {
        "status": "dry-run",
        "source": options.source,
        "objects": len(objects) if objects is not None else 1,
        "bytes": sum(o.bytes for o in objects) if objects is not None else None,
        "steps_done_before": sorted(s for s in STEPS if state and state.done(s)),
        "container": options.container if options.upload else None,
    }
    logger.info(
        "dry run: would fetch %s object(s)%s, convert to %s%s",
        plan["objects"],
        f" ({format_bytes(plan['bytes'])})" if plan["bytes"] else "",
        options.results_dir,
        f", upload to container {options.container!r}" if options.upload else "",
    )
    return plan


def print_summary(report: dict[str, Any]) -> None:
    """Prints the end-of-run summary lines on stdout."""
    if report.get("status") == "dry-run":
        print(json.dumps(report, indent=2))
        return
    print(f"ingest finished in {format_duration(report['wall_seconds'])}")
    for step, info in report["steps"].items():
        seconds = info.get("seconds")
        note = " (earlier run)" if info.get("resumed_from_earlier_run") else ""
        print(f"  {step:8s} {format_duration(seconds or 0)}{note}")
    if report.get("public_url"):
        print(f"public URL:        {report['public_url']}")
        print(f"Neuroglancer link: {report['neuroglancer_link']}")


def submit_array(args: argparse.Namespace, argv: list[str] | None, options: IngestOptions) -> int:
    """Runs ``ingest --array``: plans and submits (array_job.py); returns the exit code."""
    from . import array_job

    if args.array is None:
        raise errors.UsageError("--wait and --sbatch-option need --array N")
    array = array_job.array_options_from_args(args)
    with cli.stop_on_signals() as stop:
        summary = array_job.submit(options, array, sys.argv[1:] if argv is None else argv, stop)
    if summary.get("status") == "success":
        print_array_report(summary)
    else:
        array_job.print_summary(summary)
    return errors.EXIT_OK


def print_array_report(report: dict[str, Any]) -> None:
    """Prints the end of an array run that was waited for."""
    array = report["array"]
    print(f"ingest --array finished: {array['units']} units, {array['unit_files']} unit files")
    if report.get("public_url"):
        print(f"public URL:        {report['public_url']}")
        print(f"Neuroglancer link: {report['neuroglancer_link']}")


def main(argv: list[str] | None = None) -> int:
    """Runs ``ingest``; returns the exit code."""
    args = parse_command_line(argv)

    def work(redactor: cli.RedactingFilter) -> int:
        if args.print_parameters:
            print(parse_parameters(args.parameters).resolved().to_json())
            return errors.EXIT_OK
        options = options_from_args(args)
        if options.settings is not None:
            redactor.add(options.settings.os_password.reveal())
        if args.array is not None or args.wait or args.sbatch_option:
            return submit_array(args, argv, options)
        with cli.stop_on_signals() as stop:
            try:
                report = ingest(options, should_stop=stop)
            except errors.Interrupted as exc:
                raise errors.Interrupted(
                    f"{exc}; state saved in {options.results_dir / layout.INGEST_STATE_NAME}: "
                    f"submit the same command again to resume"
                ) from None
        print_summary(report)
        return errors.EXIT_OK

    return cli.run_command(work, args)


if __name__ == "__main__":
    sys.exit(main())
