"""A remote object read as a seekable file that fetches only the blocks read.

Image parsers find a section's size, samples and layout through it without
downloading the section: a 1 um scan's section is ~14 GB, its header a few KB to
a few MB, and a TIFF's directory may lie at its end.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, NoReturn

import requests
import urllib3

from .download import content_range_start
from .progress import format_bytes
from .swift import ObjectStream

BLOCK_BYTES = 64 << 10


class RangeUnavailable(Exception):
    """The object cannot be read by ranges here (see the message)."""


class RangeFile(io.RawIOBase):
    """Object ``name`` of ``size`` bytes, read through ``opener(name, start)`` one run of
    missing BLOCK_BYTES blocks per request; each block is fetched once and kept.
    Reading more than ``limit`` bytes in all raises RangeUnavailable."""

    def __init__(
        self, opener: Callable[[str, int], ObjectStream], name: str, size: int, limit: int
    ):
        super().__init__()
        self.opener = opener
        self.name = name
        self.size = size
        self.limit = limit
        self.blocks: dict[int, bytes] = {}
        self.fetched = 0
        self.requests = 0
        self.failure: RangeUnavailable | None = None  # kept: parsers may swallow it
        self._position = 0

    def __repr__(self) -> str:
        return f"{self.name} (read by ranges)"

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"{self.name}: seek to {base + offset}, before the first byte")
        self._position = base + offset
        return self._position

    def readinto(self, buffer) -> int:
        start = self._position
        end = min(start + len(buffer), self.size)
        if end <= start:
            return 0
        first, last = start // BLOCK_BYTES, (end - 1) // BLOCK_BYTES
        self._fetch_missing(first, last)
        view = memoryview(buffer).cast("B")
        done = 0
        for index in range(first, last + 1):
            block_start = index * BLOCK_BYTES
            low = max(start, block_start) - block_start
            high = min(end, block_start + BLOCK_BYTES) - block_start
            view[done : done + high - low] = self.blocks[index][low:high]
            done += high - low
        self._position = end
        return done

    def _fetch_missing(self, first: int, last: int) -> None:
        """Fetches the blocks from ``first`` to ``last`` not yet read, a run per request."""
        index = first
        while index <= last:
            if index in self.blocks:
                index += 1
                continue
            stop = index
            while stop < last and stop + 1 not in self.blocks:
                stop += 1
            self._fetch_run(index, stop)
            index = stop + 1

    def _fetch_run(self, first: int, last: int) -> None:
        start = first * BLOCK_BYTES
        length = min((last + 1) * BLOCK_BYTES, self.size) - start
        if self.fetched + length > self.limit:
            self._fail(f"its parsers read more than {format_bytes(self.limit)}")
        data = bytearray()
        with self.opener(self.name, start) as stream:
            self.requests += 1
            if start and (stream.status != 206 or content_range_start(stream.headers) != start):
                self._fail(f"the server answered a Range request with status {stream.status}")
            try:
                for chunk in stream:
                    data += chunk[: length - len(data)]
                    if len(data) >= length:
                        break
            except (OSError, requests.RequestException, urllib3.exceptions.HTTPError) as exc:
                # The whole fetch that stands in resumes and retries; this does not.
                self._fail(f"the body from byte {start} broke off ({exc})")
        if len(data) < length:
            self._fail(f"{len(data)} bytes from byte {start}, {length} expected")
        for index in range(first, last + 1):
            offset = (index - first) * BLOCK_BYTES
            self.blocks[index] = bytes(data[offset : offset + BLOCK_BYTES])
        self.fetched += length

    def _fail(self, why: str) -> NoReturn:
        self.failure = RangeUnavailable(f"{self.name}: {why}")
        raise self.failure

    def write_sparse(self, path: Path) -> None:
        """Writes a file of the object's size holding the blocks read at their offsets;
        its other bytes are holes (read as zeros, not stored)."""
        with open(path, "wb") as out:
            out.truncate(self.size)
            for index, block in sorted(self.blocks.items()):
                out.seek(index * BLOCK_BYTES)
                out.write(block)
