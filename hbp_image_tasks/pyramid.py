"""Writes a Neuroglancer precomputed pyramid from z-slabs, building lower scales in memory.

neuroglancer-scripts does the format (info helpers, chunk encoders,
downscalers, file accessor); this module only schedules the work: chunks
are encoded, gzipped and written by a thread pool, and each row of chunks
is downscaled straight into the next scale's buffer, so scale 0 is never re-read.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Callable

import numpy as np
from neuroglancer_scripts import chunk_encoding, downscaling, dyadic_pyramid
from neuroglancer_scripts.file_accessor import NO_COMPRESS_MIME_TYPES, FileAccessor
from neuroglancer_scripts.scripts.generate_scales_info import set_info_params
from neuroglancer_scripts.utils import ceil_div

from . import memory
from .atomic import write_bytes_atomically


def _fastest_gzip() -> tuple:
    """Returns (name, function(data, level) -> gzip member) of the fastest deflate here."""
    try:
        import imagecodecs

        if imagecodecs.GZIP.available:
            return "libdeflate", lambda data, level: imagecodecs.gzip_encode(data, level=level)
    except (ImportError, AttributeError):
        pass
    try:
        from zlib_ng import zlib_ng as deflate

        name = "zlib-ng"
    except ImportError:
        import zlib as deflate

        name = "zlib"
    # wbits=31: a gzip member with no timestamp, so reruns give equal bytes.
    return name, lambda data, level: deflate.compress(data, level, wbits=31)


def _run_length_gzip() -> Callable[[bytes], bytes] | None:
    """Returns zlib-ng's run-length deflate (strategy Z_RLE) as gzip, if installed."""
    try:
        from zlib_ng import zlib_ng
    except ImportError:
        return None

    def compress(data) -> bytes:
        # memLevel 9: larger blocks, 20 % faster than 8 for the same size.
        packer = zlib_ng.compressobj(6, zlib_ng.DEFLATED, 31, 9, zlib_ng.Z_RLE)
        return packer.compress(data) + packer.flush()

    return compress


def _all_zero(view: memoryview) -> bool:
    """Returns whether every byte of ``view`` is zero (three bytes first: most
    chunks with data show it there, without a scan of the whole chunk)."""
    if view and (view[0] or view[len(view) // 2] or view[-1]):
        return False
    return not np.frombuffer(view, np.uint8).any()


class GzipCompressor:
    """Returns gzip members of chunks at a zlib-like level, without timestamps.

    Below level 9, a sample of each chunk (eight strips, an eighth of it) is
    first compressed by ISA-L level 1 (``isal``: fast string matching) and,
    for ``wide_samples`` (raw chunks of 16 bits or more per sample) unless
    that leaves it above 98 % (noise: nothing gains), by zlib-ng's run-length
    strategy (``zlib-ng``: runs and Huffman codes only). The whole chunk then
    goes to
    - run-length when that does at least as well as ISA-L on the sample:
      images whose noisy low bytes defeat string matching; 2.4x faster than
      libdeflate level 5, 3-5 % larger than zlib level 9 (8-bit samples never
      gain from it, so they are not probed);
    - ISA-L level 1 when the sample stays above 90 % (noise: within 0.1 % of
      zlib level 9, 20x faster);
    - else libdeflate (``imagecodecs``) at the level: at level 5 within 0.4 %
      of zlib level 9 for a quarter of zlib level 5's time (zlib-ng or zlib
      when imagecodecs lacks it).
    Level 9 always takes the last path. Every path writes standard gzip, the
    same bytes for the same chunk (resumed runs match), and releases the GIL.
    All-zero chunks (background: 29 % of the chunks of the benchmark's
    brain-like stack) are compressed once per length and their bytes reused.
    """

    INCOMPRESSIBLE = 0.9
    NOISE = 0.98  # samples that string matching cannot pack below this skip run-length
    STRIPS = 8

    def __init__(self, level: int, wide_samples: bool = False):
        self.level = level
        self._name, self._compress = _fastest_gzip()
        try:
            from isal import isal_zlib as fast
        except ImportError:
            fast = None
        self._fast = fast if level < 9 else None
        self._runs = _run_length_gzip() if self._fast is not None and wide_samples else None
        self._zeros: dict[int, bytes] = {}  # gzip member of n zero bytes, by n

    @property
    def backends(self) -> str:
        """Returns the libraries in use, for the log."""
        if self._fast is None:
            return self._name
        if self._runs is None:
            return self._name + ", isal for incompressible chunks"
        return self._name + ", zlib-ng run-length or isal where they do as well"

    def _sample(self, view: memoryview) -> bytes:
        """Returns eight strips spread over ``view``, an eighth of it in all."""
        step = len(view) // self.STRIPS
        return b"".join(view[k * step : k * step + step // 8] for k in range(self.STRIPS))

    def __call__(self, data) -> bytes:
        """Returns the gzip member of ``data`` (bytes or a C-contiguous array)."""
        view = memoryview(data).cast("B")
        if _all_zero(view):
            packed = self._zeros.get(len(view))
            if packed is None:
                packed = self._zeros[len(view)] = self._compress_any(view)
            return packed
        return self._compress_any(view)

    def _compress_any(self, view: memoryview) -> bytes:
        """Returns the gzip member of ``view`` by the path that suits it."""
        if self._fast is None or len(view) < 4096:
            return self._compress(view, self.level)
        sample = self._sample(view)
        matched = len(self._fast.compress(sample, 1))
        incompressible = matched > self.INCOMPRESSIBLE * len(sample)
        if (
            self._runs is not None
            and matched <= self.NOISE * len(sample)
            and len(self._runs(sample)) <= matched
        ):
            return self._runs(view)
        if incompressible:
            return self._fast.compress(view, 1, wbits=31)
        return self._compress(view, self.level)


class AtomicFileAccessor(FileAccessor):
    """neuroglancer-scripts' flat file accessor, writing whole files atomically.

    gzip members carry no timestamp, so a resumed run writes the same bytes as
    an uninterrupted one. ``store_chunk`` returns the bytes written.
    """

    def __init__(
        self, base_dir: Path, gzip: bool = True, compresslevel: int = 5, wide_samples: bool = False
    ):
        super().__init__(str(base_dir), flat=True, gzip=gzip, compresslevel=compresslevel)
        self.compress = GzipCompressor(compresslevel, wide_samples)

    def _encode(self, path: str, buf, mime_type: str) -> tuple:
        if self.gzip and mime_type not in NO_COMPRESS_MIME_TYPES:
            return path + ".gz", self.compress(buf)
        return path, buf

    def store_file(self, relative_path, buf, mime_type="application/octet-stream", overwrite=False):
        path, data = self._encode(os.path.join(self.base_path, relative_path), buf, mime_type)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_bytes_atomically(path, data)

    def store_chunk(
        self, buf, key, chunk_coords, mime_type="application/octet-stream", overwrite=True
    ) -> int:
        # The accessor's own chunk name pattern, formatted without pathlib (GIL).
        name = self.chunk_pattern.format(*chunk_coords, key=key)
        path, data = self._encode(os.path.join(self.base_path, name), buf, mime_type)
        write_bytes_atomically(path, data)
        return memoryview(data).nbytes


def build_info(
    data_type: str,
    num_channels: int,
    size: Sequence[int],
    resolution_nm: Sequence[float],
    voxel_offset: Sequence[int],
    dataset_type: str,
    encoding: str,
    chunk_size: int,
    max_scales: int | None,
) -> dict:
    """Returns a full pyramid *info* made by neuroglancer-scripts' helpers."""
    info = {
        "type": dataset_type,
        "data_type": data_type,
        "num_channels": int(num_channels),
        "scales": [
            {
                "encoding": encoding,
                "size": [int(s) for s in size],
                "resolution": [float(r) for r in resolution_nm],
                "voxel_offset": [int(o) for o in voxel_offset],
            }
        ],
    }
    set_info_params(info, dataset_type=dataset_type, encoding=encoding)
    dyadic_pyramid.fill_scales_for_dyadic_pyramid(
        info, target_chunk_size=chunk_size, max_scales=max_scales
    )
    # Lower scales keep the physical offset: express it in their own voxels.
    full = info["scales"][0]
    for scale in info["scales"][1:]:
        factors = [round(r / r0) for r, r0 in zip(scale["resolution"], full["resolution"])]
        scale["voxel_offset"] = [o // f for o, f in zip(full["voxel_offset"], factors)]
    return info


def count_chunks(info: dict) -> int:
    """Returns the number of chunk files of all scales of ``info``."""
    total = 0
    for scale in info["scales"]:
        chunk = scale["chunk_sizes"][0]
        total += int(np.prod([ceil_div(s, c) for s, c in zip(scale["size"], chunk)]))
    return total


def dyadic_factors(sizes: Sequence[Sequence[int]]) -> list[list[int]]:
    """Returns each scale's downscaling factors from the previous one ([1, 1, 1] first):
    2 along the axes whose size changes."""
    result = [[1, 1, 1]]
    for previous, size in zip(sizes, sizes[1:]):
        result.append([1 if p == s else 2 for p, s in zip(previous, size)])
    return result


def level_capacities(
    sizes: Sequence[Sequence[int]],
    chunks: Sequence[Sequence[int]],
    factors: Sequence[Sequence[int]],
) -> list[int]:
    """Returns the planes each scale's buffer holds in a PyramidBuilder.

    A scale holds one chunk layer, or what one flush of the previous scale
    pushes if that is more; flushes hand z pairs to a scale that halves z;
    a buffer as deep as the whole scale never overflows.
    """
    capacities, inflow = [], 0
    for index, size in enumerate(sizes):
        capacity = chunks[index][2] if index == 0 else max(chunks[index][2], inflow)
        if index + 1 < len(sizes):
            next_fz = int(factors[index + 1][2])
            capacity = max(capacity, next_fz)
            inflow = ceil_div(capacity, next_fz)
        capacities.append(min(capacity, size[2]))
    return capacities


@dataclasses.dataclass
class Level:
    """One scale being built: its z-buffer and where it stands."""

    key: str
    size: list[int]
    chunk: list[int]
    offset: list[int]
    factors: list[int]  # downscaling factors from the previous level (x, y, z)
    encoder: chunk_encoding.ChunkEncoder
    buffer: np.ndarray  # (C, capacity, Y, X)
    filled: int = 0
    z0: int = 0
    # The last filled planes, while they live in the previous scale's buffer
    # (see PyramidBuilder._flush); None otherwise.
    spill: np.ndarray | None = None

    @property
    def capacity(self) -> int:
        return self.buffer.shape[1]

    def planes(self, rows: slice, columns: slice) -> np.ndarray:
        """Returns the filled planes of a region, (C, filled, rows, columns)."""
        if self.spill is None:
            return self.buffer[:, : self.filled, rows, columns]
        kept = self.filled - self.spill.shape[1]
        return np.concatenate(
            (self.buffer[:, :kept, rows, columns], self.spill[:, :, rows, columns]), axis=1
        )


def _encoded_chunk(encoder: chunk_encoding.ChunkEncoder, block: np.ndarray):
    """Returns the encoded chunk: raw chunks as a contiguous array, the same bytes as
    RawChunkEncoder.encode's with one copy less (gzip and files take arrays)."""
    if type(encoder) is chunk_encoding.RawChunkEncoder and block.dtype == encoder.dtype:
        return np.ascontiguousarray(block)
    return encoder.encode(block)


class PyramidBuilder:
    """Receives scale-0 slabs in z order and writes every scale's chunks.

    Call :meth:`slab` to get the buffer for the next slab, fill it, then
    :meth:`push` (``last=True`` for the last slab). Memory: one slab
    plus the planes the lower scales keep between slabs (about a fifth of a
    slab for isotropic data: half of scale 1's buffer, scale 2's, ...); the
    planes that complete a scale are put in the previous scale's buffer.

    ``info`` may describe a box of a larger pyramid (see units.py): its
    scales' sizes and voxel offsets are then the box's, and ``factors`` gives
    each scale's downscaling factors from the previous one in the whole
    pyramid (a box's sizes cannot tell them at its edges). With ``sink``, the
    last scale's chunks are not written: its planes go to ``sink(z0, planes)``
    in z order instead.

    A task writes the chunks of a row of up to TILES_PER_TASK tiles and
    downscales them in one call: few enough Python calls per voxel that
    the workers rarely wait for the GIL, small enough temporaries (6 MB for
    16-bit samples, 32 MB for float32) and tasks enough (128 per 2048x2048
    slab) to keep many cores busy.
    """

    TILES_PER_TASK = 8

    def __init__(
        self,
        info: dict,
        accessor: AtomicFileAccessor,
        downscaler: downscaling.Downscaler,
        executor: Executor,
        encoder_options: dict | None = None,
        on_chunk: Callable[[int], None] | None = None,
        factors: Sequence[Sequence[int]] | None = None,
        sink: Callable[[int, np.ndarray], None] | None = None,
    ):
        self.info = info
        self.sink = sink
        self.accessor = accessor
        self.downscaler = downscaler
        self.executor = executor
        self.on_chunk = on_chunk
        self.chunks_written = 0
        self.bytes_written = 0
        self._lock = threading.Lock()
        dtype = np.dtype(info["data_type"]).newbyteorder("<")
        channels = info["num_channels"]
        self.levels: list[Level] = []
        scales = info["scales"]
        if factors is None:
            factors = dyadic_factors([scale["size"] for scale in scales])
        capacities = level_capacities(
            [scale["size"] for scale in scales], [s["chunk_sizes"][0] for s in scales], factors
        )
        for index, scale in enumerate(scales):
            size, chunk = list(scale["size"]), list(scale["chunk_sizes"][0])
            level_factors = [int(f) for f in factors[index]]
            if index and size != [
                ceil_div(p, f) for p, f in zip(scales[index - 1]["size"], level_factors)
            ]:
                raise ValueError(
                    f"scale {scale['key']} is not a dyadic downscaling of the previous one"
                )
            shape = (channels, capacities[index], size[1], size[0])
            self.levels.append(
                Level(
                    key=scale["key"],
                    size=size,
                    chunk=chunk,
                    offset=list(scale.get("voxel_offset", [0, 0, 0])),
                    factors=level_factors,
                    encoder=chunk_encoding.get_encoder(info, scale, encoder_options or {}),
                    buffer=np.empty(shape, dtype=dtype),
                )
            )
            if sink is None or index + 1 < len(scales):
                (Path(accessor.base_path) / scale["key"]).mkdir(parents=True, exist_ok=True)

    @property
    def slab_depth(self) -> int:
        """Returns the number of sections per scale-0 slab."""
        return self.levels[0].capacity

    def slab(self, depth: int) -> np.ndarray:
        """Returns the scale-0 buffer view to fill with the next ``depth`` sections."""
        level = self.levels[0]
        assert level.filled == 0 and depth <= level.capacity
        return level.buffer[:, :depth]

    def push(self, depth: int, last: bool) -> None:
        """Writes the filled slab and every lower-scale chunk it completes, then
        hands the heap's free pages back (the slab's decoders fragment it)."""
        self.levels[0].filled = depth
        self._flush(0, last)
        memory.release_free_memory()

    def _flush(self, index: int, last: bool) -> None:
        level = self.levels[index]
        if level.filled == 0:
            return
        if level.filled < level.capacity and not last:
            return
        target = self.levels[index + 1] if index + 1 < len(self.levels) else None
        if target is None and self.sink is not None:
            self.sink(level.z0, level.planes(slice(None), slice(None)))
            level.z0 += level.filled
            level.filled = 0
            level.spill = None
            return
        spill = None
        if target is not None:
            fx, fy, fz = target.factors
            incoming = ceil_div(level.filled, fz)
            assert target.filled + incoming <= target.capacity, "buffer sizes"
            if level.spill is None and (target.filled + incoming >= target.capacity or last):
                # The target is flushed right after this level, before this
                # level's buffer is filled again: its new planes can live there.
                # Plane z, row y, column x of the target goes to plane z, row
                # y * fy, column x * fx of this buffer, inside the very band it
                # is computed from, once that band's chunks are written.
                spill = level.buffer[:, :incoming, ::fy, ::fx]
        futures: list[Future] = []
        chunk_x, chunk_y = level.chunk[0], level.chunk[1]
        band_width = chunk_x * self.TILES_PER_TASK
        for y0 in range(0, level.size[1], chunk_y):
            for x0 in range(0, level.size[0], band_width):
                futures.append(self.executor.submit(self._write_band, level, target, spill, x0, y0))
        for future in futures:
            future.result()
        if target is not None:
            target.filled += incoming
            target.spill = spill
        level.z0 += level.filled
        level.filled = 0
        level.spill = None
        if target is not None:
            self._flush(index + 1, last)

    def _write_band(
        self, level: Level, target: Level | None, spill: np.ndarray | None, x0: int, y0: int
    ) -> None:
        """Writes the chunks of up to TILES_PER_TASK columns of tiles from (x0, y0)
        along x, then downscales them together into ``target`` (into ``spill``
        if given)."""
        chunk_x, chunk_y, chunk_z = level.chunk
        x_end = min(x0 + chunk_x * self.TILES_PER_TASK, level.size[0])
        y1 = min(y0 + chunk_y, level.size[1])
        band = level.planes(slice(y0, y1), slice(x0, x_end))
        ox, oy, oz = level.offset
        for tile_x0 in range(x0, x_end, chunk_x):
            tile_x1 = min(tile_x0 + chunk_x, x_end)
            tile = band[..., tile_x0 - x0 : tile_x1 - x0]
            for z in range(0, level.filled, chunk_z):
                z1 = min(z + chunk_z, level.filled)
                data = _encoded_chunk(level.encoder, tile[:, z:z1])
                coords = (
                    ox + tile_x0,
                    ox + tile_x1,
                    oy + y0,
                    oy + y1,
                    oz + level.z0 + z,
                    oz + level.z0 + z1,
                )
                written = self.accessor.store_chunk(
                    data, level.key, coords, mime_type=level.encoder.mime_type
                )
                with self._lock:
                    self.chunks_written += 1
                    self.bytes_written += written
                if self.on_chunk is not None:
                    self.on_chunk(written)
        if target is not None:
            fx, fy, fz = target.factors
            # A striding downscaler returns a view of ``band``, which the spill
            # overlaps: numpy copies overlapping operands before assigning.
            small = self.downscaler.downscale(band, (fx, fy, fz))
            destination, start = (spill, 0) if spill is not None else (target.buffer, target.filled)
            destination[
                :,
                start : start + small.shape[1],
                y0 // fy : y0 // fy + small.shape[2],
                x0 // fx : x0 // fx + small.shape[3],
            ] = small

    def state(self) -> tuple:
        """Returns (per-level positions, per-level pending planes) for a checkpoint."""
        assert all(level.spill is None for level in self.levels)
        positions = [{"z0": lv.z0, "filled": lv.filled} for lv in self.levels]
        pending = {
            f"level{i}": lv.buffer[:, : lv.filled] for i, lv in enumerate(self.levels) if lv.filled
        }
        return positions, pending

    def restore(self, positions: list, pending: dict) -> None:
        """Puts back the positions and pending planes saved by :meth:`state`."""
        for i, (level, position) in enumerate(zip(self.levels, positions)):
            level.z0, level.filled = int(position["z0"]), int(position["filled"])
            if level.filled:
                level.buffer[:, : level.filled] = pending[f"level{i}"]


class IntegerAveragingDownscaler(downscaling.Downscaler):
    """neuroglancer-scripts' averaging downscaler, computed in integers where that is exact.

    For unsigned integer samples of up to 32 bits and even extents along the
    halved axes, every step of AveragingDownscaler's float64 arithmetic is
    exact, so its result is the sum of the 2**k averaged samples divided by
    2**k, rounded half to even; this computes that with integer sums, 5-7
    times faster and with an eighth of the temporary memory. Other samples,
    odd extents (edge padding) and unsupported factors go to the wrapped
    downscaler.
    """

    WIDER = {1: np.uint16, 2: np.uint32, 4: np.uint64}  # room for a sum of 8

    def __init__(self, fallback: downscaling.AveragingDownscaler):
        self.fallback = fallback

    def check_factors(self, downscaling_factors) -> bool:
        return self.fallback.check_factors(downscaling_factors)

    def downscale(self, chunk: np.ndarray, downscaling_factors) -> np.ndarray:
        """Returns ``chunk`` (C, Z, Y, X) averaged over (fx, fy, fz) blocks."""
        fx, fy, fz = downscaling_factors
        halved = [(axis, f) for axis, f in ((1, fz), (2, fy), (3, fx)) if f == 2]
        wide = self.WIDER.get(chunk.dtype.itemsize)
        if (
            chunk.dtype.kind != "u"
            or not chunk.dtype.isnative
            or wide is None
            or not halved
            or not self.check_factors(downscaling_factors)
            or any(chunk.shape[axis] % 2 for axis, _ in halved)
        ):
            return self.fallback.downscale(chunk, downscaling_factors)
        total = chunk
        for axis, _ in halved:
            even = [slice(None)] * 4
            odd = [slice(None)] * 4
            even[axis], odd[axis] = slice(0, None, 2), slice(1, None, 2)
            total = np.add(total[tuple(even)], total[tuple(odd)], dtype=wide)
        shift = len(halved)
        # total / 2**shift rounded half to even, as np.rint does:
        # add (half - 1) plus one more when the truncated quotient is odd.
        odd_quotient = total >> shift
        odd_quotient &= 1
        total += (1 << (shift - 1)) - 1
        total += odd_quotient
        total >>= shift
        return total.astype(chunk.dtype)


def make_downscaler(method: str, info: dict) -> downscaling.Downscaler:
    """Returns neuroglancer-scripts' downscaler for ``method`` (auto as compute-scales).

    Its averaging downscaler is wrapped in IntegerAveragingDownscaler, which
    gives identical voxels faster.
    """
    downscaler = downscaling.get_downscaler(method, info=copy.deepcopy(info), options={})
    if type(downscaler) is downscaling.AveragingDownscaler:
        return IntegerAveragingDownscaler(downscaler)
    return downscaler
