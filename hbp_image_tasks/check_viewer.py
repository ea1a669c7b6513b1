"""Proves that a published precomputed dataset opens in the real Neuroglancer viewer.

Opens the Neuroglancer client (from the `neuroglancer` Python package) in headless
Chromium, points it at the dataset through a local logging proxy, and checks that
the viewer became ready, every chunk request succeeded, no chunk failed to decode
and the data panel shows data. Saves a screenshot of what the viewer showed.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import requests

from . import cli, errors
from .atomic import write_bytes_atomically
from .neuroglancer_link import viewer_state
from .viewer_server import ClientServer, DatasetProxy, ProxiedRequest, find_client_dir

logger = logging.getLogger(__name__)

INSTALL_HINT = (
    "install the browser extra and Chromium: "
    "pip install hbp-image-tasks[browser] && apt-get install chromium"
)
CHROMIUM_CANDIDATES = (
    "/usr/lib/chromium/chromium",
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)
# WebGL2 without a GPU (SwiftShader through ANGLE) and nothing that phones home:
# the machines that run this have no network and no display.
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
    "--ignore-gpu-blocklist",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-default-apps",
    "--disable-extensions",
)
VIEWPORT = {"width": 1024, "height": 768}
READY_POLLS = 5  # consecutive "ready" answers that count as settled
POLL_SECONDS = 0.2
CHUNK_ERROR_TEXT = "Error retrieving chunk"
DEFAULT_MIN_FRACTION = 0.02
PANEL_OVERLAYS_HIDDEN = ".neuroglancer-rendered-data-panel * { visibility: hidden !important; }"

EXIT_MEANINGS = {
    errors.EXIT_OK: "the viewer loaded and rendered the dataset",
    errors.EXIT_USAGE: "bad usage, or Chromium / Playwright / Neuroglancer missing",
    errors.EXIT_SOURCE: "the viewer could not load or render the dataset (the reason is logged)",
    errors.EXIT_SIGINT: "interrupted by SIGINT (Ctrl-C)",
}

EXAMPLES = """\
examples:
  check_viewer https://swift.example.org/v1/AUTH_x/bigbrain --screenshot bigbrain.png
  check_viewer https://swift.example.org/v1/AUTH_x/atlas --type segmentation --segments 1 2 3
"""


class BrowserMissing(errors.UsageError):
    """Chromium, Playwright or the Neuroglancer client is not installed."""


class ViewerCheckError(errors.RemoteError):
    """The viewer could not load or render the dataset."""


@dataclasses.dataclass(frozen=True)
class ViewOptions:
    """How the dataset is shown and judged (the options of ``check_viewer``)."""

    layer_type: str | None = None  # None: the 'type' in 'info'
    segments: Sequence[int] = ()
    screenshot: Path | str | None = None
    timeout: float = 60.0
    min_fraction: float = DEFAULT_MIN_FRACTION
    layout: str = "4panel"
    origin: str | None = None

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ViewOptions:
        """Returns the options parsed by :func:`add_view_options`."""
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})


@dataclasses.dataclass
class RenderReport:
    """What the viewer did with one dataset; ``ok`` says whether it counts as rendered."""

    url: str
    layer_type: str
    problems: list[str]
    ready: bool
    requests: list[ProxiedRequest]
    console_errors: list[str]
    page_errors: list[str]
    signal_fraction: float  # bright (image) or saturated (segmentation) share of the panel
    screenshot: Path | None
    seconds: float

    @property
    def ok(self) -> bool:
        """Tells whether the dataset rendered with no problem."""
        return not self.problems

    @property
    def chunk_requests(self) -> list[ProxiedRequest]:
        """Returns the requests that fetched chunk data."""
        return [r for r in self.requests if r.is_chunk]

    def summary(self) -> str:
        """Returns one line: the verdict and its main reason."""
        chunks = self.chunk_requests
        if self.ok:
            return (
                f"{self.url}: rendered as {self.layer_type} in {self.seconds:.1f} s "
                f"({_count(len(chunks), 'chunk request')}, all served; "
                f"{self.signal_fraction:.1%} of the data panel shows data)"
            )
        return f"{self.url}: the viewer cannot show this dataset: {'; '.join(self.problems)}"


def find_chromium(explicit: str | None = None) -> str:
    """Returns the path of a Chromium binary (``explicit``, $CHROMIUM, or a known place)."""
    # A binary named on purpose must be used, not silently replaced by another.
    explicit = explicit or os.environ.get("CHROMIUM") or None
    for candidate in (explicit, *CHROMIUM_CANDIDATES):
        if not candidate:
            continue
        path = candidate if os.sep in candidate else shutil.which(candidate)
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
        if candidate == explicit:
            raise BrowserMissing(
                f"Chromium binary {explicit!r} not found or not executable; {INSTALL_HINT}"
            )
    raise BrowserMissing(f"Chromium not found; {INSTALL_HINT}")


def missing_requirements(chromium: str | None = None) -> str | None:
    """Returns why the viewer check cannot run here (one line), or None if it can."""
    try:
        importlib.import_module("playwright.sync_api")
        find_client_dir()
        find_chromium(chromium)
    except ImportError as exc:
        return f"{exc}; {INSTALL_HINT}"
    except BrowserMissing as exc:
        return str(exc)
    return None


def read_info(url: str, timeout: float = 30.0) -> dict[str, Any]:
    """Returns the dataset's ``info`` JSON; raises ViewerCheckError when it is unusable."""
    info_url = f"{url.rstrip('/')}/info"
    try:
        response = requests.get(info_url, timeout=timeout)
    except requests.RequestException as exc:
        raise ViewerCheckError(f"{info_url}: cannot be fetched: {exc}") from exc
    if response.status_code != 200:
        raise ViewerCheckError(f"{info_url}: HTTP {response.status_code} {response.reason}")
    try:
        info = response.json()
    except ValueError as exc:
        raise ViewerCheckError(f"{info_url}: not valid JSON: {exc}") from exc
    scales = info.get("scales") if isinstance(info, dict) else None
    if not scales or not isinstance(scales, list):
        raise ViewerCheckError(f"{info_url}: no 'scales' list: not a precomputed volume")
    for index, scale in enumerate(scales):
        missing = [
            key
            for key in ("key", "size", "resolution", "chunk_sizes", "encoding")
            if key not in scale
        ]
        if missing:
            raise ViewerCheckError(f"{info_url}: scale {index} lacks {', '.join(missing)}")
    if info.get("type") not in ("image", "segmentation"):
        raise ViewerCheckError(
            f"{info_url}: 'type' is {info.get('type')!r}, not 'image' or 'segmentation'"
        )
    return info


def framed_state(
    source: str,
    info: dict[str, Any],
    layer_type: str,
    segments: Sequence[int] = (),
    layout: str = "4panel",
) -> dict[str, Any]:
    """Returns the :func:`viewer_state` of the dataset at ``source``, zoomed to show all of
    it in one panel, with the UI overlays off."""
    state = viewer_state(
        source, "dataset", info, layer_type=layer_type, segments=segments, layout=layout
    )
    scale0 = info["scales"][0]
    # The zoom is in metres per screen pixel; fit the largest extent into one panel.
    extent = max(n * r * 1e-9 for n, r in zip(scale0["size"], scale0["resolution"]))
    panel_pixels = min(VIEWPORT["width"], VIEWPORT["height"]) / (2 if layout == "4panel" else 1)
    state.update(
        crossSectionScale=extent / (panel_pixels * 0.8),
        projectionScale=extent * 2.0,
        crossSectionBackgroundColor="#000000",
        showAxisLines=False,
        showScaleBar=False,
        showDefaultAnnotations=False,
        selectedLayer={"visible": False},
    )
    return state


def viewer_url(page_url: str, state: dict[str, Any]) -> str:
    """Returns the viewer page URL with ``state`` in its fragment."""
    return page_url + "#!" + quote(json.dumps(state, separators=(",", ":")), safe="")


def signal_fraction(png: bytes, layer_type: str) -> float:
    """Returns the share of pixels that show data.

    Those are bright pixels for an image, saturated colours for a segmentation.
    """
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)
    if pixels.size == 0:
        return 0.0
    high = pixels.max(axis=2)
    if layer_type == "segmentation":
        low = pixels.min(axis=2)
        saturation = np.where(high > 0, (high - low) / np.maximum(high, 1), 0)
        mask = (saturation >= 0.4) & (high >= 40)
    else:
        mask = high >= 64
    return float(mask.mean())


class Browser:
    """Headless Chromium with the Neuroglancer client served locally, for one or more checks."""

    def __init__(self, chromium: str | None = None):
        reason = missing_requirements(chromium)
        if reason:
            raise BrowserMissing(reason)
        self.chromium = find_chromium(chromium)
        self._client: ClientServer | None = None
        self._playwright = None
        self._browser = None

    def __enter__(self) -> Browser:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright

        self._client = ClientServer().start()
        try:
            self._playwright = sync_playwright().start()
            self._browser = self._playwright.chromium.launch(
                executable_path=self.chromium, headless=True, args=list(CHROMIUM_ARGS)
            )
        except PlaywrightError as exc:
            self.__exit__(None, None, None)
            first_line = (str(exc).strip().splitlines() or ["no message"])[0]
            raise BrowserMissing(f"{self.chromium} did not start: {first_line}") from exc
        except BaseException:
            self.__exit__(None, None, None)
            raise
        logger.debug("started %s (version %s)", self.chromium, self._browser.version)
        return self

    def __exit__(self, *exc_info) -> None:
        if self._browser is not None:
            self._browser.close()
            self._browser = None
        if self._playwright is not None:
            self._playwright.stop()
            self._playwright = None
        if self._client is not None:
            self._client.close()
            self._client = None

    def check(self, url: str, options: ViewOptions | None = None, **fields: Any) -> RenderReport:
        """Opens ``url`` in the viewer with ``options`` (``fields`` replace some of them);
        returns what happened.

        Raises ViewerCheckError only when ``info`` is unusable; a bad render is
        a report with ``problems``.
        """
        assert self._browser is not None and self._client is not None, "use 'with Browser()'"
        options = dataclasses.replace(options or ViewOptions(), **fields)
        started = time.monotonic()
        info = read_info(url, timeout=min(options.timeout, 30.0))
        options = dataclasses.replace(options, layer_type=options.layer_type or info["type"])
        with DatasetProxy(url, timeout=options.timeout, origin=options.origin) as proxy:
            state = framed_state(
                proxy.url, info, options.layer_type, options.segments, options.layout
            )
            context = self._browser.new_context(viewport=VIEWPORT)
            try:
                return self._render(context, proxy, url, state, options, started)
            finally:
                context.close()

    def _render(
        self,
        context,
        proxy: DatasetProxy,
        url: str,
        state: dict[str, Any],
        options: ViewOptions,
        started: float,
    ) -> RenderReport:
        from playwright.sync_api import Error as PlaywrightError

        assert self._client is not None
        page, console_errors, page_errors = _watched_page(context)
        ready = False
        saved = None
        fraction = 0.0
        try:
            page.goto(
                viewer_url(self._client.url, state),
                wait_until="load",
                timeout=options.timeout * 1000,
            )
            ready = self._wait_until_ready(
                page, proxy, started + options.timeout, console_errors, page_errors
            )
            shot = options.screenshot
            saved = save_png(page.screenshot(), shot) if shot else None
            fraction = self._panel_fraction(page, options.layer_type)
        except PlaywrightError as exc:
            # A crashed or hung page is a failed render, not a bug of this command.
            page_errors.append(f"browser: {(str(exc).strip().splitlines() or ['?'])[0]}")
        report = RenderReport(
            url=url,
            layer_type=options.layer_type,
            problems=[],
            ready=ready,
            requests=proxy.requests,
            console_errors=console_errors,
            page_errors=page_errors,
            signal_fraction=fraction,
            screenshot=saved,
            seconds=time.monotonic() - started,
        )
        report.problems = judge(report, options.timeout, options.min_fraction)
        return report

    @staticmethod
    def _wait_until_ready(
        page,
        proxy: DatasetProxy,
        deadline: float,
        console_errors: list[str],
        page_errors: list[str],
    ) -> bool:
        """Returns True once the viewer says "ready" on several polls in a row after chunks came."""
        streak = 0
        while time.monotonic() < deadline:
            if page_errors or console_errors:
                return False  # already a failure: no need to wait for the deadline
            is_ready = page.evaluate("() => !!(window.viewer && window.viewer.isReady())")
            chunk_seen = any(r.is_chunk for r in proxy.requests)
            streak = streak + 1 if (is_ready and chunk_seen) else 0
            if streak >= READY_POLLS:
                return True
            page.wait_for_timeout(POLL_SECONDS * 1000)
        return False

    @staticmethod
    def _panel_fraction(page, layer_type: str) -> float:
        """Returns the share of the first data panel's pixels that show data, overlays hidden."""
        panel = page.locator(".neuroglancer-rendered-data-panel").first
        if not panel.count():
            return 0.0
        # The panel's widgets (dimensions, buttons) are grey and white: hide them so
        # that an empty panel measures as empty.
        page.add_style_tag(content=PANEL_OVERLAYS_HIDDEN)
        page.wait_for_timeout(100)
        box = panel.bounding_box()
        if not box:
            return 0.0
        return signal_fraction(crop(page.screenshot(), box), layer_type)


def _watched_page(context) -> tuple[Any, list[str], list[str]]:
    """Returns a new page with the lists its console errors and page errors go to."""
    page = context.new_page()
    console_errors: list[str] = []
    page_errors: list[str] = []

    def on_console(message) -> None:
        text = message.text
        logger.debug("console %s: %s", message.type, text)
        if message.type == "error" or CHUNK_ERROR_TEXT in text:
            console_errors.append(text)

    page.on("console", on_console)
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    page.on("crash", lambda _page: page_errors.append("the page crashed"))
    return page, console_errors, page_errors


def crop(png: bytes, box: dict[str, float]) -> bytes:
    """Returns the part of a PNG screenshot inside a Playwright bounding box, as PNG."""
    from PIL import Image

    image = Image.open(io.BytesIO(png))
    left, top = int(box["x"]), int(box["y"])
    part = image.crop((left, top, left + int(box["width"]), top + int(box["height"])))
    out = io.BytesIO()
    part.save(out, format="PNG")
    return out.getvalue()


def save_png(png: bytes, path: Path | str) -> Path:
    """Writes a PNG under a temporary name, then renames it; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomically(path, png)
    return path


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def judge(report: RenderReport, timeout: float, min_fraction: float) -> list[str]:
    """Returns the reasons why ``report`` does not count as a good render, most telling first."""
    problems: list[str] = []
    served = [r for r in report.requests if r.status in (200, 206, 304)]
    refused = [r for r in served if not r.cors_allowed]
    if refused:
        got = refused[0].allow_origin
        problems.append(
            f"{_count(len(refused), 'response')} without a matching Access-Control-Allow-"
            f"Origin header (CORS; got {got!r} for {refused[0].path or '/'}): "
            "browsers refuse the data to viewers on other sites"
        )
    unencoded = [r for r in report.requests if r.gzip_body_without_header]
    if unencoded:
        problems.append(
            f"{_count(len(unencoded), 'response')} with gzip data but no "
            f"'Content-Encoding: gzip' header (e.g. {unencoded[0].path})"
        )
    failed = [r for r in report.requests if r.status not in (200, 206, 304)]
    if failed:
        shown = ", ".join(r.describe() for r in failed[:3])
        more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
        problems.append(
            f"{len(failed)} of {_count(len(report.requests), 'request')} failed: {shown}{more}"
        )
    chunk_errors = [line for line in report.console_errors if CHUNK_ERROR_TEXT in line]
    if chunk_errors:
        problems.append(f"{_count(len(chunk_errors), 'chunk')} failed to load: {chunk_errors[0]}")
    other_errors = [line for line in report.console_errors if CHUNK_ERROR_TEXT not in line]
    if other_errors:
        problems.append(f"console error: {other_errors[0]}")
    if report.page_errors:
        problems.append(f"uncaught error in the page: {report.page_errors[0]}")
    if not problems and not report.chunk_requests:
        problems.append(f"the viewer requested no chunk within {timeout:g} s")
    if not problems and not report.ready:
        problems.append(f"the viewer was not ready after {timeout:g} s")
    if report.ready and report.signal_fraction < min_fraction:
        what = "saturated colours" if report.layer_type == "segmentation" else "bright pixels"
        problems.append(
            f"the data panel looks empty: {report.signal_fraction:.2%} {what} "
            f"(at least {min_fraction:.0%} expected)"
        )
    return problems


def check_viewer(
    url: str, options: ViewOptions | None = None, chromium: str | None = None, **fields: Any
) -> RenderReport:
    """Opens the dataset at ``url`` in headless Neuroglancer with ``options`` (``fields``
    replace some of them); returns the report of a good render.

    Raises ViewerCheckError (with the reasons) when the viewer cannot show it,
    BrowserMissing when Chromium, Playwright or the Neuroglancer client is missing.
    """
    # Operators often paste the source as the viewer shows it.
    if url.startswith("precomputed://"):
        url = url[len("precomputed://") :]
    if not url.startswith(("http://", "https://")):
        raise errors.UsageError(f"{url!r} is not an http(s) URL of a precomputed dataset")
    with Browser(chromium) as browser:
        report = browser.check(url, options, **fields)
    for entry in report.requests:
        logger.debug("%s", entry.describe())
    if report.screenshot:
        logger.info("screenshot saved to %s", report.screenshot)
    if not report.ok:
        raise ViewerCheckError(report.summary())
    return report


_segment_id = cli.checked_number(int, lambda value: value >= 1, ">= 1", "a segment number")
_seconds = cli.checked_number(float, lambda value: value > 0, "> 0", "a number of seconds")
_fraction = cli.checked_number(float, lambda value: 0 <= value <= 1, "between 0 and 1")


def _origin(text: str) -> str:
    from urllib.parse import urlparse

    parsed = urlparse(text)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise argparse.ArgumentTypeError(f"{text!r} is not an origin like https://host[:port]")
    return f"{parsed.scheme}://{parsed.netloc}"


def parse_command_line(argv: Iterable[str] | None) -> argparse.Namespace:
    """Parses the command line of `check_viewer`."""
    parser = argparse.ArgumentParser(
        prog="check_viewer",
        description=__doc__,
        epilog=EXAMPLES
        + "\n"
        + cli.exit_codes_help("check_viewer", EXIT_MEANINGS)
        + f"\nneeds: {INSTALL_HINT}",
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "url",
        metavar="URL",
        help="public http(s) URL of the dataset: the directory "
        "holding its 'info' file, e.g. a Swift container URL "
        "(a leading precomputed:// is accepted)",
    )
    add_view_options(parser)
    parser.add_argument(
        "--chromium",
        default=None,
        metavar="PATH",
        help="Chromium binary (default: $CHROMIUM, else "
        "/usr/lib/chromium/chromium or chromium on the PATH)",
    )
    cli.add_logging_options(parser)
    return parser.parse_args(None if argv is None else list(argv))


def add_view_options(parser: argparse.ArgumentParser) -> None:
    """Adds the options that make up :class:`ViewOptions`."""
    parser.add_argument(
        "--type",
        dest="layer_type",
        choices=("image", "segmentation"),
        default=None,
        help="layer type (default: the 'type' in the dataset's 'info')",
    )
    parser.add_argument(
        "--segments",
        type=_segment_id,
        nargs="+",
        default=[],
        metavar="ID",
        help="segments to select in a segmentation (default: show all)",
    )
    parser.add_argument(
        "--screenshot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="save what the viewer showed to this PNG file (1024x768)",
    )
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=60.0,
        metavar="SECONDS",
        help="give up when the viewer is not ready after this long",
    )
    parser.add_argument(
        "--min-fraction",
        type=_fraction,
        default=DEFAULT_MIN_FRACTION,
        metavar="F",
        help="share of the data panel that must show data "
        "(bright pixels for images, saturated colours for segmentations)",
    )
    parser.add_argument(
        "--layout",
        choices=("4panel", "xy", "xz", "yz"),
        default="4panel",
        help="viewer layout; the check looks at the first (xy) panel",
    )
    parser.add_argument(
        "--origin",
        type=_origin,
        default=None,
        metavar="URL",
        help="check CORS as seen from this viewer site (e.g. "
        "https://neuroglancer.example.org) (default: the dataset must be "
        "readable from any site: Access-Control-Allow-Origin for the checking page)",
    )


def main(argv: Iterable[str] | None = None) -> int:
    """Runs `check_viewer`; returns the exit code."""
    args = parse_command_line(argv)

    def work(_redactor: cli.RedactingFilter) -> None:
        report = check_viewer(args.url, ViewOptions.from_args(args), chromium=args.chromium)
        print(report.summary())

    return cli.run_command(work, args)


if __name__ == "__main__":
    sys.exit(main())
