"""Finding, ordering and reading the 2D sections of a stack.

Sections come from a directory, a fetch manifest or an order file; they are
ordered by natural sort (``s2`` before ``s10``) and read with Pillow (plain
8/16-bit PNGs and TIFFs with imagecodecs' libpng and libtiff, which are faster).
"""

from __future__ import annotations

import dataclasses
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from . import layout, png_rows
from .errors import InputError

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
NAMED_PROBLEMS = 5  # bad sections named in the error; the rest are counted

# Pillow mode -> (numpy dtype, channels)
_MODES = {
    "1": ("uint8", 1),
    "L": ("uint8", 1),
    "I;16": ("uint16", 1),
    "I;16L": ("uint16", 1),
    "I;16B": ("uint16", 1),
    "I;16N": ("uint16", 1),
    "I": ("int32", 1),
    "F": ("float32", 1),
    "RGB": ("uint8", 3),
}


def natural_key(name: str) -> tuple:
    """Returns a sort key that orders digit runs by value (``s2`` < ``s10``)."""
    parts = re.split(r"(\d+)", name)
    return tuple(
        (0, int(part), part) if part.isdigit() else (1, part.lower(), part)
        for part in parts
        if part != ""
    ) + (name,)


def is_section_name(name: str) -> bool:
    """Returns whether a file name looks like an image section (not hidden)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def sections_from_manifest(manifest: Path) -> list[Path]:
    """Returns the image sections listed by a fetch manifest, naturally sorted."""
    base = manifest.parent
    result = []
    for _name, path in layout.read_fetch_manifest(manifest):
        if not is_section_name(path.name):
            continue
        if not path.is_file():
            raise InputError(f"{path}: listed in {manifest} but missing")
        result.append(path)
    return sorted(result, key=lambda p: natural_key(p.relative_to(base).as_posix()))


def sections_from_order_file(order_file: Path, base: Path) -> list[Path]:
    """Returns sections in the order an order file gives (one name per line)."""
    try:
        lines = order_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{order_file}: cannot read the order file ({exc})") from None
    result = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        path = Path(line) if Path(line).is_absolute() else base / line
        if not path.is_file():
            raise InputError(f"{order_file}:{number}: section {line!r} not found in {base}")
        result.append(path)
    if len(set(result)) != len(result):
        raise InputError(f"{order_file}: a section is listed twice")
    return result


def list_sections(source: Path, order_file: Path | None = None) -> list[Path]:
    """Returns the section files of a stack, in z order."""
    manifest = layout.find_fetch_manifest(source)
    if order_file is not None:
        base = source.parent if source.is_file() else source
        sections = sections_from_order_file(order_file, base)
    elif manifest is not None:
        sections = sections_from_manifest(manifest)
    elif source.is_dir():
        sections = sorted(
            (p for p in source.iterdir() if p.is_file() and is_section_name(p.name)),
            key=lambda p: natural_key(p.name),
        )
    else:
        raise InputError(f"{source}: not a directory of sections or a manifest")
    if not sections:
        raise InputError(
            f"{source}: no image sections found (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return sections


@dataclasses.dataclass(frozen=True)
class SectionFormat:
    """Width, height, sample type and channels shared by all sections of a stack."""

    width: int
    height: int
    dtype: str
    channels: int
    mode: str

    def describe(self) -> str:
        """Returns e.g. ``2048x2048 uint8 grey``."""
        kind = "RGB" if self.channels == 3 else "grey"
        return f"{self.width}x{self.height} {self.dtype} {kind}"


# A section's path, or a file opened for binary reads whose ``name`` ends with its
# suffix (remote_file.RangeFile): what the header probes below take.
SectionFile = Union[Path, BinaryIO]


def _open(path: SectionFile):
    from PIL import Image

    # Pillow refuses images above 179 Mpx as decompression bombs; sections of 1 um
    # scans have 14 Gpx (130 000 x 110 000), and a tiled conversion reads them by region.
    Image.MAX_IMAGE_PIXELS = None
    try:
        return Image.open(_rewound(path))
    except FileNotFoundError:
        raise InputError(f"{path}: section not found") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{path}: not a readable image ({exc})") from None


def _format_of(path: SectionFile, image) -> SectionFormat:
    mode = image.mode
    if mode in ("RGBA", "LA", "P", "PA"):
        # Alpha and palettes are expanded to what a viewer shows.
        effective = "RGB" if mode in ("RGBA", "P", "PA") else "L"
    else:
        effective = mode
    if effective not in _MODES:
        raise InputError(
            f"{path}: unsupported image mode {mode} (supported: 8/16-bit grey, 32-bit float, RGB)"
        )
    dtype, channels = _MODES[effective]
    width, height = image.size
    return SectionFormat(width, height, dtype, channels, mode)


def probe_section(path: SectionFile) -> SectionFormat:
    """Returns the format of one section, reading only its header."""
    with _open(path) as image:
        return _format_of(path, image)


def header_facts(path: SectionFile) -> tuple[SectionFormat, bool, bool]:
    """Returns what a stack's plan learns from its first section's header: the format,
    :func:`reads_regions` and :func:`reads_rows` (RGB read as RGB)."""
    found = probe_section(path)
    return found, reads_regions(path, found), reads_rows(path)


def format_mismatch(path: Path, found: SectionFormat, expected: SectionFormat) -> str | None:
    """Returns why a section of format ``found`` cannot join a stack of ``expected``, or None."""
    if (found.width, found.height) != (expected.width, expected.height):
        return (
            f"{path}: size {found.width}x{found.height} differs from "
            f"the first section's {expected.width}x{expected.height}"
        )
    if (found.dtype, found.channels) != (expected.dtype, expected.channels):
        return (
            f"{path}: mode {found.describe()} differs from the "
            f"first section's {expected.describe()}"
        )
    return None


def _header_problem(path: Path, expected: SectionFormat) -> str | None:
    try:
        return format_mismatch(path, probe_section(path), expected)
    except InputError as exc:
        return str(exc)


def check_sections(paths: list[Path], expected: SectionFormat, jobs: int = 8) -> None:
    """Reads every section's header (no decoding, ``jobs`` at a time) and raises one
    InputError naming the first few sections that cannot join the stack, and how many."""
    with ThreadPoolExecutor(max_workers=max(1, jobs), thread_name_prefix="headers") as pool:
        problems = [
            problem
            for problem in pool.map(lambda path: _header_problem(path, expected), paths)
            if problem
        ]
    if not problems:
        return
    shown = "; ".join(problems[:NAMED_PROBLEMS])
    more = len(problems) - NAMED_PROBLEMS
    raise InputError(
        f"{len(problems)} of {len(paths)} sections cannot be converted"
        f" ({expected.describe()} expected): {shown}" + (f"; and {more} more" if more > 0 else "")
    )


# (mode, raw mode) layouts that imagecodecs decodes to exactly Pillow's samples.
_PLAIN_PNG = {("L", "L"), ("RGB", "RGB"), ("I;16", "I;16B")}
_PLAIN_TIFF = {("L", "L"), ("RGB", "RGB"), ("I;16", "I;16"), ("I;16", "I;16N")}
_LOSSLESS_TIFF = {"raw", "tiff_lzw", "tiff_adobe_deflate", "tiff_deflate", "packbits"}


def _raw_mode(tile) -> str:
    args = tile[3]
    return args[0] if isinstance(args, tuple) else args


def _is_plain(image) -> bool:
    """Returns True for a single 8/16-bit grey or RGB PNG or losslessly stored TIFF."""
    if not image.tile or getattr(image, "n_frames", 1) != 1:  # several: Pillow picks
        return False
    layouts = {(image.mode, _raw_mode(tile)) for tile in image.tile}
    if image.format == "PNG":
        return len(image.tile) == 1 and "transparency" not in image.info and layouts <= _PLAIN_PNG
    if image.format == "TIFF":
        return image.info.get("compression") in _LOSSLESS_TIFF and layouts <= _PLAIN_TIFF
    return False


def _decode_plain(path: Path, image, out: np.ndarray | None = None) -> np.ndarray | None:
    """Returns the samples of a plain PNG or TIFF decoded by imagecodecs (libpng, libtiff).

    Faster than Pillow, with the GIL released while decoding (Pillow holds it
    to copy TIFF strips), and straight into ``out`` where given and shaped
    right. Returns None for other images (palettes, transparency, bit depths
    under 8, animations, pages, inverted grey, lossy TIFF), when imagecodecs
    is missing, and when it refuses the file, so that Pillow decodes it (or
    names the error).
    """
    if not _is_plain(image):
        return None
    width, height = image.size
    dtype = np.dtype(_MODES[image.mode][0])
    if out is not None and (out.shape != (height, width) or out.dtype != dtype):
        out = None
    try:
        import imagecodecs

        decode = imagecodecs.png_decode if image.format == "PNG" else imagecodecs.tiff_decode
        array = decode(path.read_bytes(), out=out)
    except (ImportError, RuntimeError, OSError, ValueError):
        return None
    if array.dtype != dtype or array.shape[:2] != (height, width):
        return None
    return array


def _decode_with_pillow(image, grey: bool) -> np.ndarray:
    """Returns the samples that Pillow decodes, alpha and palettes expanded."""
    image.load()
    if image.mode in ("RGBA", "P", "PA"):
        image = image.convert("RGB")
    elif image.mode in ("LA", "1"):
        image = image.convert("L")
    if grey and image.mode == "RGB":
        image = image.convert("L")
    return np.asarray(image)


def read_section(
    path: Path, expected: SectionFormat, grey: bool = False, out: np.ndarray | None = None
) -> np.ndarray:
    """Returns a section's pixels, (rows, columns) or (rows, columns, 3).

    With ``grey``, RGB sections are converted to luminance by Pillow. ``out``
    (rows, columns) may receive a grey section's pixels: plain PNG and TIFF
    sections are then decoded into it and the result shares its memory.

    Raises InputError naming the file if it is corrupt or differs in size or
    mode from the first section.
    """
    with _open(path) as image:
        problem = format_mismatch(path, _format_of(path, image), expected)
        if problem:
            raise InputError(problem)
        array = None if grey else _decode_plain(path, image, out)
        try:
            if array is None:
                array = _decode_with_pillow(image, grey)
        except (OSError, SyntaxError, ValueError) as exc:
            raise InputError(f"{path}: corrupt or truncated image ({exc})") from None
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("="))
    expected_shape = (
        (expected.height, expected.width)
        if expected.channels == 1 or grey
        else (expected.height, expected.width, 3)
    )
    if array.shape != expected_shape:
        raise InputError(f"{path}: decoded shape {array.shape} differs from {expected_shape}")
    return array


def read_section_region(
    path: Path,
    expected: SectionFormat,
    region: tuple[int, int, int, int],
    grey: bool = False,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Returns the pixels of a section's ``region`` (x0, x1, y0, y1), checked like
    :func:`read_section`.

    Plain tiled or stripped TIFF sections are read tile by tile or strip by strip
    (only those the region touches), non-interlaced PNG sections block of rows by
    block of rows down to the region's last; other sections are decoded whole and
    cropped. ``out`` (region rows, region columns) may receive a grey region's pixels.
    """
    x0, x1, y0, y1 = region
    array = None
    suffix = path.suffix.lower()
    if not grey and suffix in (".tif", ".tiff"):
        array = _read_tiff_region(path, expected, region, out)
    elif suffix == ".png":
        array = _read_png_region(path, expected, region, grey, out)
    if array is None:
        array = read_section(path, expected, grey=grey)[y0:y1, x0:x1]
    return array


def reads_regions(path: SectionFile, expected: SectionFormat, grey: bool = False) -> bool:
    """Returns whether :func:`read_section_region` reads a region of ``path`` without
    decoding the whole section (plain tiled or stripped TIFF, non-interlaced PNG)."""
    suffix = _suffix(path)
    if suffix == ".png":
        return _png_header(path) is not None
    if grey or suffix not in (".tif", ".tiff"):
        return False
    try:
        import tifffile

        with tifffile.TiffFile(_rewound(path)) as tiff:
            return len(tiff.pages) == 1 and _plain_tiff_page(tiff.pages[0], expected)
    except Exception:  # unreadable here: read_section names the problem later
        return False


def reads_rows(path: SectionFile) -> bool:
    """Returns whether :func:`read_section_region` reads ``path`` by rows from its top
    (non-interlaced PNG): a region costs every row above it, and whole rows."""
    return _suffix(path) == ".png" and _png_header(path) is not None


def _suffix(path: SectionFile) -> str:
    return Path(path.name).suffix.lower()


def _rewound(path: SectionFile) -> SectionFile:
    """Returns a path as it is, an open file moved to its first byte (Pillow and
    tifffile read from where a file stands)."""
    if not isinstance(path, (str, Path)):
        path.seek(0)
    return path


def _read_tiff_region(path: Path, expected: SectionFormat, region, out) -> np.ndarray | None:
    """Returns a region of a plain TIFF read segment by segment, None for other TIFFs."""
    with _open(path) as image:
        found = _format_of(path, image)
        if found != dataclasses.replace(expected, mode=found.mode):
            return None  # read_section names what differs
    try:
        import tifffile
    except ImportError:
        return None
    x0, x1, y0, y1 = region
    try:
        with tifffile.TiffFile(path) as tiff:
            page = tiff.pages[0]
            if len(tiff.pages) != 1 or not _plain_tiff_page(page, expected):
                return None  # Pillow decodes it whole
            shape = (y1 - y0, x1 - x0) + ((3,) if expected.channels == 3 else ())
            dtype = np.dtype(expected.dtype)
            if out is None or out.shape != shape or out.dtype != dtype:
                out = np.empty(shape, dtype)
            _copy_segments(tiff, page, region, out)
    except (tifffile.TiffFileError, OSError, ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: corrupt or truncated image ({exc})") from None
    return out


# TIFF compressions that decode to exactly the stored samples: none, LZW,
# deflate (Adobe and old), PackBits.
_LOSSLESS_TIFF_CODES = {1, 5, 8, 32946, 32773}


def _plain_tiff_page(page, expected: SectionFormat) -> bool:
    """Returns whether tifffile gives a page's samples as Pillow does: unsigned 8/16-bit
    grey (min-is-black) or RGB, interleaved, losslessly compressed, no extra samples."""
    photometric = 2 if expected.channels == 3 else 1
    return (
        int(page.compression) in _LOSSLESS_TIFF_CODES
        and int(page.photometric) == photometric
        and page.samplesperpixel == expected.channels
        and page.planarconfig == 1
        and page.imagedepth == 1
        and int(page.sampleformat) == 1
        and page.bitspersample == np.dtype(expected.dtype).itemsize * 8
        and page.shape[:2] == (expected.height, expected.width)
    )


def _copy_segments(tiff, page, region, out: np.ndarray) -> None:
    """Decodes the tiles or strips of ``page`` that ``region`` touches into ``out``."""
    x0, x1, y0, y1 = region
    if page.is_tiled:
        rows, columns = page.tilelength, page.tilewidth
    else:
        rows, columns = page.rowsperstrip, page.imagewidth
    across = -(-page.imagewidth // columns)
    decode = page.decode
    handle = tiff.filehandle
    for row in range(y0 // rows, (y1 - 1) // rows + 1):
        for column in range(x0 // columns, (x1 - 1) // columns + 1):
            index = row * across + column
            with handle.lock:
                handle.seek(page.dataoffsets[index])
                data = handle.read(page.databytecounts[index])
            segment, _, _ = decode(data, index)
            segment = segment.reshape(segment.shape[1:3] + segment.shape[3:])  # (Y, X, S)
            if segment.shape[-1] == 1:
                segment = segment[..., 0]
            top, left = row * rows, column * columns
            a, b = max(y0, top), min(y1, top + segment.shape[0])
            c, d = max(x0, left), min(x1, left + segment.shape[1])
            out[a - y0 : b - y0, c - x0 : d - x0] = segment[a - top : b - top, c - left : d - left]


def _png_header(path: SectionFile) -> png_rows.PngHeader | None:
    """Returns the header of a PNG whose rows stream (see :mod:`png_rows`), else None."""
    header = png_rows.read_header(path)
    return header if header is not None and header.streams else None


def _read_png_region(
    path: Path, expected: SectionFormat, region, grey: bool, out
) -> np.ndarray | None:
    """Returns a region of a non-interlaced PNG decoded block of rows by block of
    rows, the samples that :func:`read_section` gives; None for other PNGs."""
    header = _png_header(path)
    if header is None:
        return None
    x0, x1, y0, y1 = region
    with _open(path) as image:
        found = _format_of(path, image)
        if found != dataclasses.replace(expected, mode=found.mode) or len(image.tile) != 1:
            return None  # read_section names what differs
        shape = (y1 - y0, x1 - x0) + ((3,) if expected.channels == 3 and not grey else ())
        if out is None or out.shape != shape or out.dtype != np.dtype(expected.dtype):
            out = np.empty(shape, expected.dtype)
        block = png_rows.block_size(out.nbytes)
        top = y0
        for rows in png_rows.row_blocks(path, header, y0, y1, block):
            out[top - y0 : top - y0 + len(rows)] = _png_samples(image, header, rows, x0, x1, grey)
            top += len(rows)
    return out


def _png_samples(image, header, rows: np.ndarray, x0: int, x1: int, grey: bool) -> np.ndarray:
    """Returns columns ``x0:x1`` of unfiltered PNG rows as Pillow decodes them (the
    same raw mode unpacks them), alpha and palettes expanded as in read_section."""
    rawmode = _raw_mode(image.tile[0])
    left, width = x0, header.width
    if header.pixel_bits % 8 == 0:  # whole bytes per pixel: crop before unpacking
        rows = rows[:, x0 * header.step : x1 * header.step]
        left, width = 0, x1 - x0
    if not grey and (image.mode, rawmode) in _PLAIN_PNG:
        dtype = ">u2" if rawmode == "I;16B" else "u1"
        samples = rows.view(dtype).reshape(len(rows), width, -1)
        return samples[..., 0] if samples.shape[-1] == 1 else samples
    from PIL import Image

    part = Image.frombytes(image.mode, (width, len(rows)), rows.tobytes(), "raw", rawmode)
    if image.mode == "P":
        part.putpalette(image.palette)
    return _decode_with_pillow(part, grey)[:, left : left + x1 - x0]
