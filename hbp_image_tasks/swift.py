"""The one place that talks to OpenStack Swift: authenticated and anonymous clients.

Authenticated access goes through a keystoneauth1 session handed to
python-swiftclient, so an expired token is renewed transparently; anonymous
access to public containers uses a pooled requests session with retries.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import threading
from collections.abc import Iterator, Mapping
from typing import Any, Callable
from urllib.parse import quote, unquote, urlparse

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from .errors import RemoteError, SettingsError
from .settings import SwiftSettings

logger = logging.getLogger(__name__)

RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
DEFAULT_TIMEOUT = (15.0, 300.0)  # (connect, read) seconds
# None asks for the server's own maximum (container_listing_limit): asking for
# more than that is refused with 412 Precondition Failed.
LISTING_PAGE_SIZE = None
PUBLIC_READ_ACL = ".r:*,.rlistings"


@dataclasses.dataclass(frozen=True)
class ObjectInfo:
    """One entry of a container listing."""

    name: str
    bytes: int
    hash: str
    content_type: str = ""
    last_modified: str = ""
    is_large: bool = False
    slo_etag: str = ""  # a static large object's content ETag (MD5 of segment MD5s)

    @classmethod
    def from_listing(cls, entry: Mapping[str, Any]) -> ObjectInfo:
        """Builds an entry from Swift's JSON listing (SLO/DLO flagged as large)."""
        return cls(
            name=entry["name"],
            bytes=int(entry.get("bytes", 0)),
            hash=str(entry.get("hash", "")).strip('"'),
            content_type=entry.get("content_type", ""),
            last_modified=entry.get("last_modified", ""),
            # A large object's listed hash is its manifest's, not the content MD5.
            is_large="slo_etag" in entry or entry.get("symlink_path") is not None,
            slo_etag=str(entry.get("slo_etag", "")).strip('"'),
        )


@dataclasses.dataclass(frozen=True)
class ContainerUrl:
    """A container (and optional object prefix) addressed by its public URL."""

    storage_url: str  # e.g. https://host/v1/AUTH_project
    container: str
    prefix: str = ""

    @property
    def url(self) -> str:
        """Returns the container's URL, without the prefix."""
        return f"{self.storage_url}/{quote(self.container, safe='')}"

    def object_url(self, name: str) -> str:
        """Returns the URL of the object called ``name``."""
        return f"{self.url}/{quote(name, safe='/')}"


def parse_container_url(url: str) -> ContainerUrl:
    """Splits ``https://host/v1/AUTH_x/container[/prefix]`` into its parts."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise SettingsError(f"{url!r} is not an http(s) URL of a Swift container")
    parts = parsed.path.split("/")
    # ['', ..., 'v1', 'AUTH_x', 'container', 'prefix'...]; a proxy may add a path
    # before /v1, so look for the API version segment.
    try:
        version_index = next(
            i for i, p in enumerate(parts) if p.startswith("v1") and i + 2 < len(parts)
        )
    except StopIteration:
        raise SettingsError(
            f"{url!r} is not a Swift container URL "
            f"(expected https://HOST/v1/AUTH_<project>/<container>)"
        ) from None
    account, container = parts[version_index + 1], unquote(parts[version_index + 2])
    if not account or not container:
        raise SettingsError(f"{url!r} names no account or container")
    storage_path = "/".join(parts[: version_index + 2])
    prefix = unquote("/".join(parts[version_index + 3 :]))
    return ContainerUrl(f"{parsed.scheme}://{parsed.netloc}{storage_path}", container, prefix)


def retry_policy(total: int = 8, backoff_factor: float = 0.5) -> Retry:
    """Returns the urllib3 retry policy: connection errors, timeouts, 408/429/5xx."""
    options = dict(
        total=total,
        connect=total,
        read=total,
        status=total,
        backoff_factor=backoff_factor,
        status_forcelist=RETRY_STATUSES,
        allowed_methods=frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"}),
        respect_retry_after_header=True,
        raise_on_status=False,
    )
    try:
        return Retry(backoff_max=60, **options)
    except TypeError:  # urllib3 < 2 has a fixed 120 s maximum
        return Retry(**options)


def http_session(
    pool_size: int = 16, retries: int = 8, backoff_factor: float = 0.5
) -> requests.Session:
    """Returns a keep-alive requests session with ``pool_size`` pooled connections."""
    session = requests.Session()
    adapter = HTTPAdapter(
        pool_connections=4,
        pool_maxsize=pool_size,
        max_retries=retry_policy(retries, backoff_factor),
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "hbp-image-tasks"
    return session


def iter_pages(get_page: Callable[[str], list[Mapping[str, Any]]]) -> Iterator[ObjectInfo]:
    """Yields every object of a listing, following ``marker`` until an empty page.

    The server may return fewer names than asked (``container_listing_limit``),
    so only an empty page ends the listing.
    """
    marker = ""
    while True:
        page = get_page(marker)
        if not page:
            return
        for entry in page:
            if "subdir" in entry:
                continue
            yield ObjectInfo.from_listing(entry)
        marker = page[-1].get("name") or page[-1].get("subdir")


def describe_status(response: requests.Response) -> str:
    """Returns ``404 Not Found`` for a response."""
    return f"{response.status_code} {response.reason or ''}".strip()


class ObjectStream:
    """A streamed object body with its (lower-case) headers."""

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        chunks: Iterator[bytes],
        close: Callable[[], None],
    ):
        self.status = status
        self.headers = {k.lower(): v for k, v in headers.items()}
        self._chunks = chunks
        self._close = close

    def __iter__(self) -> Iterator[bytes]:
        return self._chunks

    def close(self) -> None:
        """Releases the connection."""
        self._close()

    def __enter__(self) -> ObjectStream:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class PublicContainer:
    """Anonymous reads of a public container (``X-Container-Read: .r:*,.rlistings``)."""

    def __init__(
        self,
        url: str | ContainerUrl,
        pool_size: int = 16,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = DEFAULT_TIMEOUT,
        error_type: type[RemoteError] = RemoteError,
    ):
        self.location = url if isinstance(url, ContainerUrl) else parse_container_url(url)
        self.session = session or http_session(pool_size)
        self.timeout = timeout
        self.error_type = error_type

    def iter_objects(
        self, prefix: str = "", page_size: int | None = LISTING_PAGE_SIZE
    ) -> Iterator[ObjectInfo]:
        """Yields every object whose name starts with ``prefix``, page by page."""

        def get_page(marker: str) -> list[Mapping[str, Any]]:
            params = {"format": "json", "marker": marker}
            if page_size:  # None: the server's maximum (a larger limit gets 412)
                params["limit"] = str(page_size)
            if prefix:
                params["prefix"] = prefix
            try:
                response = self.session.get(self.location.url, params=params, timeout=self.timeout)
            except requests.RequestException as exc:
                raise self.error_type(f"listing {self.location.url} failed: {exc}") from None
            if response.status_code == 204:
                return []
            if response.status_code in (401, 403):
                raise self.error_type(
                    f"listing {self.location.url}: {describe_status(response)} "
                    f"(is the container public with .rlistings? to read a private one "
                    f"with the credentials: fetch_input --settings, ingest --source-private)",
                    http_status=response.status_code,
                )
            if response.status_code >= 400:
                raise self.error_type(
                    f"listing {self.location.url}: {describe_status(response)}",
                    http_status=response.status_code,
                )
            try:
                return response.json()
            except ValueError:
                raise self.error_type(
                    f"listing {self.location.url}: the answer is not a JSON "
                    f"listing (is this a Swift container URL?)"
                ) from None

        return iter_pages(get_page)

    def open_object(self, name: str, start: int = 0) -> ObjectStream:
        """Opens ``name`` for streaming, from byte ``start`` (a Range request)."""
        return open_url(
            self.session, self.location.object_url(name), start, self.timeout, self.error_type
        )


def open_url(
    session: requests.Session,
    url: str,
    start: int = 0,
    timeout: tuple[float, float] = DEFAULT_TIMEOUT,
    error_type: type[RemoteError] = RemoteError,
    headers: Mapping[str, str] | None = None,
    chunk_size: int = 1 << 20,
) -> ObjectStream:
    """GETs ``url`` as a stream; 4xx/5xx left after retries raise ``error_type``."""
    request_headers = dict(headers or {})
    if start:
        request_headers["Range"] = f"bytes={start}-"
    try:
        response = session.get(url, headers=request_headers, stream=True, timeout=timeout)
    except requests.RequestException as exc:
        raise error_type(f"GET {url} failed: {exc}") from None
    if response.status_code >= 400:
        response.close()
        raise error_type(
            f"GET {url}: {describe_status(response)}", http_status=response.status_code
        )
    return ObjectStream(
        response.status_code, response.headers, response.iter_content(chunk_size), response.close
    )


def _keystone_session(settings: SwiftSettings, timeout: float):
    from keystoneauth1 import session as ks_session
    from keystoneauth1.identity import v3

    project = (
        {"project_id": settings.os_project_id}
        if settings.os_project_id
        else {
            "project_name": settings.os_project_name,
            "project_domain_name": settings.os_project_domain_name,
        }
    )
    auth = v3.Password(
        auth_url=settings.os_auth_url,
        username=settings.os_username,
        password=settings.os_password.reveal(),
        user_domain_name=settings.os_user_domain_name,
        **project,
    )
    return ks_session.Session(auth=auth, timeout=timeout)


def same_credentials(first: SwiftSettings, second: SwiftSettings) -> bool:
    """True when the two settings log in as the same user to the same project."""
    return dataclasses.replace(first, os_storage_url=None, source="") == dataclasses.replace(
        second, os_storage_url=None, source=""
    )


class _RenewingSession:
    """The shared keystoneauth session as one thread's swiftclient sees it: a 401
    always leads to a retry with the session's newest token.

    keystoneauth's ``invalidate()`` answers False when another thread already
    dropped the shared token, and swiftclient then gives up on the request
    instead of fetching the new token; swiftclient renews once per request.
    The token is dropped only while it is the one refused (``refused_token``:
    the token the thread's connection sent): a thread that still held the old
    token takes the one another thread already renewed, instead of logging in again.
    """

    def __init__(self, session, refused_token: Callable[[], str | None]):
        self._session = session
        self._refused_token = refused_token

    def invalidate(self) -> bool:
        current = self._session.auth.auth_ref
        if current is None or current.auth_token == self._refused_token():
            self._session.invalidate()
        return True

    def __getattr__(self, name: str):
        return getattr(self._session, name)


class SwiftConnection:
    """Authenticated access to one Swift account, safe to share between threads.

    Each thread gets its own swiftclient connection (keep-alive); all of them
    share one keystoneauth session, which renews the token after a 401.
    The first request with a new token goes alone: the proxy then asks Keystone
    to validate the token once and caches it, instead of once per thread at the
    start of every parallel transfer.
    ``login``, a connection with the same credentials (its storage URL aside),
    lends its Keystone session: both then use one token, logged in once.
    """

    def __init__(
        self,
        settings: SwiftSettings,
        retries: int = 8,
        starting_backoff: float = 0.5,
        max_backoff: float = 32,
        timeout: float = 300.0,
        error_type: type[RemoteError] = RemoteError,
        login: SwiftConnection | None = None,
    ):
        if login is not None and not same_credentials(login.settings, settings):
            raise ValueError("a shared login needs the same credentials")
        self.settings = settings
        self.retries = retries
        self.starting_backoff = starting_backoff
        self.max_backoff = max_backoff
        self.timeout = timeout
        self.error_type = error_type
        self._keystone = None
        if login is not None:
            self._keystone = login._keystone
        elif settings.auth_version == "3":
            self._keystone = _keystone_session(settings, timeout)
        self._local = threading.local()
        self._storage_url: str | None = None
        self._first_request = threading.Lock()
        self._accepted_token: str | None = None

    def connection(self):
        """Returns this thread's swiftclient connection."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._new_connection()
            self._local.connection = connection
        return connection

    def _new_connection(self):
        import swiftclient

        override = self.settings.os_storage_url

        class Connection(swiftclient.Connection):
            # swiftclient ignores object_storage_url when given a session, and
            # forgets preauthurl after a 401: keep the configured URL across renewals.
            def get_auth(self):
                url, token = super().get_auth()
                if override:
                    self.url = url = override
                return url, token

        common = dict(
            retries=self.retries,
            starting_backoff=self.starting_backoff,
            max_backoff=self.max_backoff,
            timeout=self.timeout,
            retry_on_ratelimit=True,
            os_options={"region_name": self.settings.os_region_name}
            if self.settings.os_region_name
            else None,
        )
        if self._keystone is not None:
            connection = Connection(**common)
            # swiftclient calls invalidate() before it forgets the refused token.
            connection.session = _RenewingSession(self._keystone, lambda: connection.token)
            return connection
        return Connection(
            authurl=self.settings.os_auth_url,
            user=self.settings.os_username,
            key=self.settings.os_password.reveal(),
            auth_version="1",
            **common,
        )

    def call(self, description: str, method: str, *args, object_name: str | None = None, **kwargs):
        """Calls a swiftclient method, turning its failures into one-line errors.

        The error carries the HTTP status (callers retry e.g. a 422, a bad ETag)
        and ``object_name``, the object the call was about.
        """
        from swiftclient.exceptions import ClientException

        try:
            if method == "get_auth":  # Keystone only: the proxy sees no token
                return self.connection().get_auth()
            return self._call_with_accepted_token(method, *args, **kwargs)
        except ClientException as exc:
            status = exc.http_status
            if status is None:
                raise self.error_type(
                    f"{description}: {exc.msg}", object_name=object_name
                ) from None
            raise self.error_type(
                f"{description}: {status} {exc.http_reason or ''}".strip() + self._hint(status),
                http_status=status,
                object_name=object_name,
            ) from None
        except requests.RequestException as exc:
            raise self.error_type(
                f"{description}: {type(exc).__name__}: {exc}", object_name=object_name
            ) from None
        except Exception as exc:
            if type(exc).__module__.startswith("keystoneauth1"):
                raise self.error_type(
                    f"{description}: authentication with {self.settings.os_auth_url} "
                    f"as {self.settings.os_username!r} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            raise

    def _call_with_accepted_token(self, method: str, *args, **kwargs):
        """Calls swiftclient's ``method``, alone while the token is new to the proxy."""
        call = getattr(self.connection(), method)
        if self._keystone is None or self._keystone.get_token() == self._accepted_token:
            return call(*args, **kwargs)
        with self._first_request:
            if self._keystone.get_token() != self._accepted_token:
                return self._first_call(call, *args, **kwargs)
        return call(*args, **kwargs)

    def _first_call(self, call: Callable, *args, **kwargs):
        """Makes the first call with the session's token; notes the token once the
        proxy has taken it (any answer but 401: a 404 comes after the token check)."""
        from swiftclient.exceptions import ClientException

        try:
            result = call(*args, **kwargs)
        except ClientException as exc:
            if exc.http_status not in (None, 401):
                self._accepted_token = self._keystone.get_token()
            raise
        self._accepted_token = self._keystone.get_token()
        return result

    @staticmethod
    def _hint(status: int) -> str:
        return {
            401: " (the credentials were refused)",
            403: " (the account may not write there: check the project and role)",
            413: " (object too large: lower --segment-size)",
            507: " (the cluster is out of space)",
        }.get(status, "")

    @property
    def storage_url(self) -> str:
        """Returns the account's storage URL (authenticating once if needed)."""
        if self._storage_url is None:
            url, _ = self.call("authenticating", "get_auth")
            self._storage_url = self.settings.os_storage_url or url
        return self._storage_url

    def check_credentials(self) -> str:
        """Authenticates and HEADs the account; returns the storage URL."""
        self.call("checking the account", "head_account")
        return self.storage_url

    def container_url(self, container: str, prefix: str = "") -> ContainerUrl:
        """Returns the public address of ``container`` (and ``prefix``)."""
        return ContainerUrl(self.storage_url.rstrip("/"), container, prefix)

    def iter_objects(
        self, container: str, prefix: str = "", page_size: int | None = LISTING_PAGE_SIZE
    ) -> Iterator[ObjectInfo]:
        """Yields every object of ``container`` under ``prefix``, page by page."""

        def get_page(marker: str) -> list[Mapping[str, Any]]:
            _, page = self.call(
                f"listing container {container!r}",
                "get_container",
                container,
                marker=marker,
                limit=page_size,
                prefix=prefix or None,
            )
            return page

        return iter_pages(get_page)

    def head_container(self, container: str) -> dict[str, str] | None:
        """Returns the container's headers, or None if it does not exist."""
        try:
            return self.call(f"HEAD container {container!r}", "head_container", container)
        except RemoteError as exc:
            if exc.http_status == 404:
                return None
            raise

    def ensure_container(self, container: str, headers: Mapping[str, str] | None = None) -> bool:
        """Creates ``container`` if missing and sets the ``headers`` it lacks; True if created."""
        existing = self.head_container(container)
        if existing is None:
            self.call(
                f"creating container {container!r}",
                "put_container",
                container,
                headers=dict(headers or {}),
            )
            return True
        have = {key.lower(): value for key, value in existing.items()}
        if any(have.get(key.lower()) != value for key, value in (headers or {}).items()):
            self.call(
                f"setting headers of container {container!r}",
                "post_container",
                container,
                dict(headers),
            )
        return False

    def put_object(
        self,
        container: str,
        name: str,
        contents,
        *,
        content_length: int | None = None,
        etag: str | None = None,
        content_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        query_string: str | None = None,
    ) -> str:
        """PUTs one object (Swift checks ``etag``); returns the ETag it stored."""
        if isinstance(contents, (bytes, bytearray)):
            # swiftclient can rewind a file for a retry, but not a bytes body.
            if content_length is None:
                content_length = len(contents)
            contents = io.BytesIO(contents)
        return self.call(
            f"PUT {container}/{name}",
            "put_object",
            container,
            name,
            contents,
            object_name=name,
            content_length=content_length,
            etag=etag,
            content_type=content_type,
            headers=dict(headers or {}),
            query_string=query_string,
        )

    def delete_object(self, container: str, name: str) -> None:
        """Deletes one object."""
        self.call(f"DELETE {container}/{name}", "delete_object", container, name, object_name=name)

    def open_object(
        self, container: str, name: str, start: int = 0, chunk_size: int = 1 << 20
    ) -> ObjectStream:
        """Opens ``container/name`` for streaming, from byte ``start``."""
        headers = {"Range": f"bytes={start}-"} if start else None
        response_headers, body = self.call(
            f"GET {container}/{name}",
            "get_object",
            container,
            name,
            object_name=name,
            resp_chunk_size=chunk_size,
            headers=headers,
        )
        status = 206 if start else 200
        return ObjectStream(
            status, response_headers, iter(body), getattr(body, "close", lambda: None)
        )

    def close(self) -> None:
        """Closes this thread's connection."""
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
