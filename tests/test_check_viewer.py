"""check_viewer: datasets open in the real Neuroglancer client in headless Chromium.

The browser tests (marker ``browser``) skip when Chromium, Playwright or the
Neuroglancer client is missing, except under CI=true where they must run.
Screenshots of every rendered dataset land in test-artifacts/viewer/.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel
import numpy as np
import pytest
import requests
import responses
from PIL import Image

from hbp_image_tasks import check_viewer as cv
from hbp_image_tasks import errors
from hbp_image_tasks.viewer_server import CHUNK_NAME as CHUNK_PATH
from hbp_image_tasks.viewer_server import CLIENT_TOKEN, ClientServer, DatasetProxy, ProxiedRequest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "viewer"
ANATOMICAL = Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


# ---------------------------------------------------------------- datasets


def make_volumes() -> dict[str, tuple[np.ndarray, float, list[str]]]:
    """Returns name -> (volume, voxel size in mm, extra converter options)."""
    # A real brain MRI, scaled to 8 bits and upsampled so that it spans several
    # chunks and scales.
    mri = np.asanyarray(nibabel.load(ANATOMICAL).dataobj).astype(np.float32)
    mri = np.clip(mri / np.percentile(mri, 99.5) * 255, 0, 255).astype(np.uint8)
    mri = mri.repeat(4, axis=0).repeat(4, axis=1).repeat(4, axis=2)
    x, y, z = np.mgrid[:128, :128, :64].astype(np.float32)
    radius = np.sqrt((x - 64) ** 2 + (y - 64) ** 2 + ((z - 32) * 2) ** 2)
    rgb = np.zeros((128, 128, 64, 3), np.uint8)
    rgb[..., 0] = np.where(radius < 56, 230, 0)
    rgb[..., 1] = np.where(radius < 24, 200, 20)
    rgb[..., 2] = (x * 2).astype(np.uint8)
    labels = np.zeros((128, 128, 64), np.uint32)
    labels[radius < 56] = 1
    labels[(radius < 56) & (x > 64)] = 2
    labels[radius < 24] = 3
    return {
        "image": (mri, 0.5, []),
        "rgb": (rgb, 0.25, []),
        "segmentation": (
            labels,
            0.25,
            ["--type", "segmentation", "--encoding", "compressed_segmentation"],
        ),
    }


def convert(volume: np.ndarray, voxel_mm: float, options: list[str], dest: Path) -> None:
    """Converts ``volume`` to gzipped flat precomputed chunks with neuroglancer-scripts."""
    from neuroglancer_scripts.scripts import volume_to_precomputed_pyramid

    nifti = dest.with_suffix(".nii")
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([voxel_mm] * 3 + [1])), str(nifti))
    code = volume_to_precomputed_pyramid.main(
        ["volume-to-precomputed-pyramid", "--flat", *options, str(nifti), str(dest)]
    )
    assert code in (0, None)
    nifti.unlink()


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> Path:
    """A directory with image/, rgb/, segmentation/ and broken copies."""
    root = tmp_path_factory.mktemp("precomputed")
    for name, (volume, voxel_mm, options) in make_volumes().items():
        convert(volume, voxel_mm, options, root / name)
    # Every chunk missing: the viewer shows empty space and no error of its own.
    shutil.copytree(root / "image", root / "missing-chunks")
    for chunk in (root / "missing-chunks").glob("*/*.gz"):
        chunk.unlink()
    # An 'info' that does not match the chunks (16-bit voxels announced, 8-bit stored).
    shutil.copytree(root / "image", root / "wrong-info")
    info = json.loads((root / "wrong-info" / "info").read_text())
    (root / "wrong-info" / "info").write_text(json.dumps({**info, "data_type": "uint16"}))
    return root


class DatasetHandler(BaseHTTPRequestHandler):
    """Serves ``<mode>/<dataset>/<name>`` from ``name`` or ``name.gz``, as Swift would.

    Modes: ``good`` (Content-Encoding: gzip and CORS), ``no-encoding`` (the
    gzip bytes without their header), ``no-cors`` (no Access-Control-Allow-Origin).
    """

    root: Path

    def do_GET(self) -> None:
        mode, _, name = self.path.lstrip("/").partition("/")
        path = self.root / name
        encoding = ""
        if not path.is_file() and path.with_name(path.name + ".gz").is_file():
            path, encoding = path.with_name(path.name + ".gz"), "gzip"
        body = path.read_bytes() if path.is_file() else b"not found"
        self.send_response(200 if path.is_file() else 404)
        if mode != "no-cors":
            self.send_header("Access-Control-Allow-Origin", "*")
        if encoding and mode != "no-encoding":
            self.send_header("Content-Encoding", encoding)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def dataset_server(datasets):
    """Base URL of an HTTP server on 127.0.0.1 serving the test datasets."""
    handler = type("Handler", (DatasetHandler,), {"root": datasets})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def require_browser() -> None:
    """Skips (fails under CI=true) when the browser check cannot run here."""
    reason = cv.missing_requirements()
    if reason is None:
        return
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the browser tests cannot run: {reason}")
    pytest.skip(f"browser tests need Chromium, Playwright and the Neuroglancer client: {reason}")


@pytest.fixture(scope="module")
def browser():
    """One headless Chromium for all browser tests of this module."""
    require_browser()
    with cv.Browser() as opened:
        yield opened


def saturated_share(png_path: Path) -> float:
    with open(png_path, "rb") as stream:
        return cv.signal_fraction(stream.read(), "segmentation")


# ------------------------------------------------------------ browser tests


@pytest.mark.browser
@pytest.mark.parametrize(
    "name, layer_type", [("image", "image"), ("rgb", "image"), ("segmentation", "segmentation")]
)
def test_converted_dataset_renders_in_neuroglancer(
    browser, dataset_server, datasets, name, layer_type
):
    screenshot = ARTIFACTS / f"http-{name}.png"
    report = browser.check(f"{dataset_server}/good/{name}", screenshot=screenshot)

    assert report.ok, report.summary()
    assert report.layer_type == layer_type
    assert report.ready
    chunks = report.chunk_requests
    assert chunks and all(r.status == 200 for r in chunks)
    assert all(r.content_encoding == "gzip" for r in chunks)
    # Only chunks that exist were asked for.
    assert all((datasets / name / (r.path + ".gz")).is_file() for r in chunks)
    assert report.signal_fraction >= 0.05
    assert report.console_errors == [] and report.page_errors == []
    assert screenshot.is_file() and Image.open(screenshot).size == (1024, 768)
    # Colour reached the screen for RGB and labels, not for the grey MRI.
    colourful = saturated_share(screenshot)
    if name == "image":
        assert colourful < 0.01
    else:
        assert colourful > 0.05


@pytest.mark.browser
def test_missing_chunks_are_a_failure_though_the_viewer_shows_no_error(browser, dataset_server):
    report = browser.check(
        f"{dataset_server}/good/missing-chunks",
        timeout=30,
        screenshot=ARTIFACTS / "http-missing-chunks.png",
    )

    assert not report.ok
    assert report.chunk_requests and all(r.status == 404 for r in report.chunk_requests)
    assert any("404" in problem for problem in report.problems)
    assert report.signal_fraction < 0.01  # empty space, as a user would see it


@pytest.mark.browser
def test_gzip_chunks_without_content_encoding_are_a_failure(browser, dataset_server):
    report = browser.check(
        f"{dataset_server}/no-encoding/image",
        timeout=30,
        screenshot=ARTIFACTS / "http-no-content-encoding.png",
    )

    assert not report.ok
    assert any(r.gzip_body_without_header for r in report.chunk_requests)
    assert any(cv.CHUNK_ERROR_TEXT in line for line in report.console_errors)
    assert any("Content-Encoding" in problem for problem in report.problems)


@pytest.mark.browser
def test_info_that_does_not_match_the_chunks_is_a_failure(browser, dataset_server):
    report = browser.check(f"{dataset_server}/good/wrong-info", timeout=30)

    assert not report.ok
    assert all(r.status == 200 for r in report.requests)  # the server is not to blame
    assert any("failed to load" in problem and "bytes" in problem for problem in report.problems)


@pytest.mark.browser
def test_missing_cors_header_is_a_failure(browser, dataset_server):
    report = browser.check(f"{dataset_server}/no-cors/image", timeout=30)

    assert not report.ok
    assert any("Access-Control-Allow-Origin" in problem for problem in report.problems)
    assert report.signal_fraction < 0.01  # the browser refused to hand the data over


@pytest.mark.browser
def test_segmentation_with_absent_segments_selected_looks_empty(browser, dataset_server):
    report = browser.check(f"{dataset_server}/good/segmentation", segments=[77], timeout=30)

    assert not report.ok
    assert report.ready
    assert any("looks empty" in problem for problem in report.problems)


def in_own_thread(function, *args):
    """Returns function(*args) run in a new thread.

    Playwright's sync API refuses to start where another instance (the module's
    browser fixture) already runs its event loop; a thread has a loop of its own.
    """
    results = []
    thread = threading.Thread(target=lambda: results.append(function(*args)))
    thread.start()
    thread.join()
    return results[0]


@pytest.fixture
def restored_logging():
    """Takes back the log handler that main() binds to the captured stderr."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.browser
def test_command_exit_codes_and_screenshot(dataset_server, tmp_path, capsys, restored_logging):
    require_browser()
    screenshot = tmp_path / "shot.png"

    good = in_own_thread(
        cv.main,
        [
            f"precomputed://{dataset_server}/good/segmentation",
            "--segments",
            "1",
            "2",
            "3",
            "--screenshot",
            str(screenshot),
            "-q",
        ],
    )
    output = capsys.readouterr()
    bad = in_own_thread(cv.main, [f"{dataset_server}/good/missing-chunks", "--timeout", "20"])
    failure = capsys.readouterr().err.strip().splitlines()

    assert good == 0, output.err
    assert "rendered as segmentation" in output.out
    assert Image.open(screenshot).format == "PNG"
    assert bad == errors.EXIT_SOURCE
    assert len(failure) == 1 and "404" in failure[0]


# ------------------------------------- the real path: ingest_ngs, upload_results, Swift

EXAMPLE_STACK = Path(__file__).resolve().parent.parent / "examples" / "brain-stack"


def write_rgb_stack(directory: Path, volume: np.ndarray) -> Path:
    """Writes an (x, y, z, 3) volume as RGB PNG sections; returns the directory."""
    directory.mkdir(parents=True)
    for z in range(volume.shape[2]):
        section = np.ascontiguousarray(volume[:, :, z].transpose(1, 0, 2))  # rows are y
        Image.fromarray(section.astype(np.uint8)).save(directory / f"section_{z:03d}.png")
    return directory


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, Path]:
    """The three kinds of dataset, converted by ingest_ngs as an operator would."""
    from hbp_image_tasks.ingest_ngs import convert as ingest_convert
    from hbp_image_tasks.parameters import ConversionParameters

    root = tmp_path_factory.mktemp("ingested")
    volumes = make_volumes()
    labels, _, _ = volumes["segmentation"]
    nibabel.save(
        nibabel.Nifti1Image(labels, np.diag([0.25, 0.25, 0.25, 1])), str(root / "labels.nii")
    )
    sources = {
        "image": (
            EXAMPLE_STACK,
            ConversionParameters(voxel_size=(333, 333, 2000), voxel_unit="um", chunk_size=64),
        ),
        "rgb": (
            write_rgb_stack(root / "rgb-stack", volumes["rgb"][0]),
            ConversionParameters(voxel_size=(250, 250, 250), voxel_unit="um", chunk_size=64),
        ),
        "segmentation": (
            root / "labels.nii",
            ConversionParameters(type="segmentation", chunk_size=64),
        ),
    }
    results = {}
    for name, (source, parameters) in sources.items():
        results[name] = root / name
        ingest_convert(source, results[name], parameters, jobs=2, show_progress=False)
    return results


@pytest.mark.swift
@pytest.mark.browser
@pytest.mark.parametrize(
    "name, layer_type", [("image", "image"), ("rgb", "image"), ("segmentation", "segmentation")]
)
def test_dataset_uploaded_to_swift_renders_from_its_public_url(
    browser, converted, swift_settings_file, unique_container, proxy_log, name, layer_type
):
    from hbp_image_tasks.settings import load_settings
    from hbp_image_tasks.swift import SwiftConnection
    from hbp_image_tasks.upload_results import upload

    connection = SwiftConnection(load_settings(swift_settings_file))
    try:
        uploaded = upload(
            converted[name], unique_container(name), connection, jobs=2, show_progress=False
        )
    finally:
        connection.close()
    proxy_log.mark()

    report = browser.check(uploaded.public_url, screenshot=ARTIFACTS / f"swift-{name}.png")

    assert report.ok, report.summary()
    assert report.layer_type == layer_type
    assert report.signal_fraction >= 0.05
    chunks = report.chunk_requests
    assert chunks and all(r.status == 200 and r.content_encoding == "gzip" for r in chunks)
    assert all(r.allow_origin and r.cors_allowed for r in report.requests)
    # Swift itself answered every chunk the viewer asked for, anonymously.
    served = [e for e in proxy_log.entries("GET") if CHUNK_PATH.search(e.path)]
    assert len(served) == len(chunks) and all(e.status == 200 for e in served)


@pytest.mark.swift
@pytest.mark.browser
def test_dataset_published_for_one_site_is_checked_as_that_site_sees_it(
    browser, converted, swift_settings_file, unique_container
):
    from hbp_image_tasks.settings import load_settings
    from hbp_image_tasks.swift import SwiftConnection
    from hbp_image_tasks.upload_results import UploadOptions, upload

    site = "https://viewer.example.org"
    connection = SwiftConnection(load_settings(swift_settings_file))
    try:
        uploaded = upload(
            converted["segmentation"],
            unique_container(),
            connection,
            UploadOptions(cors_origin=site),
            jobs=2,
            show_progress=False,
        )
    finally:
        connection.close()

    from_that_site = browser.check(uploaded.public_url, origin=site)
    from_elsewhere = browser.check(uploaded.public_url, timeout=30)

    assert from_that_site.ok, from_that_site.summary()
    assert not from_elsewhere.ok
    assert any("Access-Control-Allow-Origin" in p for p in from_elsewhere.problems)


@pytest.mark.swift
@pytest.mark.browser
def test_sharded_dataset_renders_from_swift_through_range_requests(
    browser, tmp_path, swift_settings_file, unique_container, proxy_log
):
    from hbp_image_tasks.ingest_ngs import convert as ingest_convert
    from hbp_image_tasks.parameters import ConversionParameters
    from hbp_image_tasks.settings import load_settings
    from hbp_image_tasks.swift import SwiftConnection
    from hbp_image_tasks.upload_results import upload

    parameters = ConversionParameters(
        voxel_size=(333, 333, 2000), voxel_unit="um", chunk_size=32, sharding=True
    )
    ingest_convert(EXAMPLE_STACK, tmp_path / "sharded", parameters, jobs=2, show_progress=False)
    connection = SwiftConnection(load_settings(swift_settings_file))
    try:
        uploaded = upload(
            tmp_path / "sharded", unique_container(), connection, jobs=2, show_progress=False
        )
    finally:
        connection.close()
    proxy_log.mark()

    report = browser.check(uploaded.public_url, screenshot=ARTIFACTS / "swift-sharded.png")

    assert report.ok, report.summary()
    assert report.signal_fraction >= 0.05
    chunks = report.chunk_requests
    assert chunks and all(r.path.endswith(".shard") and r.status == 206 for r in chunks)
    served = [e for e in proxy_log.entries("GET") if e.path.endswith(".shard")]
    assert served and all(e.status == 206 for e in served)


# ------------------------------------------------------- tests without browser


def test_missing_chromium_is_a_usage_error_naming_what_to_install(
    tmp_path, capsys, restored_logging
):
    code = cv.main(["http://127.0.0.1:9/x", "--chromium", str(tmp_path / "chromium")])

    message = capsys.readouterr().err.strip().splitlines()
    assert code == errors.EXIT_USAGE
    assert len(message) == 1 and "apt-get install chromium" in message[0]


def test_missing_playwright_names_the_pip_and_apt_packages(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "playwright.sync_api", None)

    reason = cv.missing_requirements()

    assert reason is not None and "\n" not in reason
    assert "pip install hbp-image-tasks[browser]" in reason
    assert "apt-get install chromium" in reason


def test_non_http_url_is_a_usage_error(capsys, restored_logging):
    assert cv.main(["/data/dataset"]) == errors.EXIT_USAGE
    assert "not an http(s) URL" in capsys.readouterr().err


GOOD_INFO = {
    "type": "image",
    "data_type": "uint8",
    "num_channels": 1,
    "scales": [
        {
            "key": "1mm",
            "size": [64, 32, 16],
            "resolution": [1e6, 1e6, 2e6],
            "chunk_sizes": [[64, 64, 64]],
            "encoding": "raw",
            "voxel_offset": [0, 0, 0],
        }
    ],
}


@responses.activate
@pytest.mark.parametrize(
    "status, body, message",
    [
        (404, "no such object", "HTTP 404"),
        (200, "<html>", "not valid JSON"),
        (200, json.dumps({"type": "image"}), "no 'scales'"),
        (200, json.dumps({**GOOD_INFO, "type": "mesh"}), "'type' is 'mesh'"),
        (200, json.dumps({**GOOD_INFO, "scales": [{"key": "1mm"}]}), "scale 0 lacks size"),
    ],
)
def test_unusable_info_is_reported_before_opening_the_viewer(status, body, message):
    responses.add(responses.GET, "https://store.example/v1/AUTH_x/c/info", status=status, body=body)

    with pytest.raises(cv.ViewerCheckError, match=message) as raised:
        cv.read_info("https://store.example/v1/AUTH_x/c/")

    assert raised.value.exit_code == errors.EXIT_SOURCE
    assert "https://store.example/v1/AUTH_x/c/info" in str(raised.value)


@pytest.mark.parametrize("num_channels, segments, has_shader", [(1, (), False), (3, (), True)])
def test_viewer_state_fits_the_volume_and_colours_rgb(num_channels, segments, has_shader):
    info = {**GOOD_INFO, "num_channels": num_channels}

    state = cv.framed_state("http://127.0.0.1:1", info, "image", segments)

    layer = state["layers"][0]
    assert layer["source"] == "precomputed://http://127.0.0.1:1"
    assert ("shader" in layer) == has_shader
    # 64 mm across the largest axis fills 80 % of a 384-pixel panel.
    assert state["crossSectionScale"] == pytest.approx(0.064 / (384 * 0.8))
    assert state["showAxisLines"] is False and state["showScaleBar"] is False


@pytest.mark.parametrize(
    "info",
    [
        GOOD_INFO,
        {**GOOD_INFO, "num_channels": 3},
        {**GOOD_INFO, "type": "segmentation", "data_type": "uint32"},
    ],
    ids=["grey", "rgb", "segmentation"],
)
def test_published_link_shows_the_layer_the_check_renders(info):
    from urllib.parse import unquote

    from hbp_image_tasks.neuroglancer_link import neuroglancer_link

    url = "https://swift.example.org/v1/AUTH_x/c/ds"
    link = neuroglancer_link(url, "https://viewer.example.org/", name="dataset", info=info)
    linked = json.loads(unquote(link.partition("#!")[2]))["layers"][0]
    checked = cv.framed_state(url, info, info["type"])["layers"][0]
    assert linked == checked
    assert ("shader" in linked) == (info["num_channels"] == 3)


def test_viewer_state_selects_segments_or_shows_all():
    info = {**GOOD_INFO, "type": "segmentation", "data_type": "uint32"}

    chosen = cv.framed_state("http://h", info, "segmentation", [3, 12])["layers"][0]
    everything = cv.framed_state("http://h", info, "segmentation")["layers"][0]

    assert chosen["segments"] == ["3", "12"] and "notSelectedAlpha" not in chosen
    assert "segments" not in everything and everything["notSelectedAlpha"] > 0


def png_of(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def test_signal_fraction_counts_bright_pixels_and_saturated_colours():
    panel = np.zeros((100, 100, 3))
    panel[:20] = 200  # grey bright band: image signal, not a colour
    panel[20:30] = (200, 30, 60)  # a coloured band
    panel[30:40] = 30  # dim grey

    assert cv.signal_fraction(png_of(panel), "image") == pytest.approx(0.30)
    assert cv.signal_fraction(png_of(panel), "segmentation") == pytest.approx(0.10)
    assert cv.signal_fraction(png_of(np.zeros((50, 50, 3))), "image") == 0.0


class _Upstream(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path.endswith("/info"):
            body, headers = b'{"x": 1}', {"Access-Control-Allow-Origin": "*"}
        elif self.path.endswith("_0-8_0-8"):
            body = gzip.compress(b"\0" * 512)
            headers = {"Content-Encoding": "gzip"} if "encoded" in self.path else {}
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_proxy_passes_bytes_and_headers_through_and_logs_every_request():
    upstream = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{upstream.server_address[1]}/v1/AUTH_x/c"
    try:
        with DatasetProxy(base) as proxy:
            info = requests.get(f"{proxy.url}/info")
            raw = requests.get(f"{proxy.url}/encoded/0-8_0-8_0-8", stream=True)
            raw_body = raw.raw.read(decode_content=False)
            bare = requests.get(f"{proxy.url}/bare/0-8_0-8_0-8")
            missing = requests.get(f"{proxy.url}/s/0-8_0-8_8-16")
            logged = proxy.requests
    finally:
        upstream.shutdown()
        upstream.server_close()

    assert info.json() == {"x": 1} and info.headers["Access-Control-Allow-Origin"] == "*"
    assert raw.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(raw_body) == b"\0" * 512  # not decoded by the proxy
    assert bare.content[:2] == b"\x1f\x8b" and "Content-Encoding" not in bare.headers
    assert missing.status_code == 404
    assert [(r.path, r.status, r.is_chunk, r.gzip_body_without_header) for r in logged] == [
        ("info", 200, False, False),
        ("encoded/0-8_0-8_0-8", 200, True, False),
        ("bare/0-8_0-8_0-8", 200, True, True),
        ("s/0-8_0-8_8-16", 404, True, False),
    ]


def test_proxy_reports_an_unreachable_server_as_502():
    with DatasetProxy("http://127.0.0.1:9/nothing", timeout=5) as proxy:
        response = requests.get(f"{proxy.url}/info")
        logged = proxy.requests

    assert response.status_code == 502
    assert logged[0].status == 502 and "ConnectionError" in logged[0].error


def test_client_server_serves_the_neuroglancer_client_under_its_token():
    pytest.importorskip("neuroglancer")
    with ClientServer() as server:
        page = requests.get(server.url)
        wasm_name = next(server.client_dir.glob("*.wasm")).name
        wasm = requests.get(server.url + wasm_name)
        escape = requests.get(server.url + "../../etc/passwd")
        state = requests.get(server.url.replace(f"/v/{CLIENT_TOKEN}/", f"/state/{CLIENT_TOKEN}"))

    assert page.status_code == 200 and "main." in page.text
    assert wasm.headers["Content-Type"] == "application/wasm"
    assert escape.status_code in (204, 404)
    assert state.status_code == 204


def request(path: str = "1mm/0-64_0-64_0-64", status: int = 200, **fields) -> ProxiedRequest:
    values = dict(
        method="GET",
        path=path,
        status=status,
        content_encoding="gzip",
        nbytes=100,
        allow_origin="*",
        gzip_body_without_header=False,
    )
    values.update(fields)
    return ProxiedRequest(**values)


def report_of(
    requests_: list,
    ready: bool = True,
    fraction: float = 0.3,
    console: tuple = (),
    page: tuple = (),
) -> cv.RenderReport:
    report = cv.RenderReport(
        url="http://h/d",
        layer_type="image",
        problems=[],
        ready=ready,
        requests=[request("info", content_encoding="")] + requests_,
        console_errors=list(console),
        page_errors=list(page),
        signal_fraction=fraction,
        screenshot=None,
        seconds=1.0,
    )
    report.problems = cv.judge(report, timeout=60, min_fraction=0.02)
    return report


@pytest.mark.parametrize(
    "report, expected",
    [
        (report_of([request(), request("1mm/0-64_0-64_64-128", 206)]), None),
        (report_of([request(), request("1mm/0-64_0-64_64-128", 404)]), "1 of 3 requests failed"),
        (report_of([request(allow_origin="", cors_allowed=False)]), "Access-Control-Allow-Origin"),
        (
            report_of([request(content_encoding="", gzip_body_without_header=True)]),
            "1 response with gzip data but no 'Content-Encoding: gzip'",
        ),
        (
            report_of([request()], console=["Error retrieving chunk 0,0,0: Error: bad"]),
            "1 chunk failed to load",
        ),
        (report_of([request()], page=["TypeError: x"]), "uncaught error in the page"),
        (report_of([], ready=False), "requested no chunk within 60 s"),
        (report_of([request()], ready=False), "not ready after 60 s"),
        (report_of([request()], fraction=0.001), "looks empty: 0.10% bright pixels"),
    ],
)
def test_judge_names_the_first_reason_of_a_bad_render(report, expected):
    if expected is None:
        assert report.ok and "2 chunk requests, all served" in report.summary()
    else:
        assert not report.ok and expected in report.problems[0]
        assert expected in report.summary() and "\n" not in report.summary()
