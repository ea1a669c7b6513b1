"""The local Swift of scripts/local-swift as the benchmarks use it: started (or
reused) in a state directory, and sessions of its test user."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _local_swift_env(verb: str, state: str | Path, failure: str) -> dict:
    """Runs ``scripts/local-swift VERB --dir STATE``; returns its env JSON, or exits
    with ``failure`` and the script's error."""
    done = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "local_swift.py"), verb, "--dir", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"{failure}:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def start_swift(state: str | Path) -> dict:
    """Starts (or reuses) the local Swift in ``state``; returns its env JSON."""
    return _local_swift_env("start", state, "scripts/local-swift start failed")


def attach_swift(state: str | Path) -> dict:
    """Returns the env JSON of the local Swift running in ``state``, never (re)starting
    it (a start with other options would restart it on new ports)."""
    return _local_swift_env("env", state, f"no local Swift runs in {state}")


def add_swift_options(parser) -> None:
    """Adds --state (where to start the local Swift, or reuse the one running there)
    and --swift-dir (a running local Swift to use as it is) to an argparse parser."""
    parser.add_argument(
        "--state", default=str(REPO / ".local-swift" / "bench"), help="local-swift state directory"
    )
    parser.add_argument(
        "--swift-dir",
        default=None,
        help="state directory of a running local Swift to use as it is (instead of --state)",
    )


def swift_of_options(args) -> dict:
    """Returns the env JSON of the local Swift that :func:`add_swift_options` chose."""
    return attach_swift(args.swift_dir) if args.swift_dir else start_swift(args.state)


def stop_swift(state: str | Path) -> None:
    """Stops the local Swift that ``start_swift`` started in ``state``."""
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "local_swift.py"), "stop", "--dir", str(state)],
        capture_output=True,
        check=False,
    )


def server_cpu_seconds(env: dict, names: tuple[str, ...]) -> float:
    """Returns the CPU seconds the local servers ``names`` (keys of the env's pids: their
    processes and these processes' children) have used."""
    total = 0.0
    for name in names:
        master = env["pids"][name]
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        for pid in [master, *map(int, children)]:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (clock ticks)
    return total / os.sysconf("SC_CLK_TCK")


def keystone_cpu_seconds(env: dict) -> float:
    """Returns the CPU seconds the local Keystone (gunicorn and its workers) has used."""
    return server_cpu_seconds(env, ("keystone",))


def keystone_session(env: dict):
    """Returns a keystoneauth1 session of the local Swift's test user."""
    from keystoneauth1 import session
    from keystoneauth1.identity import v3

    auth = v3.Password(
        auth_url=env["auth_url"],
        username=env["username"],
        password=env["password"],
        project_id=env["project_id"],
        user_domain_name="Default",
    )
    return session.Session(auth=auth)


def swift_connection(env: dict):
    """Returns a python-swiftclient connection of the local Swift's test user."""
    import swiftclient

    return swiftclient.Connection(session=keystone_session(env))


def delete_container(env: dict, container: str) -> None:
    """Deletes a container, its segments container and their objects (bulk deletes);
    a container that is not there (never made) is skipped."""
    from urllib.parse import quote

    import swiftclient

    connection = swift_connection(env)
    for name in (container, f"{container}_segments"):
        try:
            _, objects = connection.get_container(name, full_listing=True)
        except swiftclient.ClientException as exc:
            if exc.http_status == 404:
                continue
            raise
        paths = [f"/{quote(name)}/{quote(o['name'])}" for o in objects] + [f"/{quote(name)}"]
        for start in range(0, len(paths), 1000):
            connection.post_account(
                headers={"Content-Type": "text/plain", "Accept": "application/json"},
                data="\n".join(paths[start : start + 1000]),
                query_string="bulk-delete",
            )
    connection.close()
