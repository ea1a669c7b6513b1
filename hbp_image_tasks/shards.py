"""Neuroglancer's sharded precomputed format: chunk ids, shard geometry and shard files.

Pure functions after Neuroglancer's ``sharded.md`` and ``volume.md``: compressed
Morton chunk ids, the identity-hash sharding that makes every shard an
axis-aligned box of chunks, and the byte layout of a ``<hex>.shard`` file.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import zlib
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .errors import UsageError

SHARDING_TYPE = "neuroglancer_uint64_sharded_v1"
DEFAULT_SHARD_SIZE = 2 << 30  # uncompressed bytes per shard
# ``"sharding": "auto"`` shards a dataset whose scale 0 has more chunks than this:
# beyond it, per-object work dominates the upload (see the README).
AUTO_MIN_CHUNKS = 10_000
# A minishard holds up to 2**PRESHIFT_BITS chunks of consecutive ids (a 4x4x4
# block): a viewer fetches a 1.5 kB index (before gzip) for a block it reads.
PRESHIFT_BITS = 6
INDEX_ENTRY = struct.Struct("<QQ")  # one minishard's [start, end) after the shard index


@dataclasses.dataclass(frozen=True)
class ShardSpec:
    """A scale's ``sharding`` object with the identity hash."""

    preshift_bits: int
    minishard_bits: int
    shard_bits: int
    data_encoding: str = "gzip"  # "gzip" or "raw"
    minishard_index_encoding: str = "gzip"

    @property
    def box_bits(self) -> int:
        """Returns the number of low chunk-id bits shared by one shard's chunks."""
        return self.preshift_bits + self.minishard_bits

    @property
    def index_bytes(self) -> int:
        """Returns the size of the shard index at the start of every shard file."""
        return INDEX_ENTRY.size << self.minishard_bits

    def to_dict(self) -> dict:
        """Returns the ``sharding`` member of the scale's info."""
        return {
            "@type": SHARDING_TYPE,
            "preshift_bits": self.preshift_bits,
            "hash": "identity",
            "minishard_bits": self.minishard_bits,
            "shard_bits": self.shard_bits,
            "minishard_index_encoding": self.minishard_index_encoding,
            "data_encoding": self.data_encoding,
        }

    @classmethod
    def from_dict(cls, sharding: Mapping) -> ShardSpec:
        """Returns the spec of a ``sharding`` member this package writes."""
        if sharding.get("@type") != SHARDING_TYPE or sharding.get("hash") != "identity":
            raise ValueError(f"unsupported sharding {dict(sharding)!r}")
        return cls(
            int(sharding["preshift_bits"]),
            int(sharding["minishard_bits"]),
            int(sharding["shard_bits"]),
            sharding.get("data_encoding", "raw"),
            sharding.get("minishard_index_encoding", "raw"),
        )

    def shard_of(self, chunk_id: int) -> int:
        """Returns the shard number of a chunk id."""
        return (chunk_id >> self.box_bits) & ((1 << self.shard_bits) - 1)

    def minishard_of(self, chunk_id: int) -> int:
        """Returns the minishard number of a chunk id inside its shard."""
        return (chunk_id >> self.preshift_bits) & ((1 << self.minishard_bits) - 1)

    def shard_name(self, shard: int) -> str:
        """Returns the file name of a shard: lowercase hex padded to ceil(shard_bits / 4)."""
        return f"{shard:0{max(1, -(-self.shard_bits // 4))}x}.shard"


def grid_shape(size: Sequence[int], chunk: Sequence[int]) -> tuple[int, int, int]:
    """Returns the number of chunks along x, y, z of a scale."""
    return tuple(-(-int(s) // int(c)) for s, c in zip(size, chunk))  # type: ignore[return-value]


def grid_bits(grid: Sequence[int]) -> tuple[int, int, int]:
    """Returns ceil(log2(n)) for each axis: the bits of a chunk position in the id."""
    return tuple(max(0, int(n) - 1).bit_length() for n in grid)  # type: ignore[return-value]


def compressed_morton(position: Sequence[int], grid: Sequence[int]) -> int:
    """Returns the compressed Morton code of a chunk's grid position (x, y, z).

    Bit i of each coordinate is interleaved in x, y, z order, skipping axes
    whose positions need fewer than i + 1 bits.
    """
    bits = grid_bits(grid)
    code = 0
    out = 0
    for level in range(max(bits)):
        for axis in range(3):
            if level < bits[axis]:
                code |= ((int(position[axis]) >> level) & 1) << out
                out += 1
    return code


def morton_positions(ids: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Returns the (N, 3) grid positions of compressed Morton ``ids`` (the inverse)."""
    bits = grid_bits(grid)
    ids = np.asarray(ids, dtype=np.uint64)
    positions = np.zeros((len(ids), 3), dtype=np.uint64)
    out = 0
    for level in range(max(bits)):
        for axis in range(3):
            if level < bits[axis]:
                positions[:, axis] |= ((ids >> np.uint64(out)) & np.uint64(1)) << np.uint64(level)
                out += 1
    return positions


def box_shape(grid: Sequence[int], box_bits: int) -> tuple[int, int, int]:
    """Returns the chunks along x, y, z of the box that the low ``box_bits`` bits of
    the compressed Morton code span (the whole grid's bits when it has fewer)."""
    bits = grid_bits(grid)
    counts = [0, 0, 0]
    taken = 0
    for level in range(max(bits, default=0)):
        for axis in range(3):
            if level < bits[axis] and taken < box_bits:
                counts[axis] += 1
                taken += 1
    return tuple(1 << c for c in counts)  # type: ignore[return-value]


def choose_spec(
    grid: Sequence[int], chunk_bytes: int, shard_size: int, data_encoding: str
) -> ShardSpec:
    """Returns the sharding of a scale whose shards are boxes of at most ``shard_size``
    uncompressed bytes (one ``0.shard`` when the scale fits)."""
    if shard_size < chunk_bytes:
        raise ValueError(f"shard_size {shard_size} is below one chunk ({chunk_bytes} bytes)")
    total = sum(grid_bits(grid))
    box_bits = min(total, int(math.log2(shard_size // chunk_bytes)))
    preshift = min(box_bits, PRESHIFT_BITS)
    return ShardSpec(preshift, box_bits - preshift, total - box_bits, data_encoding)


def check_spec(spec: ShardSpec, grid: Sequence[int]) -> str | None:
    """Returns why ``spec`` cannot shard the grid by boxes, or None when it can."""
    total = sum(grid_bits(grid))
    if spec.box_bits + spec.shard_bits < total:
        return (
            f"preshift_bits + minishard_bits + shard_bits = {spec.box_bits + spec.shard_bits} "
            f"cannot address the {total} bits of a {grid[0]}x{grid[1]}x{grid[2]} chunk grid"
        )
    return None


def plan_sharding(
    info: dict, sharding: bool | str | Mapping, shard_size: int, data_encoding: str
) -> list[ShardSpec | None]:
    """Returns each scale's sharding (None: one file per chunk) for the ``sharding``
    and ``shard_size`` parameters; raises UsageError naming the key that cannot work."""
    grids = [grid_shape(s["size"], s["chunk_sizes"][0]) for s in info["scales"]]
    itemsize = np.dtype(info["data_type"]).itemsize * int(info["num_channels"])
    sizes = [int(np.prod(s["chunk_sizes"][0])) * itemsize for s in info["scales"]]
    if shard_size < max(sizes):
        raise UsageError(
            f"parameter 'shard_size' ({shard_size} bytes) is below one chunk "
            f"({max(sizes)} bytes uncompressed)"
        )
    if sharding == "auto":
        sharding = int(np.prod(grids[0])) > AUTO_MIN_CHUNKS
    if sharding is False:
        return [None] * len(grids)
    specs: list[ShardSpec | None] = []
    for scale, grid, chunk_bytes in zip(info["scales"], grids, sizes):
        if isinstance(sharding, Mapping):
            spec = ShardSpec(**sharding, data_encoding=data_encoding)
            problem = check_spec(spec, grid)
            if problem:
                raise UsageError(f"parameter 'sharding' for scale {scale['key']}: {problem}")
        else:
            spec = choose_spec(grid, chunk_bytes, shard_size, data_encoding)
        specs.append(spec)
    return specs


def box_voxels(info: Mapping, index: int) -> tuple[int, int, int]:
    """Returns the shard box of scale ``index`` of a sharded ``info`` in scale-0 voxels
    (x, y, z): units of work aligned to it never share a shard of that scale."""
    scale, full = info["scales"][index], info["scales"][0]
    spec = ShardSpec.from_dict(scale["sharding"])
    chunk = scale["chunk_sizes"][0]
    box = box_shape(grid_shape(scale["size"], chunk), spec.box_bits)
    factors = [round(r / r0) for r, r0 in zip(scale["resolution"], full["resolution"])]
    return tuple(int(b * c * f) for b, c, f in zip(box, chunk, factors))  # type: ignore[return-value]


def box_chunk_count(position: Sequence[int], grid: Sequence[int], box: Sequence[int]) -> int:
    """Returns how many chunks of the grid lie in the box holding chunk ``position``."""
    count = 1
    for p, n, b in zip(position, grid, box):
        start = (int(p) // b) * b
        count *= min(b, n - start)
    return count


def gzip_bytes(data) -> bytes:
    """Returns a gzip member of ``data`` without a timestamp (equal bytes on reruns)."""
    # compressobj: zlib.compress takes wbits from Python 3.11 on only
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def _minishard_index(entries: Sequence[tuple[int, int, int]]) -> bytes:
    """Returns the raw index of (chunk id, start after the shard index, size) entries:
    ids delta-encoded, starts relative to the previous chunk's end."""
    array = np.zeros((3, len(entries)), dtype="<u8")
    previous_id = previous_end = 0
    for i, (chunk_id, start, size) in enumerate(entries):
        array[:, i] = (chunk_id - previous_id, start - previous_end, size)
        previous_id, previous_end = chunk_id, start + size
    return array.tobytes()


def shard_layout(spec: ShardSpec, sizes: Mapping[int, int]) -> list:
    """Returns a shard file's parts in order: ``bytes`` (indexes) to write as they are
    and ``int`` chunk ids whose ``sizes[id]`` bytes of data go there.

    Each minishard's chunks come in id order, followed by its index.
    """
    minishards: dict[int, list[int]] = {}
    for chunk_id in sorted(sizes):
        minishards.setdefault(spec.minishard_of(chunk_id), []).append(chunk_id)
    body: list = []
    ranges = [(0, 0)] * (1 << spec.minishard_bits)
    position = 0  # relative to the end of the shard index
    for minishard in sorted(minishards):
        entries = []
        for chunk_id in minishards[minishard]:
            entries.append((chunk_id, position, sizes[chunk_id]))
            body.append(chunk_id)
            position += sizes[chunk_id]
        index = _minishard_index(entries)
        if spec.minishard_index_encoding == "gzip":
            index = gzip_bytes(index)
        body.append(index)
        ranges[minishard] = (position, position + len(index))
        position += len(index)
    header = b"".join(INDEX_ENTRY.pack(start, end) for start, end in ranges)
    return [header] + body


def assemble(spec: ShardSpec, chunks: Mapping[int, bytes]) -> bytes:
    """Returns a whole shard file holding ``chunks`` (id -> encoded data), in memory."""
    parts = shard_layout(spec, {k: len(v) for k, v in chunks.items()})
    return b"".join(part if isinstance(part, bytes) else chunks[part] for part in parts)


def read_shard(spec: ShardSpec, data: bytes) -> dict[int, bytes]:
    """Returns chunk id -> stored data of a shard file (a reader for checks and tests)."""
    chunks: dict[int, bytes] = {}
    base = spec.index_bytes
    for minishard in range(1 << spec.minishard_bits):
        start, end = INDEX_ENTRY.unpack_from(data, minishard * INDEX_ENTRY.size)
        if start == end:
            continue
        index = data[base + start : base + end]
        if spec.minishard_index_encoding == "gzip":
            index = zlib.decompress(index, wbits=31)
        array = np.frombuffer(index, dtype="<u8").reshape(3, -1)
        chunk_id = offset = 0
        for delta_id, delta_start, size in array.T.tolist():
            chunk_id += delta_id
            offset += delta_start
            chunks[chunk_id] = data[base + offset : base + offset + size]
            offset += size
    return chunks


def chunk_ids(grid: Sequence[int]) -> Iterable[tuple[tuple[int, int, int], int]]:
    """Yields ((x, y, z) grid position, compressed Morton id) of every chunk of a grid."""
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                yield (x, y, z), compressed_morton((x, y, z), grid)
