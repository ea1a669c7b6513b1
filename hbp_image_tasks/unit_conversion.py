"""Runs the units of a plan (units.py) and the finishing step, into one output directory.

A unit reads only its box of the input and writes scales 0..k of it, plus scale
k + 1 of its box as a *piece* (a .npy file) when the units do not build every
scale; the finishing step builds the scales above k from the pieces. The chunks
are byte-identical to the single-pass conversion's, and each finished unit is
recorded, so a rerun skips it.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import errors, layout, pyramid, units
from .pyramid import AtomicFileAccessor, PyramidBuilder

logger = logging.getLogger(__name__)

UNITS_DIR = layout.UNITS_DIR_NAME  # pieces/<unit id>.npy, done/<unit id>.json


@dataclasses.dataclass
class Context:
    """What running a unit needs besides the unit: the whole pyramid's info, the
    input, and the writers."""

    info: dict
    source: Any  # sources.StackSource or sources.VolumeSource
    transform: Callable[[np.ndarray], np.ndarray] | None
    accessor: AtomicFileAccessor
    downscaler: Any
    executor: Executor
    encoder_options: dict = dataclasses.field(default_factory=dict)
    on_chunk: Callable[[int], None] | None = None
    should_stop: Callable[[], bool] | None = None

    def builder(self, info: dict, factors: list | None = None, sink: Any = None) -> PyramidBuilder:
        """Returns a pyramid builder of ``info``'s scales with these writers (``factors``:
        see PyramidBuilder; None for a whole pyramid)."""
        return pyramid.PyramidBuilder(
            info,
            self.accessor,
            self.downscaler,
            self.executor,
            encoder_options=self.encoder_options,
            on_chunk=self.on_chunk,
            factors=factors,
            sink=sink,
        )


@dataclasses.dataclass
class Counts:
    """Chunks and bytes written."""

    chunks: int = 0
    bytes: int = 0


def done_path(destination: Path, unit: units.Unit) -> Path:
    """Returns the marker file of a finished unit."""
    return layout.unit_record_path(destination, unit.id)


def piece_path(destination: Path, unit: units.Unit) -> Path:
    """Returns the file holding scale top_scale + 1 of a unit's box."""
    return layout.unit_piece_path(destination, unit.id)


def read_done(destination: Path, unit: units.Unit) -> Counts | None:
    """Returns the counts a finished unit recorded, None when it is not finished."""
    recorded = layout.read_unit_record(destination, unit.id)
    return None if recorded is None else Counts(*recorded)


def box_info(info: dict, box: units.Box, first: int, last: int) -> dict:
    """Returns an info for scales first..last of ``box`` (scale-0 voxels): sizes and
    voxel offsets of the box at each scale, the rest as in ``info``."""
    cumulative = units.cumulative_factors(info)
    result = copy.deepcopy(info)
    result["scales"] = []
    for index in range(first, last + 1):
        scale = copy.deepcopy(info["scales"][index])
        scaled = box.scaled(cumulative[index])
        scale["size"] = list(scaled.shape)
        offset = scale.get("voxel_offset", [0, 0, 0])
        scale["voxel_offset"] = [o + s for o, s in zip(offset, scaled.start)]
        result["scales"].append(scale)
    return result


class _PieceWriter:
    """Appends (C, n, Y, X) planes to a .npy file of shape (Z, C, Y, X), renamed when whole."""

    def __init__(self, path: Path, shape: tuple, dtype: np.dtype):
        self.path, self.shape = path, shape
        self.temporary = path.with_name(path.name + ".tmp")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.stream = open(self.temporary, "wb")  # noqa: SIM115 (closed by finish)
        header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False}
        np.lib.format.write_array_header_1_0(self.stream, {**header, "shape": shape})
        self.planes = 0

    def __call__(self, z0: int, planes: np.ndarray) -> None:
        assert z0 == self.planes, "pieces arrive in z order"
        self.stream.write(np.ascontiguousarray(planes.transpose(1, 0, 2, 3)).data)
        self.planes += planes.shape[1]

    def finish(self) -> None:
        self.stream.close()
        assert self.planes == self.shape[0], "a piece got all its planes"
        os.replace(self.temporary, self.path)

    def discard(self) -> None:
        self.stream.close()
        self.temporary.unlink(missing_ok=True)


def run_unit(unit: units.Unit, context: Context, destination: Path) -> Counts:
    """Converts one unit's box: reads its region of the input, writes scales
    0..top_scale of it and its piece; records it as done. Returns its counts.

    Raises Interrupted (the unit's work is lost, nothing else) when
    ``context.should_stop()`` turns true between two slabs.
    """
    info, box = context.info, unit.box
    last = unit.top_scale + (1 if unit.piece else 0)
    sub = box_info(info, box, 0, last)
    piece = None
    if unit.piece:
        top = sub["scales"][last]["size"]
        shape = (top[2], int(info["num_channels"]), top[1], top[0])
        dtype = np.dtype(info["data_type"]).newbyteorder("<")
        piece = _PieceWriter(piece_path(destination, unit), shape, dtype)
    builder = context.builder(sub, units.scale_factors(info)[: last + 1], sink=piece)
    region = (box.start[0], box.stop[0], box.start[1], box.stop[1])
    try:
        for z0 in range(box.start[2], box.stop[2], builder.slab_depth):
            if context.should_stop is not None and context.should_stop():
                raise errors.Interrupted(
                    f"conversion into {destination} stopped in unit {unit.id}; "
                    "run the same command to resume"
                )
            z1 = min(z0 + builder.slab_depth, box.stop[2])
            slab = builder.slab(z1 - z0)
            context.source.read(z0, z1, slab, context.transform, context.executor, region=region)
            builder.push(z1 - z0, last=z1 == box.stop[2])
        if piece is not None:
            piece.finish()
    except BaseException:
        if piece is not None:
            piece.discard()
        raise
    counts = Counts(builder.chunks_written, builder.bytes_written)
    layout.write_unit_record(destination, unit.id, counts.chunks, counts.bytes)
    return counts


def run_finishing(plan: units.Plan, context: Context, destination: Path) -> Counts:
    """Builds the scales above the units' from their pieces; returns its counts.

    Raises ConversionError naming a unit whose piece is missing.
    """
    info, first = context.info, plan.top_scale + 1
    if first >= plan.scale_count:
        return Counts()
    cumulative = units.cumulative_factors(info)[first]
    pieces = []
    for unit in plan.units:
        path = piece_path(destination, unit)
        if not path.is_file():
            raise errors.ConversionError(f"{path}: piece of unit {unit.id} missing; convert again")
        pieces.append((unit.box.scaled(cumulative), path))
    sub = copy.deepcopy(info)
    sub["scales"] = sub["scales"][first:]
    builder = context.builder(sub, [(1, 1, 1)] + units.scale_factors(info)[first + 1 :])
    depth = sub["scales"][0]["size"][2]
    for z0 in range(0, depth, builder.slab_depth):
        z1 = min(z0 + builder.slab_depth, depth)
        slab = builder.slab(z1 - z0)
        for box, path in pieces:
            low, high = max(z0, box.start[2]), min(z1, box.stop[2])
            if low < high:
                _read_piece(path, box, low, high, z0, slab)
        builder.push(z1 - z0, last=z1 == depth)
    return Counts(builder.chunks_written, builder.bytes_written)


def _read_piece(path: Path, box: units.Box, low: int, high: int, z0: int, slab: np.ndarray):
    """Copies planes low..high of a piece into ``slab`` (planes from z0)."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise errors.ConversionError(f"{path}: unreadable piece ({exc}); convert again") from None
    (x0, y0, bz), (x1, y1, _) = box.start, box.stop
    planes = array[low - bz : high - bz]
    slab[:, low - z0 : high - z0, y0:y1, x0:x1] = planes.transpose(1, 0, 2, 3)
    del array, planes


def run_plan(plan: units.Plan, context: Context, destination: Path) -> Counts:
    """Runs every unfinished unit of ``plan`` here, in order, then the finishing
    step; returns the counts of all the output (recorded units included)."""
    total = Counts()
    for number, unit in enumerate(plan.units, 1):
        counts = read_done(destination, unit)
        if counts is None:
            started = time.monotonic()
            counts = run_unit(unit, context, destination)
            logger.info(
                "unit %d/%d (%s): %d chunks in %.1f s",
                number,
                len(plan.units),
                unit.id,
                counts.chunks,
                time.monotonic() - started,
            )
        total.chunks += counts.chunks
        total.bytes += counts.bytes
    if plan.finishing_scales:
        started = time.monotonic()
        finishing = run_finishing(plan, context, destination)
        logger.info(
            "finishing step (scales %d-%d): %d chunks in %.1f s",
            plan.finishing_scales[0],
            plan.finishing_scales[-1],
            finishing.chunks,
            time.monotonic() - started,
        )
        total.chunks += finishing.chunks
        total.bytes += finishing.bytes
    return total
