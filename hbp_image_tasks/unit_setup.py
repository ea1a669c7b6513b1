"""What the units of a job array need around the unit engine (unit_conversion.py).

The stack's z order from the source listing, the dataset's info from one section,
a unit's own sections as a source, the writers, and the files a unit produced.
The same choices as ``ingest_ngs.convert``, so the output is the single pass's.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable

import numpy as np

from . import errors, ingest_ngs, pyramid, sections, shards, sources, units
from .parameters import ConversionParameters
from .upload_plan import LocalObject, content_type_for, object_name_for


def ordered_sections(objects: list, order_file: Path | None = None) -> list:
    """Returns the listing entries that are sections, in the stack's z order.

    The order ``sections.list_sections`` gives the fetched stack: the order file's
    (names relative to the download directory, one a line), else the natural
    order of the object names.
    """
    if order_file is not None:
        return _in_file_order(objects, order_file)
    chosen = [item for item in objects if sections.is_section_name(Path(item.name).name)]
    if not chosen:
        raise errors.InputError("the selected objects hold no image section")
    return sorted(chosen, key=lambda item: sections.natural_key(item.name))


def _in_file_order(objects: list, order_file: Path) -> list:
    """Returns the listing entries named by ``order_file``, in its order."""
    try:
        lines = order_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise errors.InputError(f"{order_file}: cannot read the order file ({exc})") from None
    by_name = {item.name: item for item in objects}
    result: list = []
    for number, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name not in by_name:
            raise errors.InputError(
                f"{order_file}:{number}: section {name!r} is not among the selected objects"
            )
        result.append(by_name[name])
    if len({item.name for item in result}) != len(result):
        raise errors.InputError(f"{order_file}: a section is listed twice")
    if not result:
        raise errors.InputError(f"{order_file}: names no section")
    return result


def stack_info(first_section: Path, depth: int, params: ConversionParameters) -> dict:
    """Returns the pyramid's info of a stack of ``depth`` sections shaped like the first."""
    source = sources.StackSource([first_section], params.channels)
    ingest_ngs.check_channels(first_section, source.channels, params)
    return source_info(source, (source.size[0], source.size[1], depth), params)


def source_info(source, size: tuple, params: ConversionParameters) -> dict:
    """Returns the pyramid's info, sharding included, as ``ingest_ngs.convert`` makes it."""
    from . import shard_writer

    info = ingest_ngs.dataset_info(source, size, params)
    shard_writer.add_sharding(info, params)
    return info


def sharding_specs(info: dict) -> list:
    """Returns each scale's ShardSpec (None: one file per chunk) from a sharded info."""
    return [
        shards.ShardSpec.from_dict(scale["sharding"]) if "sharding" in scale else None
        for scale in info["scales"]
    ]


def accessor_for(destination: Path, info: dict, params: ConversionParameters):
    """Returns the chunk writer ``ingest_ngs.convert`` would use for ``info``."""
    from . import shard_writer

    return shard_writer.open_accessor(
        destination,
        info,
        sharding_specs(info),
        gzip=params.gzip,
        compresslevel=params.compression_level,
        wide_samples=(
            params.effective_encoding == "raw" and np.dtype(info["data_type"]).itemsize > 1
        ),
    )


def write_info(destination: Path, info: dict, params: ConversionParameters) -> None:
    """Writes the dataset's info file as the single-pass conversion does."""
    from neuroglancer_scripts import precomputed_io

    destination.mkdir(parents=True, exist_ok=True)
    precomputed_io.get_IO_for_new_dataset(
        info, accessor_for(destination, info, params), overwrite_info=True
    )


class UnitSource:
    """A unit's sections as a source indexed in the whole stack's z."""

    def __init__(self, paths: list[Path], first_z: int, channels: int | None):
        self.stack = sources.StackSource(paths, channels)
        self.first_z = first_z

    def read(self, z0: int, z1: int, out, transform, executor: Executor, region=None) -> None:
        """Reads the stack's sections ``z0:z1`` (all within the unit) into ``out``."""
        start, stop = z0 - self.first_z, z1 - self.first_z
        if start < 0 or stop > len(self.stack.paths):
            raise errors.ConversionError(f"sections {z0}-{z1} are outside this unit's")
        self.stack.read(start, stop, out, transform, executor, region=region)


def make_context(
    info: dict,
    source,
    params: ConversionParameters,
    destination: Path,
    executor: Executor,
    should_stop: Callable[[], bool] | None,
):
    """Returns the unit engine's context: writers, downscaler and sample transform."""
    from . import unit_conversion

    transform = None
    if source is not None:  # the finishing step reads pieces, not the input
        first = source.stack if isinstance(source, UnitSource) else source
        transform = ingest_ngs._value_transform(np.dtype(first.dtype), info["data_type"], params)
    return unit_conversion.Context(
        info,
        source,
        transform,
        accessor_for(destination, info, params),
        pyramid.make_downscaler(params.effective_downscaling_method, info),
        executor,
        encoder_options={"jpeg_quality": params.jpeg_quality},
        should_stop=should_stop,
    )


def _chunk_ranges(scale: dict, box: units.Box) -> list[range]:
    """Returns the chunk grid positions along x, y, z that ``box`` (of this scale) covers."""
    chunk, size = scale["chunk_sizes"][0], scale["size"]
    return [
        range(box.start[axis] // chunk[axis], -(-min(box.stop[axis], size[axis]) // chunk[axis]))
        for axis in range(3)
    ]


def _chunk_names(scale: dict, ranges: list[range]) -> list[str]:
    chunk, size = scale["chunk_sizes"][0], scale["size"]
    bounds = [
        [(p * chunk[axis], min((p + 1) * chunk[axis], size[axis])) for p in ranges[axis]]
        for axis in range(3)
    ]
    return [
        f"{scale['key']}/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}"
        for z0, z1 in bounds[2]
        for y0, y1 in bounds[1]
        for x0, x1 in bounds[0]
    ]


def _whole_shard_names(scale: dict, ranges: list[range]) -> list[str]:
    """Returns the shard files whose whole box lies in ``ranges``: the unit assembles
    those itself; the finishing job assembles the shards that several units share."""
    spec = shards.ShardSpec.from_dict(scale["sharding"])
    grid = shards.grid_shape(scale["size"], scale["chunk_sizes"][0])
    box = shards.box_shape(grid, spec.box_bits)
    starts = [range(r.start // b * b, r.stop, b) for r, b in zip(ranges, box)]
    names = []
    for z in starts[2]:
        for y in starts[1]:
            for x in starts[0]:
                origin = (x, y, z)
                if all(
                    o >= r.start and min(o + b, n) <= r.stop
                    for o, r, b, n in zip(origin, ranges, box, grid)
                ):
                    shard = spec.shard_of(shards.compressed_morton(origin, grid))
                    names.append(f"{scale['key']}/{spec.shard_name(shard)}")
    return names


def unit_file_names(info: dict, unit: units.Unit) -> list[str]:
    """Returns the files (before any .gz) a finished unit wrote for scales 0..top_scale:
    its chunks, or in a sharded scale the shards that lie wholly in its box."""
    names = []
    cumulative = units.cumulative_factors(info)
    for index in range(unit.top_scale + 1):
        scale = info["scales"][index]
        ranges = _chunk_ranges(scale, unit.box.scaled(cumulative[index]))
        if "sharding" in scale:
            names += _whole_shard_names(scale, ranges)
        else:
            names += _chunk_names(scale, ranges)
    return names


def unit_files(destination: Path, info: dict, unit: units.Unit) -> list[LocalObject]:
    """Returns the files a finished unit wrote, as the uploader's local objects."""
    found = []
    for name in unit_file_names(info, unit):
        for candidate in (name, name + ".gz"):
            path = os.path.join(destination, candidate)
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            object_name, encoding = object_name_for(candidate.split("/"))
            found.append(
                LocalObject(
                    path,
                    object_name,
                    stat.st_size,
                    content_type_for(object_name),
                    encoding,
                    stat.st_mtime_ns,
                )
            )
            break
        else:
            raise errors.ConversionError(f"unit {unit.id}: chunk {name} was not written")
    return found
