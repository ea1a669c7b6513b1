"""The plan of a conversion cut into work units: boxes of the volume, aligned to the pyramid.

Pure functions over a pyramid's *info*: which boxes, which scales each box builds
by itself, and how much memory a box or the finishing step needs. Running them is
unit_conversion.py's job.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
from neuroglancer_scripts.utils import ceil_div

from . import png_rows, shards
from .errors import UsageError
from .pyramid import dyadic_factors, level_capacities

logger = logging.getLogger(__name__)

Triple = tuple[int, int, int]

# What a worker holds besides the pyramid buffers: the section region it decodes
# (twice: samples converted or copied in place) and a task's row of up to 8 chunks
# with its downscaling (3 chunks' worth each).
REGION_COPIES = 2
TASK_CHUNKS = 8
TASK_COPIES = 3
PLAN_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Box:
    """A box of scale-0 voxels, [start, stop) along x, y, z."""

    start: Triple
    stop: Triple

    def __post_init__(self) -> None:
        object.__setattr__(self, "start", tuple(int(v) for v in self.start))
        object.__setattr__(self, "stop", tuple(int(v) for v in self.stop))
        if any(a >= b for a, b in zip(self.start, self.stop)) or min(self.start) < 0:
            raise ValueError(f"empty or negative box {self.start}-{self.stop}")

    @property
    def shape(self) -> Triple:
        """Returns the box's extent (x, y, z)."""
        return tuple(b - a for a, b in zip(self.start, self.stop))  # type: ignore[return-value]

    def scaled(self, factors: Sequence[int]) -> Box:
        """Returns the box at a scale ``factors`` times coarser (ends rounded up)."""
        return Box(
            tuple(a // f for a, f in zip(self.start, factors)),
            tuple(ceil_div(b, f) for b, f in zip(self.stop, factors)),
        )


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of work: build scales 0..top_scale of ``box``; with ``piece``, also
    keep scale top_scale + 1 of the box for the finishing step."""

    box: Box
    top_scale: int
    piece: bool

    @property
    def id(self) -> str:
        """Returns a stable name from the box and the scales it builds:
        ``s1_x0-128_y0-128_z0-128`` builds scales 0-1 of that box."""
        (x0, y0, z0), (x1, y1, z1) = self.box.start, self.box.stop
        return f"s{self.top_scale}_x{x0}-{x1}_y{y0}-{y1}_z{z0}-{z1}"

    def to_dict(self) -> dict:
        """Returns the unit as a JSON-ready dict."""
        return {
            "id": self.id,
            "start": list(self.box.start),
            "stop": list(self.box.stop),
            "top_scale": self.top_scale,
            "piece": self.piece,
        }

    @classmethod
    def from_dict(cls, values: dict) -> Unit:
        """Returns the unit that :meth:`to_dict` gave."""
        return cls(Box(values["start"], values["stop"]), int(values["top_scale"]), values["piece"])


@dataclasses.dataclass(frozen=True)
class Plan:
    """Units in z, y, x order, and the scales the finishing step builds from their pieces."""

    units: tuple[Unit, ...]
    top_scale: int  # the units build scales 0..top_scale
    scale_count: int
    tile: tuple[int, int]  # x-y extent of a unit's box (the volume's when not tiled)
    unit_memory: int  # estimated peak bytes of one unit, interpreter excluded
    finishing_memory: int

    @property
    def finishing_scales(self) -> range:
        """Returns the scales no unit builds alone (empty when the units build all)."""
        return range(self.top_scale + 1, self.scale_count)

    def to_dict(self) -> dict:
        """Returns the plan as a JSON-ready dict."""
        return {
            "format": PLAN_FORMAT,
            "top_scale": self.top_scale,
            "scale_count": self.scale_count,
            "tile": list(self.tile),
            "unit_memory": self.unit_memory,
            "finishing_memory": self.finishing_memory,
            "units": [unit.to_dict() for unit in self.units],
        }

    @classmethod
    def from_dict(cls, values: dict) -> Plan:
        """Returns the plan that :meth:`to_dict` gave."""
        if values.get("format") != PLAN_FORMAT:
            raise ValueError(f"unknown plan format {values.get('format')!r}")
        return cls(
            units=tuple(Unit.from_dict(u) for u in values["units"]),
            top_scale=int(values["top_scale"]),
            scale_count=int(values["scale_count"]),
            tile=tuple(values["tile"]),  # type: ignore[arg-type]
            unit_memory=int(values["unit_memory"]),
            finishing_memory=int(values["finishing_memory"]),
        )


def scale_factors(info: dict) -> list[Triple]:
    """Returns each scale's downscaling factors from the previous scale ((1, 1, 1) first)."""
    return [tuple(f) for f in dyadic_factors([s["size"] for s in info["scales"]])]  # type: ignore[misc]


def cumulative_factors(info: dict) -> list[Triple]:
    """Returns each scale's factors from scale 0."""
    result, total = [], (1, 1, 1)
    for factors in scale_factors(info):
        total = tuple(t * f for t, f in zip(total, factors))  # type: ignore[assignment]
        result.append(total)
    return result


def alignment(info: dict, top_scale: int, extra: Sequence[int] = (1, 1, 1)) -> Triple:
    """Returns the scale-0 grid that boxes building scales 0..top_scale snap to.

    A box on it covers whole chunks of those scales and an even number of
    voxels wherever the next scale halves an axis, so its pieces downscale
    exactly as the whole volume does. ``extra`` adds a grid (e.g. shard boxes).
    """
    cumulative = cumulative_factors(info)
    grid = [int(e) for e in extra]
    last = min(top_scale + 1, len(cumulative) - 1)
    for index in range(last + 1):
        chunk = info["scales"][index]["chunk_sizes"][0] if index <= top_scale else (1, 1, 1)
        for axis in range(3):
            grid[axis] = math.lcm(grid[axis], int(chunk[axis]) * cumulative[index][axis])
    return tuple(grid)  # type: ignore[return-value]


def _sample_bytes(info: dict) -> int:
    return np.dtype(info["data_type"]).itemsize * int(info["num_channels"])


def builder_memory(
    info: dict,
    first: int,
    last: int,
    width: int,
    height: int,
    jobs: int,
    decoded: Sequence[int] | None = None,
    reader: int = 0,
) -> int:
    """Returns the bytes a builder of scales first..last over a width x height box of
    scale ``first`` holds, with ``jobs`` workers each decoding the box's region of a
    section (or ``decoded``: the x-y extent they decode to get it) with a reader
    that holds ``reader`` bytes besides."""
    factors = scale_factors(info)
    sizes, chunks, total = [], [], [1, 1, 1]
    depth = info["scales"][first]["size"][2]
    for index in range(first, last + 1):
        if index > first:
            total = [t * f for t, f in zip(total, factors[index])]
        sizes.append(
            [ceil_div(width, total[0]), ceil_div(height, total[1]), ceil_div(depth, total[2])]
        )
        chunks.append(info["scales"][index]["chunk_sizes"][0])
    step = [(1, 1, 1)] + [factors[i] for i in range(first + 1, last + 1)]
    capacities = level_capacities(sizes, chunks, step)
    sample = _sample_bytes(info)
    buffers = sum(c * s[0] * s[1] * sample for c, s in zip(capacities, sizes))
    chunk = int(np.prod(chunks[0])) * sample
    task = min(TASK_CHUNKS, ceil_div(width, chunks[0][0])) * TASK_COPIES * chunk
    region = decoded[0] * decoded[1] if decoded is not None else width * height
    return buffers + jobs * (REGION_COPIES * region * sample + task + reader)


def single_pass_memory(info: dict, jobs: int) -> int:
    """Returns the bytes the single-pass conversion of the whole volume holds."""
    width, height, _ = info["scales"][0]["size"]
    return builder_memory(info, 0, len(info["scales"]) - 1, width, height, jobs)


def finishing_memory(info: dict, top_scale: int, jobs: int) -> int:
    """Returns the bytes of the finishing step after units built scales 0..top_scale."""
    first = top_scale + 1
    if first >= len(info["scales"]):
        return 0
    width, height, _ = info["scales"][first]["size"]
    return builder_memory(info, first, len(info["scales"]) - 1, width, height, jobs)


def _unit_memory(
    info: dict, top_scale: int, tile: Sequence[int], jobs: int, whole: bool, rows: bool = False
) -> int:
    """Returns the bytes of a unit over an x-y ``tile`` whose workers decode whole
    sections (``whole``), read them by rows (``rows``: PNG), or read the tile alone."""
    last = min(top_scale + 1, len(info["scales"]) - 1)
    decoded = info["scales"][0]["size"][:2] if whole else None
    reader = 0
    if rows and not whole:
        sample = _sample_bytes(info)
        width, height, _ = info["scales"][0]["size"]
        reader = png_rows.reader_bytes(tile[0] * tile[1] * sample, width * sample, height)
    return builder_memory(info, 0, last, tile[0], tile[1], jobs, decoded, reader)


def _fit_tile(
    info: dict, top_scale: int, grid: Triple, budget: int, jobs: int, whole: bool, bands: bool
):
    """Returns the largest x-y tile on ``grid`` whose unit fits ``budget``, else None;
    with ``bands``, the tallest full-width band instead where it is as large."""
    tile = _halve_to_fit(info, top_scale, grid, budget, jobs, whole, bands, False)
    if bands:
        band = _halve_to_fit(info, top_scale, grid, budget, jobs, whole, bands, True)
        if band is not None and (tile is None or band[0] * band[1] >= tile[0] * tile[1]):
            return band
    return tile


def _halve_to_fit(
    info: dict,
    top_scale: int,
    grid: Triple,
    budget: int,
    jobs: int,
    whole: bool,
    rows: bool,
    heights_only: bool,
):
    """Returns the first tile on ``grid``, from whole planes, whose unit fits
    ``budget`` (else None), halving the longer side, or only the height
    (``heights_only``); ``whole`` and ``rows`` say how sections are read."""
    width, height, _ = info["scales"][0]["size"]
    cells = [ceil_div(width, grid[0]), ceil_div(height, grid[1])]
    while True:
        tile = [min(cells[0] * grid[0], width), min(cells[1] * grid[1], height)]
        if _unit_memory(info, top_scale, tile, jobs, whole, rows) <= budget:
            return tile
        if cells == [1, 1] or (heights_only and cells[1] == 1):
            return None
        # Halve the longer side: tiles stay square-ish, whole rows while they fit.
        axis = 0 if cells[0] * grid[0] >= cells[1] * grid[1] and cells[0] > 1 else 1
        if cells[axis] == 1:
            axis = 1 - axis
        cells[1 if heights_only else axis] = ceil_div(cells[1 if heights_only else axis], 2)


def check_memory_floor(memory_limit: int, chunk_size: int, jobs: int) -> None:
    """Raises UsageError when ``memory_limit`` is below what a unit of a single chunk
    of 8-bit grey samples needs: no input could be converted within it."""
    from .pyramid import build_info

    info = build_info(
        "uint8", 1, (chunk_size,) * 3, (1, 1, 1), (0, 0, 0), "image", "raw", chunk_size, 1
    )
    floor = _unit_memory(info, 0, (chunk_size, chunk_size), jobs, False)
    if memory_limit < floor:
        from .progress import format_bytes

        raise UsageError(
            f"--memory-limit {format_bytes(memory_limit)} is below one chunk of "
            f"{chunk_size}^3 voxels and the buffers of {jobs} job(s) "
            f"({format_bytes(floor)}); give a larger limit or fewer --jobs"
        )


def shard_alignment(info: dict) -> Triple | None:
    """Returns the scale-0 shard box in voxels (x, y, z), or None when scale 0 is
    not sharded: units on it assemble and publish their own scale-0 shards."""
    if "sharding" not in info["scales"][0]:
        return None
    return shards.box_voxels(info, 0)


def plan_units(
    info: dict,
    memory_limit: int | None = None,
    jobs: int = 1,
    sections_per_unit: int | None = None,
    extra_alignment: Sequence[int] = (1, 1, 1),
    whole_sections: bool = False,
    tasks: int | None = None,
    bands: bool = False,
) -> Plan:
    """Returns the units that convert ``info``'s volume within ``memory_limit`` bytes.

    The units build the fewest scales (0..k) for which the finishing step fits;
    their boxes are the largest x-y tiles that fit, and z ranges of at least
    ``sections_per_unit`` sections (one grid step by default). With ``tasks``
    (a job array's task count), units build as many scales as fit while every
    task still gets ``UNITS_PER_TASK`` units, or as the user's ``sections_per_unit``
    allows: the finishing step, which runs alone, is then left little work.
    With a sharded scale 0, boxes are whole scale-0 shard boxes when one box's x-y
    tile fits (a unit streams through z, so its depth costs no memory); else the
    plan falls back to boxes that share shards. With ``whole_sections``, each
    worker decodes whole sections to get a region (JPEG, interlaced PNG). With
    ``bands``, tiles are full-width bands while they fit: sections read by rows
    from the top (PNG) then unfilter each row once instead of once per x tile.
    Raises UsageError when no box fits the limit.
    """
    budget = memory_limit if memory_limit is not None else math.inf
    box = shard_alignment(info)
    if box is not None:
        aligned = [math.lcm(int(e), b) for e, b in zip(extra_alignment, box)]
        found = _fit(info, budget, jobs, aligned, whole_sections, bands)
        if isinstance(found, list):
            top, tile = _deepest(info, found, aligned, sections_per_unit, tasks)
            return make_plan(
                info, top, tile, sections_per_unit, jobs, aligned, whole_sections, bands
            )
        from .progress import format_bytes

        logger.info(
            "units share scale-0 shards (the finishing step assembles those): one shard "
            "box of %d x %d voxels needs %s with %d job(s), over the memory limit of %s",
            box[0],
            box[1],
            format_bytes(found),
            jobs,
            format_bytes(budget),
        )
    found = _fit(info, budget, jobs, extra_alignment, whole_sections, bands)
    if isinstance(found, list):
        top, tile = _deepest(info, found, extra_alignment, sections_per_unit, tasks)
        return make_plan(
            info, top, tile, sections_per_unit, jobs, extra_alignment, whole_sections, bands
        )
    from .progress import format_bytes

    raise UsageError(
        f"--memory-limit {format_bytes(budget)} is below what the smallest unit of this "
        f"conversion needs ({format_bytes(found)} with {jobs} job(s)); "
        "give a larger limit or fewer --jobs"
    )


# A job array's units per task, at least, when units grow deeper to build more
# scales: a task killed by its walltime loses at most about half its work.
UNITS_PER_TASK = 2


def _fit(info: dict, budget: float, jobs: int, extra: Sequence[int], whole: bool, bands: bool):
    """Returns the (top scale, tile) pairs whose finishing step and some tile on the
    grid fit ``budget``, fewest scales first; else the bytes the smallest unit needs."""
    smallest, fitting = None, []
    for top in range(len(info["scales"])):
        if finishing_memory(info, top, jobs) > budget:
            continue
        grid = alignment(info, top, extra)
        tile = _fit_tile(info, top, grid, budget, jobs, whole, bands)
        if tile is not None:
            fitting.append((top, tile))
            continue
        least = [min(g, s) for g, s in zip(grid[:2], info["scales"][0]["size"])]
        need = _unit_memory(info, top, least, jobs, whole, bands)
        smallest = need if smallest is None else min(smallest, need)
    if fitting:
        return fitting
    return smallest if smallest is not None else finishing_memory(info, 0, jobs)


def _deepest(
    info: dict,
    fitting: list,
    extra: Sequence[int],
    sections_per_unit: int | None,
    tasks: int | None,
) -> tuple[int, list[int]]:
    """Returns the (top scale, tile) of ``fitting`` to plan with: the fewest scales,
    or with ``tasks``, the most scales whose tiles are as large and whose units are
    no deeper than ``sections_per_unit`` asks, or else still ``UNITS_PER_TASK`` a task."""
    fewest = fitting[0]
    if tasks is None:
        return fewest
    width, height, depth = info["scales"][0]["size"]

    def shape(top: int, tile: Sequence[int]) -> tuple[int, int]:
        """Returns a plan's unit depth and unit count."""
        grid_z = alignment(info, top, extra)[2]
        step = min(unit_depth(grid_z, sections_per_unit), depth)
        return step, ceil_div(depth, step) * ceil_div(width, tile[0]) * ceil_div(height, tile[1])

    least_step, most_units = shape(*fewest)
    chosen = fewest
    for top, tile in fitting[1:]:
        step, count = shape(top, tile)
        if tile[0] < fewest[1][0] or tile[1] < fewest[1][1]:
            continue  # smaller tiles: sections read (or decoded whole) more often
        if sections_per_unit is not None:
            deep_enough = step <= least_step
        else:
            deep_enough = count >= min(most_units, UNITS_PER_TASK * tasks)
        if deep_enough:
            chosen = (top, tile)
    return chosen


def unit_depth(grid_z: int, sections_per_unit: int | None) -> int:
    """Returns the z extent of units on a z grid of ``grid_z`` sections: one grid
    step, or the fewest steps holding ``sections_per_unit`` sections."""
    return grid_z * max(1, ceil_div(sections_per_unit or 1, grid_z))


def make_plan(
    info: dict,
    top_scale: int,
    tile: Sequence[int] | None = None,
    sections_per_unit: int | None = None,
    jobs: int = 1,
    extra_alignment: Sequence[int] = (1, 1, 1),
    whole_sections: bool = False,
    rows: bool = False,
) -> Plan:
    """Returns the plan whose units build scales 0..top_scale of x-y tiles of ``tile``
    voxels (rounded up to the grid; default: whole planes) and z ranges of at
    least ``sections_per_unit`` sections (rounded up to the grid; default: one step)."""
    width, height, depth = info["scales"][0]["size"]
    grid = alignment(info, top_scale, extra_alignment)
    tile = [
        min(grid[axis] * ceil_div(t, grid[axis]), extent)
        for axis, (t, extent) in enumerate(zip(tile or (width, height), (width, height)))
    ]
    step_z = unit_depth(grid[2], sections_per_unit)
    piece = top_scale + 1 < len(info["scales"])
    boxes = []
    for z0 in range(0, depth, step_z):
        for y0 in range(0, height, tile[1]):
            for x0 in range(0, width, tile[0]):
                stop = (
                    min(x0 + tile[0], width),
                    min(y0 + tile[1], height),
                    min(z0 + step_z, depth),
                )
                boxes.append(Unit(Box((x0, y0, z0), stop), top_scale, piece))
    return Plan(
        units=tuple(boxes),
        top_scale=top_scale,
        scale_count=len(info["scales"]),
        tile=tuple(tile),  # type: ignore[arg-type]
        unit_memory=_unit_memory(info, top_scale, tile, jobs, whole_sections, rows),
        finishing_memory=finishing_memory(info, top_scale, jobs),
    )
