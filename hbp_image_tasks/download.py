"""Streams one remote body into a local file: temporary name, MD5 while writing,
resume with ``Range`` after a broken transfer, verification, then rename.

Callers hand in a function that opens the body from a byte offset, so the same
code serves plain HTTP(S) URLs and Swift objects (anonymous or authenticated).
"""

from __future__ import annotations

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
from typing import Callable

import requests
import urllib3.exceptions

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


def temporary_path(path: Path) -> Path:
    """Returns the hidden name ``.NAME.part`` used while ``path`` is written."""
    return path.with_name(f".{path.name}.part")


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


def _content_range_start(headers: Mapping[str, str]) -> int | None:
    match = re.match(r"bytes (\d+)-", headers.get("content-range", ""))
    return int(match.group(1)) if match else None


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
) -> str:
    """Writes the body that ``open_stream(start)`` gives to ``path``; returns its MD5.

    The body goes to ``.NAME.part`` and is renamed to ``path`` only once its
    size and MD5 match what is expected (or what the first response stated).
    A body that breaks off is resumed from where it stopped when the server
    answers the ``Range`` request with 206, else fetched again from the start.
    Nothing is left behind when this raises.
    """
    description = description or str(path)
    part = temporary_path(path)
    deadline = time.monotonic() + policy.max_time
    attempt = 0
    written = 0
    digest = hashlib.md5()
    stream = first
    try:
        with open(part, "wb") as out:
            while True:
                if stream is None:
                    stream = open_stream(written)
                with stream:
                    if written and (
                        stream.status != 206 or _content_range_start(stream.headers) != written
                    ):
                        # The server ignored the Range (or the object changed,
                        # with If-Range): start again from the first byte.
                        logger.debug(
                            "%s: no resume possible (status %s), restarting",
                            description,
                            stream.status,
                        )
                        out.seek(0)
                        out.truncate()
                        if on_bytes:
                            on_bytes(-written)
                        written, digest = 0, hashlib.md5()
                    if not written and stream.status == 200:
                        headers = stream.headers
                        if "x-object-manifest" in headers:
                            # A dynamic large object is listed with its empty
                            # manifest's size and MD5: only the body's length counts.
                            expected_size, expected_md5 = None, None
                        elif "x-static-large-object" in headers:
                            expected_md5 = None  # the ETag of its manifest
                        if expected_size is None and "content-length" in headers:
                            expected_size = int(headers["content-length"])
                        if expected_md5 is None:
                            expected_md5 = stated_md5(stream.headers)
                    try:
                        for chunk in stream:
                            out.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            if on_bytes:
                                on_bytes(len(chunk))
                    except TRANSIENT_ERRORS as exc:
                        stream = None
                        attempt += 1
                        if attempt > policy.attempts or time.monotonic() > deadline:
                            raise FetchError(
                                f"{description}: the transfer broke off {attempt} "
                                f"times, last after {written} bytes: "
                                f"{type(exc).__name__}"
                            ) from None
                        pause = policy.delay(attempt)
                        logger.warning(
                            "%s: transfer broke off after %d bytes (%s); resuming in %.1f s",
                            description,
                            written,
                            type(exc).__name__,
                            pause,
                        )
                        if on_retry:
                            on_retry()
                        time.sleep(pause)
                        continue
                break
        if expected_size is not None and written != expected_size:
            raise FetchError(f"{description}: got {written} bytes, expected {expected_size}")
        md5 = digest.hexdigest()
        if expected_md5 is not None and md5 != expected_md5.lower():
            raise FetchError(
                f"{description}: MD5 {md5} of the received data "
                f"differs from the stated {expected_md5}"
            )
        os.replace(part, path)
        return md5
    except BaseException:
        try:
            part.unlink()
        except FileNotFoundError:
            pass
        raise
