"""A remote object read by ranges: the bytes of the local Swift's object, one request
per run of missing blocks; a server that ignores ranges (``responses``) is refused."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import responses

from hbp_image_tasks import array_job, fetch_input, sections
from hbp_image_tasks.remote_file import BLOCK_BYTES, RangeFile, RangeUnavailable
from hbp_image_tasks.settings import load_settings
from hbp_image_tasks.swift import ObjectInfo


@pytest.mark.swift
@pytest.mark.parametrize("private", [False, True], ids=["public", "private"])
def test_a_range_file_reads_the_objects_bytes_and_fetches_each_block_once(
    make_container, swift_settings_file, tmp_path, private
):
    body = np.random.default_rng(7).integers(0, 256, 5 * BLOCK_BYTES + 100, np.uint8).tobytes()
    container = make_container({"d/big.tif": body}, public=not private)
    settings = load_settings(swift_settings_file) if private else None
    _, _, opener = fetch_input.open_container(container.url, settings)
    remote = RangeFile(opener, "d/big.tif", len(body), limit=4 * BLOCK_BYTES + 100)

    remote.seek(-10, io.SEEK_END)
    assert remote.read(100) == body[-10:]  # the last, partial block
    remote.seek(5)
    assert remote.read(BLOCK_BYTES) == body[5 : BLOCK_BYTES + 5]  # blocks 0 and 1
    assert remote.requests == 2 and sorted(remote.blocks) == [0, 1, 5]
    remote.seek(3 * BLOCK_BYTES + 7)
    assert remote.read(10) == body[3 * BLOCK_BYTES + 7 : 3 * BLOCK_BYTES + 17]
    remote.seek(0)
    assert remote.read(4 * BLOCK_BYTES) == body[: 4 * BLOCK_BYTES]  # only block 2 is missing
    assert remote.requests == 4 and remote.fetched == 4 * BLOCK_BYTES + 100

    remote.write_sparse(tmp_path / "copy")
    copy = (tmp_path / "copy").read_bytes()
    assert len(copy) == len(body)
    assert copy[: 4 * BLOCK_BYTES] == body[: 4 * BLOCK_BYTES]
    assert copy[4 * BLOCK_BYTES : 5 * BLOCK_BYTES] == bytes(BLOCK_BYTES)  # never read
    assert copy[5 * BLOCK_BYTES :] == body[5 * BLOCK_BYTES :]

    remote.seek(4 * BLOCK_BYTES)
    with pytest.raises(RangeUnavailable, match="read more than"):
        remote.read(BLOCK_BYTES)  # past the limit
    assert remote.failure is not None


def test_a_body_that_breaks_off_is_refused_for_the_whole_fetch_to_stand_in():
    import requests

    from hbp_image_tasks.swift import ObjectStream

    def opener(name: str, start: int) -> ObjectStream:
        def chunks():
            yield b"x" * 100
            raise requests.exceptions.ChunkedEncodingError("connection broken")

        return ObjectStream(200, {}, chunks(), lambda: None)

    remote = RangeFile(opener, "stack/s1.tif", 10 * BLOCK_BYTES, limit=1 << 20)
    with pytest.raises(RangeUnavailable, match="broke off .*connection broken"):
        remote.read(10)
    assert remote.failure is not None and not remote.blocks


SWIFT = "http://swift.invalid/v1/AUTH_test/c"


def libtiff_section(path) -> bytes:
    """Returns a 16-bit LZW TIFF written by libtiff, whose directory follows its strips."""
    from PIL import Image

    samples = np.random.default_rng(3).integers(0, 1 << 16, (600, 500), np.uint16)
    Image.fromarray(samples).save(path, compression="tiff_lzw")
    data = path.read_bytes()
    assert int.from_bytes(data[4:8], "little") > len(data) // 2  # the directory is at the end
    return data


@responses.activate
@pytest.mark.parametrize("honours_ranges", [True, False], ids=["ranges", "no-ranges"])
def test_the_header_copy_reads_a_tiffs_directory_at_its_end_by_ranges(
    tmp_path, caplog, honours_ranges
):
    caplog.set_level("INFO")
    original = tmp_path / "s1.tif"
    body = libtiff_section(original)

    def answer(request):
        match = re.fullmatch(r"bytes=(\d+)-", request.headers.get("Range", ""))
        if not match or not honours_ranges:
            return 200, {}, body
        start = int(match.group(1))
        return 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}, body[start:]

    responses.add_callback(responses.GET, f"{SWIFT}/stack/s1.tif", callback=answer)
    container = fetch_input.open_container(SWIFT, None)
    section = ObjectInfo("stack/s1.tif", len(body), "0" * 32)
    copy = array_job.header_copy(container, section, tmp_path / "head")
    if not honours_ranges:
        assert copy is None  # planned from the whole section instead
        assert "fetching stack/s1.tif whole to plan from" in caplog.text
        assert "answered a Range request with status 200" in caplog.text
        assert not (tmp_path / "head" / "stack" / "s1.tif").exists()
        return
    assert copy.path == tmp_path / "head" / "stack" / "s1.tif"
    assert copy.requests == len(responses.calls) <= 3
    assert copy.path.stat().st_size == len(body)
    assert sections.header_facts(copy.path) == sections.header_facts(original)
    assert sections.header_facts(copy.path)[1]  # a plain TIFF: regions are read alone
    copied = copy.path.read_bytes()
    read = [
        i
        for i in range(0, len(body), BLOCK_BYTES)
        if copied[i : i + BLOCK_BYTES] != bytes(BLOCK_BYTES)[: len(body) - i]
    ]
    assert len(read) <= 3 < len(body) // BLOCK_BYTES  # the header, the directory
    assert all(copied[i : i + BLOCK_BYTES] == body[i : i + BLOCK_BYTES] for i in read)
    assert copy.bytes_read <= len(read) * BLOCK_BYTES
