"""Sharded format: chunk ids, shard boxes and shard files, read back by tensorstore."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from hbp_image_tasks import shards
from hbp_image_tasks.shards import ShardSpec


@pytest.mark.parametrize(
    "position, grid, expected",
    [
        ((0, 0, 0), (4, 4, 4), 0),
        ((1, 0, 0), (4, 4, 4), 0b1),
        ((0, 1, 0), (4, 4, 4), 0b10),
        ((0, 0, 1), (4, 4, 4), 0b100),
        ((2, 0, 0), (4, 4, 4), 0b1000),
        ((3, 3, 3), (4, 4, 4), 63),
        # z has a single chunk: no bits of its own; x keeps going after y runs out.
        ((1, 1, 0), (8, 2, 1), 0b11),
        ((4, 1, 0), (8, 2, 1), 0b1010),
        ((0, 0, 5), (1, 1, 6), 5),
    ],
)
def test_compressed_morton_interleaves_only_the_bits_each_axis_needs(position, grid, expected):
    assert shards.compressed_morton(position, grid) == expected


@pytest.mark.parametrize("grid", [(5, 3, 7), (1, 1, 1), (16, 9, 2), (3, 40, 1)])
def test_compressed_morton_numbers_every_chunk_once_below_the_grid_bits(grid):
    positions, ids = zip(*shards.chunk_ids(grid))
    assert len(set(ids)) == len(ids) == int(np.prod(grid))
    assert max(ids) < 1 << sum(shards.grid_bits(grid))
    assert shards.morton_positions(np.array(ids), grid).tolist() == [list(p) for p in positions]


@pytest.mark.parametrize(
    "grid, chunk_bytes, shard_size",
    [
        ((103, 90, 116), 64**3, 2 << 30),  # BigBrain's scale 0
        ((103, 90, 2), 64**3, 2 << 30),  # 128 of its sections
        ((13, 12, 15), 64**3, 2 << 30),  # a small scale: one shard
        ((9, 5, 3), 1000, 8000),
        ((9, 5, 3), 1000, 1000),  # one chunk per shard
    ],
)
def test_each_shard_is_one_axis_aligned_box_within_the_shard_size(grid, chunk_bytes, shard_size):
    spec = shards.choose_spec(grid, chunk_bytes, shard_size, "gzip")
    box = shards.box_shape(grid, spec.box_bits)
    assert int(np.prod(box)) * chunk_bytes <= shard_size
    assert shards.check_spec(spec, grid) is None
    # Every id below the grid's bits, kept where its position lies in the grid
    # (the inverse of the Morton code, checked above; a million chunks at once).
    ids = np.arange(1 << sum(shards.grid_bits(grid)), dtype=np.uint64)
    positions = shards.morton_positions(ids, grid).astype(np.int64)
    inside = np.all(positions < np.array(grid), axis=1)
    ids, positions = ids[inside], positions[inside]
    assert len(ids) == int(np.prod(grid))
    shard_of = np.fromiter((spec.shard_of(i) for i in ids.tolist()), np.int64, len(ids))
    assert int(shard_of.max()) < 1 << spec.shard_bits
    order = np.argsort(shard_of, kind="stable")
    members, starts, counts = np.unique(shard_of[order], return_index=True, return_counts=True)
    corners = np.minimum.reduceat(positions[order], starts, axis=0)
    ends = np.maximum.reduceat(positions[order], starts, axis=0)
    assert np.all(corners % np.array(box) == 0)
    assert np.all(ends < corners + np.array(box))
    assert counts.tolist() == [shards.box_chunk_count(c, grid, box) for c in corners]
    if int(np.prod(grid)) * chunk_bytes <= shard_size:
        assert spec.shard_bits == 0 and members.tolist() == [0]
        assert spec.shard_name(0) == "0.shard"


@pytest.mark.parametrize(
    "shard_bits, shard, name",
    [
        (0, 0, "0.shard"),
        (3, 5, "5.shard"),
        (4, 10, "a.shard"),
        (5, 10, "0a.shard"),
        (9, 255, "0ff.shard"),
    ],
)
def test_shard_names_are_lowercase_hex_padded_to_the_shard_bits(shard_bits, shard, name):
    assert ShardSpec(0, 0, shard_bits).shard_name(shard) == name


def test_shard_size_below_one_chunk_is_refused():
    with pytest.raises(ValueError, match="below one chunk"):
        shards.choose_spec((4, 4, 4), 4096, 4095, "gzip")


def test_bits_that_cannot_address_the_grid_are_named():
    problem = shards.check_spec(ShardSpec(2, 2, 1), (8, 8, 8))
    assert "cannot address the 9 bits of a 8x8x8 chunk grid" in problem


def test_shard_file_starts_with_its_index_and_reads_back_every_chunk():
    spec = ShardSpec(preshift_bits=1, minishard_bits=2, shard_bits=0)
    chunks = {i: bytes([i]) * (i + 1) for i in (0, 1, 2, 6, 7)}  # minishard 2: ids 4, 5
    data = shards.assemble(spec, chunks)
    assert len(data) > spec.index_bytes == 4 * 16
    starts_ends = np.frombuffer(data[: spec.index_bytes], "<u8").reshape(-1, 2)
    assert starts_ends[2].tolist() == [0, 0]  # an empty minishard
    assert starts_ends[3][0] == starts_ends[1][1] + 7 + 8  # after chunks 6 and 7
    assert shards.read_shard(spec, data) == chunks
    assert shards.assemble(spec, dict(reversed(chunks.items()))) == data


def _write_sharded(path: Path, volume: np.ndarray, chunk: tuple, shard_size: int) -> dict:
    """Writes a one-scale sharded uint8 dataset of ``volume`` (X, Y, Z) with gzip chunks."""
    size = volume.shape
    grid = shards.grid_shape(size, chunk)
    spec = shards.choose_spec(grid, int(np.prod(chunk)), shard_size, "gzip")
    scale = {
        "key": "s0",
        "size": list(size),
        "chunk_sizes": [list(chunk)],
        "resolution": [1, 1, 1],
        "voxel_offset": [0, 0, 0],
        "encoding": "raw",
        "sharding": spec.to_dict(),
    }
    info = {"type": "image", "data_type": "uint8", "num_channels": 1, "scales": [scale]}
    (path / "s0").mkdir(parents=True)
    (path / "info").write_text(json.dumps(info))
    by_shard: dict[int, dict[int, bytes]] = {}
    for (x, y, z), chunk_id in shards.chunk_ids(grid):
        block = volume[
            x * chunk[0] : (x + 1) * chunk[0],
            y * chunk[1] : (y + 1) * chunk[1],
            z * chunk[2] : (z + 1) * chunk[2],
        ]
        raw = np.ascontiguousarray(block.transpose(2, 1, 0)).tobytes()  # C-order z, y, x
        by_shard.setdefault(spec.shard_of(chunk_id), {})[chunk_id] = shards.gzip_bytes(raw)
    for shard, chunks in by_shard.items():
        (path / "s0" / spec.shard_name(shard)).write_bytes(shards.assemble(spec, chunks))
    return info


@pytest.mark.parametrize(
    "size, chunk, shard_size",
    [
        ((37, 21, 13), (8, 8, 4), 8 * 8 * 4 * 8),
        ((37, 21, 13), (8, 8, 4), 1 << 30),
        ((5, 70, 3), (4, 4, 4), 128),
    ],
)
def test_tensorstore_reads_hand_assembled_shards_voxel_for_voxel(tmp_path, size, chunk, shard_size):
    ts = pytest.importorskip("tensorstore")
    volume = np.random.default_rng(7).integers(0, 255, size=size, dtype=np.uint8)
    info = _write_sharded(tmp_path, volume, chunk, shard_size)
    if shard_size < 1 << 30:
        assert len(list((tmp_path / "s0").iterdir())) > 1
    store = ts.open(
        {"driver": "neuroglancer_precomputed", "kvstore": f"file://{tmp_path}/", "scale_index": 0}
    ).result()
    assert store.schema.chunk_layout.read_chunk.shape[:3] == tuple(
        info["scales"][0]["chunk_sizes"][0]
    )
    np.testing.assert_array_equal(store.read().result()[..., 0], volume)
