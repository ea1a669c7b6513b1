"""Section stacks: natural order, ignored stray files, manifests, order files, bad sections."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hbp_image_tasks import layout, sections
from hbp_image_tasks.errors import InputError


@pytest.mark.parametrize(
    "names, expected",
    [
        (["s10", "s2", "s1"], ["s1", "s2", "s10"]),
        (
            ["slice_10.png", "slice_2.png", "slice_1.png"],
            ["slice_1.png", "slice_2.png", "slice_10.png"],
        ),
        (
            ["pm3110o.tif", "pm3199o.tif", "pm3100o.tif"],
            ["pm3100o.tif", "pm3110o.tif", "pm3199o.tif"],
        ),
        (["B2", "a10", "a9"], ["a9", "a10", "B2"]),
    ],
)
def test_natural_sort_orders_digit_runs_by_value(names, expected):
    assert sorted(names, key=sections.natural_key) == expected


def save(path, array):
    Image.fromarray(array).save(path)
    return path


def test_directory_listing_skips_non_images_and_hidden_files(tmp_path):
    for z in (10, 2, 1):
        save(tmp_path / f"s{z}.png", np.zeros((4, 4), np.uint8))
    save(tmp_path / "s3.TIF", np.zeros((4, 4), np.uint8))
    for name in ("README", "s5.png.bak", ".s4.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "subdir.png").mkdir()
    found = [p.name for p in sections.list_sections(tmp_path)]
    assert found == ["s1.png", "s2.png", "s3.TIF", "s10.png"]


def test_manifest_in_the_directory_gives_the_exact_input_set(tmp_path):
    for z in range(3):
        save(tmp_path / f"s{z}.png", np.zeros((4, 4), np.uint8))
    (tmp_path / layout.FETCH_MANIFEST_NAME).write_text(
        json.dumps(
            {
                "version": 1,
                "source": "https://example.org/x",
                "filter": None,
                "objects": [
                    {"name": n, "path": n, "bytes": 1, "md5": "0"}
                    for n in ("s2.png", "s0.png", "notes.txt")
                ],
            }
        )
    )
    for source in (tmp_path, tmp_path / layout.FETCH_MANIFEST_NAME):
        assert [p.name for p in sections.list_sections(source)] == ["s0.png", "s2.png"]


def test_manifest_entry_missing_on_disk_is_named(tmp_path):
    (tmp_path / layout.FETCH_MANIFEST_NAME).write_text(
        json.dumps(
            {
                "version": 1,
                "source": "u",
                "filter": None,
                "objects": [{"name": "gone.png", "path": "gone.png", "bytes": 1, "md5": "0"}],
            }
        )
    )
    with pytest.raises(InputError, match="gone.png"):
        sections.list_sections(tmp_path)


def test_order_file_names_an_unknown_section(tmp_path):
    save(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    order = tmp_path / "order.txt"
    order.write_text("a.png\nb.png\n")
    with pytest.raises(InputError, match=r"order.txt:2.*b.png"):
        sections.list_sections(tmp_path, order)


def test_empty_directory_is_an_error(tmp_path):
    (tmp_path / "README").write_text("x")
    with pytest.raises(InputError, match="no image sections"):
        sections.list_sections(tmp_path)


@pytest.mark.parametrize(
    "array, dtype, channels",
    [
        (np.zeros((5, 7), np.uint8), "uint8", 1),
        (np.zeros((5, 7), np.uint16), "uint16", 1),
        (np.zeros((5, 7, 3), np.uint8), "uint8", 3),
    ],
)
def test_probe_and_read_give_shape_type_and_pixels(tmp_path, array, dtype, channels):
    array = array.copy()
    array.flat[::3] = 200
    path = save(tmp_path / "s.tif", array)
    fmt = sections.probe_section(path)
    assert (fmt.width, fmt.height, fmt.dtype, fmt.channels) == (7, 5, dtype, channels)
    np.testing.assert_array_equal(sections.read_section(path, fmt), array)


def test_truncated_section_is_named(tmp_path):
    path = save(
        tmp_path / "s.png", np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    )
    fmt = sections.probe_section(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(InputError, match="s.png"):
        sections.read_section(path, fmt)


def _png_variants(rng) -> dict:
    grey = rng.integers(0, 256, (37, 53), dtype=np.uint8)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    return {
        "grey8": (Image.fromarray(grey), {}),
        "grey8-interlaced": (Image.fromarray(grey), {"interlace": 1}),
        "grey16": (Image.fromarray(rng.integers(0, 65536, (37, 53), dtype=np.uint16)), {}),
        "rgb": (Image.fromarray(rgb), {}),
        "rgba": (Image.fromarray(rng.integers(0, 256, (37, 53, 4), dtype=np.uint8)), {}),
        "bilevel": (Image.fromarray(grey > 127), {}),
        "grey2": (Image.fromarray(grey), {"bits": 2}),
        "palette": (Image.fromarray(rgb).quantize(16), {}),
        "grey-transparent": (Image.fromarray(grey), {"transparency": 7}),
    }


COLOUR_VARIANTS = ("rgb", "rgba", "palette")  # grey conversion applies to these only


@pytest.mark.parametrize(
    "variant, grey",
    [(variant, False) for variant in _png_variants(np.random.default_rng(0))]
    + [(variant, True) for variant in COLOUR_VARIANTS],
)
def test_png_sections_read_as_pillow_decodes_them(tmp_path, variant, grey):
    image, options = _png_variants(np.random.default_rng(6))[variant]
    path = tmp_path / "s.png"
    image.save(path, **options)
    fmt = sections.probe_section(path)
    assert fmt.channels > 1 or not grey
    with Image.open(path) as reference:
        expected = sections._decode_with_pillow(reference, grey)
    result = sections.read_section(path, fmt, grey=grey)
    assert result.dtype == expected.dtype
    np.testing.assert_array_equal(result, expected)


@pytest.mark.parametrize("compression", [None, "tiff_lzw", "tiff_adobe_deflate", "packbits"])
@pytest.mark.parametrize("kind", ["grey8", "grey16", "rgb"])
def test_tiff_sections_are_decoded_by_libtiff_as_pillow_decodes_them(tmp_path, kind, compression):
    rng = np.random.default_rng(8)
    shape = (37, 53, 3) if kind == "rgb" else (37, 53)
    dtype = np.uint16 if kind == "grey16" else np.uint8
    array = rng.integers(0, np.iinfo(dtype).max, shape, dtype=dtype)
    path = tmp_path / "s.tif"
    Image.fromarray(array).save(path, compression=compression)
    with Image.open(path) as image:
        decoded = sections._decode_plain(path, image)
    assert decoded is not None  # libtiff, not Pillow
    np.testing.assert_array_equal(decoded, array)
    np.testing.assert_array_equal(sections.read_section(path, sections.probe_section(path)), array)


def test_inverted_grey_tiff_goes_through_pillow(tmp_path):
    from PIL import TiffImagePlugin

    array = (np.arange(35, dtype=np.uint8) * 7).reshape(5, 7)
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[262] = 0  # PhotometricInterpretation: WhiteIsZero
    path = tmp_path / "s.tif"
    Image.fromarray(array).save(path, tiffinfo=tags)
    with Image.open(path) as image:
        assert sections._decode_plain(path, image) is None  # libtiff would not invert
    np.testing.assert_array_equal(sections.read_section(path, sections.probe_section(path)), array)


def test_grey_sections_are_decoded_into_the_given_buffer(tmp_path):
    rng = np.random.default_rng(9)
    slab = np.zeros((2, 37, 53), np.uint16)
    for suffix in (".tif", ".png"):
        array = rng.integers(0, 65535, (37, 53), dtype=np.uint16)
        path = save(tmp_path / f"s{suffix}", array)
        result = sections.read_section(path, sections.probe_section(path), out=slab[1])
        assert np.shares_memory(result, slab)
        np.testing.assert_array_equal(slab[1], array)
    # A buffer of another shape is not used; the pixels come back all the same.
    wrong = np.zeros((37, 52), np.uint16)
    result = sections.read_section(path, sections.probe_section(path), out=wrong)
    assert not np.shares_memory(result, wrong)
    np.testing.assert_array_equal(result, array)


def test_plain_pngs_are_decoded_by_libpng_and_others_by_pillow(tmp_path):
    rng = np.random.default_rng(7)
    plain = save(tmp_path / "plain.png", rng.integers(0, 256, (9, 11), dtype=np.uint8))
    palette = tmp_path / "palette.png"
    colours = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    Image.fromarray(colours).quantize(4).save(palette)
    with Image.open(plain) as image:
        assert sections._decode_plain(plain, image) is not None
    with Image.open(palette) as image:
        assert sections._decode_plain(palette, image) is None
    animated = tmp_path / "animated.png"
    frames = [Image.fromarray(rng.integers(0, 256, (9, 11), dtype=np.uint8)) for _ in "ab"]
    frames[0].save(animated, save_all=True, append_images=frames[1:])
    with Image.open(animated) as image:
        assert sections._decode_plain(animated, image) is None
    np.testing.assert_array_equal(
        sections.read_section(animated, sections.probe_section(animated)), np.asarray(frames[0])
    )
    # A file libpng refuses goes to Pillow, which names the problem.
    damaged = bytearray(plain.read_bytes())
    damaged[-20] ^= 0xFF  # inside the image data or its checksum
    plain.write_bytes(bytes(damaged))
    with Image.open(plain) as image:
        assert sections._decode_plain(plain, image) is None
