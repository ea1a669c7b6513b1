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
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import cli, errors, faults, layout, memory, unit_conversion, units
from . import parameters as parameters_module
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


def is_complete(destination: Path) -> bool:
    """Returns whether ``destination`` holds a finished conversion (the publish contract)."""
    return layout.conversion_status(destination).kind == layout.COMPLETE


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


@dataclasses.dataclass
class ConversionPlan:
    """Everything decided before a file is written: input, info, sample conversion, units."""

    source: Any  # sources.StackSource or sources.VolumeSource
    info: dict
    sharded: list  # per scale: its shard spec, or None
    transform: Callable[[np.ndarray], np.ndarray] | None
    fingerprint: str
    units: units.Plan | None = None

    def scales(self) -> list:
        """Returns key, size, chunk size and resolution of every scale."""
        return [
            {
                "key": s["key"],
                "size": s["size"],
                "chunk_size": s["chunk_sizes"][0],
                "resolution": s["resolution"],
            }
            for s in self.info["scales"]
        ]


def open_input(source: Path, params: ConversionParameters, order_file: Path | None, jobs: int):
    """Returns the input source, every section's header checked; refuses what cannot convert."""
    from . import sources

    input_source = sources.open_source(source, order_file, params.channels, jobs=jobs)
    check_channels(source, input_source.channels, params)
    return input_source


def check_channels(source: Path, channels: int, params: ConversionParameters) -> None:
    """Refuses input whose channels the parameters cannot store."""
    if params.type == "segmentation" and channels != 1:
        raise errors.InputError(f"{source}: RGB input cannot be a segmentation")
    if params.encoding == "jpeg" and channels not in (1, 3):
        raise errors.InputError(f"{source}: jpeg needs 1 or 3 channels")


def _voxel_size(input_source, params: ConversionParameters) -> tuple:
    voxel_size = params.voxel_size_nm() or input_source.voxel_size_nm
    if voxel_size is None:
        logger.warning(
            "no 'voxel_size' given for the section stack: using 1 um "
            'isotropic voxels (give e.g. {"voxel_size": [20, 20, 20], '
            '"voxel_unit": "um"})'
        )
        voxel_size = (parameters_module.DEFAULT_STACK_VOXEL_SIZE_NM,) * 3
    return voxel_size


def dataset_info(input_source, size: tuple, params: ConversionParameters) -> dict:
    """Returns the pyramid's info (no sharding yet) for an input of ``size`` (x, y, z) with
    the samples of ``input_source``; refuses jpeg for samples wider than 8 bits."""
    from . import pyramid

    info = pyramid.build_info(
        _output_dtype(input_source, params),
        input_source.channels,
        size,
        _voxel_size(input_source, params),
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
    return info


def plan_conversion(
    input_source, params: ConversionParameters, jobs: int, memory_limit: int | None = None
) -> ConversionPlan:
    """Returns the plan: the dataset's info, the sample conversion and, over budget, the units."""
    from . import shard_writer

    info = dataset_info(input_source, input_source.size, params)
    sharded = shard_writer.add_sharding(info, params)
    plan = ConversionPlan(
        input_source,
        info,
        sharded,
        _value_transform(np.dtype(input_source.dtype), info["data_type"], params),
        _fingerprint(params, info, input_source),
    )
    if memory_limit is not None and units.single_pass_memory(info, jobs) > memory_limit:
        plan.units = units.plan_units(
            info,
            memory_limit,
            jobs,
            whole_sections=not input_source.reads_regions,
            bands=input_source.reads_rows,
        )
    return plan


def _remove_previous_output(destination: Path) -> None:
    """Removes the dataset an earlier conversion left: its scales, units, checkpoints, info."""
    old_info = layout.read_json(destination / layout.INFO_NAME) or {}
    for scale in old_info.get("scales", []):
        key = str(scale.get("key", ""))
        target = destination / key
        if key and ".." not in key and target.is_dir():
            shutil.rmtree(target)
    shutil.rmtree(destination / layout.UNITS_DIR_NAME, ignore_errors=True)
    shutil.rmtree(destination / layout.RELEASED_DIR_NAME, ignore_errors=True)
    layout.remove_files(layout.checkpoint_files(destination))
    layout.remove_files([destination / layout.INFO_NAME])


def _start_over(destination: Path, plan: ConversionPlan) -> layout.ConversionState:
    """Returns a fresh state, written before the previous output goes.

    The new state comes first and the complete marker goes next, so that at
    every moment the directory says it holds an unfinished conversion.
    """
    state = layout.ConversionState(plan.fingerprint)
    layout.write_conversion_state(destination, state)
    layout.remove_complete_marker(destination)
    _remove_previous_output(destination)
    faults.reached("started")
    return state


def _info_is(destination: Path, info: dict) -> bool:
    """Returns whether the ``info`` in ``destination`` is ``info``."""
    return layout.read_json(destination / layout.INFO_NAME) == json.loads(json.dumps(info))


def prepare_destination(destination: Path, plan: ConversionPlan) -> layout.ConversionState | dict:
    """Returns the state to resume (fresh when starting over), or the complete marker when
    this very conversion already finished there."""
    destination.mkdir(parents=True, exist_ok=True)
    status = layout.conversion_status(destination)
    if status.kind == layout.COMPLETE and status.marker["fingerprint"] == plan.fingerprint:
        layout.remove_conversion_state(destination)  # left by a kill after the marker
        return status.marker
    state = layout.read_conversion_state(destination)
    if state is not None and state.fingerprint == plan.fingerprint:
        if _info_is(destination, plan.info):
            if state.stopped:  # running again: no longer stopped
                state.stopped = None
                layout.write_conversion_state(destination, state)
            return state
    elif status.kind == layout.FOREIGN:
        if any(not entry.name.startswith(".") for entry in destination.iterdir()):
            raise errors.UsageError(
                f"{destination}: not empty and holds no conversion state of "
                "ingest_ngs; give an empty or new --destination"
            )
    elif state is not None or status.kind == layout.COMPLETE:
        logger.warning(
            "%s holds a conversion of other input or parameters; starting over", destination
        )
    else:
        logger.warning("%s: %s; starting over", destination, status.reason)
    return _start_over(destination, plan)


def _open_writers(destination: Path, plan: ConversionPlan, params: ConversionParameters):
    """Returns the chunk accessor and the downscaler, writing ``info`` if it is missing."""
    from neuroglancer_scripts import precomputed_io

    from . import pyramid, shard_writer

    accessor = shard_writer.open_accessor(
        destination,
        plan.info,
        plan.sharded,
        gzip=params.gzip,
        compresslevel=params.compression_level,
        wide_samples=(
            params.effective_encoding == "raw" and np.dtype(plan.info["data_type"]).itemsize > 1
        ),
    )
    if not (destination / layout.INFO_NAME).is_file():
        precomputed_io.get_IO_for_new_dataset(plan.info, accessor, overwrite_info=True)
    downscaler = pyramid.make_downscaler(params.effective_downscaling_method, plan.info)
    return accessor, downscaler


def run_conversion(
    plan: ConversionPlan,
    destination: Path,
    params: ConversionParameters,
    state: layout.ConversionState,
    jobs: int,
    show_progress: bool,
    should_stop: Callable[[], bool] | None,
) -> tuple:
    """Writes every chunk of the plan (slab by slab, or unit by unit); returns (counts, resumed)."""
    from neuroglancer_scripts.accessor import DataAccessError

    from . import pyramid

    progress = Progress(
        "chunks", total=pyramid.count_chunks(plan.info), unit="chunks", enabled=show_progress
    )
    executor = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="ingest")
    try:
        accessor, downscaler = _open_writers(destination, plan, params)
        _log_start(plan, destination, params, jobs, accessor)
        context = unit_conversion.Context(
            plan.info,
            plan.source,
            plan.transform,
            accessor,
            downscaler,
            executor,
            encoder_options={"jpeg_quality": params.jpeg_quality},
            on_chunk=lambda nbytes: progress.update(1, nbytes),
            should_stop=should_stop,
        )
        _remove_stale_temporaries(destination, plan.info)
        if plan.units is not None:
            return _convert_in_units(plan.units, context, destination, progress)
        return _convert_in_slabs(context, destination, state, progress, show_progress)
    except errors.Interrupted:
        _record_stop(destination, should_stop)
        raise
    except DataAccessError as exc:
        raise errors.ConversionError(f"{destination}: {exc}") from None
    except OSError as exc:
        raise errors.ConversionError(
            f"{destination}: cannot write ({exc.strerror or exc})"
        ) from None
    finally:
        executor.shutdown(wait=True, cancel_futures=True)
        progress.close()


def _record_stop(destination: Path, should_stop) -> None:
    """Records in the conversion state which signal stopped it (for upload_results' refusal)."""
    state = layout.read_conversion_state(destination)
    if state is not None and not state.stopped:
        state.stopped = _signal_name(should_stop)
        layout.write_conversion_state(destination, state)


def _log_start(plan: ConversionPlan, destination: Path, params, jobs: int, accessor) -> None:
    logger.info(
        "converting %s into %s: %s %s, %d scales, %d jobs%s",
        plan.source.description,
        destination,
        plan.info["data_type"],
        params.effective_encoding,
        len(plan.info["scales"]),
        jobs,
        f", gzip level {params.compression_level} ({accessor.compress.backends})"
        if params.gzip
        else ", no gzip",
    )


def finish_conversion(
    plan: ConversionPlan, destination: Path, counts, resumed: bool, started: float
) -> ConversionResult:
    """Checks that nothing is left unassembled, writes the complete marker, then removes the
    state; returns the result."""
    from . import shard_writer

    shard_writer.check_finished(destination)
    result = ConversionResult(
        scales=plan.scales(),
        chunks=counts.chunks,
        bytes_written=counts.bytes,
        input_count=len(plan.source.paths) if plan.source.kind == "stack" else 1,
        input_bytes=plan.source.input_bytes,
        wall_seconds=round(time.monotonic() - started, 3),
        destination=str(destination),
        resumed=resumed,
    )
    faults.reached("chunks-written")
    layout.write_complete_marker(destination, plan.fingerprint, result.to_dict())
    faults.reached("marker-written")
    shutil.rmtree(destination / layout.UNITS_DIR_NAME, ignore_errors=True)
    layout.remove_conversion_state(destination)
    logger.info(
        "converted %s: %d chunks, %s in %s",
        destination,
        result.chunks,
        format_bytes(result.bytes_written),
        format_duration(result.wall_seconds),
    )
    return result


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

    Raises InputError for unusable input (every section's header is checked
    before anything is written), ConversionError when writing fails and
    Interrupted (after saving a checkpoint) when ``should_stop()`` turns true;
    the same call then resumes. When the single pass would hold more than
    ``memory_limit`` bytes, the volume is converted unit by unit (units.py)
    into the same files; UsageError if no unit fits the limit.
    """
    started = time.monotonic()
    source, destination = Path(source), Path(destination)
    jobs = jobs or cli.default_jobs()
    input_source = open_input(source, parameters, order_file, jobs)
    plan = plan_conversion(input_source, parameters, jobs, memory_limit)
    start = prepare_destination(destination, plan)
    if isinstance(start, dict):
        logger.info("%s is already complete", destination)
        return ConversionResult(**start["result"])
    counts, resumed = run_conversion(
        plan, destination, parameters, start, jobs, show_progress, should_stop
    )
    return finish_conversion(plan, destination, counts, resumed, started)


def _should_checkpoint(builder, slab_done: int, slab_count: int, stop: bool, last: float) -> bool:
    return slab_done < slab_count and (
        stop
        or time.monotonic() - last >= CHECKPOINT_INTERVAL
        or not any(level.filled for level in builder.levels)
    )


def _resume_slabs(context, destination: Path, state: layout.ConversionState, builder, progress):
    """Returns (first slab to convert, resumed) after restoring a checkpoint, if any."""
    from . import shard_writer

    next_slab = resumed = 0
    if state.slabs_done:
        next_slab = _restore(destination, state, builder)
        resumed = True
        progress.update(builder.chunks_written, builder.bytes_written)
    if shard_writer.resume(context.accessor, builder):
        next_slab, resumed = 0, False
    return next_slab, bool(resumed)


def _convert_in_slabs(
    context: unit_conversion.Context,
    destination: Path,
    state: layout.ConversionState,
    progress: Progress,
    show_progress: bool,
) -> tuple:
    """Converts the whole volume slab by slab with checkpoints; returns (counts, resumed)."""
    builder = context.builder(context.info)
    depth_total = context.info["scales"][0]["size"][2]
    slab_depth = builder.slab_depth
    slab_count = -(-depth_total // slab_depth)
    next_slab, resumed = _resume_slabs(context, destination, state, builder, progress)
    if resumed:
        logger.info("resuming %s at slab %d/%d", destination, next_slab + 1, slab_count)
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
        faults.reached(f"slab-{slab_index + 1}")
        stop = context.should_stop is not None and context.should_stop()
        if _should_checkpoint(builder, slab_index + 1, slab_count, stop, last_checkpoint):
            stopped = _signal_name(context.should_stop) if stop else None
            _checkpoint(destination, state, slab_index + 1, slab_count, builder, stopped)
            last_checkpoint = time.monotonic()
        if stop and slab_index + 1 < slab_count:
            raise errors.Interrupted(
                f"conversion into {destination} stopped after slab "
                f"{slab_index + 1}/{slab_count}; run the same command to resume"
            )
    return unit_conversion.Counts(builder.chunks_written, builder.bytes_written), resumed


def _signal_name(should_stop) -> str:
    """Returns the name of the signal behind a stop request (``cli.StopRequest``)."""
    number = getattr(should_stop, "signal_number", None)
    try:
        return signal.Signals(number).name
    except ValueError:
        return "a stop request"


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


def _checkpoint(
    destination: Path,
    state: layout.ConversionState,
    slabs_done: int,
    slab_count: int,
    builder,
    stopped: str | None = None,
) -> None:
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
    layout.write_conversion_state(
        destination,
        layout.ConversionState(
            fingerprint=state.fingerprint,
            slabs_done=slabs_done,
            slab_count=slab_count,
            levels=positions,
            chunks=builder.chunks_written,
            bytes=builder.bytes_written,
            pending=sorted(pending),
            checkpoint=name if pending else None,
            saved=time.time(),
            stopped=stopped,
        ),
    )
    for old in layout.checkpoint_files(destination):
        if old.name != name:
            old.unlink()


def _restore(destination: Path, state: layout.ConversionState, builder) -> int:
    """Loads a checkpoint into ``builder``; returns the first slab still to do."""
    pending = {}
    if state.pending:
        path = destination / str(state.checkpoint)
        try:
            with np.load(path) as archive:
                pending = {name: archive[name] for name in state.pending}
        except (OSError, ValueError, KeyError) as exc:
            raise errors.ConversionError(
                f"{path}: unreadable checkpoint ({exc}); delete {destination} and convert again"
            ) from None
    builder.restore(state.levels, pending)
    builder.chunks_written = int(state.chunks)
    builder.bytes_written = int(state.bytes)
    return int(state.slabs_done)


def add_conversion_options(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Adds the conversion option group (shared with `ingest`, which has its own
    ``--jobs``); returns it."""
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
    return group


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
    conversion = add_conversion_options(parser)
    cli.add_jobs_option(conversion, what="threads decoding sections and writing chunks")
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
