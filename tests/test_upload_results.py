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
import threading
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

import numpy as np
import pytest
import requests
import responses
from fake_keystone import FAKE_AUTH, FAKE_STORAGE, token_body

from hbp_image_tasks import errors, layout, upload_results
from hbp_image_tasks.errors import InputError, Interrupted, UploadError, UsageError
from hbp_image_tasks.layout import CONVERSION_STATE_NAME, UPLOAD_MANIFEST_NAME
from hbp_image_tasks.neuroglancer_link import neuroglancer_link
from hbp_image_tasks.settings import Secret, SwiftSettings, load_settings
from hbp_image_tasks.swift import SwiftConnection
from hbp_image_tasks.upload_plan import (
    content_type_for,
    normalize_prefix,
    object_name_for,
    scan,
    validate_container_name,
)
from hbp_image_tasks.upload_results import UploadOptions, main, parse_size, upload

swift = pytest.mark.swift

VOLUME_SHAPE = (70, 60, 50)  # x, y, z
CHUNK = 16


# ---------------------------------------------------------------------------
# a real converted dataset, made with neuroglancer-scripts


def make_dataset(directory: Path, volume: np.ndarray, flat: bool) -> Path:
    """Converts ``volume`` (x, y, z) to precomputed in ``directory``; returns it."""
    import nibabel
    from neuroglancer_scripts.scripts import (
        compute_scales,
        generate_scales_info,
        volume_to_precomputed,
    )

    directory.mkdir(parents=True)
    nifti = directory.parent / f"{directory.name}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    layout = ["--flat"] if flat else []
    out = str(directory)
    assert volume_to_precomputed.main(["v2p", str(nifti), out, "--generate-info"]) == 0
    assert (
        generate_scales_info.main(
            ["gsi", f"{out}/info_fullres.json", out, "--target-chunk-size", str(CHUNK)]
        )
        == 0
    )
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
    return {
        "flat": make_dataset(base / "flat", volume, flat=True),
        "nested": make_dataset(base / "nested", volume, flat=False),
    }


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


@pytest.mark.parametrize(
    "parts, name, encoding",
    [
        (["1mm", "0-16_0-16_32-48.gz"], "1mm/0-16_0-16_32-48", "gzip"),
        (["1mm", "0-16_0-16_32-48"], "1mm/0-16_0-16_32-48", ""),
        (["1mm", "0-16", "16-32", "32-48.gz"], "1mm/0-16_16-32_32-48", "gzip"),
        (["1mm", "0-16", "16-32", "32-48"], "1mm/0-16_16-32_32-48", ""),
        (["info"], "info", ""),
        (["transform.json"], "transform.json", ""),
        (["mesh", "1", "2", "3"], "mesh/1/2/3", ""),
    ],
)
def test_object_names_are_the_ones_neuroglancer_requests(parts, name, encoding):
    assert object_name_for(parts) == (name, encoding)


@pytest.mark.parametrize(
    "name, content_type",
    [
        ("info", "application/json"),
        ("transform.json", "application/json"),
        ("segment_properties/info", "application/json"),
        ("8um/0-64_0-64_0-64", "application/octet-stream"),
        ("8um/0a.shard", "application/octet-stream"),
        ("README.txt", "text/plain"),
    ],
)
def test_content_types(name, content_type):
    assert content_type_for(name) == content_type


@pytest.mark.parametrize("name", ["", "a/b", "x" * 257, "é" * 129])
def test_bad_container_names_are_refused(name):
    with pytest.raises(UsageError):
        validate_container_name(name)


@pytest.mark.parametrize("name", ["bigbrain", "x" * 256, "é" * 128, "a b"])
def test_good_container_names_are_accepted(name):
    assert validate_container_name(name) == name


@pytest.mark.parametrize("prefix, normalized", [("", ""), ("/", ""), ("a/b/", "a/b"), ("/a", "a")])
def test_prefix_is_normalized(prefix, normalized):
    assert normalize_prefix(prefix) == normalized


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "./a"])
def test_prefix_with_dot_components_is_refused(prefix):
    with pytest.raises(UsageError):
        normalize_prefix(prefix)


@pytest.mark.parametrize(
    "text, size",
    [("1073741824", 1 << 30), ("512M", 512 << 20), ("1G", 1 << 30), ("64KiB", 64 << 10)],
)
def test_segment_size_option(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize(
    "flags, skip_identical",
    [([], True), (["--force"], False), (["--no-skip-identical"], False)],
)
def test_force_and_no_skip_identical_send_every_object_again(flags, skip_identical):
    args = upload_results.parse_command_line(["results", "--container", "c", *flags])
    assert UploadOptions.from_args(args).skip_identical is skip_identical


def test_dotfiles_and_symlinks_are_never_uploaded(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the dataset")
    results = tmp_path / "results"
    (results / "1mm").mkdir(parents=True)
    (results / "info").write_text("{}")
    (results / "1mm" / "0-1_0-1_0-1.gz").write_bytes(gzip.compress(b"x"))
    (results / CONVERSION_STATE_NAME).write_text('{"complete": true}')
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


def test_directory_without_info_is_refused(tmp_path):
    (tmp_path / "1mm").mkdir()
    with pytest.raises(InputError, match="no 'info'"):
        upload(tmp_path, "c", None, show_progress=False)


def test_neuroglancer_link_opens_the_public_url():
    link = neuroglancer_link(
        "https://swift.example.org/v1/AUTH_x/c/a/b",
        "https://viewer.example.org",
        info={"type": "image"},
    )
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
                (x0, _), (y0, _), (z0, _) = (
                    map(int, r.split("-")) for r in name.split("/")[-1].split("_")
                )
                sx, sy, sz = chunk.shape
                assert np.array_equal(chunk, volume[x0 : x0 + sx, y0 : y0 + sy, z0 : z0 + sz])
            checked += 1
    return checked


def listing(swift_client, container: str, prefix: str = "") -> dict[str, dict]:
    _, objects = swift_client.get_container(container, prefix=prefix or None, full_listing=True)
    return {o["name"]: o for o in objects}


def container_path(local_swift, container: str) -> str:
    """Returns the container's path in the proxy log (also matches <container>_segments)."""
    return f"{urlparse(local_swift.storage_url).path}/{container}"


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@swift
@pytest.mark.parametrize("layout, trailing_slash", [("flat", True), ("nested", False)])
def test_uploaded_dataset_is_read_back_anonymously_as_a_viewer_would(
    datasets,
    volume,
    swift_settings_file,
    unique_container,
    swift_client,
    tmp_path,
    capsys,
    layout,
    trailing_slash,
):
    results = tmp_path / layout
    shutil.copytree(datasets[layout], results)
    container = unique_container()
    argument = str(results) + ("/" if trailing_slash else "")
    code = main(
        [
            argument,
            "--container",
            container,
            "--prefix",
            "bb/8um/",
            "--settings",
            str(swift_settings_file),
            "--viewer-base",
            "https://viewer.example.org/ng/",
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    public_url = re.search(r"^public URL: (\S+)$", out, re.M).group(1)
    assert public_url.endswith(f"/{container}/bb/8um")
    link = re.search(r"^Neuroglancer: (\S+)$", out, re.M).group(1)
    assert link.startswith("https://viewer.example.org/ng/#!")
    assert f"precomputed://{public_url}" in unquote(link)
    chunks = read_back_as_a_viewer(public_url, results, volume)
    assert chunks == len(local_objects(results)) - 3  # info, info_fullres.json, transform.json
    # The manifest lists every object with the MD5 Swift holds.
    manifest = json.loads((results / UPLOAD_MANIFEST_NAME).read_text())
    listed = listing(swift_client, container, "bb/8um/")
    assert {o["name"]: o["md5"] for o in manifest["objects"]} == {
        name: o["hash"] for name, o in listed.items()
    }
    assert len(listed) == len(local_objects(results))


@swift
@pytest.mark.parametrize(
    "origin_option, origin",
    [
        ("*", "https://any.example.org"),
        ("https://viewer.example.org", "https://viewer.example.org"),
    ],
)
def test_cors_answers_a_browser_origin(
    dataset, swift_settings_file, unique_container, local_swift, origin_option, origin
):
    container = unique_container()
    assert (
        main(
            [
                str(dataset),
                "--container",
                container,
                "--cors-origin",
                origin_option,
                "--settings",
                str(swift_settings_file),
                "-q",
            ]
        )
        == 0
    )
    url = f"{local_swift.storage_url}/{container}/info"
    preflight = requests.options(
        url, headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
    )
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
    dataset, settings, unique_container, proxy_log, swift_client, local_swift
):
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
    forced = upload(
        dataset,
        container,
        fresh_connection(settings),
        UploadOptions(skip_identical=False),
        show_progress=False,
    )
    assert forced.uploaded == total
    assert proxy_log.count("PUT", path + "/") == total


@swift
def test_files_deleted_after_their_upload_are_verified_in_their_container_not_sent(
    dataset, settings, unique_container, proxy_log, swift_client, local_swift
):
    container = unique_container()
    path = container_path(local_swift, container)
    upload(dataset, container, fresh_connection(settings), show_progress=False)
    total = len(local_objects(dataset))
    # What a unit of ingest --array --cleanup leaves: its uploaded files recorded, then deleted.
    chunks = sorted(dataset.glob("1mm/*.gz"))[:3]
    entries = [
        {
            "name": f"1mm/{chunk.name[:-3]}",
            "bytes": chunk.stat().st_size,
            "md5": md5_of(chunk),
            "content_encoding": "gzip",
        }
        for chunk in chunks
    ]
    record = {"container": container, "prefix": "", "objects": entries}
    layout.write_released(dataset, "unit-a", record)
    for chunk in chunks:
        chunk.unlink()

    proxy_log.mark()
    result = upload(dataset, container, fresh_connection(settings), show_progress=False)
    assert (result.uploaded, result.skipped, result.total_objects) == (0, total, total)
    assert proxy_log.count("PUT", path) == 0
    verified = {e["name"]: e["md5"] for e in layout.read_upload_manifest(dataset)["objects"]}
    assert all(verified[e["name"]] == e["md5"] for e in entries)

    # Anywhere else the dataset would lack them: refused before any request.
    other = unique_container("other")
    with pytest.raises(InputError) as refused:
        upload(dataset, other, fresh_connection(settings), show_progress=False)
    assert str(refused.value) == (
        f"{dataset}: 3 files of unit unit-a were deleted after their upload to container "
        f"{container} (ingest --array --cleanup); publish to that container and prefix, "
        "or convert again with --restart"
    )
    assert swift_client.get_account(prefix=other)[1] == []

    # One of them gone from the container: nothing is sent, the object is named.
    swift_client.delete_object(container, entries[1]["name"])
    proxy_log.mark()
    with pytest.raises(upload_results.ReleasedObjectsMissing) as caught:
        upload(dataset, container, fresh_connection(settings), show_progress=False)
    assert caught.value.names == [entries[1]["name"]]
    assert "1 of 3 objects deleted locally after their upload" in str(caught.value)
    assert f"{entries[1]['name']}: missing" in str(caught.value)
    assert proxy_log.count("PUT", path) == 0


@swift
def test_dry_run_writes_nothing(
    dataset, swift_settings_file, unique_container, proxy_log, capsys, swift_client, local_swift
):
    container = unique_container()
    code = main(
        [
            str(dataset),
            "--container",
            container,
            "--dry-run",
            "--settings",
            str(swift_settings_file),
            "-q",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    total = len(local_objects(dataset))
    assert f"would upload {total} objects" in out
    path = container_path(local_swift, container)
    assert proxy_log.count("PUT", path) == proxy_log.count("POST", path) == 0
    assert not (dataset / UPLOAD_MANIFEST_NAME).exists()
    from swiftclient.exceptions import ClientException

    with pytest.raises(ClientException):
        swift_client.head_container(container)


@swift
def test_private_upload_is_not_readable_anonymously(
    dataset, swift_settings_file, unique_container, local_swift, capsys
):
    container = unique_container()
    assert (
        main(
            [
                str(dataset),
                "--container",
                container,
                "--private",
                "--settings",
                str(swift_settings_file),
                "-q",
            ]
        )
        == 0
    )
    assert "private" in capsys.readouterr().out
    response = requests.get(f"{local_swift.storage_url}/{container}/info")
    assert response.status_code in (401, 403)


@swift
def test_large_file_goes_up_as_a_static_large_object(
    dataset, settings, unique_container, local_swift, proxy_log
):
    container = unique_container()
    unique_container("segments")  # makes the fixture delete <container>_segments too
    big = os.urandom(300 * 1024 + 17)
    (dataset / "extra.bin").write_bytes(big)
    result = upload(
        dataset,
        container,
        fresh_connection(settings),
        UploadOptions(segment_size=100 * 1024),
        show_progress=False,
    )
    assert result.uploaded == len(local_objects(dataset))
    response = requests.get(f"{result.public_url}/extra.bin")
    assert response.status_code == 200 and response.content == big
    proxy_log.mark()
    again = upload(
        dataset,
        container,
        fresh_connection(settings),
        UploadOptions(segment_size=100 * 1024),
        show_progress=False,
    )
    assert again.uploaded == 0
    assert proxy_log.count("PUT", container_path(local_swift, container)) == 0


# ---------------------------------------------------------------------------
# failure injection with ``responses`` against an in-memory Swift


class FakeSwift:
    """Keystone v3 tokens and enough of Swift for an upload, with injectable faults."""

    def __init__(self, mock: responses.RequestsMock):
        self.containers: dict[str, dict] = {}
        self.objects: dict[tuple[str, str], dict] = {}
        self.tokens: set[str] = set()
        self.issued = 0
        self.faults: list[list] = []  # [method, name regex, status or exception, times]
        self.lose: set[str] = set()  # names whose PUT is answered 201 but not stored
        self.wrong_etag: set[str] = set()
        self.requests: list[tuple[str, str]] = []
        self.after_put = None  # called with the number of stored PUTs
        self.puts = 0
        self._lock = threading.Lock()
        mock.add_callback(responses.POST, FAKE_AUTH + "/auth/tokens", self.authenticate)
        pattern = re.compile(re.escape(FAKE_STORAGE) + r"/([^/?]+)(?:/([^?]*))?(?:\?.*)?$")
        for method in ("GET", "HEAD", "PUT", "POST", "OPTIONS"):
            mock.add_callback(method, pattern, self.handle)

    def fail(self, method: str, name: str, outcome, times: int = 1) -> None:
        self.faults.append([method, re.compile(name), outcome, times])

    def revoke_tokens(self) -> None:
        self.tokens.clear()

    def settings(self) -> SwiftSettings:
        return SwiftSettings(
            os_username="u",
            os_password=Secret("pw-secret"),
            os_auth_url=FAKE_AUTH,
            os_project_id="0123",
        )

    def connection(self, **options) -> SwiftConnection:
        options.setdefault("retries", 5)
        return SwiftConnection(
            self.settings(), starting_backoff=0.01, error_type=UploadError, **options
        )

    def authenticate(self, request):
        with self._lock:
            self.issued += 1
            token = f"token-{self.issued}"
            self.tokens.add(token)
        return 201, {"X-Subject-Token": token}, json.dumps(token_body())

    @staticmethod
    def _body(request) -> bytes:
        body = request.body
        if body is None:
            return b""
        if hasattr(body, "read"):
            return body.read()
        if isinstance(body, str):
            return body.encode()
        if isinstance(body, bytes):
            return body
        return b"".join(body)

    def handle(self, request):
        url = urlparse(request.url)
        path = url.path[len(urlparse(FAKE_STORAGE).path) + 1 :]
        container, _, name = path.partition("/")
        container, name = unquote(container), unquote(name)
        method = request.method
        with self._lock:
            self.requests.append((method, name))
            for fault in self.faults:
                if fault[3] > 0 and fault[0] == method and fault[1].fullmatch(name):
                    fault[3] -= 1
                    if isinstance(fault[2], Exception):
                        raise fault[2]
                    return fault[2], {}, b""
        # swiftclient sends some header values as bytes
        request.headers = {
            k: v.decode() if isinstance(v, bytes) else v for k, v in request.headers.items()
        }
        request.headers = requests.structures.CaseInsensitiveDict(request.headers)
        token = request.headers.get("X-Auth-Token")
        stored = self.containers.get(container)
        if token is None:
            return self.anonymous(method, container, name, request)
        if token not in self.tokens:
            return 401, {}, b""
        if not name:
            return self.container_request(method, container, stored, url, request)
        if stored is None:
            return 404, {}, b""
        key = (container, name)
        if method == "PUT":
            data = self._body(request)
            md5 = hashlib.md5(data).hexdigest()
            if request.headers.get("ETag") and request.headers["ETag"] != md5:
                return 422, {}, b""
            with self._lock:
                if name not in self.lose:
                    self.objects[key] = {
                        "data": data,
                        "md5": md5,
                        "content_type": request.headers.get("Content-Type", ""),
                        "content_encoding": request.headers.get("Content-Encoding", ""),
                    }
                self.puts += 1
                count = self.puts
            if self.after_put is not None:
                self.after_put(count)
            etag = "0" * 32 if name in self.wrong_etag else md5
            return 201, {"ETag": etag}, b""
        found = self.objects.get(key)
        if found is None:
            return 404, {}, b""
        headers = {"Content-Type": found["content_type"], "ETag": found["md5"]}
        if found["content_encoding"]:
            headers["Content-Encoding"] = found["content_encoding"]
        return 200, headers, found["data"] if method == "GET" else b""

    def container_request(self, method, container, stored, url, request):
        if method == "HEAD":
            return (404, {}, b"") if stored is None else (204, stored, b"")
        if method in ("PUT", "POST"):
            if method == "POST" and stored is None:
                return 404, {}, b""
            headers = {
                k: v for k, v in request.headers.items() if k.lower().startswith("x-container")
            }
            self.containers.setdefault(container, requests.structures.CaseInsensitiveDict()).update(
                headers
            )
            return (201 if method == "PUT" else 204), {}, b""
        if method == "GET":
            if stored is None:
                return 404, {}, b""
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            limit = int(query.get("limit", 7))  # small pages: exercises pagination
            names = sorted(
                n
                for c, n in self.objects
                if c == container
                and n.startswith(query.get("prefix", ""))
                and n > query.get("marker", "")
            )[:limit]
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(
                    [
                        {
                            "name": n,
                            "bytes": len(self.objects[container, n]["data"]),
                            "hash": self.objects[container, n]["md5"],
                            "content_type": self.objects[container, n]["content_type"],
                            "last_modified": "2026-01-01T00:00:00.000000",
                        }
                        for n in names
                    ]
                ),
            )
        return 405, {}, b""

    def anonymous(self, method, container, name, request):
        stored = self.containers.get(container) or {}
        if ".r:*" not in stored.get("X-Container-Read", ""):
            return 401, {}, b""
        found = self.objects.get((container, name))
        if found is None:
            return 404, {}, b""
        headers = {"Content-Type": found["content_type"]}
        origin = stored.get("X-Container-Meta-Access-Control-Allow-Origin")
        if request.headers.get("Origin") and origin:
            headers["Access-Control-Allow-Origin"] = origin
        return 200, headers, found["data"]


@pytest.fixture
def fake_swift():
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield FakeSwift(mock)


def assert_everything_stored(fake: FakeSwift, results: Path, container: str) -> None:
    local = local_objects(results)
    assert {n for c, n in fake.objects if c == container} == set(local)
    for name, path in local.items():
        assert fake.objects[container, name]["md5"] == md5_of(path), name


@pytest.mark.parametrize(
    "fault",
    [
        503,
        500,
        408,
        429,
        requests.ConnectionError("connection reset by peer"),
        requests.exceptions.ReadTimeout("read timed out"),
    ],
    ids=["503", "500", "408", "429", "dropped", "timeout"],
)
def test_transient_failures_are_retried(fake_swift, dataset, fault):
    fake_swift.fail("PUT", r"1mm/.*", fault, times=3)
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False, jobs=2)
    assert result.retries == 3
    assert result.uploaded == result.total_objects == len(local_objects(dataset))
    assert_everything_stored(fake_swift, dataset, "c")
    manifest = json.loads((dataset / UPLOAD_MANIFEST_NAME).read_text())
    assert len(manifest["objects"]) == result.total_objects


@pytest.mark.parametrize("status, hint", [(403, "may not write"), (413, "too large")])
def test_unfixable_refusal_stops_with_the_object_named(fake_swift, dataset, status, hint):
    fake_swift.fail("PUT", r"2mm/.*", status, times=1000)
    with pytest.raises(UploadError) as caught:
        upload(dataset, "c", fake_swift.connection(), show_progress=False, jobs=2)
    message = str(caught.value)
    assert re.search(rf"PUT c/2mm/\S+: {status}", message) and hint in message
    assert "\n" not in message and caught.value.exit_code == errors.EXIT_UPLOAD
    # It stopped: no request beyond the in-flight ones, and no manifest.
    failed_puts = [n for m, n in fake_swift.requests if m == "PUT" and n.startswith("2mm/")]
    assert len(failed_puts) <= 4
    assert not (dataset / UPLOAD_MANIFEST_NAME).exists()


def test_body_refused_for_its_md5_is_sent_again(fake_swift, dataset):
    fake_swift.fail("PUT", r"info", 422, times=1)
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False)
    assert result.retries == 1
    assert [n for m, n in fake_swift.requests if m == "PUT"].count("info") == 2
    assert_everything_stored(fake_swift, dataset, "c")


def test_every_put_sends_the_md5_and_a_wrong_answer_is_an_error(fake_swift, dataset):
    name = sorted(local_objects(dataset))[0]
    fake_swift.wrong_etag.add(name)
    with pytest.raises(UploadError, match=f"PUT c/{name}: Swift answered ETag"):
        upload(dataset, "c", fake_swift.connection(), show_progress=False)


def test_rejected_token_mid_run_is_renewed_and_the_upload_continues(fake_swift, dataset):
    def revoke_once(count):
        if count == 10:
            fake_swift.revoke_tokens()

    fake_swift.after_put = revoke_once
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False, jobs=2)
    # One renewal: the thread (or the main thread's listing) refused after another
    # renewed takes the new token instead of logging in again.
    assert fake_swift.issued == 2
    assert result.uploaded == result.total_objects
    assert_everything_stored(fake_swift, dataset, "c")


def test_verification_reports_missing_objects_with_examples(fake_swift, dataset):
    lost = sorted(n for n in local_objects(dataset) if n.startswith("1mm/"))[:7]
    fake_swift.lose.update(lost)
    with pytest.raises(UploadError) as caught:
        upload(dataset, "c", fake_swift.connection(), show_progress=False)
    message = str(caught.value)
    assert f"verification failed: 7 of {len(local_objects(dataset))} objects" in message
    assert f"{lost[0]}: missing" in message and "..." in message
    assert not (dataset / UPLOAD_MANIFEST_NAME).exists()


def test_stop_request_finishes_in_flight_puts_and_a_rerun_sends_the_rest(fake_swift, dataset):
    polls = []

    def stop_after_ten():
        polls.append(1)
        return len(polls) > 10

    with pytest.raises(Interrupted):
        upload(
            dataset,
            "c",
            fake_swift.connection(),
            show_progress=False,
            jobs=2,
            should_stop=stop_after_ten,
        )
    done = fake_swift.puts
    assert 6 <= done <= 10  # started ones finish; queued ones (up to 2 per job) do not start
    total = len(local_objects(dataset))
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False)
    assert (result.uploaded, result.skipped) == (total - done, done)
    assert fake_swift.puts == total
    assert_everything_stored(fake_swift, dataset, "c")


def test_old_objects_with_wrong_headers_are_caught_and_force_fixes_them(fake_swift, dataset):
    upload(dataset, "c", fake_swift.connection(), show_progress=False)
    for _key, stored in fake_swift.objects.items():  # as a plain `swift upload` leaves them
        stored["content_encoding"] = ""
    with pytest.raises(UploadError, match="wrong headers.*--force"):
        upload(dataset, "c", fake_swift.connection(), show_progress=False)
    result = upload(
        dataset,
        "c",
        fake_swift.connection(),
        UploadOptions(skip_identical=False),
        show_progress=False,
    )
    assert result.uploaded == result.total_objects
    assert all(
        s["content_encoding"] == "gzip"
        for (c, n), s in fake_swift.objects.items()
        if n.startswith("1mm/")
    )


def test_public_container_that_is_not_readable_anonymously_is_an_error(fake_swift, dataset):
    fake_swift.fail("GET", "info", 401, times=10)  # the cluster ignores the read ACL
    with pytest.raises(UploadError, match="not publicly readable"):
        upload(dataset, "c", fake_swift.connection(), show_progress=False)


# ---------------------------------------------------------------------------
# a dying proxy, a revoked token, secrets and settings, against the real Swift


class Forwarder:
    """A TCP relay in front of the Swift proxy that dies after ``max_puts`` PUT requests."""

    def __init__(self, target_port: int, max_puts: int | None = None):
        self.target = ("127.0.0.1", target_port)
        self.max_puts = max_puts
        self.puts = 0
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self._server: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(64)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self._lock:
                self._sockets.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, destination: socket.socket, from_client: bool) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if from_client and data.startswith(b"PUT "):
                    with self._lock:
                        self.puts += 1
                        dying = self.max_puts is not None and self.puts > self.max_puts
                    if dying:
                        self.stop()
                        return
                destination.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, destination):
                with contextlib_suppress():
                    end.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        """Refuses new connections and drops the open ones, as a killed proxy does."""
        with self._lock:
            server, self._server = self._server, None
            sockets, self._sockets = self._sockets, set()
        if server is not None:
            server.close()
        for sock in sockets:
            with contextlib_suppress():
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


def contextlib_suppress():
    import contextlib

    return contextlib.suppress(OSError)


@swift
def test_rerun_after_the_proxy_died_uploads_only_the_missing_objects(
    dataset, settings, unique_container, local_swift, proxy_log, swift_client
):
    import dataclasses

    container = unique_container()
    path = container_path(local_swift, container)
    forwarder = Forwarder(local_swift.proxy_port, max_puts=40)
    forwarder.start()
    project_path = urlparse(local_swift.storage_url).path
    through = dataclasses.replace(
        settings, os_storage_url=f"http://127.0.0.1:{forwarder.port}{project_path}"
    )
    with pytest.raises(UploadError) as caught:
        upload(
            dataset, container, fresh_connection(through, retries=2), show_progress=False, jobs=4
        )
    assert "Connection" in str(caught.value) or "connect" in str(caught.value)
    assert not (dataset / UPLOAD_MANIFEST_NAME).exists()
    local = local_objects(dataset)
    before = listing(swift_client, container)
    intact = {n for n, o in before.items() if n in local and o["hash"] == md5_of(local[n])}
    assert 0 < len(intact) < len(local)

    forwarder.max_puts = None
    forwarder.start()  # the proxy is back
    proxy_log.mark()
    result = upload(dataset, container, fresh_connection(through), show_progress=False)
    assert (result.uploaded, result.skipped) == (len(local) - len(intact), len(intact))
    sent = {e.path[len(path) + 1 :] for e in proxy_log.entries("PUT", path + "/")}
    assert sent == set(local) - intact
    after = listing(swift_client, container)
    assert {n: o["hash"] for n, o in after.items()} == {n: md5_of(p) for n, p in local.items()}
    forwarder.stop()


@swift
def test_token_revoked_mid_run_is_renewed_and_the_upload_continues(
    dataset, settings, unique_container, local_swift, swift_client, proxy_log
):
    container = unique_container()
    connection = fresh_connection(settings)
    revoked = []
    polls = []

    def revoke_after_twenty() -> bool:
        polls.append(1)
        if len(polls) == 20:
            token = connection.connection().token
            local_swift.revoke(token)
            local_swift.wait_until_refused(token)
            revoked.append(token)
        return False

    result = upload(
        dataset, container, connection, show_progress=False, jobs=2, should_stop=revoke_after_twenty
    )
    assert revoked
    refused = proxy_log.entries("PUT", container_path(local_swift, container) + "/")
    assert 401 in {e.status for e in refused}  # the old token was refused mid-run
    local = local_objects(dataset)
    assert result.uploaded == len(local)
    assert {n: o["hash"] for n, o in listing(swift_client, container).items()} == {
        n: md5_of(p) for n, p in local.items()
    }


@swift
def test_no_secret_in_any_output_at_vv(
    dataset, swift_settings_file, local_swift, unique_container, capsys
):
    code = main(
        [
            str(dataset),
            "--container",
            unique_container(),
            "--settings",
            str(swift_settings_file),
            "-vv",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    assert "DEBUG" in captured.err  # the libraries did log their requests
    assert local_swift.password not in captured.out + captured.err


def test_settings_refusals_apply(dataset, tmp_path, capsys, monkeypatch):
    settings_file = tmp_path / "os_settings.json"
    settings_file.write_text(
        json.dumps(
            {
                "os_username": "u",
                "os_password": "pw-secret",
                "os_project_id": "p",
                "os_auth_url": "https://keystone.invalid/v3",
            }
        )
    )
    settings_file.chmod(0o644)
    code = main([str(dataset), "--container", "c", "--settings", str(settings_file)])
    assert code == errors.EXIT_USAGE
    assert "chmod 600" in capsys.readouterr().err
    monkeypatch.delenv("SWIFT_SETTINGS", raising=False)
    assert main([str(dataset), "--container", "c"]) == errors.EXIT_USAGE
    assert "SWIFT_SETTINGS" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["a/b", ""])
def test_bad_container_option_is_a_usage_error(dataset, name, capsys):
    with pytest.raises(SystemExit) as caught:
        main([str(dataset), "--container", name])
    assert caught.value.code == errors.EXIT_USAGE


def test_unchanged_rerun_reads_no_file_but_a_changed_one_is_hashed(
    fake_swift, dataset, monkeypatch
):
    upload(dataset, "c", fake_swift.connection(), show_progress=False)
    hashed = []
    real_digest = upload_results.file_digest

    def counting_digest(path, size, segment_size):
        hashed.append(Path(path).name)
        return real_digest(path, size, segment_size)

    monkeypatch.setattr(upload_results, "file_digest", counting_digest)
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False)
    assert (result.uploaded, hashed) == (0, [])  # MD5s from the verified manifest
    chunk = sorted(dataset.glob("1mm/*.gz"))[0]
    chunk.write_bytes(bytes(reversed(chunk.read_bytes())))  # same size, new content
    result = upload(dataset, "c", fake_swift.connection(), show_progress=False)
    assert hashed == [chunk.name] and result.uploaded == 1


def test_container_headers_are_set_only_when_they_differ(fake_swift, dataset):
    upload(dataset, "c", fake_swift.connection(), show_progress=False)
    upload(dataset, "c", fake_swift.connection(), show_progress=False)
    assert [m for m, n in fake_swift.requests if not n and m in ("PUT", "POST")] == ["PUT"]
    upload(
        dataset,
        "c",
        fake_swift.connection(),
        UploadOptions(cors_origin="https://viewer.example.org"),
        show_progress=False,
    )
    assert fake_swift.containers["c"]["X-Container-Meta-Access-Control-Allow-Origin"] == (
        "https://viewer.example.org"
    )
    assert fake_swift.containers["c"]["X-Container-Read"] == ".r:*,.rlistings"
