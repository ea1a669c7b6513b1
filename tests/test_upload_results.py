"""upload_results: a converted dataset goes up to the real local Swift + Keystone v3 and is
read back anonymously as a viewer would; faults (5xx, 401, 403, 413, 422, dropped
connections) are injected with ``responses`` against an in-memory Swift."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

import numpy as np
import pytest
import requests
import responses

from hbp_image_tasks import errors, upload_results
from hbp_image_tasks.errors import InputError, Interrupted, UploadError, UsageError
from hbp_image_tasks.neuroglancer_link import neuroglancer_link
from hbp_image_tasks.settings import Secret, SwiftSettings, load_settings
from hbp_image_tasks.swift import SwiftConnection
from hbp_image_tasks.upload_plan import (MANIFEST_FILE, content_type_for,
                                         normalize_prefix, object_name_for, scan,
                                         validate_container_name)
from hbp_image_tasks.upload_results import main, parse_size, upload

swift = pytest.mark.swift

VOLUME_SHAPE = (70, 60, 50)  # x, y, z
CHUNK = 16


# ---------------------------------------------------------------------------
# a real converted dataset, made with neuroglancer-scripts

def make_dataset(directory: Path, volume: np.ndarray, flat: bool) -> Path:
    """Converts ``volume`` (x, y, z) to precomputed in ``directory``; returns it."""
    import nibabel
    from neuroglancer_scripts.scripts import compute_scales
    from neuroglancer_scripts.scripts import generate_scales_info
    from neuroglancer_scripts.scripts import volume_to_precomputed

    directory.mkdir(parents=True)
    nifti = directory.parent / f"{directory.name}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    layout = ["--flat"] if flat else []
    out = str(directory)
    assert volume_to_precomputed.main(["v2p", str(nifti), out, "--generate-info"]) == 0
    assert generate_scales_info.main(["gsi", f"{out}/info_fullres.json", out,
                                      "--target-chunk-size", str(CHUNK)]) == 0
    assert volume_to_precomputed.main(["v2p", str(nifti), out] + layout) == 0
    assert compute_scales.main(["cs", out] + layout) == 0
    return directory


@pytest.fixture(scope="session")
def volume() -> np.ndarray:
    rng = np.random.default_rng(42)
    return (rng.random(VOLUME_SHAPE) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory, volume) -> dict[str, Path]:
    """Returns the flat and the nested conversion of the same volume (read-only)."""
    base = tmp_path_factory.mktemp("datasets")
    return {"flat": make_dataset(base / "flat", volume, flat=True),
            "nested": make_dataset(base / "nested", volume, flat=False)}


@pytest.fixture
def dataset(datasets, tmp_path) -> Path:
    """Returns a private copy of the flat dataset that a test may change."""
    copy = tmp_path / "results"
    shutil.copytree(datasets["flat"], copy)
    return copy


def local_objects(results: Path) -> dict[str, Path]:
    """Returns object name -> file of a dataset, as a viewer expects the names."""
    objects = {}
    for path in results.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            parts = list(path.relative_to(results).parts)
            name, _ = object_name_for(parts)
            objects[name] = path
    return objects


# ---------------------------------------------------------------------------
# the local side: names, headers, what is left out

@pytest.mark.parametrize("parts, name, encoding", [
    (["1mm", "0-16_0-16_32-48.gz"], "1mm/0-16_0-16_32-48", "gzip"),
    (["1mm", "0-16_0-16_32-48"], "1mm/0-16_0-16_32-48", ""),
    (["1mm", "0-16", "16-32", "32-48.gz"], "1mm/0-16_16-32_32-48", "gzip"),
    (["1mm", "0-16", "16-32", "32-48"], "1mm/0-16_16-32_32-48", ""),
    (["info"], "info", ""),
    (["transform.json"], "transform.json", ""),
    (["mesh", "1", "2", "3"], "mesh/1/2/3", ""),
])
def test_object_names_are_the_ones_neuroglancer_requests(parts, name, encoding):
    assert object_name_for(parts) == (name, encoding)


@pytest.mark.parametrize("name, content_type", [
    ("info", "application/json"),
    ("transform.json", "application/json"),
    ("segment_properties/info", "application/json"),
    ("8um/0-64_0-64_0-64", "application/octet-stream"),
    ("README.txt", "text/plain"),
])
def test_content_types(name, content_type):
    assert content_type_for(name) == content_type


@pytest.mark.parametrize("name", ["", "a/b", "x" * 257, "é" * 129])
def test_bad_container_names_are_refused(name):
    with pytest.raises(UsageError):
        validate_container_name(name)


@pytest.mark.parametrize("name", ["bigbrain", "x" * 256, "é" * 128, "a b"])
def test_good_container_names_are_accepted(name):
    assert validate_container_name(name) == name


@pytest.mark.parametrize("prefix, normalized", [
    ("", ""), ("/", ""), ("a/b/", "a/b"), ("/a", "a")])
def test_prefix_is_normalized(prefix, normalized):
    assert normalize_prefix(prefix) == normalized


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "./a"])
def test_prefix_with_dot_components_is_refused(prefix):
    with pytest.raises(UsageError):
        normalize_prefix(prefix)


@pytest.mark.parametrize("text, size", [("1073741824", 1 << 30), ("512M", 512 << 20),
                                        ("1G", 1 << 30), ("64KiB", 64 << 10)])
def test_segment_size_option(text, size):
    assert parse_size(text) == size


def test_dotfiles_and_symlinks_are_never_uploaded(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the dataset")
    results = tmp_path / "results"
    (results / "1mm").mkdir(parents=True)
    (results / "info").write_text("{}")
    (results / "1mm" / "0-1_0-1_0-1.gz").write_bytes(gzip.compress(b"x"))
    (results / ".hbp-conversion-state.json").write_text('{"complete": true}')
    (results / ".hidden").mkdir()
    (results / ".hidden" / "file").write_text("x")
    (results / "link-to-file").symlink_to(outside / "secret")
    (results / "link-to-dir").symlink_to(outside)
    objects, links = scan(results)
    assert [o.name for o in objects] == ["1mm/0-1_0-1_0-1", "info"]
    assert sorted(links) == ["link-to-dir", "link-to-file"]


def test_two_files_for_one_object_are_refused(tmp_path):
    (tmp_path / "1mm").mkdir()
    (tmp_path / "info").write_text("{}")
    (tmp_path / "1mm" / "0-1_0-1_0-1").write_bytes(b"raw")
    (tmp_path / "1mm" / "0-1_0-1_0-1.gz").write_bytes(gzip.compress(b"raw"))
    with pytest.raises(InputError, match="both be uploaded"):
        scan(tmp_path)


@pytest.mark.parametrize("state, refused", [
    ({"complete": False}, True), ({"complete": True}, False), (None, False)])
def test_incomplete_conversion_is_refused(tmp_path, state, refused):
    (tmp_path / "info").write_text("{}")
    if state is not None:
        (tmp_path / ".hbp-conversion-state.json").write_text(json.dumps(state))

    class Unreachable:  # the refusal must come before any request
        def __getattr__(self, name):
            raise RuntimeError("no request expected")

    if refused:
        with pytest.raises(InputError, match="conversion is not complete"):
            upload(tmp_path, "c", Unreachable(), show_progress=False)
    else:
        with pytest.raises(RuntimeError, match="no request expected"):
            upload(tmp_path, "c", Unreachable(), show_progress=False)


def test_directory_without_info_is_refused(tmp_path):
    (tmp_path / "1mm").mkdir()
    with pytest.raises(InputError, match="no 'info'"):
        upload(tmp_path, "c", None, show_progress=False)


def test_neuroglancer_link_opens_the_public_url():
    link = neuroglancer_link("https://swift.example.org/v1/AUTH_x/c/a/b",
                             "https://viewer.example.org", info={"type": "image"})
    base, _, fragment = link.partition("#!")
    assert base == "https://viewer.example.org/"
    state = json.loads(unquote(fragment))
    assert state["layers"][0]["source"] == "precomputed://https://swift.example.org/v1/AUTH_x/c/a/b"
    assert state["layers"][0]["type"] == "image"


# ---------------------------------------------------------------------------
# against the real local Swift + Keystone v3

@pytest.fixture
def settings(swift_settings_file) -> SwiftSettings:
    return load_settings(swift_settings_file)


def fresh_connection(settings: SwiftSettings, **options) -> SwiftConnection:
    options.setdefault("starting_backoff", 0.05)
    return SwiftConnection(settings, error_type=UploadError, **options)


def decode_chunk(data: bytes, name: str) -> np.ndarray:
    """Returns the voxels of a raw uint8 chunk named ``x0-x1_y0-y1_z0-z1`` as (x, y, z)."""
    (x0, x1), (y0, y1), (z0, z1) = (map(int, r.split("-")) for r in name.split("_"))
    shape = (z1 - z0, y1 - y0, x1 - x0)  # Neuroglancer raw chunks are C-order z, y, x
    return np.frombuffer(data, dtype=np.uint8).reshape(shape).transpose(2, 1, 0)


def read_back_as_a_viewer(public_url: str, results: Path, volume: np.ndarray) -> int:
    """GETs info and every chunk anonymously, as Neuroglancer does; returns the chunk count.

    Checks the headers a browser relies on and compares the full-resolution
    voxels with the volume that was converted.
    """
    session = requests.Session()
    response = session.get(f"{public_url}/info")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    assert "Content-Encoding" not in response.headers
    info = response.json()
    assert info == json.loads((results / "info").read_text())
    local = local_objects(results)
    checked = 0
    for scale in info["scales"]:
        names = [n for n in local if n.startswith(scale["key"] + "/")]
        assert names
        for name in names:
            response = session.get(f"{public_url}/{name}")  # no .gz, as the viewer asks
            assert response.status_code == 200, name
            assert response.headers.get("Content-Encoding") == "gzip", name
            expected = gzip.decompress(local[name].read_bytes())
            assert response.content == expected, name  # requests decoded the gzip
            if scale is info["scales"][0]:
                chunk = decode_chunk(response.content, name.split("/")[-1])
                (x0, _), (y0, _), (z0, _) = (map(int, r.split("-"))
                                             for r in name.split("/")[-1].split("_"))
                sx, sy, sz = chunk.shape
                assert np.array_equal(chunk, volume[x0:x0 + sx, y0:y0 + sy, z0:z0 + sz])
            checked += 1
    return checked


def listing(swift_client, container: str, prefix: str = "") -> dict[str, dict]:
    _, objects = swift_client.get_container(container, prefix=prefix or None,
                                            full_listing=True)
    return {o["name"]: o for o in objects}


def container_path(local_swift, container: str) -> str:
    """Returns the container's path as the proxy log shows it (also matches <container>_segments)."""
    return f"{urlparse(local_swift.storage_url).path}/{container}"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@swift
@pytest.mark.parametrize("layout, trailing_slash", [("flat", True), ("nested", False)])
def test_uploaded_dataset_is_read_back_anonymously_as_a_viewer_would(
        datasets, volume, swift_settings_file, unique_container, swift_client,
        tmp_path, capsys, layout, trailing_slash):
    results = tmp_path / layout
    shutil.copytree(datasets[layout], results)
    container = unique_container()
    argument = str(results) + ("/" if trailing_slash else "")
    code = main([argument, "--container", container, "--prefix", "bb/8um/",
                 "--settings", str(swift_settings_file), "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    public_url = re.search(r"^public URL: (\S+)$", out, re.M).group(1)
    assert public_url.endswith(f"/{container}/bb/8um")
    link = re.search(r"^Neuroglancer: (\S+)$", out, re.M).group(1)
    assert f"precomputed://{public_url}" in unquote(link)
    chunks = read_back_as_a_viewer(public_url, results, volume)
    assert chunks == len(local_objects(results)) - 3  # info, info_fullres.json, transform.json
    # The manifest lists every object with the MD5 Swift holds.
    manifest = json.loads((results / MANIFEST_FILE).read_text())
    listed = listing(swift_client, container, "bb/8um/")
    assert {o["name"]: o["md5"] for o in manifest["objects"]} == {
        name: o["hash"] for name, o in listed.items()}
    assert len(listed) == len(local_objects(results))


@swift
@pytest.mark.parametrize("origin_option, origin", [
    ("*", "https://any.example.org"), ("https://viewer.example.org", "https://viewer.example.org")])
def test_cors_answers_a_browser_origin(dataset, swift_settings_file, unique_container,
                                       local_swift, origin_option, origin):
    container = unique_container()
    assert main([str(dataset), "--container", container, "--cors-origin", origin_option,
                 "--settings", str(swift_settings_file), "-q"]) == 0
    url = f"{local_swift.storage_url}/{container}/info"
    preflight = requests.options(url, headers={
        "Origin": origin, "Access-Control-Request-Method": "GET"})
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] in ("*", origin)
    response = requests.get(url, headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] in ("*", origin)
    if origin_option != "*":
        other = requests.get(url, headers={"Origin": "https://evil.example.org"})
        assert "Access-Control-Allow-Origin" not in other.headers


@swift
def test_unchanged_rerun_sends_no_put_and_a_changed_file_is_sent_again(
        dataset, settings, unique_container, proxy_log, swift_client, local_swift):
    container = unique_container()
    path = container_path(local_swift, container)
    first = upload(dataset, container, fresh_connection(settings), show_progress=False)
    total = len(local_objects(dataset))
    assert (first.uploaded, first.skipped, first.total_objects) == (total, 0, total)
    assert proxy_log.count("PUT", path + "/") == total

    proxy_log.mark()
    second = upload(dataset, container, fresh_connection(settings), show_progress=False)
    assert (second.uploaded, second.skipped) == (0, total)
    assert proxy_log.count("PUT", path) == 0
    assert proxy_log.count("HEAD", path) <= upload_results.HEADER_SAMPLE + 1  # not one per object

    chunk = sorted(dataset.glob("1mm/*.gz"))[0]
    chunk.write_bytes(gzip.compress(b"\0" * (16 * 16 * 16)))
    proxy_log.mark()
    third = upload(dataset, container, fresh_connection(settings), show_progress=False)
    assert (third.uploaded, third.skipped) == (1, total - 1)
    puts = proxy_log.entries("PUT", path)
    assert [e.path.rsplit("/", 2)[-2:] for e in puts] == [["1mm", chunk.name[:-3]]]
    assert listing(swift_client, container)[f"1mm/{chunk.name[:-3]}"]["hash"] == md5_of(chunk)

    proxy_log.mark()
    forced = upload(dataset, container, fresh_connection(settings), show_progress=False,
                    skip_identical=False)
    assert forced.uploaded == total
    assert proxy_log.count("PUT", path + "/") == total


@swift
def test_dry_run_writes_nothing(dataset, swift_settings_file, unique_container,
                                proxy_log, capsys, swift_client, local_swift):
    container = unique_container()
    code = main([str(dataset), "--container", container, "--dry-run",
                 "--settings", str(swift_settings_file), "-q"])
    out = capsys.readouterr().out
    assert code == 0
    total = len(local_objects(dataset))
    assert f"would upload {total} objects" in out
    path = container_path(local_swift, container)
    assert proxy_log.count("PUT", path) == proxy_log.count("POST", path) == 0
    assert not (dataset / MANIFEST_FILE).exists()
    from swiftclient.exceptions import ClientException
    with pytest.raises(ClientException):
        swift_client.head_container(container)


@swift
def test_private_upload_is_not_readable_anonymously(dataset, swift_settings_file,
                                                    unique_container, local_swift, capsys):
    container = unique_container()
    assert main([str(dataset), "--container", container, "--private",
                 "--settings", str(swift_settings_file), "-q"]) == 0
    assert "private" in capsys.readouterr().out
    response = requests.get(f"{local_swift.storage_url}/{container}/info")
    assert response.status_code in (401, 403)


@swift
def test_large_file_goes_up_as_a_static_large_object(dataset, settings, unique_container,
                                                     local_swift, proxy_log):
    container = unique_container()
    unique_container("segments")  # makes the fixture delete <container>_segments too
    big = os.urandom(300 * 1024 + 17)
    (dataset / "extra.bin").write_bytes(big)
    result = upload(dataset, container, fresh_connection(settings), show_progress=False,
                    segment_size=100 * 1024)
    assert result.uploaded == len(local_objects(dataset))
    response = requests.get(f"{result.public_url}/extra.bin")
    assert response.status_code == 200 and response.content == big
    proxy_log.mark()
    again = upload(dataset, container, fresh_connection(settings), show_progress=False,
                   segment_size=100 * 1024)
    assert again.uploaded == 0
    assert proxy_log.count("PUT", container_path(local_swift, container)) == 0
