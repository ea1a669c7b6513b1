"""upload_plan, the local side of an upload: digests, segments, safe reads, the manifest cache,
object name limits and the publish check, without any Swift."""

from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

import pytest

from hbp_image_tasks import layout
from hbp_image_tasks.errors import InputError
from hbp_image_tasks.upload_plan import (
    Digest,
    LocalObject,
    SegmentReader,
    check_conversion_complete,
    check_object_names,
    file_digest,
    open_regular,
    read_exactly,
    read_manifest_digests,
    scan,
)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


PAYLOAD = bytes(range(256)) * 41  # 10496 bytes, not a multiple of the segment sizes below


@pytest.mark.parametrize("segment_size", [1000, 4096, len(PAYLOAD), len(PAYLOAD) + 1])
def test_file_digest_gives_the_md5_and_one_md5_per_segment_above_the_segment_size(
    tmp_path, segment_size
):
    path = write(tmp_path / "f", PAYLOAD)
    digest = file_digest(str(path), len(PAYLOAD), segment_size)
    assert digest.md5 == md5(PAYLOAD)
    if len(PAYLOAD) <= segment_size:
        assert digest.segments == () and digest.slo_etag == ""
        return
    offsets = range(0, len(PAYLOAD), segment_size)
    assert digest.segments == tuple(
        (offset, len(PAYLOAD[offset : offset + segment_size]), md5(PAYLOAD[offset:][:segment_size]))
        for offset in offsets
    )
    # Swift's ETag of a static large object: the MD5 of its segments' MD5s.
    assert digest.slo_etag == md5(
        "".join(md5(PAYLOAD[o:][:segment_size]) for o in offsets).encode()
    )


@pytest.mark.parametrize("listed, word", [(len(PAYLOAD) - 1, "grew"), (len(PAYLOAD) + 1, "shrank")])
def test_file_whose_size_changed_since_the_scan_is_refused(tmp_path, listed, word):
    path = write(tmp_path / "chunk", PAYLOAD)
    with pytest.raises(InputError, match=f"chunk {word} while being read"):
        file_digest(str(path), listed, 4096)
    with pytest.raises(InputError, match="changed while uploading"):
        read_exactly(str(path), listed)
    assert read_exactly(str(path), len(PAYLOAD)) == PAYLOAD


def test_segment_reader_reads_its_window_and_seeks_back_for_a_retry(tmp_path):
    path = write(tmp_path / "big", PAYLOAD)
    with SegmentReader(str(path), 1000, 3000) as reader:
        first = reader.read(100) + reader.read()
        assert first == PAYLOAD[1000:4000] and reader.tell() == 3000
        assert reader.read(10) == b""
        reader.seek(0)
        assert reader.read(5000) == PAYLOAD[1000:4000]
        reader.seek(2990)
        assert reader.read() == PAYLOAD[3990:4000]
        with pytest.raises(ValueError):
            reader.seek(0, os.SEEK_END)


def test_symlinks_and_directories_are_not_opened_as_files(tmp_path):
    target = write(tmp_path / "target", b"x")
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(InputError, match="link: cannot be opened"):
        open_regular(str(tmp_path / "link"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="dir: not a regular file"):
        open_regular(str(tmp_path / "dir"))
    with open_regular(str(target)) as stream:
        assert stream.read() == b"x"


def test_fifo_is_left_out_of_the_scan_with_a_warning(tmp_path, caplog):
    write(tmp_path / "info", b"{}")
    os.mkfifo(tmp_path / "pipe")
    objects, links = scan(tmp_path)
    assert [o.name for o in objects] == ["info"] and links == []
    assert "pipe: not a regular file" in caplog.text


def test_scan_gives_sizes_types_and_encodings_sorted_by_name(tmp_path):
    chunk = gzip.compress(b"\0" * 100)
    write(tmp_path / "8um" / "0-8_0-8_0-8.gz", chunk)
    write(tmp_path / "8um" / "0a.shard", b"s" * 7)
    write(tmp_path / "info", b'{"type": "image"}')
    objects, _ = scan(tmp_path)
    summary = [(o.name, o.size, o.content_type, o.content_encoding, o.is_metadata) for o in objects]
    assert summary == [
        ("8um/0-8_0-8_0-8", len(chunk), "application/octet-stream", "gzip", False),
        ("8um/0a.shard", 7, "application/octet-stream", "", False),
        ("info", 17, "application/json", "", True),
    ]
    assert all(o.mtime_ns == os.stat(o.path).st_mtime_ns for o in objects)


@pytest.mark.parametrize("prefix, refused", [("", False), ("p" * 1009, True), ("p" * 1008, False)])
def test_object_names_longer_than_swift_allows_with_the_prefix_are_refused(prefix, refused):
    local = LocalObject(
        "/x/8um/0-8_0-8_0-8", "8um/0-8_0-8_0-8", 1, "", ""
    )  # 15 bytes, 1 for the slash
    if refused:
        with pytest.raises(InputError, match="longer than 1024 bytes"):
            check_object_names([local], prefix)
    else:
        check_object_names([local], prefix)


def manifest_entry(name: str, data: bytes, mtime_ns: int | None = 5, **extra) -> dict:
    entry = {"name": name, "bytes": len(data), "md5": md5(data), **extra}
    if mtime_ns is not None:
        entry["mtime_ns"] = mtime_ns
    return entry


def test_manifest_cache_gives_the_md5s_of_small_objects_with_their_size_and_mtime(tmp_path):
    layout.write_upload_manifest(
        tmp_path,
        {
            "container": "c",
            "objects": [
                manifest_entry("p/info", b"{}"),
                manifest_entry("p/old", b"abc", mtime_ns=None),  # no mtime: nothing to trust
                manifest_entry("p/big", b"large", slo_etag="e"),  # its md5 is not Swift's ETag
            ],
        },
    )
    assert read_manifest_digests(tmp_path) == {"p/info": (2, 5, md5(b"{}"))}


@pytest.mark.parametrize("text", [None, "not json", "[]", '{"objects": [{"name": "x"}]}'])
def test_missing_or_foreign_manifest_is_an_empty_cache(tmp_path, text):
    if text is not None:
        (tmp_path / layout.UPLOAD_MANIFEST_NAME).write_text(text)
    assert read_manifest_digests(tmp_path) == {}


def test_digest_of_a_small_object_has_no_large_object_etag():
    assert Digest("d41d8cd98f00b204e9800998ecf8427e").slo_etag == ""


def finished_conversion(directory: Path) -> None:
    write(directory / layout.INFO_NAME, b'{"scales": []}')
    layout.write_complete_marker(directory, "f" * 64, {"chunks": 0})


@pytest.mark.parametrize(
    "make, refusal",
    [
        (lambda d: write(d / "info", b"{}"), None),  # another tool's dataset
        (finished_conversion, None),
        (
            lambda d: layout.write_conversion_state(d, layout.ConversionState("f" * 64)),
            "its conversion has not finished",
        ),
        (
            lambda d: layout.write_conversion_state(
                d, layout.ConversionState("f" * 64, slabs_done=2, slab_count=5, stopped="SIGTERM")
            ),
            "stopped by SIGTERM after slab 2/5",
        ),
        (
            lambda d: finished_conversion(d) or write(d / "info", b'{"scales": [1]}'),
            "older run",
        ),
        (
            lambda d: (
                finished_conversion(d)
                or layout.write_conversion_state(d, layout.ConversionState("e" * 64))
            ),
            "older run (another conversion has started since: its conversion has not finished",
        ),
        (
            lambda d: (
                finished_conversion(d)
                or write(d / "8um" / layout.SHARD_PIECES_DIR_NAME / "0" / "1", b"x")
            ),
            "1 shard(s) not assembled",
        ),
    ],
)
def test_upload_check_follows_the_publish_contract(tmp_path, make, refusal):
    make(tmp_path)
    if refusal is None:
        check_conversion_complete(tmp_path)
        return
    with pytest.raises(InputError) as caught:
        check_conversion_complete(tmp_path)
    message = str(caught.value)
    assert refusal in message and "run the same ingest_ngs" in message and "\n" not in message
