"""Work units: the plan's boxes, and units + finishing step writing the single pass's bytes."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from test_ingest_ngs import chunk_files, write_nifti, write_stack
from test_png_rows import write_png

from hbp_image_tasks import (
    errors,
    ingest,
    ingest_ngs,
    layout,
    memory,
    png_rows,
    pyramid,
    sections,
    shard_writer,
    sources,
    unit_conversion,
    units,
)
from hbp_image_tasks.ingest_ngs import convert
from hbp_image_tasks.parameters import ConversionParameters

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "brain-stack"


def brain_like(shape: tuple, dtype: str = "uint8", seed: int = 0) -> np.ndarray:
    """Returns a smooth blob with faint noise and a zero background, (Z, Y, X)."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grids))
    top = 255 if dtype == "uint8" else 60000
    volume = np.clip(1.1 - radius, 0, 1) * top * 0.8 + rng.integers(0, top // 10, size=shape)
    volume[radius > 0.95] = 0
    return volume.astype(dtype)


def png_limit(info: dict, share: int, jobs: int = 2) -> int:
    """Returns 1/``share`` of the single pass's buffers plus what ``jobs`` PNG row
    readers hold: a limit that cuts a small PNG stack into several tiles."""
    width, height, _ = info["scales"][0]["size"]
    sample = np.dtype(info["data_type"]).itemsize * info["num_channels"]
    reader = png_rows.reader_bytes(0, width * sample, height)  # small: tile-independent
    return units.single_pass_memory(info, jobs) // share + jobs * reader


def write_tiff_stack(directory: Path, volume: np.ndarray, **options) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        tifffile.imwrite(directory / f"s{z:03d}.tif", plane, **options)


# Each input: (writer of the stack into a directory, parameters).
P = ConversionParameters
INPUTS = {
    "png8-odd": (
        lambda d: write_stack(d, brain_like((37, 101, 77))),
        P(chunk_size=16, voxel_size=(10, 10, 10)),
    ),
    "tiff16-tiled": (
        lambda d: write_tiff_stack(d, brain_like((20, 70, 90), "uint16"), tile=(32, 32)),
        P(chunk_size=16, voxel_size=(10, 10, 10)),
    ),
    "rgb-png": (
        lambda d: write_stack(d, brain_like((18, 40, 52, 3))),
        P(chunk_size=8, voxel_size=(10, 10, 10)),
    ),
    "anisotropic-tiff8-strips": (
        lambda d: write_tiff_stack(d, brain_like((21, 66, 130)), rowsperstrip=5),
        P(chunk_size=16, voxel_size=(10, 10, 40)),
    ),
    "thin-sections": (
        lambda d: write_stack(d, brain_like((40, 50, 33))),
        P(chunk_size=8, voxel_size=(40, 40, 10)),
    ),
    "segmentation": (
        lambda d: write_nifti(
            d / "labels.nii", (brain_like((30, 45, 28)) // 40).astype("uint32").T
        ),
        P(type="segmentation", chunk_size=8, voxel_size=(10, 10, 10)),
    ),
    "sharded": (
        lambda d: write_stack(d, brain_like((40, 50, 70))),
        P(chunk_size=8, voxel_size=(10, 10, 10), sharding=True, shard_size=8 << 10),
    ),
    "jpeg": (
        lambda d: write_stack(d, brain_like((24, 48, 40))),
        P(encoding="jpeg", chunk_size=16, voxel_size=(10, 10, 10)),
    ),
}


def _source(directory: Path) -> Path:
    volume = directory / "labels.nii"
    return volume if volume.exists() else directory


@pytest.fixture(scope="module")
def single_pass(tmp_path_factory):
    """Returns name -> (source, parameters, files of its single-pass conversion)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            base = tmp_path_factory.mktemp(name)
            write, params = INPUTS[name]
            (base / "in").mkdir()
            write(base / "in")
            convert(_source(base / "in"), base / "out", params, jobs=2, show_progress=False)
            cache[name] = (_source(base / "in"), params, chunk_files(base / "out"))
        return cache[name]

    return get


def _run(
    plan: units.Plan,
    source: Path,
    params: ConversionParameters,
    out: Path,
    runner=unit_conversion.run_plan,
) -> dict:
    """Runs ``plan`` (with ``runner``) and the same writers as convert, returns the
    files written."""
    input_source = sources.open_source(source, None, params.channels)
    info = json.loads((out / "info").read_text())
    accessor = shard_writer.open_accessor(
        out,
        info,
        shard_writer.add_sharding(info, params),
        compresslevel=params.compression_level,
        wide_samples=params.effective_encoding == "raw" and info["data_type"] != "uint8",
    )
    transform = ingest_ngs._value_transform(input_source.dtype, info["data_type"], params)
    with ThreadPoolExecutor(2) as executor:
        context = unit_conversion.Context(
            info,
            input_source,
            transform,
            accessor,
            pyramid.make_downscaler(params.effective_downscaling_method, info),
            executor,
            encoder_options={"jpeg_quality": params.jpeg_quality},
        )
        runner(plan, context, out)
    shutil.rmtree(out / unit_conversion.UNITS_DIR)
    shard_writer.check_finished(out)
    return chunk_files(out)


@pytest.mark.parametrize("name", sorted(INPUTS))
def test_units_and_finishing_write_the_single_pass_files_byte_for_byte(tmp_path, single_pass, name):
    source, params, expected = single_pass(name)
    assert any(path.endswith(".shard") for path in expected) == (params.sharding is True)
    info = json.loads(expected["info"])
    width, height, depth = info["scales"][0]["size"]
    for top in range(len(info["scales"])):
        grid = units.alignment(info, top)
        # The smallest tiles and z ranges the grid allows: most unit edges inside.
        plan = units.make_plan(info, top, tile=grid[:2], sections_per_unit=1)
        out = tmp_path / f"top{top}"
        out.mkdir()
        (out / "info").write_bytes(expected["info"])
        assert _run(plan, source, params, out) == expected, f"units building scales 0-{top}"


@pytest.mark.parametrize("over_budget", [False, True], ids=["aligned", "fallback"])
def test_units_on_shard_boxes_assemble_every_scale0_shard_themselves(
    tmp_path, single_pass, caplog, over_budget
):
    source, params, expected = single_pass("sharded")
    info = json.loads(expected["info"])
    box = units.shard_alignment(info)
    key = info["scales"][0]["key"]
    shard_count = sum(1 for path in expected if path.startswith(f"{key}/"))
    assert shard_count > 4, "scale 0 has several shard boxes"
    # The budget of one unit on a single shard box's x-y tile, or a byte less.
    need = units.make_plan(info, 1, box[:2], jobs=2, extra_alignment=box).unit_memory
    with caplog.at_level("INFO", logger="hbp_image_tasks.units"):
        plan = units.plan_units(info, need - over_budget, jobs=2)
    on_boxes = all(
        start % size == 0 and (stop % size == 0 or stop == extent)
        for unit in plan.units
        for start, stop, size, extent in zip(
            unit.box.start, unit.box.stop, box, info["scales"][0]["size"]
        )
    )
    assert len(plan.units) > 4 and plan.finishing_scales
    assert on_boxes == (not over_budget)
    assert ("units share scale-0 shards" in caplog.text) == over_budget
    # Scale-0 shards left unassembled after each unit (run in one process here, a
    # shard that units share is assembled by whichever writes its last chunk).
    pending = []

    def units_then_finishing(plan, context, out):
        for unit in plan.units:
            unit_conversion.run_unit(unit, context, out)
            pending.append(
                sum(1 for p in layout.unassembled_shards(out) if p.parent.parent.name == key)
            )
        if not over_budget:  # none left for the finishing step
            assert len(list((out / key).glob("*.shard"))) == shard_count
        unit_conversion.run_finishing(plan, context, out)

    (tmp_path / "info").write_bytes(expected["info"])
    assert _run(plan, source, params, tmp_path, units_then_finishing) == expected
    assert (max(pending) == 0) == (not over_budget)


def test_bundled_example_in_tiled_units_equals_its_single_pass(tmp_path):
    params = ConversionParameters(chunk_size=32, voxel_size=(1, 1, 1), voxel_unit="mm")
    convert(EXAMPLE, tmp_path / "one", params, jobs=2, show_progress=False)
    expected = chunk_files(tmp_path / "one")
    info = json.loads(expected["info"])
    plan = units.make_plan(info, 1, tile=(64, 64), sections_per_unit=1)
    assert len(plan.units) > 4 and plan.finishing_scales
    out = tmp_path / "units"
    out.mkdir()
    (out / "info").write_bytes(expected["info"])
    assert _run(plan, EXAMPLE, params, out) == expected


def _infos() -> list:
    shapes = [((300, 200, 70), (100, 100, 400)), ((77, 101, 37), (10, 10, 10))]
    shapes += [((129, 65, 200), (40, 40, 10)), ((1000, 900, 9), (1, 1, 1))]
    return [
        pyramid.build_info("uint8", 1, size, voxel, (5, 0, 3), "image", "raw", 16, None)
        for size, voxel in shapes
    ]


@pytest.mark.parametrize("info", _infos(), ids=lambda i: "x".join(map(str, i["scales"][0]["size"])))
def test_plan_boxes_tile_the_volume_on_the_chunk_grid_of_every_unit_scale(info):
    size = info["scales"][0]["size"]
    cumulative = units.cumulative_factors(info)
    seen = {}  # unit id -> (box, scales): a rerun under another plan never takes a stranger's
    for top, tile in itertools.product(range(len(info["scales"])), [(1, 1), (40, 90), size[:2]]):
        plan = units.make_plan(info, top, tile=tile, sections_per_unit=20)
        covered = np.zeros(size[::-1], np.uint8)
        for unit in plan.units:
            (x0, y0, z0), (x1, y1, z1) = unit.box.start, unit.box.stop
            covered[z0:z1, y0:y1, x0:x1] += 1
            for scale in range(top + 1):
                chunk = info["scales"][scale]["chunk_sizes"][0]
                for axis in range(3):
                    step = chunk[axis] * cumulative[scale][axis]
                    assert unit.box.start[axis] % step == 0
                    assert unit.box.stop[axis] % step == 0 or unit.box.stop[axis] == size[axis]
        assert covered.min() == covered.max() == 1
        assert len({unit.id for unit in plan.units}) == len(plan.units)
        for unit in plan.units:
            assert seen.setdefault(unit.id, (unit.box, top)) == (unit.box, top)
        assert units.Plan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_plan_units_builds_the_fewest_scales_whose_finishing_step_fits():
    info = pyramid.build_info(
        "uint8", 1, (4096, 4096, 256), (1, 1, 1), (0, 0, 0), "image", "raw", 64, None
    )
    whole = units.single_pass_memory(info, jobs=2)
    assert units.plan_units(info, whole, jobs=2).units[0].box.shape[:2] == (4096, 4096)
    plan = units.plan_units(info, whole // 8, jobs=2)
    assert plan.unit_memory <= whole // 8 and plan.finishing_memory <= whole // 8
    assert plan.top_scale == 1 and len(plan.units) > 1
    assert all(unit.box.shape[2] == 128 for unit in plan.units)
    smaller = units.plan_units(info, whole // 64, jobs=2)
    assert smaller.top_scale == 2 and smaller.unit_memory <= whole // 64


@pytest.mark.parametrize(
    "tasks, sections_per_unit, top, depth",
    [
        (None, None, 0, 64),  # a single process: the fewest scales
        (1, None, 2, 256),  # two units of 256 sections build scales 0-2
        (2, None, 1, 128),  # two units a task
        (4, None, 0, 64),
        (16, None, 0, 64),  # more tasks than units of any depth: one grid step
        (2, 64, 0, 64),  # the user's depth wins
        (2, 128, 1, 128),
        (2, 200, 2, 256),  # rounded up to the grid: deep enough for scale 2
    ],
)
def test_array_units_build_as_many_scales_as_their_count_allows(
    tasks, sections_per_unit, top, depth
):
    info = pyramid.build_info(
        "uint8", 1, (2048, 2048, 512), (1, 1, 1), (0, 0, 0), "image", "raw", 64, None
    )
    plan = units.plan_units(info, None, 1, sections_per_unit=sections_per_unit, tasks=tasks)
    assert plan.top_scale == top
    assert {unit.box.shape for unit in plan.units} == {(2048, 2048, depth)}
    assert plan.finishing_scales == range(top + 1, 5)


def test_deeper_array_units_keep_the_tiles_the_memory_limit_allows():
    info = pyramid.build_info(
        "uint8", 1, (4096, 4096, 1024), (1, 1, 1), (0, 0, 0), "image", "raw", 64, None
    )
    limit = units.single_pass_memory(info, jobs=2) // 8
    fewest = units.plan_units(info, limit, jobs=2)
    deeper = units.plan_units(info, limit, jobs=2, tasks=2)
    assert deeper.top_scale > fewest.top_scale
    assert deeper.tile == fewest.tile and deeper.unit_memory <= limit
    assert len(deeper.units) >= 2 * 2


def test_memory_limit_below_the_smallest_unit_is_one_line_before_any_output(tmp_path, capsys):
    # 16-bit samples: above the 8-bit floor of one chunk, below this input's smallest unit.
    write_tiff_stack(tmp_path / "in", brain_like((8, 64, 64), "uint16"))
    code = ingest_ngs.main(
        [str(tmp_path / "in"), "-d", str(tmp_path / "out"), "--memory-limit", "1.2M", "-q"]
        + ["--parameters", '{"voxel_size": [1, 1, 1]}', "--jobs", "1"]
    )
    error = capsys.readouterr().err.strip()
    assert code == errors.EXIT_USAGE
    assert "--memory-limit 1.2 MiB is below what the smallest unit" in error
    assert "\n" not in error
    assert not (tmp_path / "out").exists()


def test_memory_limit_below_one_chunk_is_refused_by_ingest_before_fetching(tmp_path, capsys):
    code = ingest.main(
        ["--source", "http://127.0.0.1:9/never.nii", "--download-dir", str(tmp_path / "in")]
        + ["--results-dir", str(tmp_path / "out"), "--no-upload", "--memory-limit", "512K"]
        + ["--jobs", "2", "-q"]
    )
    error = capsys.readouterr().err.strip()
    assert code == errors.EXIT_USAGE
    assert "--memory-limit 512.0 KiB is below one chunk of 64^3 voxels" in error
    assert "\n" not in error
    assert not (tmp_path / "in").exists() and not (tmp_path / "out").exists()


def test_interrupted_unit_conversion_resumes_skipping_finished_units(tmp_path, monkeypatch):
    write_stack(tmp_path / "in", brain_like((40, 96, 96)))
    params = ConversionParameters(chunk_size=16, voxel_size=(10, 10, 10))
    convert(tmp_path / "in", tmp_path / "one", params, jobs=2, show_progress=False)
    info = json.loads((tmp_path / "one" / "info").read_text())
    limit = png_limit(info, 3)
    assert len(units.plan_units(info, limit, jobs=2, bands=True).units) > 4
    ran = []
    real_run_unit = unit_conversion.run_unit

    def counting(unit, context, destination):
        ran.append(unit.id)
        return real_run_unit(unit, context, destination)

    monkeypatch.setattr(unit_conversion, "run_unit", counting)
    with pytest.raises(errors.Interrupted):
        convert(
            tmp_path / "in",
            tmp_path / "units",
            params,
            jobs=2,
            show_progress=False,
            should_stop=lambda: len(ran) > 3,
            memory_limit=limit,
        )
    assert not ingest_ngs.is_complete(tmp_path / "units")
    first = list(ran)
    ran.clear()
    result = convert(
        tmp_path / "in", tmp_path / "units", params, jobs=2, show_progress=False, memory_limit=limit
    )
    assert result.resumed and len(first) == 4 and first[-1] in ran and not set(first[:3]) & set(ran)
    assert chunk_files(tmp_path / "units") == chunk_files(tmp_path / "one")
    assert not (tmp_path / "units" / unit_conversion.UNITS_DIR).exists()


@pytest.mark.parametrize(
    "text, expected",
    [
        ("512M", 512 << 20),
        ("4G", 4 << 30),
        ("1.5g", 3 << 29),
        ("2048", 2048 << 20),
        ("64KiB", 64 << 10),
    ],
)
def test_memory_limit_sizes_are_binary_and_a_bare_number_is_mib(text, expected):
    assert memory.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "0", "-1G", "4X", "G", "1.2.3M"])
def test_bad_memory_limit_is_a_one_line_usage_error_naming_the_option(text):
    with pytest.raises(errors.UsageError, match=r"^--memory-limit .*512M, 4G or 1.5G$"):
        memory.parse_size(text)


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({"SLURM_MEM_PER_NODE": "8192"}, (8 << 30) - memory.BASE_BYTES),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_PER_TASK": "4"}, (4 << 30) - memory.BASE_BYTES),
        ({"SLURM_MEM_PER_CPU": "1024", "SLURM_CPUS_ON_NODE": "2"}, (2 << 30) - memory.BASE_BYTES),
        ({}, None),
    ],
)
def test_default_memory_limit_is_the_slurm_allocation_else_half_the_machine(environ, expected):
    if expected is None:
        expected = memory.physical_memory() // 2
    assert memory.default_memory_limit(environ) == expected


TIFF_LAYOUTS = {
    "tiled-8": ("uint8", 1, {"tile": (32, 48)}),
    "tiled-16-deflate": ("uint16", 1, {"tile": (16, 16), "compression": "zlib"}),
    "strips-rgb-lzw": ("uint8", 3, {"rowsperstrip": 7, "compression": "lzw"}),
    "strips-16-predictor": (
        "uint16",
        1,
        {"rowsperstrip": 3, "compression": "zlib", "predictor": True},
    ),
    "big-endian-16": ("uint16", 1, {"byteorder": ">", "rowsperstrip": 10}),
}


@pytest.mark.parametrize("layout", sorted(TIFF_LAYOUTS))
def test_tiff_region_reads_give_the_whole_sections_samples_cropped(tmp_path, monkeypatch, layout):
    dtype, channels, options = TIFF_LAYOUTS[layout]
    shape = (1, 83, 101) + ((3,) if channels == 3 else ())
    plane = brain_like(shape, dtype)[0]
    path = tmp_path / "s.tif"
    tifffile.imwrite(path, plane, photometric="rgb" if channels == 3 else "minisblack", **options)
    expected = sections.probe_section(path)
    whole = sections.read_section(path, expected)
    # Only the segments the region touches are decoded, never the whole section.
    monkeypatch.setattr(sections, "read_section", None)
    for region in [(0, 101, 0, 83), (5, 40, 17, 18), (33, 101, 50, 83), (64, 65, 0, 83)]:
        x0, x1, y0, y1 = region
        part = sections.read_section_region(path, expected, region)
        assert part.dtype == whole.dtype and np.array_equal(part, whole[y0:y1, x0:x1])


def test_plain_tiff_and_non_interlaced_png_sections_are_read_by_region_and_planned_so(tmp_path):
    plane = brain_like((1, 64, 64))[0]
    tifffile.imwrite(tmp_path / "tiled.tif", plane, tile=(16, 16))
    write_stack(tmp_path / "png", plane[np.newaxis])
    write_stack(tmp_path / "jpeg", plane[np.newaxis], ".jpg")
    write_png(tmp_path / "interlaced.png", plane, interlace=True)
    by_region = [sources.StackSource([tmp_path / "tiled.tif"])]
    by_region.append(sources.StackSource(sorted((tmp_path / "png").iterdir())))
    whole = [sources.StackSource([tmp_path / "interlaced.png"])]
    whole.append(sources.StackSource(sorted((tmp_path / "jpeg").iterdir())))
    assert [s.reads_regions for s in by_region + whole] == [True, True, False, False]
    assert [s.reads_rows for s in by_region + whole] == [False, True, False, False]
    info = pyramid.build_info(
        "uint8", 1, (8192, 8192, 64), (1, 1, 1), (0, 0, 0), "image", "raw", 64, None
    )
    limit = 1 << 30
    by_region = units.plan_units(info, limit, jobs=4)
    whole = units.plan_units(info, limit, jobs=4, whole_sections=True)
    # Four workers decoding whole 64 MiB sections leave less room for the tiles.
    assert whole.unit_memory <= limit and by_region.unit_memory <= limit
    assert len(whole.units) > len(by_region.units)


def test_sections_read_by_rows_get_full_width_bands_where_one_as_large_fits():
    info = pyramid.build_info(
        "uint8", 1, (8192, 8192, 64), (1, 1, 1), (0, 0, 0), "image", "raw", 64, None
    )
    limit = 512 << 20
    tiles = units.plan_units(info, limit, jobs=2)
    bands = units.plan_units(info, limit, jobs=2, bands=True)
    assert tiles.tile[0] < 8192 and bands.tile[0] == 8192
    assert len(bands.units) == len(tiles.units) and bands.unit_memory <= limit
    # Narrow: no full-width band as large as the tile fits, so the tile stays.
    small = pyramid.build_info(
        "uint8", 1, (170, 150, 12), (1, 1, 1), (0, 0, 0), "image", "raw", 16, None
    )
    limit = png_limit(small, 4)
    narrow = units.plan_units(small, limit, jobs=2, bands=True)
    assert narrow.tile[0] < 170 and narrow.unit_memory <= limit
    band_rows = units.alignment(small, narrow.top_scale)[1]
    band = units._unit_memory(small, narrow.top_scale, (170, band_rows), 2, False, True)
    assert band > limit or 170 * band_rows < narrow.tile[0] * narrow.tile[1]


@pytest.mark.parametrize(
    "shape, dtype, share, cut",
    [
        ((12, 150, 170), "uint8", 4, "x-y tiles"),
        ((12, 150, 170), "uint16", 4, "x-y tiles"),
        ((12, 100, 120, 3), "uint8", 4, "x-y tiles"),
        ((16, 256, 512), "uint8", 2, "bands"),  # a band as large as a tile fits
    ],
    ids=["grey8", "grey16", "rgb", "grey8-bands"],
)
def test_png_stack_within_a_memory_limit_reads_rows_and_writes_the_single_pass_bytes(
    tmp_path, monkeypatch, shape, dtype, share, cut
):
    write_stack(tmp_path / "in", brain_like(shape, dtype))
    argv = [str(tmp_path / "in"), "--parameters", '{"chunk_size": 16, "voxel_size": [1, 1, 1]}']
    argv += ["--jobs", "2", "-q"]
    assert ingest_ngs.main(argv + ["-d", str(tmp_path / "one")]) == 0
    info = json.loads((tmp_path / "one" / "info").read_text())
    limit = png_limit(info, share)
    plans, plan_units = [], units.plan_units

    def recorded(*args, **kwargs):
        plans.append(plan_units(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(units, "plan_units", recorded)
    monkeypatch.setattr(sections, "read_section", None)  # no section decoded whole
    limited = ["-d", str(tmp_path / "tiles"), "--memory-limit", f"{limit >> 10}K"]
    assert ingest_ngs.main(argv + limited) == 0
    assert chunk_files(tmp_path / "tiles") == chunk_files(tmp_path / "one")
    boxes = [(unit.box.start, unit.box.stop) for unit in plans[0].units]
    full_width = all(start[0] == 0 and stop[0] == shape[2] for start, stop in boxes)
    assert len({start[1] for start, _ in boxes}) > 1 and full_width == (cut == "bands")


# Runs a command; prints its peak RSS in MiB (RUSAGE_CHILDREN: that command's alone).
PEAK_RSS = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)"
)
CONVERSION_IMPORTS = (
    "import hbp_image_tasks.ingest_ngs, hbp_image_tasks.unit_conversion, imagecodecs, "
    "tifffile, PIL.Image, neuroglancer_scripts.chunk_encoding, isal, zlib_ng"
)


def peak_rss_mib(command: list) -> float:
    done = subprocess.run(
        [sys.executable, "-c", PEAK_RSS, *command], check=True, capture_output=True, text=True
    )
    return float(done.stdout)


def test_noisy_png_stack_in_many_units_stays_within_the_memory_limit(tmp_path):
    # Sections with texture everywhere (no blank background): reading each unit's
    # rows inflates most of every section, in buffers of many sizes from two
    # threads. Freed, they must go back to the system: the peak stays within the
    # limit plus the interpreter's base (it was 15-17 MiB above the base when they
    # stayed in the process, and grew with the units' depth in the sections).
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 2048).astype(np.uint8)
    write_stack(tmp_path / "in", rng.integers(0, 8, (8, 4096, 2048), dtype=np.uint8) + ramp)
    base = peak_rss_mib([sys.executable, "-c", CONVERSION_IMPORTS])
    command = [str(Path(sys.executable).parent / "ingest_ngs"), str(tmp_path / "in")]
    command += ["-d", str(tmp_path / "out"), "--parameters", '{"voxel_size": [1, 1, 1]}']
    peak = peak_rss_mib(command + ["--jobs", "2", "--memory-limit", "12M", "-q"])
    assert ingest_ngs.is_complete(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["scales"][0]["size"] == [2048, 4096, 8]
    assert peak <= base + 12, f"peak RSS {peak:.1f} MiB, base {base:.1f} MiB + 12 MiB"


def test_sections_above_pillows_decompression_bomb_limit_are_read(tmp_path, monkeypatch):
    from PIL import Image

    # Pillow refuses twice its limit (178 Mpx by default; 16384 x 16384 is 268 Mpx).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    volume = brain_like((2, 64, 64))
    write_tiff_stack(tmp_path / "tiff", volume, tile=(16, 16))
    write_stack(tmp_path / "png", volume)
    for stack in ("tiff", "png"):
        paths = sorted((tmp_path / stack).iterdir())
        source = sources.StackSource(paths)
        out = np.empty((1, 2, 20, 30), np.uint8)
        with ThreadPoolExecutor(2) as executor:
            source.read(0, 2, out, None, executor, region=(10, 40, 5, 25))
        assert np.array_equal(out[0], volume[:, 5:25, 10:40])


@pytest.mark.parametrize("text", [None, "", "{", '{"id": "x"}', '{"chunks": "many", "bytes": 1}'])
def test_a_missing_or_unreadable_unit_record_means_the_unit_runs_again(tmp_path, text):
    unit = units.Unit(units.Box((0, 0, 0), (64, 64, 64)), 0, False)
    if text is not None:
        path = layout.unit_record_path(tmp_path, unit.id)
        path.parent.mkdir(parents=True)
        path.write_text(text)
    assert unit_conversion.read_done(tmp_path, unit) is None
    layout.write_unit_record(tmp_path, unit.id, 3, 1000)
    assert unit_conversion.read_done(tmp_path, unit) == unit_conversion.Counts(3, 1000)


def test_ingest_within_a_memory_limit_publishes_the_single_pass_objects(
    make_container, unique_container, local_swift, swift_settings_file, monkeypatch, tmp_path
):
    from test_ingest import ingest_argv, smooth_stack, stack_objects

    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    volume = smooth_stack(12, 200, 240)
    source = make_container(stack_objects(volume))
    info = pyramid.build_info(
        "uint8", 1, (240, 200, 12), (2e4, 2e4, 4e4), (0, 0, 0), "image", "raw", 16, None
    )
    limit = png_limit(info, 3)
    assert len(units.plan_units(info, limit, jobs=2, bands=True).units) > 4
    listings = []
    for name, extra in (("one", []), ("tiles", ["--memory-limit", f"{limit >> 10}K"])):
        container = unique_container(name)
        assert ingest.main(ingest_argv(source.url, tmp_path / name, container, *extra)) == 0
        _, objects = local_swift.connection().get_container(container, full_listing=True)
        listings.append({entry["name"]: entry["hash"] for entry in objects})
    assert listings[0] == listings[1] and len(listings[0]) > 20
