"""Convert a stack of 2D sections or a 3D volume to a Neuroglancer precomputed pyramid.

SOURCE is a directory of sections (PNG, TIFF, JPEG; natural sort order), a
fetch manifest (or the download directory holding one), or a volume file that
nibabel reads (NIfTI, MINC, Analyze, MGH). The output directory gets the
`info` file and every scale of a dyadic pyramid (flat chunk layout), written
with neuroglancer-scripts' encoders by a thread pool. A killed conversion
resumes from its last checkpoint when the same command is run again.
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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np

from . import cli, errors, layout, memory, unit_conversion, units
from . import parameters as parameters_module
from .atomic import write_json_atomically
from .parameters import ConversionParameters, parse_parameters
from .progress import Progress, format_bytes, format_duration

logger = logging.getLogger(__name__)

CHECKPOINT_INTERVAL = 30.0  # seconds of work a hard kill may cost at most


@dataclasses.dataclass
class ConversionResult:
    """What a conversion produced: scales, chunk and byte counts, timings."""

    scales: list
    chunks: int
    bytes_written: int
    input_count: int
    input_bytes: int
    wall_seconds: float
    destination: str = ""
    resumed: bool = False

    def to_dict(self) -> dict:
        """Returns the result as a JSON-ready dict."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Returns the result as indented JSON."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def is_complete(destination: Path) -> bool:
    """Returns whether ``destination`` holds a finished conversion."""
    destination = Path(destination)
    return (destination / layout.COMPLETE_MARKER_NAME).is_file() and (
        destination / "info"
    ).is_file()


def _output_dtype(source, params: ConversionParameters) -> str:
    """Returns the output data_type, refusing silent clipping of the input."""
    input_dtype = np.dtype(source.dtype)
    if params.data_type is not None:
        output = np.dtype(params.data_type)
        if (
            params.input_max is None
            and np.issubdtype(input_dtype, np.integer)
            and np.issubdtype(output, np.integer)
            and input_dtype.itemsize > output.itemsize
        ):
            raise errors.InputError(
                f"{source.paths[0]}: {input_dtype} samples do not fit parameter "
                f"'data_type' {params.data_type}; give 'input_min'/'input_max' to "
                "rescale them, or omit 'data_type' to keep the input's type"
            )
        return params.data_type
    if params.input_max is not None:
        return "uint8"
    if params.encoding == "jpeg":
        return "uint8"
    if input_dtype.kind == "b":
        return "uint8"
    if input_dtype.kind == "f":
        if params.type == "segmentation":
            raise errors.InputError(
                f"{source.paths[0]}: floating-point samples cannot be labels; give 'data_type'"
            )
        return "float32"
    if input_dtype.kind == "i":
        minimum = source.minimum()
        if minimum is not None and minimum < 0:
            if params.type == "segmentation":
                raise errors.InputError(f"{source.paths[0]}: negative labels (minimum {minimum:g})")
            logger.warning(
                "%s: signed samples down to %g are stored as float32", source.paths[0], minimum
            )
            return "float32"
        return f"uint{input_dtype.itemsize * 8}"
    return input_dtype.name


def _value_transform(input_dtype: np.dtype, output_dtype: str, params: ConversionParameters):
    """Returns the per-block sample conversion, or None when samples are copied as is."""
    from neuroglancer_scripts.data_types import get_chunk_dtype_transformer

    output = np.dtype(output_dtype)
    if params.input_max is None:
        if input_dtype == output:
            return None
        transformer = get_chunk_dtype_transformer(input_dtype, output, warn=False)
        # neuroglancer-scripts 1.2.0 passes preserve_input=False, which makes
        # np.array(copy=False) raise under numpy 2 for int16 -> uint16.
        return lambda block: transformer(block, preserve_input=True)
    low = params.input_min if params.input_min is not None else 0.0
    high = params.input_max
    out_low, out_high = (
        (float(np.iinfo(output).min), float(np.iinfo(output).max))
        if np.issubdtype(output, np.integer)
        else (0.0, 1.0)
    )
    slope = (out_high - out_low) / (high - low)
    transformer = get_chunk_dtype_transformer(np.float64, output, warn=False)

    def rescale(block: np.ndarray) -> np.ndarray:
        work = block.astype(np.float64)
        work -= low
        work *= slope
        work += out_low
        return transformer(work, preserve_input=False)

    return rescale


def _fingerprint(params: ConversionParameters, info: dict, source) -> str:
    document = {
        "parameters": params.to_dict(),
        "info": info,
        "inputs": source.identity(),
        "format": 1,
    }
    text = json.dumps(document, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _remove_previous_output(destination: Path) -> None:
    """Removes what an earlier, different conversion left in ``destination``."""
    old_info = layout.read_json(destination / "info") or {}
    for scale in old_info.get("scales", []):
        key = str(scale.get("key", ""))
        target = destination / key
        if key and ".." not in key and target.is_dir():
            shutil.rmtree(target)
    shutil.rmtree(destination / unit_conversion.UNITS_DIR, ignore_errors=True)
    for path in [
        destination / name
        for name in (layout.COMPLETE_MARKER_NAME, layout.CONVERSION_STATE_NAME, "info")
    ] + layout.checkpoint_files(destination):
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _prepare_destination(destination: Path, fingerprint: str) -> dict | None:
    """Returns the resumable state for ``fingerprint``, cleaning stale output."""
    destination.mkdir(parents=True, exist_ok=True)
    state = layout.read_json(destination / layout.CONVERSION_STATE_NAME)
    complete = layout.read_json(destination / layout.COMPLETE_MARKER_NAME)
    ours = state is not None or complete is not None
    if not ours:
        entries = [e for e in destination.iterdir() if not e.name.startswith(".")]
        if entries:
            raise errors.UsageError(
                f"{destination}: not empty and holds no conversion state of "
                "ingest_ngs; give an empty or new --destination"
            )
        return None
    for document in (state, complete):
        if document is not None and document.get("fingerprint") != fingerprint:
            logger.warning(
                "%s holds a conversion of other input or parameters; starting over", destination
            )
            _remove_previous_output(destination)
            return None
    return state


def convert(
    source: Path,
    destination: Path,
    parameters: ConversionParameters,
    jobs: int | None = None,
    show_progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    order_file: Path | None = None,
    memory_limit: int | None = None,
) -> ConversionResult:
    """Converts ``source`` into a precomputed pyramid in ``destination``; returns the result.

    Raises InputError for unusable input, ConversionError when writing fails
    and Interrupted (after saving a checkpoint) when ``should_stop()`` turns
    true; the same call then resumes. When the single pass would hold more
    than ``memory_limit`` bytes, the volume is converted unit by unit
    (units.py) into the same files; UsageError if no unit fits the limit.
    """
    from neuroglancer_scripts import precomputed_io
    from neuroglancer_scripts.accessor import DataAccessError

    from . import pyramid, shard_writer, sources

    started = time.monotonic()
    source, destination = Path(source), Path(destination)
    jobs = jobs or cli.default_jobs()
    params = parameters
    input_source = sources.open_source(source, order_file, params.channels)
    if params.type == "segmentation" and input_source.channels != 1:
        raise errors.InputError(f"{source}: RGB input cannot be a segmentation")
    if params.encoding == "jpeg" and input_source.channels not in (1, 3):
        raise errors.InputError(f"{source}: jpeg needs 1 or 3 channels")
    data_type = _output_dtype(input_source, params)
    voxel_size = params.voxel_size_nm() or input_source.voxel_size_nm
    if voxel_size is None:
        logger.warning(
            "no 'voxel_size' given for the section stack: using 1 um "
            'isotropic voxels (give e.g. {"voxel_size": [20, 20, 20], '
            '"voxel_unit": "um"})'
        )
        voxel_size = (parameters_module.DEFAULT_STACK_VOXEL_SIZE_NM,) * 3
    info = pyramid.build_info(
        data_type,
        input_source.channels,
        input_source.size,
        voxel_size,
        params.voxel_offset,
        params.type,
        params.effective_encoding,
        params.chunk_size,
        params.max_scales,
    )
    if params.effective_encoding == "jpeg" and info["data_type"] != "uint8":
        raise errors.UsageError(
            f"parameter 'encoding': jpeg needs uint8 samples, the input gives {info['data_type']}"
        )
    sharded = shard_writer.add_sharding(info, params)
    transform = _value_transform(np.dtype(input_source.dtype), info["data_type"], params)
    fingerprint = _fingerprint(params, info, input_source)
    plan = None
    if memory_limit is not None and units.single_pass_memory(info, jobs) > memory_limit:
        plan = units.plan_units(
            info, memory_limit, jobs, whole_sections=not input_source.reads_regions
        )
    scales = [
        {
            "key": s["key"],
            "size": s["size"],
            "chunk_size": s["chunk_sizes"][0],
            "resolution": s["resolution"],
        }
        for s in info["scales"]
    ]

    state = _prepare_destination(destination, fingerprint)
    if state is None and is_complete(destination):
        previous = layout.read_json(destination / layout.COMPLETE_MARKER_NAME) or {}
        if previous.get("fingerprint") == fingerprint:
            logger.info("%s is already complete", destination)
            return ConversionResult(**previous["result"])

    accessor = shard_writer.open_accessor(
        destination,
        info,
        sharded,
        gzip=params.gzip,
        compresslevel=params.compression_level,
        wide_samples=(
            params.effective_encoding == "raw" and np.dtype(info["data_type"]).itemsize > 1
        ),
    )
    logger.info(
        "converting %s into %s: %s %s, %d scales, %d jobs%s",
        input_source.description,
        destination,
        info["data_type"],
        params.effective_encoding,
        len(info["scales"]),
        jobs,
        f", gzip level {params.compression_level} ({accessor.compress.backends})"
        if params.gzip
        else ", no gzip",
    )
    total_chunks = pyramid.count_chunks(info)
    try:
        if state is None:
            # The state file first: it marks the directory as ours to resume.
            write_json_atomically(
                destination / layout.CONVERSION_STATE_NAME,
                {"fingerprint": fingerprint, "slabs_done": 0},
            )
        if state is None or not (destination / "info").is_file():
            precomputed_io.get_IO_for_new_dataset(info, accessor, overwrite_info=True)
        downscaler = pyramid.make_downscaler(params.effective_downscaling_method, info)
    except DataAccessError as exc:
        raise errors.ConversionError(f"{destination}: {exc}") from None

    progress = Progress("chunks", total=total_chunks, unit="chunks", enabled=show_progress)
    executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="ingest")
    try:
        context = unit_conversion.Context(
            info,
            input_source,
            transform,
            accessor,
            downscaler,
            executor,
            encoder_options={"jpeg_quality": params.jpeg_quality},
            on_chunk=lambda nbytes: progress.update(1, nbytes),
            should_stop=should_stop,
        )
        if state is not None:
            _remove_stale_temporaries(destination, info)
        if plan is not None:
            counts, resumed = _convert_in_units(plan, context, destination, progress)
        else:
            counts, resumed = _convert_in_slabs(
                context, destination, fingerprint, state, progress, show_progress
            )
    except DataAccessError as exc:
        raise errors.ConversionError(f"{destination}: {exc}") from None
    except OSError as exc:
        raise errors.ConversionError(
            f"{destination}: cannot write ({exc.strerror or exc})"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()

    shard_writer.check_finished(destination)
    result = ConversionResult(
        scales=scales,
        chunks=counts.chunks,
        bytes_written=counts.bytes,
        input_count=len(input_source.paths) if input_source.kind == "stack" else 1,
        input_bytes=input_source.input_bytes,
        wall_seconds=round(time.monotonic() - started, 3),
        destination=str(destination),
        resumed=resumed,
    )
    write_json_atomically(
        destination / layout.COMPLETE_MARKER_NAME,
        {"fingerprint": fingerprint, "result": result.to_dict()},
    )
    for path in [destination / layout.CONVERSION_STATE_NAME] + layout.checkpoint_files(destination):
        try:
            path.unlink()
        except FileNotFoundError:
            pass
    shutil.rmtree(destination / unit_conversion.UNITS_DIR, ignore_errors=True)
    logger.info(
        "converted %s: %d chunks, %s in %s",
        destination,
        result.chunks,
        format_bytes(result.bytes_written),
        format_duration(result.wall_seconds),
    )
    return result


def _convert_in_slabs(
    context: unit_conversion.Context,
    destination: Path,
    fingerprint: str,
    state: dict | None,
    progress: Progress,
    show_progress: bool,
) -> tuple:
    """Converts the whole volume slab by slab with checkpoints; returns (counts, resumed)."""
    from . import pyramid, shard_writer

    builder = pyramid.PyramidBuilder(
        context.info,
        context.accessor,
        context.downscaler,
        context.executor,
        encoder_options=context.encoder_options,
        on_chunk=context.on_chunk,
    )
    depth_total = context.info["scales"][0]["size"][2]
    slab_depth = builder.slab_depth
    slab_count = -(-depth_total // slab_depth)
    next_slab = 0
    resumed = False
    if state is not None and state.get("slabs_done"):
        next_slab = _restore(destination, state, builder)
        resumed = True
        progress.update(builder.chunks_written, builder.bytes_written)
        logger.info("resuming %s at slab %d/%d", destination, next_slab + 1, slab_count)
    if state is not None and shard_writer.resume(context.accessor, builder):
        next_slab, resumed = 0, False
    last_checkpoint = time.monotonic()
    for slab_index in range(next_slab, slab_count):
        z0 = slab_index * slab_depth
        z1 = min(z0 + slab_depth, depth_total)
        slab_started = time.monotonic()
        context.source.read(z0, z1, builder.slab(z1 - z0), context.transform, context.executor)
        read_seconds = time.monotonic() - slab_started
        builder.push(z1 - z0, last=slab_index == slab_count - 1)
        logger.log(
            logging.INFO if show_progress else logging.DEBUG,
            "slab %d/%d (sections %d-%d): read %.1f s, written %.1f s; %s",
            slab_index + 1,
            slab_count,
            z0,
            z1 - 1,
            read_seconds,
            time.monotonic() - slab_started - read_seconds,
            progress.line(),
        )
        stop = context.should_stop is not None and context.should_stop()
        if slab_index + 1 < slab_count and (
            stop
            or time.monotonic() - last_checkpoint >= CHECKPOINT_INTERVAL
            or not any(level.filled for level in builder.levels)
        ):
            _checkpoint(destination, fingerprint, slab_index + 1, builder)
            last_checkpoint = time.monotonic()
        if stop and slab_index + 1 < slab_count:
            raise errors.Interrupted(
                f"conversion into {destination} stopped after slab "
                f"{slab_index + 1}/{slab_count}; run the same command to resume"
            )
    return unit_conversion.Counts(builder.chunks_written, builder.bytes_written), resumed


def _convert_in_units(
    plan: units.Plan, context: unit_conversion.Context, destination: Path, progress: Progress
) -> tuple:
    """Converts the volume unit by unit (see units.py); returns (counts, resumed)."""
    from . import shard_writer

    if isinstance(context.accessor, shard_writer.ShardedFileAccessor):
        # Takes up the shard pieces of finished units; the others write theirs again.
        context.accessor.resume({})
    recorded = [unit_conversion.read_done(destination, unit) for unit in plan.units]
    finished = [counts for counts in recorded if counts is not None]
    progress.update(sum(c.chunks for c in finished), sum(c.bytes for c in finished))
    if finished:
        logger.info("resuming %s: %d of %d units done", destination, len(finished), len(plan.units))
    logger.info(
        "%d units of up to %dx%d voxels build scales 0-%d (%s each)%s",
        len(plan.units),
        plan.tile[0],
        plan.tile[1],
        plan.top_scale,
        format_bytes(plan.unit_memory),
        f", the finishing step the other {len(plan.finishing_scales)}"
        if plan.finishing_scales
        else "",
    )
    counts = unit_conversion.run_plan(plan, context, destination)
    return counts, bool(finished)


def _remove_stale_temporaries(destination: Path, info: dict) -> None:
    """Deletes the hidden temporary chunk files a killed run may have left."""
    for scale in info["scales"]:
        if not (destination / scale["key"]).is_dir():
            continue  # not started: the units build only the lower scales
        with os.scandir(destination / scale["key"]) as entries:
            for entry in entries:
                if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                    os.unlink(entry.path)


def _checkpoint(destination: Path, fingerprint: str, slabs_done: int, builder) -> None:
    """Saves the lower scales' pending planes, then the state that points to them.

    Each checkpoint has its own file, so a kill between the two writes leaves
    the previous state with its own planes.
    """
    positions, pending = builder.state()
    name = layout.checkpoint_name(slabs_done)
    if pending:
        temporary = destination / (name + ".tmp")
        with open(temporary, "wb") as stream:
            np.savez(stream, **pending)
        os.replace(temporary, destination / name)
    write_json_atomically(
        destination / layout.CONVERSION_STATE_NAME,
        {
            "fingerprint": fingerprint,
            "slabs_done": slabs_done,
            "levels": positions,
            "chunks": builder.chunks_written,
            "bytes": builder.bytes_written,
            "pending": sorted(pending),
            "checkpoint": name if pending else None,
            "saved": time.time(),
        },
    )
    for old in layout.checkpoint_files(destination):
        if old.name != name:
            old.unlink()


def _restore(destination: Path, state: dict, builder) -> int:
    """Loads a checkpoint into ``builder``; returns the first slab still to do."""
    pending = {}
    if state.get("pending"):
        path = destination / str(state.get("checkpoint"))
        try:
            with np.load(path) as archive:
                pending = {name: archive[name] for name in state["pending"]}
        except (OSError, ValueError, KeyError) as exc:
            raise errors.ConversionError(
                f"{path}: unreadable checkpoint ({exc}); delete {destination} and convert again"
            ) from None
    builder.restore(state["levels"], pending)
    builder.chunks_written = int(state.get("chunks", 0))
    builder.bytes_written = int(state.get("bytes", 0))
    return int(state["slabs_done"])


def add_conversion_options(parser: argparse.ArgumentParser) -> None:
    """Adds the conversion option group (shared with `ingest`)."""
    group = parser.add_argument_group("conversion")
    group.add_argument(
        "--parameters",
        metavar="JSON|@FILE",
        default=None,
        help="conversion parameters as inline JSON or @file.json, e.g. "
        '\'{"voxel_size": [20, 20, 20], "voxel_unit": "um"}\' '
        "(see the parameter list below; every key has a default)",
    )
    group.add_argument(
        "--order-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="text file listing the section file names in z order, one per line "
        "(default: natural sort of the names, s2 before s10)",
    )
    group.add_argument(
        "--print-parameters",
        action="store_true",
        help="print the effective parameters as JSON and exit",
    )
    group.add_argument(
        "--memory-limit",
        metavar="SIZE",
        default=None,
        help="memory budget of the conversion, e.g. 512M, 4G (binary units; a bare "
        "number is MiB); above it the volume is converted in x-y tiles and z ranges "
        "(the same files). Default: the Slurm allocation's memory less 256 MiB, "
        "else half of the physical memory",
    )
    cli.add_jobs_option(group, what="threads decoding sections and writing chunks")


def memory_limit_from(args: argparse.Namespace) -> int:
    """Returns the bytes of --memory-limit, or the default budget; UsageError when
    no conversion with these parameters and jobs could fit it (the exact check,
    which needs the input's size, comes before the conversion starts)."""
    if args.memory_limit is None:
        return memory.default_memory_limit()
    limit = memory.parse_size(args.memory_limit)
    chunk_size = parse_parameters(args.parameters).chunk_size
    units.check_memory_floor(limit, chunk_size, args.jobs or cli.default_jobs())
    return limit


EXAMPLES = """\
examples:
  ingest_ngs /scratch/stack --destination /scratch/stack-ngs \\
      --parameters '{"voxel_size": [20, 20, 20], "voxel_unit": "um"}'
  ingest_ngs brain.nii.gz --destination out/ --parameters @params.json --jobs 8
  ingest_ngs labels.nii.gz --destination labels-ngs/ \\
      --parameters '{"type": "segmentation"}'
  ingest_ngs --print-parameters --parameters '{"gzip": false}'
"""


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line of `ingest_ngs`."""
    parser = argparse.ArgumentParser(
        prog="ingest_ngs",
        # SOURCE and --destination are required except with --print-parameters,
        # which argparse cannot say by itself.
        usage="%(prog)s [options] SOURCE --destination DIR\n"
        "       %(prog)s --print-parameters [--parameters JSON|@FILE]",
        description=__doc__,
        epilog=EXAMPLES
        + "\n"
        + parameters_module.SCHEMA_HELP
        + "\n"
        + cli.exit_codes_help("ingest_ngs"),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "source",
        type=Path,
        nargs="?",
        metavar="SOURCE",
        help="directory of sections, fetch manifest (or the directory "
        f"holding {layout.FETCH_MANIFEST_NAME}), or a volume file",
    )
    parser.add_argument(
        "--destination",
        "-d",
        type=Path,
        metavar="DIR",
        help="output directory of the precomputed dataset",
    )
    add_conversion_options(parser)
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar or periodic progress lines"
    )
    cli.add_logging_options(parser)
    args = parser.parse_args(argv)
    if not args.print_parameters and (args.source is None or args.destination is None):
        parser.error("SOURCE and --destination DIR are required")
    return args


def main(argv: list[str] | None = None) -> int:
    """Runs `ingest_ngs`; returns the exit code."""
    args = parse_command_line(argv)

    def work(redactor) -> int:
        params = parse_parameters(args.parameters)
        if args.print_parameters:
            print(params.resolved().to_json())
            return errors.EXIT_OK
        with cli.stop_on_signals() as stop:
            result = convert(
                args.source,
                args.destination,
                params,
                jobs=args.jobs,
                show_progress=not args.no_progress and cli.verbosity(args) >= 0,
                should_stop=stop,
                order_file=args.order_file,
                memory_limit=memory_limit_from(args),
            )
        print(
            f"{result.destination}: {len(result.scales)} scales, {result.chunks} "
            f"chunks, {format_bytes(result.bytes_written)} in "
            f"{format_duration(result.wall_seconds)}"
        )
        return errors.EXIT_OK

    return cli.run_command(work, args)


if __name__ == "__main__":
    sys.exit(main())
