"""Shared fixtures: a real Swift + Keystone v3 (scripts/local-swift), a real one-node Slurm
(scripts/local-slurm) and helpers to fill Swift.

The fixtures talk to Swift with python-swiftclient directly, never through
``hbp_image_tasks.swift``, so the tests of that module stay independent of it.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "local_swift.py"
# A low listing limit makes every listing test span several pages.
TEST_LISTING_LIMIT = 100
# A revoked token keeps working at the proxy until its cache entry expires
# (wait_until_refused flushes memcached rather than waiting for that).
TEST_TOKEN_CACHE_TIME = 300
PUBLIC_READ_ACL = ".r:*,.rlistings"


@dataclasses.dataclass
class LocalSwift:
    """The running local Swift + Keystone: the fields of ``scripts/local-swift env``."""

    auth_url: str
    storage_url: str
    project_id: str
    username: str
    password: str
    admin_username: str
    admin_password: str
    settings_file: Path
    proxy_port: int
    keystone_port: int
    proxy_log: Path
    listing_limit: int | None
    token_cache_time: int
    memcached_port: int | None
    pids: dict
    env: dict
    # True when this session started the servers: it deletes their data when it
    # stops them, so tests need not delete their containers object by object.
    data_deleted_at_end: bool = False

    @classmethod
    def from_env(cls, env: dict) -> LocalSwift:
        """Builds it from the env JSON."""
        names = {f.name for f in dataclasses.fields(cls)} - {"env", "data_deleted_at_end"}
        values = {name: env.get(name) for name in names}
        values["settings_file"] = Path(env["settings_file"])
        values["proxy_log"] = Path(env["proxy_log"])
        return cls(env=env, **values)

    def delete_container(self, name: str) -> None:
        """Deletes a test's container and its objects, unless the session deletes all
        the servers' data at its end anyway (deleting each object only costs time)."""
        if self.data_deleted_at_end:
            return
        connection = self.connection()
        try:
            bulk_delete(connection, name)
        finally:
            connection.close()

    def keystone_session(self, password: str | None = None):
        """Returns a keystoneauth1 session of the test user."""
        from keystoneauth1 import session
        from keystoneauth1.identity import v3

        auth = v3.Password(
            auth_url=self.auth_url,
            username=self.username,
            password=password or self.password,
            project_id=self.project_id,
            user_domain_name="Default",
        )
        return session.Session(auth=auth)

    def connection(self):
        """Returns a python-swiftclient connection of the test user."""
        import swiftclient

        return swiftclient.Connection(
            session=self.keystone_session(), retries=2, starting_backoff=0.1
        )

    def admin_token(self) -> str:
        """Returns a token of Keystone's admin."""
        import requests

        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {
                            "name": self.admin_username,
                            "domain": {"id": "default"},
                            "password": self.admin_password,
                        }
                    },
                },
                "scope": {"project": {"name": "admin", "domain": {"id": "default"}}},
            }
        }
        response = requests.post(self.auth_url + "/auth/tokens", json=body, timeout=30)
        response.raise_for_status()
        return response.headers["X-Subject-Token"]

    def revoke(self, token: str) -> None:
        """Revokes ``token`` in Keystone (the proxy notices after ``token_cache_time``)."""
        import requests

        response = requests.delete(
            self.auth_url + "/auth/tokens",
            timeout=30,
            headers={"X-Auth-Token": self.admin_token(), "X-Subject-Token": token},
        )
        assert response.status_code == 204, response.text

    def create_container(
        self,
        name: str,
        objects: Mapping[str, bytes] | None = None,
        public: bool = True,
        cors_origin: str | None = "*",
    ) -> str:
        """Creates container ``name`` (public, with CORS) holding ``objects``; returns its URL.

        For containers shared by several tests (module-scoped fixtures); the
        caller deletes it with :meth:`delete_container`.
        """
        headers = {}
        if public:
            headers["X-Container-Read"] = PUBLIC_READ_ACL
        if cors_origin:
            headers["X-Container-Meta-Access-Control-Allow-Origin"] = cors_origin
        connection = self.connection()
        try:
            connection.put_container(name, headers=headers)
            if objects:
                put_objects(connection, name, objects)
        finally:
            connection.close()
        return f"{self.storage_url}/{quote(name)}"

    def wait_until_refused(self, token: str, timeout: float = 330.0) -> None:
        """Waits until the proxy refuses ``token`` (after revoking it)."""
        import requests

        if self.memcached_port:
            # Forget the proxy's validated tokens instead of waiting for them to age.
            import socket

            with socket.create_connection(("127.0.0.1", self.memcached_port), 10) as sock:
                sock.sendall(b"flush_all\r\n")
                assert sock.recv(64).startswith(b"OK")
        deadline = time.time() + timeout
        while time.time() < deadline:
            status = requests.head(
                self.storage_url, headers={"X-Auth-Token": token}, timeout=30
            ).status_code
            if status == 401:
                return
            time.sleep(0.25)
        raise AssertionError(f"the proxy still accepts the revoked token after {timeout} s")


def run_script(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Runs scripts/local_swift.py with this interpreter; returns the finished process."""
    return subprocess.run(
        [sys.executable, str(SCRIPT)] + list(args), capture_output=True, text=True, timeout=timeout
    )


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@pytest.fixture(scope="session")
def local_swift() -> Iterator[LocalSwift]:
    """Starts the local Swift + Keystone once per session (reusing a running one).

    State goes to $LOCAL_SWIFT_TEST_DIR (default <repo>/.local-swift/tests); the
    servers stop at the end unless they were already running or LOCAL_SWIFT_KEEP=1,
    and then their data goes too (the tests' containers, deleted all at once).
    Skips when they cannot start, but fails when CI=true.
    """
    state = os.environ.get("LOCAL_SWIFT_TEST_DIR") or str(REPO / ".local-swift" / "tests")
    options = [
        "--dir",
        state,
        "--listing-limit",
        str(TEST_LISTING_LIMIT),
        "--token-cache-time",
        str(TEST_TOKEN_CACHE_TIME),
    ]
    was_running = run_script("status", "--dir", state, timeout=60).returncode == 0
    try:
        started = run_script("start", *options)
    except subprocess.TimeoutExpired:
        started = None
    if started is None or started.returncode != 0:
        reason = (
            "scripts/local-swift start timed out"
            if started is None
            else f"scripts/local-swift start failed: {_last_line(started.stderr)}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    owned = not was_running and os.environ.get("LOCAL_SWIFT_KEEP") != "1"
    env = json.loads(started.stdout)
    try:
        yield dataclasses.replace(LocalSwift.from_env(env), data_deleted_at_end=owned)
    finally:
        if owned and run_script("stop", "--dir", state, timeout=60).returncode == 0:
            # The tests' containers, all at once (the next start begins empty).
            shutil.rmtree(Path(state) / "storage", ignore_errors=True)


@dataclasses.dataclass
class LocalSlurm:
    """The running one-node Slurm cluster: the fields of ``scripts/local-slurm env``."""

    slurm_conf: Path
    partition: str
    cpus: int
    memory_mb: int
    logs_dir: Path

    def environ(self) -> dict:
        """Returns os.environ with this cluster's SLURM_CONF (for sbatch and friends)."""
        return {**os.environ, "SLURM_CONF": str(self.slurm_conf)}


@pytest.fixture(scope="session")
def local_slurm() -> Iterator[LocalSlurm]:
    """Starts the local one-node Slurm once per session (reusing a running one).

    State goes to $LOCAL_SLURM_TEST_DIR (default <repo>/.local-slurm/tests); the
    daemons stop at the end unless they were already running or LOCAL_SLURM_KEEP=1.
    Skips when slurm-wlm or munge is missing or the cluster cannot start (fails when CI=true).
    """
    state = os.environ.get("LOCAL_SLURM_TEST_DIR") or str(REPO / ".local-slurm" / "tests")
    script = [sys.executable, str(REPO / "scripts" / "local_slurm.py")]
    was_running = (
        subprocess.run(script + ["status", "--dir", state], capture_output=True).returncode == 0
    )
    try:
        started = subprocess.run(
            script + ["start", "--dir", state], capture_output=True, text=True, timeout=120
        )
    except subprocess.TimeoutExpired:
        started = None
    if started is None or started.returncode != 0:
        reason = (
            "scripts/local-slurm start timed out"
            if started is None
            else f"scripts/local-slurm start failed: {_last_line(started.stderr)}"
        )
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    env = json.loads(started.stdout)
    try:
        yield LocalSlurm(
            Path(env["slurm_conf"]),
            env["partition"],
            env["cpus"],
            env["memory_mb"],
            Path(env["logs_dir"]),
        )
    finally:
        if not was_running and os.environ.get("LOCAL_SLURM_KEEP") != "1":
            subprocess.run(script + ["stop", "--dir", state], capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def swift_settings_file(local_swift: LocalSwift) -> Path:
    """Returns the path of the test user's settings file (mode 0600)."""
    return local_swift.settings_file


@pytest.fixture
def swift_client(local_swift: LocalSwift):
    """Returns a python-swiftclient connection of the test user."""
    connection = local_swift.connection()
    yield connection
    connection.close()


def bulk_delete(connection, container: str) -> None:
    """Deletes ``container`` and all its objects with as few requests as possible."""
    from swiftclient.exceptions import ClientException

    try:
        _, objects = connection.get_container(container, full_listing=True)
    except ClientException:
        return
    names = [f"/{quote(container)}/{quote(o['name'])}" for o in objects]
    names.append(f"/{quote(container)}")
    for start in range(0, len(names), 1000):
        connection.post_account(
            headers={"Content-Type": "text/plain", "Accept": "application/json"},
            data="\n".join(names[start : start + 1000]),
            query_string="bulk-delete",
        )


@pytest.fixture
def unique_container(request, local_swift: LocalSwift) -> Iterator[Callable[..., str]]:
    """Returns a factory of container names unique to this test; deletes them afterwards."""
    created: list[str] = []
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", request.node.name)[:60]

    def make(suffix: str = "") -> str:
        name = f"{base}{'-' + suffix if suffix else ''}-{uuid.uuid4().hex[:8]}"
        created.append(name)
        return name

    yield make
    for name in created:
        local_swift.delete_container(name)


def put_objects(connection, container: str, objects: Mapping[str, bytes]) -> None:
    """Uploads ``objects`` (name -> bytes) to an existing container, in one tar if many."""
    if len(objects) <= 10:
        for name, data in objects.items():
            connection.put_object(container, name, data)
        return
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in objects.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    # Bulk extract-archive: one request instead of one per object.
    import requests

    url, token = connection.get_auth()
    response = requests.put(
        f"{url}/{quote(container)}?extract-archive=tar",
        data=buffer.getvalue(),
        timeout=120,
        headers={"X-Auth-Token": token, "Accept": "application/json"},
    )
    result = response.json()
    assert response.status_code == 200 and not result.get("Errors"), result
    assert result["Number Files Created"] == len(objects), result


@dataclasses.dataclass
class Container:
    """A container the fixtures made: its name and its public URL."""

    name: str
    url: str


@pytest.fixture
def make_container(local_swift: LocalSwift, unique_container) -> Callable[..., Container]:
    """Returns a factory: ``make_container(objects=None, public=True, cors_origin="*")``.

    The container gets ``X-Container-Read: .r:*,.rlistings`` when public and
    ``X-Container-Meta-Access-Control-Allow-Origin`` when ``cors_origin`` is set.
    """

    def make(
        objects: Mapping[str, bytes] | None = None,
        public: bool = True,
        cors_origin: str | None = "*",
        suffix: str = "",
    ) -> Container:
        name = unique_container(suffix)
        return Container(name, local_swift.create_container(name, objects, public, cors_origin))

    return make


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """One line of the proxy's access log."""

    time: float
    method: str
    path: str  # decoded, without the query string
    query: str
    status: int
    bytes_received: int
    bytes_sent: int
    source: str  # "-" for a client's request, else the middleware that made it
    transaction_id: str

    @classmethod
    def parse(cls, line: str) -> LogEntry:
        """Parses one line written with the template in ``local-swift env``."""
        fields = line.split()
        # The log quotes the request's wire path once more: undo that, then
        # decode the path itself (the query string stays as it was sent).
        path, _, query = unquote(fields[2]).partition("?")
        path = unquote(path)

        def number(text: str) -> int:
            return 0 if text == "-" else int(text)

        return cls(
            float(fields[0]),
            fields[1],
            path,
            query,
            int(fields[3]),
            number(fields[4]),
            number(fields[5]),
            fields[6],
            fields[7],
        )


class ProxyLog:
    """Reads the proxy access log from a mark on, to count the requests a test made."""

    def __init__(self, path: Path):
        self.path = path
        self.start = self._size()

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def mark(self) -> None:
        """Forgets the requests made so far."""
        self._settle()
        self.start = self._size()

    def _settle(self) -> None:
        # The proxy writes a line when it has sent the last byte, which can be
        # just after the client has read it: wait until the log stops growing.
        size = -1
        while size != self._size():
            size = self._size()
            time.sleep(0.1)

    def entries(
        self, method: str | None = None, path_prefix: str = "", clients_only: bool = True
    ) -> list[LogEntry]:
        """Returns the requests since the mark, filtered by method and path prefix."""
        self._settle()
        with open(self.path, "rb") as handle:
            handle.seek(self.start)
            lines = handle.read().decode("utf-8", "replace").splitlines()
        entries = [LogEntry.parse(line) for line in lines if line.strip()]
        return [
            e
            for e in entries
            if (method is None or e.method == method)
            and e.path.startswith(path_prefix)
            and (not clients_only or e.source == "-")
        ]

    def count(self, method: str | None = None, path_prefix: str = "") -> int:
        """Returns how many client requests match since the mark."""
        return len(self.entries(method, path_prefix))


@pytest.fixture
def proxy_log(local_swift: LocalSwift) -> ProxyLog:
    """Returns the proxy access log, marked at the start of the test."""
    return ProxyLog(local_swift.proxy_log)
