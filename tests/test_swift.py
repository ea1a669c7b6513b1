"""Round trips through hbp_image_tasks.swift against the real local Swift + Keystone v3,
and failure injection (5xx, 401) with ``responses``."""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import responses
import swiftclient
from fake_keystone import FAKE_AUTH, FAKE_STORAGE, token_body

from hbp_image_tasks import cli, errors
from hbp_image_tasks.settings import Secret, SwiftSettings, load_settings
from hbp_image_tasks.swift import (
    PUBLIC_READ_ACL,
    PublicContainer,
    RemoteError,
    SwiftConnection,
    http_session,
    parse_container_url,
)

swift = pytest.mark.swift


@pytest.fixture
def settings(swift_settings_file) -> SwiftSettings:
    """Returns the test user's settings, loaded through the project's loader."""
    return load_settings(swift_settings_file)


@pytest.fixture
def connection(settings):
    """Returns the project's connection of the test user."""
    conn = SwiftConnection(settings, starting_backoff=0.05)
    yield conn
    conn.close()


def read_all(stream) -> bytes:
    with stream:
        return b"".join(stream)


@swift
def test_put_then_get_returns_the_same_bytes_and_etag(connection, unique_container, swift_client):
    container = unique_container()
    assert connection.ensure_container(container) is True
    data = bytes(range(256)) * 1000
    md5 = hashlib.md5(data).hexdigest()
    assert connection.put_object(container, "dir/chunk", data, etag=md5) == md5
    assert read_all(connection.open_object(container, "dir/chunk")) == data
    # A resumed read asks for the rest only.
    with connection.open_object(container, "dir/chunk", start=1000) as stream:
        assert stream.status == 206
        assert b"".join(stream) == data[1000:]
    # Checked independently of the module.
    _, body = swift_client.get_object(container, "dir/chunk")
    assert body == data


@swift
def test_put_with_wrong_etag_is_refused_in_one_line(connection, unique_container):
    container = unique_container()
    connection.ensure_container(container)
    with pytest.raises(RemoteError) as caught:
        connection.put_object(container, "x", b"abc", etag="0" * 32)
    assert "422" in str(caught.value) and "\n" not in str(caught.value)


LISTED = {f"data/{i:05d}": str(i).encode() for i in range(250)}
LISTED["other/skip"] = b"-"


@pytest.fixture(scope="module")
def listed_container(local_swift):
    """Returns (name, url) of one public container holding LISTED, shared by the module."""
    import uuid

    name = f"test-swift-listing-{uuid.uuid4().hex[:8]}"
    url = local_swift.create_container(name, LISTED)
    yield name, url
    local_swift.delete_container(name)


@swift
@pytest.mark.parametrize("page_size", [None, 30], ids=["server-limit", "page-30"])
@pytest.mark.parametrize("prefix,count", [("data/0000", 10), ("data/001", 100), ("data/", 250)])
@pytest.mark.parametrize("anonymous", [False, True], ids=["keystone", "anonymous"])
def test_listing_follows_pages_beyond_the_server_limit(
    prefix, count, anonymous, page_size, connection, listed_container, proxy_log, local_swift
):
    name, url = listed_container
    # None asks for the server's own maximum (more would get 412).
    if anonymous:
        listing = list(PublicContainer(url).iter_objects(prefix, page_size=page_size))
    else:
        listing = list(connection.iter_objects(name, prefix, page_size=page_size))
    expected = sorted(n for n in LISTED if n.startswith(prefix))
    assert len(expected) == count
    assert [o.name for o in listing] == expected
    assert all(o.bytes == len(LISTED[o.name]) for o in listing)
    assert all(o.hash == hashlib.md5(LISTED[o.name]).hexdigest() for o in listing)
    # A page holds at most what was asked and at most the server's limit; the
    # listing may end with one empty page.
    per_page = min(page_size or local_swift.listing_limit, local_swift.listing_limit)
    pages = proxy_log.count("GET", f"/v1/AUTH_{local_swift.project_id}/{name}")
    full_or_partial = -(-count // per_page)
    assert full_or_partial <= pages <= full_or_partial + 1


@swift
def test_ensure_container_sets_read_acl_and_cors_origin(
    connection, unique_container, swift_client, local_swift
):
    container = unique_container()
    origin = "https://viewer.example.org"
    headers = {
        "X-Container-Read": PUBLIC_READ_ACL,
        "X-Container-Meta-Access-Control-Allow-Origin": origin,
    }
    assert connection.ensure_container(container, headers) is True
    connection.put_object(container, "info", b'{"type": "image"}')
    stored = swift_client.head_container(container)
    assert stored["x-container-read"] == PUBLIC_READ_ACL
    assert stored["x-container-meta-access-control-allow-origin"] == origin

    url = connection.container_url(container).object_url("info")
    assert url == f"{local_swift.storage_url}/{container}/info"
    preflight = requests.options(
        url, headers={"Origin": origin, "Access-Control-Request-Method": "GET"}
    )
    assert preflight.status_code == 200
    assert preflight.headers["Access-Control-Allow-Origin"] == origin
    got = requests.get(url, headers={"Origin": origin})
    assert got.content == b'{"type": "image"}'
    assert got.headers["Access-Control-Allow-Origin"] == origin
    # Another site gets no CORS permission.
    other = requests.get(url, headers={"Origin": "https://elsewhere.example"})
    assert "Access-Control-Allow-Origin" not in other.headers

    # Existing container: the headers are updated, nothing is created.
    assert connection.ensure_container(container, {"X-Container-Read": ""}) is False
    assert requests.get(url).status_code == 401


@swift
def test_public_container_is_read_anonymously(make_container):
    objects = {"info": b"{}", "8_8_8/0-64_0-64_0-64": bytes(range(200))}
    container = make_container(objects)
    public = PublicContainer(container.url)
    assert {o.name for o in public.iter_objects(page_size=None)} == set(objects)
    for name, data in objects.items():
        assert read_all(public.open_object(name)) == data
    assert (
        read_all(public.open_object("8_8_8/0-64_0-64_0-64", start=50))
        == objects["8_8_8/0-64_0-64_0-64"][50:]
    )


@swift
def test_private_container_refuses_anonymous_listing_in_one_line(make_container):
    container = make_container({"a": b"1"}, public=False)
    with pytest.raises(RemoteError) as caught:
        list(PublicContainer(container.url).iter_objects(page_size=None))
    message = str(caught.value)
    assert "401" in message and ".rlistings" in message and "\n" not in message


@swift
def test_keystone_v3_auth_finds_the_storage_url_in_the_catalog(settings, local_swift):
    without_url = dataclasses.replace(settings, os_storage_url=None)
    conn = SwiftConnection(without_url)
    assert conn.check_credentials() == local_swift.storage_url
    parsed = parse_container_url(conn.container_url("c", "p/q").url + "/p/q")
    assert (parsed.storage_url, parsed.container, parsed.prefix) == (
        local_swift.storage_url,
        "c",
        "p/q",
    )


@swift
def test_a_connection_sharing_a_login_uses_its_token_for_another_storage_url(
    settings, local_swift, make_container
):
    container = make_container({"a": b"1"}, public=False)
    upload = SwiftConnection(dataclasses.replace(settings, os_storage_url=None))
    assert upload.check_credentials() == local_swift.storage_url
    source_settings = dataclasses.replace(settings, os_storage_url=container.url.rsplit("/", 1)[0])
    source = SwiftConnection(source_settings, login=upload)
    assert [info.name for info in source.iter_objects(container.name)] == ["a"]
    assert source.connection().token == upload.connection().token
    with pytest.raises(ValueError, match="same credentials"):
        SwiftConnection(dataclasses.replace(settings, os_username="someone-else"), login=upload)


def record_open_calls(monkeypatch, parties: int, first_delay: float | None = None):
    """Wraps swiftclient's GET of an object and returns the calls' [start, end].

    With ``first_delay``, the first call sleeps that long and every other call waits
    until ``parties`` of them run at once; without it, every call waits so. The wait
    is a barrier: it breaks, and the calls fail, if they are made one at a time.
    """
    original = swiftclient.Connection.get_object
    calls: list[list[float]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(parties, timeout=10)

    def get_object(self, *args, **kwargs):
        with lock:
            call = [time.monotonic(), 0.0]
            calls.append(call)
            first = len(calls) == 1
        if first and first_delay is not None:
            time.sleep(first_delay)
        else:
            barrier.wait()
        try:
            return original(self, *args, **kwargs)
        finally:
            call[1] = time.monotonic()

    monkeypatch.setattr(swiftclient.Connection, "get_object", get_object)
    return calls


def read_in_threads(connection: SwiftConnection, container: str, name: str, count: int) -> list:
    """Reads ``container/name`` from ``count`` threads at once."""
    with ThreadPoolExecutor(count) as pool:
        return list(
            pool.map(lambda _: read_all(connection.open_object(container, name)), range(count))
        )


@pytest.fixture
def container_of_one_object(settings, unique_container) -> str:
    """Returns a new container holding the object "o" (b"x"), written by its own
    connection."""
    container = unique_container()
    writer = SwiftConnection(settings)
    writer.ensure_container(container)
    writer.put_object(container, "o", b"x")
    return container


@swift
def test_first_request_with_a_new_token_goes_alone_then_requests_run_in_parallel(
    settings, container_of_one_object, monkeypatch
):
    # Keystone validates a token the proxy has not seen once per request that
    # carries it: sent by 4 threads at once, a new token is validated 4 times.
    container = container_of_one_object
    calls = record_open_calls(monkeypatch, parties=3, first_delay=0.3)
    assert read_in_threads(SwiftConnection(settings), container, "o", 4) == [b"x"] * 4
    first, *later = sorted(calls)
    assert all(start >= first[1] for start, _ in later)


@swift
def test_a_missing_object_as_first_answer_lets_the_next_requests_run_in_parallel(
    settings, container_of_one_object, monkeypatch
):
    # A 404 comes after the proxy took the token: nothing is left to wait for.
    container = container_of_one_object
    fresh = SwiftConnection(settings, retries=1)
    with pytest.raises(RemoteError, match="404"):
        fresh.open_object(container, "missing")
    record_open_calls(monkeypatch, parties=3)
    assert read_in_threads(fresh, container, "o", 3) == [b"x"] * 3


@swift
def test_revoked_token_mid_run_is_renewed_and_the_run_continues(
    connection, unique_container, local_swift, proxy_log
):
    container = unique_container()
    connection.ensure_container(container)
    connection.put_object(container, "before", b"1")
    _, token = connection.connection().get_auth()
    local_swift.revoke(token)
    local_swift.wait_until_refused(token)
    proxy_log.mark()

    # A seekable body, as upload_results sends: swiftclient rewinds it to resend.
    connection.put_object(container, "after", io.BytesIO(b"2"), content_length=1)
    assert read_all(connection.open_object(container, "after")) == b"2"
    _, new_token = connection.connection().get_auth()
    assert new_token != token
    statuses = [
        e.status
        for e in proxy_log.entries("PUT", f"/v1/AUTH_{local_swift.project_id}/{container}/after")
    ]
    assert statuses == [401, 201]


@swift
def test_bad_password_is_one_line_error(settings):
    wrong = dataclasses.replace(settings, os_password=Secret("not-the-password"))
    with pytest.raises(RemoteError) as caught:
        SwiftConnection(wrong, retries=1).check_credentials()
    message = str(caught.value)
    assert "\n" not in message
    assert "401" in message or "Unauthorized" in message
    assert "not-the-password" not in message


@swift
def test_ensure_container_with_bad_password_is_one_line_error(settings, unique_container):
    wrong = dataclasses.replace(settings, os_password=Secret("not-the-password"))
    with pytest.raises(errors.UploadError):
        SwiftConnection(wrong, retries=1, error_type=errors.UploadError).ensure_container(
            unique_container()
        )


# --------------------------------------------------------------------------
# failure injection without a server


def fake_settings() -> SwiftSettings:
    return SwiftSettings(
        os_username="u",
        os_password=Secret("pw-secret"),
        os_auth_url=FAKE_AUTH,
        os_project_id="0123",
        os_storage_url=FAKE_STORAGE,
    )


def add_keystone(mock: responses.RequestsMock) -> None:
    mock.add(
        responses.POST,
        FAKE_AUTH + "/auth/tokens",
        json=token_body(),
        status=201,
        headers={"X-Subject-Token": "fake-token"},
    )


def test_put_503_is_retried_until_it_succeeds():
    with responses.RequestsMock() as mock:
        add_keystone(mock)
        url = FAKE_STORAGE + "/c/o"
        mock.add(responses.PUT, url, status=503)
        mock.add(responses.PUT, url, status=503)
        mock.add(responses.PUT, url, status=201, headers={"ETag": "abc"})
        conn = SwiftConnection(fake_settings(), retries=3, starting_backoff=0.01)
        assert conn.put_object("c", "o", io.BytesIO(b"data"), content_length=4) == "abc"
        assert [c.request.method for c in mock.calls] == ["POST", "PUT", "PUT", "PUT"]


def test_put_503_forever_gives_one_line_error():
    with responses.RequestsMock() as mock:
        add_keystone(mock)
        mock.add(responses.PUT, FAKE_STORAGE + "/c/o", status=503)
        conn = SwiftConnection(
            fake_settings(), retries=2, starting_backoff=0.01, error_type=errors.UploadError
        )
        with pytest.raises(errors.UploadError) as caught:
            conn.put_object("c", "o", io.BytesIO(b"data"), content_length=4)
    assert "503" in str(caught.value) and "c/o" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_401_after_another_thread_renewed_the_shared_token_is_retried():
    conn = SwiftConnection(fake_settings(), retries=2, starting_backoff=0.01)

    def refused_while_another_thread_renews(request):
        # The other thread has already dropped the shared token, so this
        # thread's own invalidation finds nothing left to drop.
        conn._keystone.invalidate()
        return 401, {}, b""

    with responses.RequestsMock() as mock:
        add_keystone(mock)
        mock.add_callback(
            responses.PUT, FAKE_STORAGE + "/c/o", callback=refused_while_another_thread_renews
        )
        mock.add(responses.PUT, FAKE_STORAGE + "/c/o", status=201, headers={"ETag": "abc"})
        assert conn.put_object("c", "o", b"data") == "abc"
        assert [c.request.method for c in mock.calls] == ["POST", "PUT", "POST", "PUT"]


def test_anonymous_get_503_is_retried():
    url = FAKE_STORAGE + "/c"
    with responses.RequestsMock() as mock:
        mock.add(responses.GET, url + "/o", status=503)
        mock.add(responses.GET, url + "/o", status=502)
        mock.add(responses.GET, url + "/o", body=b"payload")
        public = PublicContainer(url, session=http_session(retries=3, backoff_factor=0))
        assert read_all(public.open_object("o")) == b"payload"
        assert len(mock.calls) == 3


def test_keystone_401_is_one_line_error():
    with responses.RequestsMock() as mock:
        mock.add(
            responses.POST,
            FAKE_AUTH + "/auth/tokens",
            status=401,
            json={
                "error": {
                    "code": 401,
                    "title": "Unauthorized",
                    "message": "The request you have made requires authentication.",
                }
            },
        )
        with pytest.raises(RemoteError) as caught:
            SwiftConnection(fake_settings(), retries=1).check_credentials()
    message = str(caught.value)
    assert "\n" not in message and "pw-secret" not in message
    assert FAKE_AUTH in message


# --------------------------------------------------------------------------
# the password never shows, even at the highest verbosity


@swift
@pytest.mark.parametrize("succeed", [True, False], ids=["success", "bad-password"])
def test_password_never_appears_in_any_output(succeed, settings, unique_container, capsys):
    password = settings.os_password.reveal() if succeed else "Wrong-Pa55word-xyz"
    used = dataclasses.replace(settings, os_password=Secret(password))
    container = unique_container()

    def work(redactor):
        # As the commands do: the settings' password is registered right away.
        redactor.add(used.os_password.reveal())
        conn = SwiftConnection(
            used, retries=1, starting_backoff=0.01, error_type=errors.UploadError
        )
        conn.check_credentials()
        logging.getLogger("hbp_image_tasks").debug("settings: %r", used)
        conn.ensure_container(container)
        conn.put_object(container, "o", b"x")
        print(f"uploaded to {conn.container_url(container).url}")

    stream = io.StringIO()
    args = argparse.Namespace(verbose=3, quiet=0)
    code = cli.run_command(work, args, stream=stream)
    captured = capsys.readouterr()
    logged = stream.getvalue()
    assert code == (0 if succeed else errors.EXIT_UPLOAD)
    # -vv really shows the libraries' debug lines, so the check is not vacuous.
    assert "keystoneauth" in logged and "DEBUG" in logged
    if not succeed:
        assert re.search(r"ERROR .*(401|Unauthorized)", logged)
    for output in (logged, captured.out, captured.err):
        assert password not in output
