"""download(): temporary name, resume after a broken body, size and MD5 checks, cleanup."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from hbp_image_tasks.download import RetryPolicy, download, file_md5, stated_md5
from hbp_image_tasks.errors import FetchError
from hbp_image_tasks.swift import ObjectStream

BODY = bytes(range(256)) * 40  # 10 KiB
MD5 = hashlib.md5(BODY).hexdigest()
FAST = RetryPolicy(attempts=3, backoff=0.0, max_backoff=0.0, max_time=60.0)
SWIFT = {"x-trans-id": "tx1"}


class Server:
    """Answers ``open_stream(start)`` from BODY; may break bodies off or ignore ranges."""

    def __init__(self, breaks: list[int] = (), honours_range: bool = True, headers=None):
        self.breaks = list(breaks)  # each answer breaks off after this many bytes
        self.honours_range = honours_range
        self.headers = {"content-length": str(len(BODY)), **(headers or {})}
        self.starts: list[int] = []

    def __call__(self, start: int) -> ObjectStream:
        self.starts.append(start)
        if start and self.honours_range:
            headers = {
                **self.headers,
                "content-range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}",
                "content-length": str(len(BODY) - start),
            }
            return ObjectStream(206, headers, self._chunks(start), lambda: None)
        return ObjectStream(200, self.headers, self._chunks(0), lambda: None)

    def _chunks(self, start: int) -> Iterator[bytes]:
        stop = len(BODY)
        broken = bool(self.breaks)
        if broken:
            stop = start + self.breaks.pop(0)
        for offset in range(start, stop, 1000):
            yield BODY[offset : min(offset + 1000, stop)]
        if broken:
            raise requests.exceptions.ConnectionError("connection reset")


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_complete_body_is_renamed_into_place_with_its_md5(tmp_path):
    target = tmp_path / "s001.png"
    md5 = download(target, Server(), expected_size=len(BODY), expected_md5=MD5)
    assert md5 == MD5 == file_md5(target)
    assert target.read_bytes() == BODY
    assert leftovers(tmp_path) == ["s001.png"]


def test_broken_body_resumes_from_where_it_stopped(tmp_path):
    server = Server(breaks=[3000, 2500])
    progress: list[int] = []
    retries: list[None] = []
    md5 = download(
        tmp_path / "f",
        server,
        expected_md5=MD5,
        policy=FAST,
        on_bytes=progress.append,
        on_retry=lambda: retries.append(None),
    )
    assert md5 == MD5 and (tmp_path / "f").read_bytes() == BODY
    assert server.starts == [0, 3000, 5500]
    assert len(retries) == 2 and sum(progress) == len(BODY)


def test_server_ignoring_the_range_makes_it_start_again(tmp_path):
    server = Server(breaks=[4000], honours_range=False)
    progress: list[int] = []
    download(tmp_path / "f", server, policy=FAST, on_bytes=progress.append)
    assert (tmp_path / "f").read_bytes() == BODY
    assert server.starts == [0, 4000]
    assert sum(progress) == len(BODY)  # the discarded 4000 bytes were taken back


def test_body_breaking_off_too_often_fails_and_leaves_nothing(tmp_path):
    server = Server(breaks=[1000] * 10)
    with pytest.raises(FetchError, match="broke off 4 times") as caught:
        download(tmp_path / "f", server, policy=FAST, object_name="stack/f")
    assert caught.value.object_name == "stack/f"
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "expected, message",
    [
        ({"expected_size": len(BODY) + 1}, f"got {len(BODY)} bytes, expected {len(BODY) + 1}"),
        ({"expected_md5": "0" * 32}, f"MD5 {MD5} of the received data differs"),
    ],
)
def test_body_that_is_not_what_was_expected_is_refused_and_removed(tmp_path, expected, message):
    (tmp_path / "f").write_bytes(b"the old version")
    with pytest.raises(FetchError, match=message) as caught:
        download(tmp_path / "f", Server(), object_name="f", **expected)
    assert caught.value.object_name == "f"
    assert leftovers(tmp_path) == ["f"]
    assert (tmp_path / "f").read_bytes() == b"the old version"  # never half-replaced


def test_md5_stated_by_swift_is_checked_when_the_caller_knows_none(tmp_path):
    lying = Server(headers={**SWIFT, "etag": "f" * 32})
    with pytest.raises(FetchError, match="differs from the stated " + "f" * 32):
        download(tmp_path / "f", lying)


def test_dynamic_large_object_is_checked_by_length_only(tmp_path):
    # Listed with its empty manifest's size and MD5, which the body never matches.
    server = Server(headers={"x-object-manifest": "segments/f/"})
    md5 = download(tmp_path / "f", server, expected_size=0, expected_md5="d41d8cd9" * 4)
    assert md5 == MD5


@pytest.mark.parametrize(
    "headers, md5",
    [
        ({"Content-MD5": base64.b64encode(bytes.fromhex(MD5)).decode()}, MD5),
        ({**SWIFT, "ETag": f'"{MD5.upper()}"'}, MD5),
        ({"ETag": MD5}, None),  # a plain web server's ETag is no MD5
        ({**SWIFT, "ETag": f"W/{MD5}"}, None),
        ({**SWIFT, "ETag": MD5, "X-Static-Large-Object": "True"}, None),
        ({**SWIFT, "ETag": MD5, "Content-Encoding": "gzip"}, None),
        ({**SWIFT, "ETag": "not-an-md5"}, None),
    ],
)
def test_stated_md5_is_only_a_digest_of_the_body(headers, md5):
    assert stated_md5(headers) == md5


def test_retry_pauses_grow_but_stay_bounded():
    policy = RetryPolicy(backoff=0.5, max_backoff=4.0)
    assert [policy.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
