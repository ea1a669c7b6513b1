"""The jobs that ``ingest --array`` submits: ``task`` runs units, ``finish`` completes the run.

``python -m hbp_image_tasks.array_task task RESULTS_DIR --submission K`` (one per
array index) fetches, converts and uploads the units its submission gave it and
records each finished unit; ``finish`` builds the upper scales from the units'
pieces, uploads and verifies the whole dataset, writes the run report and only
then applies --cleanup. Both read everything from RESULTS_DIR/.hbp-array/.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Container, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from . import (
    array_job,
    cli,
    errors,
    fetch_input,
    ingest,
    layout,
    shard_writer,
    sources,
    unit_conversion,
    unit_setup,
    units,
    upload_results,
)
from .array_state import ArrayRun
from .atomic import write_json_atomically
from .object_names import join_prefix
from .progress import format_duration
from .swift import ObjectInfo, SwiftConnection
from .upload_plan import Digest, LocalObject, read_manifest_digests

logger = logging.getLogger(__name__)


class Job:
    """One job's view of the run: the plan, its submission and ingest's options."""

    def __init__(self, results_dir: Path, submission: int):
        self.run = ArrayRun(results_dir)
        document = self.run.read_plan()
        if document is None:
            raise errors.UsageError(f"{self.run.plan_path()} is missing: nothing to run")
        self.document = document
        self.record = self.run.read_submission(submission)
        self.info: dict = document["info"]
        self.plan = units.Plan.from_dict(document["plan"])
        self.units = {unit.id: unit for unit in self.plan.units}
        # The ingest command line's relative paths are the submitter's.
        os.chdir(self.record["cwd"])
        options = ingest.options_from_args(ingest.parse_command_line(self.record["argv"]))
        # The workers the submission planned memory for and asked Slurm's CPUs for.
        jobs = self.record.get("jobs") or options.jobs or 1
        self.options = dataclasses.replace(options, jobs=jobs)
        self.volume: sources.VolumeSource | None = None
        self.connection = None
        if self.options.upload:
            self.connection = SwiftConnection(self.options.settings, error_type=errors.UploadError)
        self._source: fetch_input.SourceContainer | None = None

    def source_container(self) -> fetch_input.SourceContainer:
        """Returns the source container, opened once a task with the upload's login."""
        if self._source is None:
            self._source = fetch_input.open_container(
                self.options.source,
                ingest.fetch_settings(self.options),
                self.options.transfers,
                login=self.connection,
            )
        return self._source

    def section_objects(self, unit: units.Unit) -> list[ObjectInfo]:
        """Returns the listing entries of a unit's sections."""
        z0, z1 = unit.box.start[2], unit.box.stop[2]
        return [ObjectInfo(name, size, md5) for name, size, md5 in self.document["sections"][z0:z1]]

    def unit_source(self, unit: units.Unit, should_stop: Callable[[], bool]):
        """Returns what a unit reads and how many sections it downloaded for it: the
        volume the submission fetched (opened once a task), or the unit's own
        sections, fetched now unless an earlier unit or the plan left them there."""
        if "volume" in self.document:
            if self.volume is None:
                self.volume = sources.VolumeSource(Path(self.document["volume"]))
            return self.volume, 0
        z0, z1 = unit.box.start[2], unit.box.stop[2]
        directory = layout.sections_directory(self.options.download_dir, z0, z1)
        with locked(directory):
            paths, downloaded = array_job.fetch_sections(
                self.options,
                self.section_objects(unit),
                directory,
                self.source_container(),
                should_stop,
            )
        return unit_setup.UnitSource(paths, z0, self.options.parameters.channels), downloaded


@contextlib.contextmanager
def locked(directory: Path):
    """Holds an exclusive lock on ``directory`` (units of one z range share its sections)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / layout.ARRAY_LOCK_NAME, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def run_unit(job: Job, unit: units.Unit, executor, should_stop: Callable[[], bool]) -> dict:
    """Fetches, converts and uploads one unit; returns its record."""
    started = time.monotonic()
    options = job.options
    source, downloaded = job.unit_source(unit, should_stop)
    fetched = time.monotonic()
    results_dir = options.results_dir
    if unit_conversion.read_done(results_dir, unit) is None:
        context = unit_setup.make_context(
            job.info, source, options.parameters, results_dir, executor, should_stop
        )
        unit_conversion.run_unit(unit, context, results_dir)
    converted = time.monotonic()
    files = unit_setup.unit_files(results_dir, job.info, unit)
    digests = {}
    if job.connection is not None:
        digests = upload_results.upload_objects(
            job.connection,
            options.container,
            files,
            options.upload_options,
            jobs=options.transfers,
            should_stop=should_stop,
        )
    ended = time.monotonic()
    return {
        "id": unit.id,
        "seconds": round(ended - started, 3),
        "downloaded_sections": downloaded,
        # Where a unit's time went, for the task's log and the benchmarks.
        "phases": {
            "fetch": round(fetched - started, 3),
            "convert": round(converted - fetched, 3),
            "upload": round(ended - converted, 3),
        },
        # The task's peak so far (Linux counts KiB): what --mem must cover.
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "files": [file_entry(local, digests.get(local.name)) for local in files],
    }


def file_entry(local: LocalObject, digest: Digest | None) -> dict:
    """Returns what a unit record keeps of one of its files (the MD5 once uploaded)."""
    entry = {
        "name": local.name,
        "bytes": local.size,
        "mtime_ns": local.mtime_ns,
        "md5": digest.md5 if digest else None,
    }
    if local.content_encoding:
        entry["content_encoding"] = local.content_encoding
    if digest and digest.segments:
        entry["segments"] = [list(segment) for segment in digest.segments]
    return entry


def run_task(job: Job, index: int, should_stop: Callable[[], bool]) -> int:
    """Runs the units of array task ``index`` that are not finished; returns how many ran."""
    unit_ids = job.record["tasks"][index]
    ran = 0
    with ThreadPoolExecutor(max_workers=job.options.jobs) as executor:
        for number, unit_id in enumerate(unit_ids, 1):
            if job.run.unit_record(unit_id) is not None:
                logger.info("unit %s: finished in an earlier run", unit_id)
                continue
            if should_stop():
                raise errors.Interrupted(f"stopped before unit {unit_id}")
            logger.info("unit %s (%d/%d of this task): starting", unit_id, number, len(unit_ids))
            record = run_unit(job, job.units[unit_id], executor, should_stop)
            job.run.record_unit(unit_id, record)
            ran += 1
            if job.options.cleanup:
                release_unit_files(job, unit_id, record)
                if "sections" in job.document:
                    release_sections(
                        job.run, job.plan.units, job.options.download_dir, job.units[unit_id]
                    )
            logger.info(
                "unit %s (%d/%d of this task): %d files in %s (%s)",
                unit_id,
                number,
                len(unit_ids),
                len(record["files"]),
                format_duration(record["seconds"]),
                ", ".join(f"{name} {seconds:.1f} s" for name, seconds in record["phases"].items()),
            )
    return ran


def release_unit_files(job: Job, unit_id: str, record: dict) -> int:
    """Deletes the files a unit uploaded (``--cleanup``), after recording them as
    released: the finishing job verifies them in the container instead, and the
    shared file system holds the output of the units in flight, not the whole
    dataset's. The units' pieces stay for the finishing job. Returns how many went."""
    files = record["files"]
    if job.connection is None or not files or any(not entry["md5"] for entry in files):
        return 0
    options = job.options
    layout.write_released(
        options.results_dir,
        unit_id,
        {
            "container": options.container,
            "prefix": options.upload_options.prefix,
            "objects": files,
        },
    )
    base = os.path.join(options.results_dir, "")
    for entry in files:
        # A gzipped chunk is on disk as NAME.gz.
        layout.remove_files([base + entry["name"] + ".gz", base + entry["name"]])
    logger.info("--cleanup: deleted the %d files unit %s uploaded", len(files), unit_id)
    return len(files)


def release_sections(
    run: ArrayRun, plan_units: Iterable[units.Unit], download_dir: Path, unit: units.Unit
) -> bool:
    """Deletes the sections of ``unit``'s z range once every unit of that range is
    recorded as finished (``--cleanup``): the shared file system then holds the input
    of the z ranges in flight, not the whole stack's. Returns whether it deleted them."""
    z_range = (unit.box.start[2], unit.box.stop[2])
    sharing = (u for u in plan_units if (u.box.start[2], u.box.stop[2]) == z_range)
    if any(run.unit_record(u.id) is None for u in sharing):
        return False
    directory = layout.sections_directory(download_dir, *z_range)
    if not directory.is_dir():
        return False
    try:
        with locked(directory):
            for entry in directory.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry)
                elif entry.name != layout.ARRAY_LOCK_NAME:
                    entry.unlink()
        # The lock file last, closed: NFS keeps an open file's name until it is closed.
        shutil.rmtree(directory)
    except OSError as exc:  # the finishing job's --cleanup deletes what is left
        logger.warning("--cleanup: could not delete %s yet (%s)", directory, exc)
        return False
    logger.info("--cleanup: deleted %s, its z range's units are all finished", directory)
    return True


def seed_upload_manifest(job: Job, records: list[dict]) -> None:
    """Adds the units' uploaded MD5s to the upload manifest, so the verifying upload
    trusts them (same size and mtime) instead of reading every file again."""
    prefix = job.options.upload_options.prefix
    known = {
        name: {"name": name, "bytes": size, "mtime_ns": mtime, "md5": md5}
        for name, (size, mtime, md5) in read_manifest_digests(job.options.results_dir).items()
    }
    for record in records:
        for entry in record["files"]:
            if entry.get("md5"):
                name = join_prefix(prefix, entry["name"])
                known[name] = {**entry, "name": name}
    layout.write_upload_manifest(job.options.results_dir, {"objects": list(known.values())})


def check_unit_files(job: Job, records: list[dict], released: Container[str] = ()) -> None:
    """Refuses a results directory whose unit files changed since they were recorded;
    the files of the ``released`` units (deleted after their upload) may be missing."""
    # Plain strings: a dataset has up to millions of files, and pathlib's joins cost
    # more than the stat calls.
    base = os.path.join(job.options.results_dir, "")
    for record in records:
        for entry in record["files"]:
            size = None
            # A gzipped chunk is on disk as NAME.gz (one stat for each file).
            for path in (base + entry["name"] + ".gz", base + entry["name"]):
                try:
                    size = os.stat(path).st_size
                    break
                except FileNotFoundError:
                    continue
            if size is None and record["id"] in released:
                continue
            if size != entry["bytes"]:
                raise errors.ConversionError(
                    f"{path}: recorded by unit {record['id']} with {entry['bytes']} bytes, "
                    f"now {'missing' if size is None else f'{size} bytes'}; run with --restart"
                )


def run_finish(job: Job, should_stop: Callable[[], bool], job_id: str) -> dict:
    """Builds the upper scales, uploads and verifies everything; returns the run report."""
    started = time.monotonic()
    missing = [unit_id for unit_id in job.units if job.run.unit_record(unit_id) is None]
    if missing:
        raise errors.ConversionError(
            f"{len(missing)} unit(s) not finished (e.g. {missing[0]}); run the same "
            "ingest --array command again to resubmit them"
        )
    records = [job.run.unit_record(unit_id) for unit_id in job.units]
    released = layout.released_units(job.options.results_dir)
    check_unit_files(job, records, released)
    options = job.options
    with ThreadPoolExecutor(max_workers=options.jobs) as executor:
        context = unit_setup.make_context(
            job.info, None, options.parameters, options.results_dir, executor, should_stop
        )
        counts = unit_conversion.run_finishing(job.plan, context, options.results_dir)
        if isinstance(context.accessor, shard_writer.ShardedFileAccessor):
            # The shards that several units share: their pieces are all on disk now.
            assembled = context.accessor.assemble_ready()
            logger.info("finishing step: assembled %d shards the units shared", assembled)
            shard_writer.check_finished(options.results_dir)
    logger.info("finishing step: %d chunks of the upper scales", counts.chunks)
    # Every unit and the upper scales are written: the conversion is publishable.
    layout.write_complete_marker(
        options.results_dir,
        layout.fingerprint_of(job.document["inputs"]),
        {"units": len(records), "finishing_chunks": counts.chunks},
    )
    layout.remove_conversion_state(options.results_dir)
    uploaded = None
    if job.connection is not None:
        seed_upload_manifest(job, records)
        try:
            uploaded = upload_results.upload(
                options.results_dir,
                options.container,
                job.connection,
                options.upload_options,
                jobs=options.transfers,
                show_progress=False,
                should_stop=should_stop,
            ).to_dict()
        except upload_results.ReleasedObjectsMissing as exc:
            lost = forget_units_of(job, exc.names)
            raise errors.UploadError(
                f"{exc}; their {len(lost)} unit(s) are marked unfinished (e.g. {lost[0]}): "
                "run the same ingest --array command again to convert them again",
                object_name=exc.object_name,
            ) from None
    seconds = time.monotonic() - started
    released_files = sum(len(record["files"]) for record in records if record["id"] in released)
    return finish_report(job, records, counts, uploaded, seconds, job_id, released_files)


def forget_units_of(job: Job, names: Iterable[str]) -> list[str]:
    """Marks unfinished the units whose released files are not in the container, so
    that the next run converts and uploads them again; returns their ids."""
    names = set(names)
    results_dir = job.options.results_dir
    lost = sorted(
        unit_id
        for unit_id, record in layout.read_released(results_dir).items()
        if any(entry["name"] in names for entry in record["objects"])
    )
    # Unfinished before anything is forgotten: the state back, then the marker gone.
    layout.write_conversion_state(
        results_dir, layout.ConversionState(layout.fingerprint_of(job.document["inputs"]))
    )
    layout.remove_complete_marker(results_dir)
    for unit_id in lost:
        layout.remove_files(
            [job.run.unit_path(unit_id), layout.unit_record_path(results_dir, unit_id)]
        )
    layout.forget_released(results_dir, lost)
    return lost


def finish_report(
    job: Job,
    records: list[dict],
    counts,
    uploaded: dict | None,
    seconds: float,
    job_id: str,
    released_files: int = 0,
) -> dict:
    """Returns the run report of an array run."""
    unit_files = sum(len(record["files"]) for record in records)
    return {
        "status": "success",
        "finished": ingest.now(),
        "mode": "array",
        "inputs": {
            "source": job.options.source,
            "stacks": job.options.stacks,
            "filter": job.options.filter_regex,
            "listing_fingerprint": job.document["inputs"].get("listing"),
            "files": len(job.document.get("sections", ())) or 1,
        },
        "parameters": job.document["inputs"].get("parameters"),
        "array": {
            "units": len(records),
            "unit_seconds": round(sum(record["seconds"] for record in records), 3),
            "unit_files": unit_files,
            "finishing_job": job_id,
            "finishing_seconds": round(seconds, 3),
            "finishing_chunks": counts.chunks,
            "unit_peak_rss_bytes": max(record.get("peak_rss_bytes", 0) for record in records),
            # deleted by their units once uploaded (--cleanup), verified in the listing
            "released_files": released_files,
        },
        "upload": uploaded,
        "public_url": uploaded.get("public_url") if uploaded else None,
        "neuroglancer_link": uploaded.get("neuroglancer_link") if uploaded else None,
        "versions": ingest.versions(),
    }


def cleanup(options: ingest.IngestOptions) -> None:
    """Deletes the download and results directories (after a verified upload only)."""
    for directory in (options.download_dir, options.results_dir):
        logger.info("--cleanup: deleting %s", directory)
        shutil.rmtree(directory, ignore_errors=True)


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses a job's command line (written by ``ingest --array``, not by hand)."""
    parser = argparse.ArgumentParser(
        prog="python -m hbp_image_tasks.array_task", description=__doc__
    )
    parser.add_argument("verb", choices=["task", "finish"])
    parser.add_argument("results_dir", type=Path)
    parser.add_argument("--submission", type=int, required=True)
    cli.add_logging_options(parser)
    return parser.parse_args(argv)


def job_name(verb: str, environ: dict) -> str:
    """Returns the name of this job's outcome file: task-<array>_<index> or finish-<id>."""
    if verb == "task":
        return f"task-{environ.get('SLURM_ARRAY_JOB_ID', 'local')}_{task_index(environ)}"
    return f"finish-{environ.get('SLURM_JOB_ID', 'local')}"


def task_index(environ: dict) -> int:
    """Returns this array task's index."""
    try:
        return int(environ["SLURM_ARRAY_TASK_ID"])
    except (KeyError, ValueError):
        raise errors.UsageError(
            "SLURM_ARRAY_TASK_ID is not set: run as a Slurm array task"
        ) from None


def main(argv: list[str] | None = None) -> int:
    """Runs one job of an array run; returns the exit code."""
    args = parse_command_line(argv)
    environ = dict(os.environ)
    name = job_name(args.verb, environ)
    run = ArrayRun(args.results_dir)

    def work(redactor: cli.RedactingFilter) -> int:
        job = Job(args.results_dir, args.submission)
        if job.options.settings is not None:
            redactor.add(job.options.settings.os_password.reveal())
        with cli.stop_on_signals() as stop:
            if args.verb == "task":
                run_task(job, task_index(environ), stop)
                return errors.EXIT_OK
            report = run_finish(job, stop, environ.get("SLURM_JOB_ID", "local"))
        write_json_atomically(job.options.report_path, report)
        run.write_outcome(name, {"exit_code": errors.EXIT_OK, "report": report})
        if job.options.cleanup:
            cleanup(job.options)
        return errors.EXIT_OK

    def recorded(redactor: cli.RedactingFilter) -> int:
        try:
            return work(redactor)
        except errors.HbpError as exc:
            run.write_outcome(name, {"exit_code": exc.exit_code, "message": str(exc)})
            raise
        except Exception as exc:
            message = redactor.redact(f"unexpected error: {type(exc).__name__}: {exc}")
            run.write_outcome(name, {"exit_code": errors.EXIT_INTERNAL, "message": message})
            raise

    return cli.run_command(recorded, args)


if __name__ == "__main__":
    sys.exit(main())
