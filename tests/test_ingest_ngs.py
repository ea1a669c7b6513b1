"""ingest_ngs: read the converted pyramids back and compare voxels with the input,
with independent numpy downsampling and with the plain neuroglancer-scripts tools."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from precomputed_reference import assert_pyramid, factors_between, read_scale

from hbp_image_tasks import errors, ingest_ngs, layout
from hbp_image_tasks.ingest_ngs import convert, is_complete
from hbp_image_tasks.parameters import DEFAULT_COMPRESSION_LEVEL, ConversionParameters

BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- helpers


def write_stack(
    directory: Path, volume: np.ndarray, suffix: str = ".png", name: str = "section_{:04d}"
) -> list:
    """Writes a (Z, Y, X[, 3]) array as one image per z."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for z, plane in enumerate(volume):
        path = directory / (name.format(z) + suffix)
        Image.fromarray(plane).save(path)
        paths.append(path)
    return paths


def smooth_volume(shape: tuple, dtype: str, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    top = 255 if dtype == "uint8" else 60000
    return rng.integers(0, top, size=shape).astype(dtype)


SMALL = ConversionParameters(chunk_size=16, voxel_size=(10, 10, 20))


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("kind", ["png8", "tiff16", "rgb_png", "png16"])
def test_stack_scale0_equals_input_and_lower_scales_equal_numpy_means(tmp_path, kind):
    shape = (37, 45, 53)  # odd everywhere: edge chunks and padded averages
    if kind == "rgb_png":
        volume = smooth_volume(shape + (3,), "uint8")
        expected = volume.transpose(3, 0, 1, 2)
    else:
        volume = smooth_volume(shape, "uint8" if kind == "png8" else "uint16")
        expected = volume[np.newaxis]
    write_stack(tmp_path / "in", volume, ".tif" if kind == "tiff16" else ".png")
    result = convert(tmp_path / "in", tmp_path / "out", SMALL, jobs=2, show_progress=False)
    info = assert_pyramid(tmp_path / "out", expected, "average")
    assert info["data_type"] == ("uint8" if kind in ("png8", "rgb_png") else "uint16")
    assert info["num_channels"] == (3 if kind == "rgb_png" else 1)
    assert is_complete(tmp_path / "out")
    assert result.input_count == 37
    assert result.chunks == sum(1 for p in (tmp_path / "out").rglob("*.gz"))


@pytest.mark.parametrize("voxel_size", [(10, 10, 10), (10, 40, 10)])
def test_rows_wider_than_one_task_are_written_and_downscaled_exactly(tmp_path, voxel_size):
    from hbp_image_tasks.pyramid import PyramidBuilder

    chunk = 8
    # Two full tasks of tiles and a third with an odd, partial last tile.
    width = chunk * PyramidBuilder.TILES_PER_TASK * 2 + 13
    volume = smooth_volume((19, 21, width), "uint16", seed=11)
    write_stack(tmp_path / "in", volume, ".tif")
    convert(
        tmp_path / "in",
        tmp_path / "out",
        ConversionParameters(chunk_size=chunk, voxel_size=voxel_size),
        jobs=3,
        show_progress=False,
    )
    info = assert_pyramid(tmp_path / "out", volume[np.newaxis], "average")
    assert info["scales"][1]["size"][0] > chunk * PyramidBuilder.TILES_PER_TASK


@pytest.mark.parametrize("depth, kept", [(8, 0), (16, 4)])
def test_scale_1_completing_planes_never_use_its_own_buffer(tmp_path, monkeypatch, depth, kept):
    """Scale 1 is written from the slab's memory whenever it is complete: its own
    buffer only ever holds the planes that wait for the next slab (``kept``)."""
    from hbp_image_tasks import pyramid

    builders = []

    class WatchedBuilder(pyramid.PyramidBuilder):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            for level in self.levels[1:]:
                level.buffer.fill(12345)
            builders.append(self)

    monkeypatch.setattr(pyramid, "PyramidBuilder", WatchedBuilder)
    volume = smooth_volume((depth, 20, 150), "uint16", seed=13)
    write_stack(tmp_path / "in", volume, ".tif")
    convert(
        tmp_path / "in",
        tmp_path / "out",
        ConversionParameters(chunk_size=8, voxel_size=(10, 10, 10)),
        jobs=2,
        show_progress=False,
    )
    assert_pyramid(tmp_path / "out", volume[np.newaxis], "average")
    scale1 = builders[0].levels[1].buffer
    assert (scale1[:, kept:] == 12345).all()
    assert (scale1[:, :kept] != 12345).any() or kept == 0


def write_nifti(path: Path, volume_xyz: np.ndarray, zooms=(0.5, 0.5, 1.0)) -> None:
    import nibabel

    affine = np.diag(list(zooms) + [1.0])
    nibabel.save(nibabel.Nifti1Image(volume_xyz, affine), str(path))


def test_nifti_image_scale0_equals_input_with_header_voxel_size(tmp_path):
    volume = smooth_volume((41, 35, 30), "uint16", seed=3)  # x, y, z
    write_nifti(tmp_path / "brain.nii.gz", volume)
    convert(
        tmp_path / "brain.nii.gz",
        tmp_path / "out",
        ConversionParameters(chunk_size=16),
        jobs=2,
        show_progress=False,
    )
    info = assert_pyramid(tmp_path / "out", volume.T[np.newaxis], "average")
    assert info["scales"][0]["resolution"] == [500000.0, 500000.0, 1000000.0]
    assert info["data_type"] == "uint16"


@pytest.mark.parametrize("method", ["stride", "majority"])
def test_nifti_segmentation_lower_scales_use_the_chosen_method(tmp_path, method):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=(21, 19, 17)).astype(np.uint16)
    write_nifti(tmp_path / "labels.nii", labels, zooms=(1, 1, 1))
    params = ConversionParameters(type="segmentation", chunk_size=8, downscaling_method=method)
    convert(tmp_path / "labels.nii", tmp_path / "out", params, jobs=2, show_progress=False)
    info = assert_pyramid(tmp_path / "out", labels.T[np.newaxis].astype(np.uint32), method)
    assert info["type"] == "segmentation"
    assert info["scales"][0]["encoding"] == "compressed_segmentation"


def test_numpy2_copy_error_of_signed_volumes_is_worked_around(tmp_path):
    from neuroglancer_scripts.data_types import get_chunk_dtype_transformer

    volume = (smooth_volume((20, 18, 9), "uint16") // 2).astype(np.int16)
    # The bug as neuroglancer-scripts 1.2.0 hits it in volume_to_precomputed:
    transformer = get_chunk_dtype_transformer(np.int16, np.uint16, warn=False)
    with pytest.raises(ValueError, match="copy"):
        transformer(volume, preserve_input=False)
    write_nifti(tmp_path / "signed.nii.gz", volume)
    convert(
        tmp_path / "signed.nii.gz",
        tmp_path / "out",
        ConversionParameters(chunk_size=8, data_type="uint16"),
        jobs=2,
        show_progress=False,
    )
    assert_pyramid(tmp_path / "out", volume.T[np.newaxis].astype(np.uint16), "average")


def test_signed_volume_with_negative_values_is_kept_as_float32(tmp_path):
    volume = (smooth_volume((12, 10, 9), "uint16").astype(np.int32) - 30000).astype(np.int16)
    write_nifti(tmp_path / "signed.nii.gz", volume)
    convert(
        tmp_path / "signed.nii.gz",
        tmp_path / "out",
        ConversionParameters(chunk_size=8),
        jobs=1,
        show_progress=False,
    )
    info = json.loads((tmp_path / "out" / "info").read_text())
    assert info["data_type"] == "float32"
    np.testing.assert_array_equal(
        read_scale(tmp_path / "out", 0), volume.T[np.newaxis].astype(np.float32)
    )


def run_plain_sequence(
    stack: Path, out: Path, size: tuple, dtype: str, channels: int, chunk: int
) -> None:
    """Runs generate-scales-info, slices-to-precomputed and compute-scales."""
    fullres = out.parent / "info_fullres.json"
    fullres.write_text(
        json.dumps(
            {
                "type": "image",
                "data_type": dtype,
                "num_channels": channels,
                "scales": [
                    {
                        "encoding": "raw",
                        "size": list(size),
                        "resolution": [10.0, 10.0, 20.0],
                        "voxel_offset": [0, 0, 0],
                    }
                ],
            }
        )
    )
    for command in (
        ["generate-scales-info", "--target-chunk-size", str(chunk), str(fullres), str(out)],
        ["slices-to-precomputed", "--flat", str(stack), str(out)],
        ["compute-scales", "--flat", str(out)],
    ):
        subprocess.run([str(BIN / command[0])] + command[1:], check=True, capture_output=True)


@pytest.mark.parametrize("kind", ["png8", "tiff16"])
def test_decoded_output_is_identical_to_the_plain_neuroglancer_scripts_sequence(tmp_path, kind):
    dtype = "uint8" if kind == "png8" else "uint16"
    volume = smooth_volume((35, 50, 45), dtype, seed=7)
    write_stack(tmp_path / "in", volume, ".png" if kind == "png8" else ".tif")
    run_plain_sequence(tmp_path / "in", tmp_path / "plain", (45, 50, 35), dtype, 1, 16)
    convert(tmp_path / "in", tmp_path / "ours", SMALL, jobs=2, show_progress=False)
    plain = json.loads((tmp_path / "plain" / "info").read_text())
    ours = json.loads((tmp_path / "ours" / "info").read_text())
    assert [s["size"] for s in plain["scales"]] == [s["size"] for s in ours["scales"]]
    assert [s["key"] for s in plain["scales"]] == [s["key"] for s in ours["scales"]]
    for index in range(len(plain["scales"])):
        np.testing.assert_array_equal(
            read_scale(tmp_path / "ours", index),
            read_scale(tmp_path / "plain", index),
            err_msg=f"scale {index}",
        )


# ---------------------------------------------------------------- input traps


def test_natural_order_and_stray_files_are_not_sections(tmp_path):
    stack = tmp_path / "in"
    stack.mkdir()
    for z in range(12):  # slice_2 must come before slice_10
        Image.fromarray(np.full((8, 9), z * 10, np.uint8)).save(stack / f"slice_{z}.png")
    (stack / "README").write_text("not a section")
    (stack / "slice_3.png.bak").write_bytes(b"junk")
    (stack / ".hidden.png").write_bytes(b"junk")
    convert(stack, tmp_path / "out", SMALL, jobs=2, show_progress=False)
    data = read_scale(tmp_path / "out", 0)
    assert data.shape == (1, 12, 8, 9)
    assert list(data[0, :, 0, 0]) == [z * 10 for z in range(12)]


def test_order_file_gives_the_z_order(tmp_path):
    stack = tmp_path / "in"
    stack.mkdir()
    for z in range(5):
        Image.fromarray(np.full((6, 7), z, np.uint8)).save(stack / f"s{z}.png")
    order = tmp_path / "order.txt"
    order.write_text("# reversed\ns4.png\ns3.png\ns2.png\ns1.png\ns0.png\n")
    convert(stack, tmp_path / "out", SMALL, jobs=1, show_progress=False, order_file=order)
    assert list(read_scale(tmp_path / "out", 0)[0, :, 0, 0]) == [4, 3, 2, 1, 0]


def test_fetch_manifest_gives_the_exact_input_set(tmp_path):
    download = tmp_path / "download"
    (download / "data").mkdir(parents=True)
    objects = []
    for z in range(4):
        path = download / "data" / f"pm{3100 + z}o.png"
        Image.fromarray(np.full((5, 6), 50 + z, np.uint8)).save(path)
        objects.append(
            {
                "name": f"stack/{path.name}",
                "path": f"data/{path.name}",
                "bytes": path.stat().st_size,
                "md5": "0" * 32,
            }
        )
    Image.fromarray(np.zeros((5, 6), np.uint8)).save(download / "data" / "extra.png")
    (download / layout.FETCH_MANIFEST_NAME).write_text(
        json.dumps(
            {"version": 1, "source": "https://example.org/c", "filter": None, "objects": objects}
        )
    )
    result = convert(download, tmp_path / "out", SMALL, jobs=2, show_progress=False)
    assert result.input_count == 4
    assert list(read_scale(tmp_path / "out", 0)[0, :, 0, 0]) == [50, 51, 52, 53]


def test_16bit_input_is_not_clipped_into_an_8bit_info(tmp_path, caplog):
    volume = smooth_volume((3, 6, 5), "uint16")
    write_stack(tmp_path / "in", volume, ".tif")
    with pytest.raises(errors.InputError, match="data_type"):
        convert(
            tmp_path / "in",
            tmp_path / "out",
            SMALL.replace(data_type="uint8"),
            jobs=1,
            show_progress=False,
        )
    convert(
        tmp_path / "in",
        tmp_path / "scaled",
        SMALL.replace(input_min=0, input_max=65535),
        jobs=1,
        show_progress=False,
    )
    data = read_scale(tmp_path / "scaled", 0)
    assert data.dtype == np.uint8
    np.testing.assert_array_equal(data[0], np.rint(volume / 65535 * 255).astype(np.uint8))


def corrupt_truncated(stack: Path) -> str:
    path = stack / "section_0002.png"
    path.write_bytes(path.read_bytes()[:200])
    return path.name


def corrupt_size(stack: Path) -> str:
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(stack / "section_0001.png")
    return "section_0001.png"


def corrupt_mode(stack: Path) -> str:
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(stack / "section_0003.png")
    return "section_0003.png"


def corrupt_empty(stack: Path) -> str:
    for path in stack.iterdir():
        path.unlink()
    (stack / "notes.txt").write_text("no images here")
    return "no image sections"


@pytest.mark.parametrize("corrupt", [corrupt_truncated, corrupt_size, corrupt_mode, corrupt_empty])
def test_bad_sections_give_one_line_naming_the_file_and_no_complete_dataset(
    tmp_path, capsys, corrupt
):
    write_stack(tmp_path / "in", smooth_volume((4, 20, 30), "uint8"))
    needle = corrupt(tmp_path / "in")
    code = ingest_ngs.main(
        [str(tmp_path / "in"), "--destination", str(tmp_path / "out"), "--no-progress"]
    )
    assert code == errors.EXIT_USAGE
    lines = [line for line in capsys.readouterr().err.splitlines() if "ERROR" in line]
    assert len(lines) == 1 and needle in lines[0]
    assert not is_complete(tmp_path / "out")


def test_unreadable_volume_gives_one_line_error(tmp_path, capsys):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"\x1f\x8b not really gzip")
    code = ingest_ngs.main([str(bad), "--destination", str(tmp_path / "out")])
    assert code == errors.EXIT_USAGE
    err = capsys.readouterr().err
    assert "broken.nii.gz" in err and "cannot read volume" in err
    assert not is_complete(tmp_path / "out")


def test_foreign_non_empty_destination_is_refused(tmp_path):
    write_stack(tmp_path / "in", smooth_volume((2, 4, 4), "uint8"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.pdf").write_bytes(b"%PDF")
    with pytest.raises(errors.UsageError, match="not empty"):
        convert(tmp_path / "in", tmp_path / "out", SMALL, show_progress=False)
    assert (tmp_path / "out" / "thesis.pdf").exists()


# ---------------------------------------------------------------- resume, options


def chunk_files(destination: Path) -> dict:
    return {
        p.relative_to(destination).as_posix(): p.read_bytes()
        for p in sorted(destination.rglob("*"))
        if p.is_file() and not p.name.startswith(".")
    }


def test_interrupted_conversion_resumes_and_matches_an_uninterrupted_run(tmp_path):
    volume = smooth_volume((70, 33, 40), "uint8", seed=11)
    write_stack(tmp_path / "in", volume)
    params = SMALL.replace(voxel_size=(10, 10, 10))  # 5 slabs, 3 scales
    convert(tmp_path / "in", tmp_path / "whole", params, jobs=2, show_progress=False)

    calls = []

    def stop_after_two_slabs() -> bool:
        calls.append(1)
        return len(calls) >= 2

    with pytest.raises(errors.Interrupted):
        convert(
            tmp_path / "in",
            tmp_path / "resumed",
            params,
            jobs=2,
            show_progress=False,
            should_stop=stop_after_two_slabs,
        )
    assert not is_complete(tmp_path / "resumed")
    key = json.loads((tmp_path / "resumed" / "info").read_text())["scales"][0]["key"]
    stale = tmp_path / "resumed" / key / ".0-16_0-16_0-16.123.456.tmp"
    stale.write_bytes(b"half a chunk from a killed run")
    state = json.loads((tmp_path / "resumed" / layout.CONVERSION_STATE_NAME).read_text())
    assert state["slabs_done"] == 2
    assert state["pending"] and (tmp_path / "resumed" / state["checkpoint"]).is_file()
    result = convert(tmp_path / "in", tmp_path / "resumed", params, jobs=2, show_progress=False)
    assert result.resumed
    assert is_complete(tmp_path / "resumed")
    assert chunk_files(tmp_path / "resumed") == chunk_files(tmp_path / "whole")
    assert not list((tmp_path / "resumed").glob(layout.CHECKPOINT_PREFIX + "*"))
    assert not stale.exists()


def test_rerun_of_a_complete_conversion_does_nothing_and_changed_parameters_restart(tmp_path):
    write_stack(tmp_path / "in", smooth_volume((5, 20, 20), "uint8"))
    first = convert(tmp_path / "in", tmp_path / "out", SMALL, show_progress=False)
    again = convert(tmp_path / "in", tmp_path / "out", SMALL, show_progress=False)
    assert again == first
    convert(tmp_path / "in", tmp_path / "out", SMALL.replace(gzip=False), show_progress=False)
    names = [
        p.name
        for p in (tmp_path / "out").rglob("*")
        if p.is_file() and not p.name.startswith(".") and p.name != "info"
    ]
    assert names and not any(name.endswith(".gz") for name in names)


def test_print_parameters_shows_the_effective_defaults(capsys):
    assert ingest_ngs.main(["--print-parameters", "--parameters", '{"gzip": false}']) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["gzip"] is False and shown["compression_level"] == DEFAULT_COMPRESSION_LEVEL
    assert shown["chunk_size"] == 64 and shown["type"] == "image"
    assert shown["encoding"] == "raw" and shown["downscaling_method"] == "average"


def test_jpeg_encoding_writes_lossy_chunks_close_to_the_input(tmp_path):
    volume = np.tile(np.linspace(0, 250, 40, dtype=np.uint8), (6, 30, 1))
    write_stack(tmp_path / "in", volume)
    convert(tmp_path / "in", tmp_path / "out", SMALL.replace(encoding="jpeg"), show_progress=False)
    data = read_scale(tmp_path / "out", 0)[0]
    assert np.abs(data.astype(int) - volume).max() <= 8


def _chunk_samples(kind: str) -> bytes:
    """Returns a 64^3 chunk's bytes of one kind of data."""
    rng = np.random.default_rng(2)
    if kind == "noise":
        return rng.integers(0, 256, 64**3, dtype=np.uint8).tobytes()
    if kind == "smooth":
        return (
            np.repeat(np.arange(64**3 // 64, dtype=np.uint16) // 7, 64).astype(np.uint8).tobytes()
        )
    if kind == "16-bit":  # half background, smooth tissue whose low bytes are noisy
        z, y, x = np.mgrid[0:64, 0:64, 0:64]
        tissue = 20000 + 300 * x + 200 * y + 100 * z + rng.integers(0, 256, (64,) * 3)
        return np.where(x < 32, 0, tissue).astype("<u2").tobytes()
    return {"zeros": bytes(64**3), "tiny": b"abc"}[kind]


@pytest.mark.parametrize("kind", ["noise", "smooth", "16-bit", "zeros", "tiny"])
@pytest.mark.parametrize("level", [5, 9])
def test_gzip_compressor_writes_standard_gzip_within_5_percent_of_level_9(kind, level):
    import gzip
    import zlib

    from hbp_image_tasks.pyramid import GzipCompressor

    data = _chunk_samples(kind)
    compress = GzipCompressor(level, wide_samples=kind == "16-bit")
    packed = compress(data)
    assert gzip.decompress(packed) == data
    assert packed == compress(data)  # deterministic: resumed runs match
    level9 = len(zlib.compress(data, 9)) + 18  # gzip header and trailer
    assert len(packed) <= 1.05 * level9 + 16


@pytest.mark.parametrize(
    "kind, path", [("16-bit", "run-length"), ("noise", "isal"), ("smooth", "deflate")]
)
def test_gzip_compressor_picks_the_fast_path_that_suits_the_chunk(kind, path):
    from isal import isal_zlib

    from hbp_image_tasks.pyramid import GzipCompressor, _fastest_gzip, _run_length_gzip

    data = _chunk_samples(kind)
    expected = {
        "run-length": lambda: _run_length_gzip()(data),
        "isal": lambda: isal_zlib.compress(data, 1, wbits=31),
        "deflate": lambda: _fastest_gzip()[1](data, 5),
    }[path]()
    assert GzipCompressor(5, wide_samples=True)(data) == expected
    # Level 9 asks for the smallest output: always the deflate library.
    assert GzipCompressor(9, wide_samples=True)(data) == _fastest_gzip()[1](data, 9)


def test_gzip_compressor_compresses_zero_chunks_once_per_length():
    import gzip

    from hbp_image_tasks.pyramid import GzipCompressor

    compress = GzipCompressor(5, wide_samples=True)
    tissue = _chunk_samples("16-bit")
    expected = {n: GzipCompressor(5, wide_samples=True)(bytes(n)) for n in (64**3, 999)}
    assert compress(bytes(64**3)) == expected[64**3]
    assert compress(np.zeros(999, np.uint8)) == expected[999]

    def no_more_compression(*args, **kwargs):
        raise AssertionError("a zero chunk was compressed again")

    compress._compress = compress._runs = no_more_compression
    compress._fast = None
    for _ in range(3):
        assert compress(np.zeros((64, 64, 32), "<u2")) == expected[64**3]
        assert compress(bytes(999)) == expected[999]
    assert gzip.decompress(expected[999]) == bytes(999)
    with pytest.raises(AssertionError, match="compressed again"):
        compress(tissue)  # anything else is still compressed
    almost = bytearray(64**3)
    almost[12345] = 7  # zero at both ends and in the middle: not a zero chunk
    assert gzip.decompress(GzipCompressor(5, wide_samples=True)(almost)) == almost


def test_gzip_compressor_tries_run_length_on_wide_samples_only():
    from hbp_image_tasks.pyramid import GzipCompressor, _fastest_gzip, _run_length_gzip

    data = _chunk_samples("16-bit")
    assert GzipCompressor(5, wide_samples=True)(data) == _run_length_gzip()(data)
    assert GzipCompressor(5)(data) == _fastest_gzip()[1](data, 5)


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
def test_integer_downscaler_gives_the_voxels_of_neuroglancer_scripts_averaging(dtype):
    from neuroglancer_scripts.downscaling import AveragingDownscaler

    from hbp_image_tasks.pyramid import IntegerAveragingDownscaler

    reference = AveragingDownscaler()
    ours = IntegerAveragingDownscaler(reference)
    rng = np.random.default_rng(4)
    top = np.iinfo(dtype).max if dtype != "float32" else 1.0
    factor_sets = [(2, 2, 2), (2, 2, 1), (2, 1, 2), (1, 2, 2), (2, 1, 1), (1, 1, 2)]
    for trial in range(60):
        shape = (1 + trial % 2,) + tuple(int(n) for n in rng.integers(1, 12, 3))
        if trial % 4:  # mostly even extents, the integer path
            shape = shape[:1] + tuple(2 * n for n in shape[1:])
        if dtype == "float32":
            chunk = rng.random(shape, dtype=np.float32)
        elif trial % 3 == 0:  # the extremes, where rounding and overflow bite
            chunk = rng.choice(np.array([0, 1, top - 1, top], dtype=dtype), shape)
        elif trial % 3 == 1:  # small values: many exact halves to round to even
            chunk = rng.integers(0, 4, shape).astype(dtype)
        else:
            chunk = rng.integers(0, top, shape, dtype=dtype, endpoint=True)
        factors = factor_sets[trial % len(factor_sets)]
        expected = reference.downscale(chunk, factors)
        result = ours.downscale(chunk, factors)
        assert result.dtype == expected.dtype
        np.testing.assert_array_equal(result, expected, err_msg=f"{shape} {factors}")


@pytest.mark.parametrize("voxel_size", [(1, 1, 4), (4, 4, 1), (1, 2, 8)])
def test_anisotropic_pyramids_downscale_only_the_fine_axes_like_numpy(tmp_path, voxel_size):
    volume = smooth_volume((70, 45, 55), "uint8", seed=9)
    write_stack(tmp_path / "in", volume)
    convert(
        tmp_path / "in",
        tmp_path / "out",
        ConversionParameters(chunk_size=16, voxel_size=voxel_size),
        jobs=2,
        show_progress=False,
    )
    info = assert_pyramid(tmp_path / "out", volume[np.newaxis], "average")
    assert any(factors_between(info, i).count(1) for i in range(1, len(info["scales"])))


def test_jpeg_sections_are_stored_as_decoded(tmp_path):
    volume = smooth_volume((5, 24, 40), "uint8", seed=4)
    paths = write_stack(tmp_path / "in", volume, ".jpg")
    decoded = np.stack([np.asarray(Image.open(path)) for path in paths])
    convert(tmp_path / "in", tmp_path / "out", SMALL, jobs=2, show_progress=False)
    np.testing.assert_array_equal(read_scale(tmp_path / "out", 0)[0], decoded)


# ---------------------------------------------------------------- bad sections, found up front


def spoil(path: Path, how: str) -> None:
    """Turns a section into one that cannot join its stack."""
    if how == "size":
        Image.fromarray(np.zeros((9, 12), np.uint8)).save(path)
    elif how == "depth":
        Image.fromarray(np.zeros((16, 20), np.uint16)).save(path)
    elif how == "rgb":
        Image.fromarray(np.zeros((16, 20, 3), np.uint8)).save(path)
    else:
        path.write_text("not an image")


@pytest.mark.parametrize("third, seventh", [("size", "text"), ("depth", "rgb")])
def test_bad_sections_are_all_reported_before_anything_is_written(tmp_path, third, seventh):
    paths = write_stack(tmp_path / "in", smooth_volume((10, 16, 20), "uint8"))
    spoil(paths[3], third)
    spoil(paths[7], seventh)
    with pytest.raises(errors.InputError) as caught:
        convert(tmp_path / "in", tmp_path / "out", SMALL, jobs=2, show_progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("2 of 10 sections cannot be converted")
    assert paths[3].name in message and paths[7].name in message
    assert not (tmp_path / "out").exists()


def test_many_bad_sections_are_counted_and_the_first_few_named(tmp_path):
    paths = write_stack(tmp_path / "in", smooth_volume((30, 16, 20), "uint8"))
    for path in paths[1::2]:
        spoil(path, "text")
    code = ingest_ngs.main([str(tmp_path / "in"), "-d", str(tmp_path / "out"), "--no-progress"])
    assert code == errors.EXIT_USAGE
    with pytest.raises(errors.InputError) as caught:
        convert(tmp_path / "in", tmp_path / "out2", SMALL, show_progress=False)
    message = str(caught.value)
    named = [p.name for p in paths[1::2] if p.name in message]
    assert named == [p.name for p in paths[1:11:2]]
    assert message.startswith("15 of 30") and message.endswith("; and 10 more")
