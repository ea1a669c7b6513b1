"""Sharded datasets on the real local Swift: tensorstore reads every scale over HTTP as the
unsharded conversion, Range GETs through static large objects, CORS for Range reads,
and unfinished shards are never published."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
from precomputed_reference import read_scale
from swiftclient.exceptions import ClientException
from test_sharded_conversion import KINDS, SMALL, write_kind

from hbp_image_tasks import errors, layout, shard_writer
from hbp_image_tasks.errors import InputError
from hbp_image_tasks.ingest_ngs import convert
from hbp_image_tasks.settings import load_settings
from hbp_image_tasks.swift import SwiftConnection
from hbp_image_tasks.upload_results import UploadOptions, main, upload

ts = pytest.importorskip("tensorstore")
swift = pytest.mark.swift


def connection(swift_settings_file: Path) -> SwiftConnection:
    return SwiftConnection(
        load_settings(swift_settings_file), error_type=errors.UploadError, starting_backoff=0.05
    )


def convert_both(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """Returns (sharded, unsharded) conversions of a small stack of ``kind``."""
    write_kind(tmp_path / "in", kind)
    params = SMALL.replace(shard_size=8 * 8**3 * 4 * KINDS[kind][2], **KINDS[kind][0])
    convert(tmp_path / "in", tmp_path / "sharded", params, jobs=2, show_progress=False)
    plain = params.replace(sharding=False)
    convert(tmp_path / "in", tmp_path / "plain", plain, jobs=2, show_progress=False)
    return tmp_path / "sharded", tmp_path / "plain"


@swift
@pytest.mark.parametrize("kind", ["uint8", "uint16", "rgb", "segmentation"])
def test_tensorstore_reads_the_published_shards_over_http_as_the_unsharded_conversion(
    tmp_path, kind, swift_settings_file, unique_container
):
    sharded, plain = convert_both(tmp_path, kind)
    container = unique_container()
    unique_container("segments")
    # Segments of 2 kB: the larger shards go up as static large objects.
    result = upload(
        sharded,
        container,
        connection(swift_settings_file),
        UploadOptions(prefix="ds", segment_size=2048),
        show_progress=False,
    )
    info = json.loads((sharded / "info").read_text())
    assert result.uploaded == 1 + sum(
        len(list((sharded / scale["key"]).iterdir())) for scale in info["scales"]
    )
    for index in range(len(info["scales"])):
        store = ts.open(
            {
                "driver": "neuroglancer_precomputed",
                "kvstore": f"{result.public_url}/",
                "scale_index": index,
            }
        ).result()
        voxels = np.asarray(store.read().result()).transpose(3, 2, 1, 0)
        np.testing.assert_array_equal(voxels, read_scale(plain, index), err_msg=f"scale {index}")


@swift
def test_range_get_through_a_static_large_shard_returns_its_bytes_with_cors(
    tmp_path, swift_settings_file, unique_container, proxy_log, local_swift
):
    sharded, _ = convert_both(tmp_path, "uint16")
    container = unique_container()
    unique_container("segments")
    result = upload(
        sharded,
        container,
        connection(swift_settings_file),
        UploadOptions(segment_size=1000),
        show_progress=False,
    )
    key = json.loads((sharded / "info").read_text())["scales"][0]["key"]
    shard = max((sharded / key).iterdir(), key=lambda p: p.stat().st_size)
    data = shard.read_bytes()
    assert len(data) > 2500, "the shard spans three segments"
    url = f"{result.public_url}/{key}/{shard.name}"
    head = requests.head(url)
    assert head.headers["Content-Type"] == "application/octet-stream"
    assert "Content-Encoding" not in head.headers
    assert head.headers.get("X-Static-Large-Object") == "True"
    proxy_log.mark()
    origin = "https://viewer.example.org"
    for start, end in [(0, 15), (990, 2010), (len(data) - 7, len(data) - 1)]:
        response = requests.get(url, headers={"Range": f"bytes={start}-{end}", "Origin": origin})
        assert response.status_code == 206
        assert response.content == data[start : end + 1]
        assert response.headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
        exposed = response.headers["Access-Control-Expose-Headers"].lower()
        assert "content-range" in exposed and "content-length" in exposed
    gets = [e for e in proxy_log.entries("GET") if e.path.endswith(shard.name)]
    assert [e.status for e in gets] == [206] * 3
    again = upload(
        sharded,
        container,
        connection(swift_settings_file),
        UploadOptions(segment_size=1000),
        show_progress=False,
    )
    assert again.uploaded == 0


@swift
def test_unfinished_shards_are_refused_and_nothing_is_uploaded(
    tmp_path, swift_settings_file, unique_container, swift_client, capsys
):
    write_kind(tmp_path / "in", "uint8", shape=(40, 24, 24))
    calls = []
    with pytest.raises(errors.Interrupted):
        convert(
            tmp_path / "in",
            tmp_path / "out",
            SMALL.replace(shard_size=8**3 * 64),
            jobs=2,
            show_progress=False,
            should_stop=lambda: calls.append(1) or len(calls) >= 3,
        )
    assert shard_writer.unfinished_shards(tmp_path / "out")
    (tmp_path / "out" / layout.CONVERSION_STATE_NAME).unlink()  # even without its state file
    container = unique_container()
    code = main(
        [str(tmp_path / "out"), "--container", container, "--settings", str(swift_settings_file)]
    )
    assert code == InputError.exit_code
    assert "not assembled" in capsys.readouterr().err
    with pytest.raises(ClientException, match="404"):  # the container was never made
        swift_client.head_container(container)
    with pytest.raises(InputError, match="shard"):
        upload(tmp_path / "out", container, connection(swift_settings_file), show_progress=False)
