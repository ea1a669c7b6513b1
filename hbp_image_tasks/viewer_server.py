"""Local HTTP servers behind `check_viewer`: the Neuroglancer client and a logging dataset proxy.

The client is served from one port and the dataset, through a proxy that records
every request, from another, so the browser enforces CORS as it would on a real site.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import mimetypes
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import requests

logger = logging.getLogger(__name__)

CLIENT_TOKEN = "check"
GZIP_MAGIC = b"\x1f\x8b"
# Headers of the dataset server that the browser must see unchanged.
FORWARDED_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Encoding",
    "Content-Range",
    "Accept-Ranges",
    "ETag",
    "Last-Modified",
    "Cache-Control",
    "Vary",
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Allow-Credentials",
    "Access-Control-Max-Age",
)
FORWARDED_REQUEST_HEADERS = (
    "Origin",
    "Accept",
    "Accept-Encoding",
    "Range",
    "If-None-Match",
    "If-Modified-Since",
    "Access-Control-Request-Method",
    "Access-Control-Request-Headers",
)
# Unsharded chunks are "<scale key>/<x0>-<x1>_<y0>-<y1>_<z0>-<z1>"; sharded ones live in
# "<scale key>/<hex>.shard" and are read with Range requests.
CHUNK_NAME = re.compile(r"(^|/)\d+-\d+_\d+-\d+_\d+-\d+$|\.shard$")


def find_client_dir() -> Path:
    """Returns the directory of the built Neuroglancer client shipped by the `neuroglancer` package.

    Raises ImportError when the package is missing or ships no client.
    """
    # find_spec locates the package without importing it (and its heavy dependencies).
    spec = importlib.util.find_spec("neuroglancer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the Python package 'neuroglancer' is not installed")
    for location in spec.submodule_search_locations:
        client = Path(location) / "static" / "client"
        if (client / "index.html").is_file():
            return client
    raise ImportError("the 'neuroglancer' package ships no built client (static/client/index.html)")


@dataclasses.dataclass(frozen=True)
class ProxiedRequest:
    """One request that the browser sent to the dataset, as the proxy answered it."""

    method: str
    path: str  # relative to the dataset URL, without query
    status: int  # 502 when the dataset server could not be reached
    content_encoding: str
    nbytes: int
    allow_origin: str  # the Access-Control-Allow-Origin header, "" when absent
    gzip_body_without_header: bool
    error: str = ""
    cors_allowed: bool = True  # the answer lets the requesting site read it

    @property
    def is_chunk(self) -> bool:
        """Tells whether this request fetched volume chunk data."""
        return bool(CHUNK_NAME.search(self.path))

    def describe(self) -> str:
        """Returns a short human-readable line for reports."""
        text = f"{self.method} {self.path or '/'} -> {self.status}"
        if self.error:
            text += f" ({self.error})"
        return text


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def _start(server: ThreadingHTTPServer, name: str) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    return thread


class DatasetProxy:
    """A reverse proxy on 127.0.0.1 in front of ``upstream`` that logs what it serves.

    Bodies and headers pass through unchanged (no decompression), so a missing
    Content-Encoding or CORS header reaches the browser as it would from the real server.
    """

    def __init__(self, upstream: str, timeout: float = 60.0, origin: str | None = None):
        self.upstream = upstream.rstrip("/")
        self.timeout = timeout
        # The site the dataset is published for: it stands in for the local page's
        # origin, so that a server allowing only that site is judged as it would be there.
        self.origin = origin
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._session = requests.Session()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Returns the proxy's base URL, standing for the dataset URL."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def requests(self) -> list[ProxiedRequest]:
        """Returns a snapshot of the requests answered so far."""
        with self._lock:
            return list(self._requests)

    def _record(self, entry: ProxiedRequest) -> None:
        logger.debug("dataset request: %s", entry.describe())
        with self._lock:
            self._requests.append(entry)

    def forward(
        self, method: str, path: str, headers: dict[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        """Sends one request to the dataset server; returns its status, headers and raw body."""
        url = f"{self.upstream}/{path.lstrip('/')}"
        page_origin = headers.get("Origin")
        if self.origin and page_origin:
            headers = {**headers, "Origin": self.origin}
        relative = path.lstrip("/").split("?", 1)[0]
        try:
            response = self._session.request(
                method,
                url,
                headers=headers,
                stream=True,
                timeout=self.timeout,
                allow_redirects=True,
            )
            try:
                # decode_content=False keeps the stored bytes: the browser must decode them.
                body = response.raw.read(decode_content=False)
            finally:
                response.close()
        except requests.RequestException as exc:
            reason = f"{type(exc).__name__}: {exc}"
            self._record(ProxiedRequest(method, relative, 502, "", 0, "", False, reason))
            return 502, {"Content-Type": "text/plain"}, reason.encode()
        kept = {
            name: response.headers[name]
            for name in FORWARDED_RESPONSE_HEADERS
            if name in response.headers
        }
        allowed = response.headers.get("Access-Control-Allow-Origin", "")
        if self.origin and page_origin and allowed == self.origin:
            kept["Access-Control-Allow-Origin"] = page_origin  # allowed for the real site
        encoding = response.headers.get("Content-Encoding", "")
        self._record(
            ProxiedRequest(
                method=method,
                path=relative,
                status=response.status_code,
                content_encoding=encoding,
                nbytes=len(body),
                allow_origin=allowed,
                cors_allowed=not page_origin or allowed in ("*", self.origin or page_origin),
                # Shards hold gzip members by design (their data_encoding), read by range.
                gzip_body_without_header=(
                    response.status_code in (200, 206)
                    and not encoding
                    and body.startswith(GZIP_MAGIC)
                    and not relative.endswith(".shard")
                ),
            )
        )
        return response.status_code, kept, body

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        return type("ProxyHandler", (_ProxyHandler,), {"proxy": self})

    def start(self) -> DatasetProxy:
        """Starts serving in a daemon thread; returns self."""
        self._thread = _start(self._server, "dataset-proxy")
        return self

    def close(self) -> None:
        """Stops serving and closes the connection pool."""
        self._server.shutdown()
        self._server.server_close()
        self._session.close()

    def __enter__(self) -> DatasetProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive handler that answers with a complete body."""

    protocol_version = "HTTP/1.1"

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)


class _ProxyHandler(_Handler):
    """Forwards every request to ``proxy`` (a DatasetProxy, set by its subclass)."""

    proxy: DatasetProxy

    def _proxy(self) -> None:
        headers = {
            name: self.headers[name] for name in FORWARDED_REQUEST_HEADERS if self.headers.get(name)
        }
        status, kept, body = self.proxy.forward(self.command, self.path, headers)
        self._send(status, body, kept)

    do_GET = do_HEAD = do_OPTIONS = _proxy

    def log_message(self, format: str, *args) -> None:
        pass  # requests are logged by DatasetProxy._record


class _ClientHandler(_Handler):
    """Serves ``client_dir`` under the client's prefix (both set by its subclass)."""

    client_dir: Path
    closing: threading.Event
    prefix = f"/v/{CLIENT_TOKEN}/"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].split("#", 1)[0]
        if path == f"/events/{CLIENT_TOKEN}":
            self._hold_event_stream()
            return
        if not path.startswith(self.prefix):
            self._send(204)  # other Python-integration endpoints: nothing to say
            return
        name = path[len(self.prefix) :] or "index.html"
        target = (self.client_dir / name).resolve()
        if self.client_dir not in target.parents or not target.is_file():
            self._send(404, b"not found", {"Content-Type": "text/plain"})
            return
        content_type = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if target.suffix == ".wasm":
            content_type = "application/wasm"  # needed for streaming compilation
        self._send(200, target.read_bytes(), {"Content-Type": content_type})

    do_HEAD = do_GET

    def _hold_event_stream(self) -> None:
        # An open, silent event stream keeps the client from showing
        # "Disconnected from Python server" over the data.
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            while not self.closing.wait(1.0):
                self.wfile.write(b": idle\n\n")
                self.wfile.flush()
        except OSError:
            pass  # the page went away

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self._send(204)

    def log_message(self, format: str, *args) -> None:
        logger.debug("client server: " + format, *args)


class ClientServer:
    """Serves the built Neuroglancer client under ``/v/<token>/`` on 127.0.0.1.

    The client also polls the Python-integration endpoints (``/events/<token>``,
    ...); they are answered "204 No Content", which it takes as "no server state".
    """

    def __init__(self, client_dir: Path | None = None):
        self.client_dir = client_dir or find_client_dir()
        self._closing = threading.Event()
        self._server = _Server(("127.0.0.1", 0), self._handler_class())

    @property
    def url(self) -> str:
        """Returns the URL of the viewer page (without the state fragment)."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v/{CLIENT_TOKEN}/"

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        attributes = {"client_dir": self.client_dir.resolve(), "closing": self._closing}
        return type("ClientHandler", (_ClientHandler,), attributes)

    def start(self) -> ClientServer:
        """Starts serving in a daemon thread; returns self."""
        _start(self._server, "viewer-client")
        return self

    def close(self) -> None:
        """Stops serving."""
        self._closing.set()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> ClientServer:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.close()
