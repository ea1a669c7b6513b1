"""Writes the chunks of sharded scales: pieces on disk until their shard's box is complete.

The accessor takes chunks exactly as the one-file-per-chunk accessor does; the
chunk of a sharded scale becomes a piece file (its encoded bytes) in a hidden
directory of its shard, and the writer of the box's last chunk assembles the
shard file under a temporary name, renames it into place and removes the pieces.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import layout, shards
from .atomic import O_CLOEXEC, temporary_name, write_bytes_atomically
from .errors import ConversionError
from .pyramid import AtomicFileAccessor
from .shards import ShardSpec

logger = logging.getLogger(__name__)

PIECES_DIR = layout.SHARD_PIECES_DIR_NAME  # in a scale's directory: one sub-directory per shard


class _Scale:
    """A sharded scale: its spec, chunk grid and the shards being filled."""

    def __init__(self, scale: Mapping, spec: ShardSpec):
        self.spec = spec
        self.chunk = [int(c) for c in scale["chunk_sizes"][0]]
        self.offset = [int(o) for o in scale.get("voxel_offset", [0, 0, 0])]
        self.grid = shards.grid_shape(scale["size"], self.chunk)
        self.box = shards.box_shape(self.grid, spec.box_bits)
        self.pending: dict[int, set[int]] = {}  # shard -> chunk ids with a piece
        self.finished: set[int] = set()  # shards in place (a resumed run skips their chunks)

    def position(self, chunk_coords: Sequence[int]) -> tuple[int, int, int]:
        """Returns the grid position of a chunk from its (x0, x1, y0, y1, z0, z1)."""
        return tuple(
            (int(chunk_coords[2 * axis]) - self.offset[axis]) // self.chunk[axis]
            for axis in range(3)
        )  # type: ignore[return-value]


def unfinished_shards(destination: Path) -> list[Path]:
    """Returns the shard piece directories left in a dataset (shards not yet assembled)."""
    return layout.unassembled_shards(destination)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]


def _copy_piece(out: int, path: str, size: int) -> None:
    """Appends the ``size`` bytes of a piece file to ``out``, in the kernel."""
    source = os.open(path, os.O_RDONLY | O_CLOEXEC)
    try:
        copied = 0
        while copied < size:
            sent = os.sendfile(out, source, copied, size - copied)
            if sent == 0:
                raise OSError(f"shard piece {path} is shorter than {size} bytes")
            copied += sent
    finally:
        os.close(source)


class ShardedFileAccessor(AtomicFileAccessor):
    """The atomic file accessor, writing the scales that have a spec as shard files."""

    def __init__(self, base_dir: Path, info: Mapping, specs: Sequence[ShardSpec | None], **kwargs):
        super().__init__(base_dir, **kwargs)
        self._scales = {
            scale["key"]: _Scale(scale, spec)
            for scale, spec in zip(info["scales"], specs)
            if spec is not None
        }
        self._lock = threading.Lock()
        self._directories: set[str] = set()  # piece directories made by this process

    def _pieces(self, key: str, spec: ShardSpec, shard: int) -> str:
        name = spec.shard_name(shard).rsplit(".", 1)[0]
        return os.path.join(self.base_path, key, PIECES_DIR, name)

    def store_chunk(
        self, buf, key, chunk_coords, mime_type="application/octet-stream", overwrite=True
    ) -> int:
        scale = self._scales.get(key)
        if scale is None:
            return super().store_chunk(buf, key, chunk_coords, mime_type, overwrite)
        position = scale.position(chunk_coords)
        chunk_id = shards.compressed_morton(position, scale.grid)
        shard = scale.spec.shard_of(chunk_id)
        if shard in scale.finished:
            return 0
        data = self.compress(buf) if scale.spec.data_encoding == "gzip" else buf
        if not self._write_piece(key, scale.spec, shard, chunk_id, data):
            with self._lock:
                scale.finished.add(shard)
            return 0
        expected = shards.box_chunk_count(position, scale.grid, scale.box)
        with self._lock:
            present = scale.pending.setdefault(shard, set())
            present.add(chunk_id)
            complete = len(present) == expected
            if complete:
                del scale.pending[shard]
                scale.finished.add(shard)
        if complete:
            self._assemble(key, scale.spec, shard)
        return memoryview(data).nbytes

    def _write_piece(self, key: str, spec: ShardSpec, shard: int, chunk_id: int, data) -> bool:
        """Writes a chunk's piece; returns False when another process (a unit of a
        distributed conversion) has meanwhile put the whole shard in place."""
        directory = self._pieces(key, spec, shard)
        if directory not in self._directories:
            os.makedirs(directory, exist_ok=True)
            self._directories.add(directory)
        try:
            write_bytes_atomically(os.path.join(directory, f"{chunk_id:x}"), data)
        except FileNotFoundError:
            if os.path.exists(os.path.join(self.base_path, key, spec.shard_name(shard))):
                return False
            raise
        return True

    def _assemble(self, key: str, spec: ShardSpec, shard: int) -> None:
        """Writes a shard file from its pieces, renames it into place, removes the pieces."""
        directory = self._pieces(key, spec, shard)
        sizes = {}
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.name.startswith("."):
                    sizes[int(entry.name, 16)] = entry.stat().st_size
        path = os.path.join(self.base_path, key, spec.shard_name(shard))
        temporary = temporary_name(path)
        try:
            out = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, 0o666)
            try:
                for part in shards.shard_layout(spec, sizes):
                    if isinstance(part, bytes):
                        _write_all(out, part)
                    else:
                        _copy_piece(out, os.path.join(directory, f"{part:x}"), sizes[part])
            finally:
                os.close(out)
            os.replace(temporary, path)
        except BaseException:
            if os.path.exists(temporary):
                os.unlink(temporary)
            raise
        shutil.rmtree(directory)
        with self._lock:
            self._directories.discard(directory)
        logger.debug("%s: %d chunks", path, len(sizes))

    def resume(self, done: Mapping[str, int]) -> str | None:
        """Takes up the pieces of a stopped conversion whose scales have ``done[key]``
        planes written; returns what is missing (the conversion must start over), or None.

        Leftover temporaries go; pieces of shards already in place (killed before
        their removal) go too.
        """
        for key, scale in self._scales.items():
            scale.pending.clear()
            directory = os.path.join(self.base_path, key)
            scale.finished = {
                int(name[: -len(".shard")], 16)
                for name in (os.listdir(directory) if os.path.isdir(directory) else ())
                if name.endswith(".shard") and not name.startswith(".")
            }
            root = os.path.join(self.base_path, key, PIECES_DIR)
            for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
                directory = os.path.join(root, name)
                shard = int(name, 16)
                if shard in scale.finished:
                    shutil.rmtree(directory)
                    continue
                present = scale.pending.setdefault(shard, set())
                for entry in os.listdir(directory):
                    if entry.startswith("."):
                        os.unlink(os.path.join(directory, entry))
                    else:
                        present.add(int(entry, 16))
            problem = self._missing(key, scale, done.get(key, 0))
            if problem:
                return problem
        return None

    def _missing(self, key: str, scale: _Scale, done_z: int) -> str | None:
        """Returns which shard lacks pieces of the chunks below plane ``done_z``, if any."""
        done = done_z // scale.chunk[2]
        box_x, box_y, box_z = scale.box
        for z0 in range(0, done, box_z):
            for y0 in range(0, scale.grid[1], box_y):
                for x0 in range(0, scale.grid[0], box_x):
                    shard = scale.spec.shard_of(shards.compressed_morton((x0, y0, z0), scale.grid))
                    if shard in scale.finished:
                        continue
                    name = scale.spec.shard_name(shard)
                    expected = (
                        min(box_x, scale.grid[0] - x0)
                        * min(box_y, scale.grid[1] - y0)
                        * (min(z0 + box_z, done) - z0)
                    )
                    ids = np.fromiter(scale.pending.get(shard, ()), dtype=np.uint64)
                    present = int(
                        np.count_nonzero(shards.morton_positions(ids, scale.grid)[:, 2] < done)
                    )
                    if present < expected:
                        return (
                            f"{key}/{name}: {expected - present} of its written chunks are missing"
                        )
        return None

    def assemble_ready(self) -> int:
        """Assembles every shard whose pieces are all on disk, whichever processes wrote
        them (units of a distributed conversion); returns how many it assembled."""
        self.resume({})
        assembled = 0
        for key, scale in self._scales.items():
            for shard, present in sorted(scale.pending.items()):
                any_id = np.array([next(iter(present))], dtype=np.uint64)
                position = shards.morton_positions(any_id, scale.grid)[0]
                if len(present) < shards.box_chunk_count(position, scale.grid, scale.box):
                    continue
                del scale.pending[shard]
                scale.finished.add(shard)
                self._assemble(key, scale.spec, shard)
                assembled += 1
        return assembled

    def discard_pieces(self) -> None:
        """Removes every piece (the conversion starts over)."""
        for key, scale in self._scales.items():
            scale.pending.clear()
            shutil.rmtree(os.path.join(self.base_path, key, PIECES_DIR), ignore_errors=True)
        self._directories.clear()


def add_sharding(info: dict, params) -> list[ShardSpec | None]:
    """Returns each scale's sharding for the conversion parameters and puts it in ``info``."""
    gzip_chunks = params.gzip and params.effective_encoding != "jpeg"
    specs = shards.plan_sharding(
        info, params.sharding, params.shard_size, "gzip" if gzip_chunks else "raw"
    )
    for scale, spec in zip(info["scales"], specs):
        if spec is not None:
            scale["sharding"] = spec.to_dict()
    return specs


def open_accessor(
    destination: Path, info: Mapping, specs: Sequence[ShardSpec | None], **options
) -> AtomicFileAccessor:
    """Returns the accessor that writes the dataset: sharded if any scale is."""
    if any(spec is not None for spec in specs):
        return ShardedFileAccessor(destination, info, specs, **options)
    return AtomicFileAccessor(destination, **options)


def resume(accessor: AtomicFileAccessor, builder) -> bool:
    """Takes up the shard pieces of a stopped conversion; returns True when some are
    missing and the conversion starts over (``builder`` reset, pieces removed)."""
    if not isinstance(accessor, ShardedFileAccessor):
        return False
    problem = accessor.resume({level.key: level.z0 for level in builder.levels})
    if problem is None:
        return False
    logger.warning("%s; converting again from the first section", problem)
    accessor.discard_pieces()
    builder.restore([{"z0": 0, "filled": 0}] * len(builder.levels), {})
    builder.chunks_written = builder.bytes_written = 0
    return True


def check_finished(destination: Path) -> None:
    """Raises ConversionError if a shard of ``destination`` was left unassembled."""
    left = unfinished_shards(destination)
    if not left:
        for pieces in Path(destination).glob(f"*/{PIECES_DIR}"):
            pieces.rmdir()
    if left:
        raise ConversionError(
            f"{left[0]}: shard pieces left after the last section ({len(left)} shards "
            "unassembled); convert again"
        )
