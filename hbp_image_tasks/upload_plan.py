"""The local side of an upload: which files become which Swift objects, with what headers.

Dotfiles, symlinks and anything outside RESULTS_DIR are left out; gzipped chunks
lose their ``.gz`` and gain ``Content-Encoding: gzip``; nested chunk paths are flattened.
"""

from __future__ import annotations

import hashlib
import logging
import mimetypes
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from . import layout
from .errors import InputError, UsageError
from .object_names import join_prefix

logger = logging.getLogger(__name__)

MAX_CONTAINER_NAME_BYTES = 256
MAX_OBJECT_NAME_BYTES = 1024
READ_SIZE = 1 << 20

CHUNK_RANGE = re.compile(r"^\d+-\d+$")
FLAT_CHUNK = re.compile(r"^\d+-\d+_\d+-\d+_\d+-\d+$")
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


class LocalObject(NamedTuple):
    """One file of RESULTS_DIR and the object it becomes (name relative to the prefix)."""

    path: str
    name: str
    size: int
    content_type: str
    content_encoding: str  # "gzip" or ""
    mtime_ns: int = 0

    @property
    def is_metadata(self) -> bool:
        """True for ``info`` and other JSON, which are uploaded after the chunks."""
        return self.content_type == JSON_TYPE


class Digest(NamedTuple):
    """MD5 of a file's bytes and, for a large object, of each segment."""

    md5: str
    segments: tuple[tuple[int, int, str], ...] = ()  # (offset, length, md5)

    @property
    def slo_etag(self) -> str:
        """Returns the ETag Swift gives the static large object built from the segments."""
        if not self.segments:
            return ""
        return hashlib.md5(
            "".join(s[2] for s in self.segments).encode(), usedforsecurity=False
        ).hexdigest()


def validate_container_name(name: str) -> str:
    """Returns ``name`` if Swift accepts it as a container name, else raises UsageError."""
    size = len(name.encode("utf-8"))
    if not name or size > MAX_CONTAINER_NAME_BYTES:
        raise UsageError(
            f"container name {name!r} must be 1 to "
            f"{MAX_CONTAINER_NAME_BYTES} bytes of UTF-8 (it has {size})"
        )
    if "/" in name:
        raise UsageError(
            f"container name {name!r} must not contain '/' "
            f"(use --prefix for a path inside the container)"
        )
    return name


def normalize_prefix(prefix: str | None) -> str:
    """Returns the object prefix without surrounding slashes; refuses '.', '..', '//'."""
    prefix = (prefix or "").strip("/")
    if not prefix:
        return ""
    parts = prefix.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UsageError(
            f"prefix {prefix!r} must not contain empty, '.' or '..' "
            f"components (browsers would rewrite such URLs)"
        )
    return prefix


def object_name_for(relative_parts: list[str]) -> tuple[str, str]:
    """Returns (object name, content encoding) for a file's path inside RESULTS_DIR.

    ``key/x0-x1_y0-y1_z0-z1.gz`` becomes ``key/x0-x1_y0-y1_z0-z1`` with gzip
    encoding, because Neuroglancer requests the name without ``.gz``; the nested
    layout ``key/x0-x1/y0-y1/z0-z1`` is written flat.
    """
    parts = list(relative_parts)
    encoding = ""
    if parts[-1].endswith(".gz") and len(parts[-1]) > 3:
        parts[-1] = parts[-1][:-3]
        encoding = "gzip"
    if len(parts) >= 4 and all(CHUNK_RANGE.match(p) for p in parts[-3:]):
        parts[-3:] = ["_".join(parts[-3:])]
    return "/".join(parts), encoding


def content_type_for(name: str) -> str:
    """Returns the Content-Type served for object ``name``."""
    base = name.rsplit("/", 1)[-1]
    if base == "info" or base.endswith(".json"):
        return JSON_TYPE
    if FLAT_CHUNK.match(base) or base.endswith(".shard"):
        return BINARY_TYPE
    return mimetypes.guess_type(base)[0] or BINARY_TYPE


def check_conversion_complete(results_dir: Path) -> None:
    """Refuses RESULTS_DIR unless its conversion finished (the publish contract in layout.py)."""
    status = layout.check_publishable(results_dir)
    if status.kind == layout.FOREIGN:
        logger.info(
            "%s holds no conversion state of ingest_ngs: uploading it as it is", results_dir
        )


def scan(results_dir: Path) -> tuple[list[LocalObject], list[str]]:
    """Returns the objects to upload, sorted by name, and the symlinks left out."""
    objects: dict[str, LocalObject] = {}
    links: list[str] = []
    root = str(results_dir)

    def walk(directory: str, relative: list[str]) -> None:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue  # state files, manifests, editor droppings
                parts = relative + [entry.name]
                if entry.is_symlink():
                    links.append("/".join(parts))
                    continue
                if entry.is_dir(follow_symlinks=False):
                    walk(entry.path, parts)
                    continue
                if not entry.is_file(follow_symlinks=False):
                    logger.warning("%s: not a regular file, left out", entry.path)
                    continue
                name, encoding = object_name_for(parts)
                info = entry.stat(follow_symlinks=False)
                local = LocalObject(
                    entry.path,
                    name,
                    info.st_size,
                    content_type_for(name),
                    encoding,
                    info.st_mtime_ns,
                )
                other = objects.get(name)
                if other is not None:
                    raise InputError(
                        f"{other.path} and {entry.path} would both be "
                        f"uploaded as {name!r}: remove one of them"
                    )
                objects[name] = local

    try:
        walk(root, [])
    except OSError as exc:
        raise InputError(f"{exc.filename or root}: cannot be read: {exc.strerror}") from None
    if links:
        logger.warning(
            "%d symbolic link(s) in %s left out (links are never followed), e.g. %s",
            len(links),
            root,
            links[0],
        )
    return [objects[name] for name in sorted(objects)], links


def check_object_names(objects: Iterable[LocalObject], prefix: str) -> None:
    """Refuses names that Swift would reject (over 1024 bytes with the prefix)."""
    for local in objects:
        full = join_prefix(prefix, local.name)
        if len(full.encode("utf-8")) > MAX_OBJECT_NAME_BYTES:
            raise InputError(
                f"{local.path}: object name {full!r} is longer than {MAX_OBJECT_NAME_BYTES} bytes"
            )


def open_regular(path: str):
    """Opens ``path`` for binary reading without following a symlink put there since."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise InputError(f"{path}: cannot be opened: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path}: not a regular file")
    return os.fdopen(fd, "rb")


def read_exactly(path: str, size: int) -> bytes:
    """Returns the bytes of ``path``, refusing a file whose size changed."""
    with open_regular(path) as stream:
        data = stream.read()
    if len(data) != size:
        raise InputError(
            f"{path} changed while uploading ({size} bytes when "
            f"listed, {len(data)} now): is a conversion still running?"
        )
    return data


def file_digest(path: str, size: int, segment_size: int) -> Digest:
    """Returns the MD5 of ``path`` and, if larger than ``segment_size``, of each segment."""
    whole = hashlib.md5(usedforsecurity=False)
    segments: list[tuple[int, int, str]] = []
    large = size > segment_size
    offset = 0
    with open_regular(path) as stream:
        while True:
            length = min(segment_size, size - offset) if large else size
            part = hashlib.md5(usedforsecurity=False)
            remaining = length
            while remaining > 0:
                block = stream.read(min(READ_SIZE, remaining))
                if not block:
                    break
                whole.update(block)
                part.update(block)
                remaining -= len(block)
            if remaining:
                raise InputError(f"{path} shrank while being read: is a conversion still running?")
            if large:
                segments.append((offset, length, part.hexdigest()))
            offset += length
            if offset >= size:
                break
        if stream.read(1):
            raise InputError(f"{path} grew while being read: is a conversion still running?")
    return Digest(whole.hexdigest(), tuple(segments))


class SegmentReader:
    """A file-like view of ``length`` bytes of a file from ``offset`` (seekable for retries)."""

    def __init__(self, path: str, offset: int, length: int):
        self._stream = open_regular(path)
        self._offset = offset
        self._length = length
        self._position = 0
        self._stream.seek(offset)

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._position
        if size < 0 or size > remaining:
            size = remaining
        data = self._stream.read(size)
        self._position += len(data)
        return data

    def tell(self) -> int:
        return self._position

    def seek(self, position: int, whence: int = 0) -> int:
        if whence != 0:
            raise ValueError("only absolute seeks are supported")
        self._position = position
        self._stream.seek(self._offset + position)
        return position

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_manifest_digests(results_dir: Path) -> dict[str, tuple[int, int, str]]:
    """Returns object name -> (bytes, mtime_ns, md5) from the last verified upload manifest.

    An unreadable or foreign manifest gives an empty map: it is only a cache.
    """
    manifest = layout.read_upload_manifest(results_dir)
    try:
        return {
            entry["name"]: (int(entry["bytes"]), int(entry["mtime_ns"]), str(entry["md5"]))
            for entry in manifest["objects"]
            if "mtime_ns" in entry and "slo_etag" not in entry
        }
    except (KeyError, TypeError, ValueError):
        return {}
