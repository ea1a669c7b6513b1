#!/usr/bin/env python3
"""A real OpenStack Swift + Keystone v3 on 127.0.0.1 for the tests and the README demo.

``start`` builds one-replica rings, starts memcached, the account, container,
object and proxy servers and Keystone (gunicorn, sqlite, fernet tokens), and
writes a ready settings file; ``stop`` ends only the processes it started.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SERVER_PACKAGES = ["swift", "keystone", "keystonemiddleware", "gunicorn", "python-memcached"]
SWIFT_SERVERS = ("account", "container", "object", "proxy")
TEST_PROJECT = "hbp-test"
TEST_USER = "hbp-tester"
REGION = "RegionOne"
START_TIMEOUT = 60.0

EPILOG = """\
examples:
  scripts/local-swift start                      # prints the env JSON when ready
  scripts/local-swift start --listing-limit 100  # listings of at most 100 names
  export SWIFT_SETTINGS=$(scripts/local-swift env | python3 -c \\
      'import json,sys; print(json.load(sys.stdin)["settings_file"])')
  scripts/local-swift stop

environment:
  LOCAL_SWIFT_DIR   state directory (default: <repo>/.local-swift)
  LOCAL_SWIFT_VENV  virtualenv with swift, keystone, keystonemiddleware,
                    gunicorn, python-memcached (created with pip when missing;
                    default: ${XDG_CACHE_HOME:-~/.cache}/hbp-image-tasks/servers-venv)

proxy access log (env's proxy_log), one line per request:
  START_TIME METHOD PATH STATUS BYTES_RECEIVED BYTES_SENT SOURCE TRANSACTION_ID
  START_TIME is in seconds since the epoch, PATH is URL-quoted with its query
  string, SOURCE is "-" for a client's request and the middleware's name
  (SLO, DLO, SW, ...) for the requests that middleware made itself.
"""


class StartError(Exception):
    """The servers could not be set up or did not come up."""


# --------------------------------------------------------------------------
# small helpers


def state_dir(option: str | None) -> Path:
    """Returns the state directory: the option, else $LOCAL_SWIFT_DIR, else the repo's."""
    value = option or os.environ.get("LOCAL_SWIFT_DIR") or str(REPO / ".local-swift")
    return Path(value).resolve()


def venv_dir() -> Path:
    """Returns the servers' virtualenv directory."""
    if os.environ.get("LOCAL_SWIFT_VENV"):
        return Path(os.environ["LOCAL_SWIFT_VENV"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "hbp-image-tasks" / "servers-venv"


def cache_dir() -> Path:
    """Returns where the bootstrapped Keystone database is kept between state dirs."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "hbp-image-tasks" / "keystone-seed"


def free_port() -> int:
    """Returns a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Returns True when nothing listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Writes ``text`` to ``path`` atomically with ``mode``."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def pid_alive(pid: int) -> bool:
    """Returns True when process ``pid`` exists and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def http(
    method: str, url: str, headers: dict | None = None, body: Any = None, timeout: float = 10.0
) -> tuple[int, dict, bytes]:
    """Returns (status, headers, body) of one request; HTTP errors are not raised."""
    data = None
    headers = dict(headers or {})
    if body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def keystone_token(
    auth_url: str,
    user: str,
    password: str,
    project_id: str | None = None,
    project_name: str | None = None,
) -> tuple[str, dict]:
    """Returns a project-scoped token and the token body, or raises StartError."""
    project: dict = (
        {"id": project_id} if project_id else {"name": project_name, "domain": {"id": "default"}}
    )
    body = {
        "auth": {
            "identity": {
                "methods": ["password"],
                "password": {
                    "user": {"name": user, "domain": {"id": "default"}, "password": password}
                },
            },
            "scope": {"project": project},
        }
    }
    status, headers, data = http("POST", auth_url + "/auth/tokens", body=body)
    if status != 201:
        raise StartError(f"Keystone refused a token for {user}: HTTP {status} {data[:200]!r}")
    return headers["X-Subject-Token"], json.loads(data)["token"]


# --------------------------------------------------------------------------
# servers' virtualenv


def python_ok(python: str) -> bool:
    """Returns True when ``python`` runs and is at least 3.11 (Keystone's minimum)."""
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 11))"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and out.stdout.strip() == "True"


def find_python() -> str:
    """Returns a Python >= 3.11 interpreter to create the servers' virtualenv with."""
    candidates = [sys.executable]
    for name in ("python3.13", "python3.12", "python3.11", "python3"):
        found = shutil.which(name)
        if found:
            candidates.append(found)
    pyenv_root = Path(os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv")))
    candidates += sorted(map(str, pyenv_root.glob("versions/3.1[1-3]*/bin/python3")), reverse=True)
    for candidate in candidates:
        if python_ok(candidate):
            return candidate
    raise StartError(
        "no Python >= 3.11 found (Keystone needs it): install one "
        "(e.g. apt-get install python3.11 or pyenv install 3.11) "
        "or set LOCAL_SWIFT_VENV to a virtualenv with the servers"
    )


def ensure_venv() -> Path:
    """Returns the servers' Python, creating their virtualenv with pip when missing."""
    venv = venv_dir()
    python = venv / "bin" / "python"
    check = "import swift, keystone, keystonemiddleware, gunicorn, memcache"
    if (
        python.exists()
        and subprocess.run([str(python), "-c", check], capture_output=True).returncode == 0
    ):
        return python
    if not python.exists():
        base = find_python()
        print(f"local-swift: creating {venv} with {base}", file=sys.stderr)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
    print(
        f"local-swift: installing {', '.join(SERVER_PACKAGES)} into {venv} (once; a few minutes)",
        file=sys.stderr,
    )
    quiet_pip(python, ["install", "-q"] + SERVER_PACKAGES)
    return python


def quiet_pip(python: Path, arguments: list[str]) -> None:
    """Runs pip with ``arguments``; shows its output only when it fails.

    pip prints its configuration's warnings for every package even with -q,
    which would bury the servers' own messages.
    """
    result = subprocess.run(
        [str(python), "-m", "pip", "--disable-pip-version-check"] + arguments,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if result.returncode != 0:
        sys.stderr.write(result.stdout)
        raise StartError(f"pip {' '.join(arguments)} failed with exit code {result.returncode}")


# --------------------------------------------------------------------------
# configuration


def load_json(path: Path) -> dict:
    """Returns the JSON object in ``path``, or {} when it is missing or broken."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def pick_ports(previous: dict) -> dict:
    """Returns the ports to use, reusing the previous ones where still free."""
    ports: dict = {}
    taken: set = set()
    for name in SWIFT_SERVERS + ("keystone", "memcached"):
        port = previous.get(name)
        if not port or port in taken or not port_is_free(port):
            port = free_port()
            while port in taken:
                port = free_port()
        ports[name] = port
        taken.add(port)
    return ports


def swift_conf_text(hash_prefix: str, hash_suffix: str, listing_limit: int | None) -> str:
    """Returns swift.conf: the hash path secrets and the constraints."""
    text = (
        f"[swift-hash]\nswift_hash_path_prefix = {hash_prefix}\n"
        f"swift_hash_path_suffix = {hash_suffix}\n\n"
        "[storage-policy:0]\nname = Policy-0\ndefault = yes\n\n"
        "[swift-constraints]\n"
    )
    if listing_limit:
        text += f"container_listing_limit = {listing_limit}\n"
    return text


def server_conf_text(kind: str, state: Path, ports: dict, conf_dir: Path) -> str:
    """Returns the account, container or object server's configuration."""
    return f"""[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {ports[kind]}
workers = 0
mount_check = false
devices = {state / "storage"}
swift_dir = {conf_dir}
log_name = {kind}-server
log_level = INFO
log_custom_handlers = local_swift.log_handler_hook

[pipeline:main]
pipeline = {kind}-server

[app:{kind}-server]
use = egg:swift#{kind}

[{kind}-replicator]
[{kind}-updater]
[{kind}-auditor]
"""


ACCESS_LOG_TEMPLATE = (
    "{start_time} {method} {path} {status_int} {bytes_recvd} {bytes_sent} {source} {transaction_id}"
)


def proxy_conf_text(
    state: Path,
    ports: dict,
    conf_dir: Path,
    credentials: dict,
    use_memcached: bool,
    token_cache_time: int,
) -> str:
    """Returns the proxy server's configuration (Keystone auth, CORS, static web)."""
    keystone = f"http://127.0.0.1:{ports['keystone']}/v3"
    cache = "cache " if use_memcached else ""
    memcache = f"127.0.0.1:{ports['memcached']}"
    memcache_line = f"memcached_servers = {memcache}\n" if use_memcached else ""
    # staticweb, slo and dlo come after the auth filters, as Swift's
    # documentation asks, so their subrequests are authorised like the client's.
    pipeline = (
        "catch_errors gatekeeper healthcheck proxy-logging "
        + cache
        + "listing_formats bulk tempurl authtoken keystoneauth staticweb "
        "copy slo dlo versioned_writes symlink proxy-logging proxy-server"
    )
    return f"""[DEFAULT]
bind_ip = 127.0.0.1
bind_port = {ports["proxy"]}
workers = 0
swift_dir = {conf_dir}
log_name = proxy-server
log_level = INFO
log_custom_handlers = local_swift.log_handler_hook
# Origins are allowed per container (X-Container-Meta-Access-Control-Allow-Origin);
# strict mode answers CORS only for an allowed Origin, as a production proxy does.
cors_allow_origin =
strict_cors_mode = true
cors_expose_headers = Content-Encoding, Content-Length, ETag, Last-Modified

[pipeline:main]
pipeline = {pipeline}

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = false

[filter:catch_errors]
use = egg:swift#catch_errors

[filter:gatekeeper]
use = egg:swift#gatekeeper

[filter:healthcheck]
use = egg:swift#healthcheck

[filter:proxy-logging]
use = egg:swift#proxy_logging
log_msg_template = {ACCESS_LOG_TEMPLATE}
reveal_sensitive_prefix = 0

[filter:cache]
use = egg:swift#memcache
memcache_servers = {memcache}

[filter:listing_formats]
use = egg:swift#listing_formats

[filter:bulk]
use = egg:swift#bulk

[filter:tempurl]
use = egg:swift#tempurl

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
www_authenticate_uri = {keystone}
auth_url = {keystone}
auth_type = password
username = {credentials["admin_username"]}
password = {credentials["admin_password"]}
project_name = admin
user_domain_id = default
project_domain_id = default
interface = public
region_name = {REGION}
delay_auth_decision = true
token_cache_time = {token_cache_time}
{memcache_line}
[filter:keystoneauth]
use = egg:swift#keystoneauth
reseller_prefix = AUTH_
operator_roles = admin, swiftoperator

[filter:staticweb]
use = egg:swift#staticweb

[filter:copy]
use = egg:swift#copy

[filter:slo]
use = egg:swift#slo

[filter:dlo]
use = egg:swift#dlo

[filter:versioned_writes]
use = egg:swift#versioned_writes

[filter:symlink]
use = egg:swift#symlink
"""


def keystone_conf_text(state: Path, token_expiration: int) -> str:
    """Returns keystone.conf: sqlite, fernet tokens with the given lifetime."""
    keystone = state / "keystone"
    return f"""[DEFAULT]
debug = false

[database]
connection = sqlite:///{keystone / "keystone.db"}

[token]
provider = fernet
expiration = {token_expiration}

[fernet_tokens]
key_repository = {keystone / "fernet-keys"}

[fernet_receipts]
key_repository = {keystone / "fernet-keys"}

[credential]
key_repository = {keystone / "credential-keys"}

[cache]
enabled = false

[identity]
# Cheap password hashes: this Keystone only ever holds throwaway test users.
password_hash_rounds = 4
"""


KEYSTONE_SHIM = '''"""Keystone's WSGI application; oslo.config must not see gunicorn's argv."""
import sys

sys.argv = sys.argv[:1]
from keystone.wsgi.api import application  # noqa: E402,F401
'''


def log_handler_hook(conf, name, log_to_console, log_route, fmt, logger, adapted_logger) -> None:
    """Swift ``log_custom_handlers`` hook: access lines to the access log, others to stderr."""
    import logging

    access_log = os.environ.get("LOCAL_SWIFT_ACCESS_LOG")
    if log_route == "proxy-access" and access_log:
        handler: logging.Handler = logging.FileHandler(access_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.__stderr__)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s " + fmt))
    for old in list(logger.handlers):
        if getattr(old, "_local_swift", False):
            logger.removeHandler(old)
    handler._local_swift = True  # type: ignore[attr-defined]
    logger.addHandler(handler)


def build_rings(conf_dir: Path, ports: dict, part_power: int = 8) -> None:
    """Writes one-replica, one-device rings for the account, container and object servers."""
    from swift.common.ring import RingBuilder

    for kind in ("account", "container", "object"):
        builder = RingBuilder(part_power, 1, 1)
        builder.add_dev(
            {
                "id": 0,
                "region": 1,
                "zone": 1,
                "ip": "127.0.0.1",
                "port": ports[kind],
                "device": "d1",
                "weight": 100.0,
            }
        )
        builder.rebalance()
        ring = builder.get_ring()
        tmp = conf_dir / f"{kind}.ring.gz.tmp"
        ring.save(str(tmp))
        os.replace(tmp, conf_dir / f"{kind}.ring.gz")


# --------------------------------------------------------------------------
# processes


def spawn(state: Path, name: str, argv: list, env: dict | None = None) -> int:
    """Starts one server in its own session with its output in logs/NAME.log; returns its pid."""
    log = open(state / "logs" / f"{name}.log", "ab")
    process = subprocess.Popen(
        argv,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
        cwd=str(state),
    )
    log.close()
    return process.pid


def stop_pids(pids: dict) -> None:
    """Terminates the recorded processes (and their process groups), then kills leftovers."""
    alive = {}
    for name, pid in pids.items():
        if pid and pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
            alive[name] = pid
    deadline = time.time() + 10
    while alive and time.time() < deadline:
        alive = {n: p for n, p in alive.items() if pid_alive(p)}
        time.sleep(0.1)
    for pid in alive.values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_for(what: str, check, logs: list, timeout: float = START_TIMEOUT) -> Any:
    """Returns check()'s first truthy result, or raises StartError naming the logs."""
    deadline = time.time() + timeout
    last_error = ""
    while time.time() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, StartError, ValueError) as exc:
            last_error = f" ({exc})"
        time.sleep(0.2)
    raise StartError(
        f"{what} did not come up within {timeout:.0f} s{last_error}; "
        f"see {', '.join(map(str, logs))}"
    )


def healthy(env: dict) -> bool:
    """Returns True when the proxy answers /healthcheck and Keystone issues a token."""
    try:
        status, _, body = http(
            "GET", f"http://127.0.0.1:{env['proxy_port']}/healthcheck", timeout=3
        )
        if status != 200 or body != b"OK":
            return False
        token, _ = keystone_token(
            env["auth_url"], env["username"], env["password"], project_id=env["project_id"]
        )
        status, _, _ = http("HEAD", env["storage_url"], {"X-Auth-Token": token}, timeout=5)
        return status in (200, 204)
    except (OSError, StartError, KeyError, ValueError):
        return False


# --------------------------------------------------------------------------
# Keystone


def keystone_manage(python: Path, state: Path, conf: Path, *args: str) -> None:
    """Runs one keystone-manage command, or raises StartError with its output."""
    manage = python.parent / "keystone-manage"
    result = subprocess.run(
        [str(manage), "--config-file", str(conf)] + list(args),
        capture_output=True,
        text=True,
        cwd=str(state),
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:]
        raise StartError(f"keystone-manage {args[0]} failed: {' '.join(tail)}")


def keystone_version(python: Path) -> str:
    """Returns the installed Keystone version (the seed cache is per version)."""
    result = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('keystone'))"],
        capture_output=True,
        text=True,
    )
    # The suffix changes whenever the seeded database's content changes.
    return (result.stdout.strip() or "unknown") + "-seed2"


def copy_sqlite(source: Path, target: Path) -> None:
    """Copies a sqlite database consistently (even while a server has it open)."""
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    with sqlite3.connect(str(source)) as src, sqlite3.connect(str(tmp)) as dst:
        src.backup(dst)
    os.replace(tmp, target)


def prepare_keystone(python: Path, state: Path, conf: Path) -> dict:
    """Returns the Keystone credentials; bootstraps (or copies a cached) database when new."""
    keystone = state / "keystone"
    credentials_file = keystone / "credentials.json"
    credentials = load_json(credentials_file)
    if credentials and (keystone / "keystone.db").exists():
        return credentials
    if keystone.exists():
        shutil.rmtree(keystone)
    keystone.mkdir(parents=True)
    seed = cache_dir() / keystone_version(python)
    if (seed / "credentials.json").exists() and (seed / "keystone.db").exists():
        for name in ("fernet-keys", "credential-keys"):
            shutil.copytree(seed / name, keystone / name)
            os.chmod(keystone / name, 0o700)
        copy_sqlite(seed / "keystone.db", keystone / "keystone.db")
        credentials = load_json(seed / "credentials.json")
        write_private(credentials_file, json.dumps(credentials, indent=2))
        return credentials
    credentials = {
        "admin_username": "admin",
        "admin_password": base64.urlsafe_b64encode(os.urandom(18)).decode(),
        "username": TEST_USER,
        "password": base64.urlsafe_b64encode(os.urandom(18)).decode(),
        "needs_setup": True,
    }
    import grp
    import pwd

    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    keystone_manage(python, state, conf, "db_sync")
    keystone_manage(
        python, state, conf, "fernet_setup", "--keystone-user", user, "--keystone-group", group
    )
    keystone_manage(
        python, state, conf, "credential_setup", "--keystone-user", user, "--keystone-group", group
    )
    keystone_manage(
        python,
        state,
        conf,
        "bootstrap",
        "--bootstrap-password",
        credentials["admin_password"],
        "--bootstrap-username",
        "admin",
        "--bootstrap-project-name",
        "admin",
        "--bootstrap-role-name",
        "admin",
        "--bootstrap-region-id",
        REGION,
        "--bootstrap-public-url",
        "http://127.0.0.1:5000/v3",
    )
    write_private(credentials_file, json.dumps(credentials, indent=2))
    return credentials


def find_or_create(admin: dict, kind: str, query: str, body: dict) -> str:
    """Returns the id of the Keystone entity ``kind`` matching ``query``, creating it if needed."""
    status, _, data = http("GET", f"{admin['url']}/{kind}?{query}", admin["headers"])
    items = json.loads(data)[kind] if status == 200 else []
    if items:
        return items[0]["id"]
    singular = kind[:-1]
    status, _, data = http("POST", f"{admin['url']}/{kind}", admin["headers"], {singular: body})
    if status != 201:
        raise StartError(f"Keystone: creating {singular} failed: HTTP {status} {data[:200]!r}")
    return json.loads(data)[singular]["id"]


def setup_keystone(auth_url: str, credentials: dict, proxy_port: int) -> dict:
    """Creates the test project and user once, points the catalog at today's ports."""
    token, _ = keystone_token(
        auth_url, credentials["admin_username"], credentials["admin_password"], project_name="admin"
    )
    admin = {"url": auth_url, "headers": {"X-Auth-Token": token}}
    if credentials.get("needs_setup"):
        project_id = find_or_create(
            admin,
            "projects",
            f"name={TEST_PROJECT}",
            {"name": TEST_PROJECT, "domain_id": "default", "description": "hbp-image-tasks tests"},
        )
        user_id = find_or_create(
            admin,
            "users",
            f"name={TEST_USER}",
            {
                "name": TEST_USER,
                "domain_id": "default",
                "password": credentials["password"],
                "default_project_id": project_id,
            },
        )
        for role in ("member", "swiftoperator"):
            role_id = find_or_create(admin, "roles", f"name={role}", {"name": role})
            status, _, _ = http(
                "PUT",
                f"{auth_url}/projects/{project_id}/users/{user_id}/roles/{role_id}",
                admin["headers"],
            )
            if status not in (200, 204):
                raise StartError(f"Keystone: assigning role {role} failed: HTTP {status}")
        credentials = {k: v for k, v in credentials.items() if k != "needs_setup"}
        credentials["project_id"] = project_id
    # The catalog holds ports, which may change between starts.
    urls = {
        "identity": auth_url,
        "object-store": f"http://127.0.0.1:{proxy_port}/v1/AUTH_%(project_id)s",
    }
    for service_type, url in urls.items():
        service_id = find_or_create(
            admin,
            "services",
            f"type={service_type}",
            {"type": service_type, "name": {"identity": "keystone"}.get(service_type, "swift")},
        )
        status, _, data = http(
            "GET", f"{auth_url}/endpoints?service_id={service_id}", admin["headers"]
        )
        endpoints = json.loads(data)["endpoints"]
        if not any(e["interface"] == "public" for e in endpoints):
            http(
                "POST",
                f"{auth_url}/endpoints",
                admin["headers"],
                {
                    "endpoint": {
                        "service_id": service_id,
                        "interface": "public",
                        "url": url,
                        "region_id": REGION,
                    }
                },
            )
        for endpoint in endpoints:
            if endpoint["interface"] != "public":
                http("DELETE", f"{auth_url}/endpoints/{endpoint['id']}", admin["headers"])
            elif endpoint["url"] != url:
                http(
                    "PATCH",
                    f"{auth_url}/endpoints/{endpoint['id']}",
                    admin["headers"],
                    {"endpoint": {"url": url}},
                )
    return credentials


# --------------------------------------------------------------------------
# commands


def current_env(state: Path) -> dict:
    """Returns the recorded env of a started instance ({} when none)."""
    return load_json(state / "env.json")


def all_alive(env: dict) -> bool:
    """Returns True when every recorded server process still runs."""
    pids = env.get("pids") or {}
    return bool(pids) and all(pid_alive(pid) for pid in pids.values())


def start(state: Path, args: argparse.Namespace) -> dict:
    """Starts everything (or finds it running and healthy); returns the env."""
    env = current_env(state)
    wanted = {
        "listing_limit": args.listing_limit,
        "token_expiration": args.token_expiration,
        "token_cache_time": args.token_cache_time,
    }
    if env and all_alive(env) and healthy(env):
        if all(env.get(k) == v for k, v in wanted.items()):
            return env
        print("local-swift: restarting with other options", file=sys.stderr)
    if env:
        stop(state)

    python = ensure_venv()
    if (
        Path(sys.executable).resolve() != python.resolve()
        or os.environ.get("_LOCAL_SWIFT_IN_VENV") != "1"
    ):
        # The rest imports swift: continue in the servers' interpreter.
        argv = [str(python), str(Path(__file__).resolve())] + sys.argv[1:]
        os.environ["_LOCAL_SWIFT_IN_VENV"] = "1"
        os.execv(str(python), argv)

    started = time.time()
    conf_dir = state / "etc"
    for sub in ("etc", "logs", "storage/d1"):
        (state / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    # Fresh ports each time (the catalog is updated): reusing old ones races
    # with other instances that picked them meanwhile.
    ports = pick_ports({})
    write_private(state / "ports.json", json.dumps(ports))

    secrets = load_json(conf_dir / "hash.json") or {
        "prefix": os.urandom(8).hex(),
        "suffix": os.urandom(8).hex(),
    }
    write_private(conf_dir / "hash.json", json.dumps(secrets))
    write_private(
        conf_dir / "swift.conf",
        swift_conf_text(secrets["prefix"], secrets["suffix"], args.listing_limit),
    )
    build_rings(conf_dir, ports)

    keystone_conf = conf_dir / "keystone.conf"
    write_private(keystone_conf, keystone_conf_text(state, args.token_expiration))
    (conf_dir / "keystone_wsgi.py").write_text(KEYSTONE_SHIM)

    pids: dict = {}
    record = {"pids": pids, "state_dir": str(state)}
    try:
        memcached = shutil.which("memcached")
        if memcached:
            argv = [
                memcached,
                "-l",
                "127.0.0.1",
                "-p",
                str(ports["memcached"]),
                "-U",
                "0",
                "-m",
                "64",
            ]
            if os.geteuid() == 0:
                argv += ["-u", "root"]
            pids["memcached"] = spawn(state, "memcached", argv)
        else:
            print(
                "local-swift: memcached not found: running without the cache "
                "middleware (apt-get install memcached for a closer match to "
                "production)",
                file=sys.stderr,
            )
        write_private(state / "env.json", json.dumps(record))

        credentials = prepare_keystone(python, state, keystone_conf)
        auth_url = f"http://127.0.0.1:{ports['keystone']}/v3"
        pids["keystone"] = spawn(
            state,
            "keystone",
            [
                str(python.parent / "gunicorn"),
                "--bind",
                f"127.0.0.1:{ports['keystone']}",
                "--workers",
                "2",
                "--timeout",
                "60",
                "--chdir",
                str(conf_dir),
                "--pythonpath",
                str(conf_dir),
                "keystone_wsgi:application",
            ],
            {"OS_KEYSTONE_CONFIG_FILES": str(keystone_conf)},
        )
        write_private(state / "env.json", json.dumps(record))

        for kind in ("account", "container", "object"):
            conf = conf_dir / f"{kind}-server.conf"
            conf.write_text(server_conf_text(kind, state, ports, conf_dir))
            pids[kind] = spawn(
                state,
                kind,
                [str(python), str(Path(__file__).resolve()), "_serve", str(conf), f"{kind}-server"],
                {"PYTHONPATH": str(Path(__file__).resolve().parent)},
            )
        proxy_log = state / "logs" / "proxy-access.log"
        proxy_conf = conf_dir / "proxy-server.conf"
        write_private(
            proxy_conf,
            proxy_conf_text(
                state, ports, conf_dir, credentials, bool(memcached), args.token_cache_time
            ),
        )
        pids["proxy"] = spawn(
            state,
            "proxy",
            [str(python), str(Path(__file__).resolve()), "_serve", str(proxy_conf), "proxy-server"],
            {
                "PYTHONPATH": str(Path(__file__).resolve().parent),
                "LOCAL_SWIFT_ACCESS_LOG": str(proxy_log),
            },
        )
        write_private(state / "env.json", json.dumps(record))

        logs = [state / "logs" / "keystone.log"]
        wait_for("Keystone", lambda: http("GET", auth_url, timeout=3)[0] == 200, logs)
        setup_needed = credentials.get("needs_setup")
        credentials = setup_keystone(auth_url, credentials, ports["proxy"])
        write_private(state / "keystone" / "credentials.json", json.dumps(credentials))
        if setup_needed:
            seed = cache_dir() / keystone_version(python)
            try:
                if seed.exists():
                    shutil.rmtree(seed)
                seed.mkdir(parents=True)
                for name in ("fernet-keys", "credential-keys"):
                    shutil.copytree(state / "keystone" / name, seed / name)
                copy_sqlite(state / "keystone" / "keystone.db", seed / "keystone.db")
                write_private(seed / "credentials.json", json.dumps(credentials))
            except OSError as exc:  # only a cache: the next cold start is slower
                print(
                    f"local-swift: cannot cache Keystone's database in {seed}: {exc}",
                    file=sys.stderr,
                )

        project_id = credentials["project_id"]
        env = {
            "auth_url": auth_url,
            "storage_url": f"http://127.0.0.1:{ports['proxy']}/v1/AUTH_{project_id}",
            "project_id": project_id,
            "project_name": TEST_PROJECT,
            "username": credentials["username"],
            "password": credentials["password"],
            "user_domain_name": "Default",
            "project_domain_name": "Default",
            "admin_username": credentials["admin_username"],
            "admin_password": credentials["admin_password"],
            "admin_project_name": "admin",
            "settings_file": str(state / "os_settings.json"),
            "proxy_port": ports["proxy"],
            "keystone_port": ports["keystone"],
            "memcached_port": ports["memcached"] if memcached else None,
            "proxy_log": str(proxy_log),
            "proxy_log_format": ACCESS_LOG_TEMPLATE.replace("{", "").replace("}", ""),
            "logs_dir": str(state / "logs"),
            "listing_limit": args.listing_limit,
            "token_expiration": args.token_expiration,
            "token_cache_time": args.token_cache_time,
            "state_dir": str(state),
            "pids": pids,
        }
        write_private(
            state / "os_settings.json",
            json.dumps(
                {
                    "auth_version": "3",
                    "os_username": env["username"],
                    "os_password": env["password"],
                    "os_project_id": project_id,
                    "os_auth_url": auth_url,
                    "os_storage_url": env["storage_url"],
                    "os_user_domain_name": "Default",
                    "os_project_domain_name": "Default",
                },
                indent=4,
            )
            + "\n",
        )
        write_private(state / "env.json", json.dumps(env, indent=2))
        logs = [
            state / "logs" / f"{n}.log"
            for n in ("proxy", "account", "container", "object", "keystone")
        ]
        wait_for("Swift proxy", lambda: healthy(env), logs)
        for name, pid in pids.items():
            if not pid_alive(pid):
                raise StartError(f"{name} exited; see {state / 'logs' / (name + '.log')}")
    except BaseException:
        stop(state)
        raise
    print(f"local-swift: started in {time.time() - started:.1f} s", file=sys.stderr)
    return env


def stop(state: Path) -> bool:
    """Stops the processes recorded in the state dir; returns True if any was recorded."""
    env = current_env(state)
    pids = env.get("pids") or {}
    stop_pids(pids)
    if (state / "env.json").exists():
        (state / "env.json").unlink()
    return bool(pids)


def serve(conf: str, server: str) -> int:
    """Runs one Swift server with the constraints of its own swift.conf."""
    import configparser

    parser = configparser.ConfigParser(interpolation=None)
    parser.read(conf)
    swift_dir = parser.get("DEFAULT", "swift_dir")
    # Swift reads [swift-constraints] at import from /etc/swift/swift.conf,
    # whatever swift_dir says; point it at ours before that import happens.
    import swift.common.utils as swift_utils

    swift_utils.SWIFT_CONF_FILE = os.path.join(swift_dir, "swift.conf")
    import swift.common.constraints  # noqa: F401  (reads the constraints now)
    from swift.common.wsgi import run_wsgi

    access_log = os.environ.get("LOCAL_SWIFT_ACCESS_LOG")
    if access_log:
        # proxy_logging passes no log_custom_handlers to its access logger;
        # Swift keeps handlers it did not add itself, so add the file here.
        import logging

        handler = logging.FileHandler(access_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logging.getLogger("proxy-access").addHandler(handler)
    return run_wsgi(conf, server) or 0


def parse_command_line(argv: list | None) -> argparse.Namespace:
    """Returns the parsed command line."""
    parser = argparse.ArgumentParser(
        prog="local-swift",
        description=__doc__,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "command",
        choices=["start", "stop", "status", "env", "_serve"],
        help="start: start (idempotent) and print the env JSON; stop: "
        "stop what start started; status: exit 0 when running and "
        "healthy; env: print the env JSON",
    )
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument(
        "--dir",
        default=None,
        help="state directory (default: $LOCAL_SWIFT_DIR or <repo>/.local-swift)",
    )
    parser.add_argument(
        "--listing-limit",
        type=int,
        default=None,
        metavar="N",
        help="container listings return at most N names per request "
        "(Swift's default: 10000), e.g. 100 to test pagination",
    )
    parser.add_argument(
        "--token-expiration",
        type=int,
        default=3600,
        metavar="SECONDS",
        help="lifetime of Keystone tokens, e.g. 60 to see them expire",
    )
    parser.add_argument(
        "--token-cache-time",
        type=int,
        default=300,
        metavar="SECONDS",
        help="how long the proxy trusts a validated token before asking "
        "Keystone again (a revoked token works until then)",
    )
    return parser.parse_args(argv)


def main(argv: list | None = None) -> int:
    """Runs one command; returns the exit code."""
    args = parse_command_line(argv)
    if args.command == "_serve":
        return serve(args.extra[0], args.extra[1])
    state = state_dir(args.dir)
    if args.command in ("start", "stop"):
        # Concurrent starts and stops of one state dir take turns.
        import fcntl

        state.mkdir(parents=True, exist_ok=True)
        lock = open(state / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        if args.command == "start":
            state.mkdir(parents=True, exist_ok=True)
            env = start(state, args)
            print(json.dumps(env, indent=2))
            return 0
        if args.command == "stop":
            if not stop(state):
                print(f"local-swift: nothing recorded as running in {state}", file=sys.stderr)
            return 0
        env = current_env(state)
        if args.command == "status":
            if env and all_alive(env) and healthy(env):
                print(
                    f"local-swift: running (proxy {env['proxy_port']}, keystone "
                    f"{env['keystone_port']}, state {state})"
                )
                return 0
            print(f"local-swift: not running (state {state})")
            return 1
        if not env.get("storage_url"):
            print(
                f"local-swift: not running (state {state}); run: scripts/local-swift start",
                file=sys.stderr,
            )
            return 1
        print(json.dumps(env, indent=2))
        return 0
    except StartError as exc:
        print(f"local-swift: error: {exc}", file=sys.stderr)
        return 1
    except subprocess.CalledProcessError as exc:
        print(f"local-swift: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
