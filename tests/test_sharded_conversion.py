"""Sharded conversions: read back by tensorstore, equal to the unsharded conversion,
resumed byte for byte after a kill, refused up front when the sharding cannot work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from precomputed_reference import read_scale
from test_ingest_ngs import chunk_files, smooth_volume, write_stack

from hbp_image_tasks import errors, faults, shard_writer, shards
from hbp_image_tasks.ingest_ngs import convert, is_complete
from hbp_image_tasks.parameters import ConversionParameters

ts = pytest.importorskip("tensorstore")

SMALL = ConversionParameters(chunk_size=8, voxel_size=(10, 10, 10), sharding=True)
KINDS = {
    "uint8": ({}, "uint8", 1),
    "uint16": ({}, "uint16", 1),
    "rgb": ({}, "uint8", 3),
    "segmentation": ({"type": "segmentation", "data_type": "uint32"}, "uint16", 1),
    "jpeg": ({"encoding": "jpeg"}, "uint8", 1),
}


def tensorstore_scale(destination: Path, index: int) -> np.ndarray:
    """Returns one scale read by tensorstore, as (C, Z, Y, X) like precomputed_reference."""
    store = ts.open(
        {
            "driver": "neuroglancer_precomputed",
            "kvstore": f"file://{destination}/",
            "scale_index": index,
        }
    ).result()
    return np.asarray(store.read().result()).transpose(3, 2, 1, 0)


def write_kind(directory: Path, kind: str, shape=(21, 30, 37)) -> np.ndarray:
    _, dtype, channels = KINDS[kind]
    volume = smooth_volume(shape + ((3,) if channels == 3 else ()), dtype, seed=5)
    if kind == "segmentation":
        volume //= 6000  # a few labels
    write_stack(directory, volume, ".tif" if dtype == "uint16" else ".png")
    return volume


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tensorstore_reads_every_sharded_scale_as_the_unsharded_conversion(tmp_path, kind):
    write_kind(tmp_path / "in", kind)
    extra = KINDS[kind][0]
    # 16 or 32 chunks per shard: several shards per scale, one 0.shard for the small ones.
    sharded = SMALL.replace(shard_size=8 * 8**3 * 4 * KINDS[kind][2], **extra)
    convert(tmp_path / "in", tmp_path / "sharded", sharded, jobs=2, show_progress=False)
    unsharded = sharded.replace(sharding=False)
    convert(tmp_path / "in", tmp_path / "plain", unsharded, jobs=2, show_progress=False)
    info = json.loads((tmp_path / "sharded" / "info").read_text())
    assert len(info["scales"]) >= 3
    for index, scale in enumerate(info["scales"]):
        names = sorted(p.name for p in (tmp_path / "sharded" / scale["key"]).iterdir())
        assert names and all(name.endswith(".shard") for name in names), names
        spec = shards.ShardSpec.from_dict(scale["sharding"])
        assert spec.data_encoding == ("raw" if kind == "jpeg" else "gzip")
        np.testing.assert_array_equal(
            tensorstore_scale(tmp_path / "sharded", index),
            read_scale(tmp_path / "plain", index),
            err_msg=f"scale {index}",
        )
    assert len(os.listdir(tmp_path / "sharded" / info["scales"][0]["key"])) > 1
    assert os.listdir(tmp_path / "sharded" / info["scales"][-1]["key"]) == ["0.shard"]


def test_chunks_of_a_sharded_scale_are_the_unsharded_chunk_files(tmp_path):
    write_kind(tmp_path / "in", "uint16")
    convert(tmp_path / "in", tmp_path / "sharded", SMALL.replace(shard_size=4096), jobs=2)
    convert(tmp_path / "in", tmp_path / "plain", SMALL.replace(sharding=False), jobs=2)
    info = json.loads((tmp_path / "sharded" / "info").read_text())
    scale = info["scales"][0]
    spec = shards.ShardSpec.from_dict(scale["sharding"])
    grid = shards.grid_shape(scale["size"], scale["chunk_sizes"][0])
    stored = {}
    for path in (tmp_path / "sharded" / scale["key"]).iterdir():
        stored.update(shards.read_shard(spec, path.read_bytes()))
    plain = tmp_path / "plain" / scale["key"]
    for (x, y, z), chunk_id in shards.chunk_ids(grid):
        bounds = [(p * 8, min(p * 8 + 8, s)) for p, s in zip((x, y, z), scale["size"])]
        name = "_".join(f"{a}-{b}" for a, b in bounds) + ".gz"
        assert stored[chunk_id] == (plain / name).read_bytes(), name


@pytest.mark.parametrize("sharding, sharded", [("auto", False), (True, True), (False, False)])
def test_auto_keeps_one_file_per_chunk_for_small_datasets(tmp_path, sharding, sharded):
    write_kind(tmp_path / "in", "uint8", shape=(9, 20, 20))
    params = SMALL.replace(sharding=sharding)
    convert(tmp_path / "in", tmp_path / "out", params, jobs=1, show_progress=False)
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert all(("sharding" in scale) == sharded for scale in info["scales"])
    files = [p.name for p in (tmp_path / "out" / info["scales"][0]["key"]).iterdir()]
    assert all(name.endswith(".shard") == sharded for name in files)


@pytest.mark.parametrize(
    "grid, sharded", [((21, 21, 22), False), ((22, 22, 21), True), ((103, 90, 2), True)]
)
def test_auto_shards_above_ten_thousand_scale_0_chunks(grid, sharded):
    scale = {"key": "s0", "size": [g * 64 for g in grid], "chunk_sizes": [[64, 64, 64]]}
    info = {"data_type": "uint8", "num_channels": 1, "scales": [scale]}
    specs = shards.plan_sharding(info, "auto", shards.DEFAULT_SHARD_SIZE, "gzip")
    assert (specs[0] is not None) == sharded
    assert int(np.prod(grid)) > shards.AUTO_MIN_CHUNKS - 1 if sharded else True


@pytest.mark.parametrize(
    "extra, words",
    [
        ({"shard_size": 511}, ["'shard_size'", "511", "below one chunk", "512 bytes"]),
        (
            {"sharding": {"preshift_bits": 1, "minishard_bits": 1, "shard_bits": 1}},
            ["'sharding'", "cannot address", "chunk grid"],
        ),
    ],
)
def test_sharding_that_cannot_work_is_refused_before_anything_is_written(
    tmp_path, capsys, extra, words
):
    from hbp_image_tasks import ingest_ngs

    write_kind(tmp_path / "in", "uint8", shape=(9, 40, 40))
    params = json.dumps({"chunk_size": 8, "voxel_size": [1, 1, 1], **extra})
    code = ingest_ngs.main(
        [str(tmp_path / "in"), "-d", str(tmp_path / "out"), "--parameters", params]
    )
    assert code == errors.EXIT_USAGE
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and all(word in message[0] for word in words), message
    assert not (tmp_path / "out" / "info").exists()


def test_missing_pieces_on_resume_rebuild_their_shard(tmp_path, caplog):
    write_kind(tmp_path / "in", "uint8", shape=(40, 24, 24))
    params = SMALL.replace(shard_size=8**3 * 64)  # boxes of 4x4x4 chunks
    convert(tmp_path / "in", tmp_path / "whole", params, jobs=2, show_progress=False)
    calls = []
    with pytest.raises(errors.Interrupted):
        convert(
            tmp_path / "in",
            tmp_path / "resumed",
            params,
            jobs=2,
            show_progress=False,
            should_stop=lambda: calls.append(1) or len(calls) >= 3,
        )
    pieces = shard_writer.unfinished_shards(tmp_path / "resumed")
    assert pieces, "slab 3 leaves the shards of slabs 3-4 unfinished"
    victim = sorted(pieces[0].iterdir())[0]
    victim.unlink()
    result = convert(tmp_path / "in", tmp_path / "resumed", params, jobs=2, show_progress=False)
    assert "chunks are missing" in caplog.text and not result.resumed
    assert chunk_files(tmp_path / "resumed") == chunk_files(tmp_path / "whole")
    assert not shard_writer.unfinished_shards(tmp_path / "resumed")


BIN = Path(sys.executable).parent


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_killed_sharded_conversion_resumes_byte_identical_without_losing_a_shard(tmp_path, how):
    write_kind(tmp_path / "in", "uint8", shape=(192, 64, 64))
    params = SMALL.replace(shard_size=8**3 * 64).to_json(indent=None)
    argv = [str(BIN / "ingest_ngs"), str(tmp_path / "in"), "--parameters", params, "--jobs", "2"]
    subprocess.run(argv + ["-d", str(tmp_path / "whole")], check=True, capture_output=True)
    scale0 = tmp_path / "killed" / "10nm"
    # 24 slabs of 8 sections; the first layer of shard boxes (32 sections deep) is
    # complete after slab 4, the others are not after slab 6.
    env = {**os.environ, faults.ENVIRONMENT_VARIABLE: f"slab-6:{how.name}"}
    killed = subprocess.run(
        argv + ["-d", str(tmp_path / "killed"), "--no-progress"], env=env, timeout=120
    )
    assert killed.returncode in (-signal.SIGKILL, 143), killed.returncode
    assert not is_complete(tmp_path / "killed")
    finished = {p.name: p.read_bytes() for p in scale0.glob("*.shard")}
    assert finished and shard_writer.unfinished_shards(tmp_path / "killed")
    subprocess.run(argv + ["-d", str(tmp_path / "killed")], check=True, capture_output=True)
    assert chunk_files(tmp_path / "killed") == chunk_files(tmp_path / "whole")
    assert all((scale0 / name).read_bytes() == data for name, data in finished.items())
    assert not shard_writer.unfinished_shards(tmp_path / "killed")


def test_pieces_of_separate_units_are_assembled_into_the_shards_of_one_process(tmp_path):
    import gzip

    write_kind(tmp_path / "in", "uint8", shape=(24, 40, 40))
    params = SMALL.replace(shard_size=8**3 * 8)  # boxes of 2x2x2 chunks: 16 voxels
    convert(tmp_path / "in", tmp_path / "whole", params, jobs=2, show_progress=False)
    info = json.loads((tmp_path / "whole" / "info").read_text())
    scale = info["scales"][0]
    specs = [shards.ShardSpec.from_dict(s["sharding"]) for s in info["scales"]]
    grid = shards.grid_shape(scale["size"], scale["chunk_sizes"][0])
    chunks = {}
    for path in (tmp_path / "whole" / scale["key"]).iterdir():
        chunks.update(shards.read_shard(specs[0], path.read_bytes()))
    split = shards.box_voxels(info, 0)[0]
    assert split == 16
    units = [shard_writer.ShardedFileAccessor(tmp_path / "units", info, specs) for _ in range(3)]
    for chunk_id, data in sorted(chunks.items()):
        x, y, z = (int(p) * 8 for p in shards.morton_positions([chunk_id], grid)[0])
        coords = [(v, min(v + 8, s)) for v, s in zip((x, y, z), scale["size"])]
        # Unit 0 takes the first box column; units 1 and 2 share the others.
        unit = 0 if x < split else 1 + (z // 8) % 2
        block = np.frombuffer(gzip.decompress(data), np.uint8)
        units[unit].store_chunk(block, scale["key"], [v for pair in coords for v in pair])
    by_one_unit = sorted(p.name for p in (tmp_path / "units" / scale["key"]).glob("*.shard"))
    assert by_one_unit and shard_writer.unfinished_shards(tmp_path / "units")
    finisher = shard_writer.ShardedFileAccessor(tmp_path / "units", info, specs)
    assert finisher.assemble_ready() > 0
    assert not shard_writer.unfinished_shards(tmp_path / "units")
    for path in (tmp_path / "whole" / scale["key"]).iterdir():
        assert (tmp_path / "units" / scale["key"] / path.name).read_bytes() == path.read_bytes()


def test_a_piece_of_a_shard_another_process_put_in_place_is_dropped(tmp_path):
    scale = {"key": "s0", "size": [16, 16, 16], "chunk_sizes": [[8, 8, 8]]}
    info = {"data_type": "uint8", "num_channels": 1, "scales": [scale]}
    specs = shards.plan_sharding(info, True, 1 << 20, "gzip")
    corners = [(x, y, z) for z in (0, 8) for y in (0, 8) for x in (0, 8)]

    def store(accessor, corner) -> int:
        block = np.full(8**3, sum(corner), np.uint8)
        return accessor.store_chunk(block, "s0", [v for c in corner for v in (c, c + 8)])

    late = shard_writer.ShardedFileAccessor(tmp_path, info, specs)
    assert store(late, corners[0]) > 0  # its piece directory is made and remembered
    other = shard_writer.ShardedFileAccessor(tmp_path, info, specs)
    for corner in corners:
        store(other, corner)
    shard = (tmp_path / "s0" / "0.shard").read_bytes()
    assert not shard_writer.unfinished_shards(tmp_path)
    assert store(late, corners[1]) == 0 and store(late, corners[2]) == 0
    assert not shard_writer.unfinished_shards(tmp_path)
    assert (tmp_path / "s0" / "0.shard").read_bytes() == shard
    assert len(shards.read_shard(specs[0], shard)) == 8
