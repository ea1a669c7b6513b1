"""Tests of fetch_input: a real local Swift for listings and stacks, a local
HTTP server for single URLs, and ``responses`` for injected failures."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import itertools
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

import pytest
import responses

from hbp_image_tasks import errors, fetch_input, layout, object_names
from hbp_image_tasks.download import RetryPolicy
from hbp_image_tasks.settings import load_settings

FAST_RETRY = RetryPolicy(attempts=3, backoff=0.01, max_backoff=0.05, max_time=30)


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def local_files(root: Path) -> dict[str, bytes]:
    """Returns every file under ``root`` but the sidecar (relative path -> bytes)."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != layout.FETCH_STATE_NAME
    }


def read_manifest(root: Path) -> dict:
    return json.loads((root / layout.FETCH_MANIFEST_NAME).read_text())


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, prefix, matching",
    [
        (
            r"data/raw/original/pm31\d{2}o.png",
            "data/raw/original/pm31",
            ["data/raw/original/pm3100o.png", "data/raw/original/pm3199oXpng"],
        ),
        (
            r"Pitx3-tTA-horizontal-case6513/6513_PitX3_tiffs/6513_Pitx3_tTA_lacZ_Xgal_s01\d_0.22.tif",
            "Pitx3-tTA-horizontal-case6513/6513_PitX3_tiffs/6513_Pitx3_tTA_lacZ_Xgal_s01",
            [
                "Pitx3-tTA-horizontal-case6513/6513_PitX3_tiffs/6513_Pitx3_tTA_lacZ_Xgal_s010_0.22.tif"
            ],
        ),
        ("images?/a.png", "image", ["image/a.png", "images/a.png"]),
        ("ab*c", "a", ["ac", "abbc"]),
        ("ab{0,2}c", "a", ["ac"]),
        ("ab+c", "ab", ["abc"]),
        (r"a\.b/\d+", "a.b/", ["a.b/12"]),
        ("x/(a|b)", "x/", ["x/a"]),
        ("x/[|]y|z", "", ["z"]),
        (r"x/\|y", "x/|y", ["x/|y"]),
        ("x/(a|b)|c", "", ["c"]),
        ("a|b", "", ["a", "b"]),
        ("(?i)abc", "", ["ABC"]),
        ("^abc", "abc", ["abc"]),
        ("[ab]c", "", ["ac"]),
        (".*", "", ["anything"]),
    ],
)
def test_literal_prefix_is_a_prefix_of_every_full_match(pattern, prefix, matching):
    assert object_names.literal_prefix(pattern) == prefix
    for name in matching:
        assert re.fullmatch(pattern, name)
        assert name.startswith(prefix)


@pytest.mark.parametrize(
    "name",
    [
        "../up.png",
        "a/../../etc/passwd",
        "/etc/passwd",
        "a//b.png",
        "a/./b.png",
        "./a.png",
        "a/",
        "a\0b",
        "",
    ],
)
def test_unsafe_object_names_are_refused(name):
    with pytest.raises(errors.InputError, match="cannot be written"):
        object_names.check_object_name(name)


@pytest.mark.parametrize("name", ["a.png", "a/b/c.tif", "..a/b..c", "a b/c%20d.png"])
def test_safe_object_names_are_kept_as_relative_paths(name):
    assert object_names.check_object_name(name).as_posix() == name


def test_colliding_paths_are_refused():
    from hbp_image_tasks.swift import ObjectInfo

    with pytest.raises(errors.InputError, match="file and a directory"):
        object_names.check_layout([ObjectInfo("a/b", 1, ""), ObjectInfo("a/b/c", 1, "")])


@pytest.mark.parametrize(
    "url, headers, expected",
    [
        ("https://h/x/colin27T1_seg.nii.gz", {}, "colin27T1_seg.nii.gz"),
        ("https://h/x/a%20b.nii?raw=1", {}, "a b.nii"),
        ("https://h/x/download", {"content-disposition": 'attachment; filename="v.nii"'}, "v.nii"),
        (
            "https://h/x/download",
            {"content-disposition": "attachment; filename*=UTF-8''%C3%A9t%C3%A9.nii"},
            "été.nii",
        ),
        ("https://h/x/d", {"content-disposition": 'attachment; filename="../../x.nii"'}, "x.nii"),
        ("https://h/", {}, None),
    ],
)
def test_file_name_comes_from_content_disposition_or_url(url, headers, expected):
    assert fetch_input.file_name_from(url, headers) == expected


def test_help_documents_filter_example_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        fetch_input.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "re.fullmatch" in text and r"pm31\d{2}o.png" in text
    assert "6513_Pitx3_tTA_lacZ_Xgal_s01" in text and "colin27T1_seg.nii.gz" in text
    for code in (0, 2, 3, 143):
        assert re.search(rf"^  {code} ", text, re.MULTILINE)


def test_fetch_options_can_be_shared_with_another_destination_flag():
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2)  # the caller's own --jobs
    parser.add_argument("--dry-run", action="store_true")
    fetch_input.add_selection_options(
        parser.add_argument_group("input"), "--download-dir", destination_default="work/source"
    )
    args = parser.parse_args(["--stacks", "--filter", "a.*", "--dry-run"])
    assert (args.destination, args.filter, args.stacks, args.dry_run, args.jobs) == (
        "work/source",
        "a.*",
        True,
        True,
        2,
    )
    assert parser.parse_args(["--download-dir", "d"]).destination == "d"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--filter", "a.*", "http://127.0.0.1:9/f"], "--filter needs --stacks"),
        (["--stacks", "--output", "x", "http://127.0.0.1:9/v1/AUTH_a/c"], "--output"),
        (
            ["--stacks", "--filter", "a(", "http://127.0.0.1:9/v1/AUTH_a/c"],
            "not a valid regular expression",
        ),
        (["--stacks", "http://127.0.0.1:9/not-swift"], "not a Swift container URL"),
    ],
)
def test_bad_usage_exits_2_with_one_line(tmp_path, caplog, argv, message):
    code = fetch_input.main(["--destination", str(tmp_path / "d"), "-q"] + argv)
    assert code == errors.EXIT_USAGE
    assert message in caplog.text
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


# --------------------------------------------------------------------------
# Single URL against a real local HTTP server
# --------------------------------------------------------------------------


class _HTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        """Keeps quiet when a client hangs up (downloads that give up on purpose)."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FileServer:
    """A threaded HTTP/1.1 server on 127.0.0.1 with switchable misbehaviour."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.ranges = True  # honour Range requests
        self.drop_after: int | None = None  # break the next full body after N bytes
        self.fail_statuses: list[int] = []  # statuses to answer first
        self.extra_headers: dict[str, str] = {}
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                if server.fail_statuses:
                    status = server.fail_statuses.pop(0)
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = server.files.get(urlparse(self.path).path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = 0
                match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
                if match and server.ranges:
                    start = int(match.group(1))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data) - start))
                self.send_header("Accept-Ranges", "bytes" if server.ranges else "none")
                self.send_header("ETag", '"v1"')
                for key, value in server.extra_headers.items():
                    self.send_header(key, value)
                self.end_headers()
                body = data[start:]
                if server.drop_after is not None and start == 0:
                    cut, server.drop_after = server.drop_after, None
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = _HTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def file_server():
    server = FileServer()
    yield server
    server.close()


VOLUME = bytes(range(256)) * 4096 * 3 + b"tail"  # 3 MiB + 4 bytes, several chunks


def test_single_url_is_written_with_manifest_and_rerun_does_nothing(file_server, tmp_path, capsys):
    file_server.files["/examples/colin27T1_seg.nii.gz"] = VOLUME
    url = file_server.url("/examples/colin27T1_seg.nii.gz")
    destination = tmp_path / "source"
    assert fetch_input.main(["--destination", str(destination), "-q", url]) == 0
    assert local_files(destination) == {
        "colin27T1_seg.nii.gz": VOLUME,
        layout.FETCH_MANIFEST_NAME: (destination / layout.FETCH_MANIFEST_NAME).read_bytes(),
    }
    assert read_manifest(destination) == {
        "version": 1,
        "source": url,
        "filter": None,
        "objects": [
            {
                "name": "colin27T1_seg.nii.gz",
                "path": "colin27T1_seg.nii.gz",
                "bytes": len(VOLUME),
                "md5": md5(VOLUME),
            }
        ],
    }
    assert "fetched 1 file" in capsys.readouterr().out
    mtime = (destination / "colin27T1_seg.nii.gz").stat().st_mtime_ns

    assert fetch_input.main(["--destination", str(destination), "-q", url]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (destination / "colin27T1_seg.nii.gz").stat().st_mtime_ns == mtime


def test_single_url_resumes_with_range_after_a_connection_drop(file_server, tmp_path):
    file_server.files["/v.nii"] = VOLUME
    file_server.drop_after = 2_200_000
    result = fetch_input.fetch(
        file_server.url("/v.nii"), tmp_path, show_progress=False, policy=FAST_RETRY
    )
    assert (tmp_path / "v.nii").read_bytes() == VOLUME
    assert [path for path, _ in file_server.requests] == ["/v.nii", "/v.nii"]
    first_range, second_range = (r for _, r in file_server.requests)
    # Resumed from what was kept (whole chunks before the drop), not restarted.
    assert first_range is None
    assert 1_000_000 <= int(re.fullmatch(r"bytes=(\d+)-", second_range).group(1)) <= 2_200_000
    assert result.retries == 1 and result.downloaded == 1


def test_single_url_restarts_when_the_server_ignores_range(file_server, tmp_path):
    file_server.files["/v.nii"] = VOLUME
    file_server.ranges = False
    file_server.drop_after = 2_200_000
    fetch_input.fetch(file_server.url("/v.nii"), tmp_path, show_progress=False, policy=FAST_RETRY)
    assert (tmp_path / "v.nii").read_bytes() == VOLUME
    assert len(file_server.requests) == 2 and file_server.requests[1][1]


@pytest.mark.parametrize("status", [503, 429, 500])
def test_single_url_is_retried_after_transient_statuses(file_server, tmp_path, status):
    file_server.files["/v.nii"] = VOLUME
    file_server.fail_statuses = [status, status]
    fetch_input.fetch(file_server.url("/v.nii"), tmp_path, show_progress=False, policy=FAST_RETRY)
    assert (tmp_path / "v.nii").read_bytes() == VOLUME
    assert len(file_server.requests) == 3


@pytest.mark.parametrize("status", [404, 403, 410])
def test_single_url_4xx_fails_in_one_line_leaving_nothing(file_server, tmp_path, caplog, status):
    file_server.fail_statuses = [status]
    url = file_server.url("/missing.nii")
    code = fetch_input.main(["--destination", str(tmp_path), "-q", url])
    assert code == errors.EXIT_SOURCE == 3
    lines = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(lines) == 1 and str(status) in lines[0] and url in lines[0]
    assert list(tmp_path.iterdir()) == []
    assert len(file_server.requests) == 1  # a 4xx is not retried


def test_single_url_existing_different_file_needs_force(file_server, tmp_path, caplog):
    file_server.files["/v.nii"] = VOLUME
    (tmp_path / "v.nii").write_bytes(b"an older version")
    url = file_server.url("/v.nii")
    assert fetch_input.main(["--destination", str(tmp_path), "-q", url]) == 2
    assert "--force" in caplog.text
    assert (tmp_path / "v.nii").read_bytes() == b"an older version"
    assert fetch_input.main(["--destination", str(tmp_path), "-q", "--force", url]) == 0
    assert (tmp_path / "v.nii").read_bytes() == VOLUME


def test_single_url_output_name_and_content_disposition(file_server, tmp_path):
    file_server.files["/download"] = VOLUME
    file_server.extra_headers = {"Content-Disposition": 'attachment; filename="t1.nii"'}
    url = file_server.url("/download?id=3")
    fetch_input.fetch(url, tmp_path, show_progress=False)
    fetch_input.fetch(url, tmp_path, output="chosen.nii", show_progress=False)
    assert (tmp_path / "t1.nii").read_bytes() == VOLUME
    assert (tmp_path / "chosen.nii").read_bytes() == VOLUME


# --------------------------------------------------------------------------
# Injected failures (responses)
# --------------------------------------------------------------------------

SWIFT = "http://swift.invalid/v1/AUTH_test"


def swift_headers(data: bytes, etag: str | None = None) -> dict[str, str]:
    return {"ETag": etag or md5(data), "X-Trans-Id": "tx1", "Accept-Ranges": "bytes"}


@responses.activate
def test_single_url_md5_mismatch_with_swift_etag_fails_and_leaves_nothing(tmp_path):
    data = b"x" * 1000
    responses.get(f"{SWIFT}/c/v.nii", body=data, headers=swift_headers(data, "0" * 32))
    with pytest.raises(errors.FetchError, match="MD5"):
        fetch_input.fetch(f"{SWIFT}/c/v.nii", tmp_path, show_progress=False, policy=FAST_RETRY)
    assert list(tmp_path.iterdir()) == []


@responses.activate
def test_single_url_retry_after_503_then_verified_by_etag(tmp_path):
    data = b"y" * 5000
    responses.get(f"{SWIFT}/c/v.nii", status=503)
    responses.get(f"{SWIFT}/c/v.nii", body=data, headers=swift_headers(data))
    result = fetch_input.fetch(f"{SWIFT}/c/v.nii", tmp_path, show_progress=False)
    assert (tmp_path / "v.nii").read_bytes() == data
    assert read_manifest(tmp_path)["objects"][0]["md5"] == md5(data)
    assert len(responses.calls) == 2 and result.downloaded == 1


def listing_entry(name: str, data: bytes, hash_: str | None = None) -> dict:
    return {
        "name": name,
        "bytes": len(data),
        "hash": hash_ or md5(data),
        "content_type": "image/png",
        "last_modified": "2024-01-01T00:00:00",
    }


@responses.activate
def test_stack_listing_page_503_is_retried_and_all_pages_read(tmp_path):
    objects = {f"s/{i:03d}.png": bytes([i]) * 10 for i in range(5)}
    entries = [listing_entry(n, d) for n, d in objects.items()]
    url = f"{SWIFT}/stack"
    responses.get(
        url,
        json=entries[:3],
        match=[responses.matchers.query_param_matcher({"format": "json", "marker": ""})],
    )
    responses.get(url, status=503)
    responses.get(
        url,
        json=entries[3:],
        match=[responses.matchers.query_param_matcher({"format": "json", "marker": "s/002.png"})],
    )
    responses.get(
        url,
        json=[],
        match=[responses.matchers.query_param_matcher({"format": "json", "marker": "s/004.png"})],
    )
    for name, data in objects.items():
        responses.get(f"{url}/{name}", body=data, headers=swift_headers(data))
    selected = fetch_input.select_objects(url, None)
    assert [o.name for o in selected] == list(objects)


@responses.activate
def test_stack_object_with_wrong_content_fails_and_leaves_no_partial_file(tmp_path):
    good, bad = b"good" * 100, b"bad!" * 100
    url = f"{SWIFT}/stack"
    responses.get(
        url,
        json=[listing_entry("a.png", good), listing_entry("b.png", bad, md5(b"something else"))],
    )
    responses.get(url, json=[])
    responses.get(f"{url}/a.png", body=good, headers=swift_headers(good))
    responses.get(f"{url}/b.png", body=bad, headers=swift_headers(bad))
    with pytest.raises(errors.FetchError, match="'b.png'.*MD5"):
        fetch_input.fetch(
            url, tmp_path, stacks=True, jobs=1, show_progress=False, policy=FAST_RETRY
        )
    assert local_files(tmp_path) == {"a.png": good}
    assert not (tmp_path / layout.FETCH_MANIFEST_NAME).exists()


# --------------------------------------------------------------------------
# Stacks against the real local Swift
# --------------------------------------------------------------------------


def content(name: str) -> bytes:
    return (name.encode() + b"\n") * (1 + len(name) % 7)


PM31 = [f"data/raw/original/pm31{i:02d}o.png" for i in range(100)]
DECOYS = [
    "data/raw/original/pm3100o.png.bak",
    "other/data/raw/original/pm3100o.png",
    "data/raw/original/pm3200o.png",
    "data/raw/original/pm31000o.png",
    "data/raw/original/pm31xxo.png",
    "data/raw/original/xpm3100o.png",
]


def object_gets(proxy_log, local_swift, container: str) -> list[str]:
    """Returns the object names GET by clients since the log's mark."""
    prefix = f"{urlparse(local_swift.storage_url).path}/{container}/"
    return [e.path[len(prefix) :] for e in proxy_log.entries("GET", prefix)]


def listing_gets(proxy_log, local_swift, container: str) -> int:
    path = f"{urlparse(local_swift.storage_url).path}/{container}"
    return sum(1 for e in proxy_log.entries("GET", path) if e.path == path)


@pytest.mark.swift
def test_filter_selects_whole_names_exactly_across_listing_pages(
    make_container, local_swift, proxy_log, tmp_path, capsys
):
    assert local_swift.listing_limit and local_swift.listing_limit <= 100
    objects = {name: content(name) for name in PM31 + DECOYS}
    container = make_container(objects)
    proxy_log.mark()
    destination = tmp_path / "source"
    code = fetch_input.main(
        [
            "--stacks",
            "--filter",
            r"data/raw/original/pm31\d{2}o.png",
            "--destination",
            str(destination),
            "-q",
            container.url,
        ]
    )
    assert code == 0
    # 102 names share the literal prefix: more than one page of 100.
    assert listing_gets(proxy_log, local_swift, container.name) >= 2
    path = f"{urlparse(local_swift.storage_url).path}/{container.name}"
    assert {
        parse_qs(e.query).get("prefix", [""])[0]
        for e in proxy_log.entries("GET", path)
        if e.path == path
    } == {"data/raw/original/pm31"}
    assert sorted(object_gets(proxy_log, local_swift, container.name)) == sorted(PM31)
    expected = {name: objects[name] for name in PM31}
    manifest = (destination / layout.FETCH_MANIFEST_NAME).read_bytes()
    assert local_files(destination) == {**expected, layout.FETCH_MANIFEST_NAME: manifest}
    assert read_manifest(destination) == {
        "version": 1,
        "source": container.url,
        "filter": r"data/raw/original/pm31\d{2}o.png",
        "objects": [
            {"name": n, "path": n, "bytes": len(objects[n]), "md5": md5(objects[n])}
            for n in sorted(PM31)
        ],
    }
    assert "fetched 100 file(s)" in capsys.readouterr().out


@pytest.mark.swift
def test_without_filter_every_object_is_fetched_with_nested_paths(
    make_container, local_swift, proxy_log, tmp_path
):
    names = [f"a/b{i % 3}/c/{i:03d}.tif" for i in range(130)] + ["top.txt"]
    objects = {name: content(name) for name in names}
    container = make_container(objects)
    proxy_log.mark()
    result = fetch_input.fetch(container.url, tmp_path, stacks=True, jobs=4, show_progress=False)
    assert listing_gets(proxy_log, local_swift, container.name) >= 2
    assert result.files == result.downloaded == 131
    assert result.bytes == sum(map(len, objects.values()))
    assert {
        k: v for k, v in local_files(tmp_path).items() if k != layout.FETCH_MANIFEST_NAME
    } == objects


@pytest.mark.swift
def test_dry_run_lists_count_and_bytes_and_writes_nothing(make_container, tmp_path, capsys):
    objects = {name: content(name) for name in PM31[:12]}
    container = make_container(objects)
    code = fetch_input.main(
        ["--stacks", "--dry-run", "--destination", str(tmp_path / "d"), "-q", container.url]
    )
    assert code == 0
    total = sum(map(len, objects.values()))
    assert "would fetch 12 file(s)" in capsys.readouterr().out
    assert (
        f"({total} bytes)"
        in fetch_input.fetch(container.url, tmp_path / "d", stacks=True, dry_run=True).summary()
    )
    assert not (tmp_path / "d").exists()


@pytest.mark.swift
def test_zero_matches_exit_2_saying_what_was_listed(make_container, tmp_path, caplog):
    container = make_container({name: content(name) for name in DECOYS})
    code = fetch_input.main(
        [
            "--stacks",
            "--filter",
            r"data/raw/original/pm31\d{2}o.png",
            "--destination",
            str(tmp_path),
            "-q",
            container.url,
        ]
    )
    assert code == errors.EXIT_USAGE
    # Three decoys start with the literal prefix, so three were listed.
    assert "3 object(s) listed" in caplog.text
    assert r"pm31\\d{2}o.png" in caplog.text or r"pm31\d{2}o.png" in caplog.text
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def user_token(local_swift) -> str:
    """Returns one token of the test user for the whole module (Keystone is slow)."""
    return local_swift.keystone_session().get_token()


def put_raw(local_swift, token: str, container: str, name: str, data: bytes) -> None:
    """PUTs an object whose name HTTP libraries would normalise (``..``)."""
    url = urlparse(local_swift.storage_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.request(
        "PUT", f"{url.path}/{container}/{quote(name)}", body=data, headers={"X-Auth-Token": token}
    )
    response = connection.getresponse()
    response.read()
    connection.close()
    assert response.status == 201, response.status


@pytest.mark.swift
@pytest.mark.parametrize(
    "evil", ["../escape.png", "s/../../escape.png", "/abs.png", "s//double.png"]
)
def test_traversal_names_are_refused_and_nothing_is_written(
    make_container, local_swift, user_token, tmp_path, caplog, evil
):
    container = make_container({"s/ok.png": b"ok"})
    put_raw(local_swift, user_token, container.name, evil, b"evil")
    destination = tmp_path / "deep" / "destination"
    code = fetch_input.main(["--stacks", "--destination", str(destination), "-q", container.url])
    assert code == errors.EXIT_USAGE
    assert repr(evil) in caplog.text and "cannot be written" in caplog.text
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


@pytest.mark.swift
def test_interrupted_stack_resumes_fetching_only_the_rest(
    make_container, local_swift, proxy_log, tmp_path
):
    objects = {f"z/{i:03d}.png": content(f"z/{i:03d}.png") * 50 for i in range(120)}
    container = make_container(objects)
    polls = itertools.count()
    with pytest.raises(errors.Interrupted, match="run the same command again"):
        fetch_input.fetch(
            container.url,
            tmp_path,
            stacks=True,
            jobs=4,
            show_progress=False,
            should_stop=lambda: next(polls) >= 60,
        )
    first = local_files(tmp_path)
    assert 0 < len(first) < 120
    assert all(objects[name] == data for name, data in first.items())
    assert not list(tmp_path.rglob(".*.tmp"))
    assert not (tmp_path / layout.FETCH_MANIFEST_NAME).exists()

    proxy_log.mark()
    result = fetch_input.fetch(container.url, tmp_path, stacks=True, jobs=4, show_progress=False)
    fetched = object_gets(proxy_log, local_swift, container.name)
    assert sorted(fetched) == sorted(set(objects) - set(first))
    assert (result.downloaded, result.skipped) == (120 - len(first), len(first))
    assert {
        k: v for k, v in local_files(tmp_path).items() if k != layout.FETCH_MANIFEST_NAME
    } == objects


@pytest.mark.swift
def test_corrupted_or_missing_local_files_are_detected_and_fetched_again(
    make_container, local_swift, proxy_log, tmp_path
):
    objects = {f"c/{i:02d}.png": content(f"c/{i:02d}.png") * 20 for i in range(20)}
    container = make_container(objects)
    first = fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    time.sleep(0.05)  # some filesystems' mtime clock ticks every few ms
    same_size = tmp_path / "c/03.png"
    same_size.write_bytes(b"X" * same_size.stat().st_size)
    (tmp_path / "c/07.png").write_bytes(b"truncated")
    (tmp_path / "c/11.png").unlink()
    proxy_log.mark()
    second = fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    assert sorted(object_gets(proxy_log, local_swift, container.name)) == [
        "c/03.png",
        "c/07.png",
        "c/11.png",
    ]
    assert (second.downloaded, second.skipped) == (3, 17)
    assert second.listing_fingerprint == first.listing_fingerprint
    assert {
        k: v for k, v in local_files(tmp_path).items() if k != layout.FETCH_MANIFEST_NAME
    } == objects


@pytest.mark.swift
def test_private_container_needs_the_settings(
    make_container, swift_settings_file, tmp_path, caplog, monkeypatch
):
    from keystoneauth1.identity import v3

    objects = {f"p/{i}.png": content(f"p/{i}.png") for i in range(3)}
    container = make_container(objects, public=False)
    code = fetch_input.main(["--stacks", "--destination", str(tmp_path / "a"), "-q", container.url])
    assert code == errors.EXIT_SOURCE
    assert re.search(r"40[13]", caplog.text)
    logins = []
    log_in = v3.Password.get_auth_ref
    monkeypatch.setattr(
        v3.Password, "get_auth_ref", lambda self, *a, **k: logins.append(1) or log_in(self, *a, **k)
    )
    code = fetch_input.main(
        [
            "--stacks",
            "--settings",
            str(swift_settings_file),
            "--destination",
            str(tmp_path / "b"),
            "-q",
            container.url,
        ]
    )
    assert code == 0
    assert {
        k: v for k, v in local_files(tmp_path / "b").items() if k != layout.FETCH_MANIFEST_NAME
    } == objects
    assert len(logins) == 1  # the listing and the downloads share the token
    settings = load_settings(swift_settings_file)
    assert settings.os_password.reveal() not in caplog.text


@pytest.mark.swift
def test_static_large_object_is_checked_by_size(make_container, swift_client, tmp_path):
    segments = make_container({"seg/1": b"a" * 1000, "seg/2": b"b" * 500}, public=True)
    container = make_container({"small.png": b"small"})
    manifest = json.dumps(
        [{"path": f"/{segments.name}/seg/1"}, {"path": f"/{segments.name}/seg/2"}]
    )
    swift_client.put_object(
        container.name, "big.nii", manifest, query_string="multipart-manifest=put"
    )
    result = fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    assert (tmp_path / "big.nii").read_bytes() == b"a" * 1000 + b"b" * 500
    entry = next(o for o in read_manifest(tmp_path)["objects"] if o["name"] == "big.nii")
    assert entry["bytes"] == 1500 and entry["md5"] == md5(b"a" * 1000 + b"b" * 500)
    assert result.downloaded == 2


@pytest.mark.swift
def test_rerun_of_a_complete_stack_reads_no_file_again(
    make_container, local_swift, proxy_log, tmp_path, monkeypatch
):
    objects = {f"r/{i:02d}.png": content(f"r/{i:02d}.png") for i in range(15)}
    container = make_container(objects)
    fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    hashed = []
    real_md5 = fetch_input.file_md5
    monkeypatch.setattr(fetch_input, "file_md5", lambda path: hashed.append(path) or real_md5(path))
    proxy_log.mark()
    result = fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    assert (result.downloaded, result.skipped) == (0, 15)
    assert hashed == [] and object_gets(proxy_log, local_swift, container.name) == []
    # Without the sidecar every file is hashed once, and nothing is fetched either.
    (tmp_path / layout.FETCH_STATE_NAME).unlink()
    result = fetch_input.fetch(container.url, tmp_path, stacks=True, show_progress=False)
    assert result.skipped == 15 and len(hashed) == 15


@pytest.mark.swift
def test_dynamic_large_object_is_checked_by_its_served_length(
    make_container, swift_client, tmp_path
):
    container = make_container({"seg/1": b"x" * 700, "seg/2": b"y" * 300})
    swift_client.put_object(
        container.name, "dlo.nii", b"", headers={"X-Object-Manifest": f"{container.name}/seg/"}
    )
    fetch_input.fetch(
        container.url, tmp_path, stacks=True, filter_regex="dlo.nii", show_progress=False
    )
    assert (tmp_path / "dlo.nii").read_bytes() == b"x" * 700 + b"y" * 300
    assert read_manifest(tmp_path)["objects"][0]["bytes"] == 1000


@responses.activate
def test_sigterm_stops_after_files_in_flight_with_exit_143_and_rerun_completes(
    tmp_path, monkeypatch, caplog
):
    import os
    import signal

    objects = {f"t/{i}.png": bytes([i]) * 100 for i in range(6)}
    url = f"{SWIFT}/stack"
    responses.get(
        url,
        json=[listing_entry(n, d) for n, d in objects.items()],
        match=[responses.matchers.query_param_matcher({"format": "json", "marker": ""})],
    )
    responses.get(
        url,
        json=[],
        match=[responses.matchers.query_param_matcher({"format": "json", "marker": "t/5.png"})],
    )
    for name, data in objects.items():
        responses.get(f"{url}/{name}", body=data, headers=swift_headers(data))
    real_download = fetch_input.download
    calls = []

    def download_then_signal(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler runs in the main thread meanwhile
        return real_download(*args, **kwargs)

    monkeypatch.setattr(fetch_input, "download", download_then_signal)
    argv = ["--stacks", "--jobs", "1", "--destination", str(tmp_path), "-q", url]
    assert fetch_input.main(argv) == errors.EXIT_INTERRUPTED == 143
    assert "run the same command again" in caplog.text
    done = local_files(tmp_path)
    assert 2 <= len(done) < 6 and all(objects[k] == v for k, v in done.items())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert fetch_input.main(argv) == 0
    assert len(calls) == 6  # the rerun fetched only the rest
    assert {
        k: v for k, v in local_files(tmp_path).items() if k != layout.FETCH_MANIFEST_NAME
    } == objects
