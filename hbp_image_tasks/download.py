"""Streams one remote body into a local file: temporary name, MD5 while writing,
resume with ``Range`` after a broken transfer, verification, then rename.

Callers hand in a function that opens the body from a byte offset, so the same
code serves plain HTTP(S) URLs and Swift objects (anonymous or authenticated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Callable

import requests
import urllib3.exceptions

from .atomic import temporary_name
from .errors import FetchError
from .swift import ObjectStream

logger = logging.getLogger(__name__)

READ_CHUNK = 1 << 20

# What a broken body looks like, whichever client library read it. Local disk
# errors are plain OSError and must not be retried, so only these are caught.
TRANSIENT_ERRORS = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    socket.timeout,
)

MD5_PATTERN = re.compile(r"[0-9a-f]{32}")


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry: both the count and the time are bounded."""

    attempts: int = 8
    backoff: float = 0.5
    max_backoff: float = 30.0
    max_time: float = 900.0

    def delay(self, attempt: int) -> float:
        """Returns the pause before retry number ``attempt`` (1-based)."""
        return min(self.max_backoff, self.backoff * 2 ** (attempt - 1))


DEFAULT_RETRY = RetryPolicy()


def file_md5(path: Path, chunk_size: int = READ_CHUNK) -> str:
    """Returns the hex MD5 of the file at ``path``."""
    digest = hashlib.md5()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stated_md5(headers: Mapping[str, str]) -> str | None:
    """Returns the body's MD5 as stated by the server's headers, or None.

    ``Content-MD5`` is always the body's MD5. An ``ETag`` counts only when the
    server is Swift (or S3) and the object is not a large object, whose ETag is
    the MD5 of its manifest, not of the content.
    """
    headers = {k.lower(): v for k, v in headers.items()}
    content_md5 = headers.get("content-md5")
    if content_md5:
        import base64
        import binascii

        try:
            return base64.b64decode(content_md5, validate=True).hex()
        except (binascii.Error, ValueError):
            pass
    if headers.get("content-encoding", "identity") != "identity":
        return None
    if "x-static-large-object" in headers or "x-object-manifest" in headers:
        return None
    from_object_store = any(
        key in headers for key in ("x-trans-id", "x-openstack-request-id", "x-amz-request-id")
    )
    etag = headers.get("etag", "")
    if not from_object_store or etag.startswith("W/"):
        return None
    etag = etag.strip('"').lower()
    return etag if MD5_PATTERN.fullmatch(etag) else None


def content_range_start(headers: Mapping[str, str]) -> int | None:
    """Returns the first byte of a 206 response's ``Content-Range``, None without one."""
    match = re.match(r"bytes (\d+)-", headers.get("content-range", ""))
    return int(match.group(1)) if match else None


class _Transfer:
    """One body on its way into its temporary file: what was written, its MD5, what
    is expected of it."""

    def __init__(
        self,
        out: BinaryIO,
        expected_size: int | None,
        expected_md5: str | None,
        description: str,
        on_bytes: Callable[[int], None] | None,
        name: str | None = None,
    ):
        self.out = out
        self.name = name
        self.expected_size = expected_size
        self.expected_md5 = expected_md5
        self.description = description
        self.on_bytes = on_bytes or (lambda n: None)
        self.written = 0
        self.digest = hashlib.md5()

    def begin(self, stream: ObjectStream) -> None:
        """Takes a new response: a resume, else a fresh start whose headers say what to expect."""
        if self.written and (
            stream.status != 206 or content_range_start(stream.headers) != self.written
        ):
            # The server ignored the Range (or the object changed, with
            # If-Range): start again from the first byte.
            logger.debug(
                "%s: no resume possible (status %s), restarting", self.description, stream.status
            )
            self.out.seek(0)
            self.out.truncate()
            self.on_bytes(-self.written)
            self.written, self.digest = 0, hashlib.md5()
        if not self.written and stream.status == 200:
            self._expect_from(stream.headers)

    def _expect_from(self, headers: Mapping[str, str]) -> None:
        if "x-object-manifest" in headers:
            # A dynamic large object is listed with its empty manifest's size
            # and MD5: only the body's length counts.
            self.expected_size, self.expected_md5 = None, None
        elif "x-static-large-object" in headers:
            self.expected_md5 = None  # the ETag of its manifest
        if self.expected_size is None and "content-length" in headers:
            self.expected_size = int(headers["content-length"])
        if self.expected_md5 is None:
            self.expected_md5 = stated_md5(headers)

    def copy(self, stream: ObjectStream) -> None:
        """Appends the body; a broken transfer raises one of TRANSIENT_ERRORS."""
        for chunk in stream:
            self.out.write(chunk)
            self.digest.update(chunk)
            self.written += len(chunk)
            self.on_bytes(len(chunk))

    def verify(self) -> str:
        """Returns the MD5 of what was written, or raises FetchError if it is not what was
        expected."""
        if self.expected_size is not None and self.written != self.expected_size:
            raise FetchError(
                f"{self.description}: got {self.written} bytes, expected {self.expected_size}",
                object_name=self.name,
            )
        md5 = self.digest.hexdigest()
        if self.expected_md5 is not None and md5 != self.expected_md5.lower():
            raise FetchError(
                f"{self.description}: MD5 {md5} of the received data "
                f"differs from the stated {self.expected_md5}",
                object_name=self.name,
            )
        return md5


def _receive(
    transfer: _Transfer,
    open_stream: Callable[[int], ObjectStream],
    stream: ObjectStream | None,
    policy: RetryPolicy,
    on_retry: Callable[[], None] | None,
) -> None:
    """Copies the body into ``transfer``, resuming after breaks within ``policy``."""
    deadline = time.monotonic() + policy.max_time
    attempt = 0
    while True:
        if stream is None:
            stream = open_stream(transfer.written)
        with stream:
            transfer.begin(stream)
            try:
                transfer.copy(stream)
                return
            except TRANSIENT_ERRORS as exc:
                error = exc
        stream = None
        attempt += 1
        if attempt > policy.attempts or time.monotonic() > deadline:
            raise FetchError(
                f"{transfer.description}: the transfer broke off {attempt} "
                f"times, last after {transfer.written} bytes: {type(error).__name__}",
                object_name=transfer.name,
            ) from None
        pause = policy.delay(attempt)
        logger.warning(
            "%s: transfer broke off after %d bytes (%s); resuming in %.1f s",
            transfer.description,
            transfer.written,
            type(error).__name__,
            pause,
        )
        if on_retry:
            on_retry()
        time.sleep(pause)


def download(
    path: Path,
    open_stream: Callable[[int], ObjectStream],
    *,
    expected_size: int | None = None,
    expected_md5: str | None = None,
    first: ObjectStream | None = None,
    description: str = "",
    policy: RetryPolicy = DEFAULT_RETRY,
    on_bytes: Callable[[int], None] | None = None,
    on_retry: Callable[[], None] | None = None,
    object_name: str | None = None,
) -> str:
    """Writes the body that ``open_stream(start)`` gives to ``path``; returns its MD5.

    The body goes to the temporary name ``.NAME.tmp`` and is renamed to ``path``
    only once its size and MD5 match what is expected (or what the first
    response stated). A body that breaks off is resumed from where it stopped
    when the server answers the ``Range`` request with 206, else fetched again
    from the start. Nothing is left behind when this raises; a FetchError
    carries ``object_name``.
    """
    part = Path(temporary_name(path, unique=False))
    try:
        with open(part, "wb") as out:
            transfer = _Transfer(
                out, expected_size, expected_md5, description or str(path), on_bytes, object_name
            )
            _receive(transfer, open_stream, first, policy, on_retry)
        md5 = transfer.verify()
        os.replace(part, path)
        return md5
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()
        raise
