#!/usr/bin/env python3
"""Benchmark: `fetch_input --stacks` against `swift download` on the same container.

Starts (or reuses) the local Swift of scripts/local-swift, fills a public
container once with OBJECTS objects of SIZE bytes, then downloads it
alternately with python-swiftclient's CLI (default 10 object threads, MD5
checked) and with fetch_input (MD5 checked), each into a fresh directory, and
prints the median times and their ratio. With --private, fetch_input also
reads the container with the test user's credentials (--settings, a Keystone v3
login and token per run), and the CPU seconds the local Keystone spent per run
are printed for each command. Not a test: run it by hand:

  python benchmarks/bench_fetch.py --objects 600 --size 262144 --repeat 3
  python benchmarks/bench_fetch.py --objects 128 --size 2500000 --private
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from swift_servers import (
    add_swift_options,
    keystone_cpu_seconds,
    keystone_session,
    swift_of_options,
)

BIN = Path(sys.executable).parent


def fill_container(env: dict, name: str, count: int, size: int) -> tuple[str, str]:
    """Creates the public container once; returns (token, its URL)."""
    import swiftclient

    keystone = keystone_session(env)
    connection = swiftclient.Connection(session=keystone)
    try:
        existing = int(connection.head_container(name).get("x-object-count", -1))
    except swiftclient.ClientException:
        existing = -1
    if existing != count:
        connection.put_container(name, headers={"X-Container-Read": ".r:*,.rlistings"})
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            for index in range(count):
                data = os.urandom(size)
                info = tarfile.TarInfo(f"stack/section_{index:05d}.tif")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        connection.put_object(
            name,
            "",
            buffer.getvalue(),
            query_string="extract-archive=tar",
            headers={"Accept": "application/json"},
        )
    return keystone.get_token(), f"{env['storage_url']}/{name}"


def timed(argv: list[str], cwd: Path) -> float:
    """Runs ``argv`` in ``cwd``; returns its wall time in seconds."""
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--objects", type=int, default=600)
    parser.add_argument("--size", type=int, default=256 * 1024, help="bytes per object")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--jobs", type=int, default=None, help="fetch_input --jobs (default: its own default)"
    )
    parser.add_argument(
        "--private",
        action="store_true",
        help="also run fetch_input --settings (reading with the test user's credentials)",
    )
    add_swift_options(parser)
    args = parser.parse_args(argv)

    env = swift_of_options(args)
    container = f"bench-fetch-{args.objects}x{args.size}"
    token, url = fill_container(env, container, args.objects, args.size)
    swift = [
        str(BIN / "swift"),
        "--os-auth-token",
        token,
        "--os-storage-url",
        env["storage_url"],
        "download",
        container,
    ]
    fetch = [str(BIN / "fetch_input"), "--stacks", "-q", "--destination", "."]
    fetch += ["--jobs", str(args.jobs)] if args.jobs else []
    fetch.append(url)
    commands = {"swift download": swift, "fetch_input": fetch}
    if args.private:
        commands["fetch_input --settings"] = fetch[:-1] + ["--settings", env["settings_file"], url]
    times: dict[str, list[float]] = {label: [] for label in commands}
    keystone: dict[str, list[float]] = {label: [] for label in commands}
    with tempfile.TemporaryDirectory(prefix="bench-fetch-") as scratch:
        for run in range(args.repeat):
            for index, (label, command) in enumerate(commands.items()):
                target = Path(scratch) / f"{index}-{run}"
                target.mkdir()
                before = keystone_cpu_seconds(env)
                times[label].append(timed(command, target))
                keystone[label].append(keystone_cpu_seconds(env) - before)
                files = [p for p in target.rglob("*.tif") if p.is_file()]
                assert len(files) == args.objects, (label, len(files))
                shutil.rmtree(target)
    total = args.objects * args.size
    print(f"{args.objects} objects x {args.size} bytes = {total / 2**20:.1f} MiB from {url}")
    medians = {label: statistics.median(values) for label, values in times.items()}
    for label, values in times.items():
        print(
            f"  {label:22s} median {medians[label]:6.2f} s "
            f"({total / 2**20 / medians[label]:6.1f} MiB/s; runs "
            + ", ".join(f"{v:.2f}" for v in values)
            + ")"
        )
        if args.private:
            print(f"  {'':22s} Keystone CPU per run {statistics.median(keystone[label]):.2f} s")
    ratio = medians["swift download"] / medians["fetch_input"]
    print(
        f"  speed ratio fetch_input / swift download: {ratio:.2f}x "
        f"({'at least as fast' if ratio >= 1 else 'slower'})"
    )
    if args.private:
        private = medians["fetch_input"] / medians["fetch_input --settings"]
        print(f"  speed ratio fetch_input --settings / fetch_input anonymous: {private:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
