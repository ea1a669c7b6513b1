"""PNG sections read by region block of rows by block of rows: the same samples as a
whole decode, every filter type, bounded memory, fallbacks and damaged files."""

from __future__ import annotations

import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from test_sections import COLOUR_VARIANTS, _png_variants

from hbp_image_tasks import png_rows, sections
from hbp_image_tasks.errors import InputError

ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2)]
ADAM7 += [(0, 1, 1, 2)]  # (first column, first row, column step, row step) of each pass
ALL_FILTERS = (0, 1, 2, 3, 4)  # None, Sub, Up, Average, Paeth


def filter_rows(array: np.ndarray, filters) -> bytes:
    """Returns the scanlines of ``array`` (rows, columns[, samples]), big-endian samples,
    row i filtered with ``filters[i % len(filters)]`` (an unknown type: unfiltered)."""
    samples = 1 if array.ndim == 2 else array.shape[2]
    step = samples * array.dtype.itemsize
    raw = array.astype(array.dtype.newbyteorder(">")).reshape(len(array), -1).view(np.uint8)
    x = raw.astype(np.int16)
    a, b, c = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    a[:, step:], b[1:], c[1:, step:] = x[:, :-step], x[:-1], x[:-1, :-step]
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    paeth = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
    predictions = [np.zeros_like(x), a, b, (a + b) // 2, paeth]
    lines = []
    for i, row in enumerate(x):
        kind = filters[i % len(filters)]
        predicted = predictions[kind][i] if kind < len(predictions) else 0
        lines.append(bytes([kind]) + ((row - predicted) % 256).astype(np.uint8).tobytes())
    return b"".join(lines)


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path: Path, array: np.ndarray, filters=ALL_FILTERS, interlace=False) -> Path:
    """Writes ``array`` (8 or 16-bit grey, grey + alpha, RGB or RGBA) as a PNG with the
    given row filters, Adam7-interlaced if asked, its data in IDAT chunks of 100 bytes."""
    samples = 1 if array.ndim == 2 else array.shape[2]
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[samples]
    shape = (array.shape[1], array.shape[0], array.dtype.itemsize * 8, colour, 0, 0, interlace)
    if interlace:
        passes = [array[y::dy, x::dx] for x, y, dx, dy in ADAM7]
        lines = b"".join(filter_rows(p, filters) for p in passes if p.size)
    else:
        lines = filter_rows(array, filters)
    data = zlib.compress(lines, 9)
    idat = [chunk(b"IDAT", data[i : i + 100]) for i in range(0, len(data), 100)]
    header = chunk(b"IHDR", struct.pack(">IIBBBBB", *shape))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + b"".join(idat) + chunk(b"IEND", b""))
    return path


def filter_types(path: Path) -> set:
    """Returns the row filter types that a non-interlaced PNG uses."""
    header = png_rows.read_header(path)
    with open(path, "rb") as handle:
        data = zlib.decompress(b"".join(png_rows._image_data(path, handle, header.data_offset)))
    return set(data[:: header.row_bytes + 1])


def _written(name: str, path: Path) -> Path:
    """Writes the test image ``name``: a Pillow-written variant, or ``filters-*`` with
    every row filter type, odd sizes."""
    rng = np.random.default_rng(3)
    shapes = {
        "filters-grey8": ((37, 53), np.uint8),
        "filters-grey16": ((29, 31), np.uint16),
        "filters-grey-alpha": ((23, 41, 2), np.uint8),
        "filters-grey-alpha16": ((17, 21, 2), np.uint16),
        "filters-rgb": ((37, 53, 3), np.uint8),
        "filters-rgba": ((19, 27, 4), np.uint8),
    }
    if name in shapes:
        shape, dtype = shapes[name]
        # Smooth rows with noise: each filter predicts something, none predicts all.
        ramp = np.add.outer(np.arange(shape[0]), np.arange(shape[1])) * 5
        ramp = ramp.reshape(ramp.shape + (1,) * (len(shape) - 2))
        noise = rng.integers(0, 40, shape)
        array = ((ramp + noise) % (np.iinfo(dtype).max + 1)).astype(dtype)
        write_png(path, array)
        assert filter_types(path) == set(ALL_FILTERS)
        return path
    image, options = _png_variants(rng)[name]
    image.save(path, **options)
    return path


STREAMED = ["filters-grey8", "filters-grey16", "filters-grey-alpha", "filters-grey-alpha16"]
STREAMED += ["filters-rgb", "filters-rgba"]
STREAMED += [name for name in _png_variants(np.random.default_rng(0)) if "interlaced" not in name]
GREYED = ["filters-rgb", "filters-rgba"] + list(COLOUR_VARIANTS)


def regions(width: int, height: int) -> list:
    """Returns regions (x0, x1, y0, y1): the whole image, its corners and edges, a
    band, a single row and a single column."""
    return [
        (0, width, 0, height),
        (0, 1, 0, 1),
        (width - 1, width, height - 1, height),
        (width // 3, width, height // 2, height),
        (0, width, height // 3, height // 3 + 5),
        (5, width - 7, height - 1, height),
        (width // 2, width // 2 + 1, 0, height),
    ]


@pytest.mark.parametrize("block_rows", [1, 4])
@pytest.mark.parametrize(
    "name, grey", [(name, False) for name in STREAMED] + [(name, True) for name in GREYED]
)
def test_png_region_reads_give_the_whole_sections_samples_cropped(
    tmp_path, monkeypatch, name, grey, block_rows
):
    path = _written(name, tmp_path / "s.png")
    expected = sections.probe_section(path)
    whole = sections.read_section(path, expected, grey=grey)
    assert sections.reads_regions(path, expected, grey)
    header = png_rows.read_header(path)
    monkeypatch.setattr(png_rows, "BLOCK_BYTES", block_rows * (header.row_bytes + 1))
    monkeypatch.setattr(sections, "read_section", None)  # never decoded whole
    for x0, x1, y0, y1 in regions(expected.width, expected.height):
        part = sections.read_section_region(path, expected, (x0, x1, y0, y1), grey=grey)
        assert part.dtype == whole.dtype and np.array_equal(part, whole[y0:y1, x0:x1])


def test_grey_png_regions_are_read_into_the_given_buffer(tmp_path):
    path = _written("filters-grey16", tmp_path / "s.png")
    expected = sections.probe_section(path)
    whole = sections.read_section(path, expected)
    slab = np.zeros((2, 10, 20), np.uint16)
    part = sections.read_section_region(path, expected, (3, 23, 11, 21), out=slab[1])
    assert np.shares_memory(part, slab) and np.array_equal(slab[1], whole[11:21, 3:23])


@pytest.mark.parametrize(
    "kind, array",
    [
        ("interlaced", np.arange(37 * 53, dtype=np.uint8).reshape(37, 53) * 7),
        ("6-byte pixels", np.arange(19 * 23 * 3, dtype=np.uint16).reshape(19, 23, 3) * 97),
    ],
)
def test_pngs_whose_rows_do_not_stream_are_decoded_whole_and_planned_so(tmp_path, kind, array):
    path = write_png(tmp_path / "s.png", array, interlace=kind == "interlaced")
    expected = sections.probe_section(path)
    whole = sections.read_section(path, expected)
    assert not sections.reads_regions(path, expected)
    part = sections.read_section_region(path, expected, (4, 17, 2, 15))
    assert np.array_equal(part, whole[2:15, 4:17])
    if kind == "interlaced":
        assert np.array_equal(whole, array)


def _damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    first_idat = data.index(b"IDAT")
    if how == "truncated":
        del data[first_idat + 400 :]
    elif how == "CRC":
        data[first_idat + 50] ^= 0xFF
    elif how == "deflate":
        data[first_idat + 6] ^= 0xFF  # the zlib header; then the chunk's CRC made right
        end = first_idat + 4 + 100
        data[end : end + 4] = struct.pack(">I", zlib.crc32(data[first_idat:end]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncated", "CRC", "deflate", "filter type"])
def test_damaged_png_region_read_is_one_line_error_naming_the_file(tmp_path, how):
    array = np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8)
    path = write_png(tmp_path / "s.png", array, (7,) if how == "filter type" else ALL_FILTERS)
    expected = sections.probe_section(path)
    _damage(path, how)
    with pytest.raises(InputError) as raised:
        sections.read_section_region(path, expected, (10, 20, 50, 60))
    message = str(raised.value)
    assert message.startswith(f"{path}: corrupt or truncated image (") and "\n" not in message
    with pytest.raises(InputError, match="corrupt or truncated image"):
        sections.read_section(path, expected)  # the whole decode says the same


def test_png_region_read_holds_a_block_of_rows_not_the_image(tmp_path, monkeypatch):
    size = 4000
    rows = np.add.outer(np.arange(size), np.arange(size)).astype(np.uint8)
    path = write_png(tmp_path / "s.png", rows, filters=(4, 2, 3))
    expected = sections.probe_section(path)
    monkeypatch.setattr(png_rows, "BLOCK_BYTES", 256 << 10)
    tracemalloc.start()
    try:
        band = sections.read_section_region(path, expected, (0, size, 3000, 3100))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(band, rows[3000:3100])
    decoded = size * size
    # The band (400 kB) and a few copies of a 256 KiB block, against a 16 MB image.
    assert peak < band.nbytes + 6 * (256 << 10) < decoded // 8
