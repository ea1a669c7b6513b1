"""Rows of a PNG image read block by block, so that a region costs a block, not the image.

A PNG's pixels are one deflate stream of scanlines, each filtered against the one
above: rows above a region are inflated and unfiltered but not kept, and the
stream is left as soon as the region's last row is read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from .errors import InputError

try:  # inflates and checksums twice as fast as zlib
    from zlib_ng import zlib_ng as zlib
except ImportError:
    import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
BLOCK_BYTES = 2 << 20  # filtered rows unfiltered at once (larger blocks are no faster)
SMALL_BLOCK_BYTES = 256 << 10  # below that, each block's own cost shows
READ_BYTES = 256 << 10  # compressed bytes read from the file at once
_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
# Bytes per pixel (the step of the Sub, Average and Paeth filters) -> the colour type
# of 8-bit samples with that step, whose decoded samples are the unfiltered row bytes.
_BYTE_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}
_NONE, _SUB = 0, 1  # filters that do not look at the row above
_STORED = 0xFFFF  # bytes of a stored deflate block, at most


@dataclasses.dataclass(frozen=True)
class PngHeader:
    """A PNG's image header and the file offset of its first IDAT chunk."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool
    data_offset: int

    @property
    def pixel_bits(self) -> int:
        """Returns the bits of one pixel (all its samples)."""
        return self.bit_depth * _CHANNELS[self.colour_type]

    @property
    def row_bytes(self) -> int:
        """Returns the bytes of one unfiltered row."""
        return (self.width * self.pixel_bits + 7) // 8

    @property
    def step(self) -> int:
        """Returns the bytes per pixel that the filters step by (at least 1)."""
        return max(1, self.pixel_bits // 8)

    @property
    def streams(self) -> bool:
        """Returns whether rows can be read block by block: not interlaced (Adam7
        passes scatter every row over the stream) and at most 4 bytes per pixel."""
        return not self.interlaced and self.step in _BYTE_TYPES


def read_header(path: Path | BinaryIO) -> PngHeader | None:
    """Returns the header of a PNG file (a path or a file open for binary reads), or None
    when it is not a single-image PNG (animated ones included) or cannot be read:
    decoding it whole names the problem."""
    try:
        with _opened(path) as handle:
            handle.seek(0)
            if handle.read(len(SIGNATURE)) != SIGNATURE:
                return None
            offset, fields = len(SIGNATURE), None
            while True:
                head = handle.read(8)
                if len(head) < 8:
                    return None
                length, kind = struct.unpack(">I4s", head)
                if kind == b"IHDR" and length == 13:
                    fields = struct.unpack(">IIBBBBB", handle.read(13))
                elif kind == b"IDAT":
                    break
                elif kind == b"acTL":
                    return None  # frames other than the IDAT image may come first
                offset += 12 + length
                handle.seek(offset)
    except OSError:
        return None
    if fields is None:
        return None
    width, height, depth, colour, compression, filtering, interlace = fields
    if colour not in _CHANNELS or compression != 0 or filtering != 0 or interlace > 1:
        return None
    return PngHeader(width, height, depth, colour, interlace == 1, offset)


def _opened(path: Path | BinaryIO) -> contextlib.AbstractContextManager[BinaryIO]:
    """Returns a context that opens a path and leaves an open file open."""
    if isinstance(path, (str, Path)):
        return open(path, "rb")
    return contextlib.nullcontext(path)


def block_size(region_bytes: int) -> int:
    """Returns the block size for reading a region of ``region_bytes``: at most half
    of it (a few blocks are held at once; the unit planner budgets two copies of a
    worker's region), SMALL_BLOCK_BYTES at least, BLOCK_BYTES at most."""
    return min(BLOCK_BYTES, max(region_bytes // 2, SMALL_BLOCK_BYTES))


def reader_bytes(region_bytes: int, row_bytes: int, height: int) -> int:
    """Returns the bytes a reader of a region of ``region_bytes`` holds besides the
    region, in sections of ``height`` rows of ``row_bytes``: the compressed bytes
    read and their unconsumed tail, and a block of filtered rows three times (the
    rows, their copy as an in-memory PNG, the unfiltered rows)."""
    image = (row_bytes + 1) * height
    block = min(max(block_size(region_bytes), row_bytes + 1), image)
    return 2 * min(READ_BYTES, image) + 3 * block


def row_blocks(
    path: Path, header: PngHeader, y0: int, y1: int, block_bytes: int | None = None
) -> Iterator[np.ndarray]:
    """Yields rows ``y0:y1`` of a streaming PNG (see :attr:`PngHeader.streams`) in
    order, as (rows, row bytes) uint8 arrays of their unfiltered bytes, each at most
    ``block_bytes`` (default BLOCK_BYTES) or one row. Raises InputError naming the
    file if its data is corrupt or ends before row ``y1``."""
    stride = header.row_bytes + 1  # a filter type byte, then the row
    count = max(1, min((block_bytes or BLOCK_BYTES) // stride, max(y0, y1 - y0)))
    # The unfiltered row above a block (zeros above row 0), then the block's filtered rows.
    rows = bytearray(stride * (count + 1))
    with open(path, "rb") as handle:
        inflater = _Inflater(path, _image_data(path, handle, header.data_offset))
        for start in itertools.chain(range(0, y0, count), range(y0, y1, count)):
            stop = min(start + count, y0 if start < y0 else y1)
            block = memoryview(rows)[: stride * (stop - start + 1)]
            if inflater.readinto(block[stride:]) < len(block) - stride:
                raise _corrupt(path, f"image data ends before row {stop} of {header.height}")
            filters = np.frombuffer(block, np.uint8)[stride::stride]
            if filters.max() > 4:
                raise _corrupt(path, f"unknown row filter {filters.max()}")
            if start < y0:
                # Only the last row is needed: unfilter from the last row that does not
                # look at the one above (which becomes a dummy first row).
                independent = np.flatnonzero(filters <= _SUB)
                first = int(independent[-1]) if independent.size else 0
                block[first * stride] = _NONE
                decoded = _unfilter(path, header, block[first * stride :])
            else:
                decoded = _unfilter(path, header, block)
                yield decoded[1:]
            rows[0] = _NONE
            rows[1:stride] = decoded[-1].tobytes()


def _unfilter(path: Path, header: PngHeader, rows: memoryview) -> np.ndarray:
    """Returns the unfiltered bytes (rows, row bytes) of filtered ``rows`` whose first
    has filter type None.

    Decodes an in-memory PNG of 8-bit samples with the same bytes per pixel (so the
    same filters) and ``rows`` as its image data, in stored deflate blocks.
    """
    count = len(rows) // (header.row_bytes + 1)
    width, colour = header.row_bytes // header.step, _BYTE_TYPES[header.step]
    shape = struct.pack(">IIBBBBB", width, count, 8, colour, 0, 0, 0)
    try:
        decoded = _decode(_stored_png(shape, rows))
    except (OSError, RuntimeError, ValueError, SyntaxError) as exc:
        raise _corrupt(path, str(exc)) from None
    return decoded.reshape(count, header.row_bytes)


def _stored_png(shape: bytes, data: memoryview) -> bytearray:
    """Returns a PNG of header fields ``shape`` whose image data is ``data`` in stored
    (uncompressed) deflate blocks, copied once."""
    blocks = -(-len(data) // _STORED)
    size = 2 + 5 * blocks + len(data) + 4  # zlib header, blocks, Adler-32
    head = SIGNATURE + _chunk(b"IHDR", shape) + struct.pack(">I4s", size, b"IDAT")
    image = bytearray(len(head) + size + 4 + 12)
    image[: len(head)] = head
    at = len(head)
    image[at : at + 2] = b"\x78\x01"  # deflate, 32 KiB window, no dictionary
    at += 2
    for offset in range(0, len(data), _STORED):
        piece = data[offset : offset + _STORED]
        final = offset + _STORED >= len(data)
        image[at : at + 5] = struct.pack("<BHH", final, len(piece), 0xFFFF ^ len(piece))
        image[at + 5 : at + 5 + len(piece)] = piece
        at += 5 + len(piece)
    image[at : at + 4] = struct.pack(">I", zlib.adler32(data))
    at += 4
    crc = zlib.crc32(memoryview(image)[len(head) - 4 : at])  # chunk type and data
    image[at : at + 4] = struct.pack(">I", crc)
    image[at + 4 :] = _chunk(b"IEND")
    return image


def _decode(image: bytes) -> np.ndarray:
    """Returns the samples of an in-memory PNG: libpng (imagecodecs) releases the
    GIL while decoding, Pillow where imagecodecs is missing."""
    try:
        import imagecodecs
    except ImportError:
        from PIL import Image

        with Image.open(io.BytesIO(image)) as decoded:
            return np.asarray(decoded)
    return imagecodecs.png_decode(image)


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return (
        struct.pack(">I4s", len(data), kind)
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def _image_data(path: Path, handle, offset: int) -> Iterator[bytes]:
    """Yields the compressed image data of the IDAT chunks from ``offset`` on, at
    most READ_BYTES at a time, checking each whole chunk's CRC."""
    handle.seek(offset)
    while True:
        head = handle.read(8)
        if len(head) < 8:
            raise _corrupt(path, "no image end")
        length, kind = struct.unpack(">I4s", head)
        if kind != b"IDAT":
            return
        crc, left = zlib.crc32(kind), length
        while left:
            piece = handle.read(min(left, READ_BYTES))
            if not piece:
                raise _corrupt(path, "image data chunk cut short")
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
            yield piece
        stored = handle.read(4)
        if len(stored) < 4 or struct.unpack(">I", stored)[0] != crc:
            raise _corrupt(path, "image data CRC mismatch")


class _Inflater:
    """Inflates a zlib stream given in pieces, handing out as many bytes as asked."""

    def __init__(self, path: Path, pieces: Iterator[bytes]):
        self._path = path
        self._pieces = pieces
        self._zlib = zlib.decompressobj()
        self._tail = b""

    def readinto(self, target: memoryview) -> int:
        """Fills ``target`` with the next inflated bytes; returns how many there were
        (fewer than its length where the stream ends)."""
        got = 0
        while got < len(target) and not self._zlib.eof:
            if not self._tail:
                self._tail = next(self._pieces, b"")
            try:
                data = self._zlib.decompress(self._tail, len(target) - got)
            except zlib.error as exc:
                raise _corrupt(self._path, f"image data: {exc}") from None
            if not data and not self._tail:
                break  # no input left, and nothing more came out
            self._tail = self._zlib.unconsumed_tail
            target[got : got + len(data)] = data
            got += len(data)
        return got


def _corrupt(path: Path, why: str) -> InputError:
    return InputError(f"{path}: corrupt or truncated image ({why})")
