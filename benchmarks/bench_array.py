#!/usr/bin/env python3
"""Benchmark: ``ingest --array`` on the local one-node Slurm against a single ``ingest``.

Puts a brain-like stack of PNG sections in the local Swift, then converts it
(--no-upload unless --upload) three ways, each as a user runs it: one ``ingest``
process with --jobs 2, and ``ingest --array N --wait`` with --jobs 1 (one core
per task): one task running all units (N=1) and two concurrent tasks (N=2).
Prints the time per unit, the array's overhead against the single process, the
speed-up of two concurrent tasks, that of two conversions alone (two units'
fetched sections converted at once by ``ingest_ngs``, no Swift on the cores),
and a linear projection for the full BigBrain and for 1 um sections.

With --disk it measures instead the peak size of the download and results
directories during ``ingest --array 2`` with upload, with and without --cleanup
(with it, each unit deletes its sections and the files it uploaded once done).

examples:
  benchmarks/bench_array.py                       # 1024 x 1024 x 256, 4 units
  benchmarks/bench_array.py --disk --sections 512 # 8 units: the disk each run holds
  benchmarks/bench_array.py --size 256 --sections 32 --chunk 16 --work-dir /tmp/b
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable

from swift_servers import delete_container, server_cpu_seconds, swift_connection

REPO = Path(__file__).resolve().parent.parent
BIGBRAIN = (6572, 5711, 7404)  # x, y, sections at 20 um
ONE_MICRON_SECTION = (130000, 110000)
SWIFT_SERVERS = ("proxy", "object", "container", "account")


def running(script: str, state: Path) -> bool:
    """Returns True when scripts/local-<script> already runs in ``state``."""
    command = [sys.executable, str(REPO / "scripts" / f"local_{script}.py"), "status"]
    return subprocess.run(command + ["--dir", str(state)], capture_output=True).returncode == 0


def start(script: str, state: Path) -> dict:
    """Starts scripts/local-<script> in ``state`` (or finds it running); returns its env."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / f"local_{script}.py"),
            "start",
            "--dir",
            str(state),
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"local {script} did not start: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def attach(script: str, state: Path) -> dict:
    """Returns the env of the caller's running scripts/local-<script>, never (re)starting it."""
    command = [sys.executable, str(REPO / "scripts" / f"local_{script}.py"), "env"]
    done = subprocess.run(command + ["--dir", str(state)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"no local {script} runs in {state}: {done.stderr[-2000:]}")
    return json.loads(done.stdout)


def stop(script: str, state: Path) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / f"local_{script}.py"), "stop", "--dir", str(state)],
        capture_output=True,
    )


def brain_sections(size: int, count: int) -> dict[str, bytes]:
    """Returns PNG sections s1..sN of a smooth brain-like uint8 volume."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    sections = {}
    for z in range(count):
        depth = (2 * z / max(1, count - 1) - 1) ** 2
        brain = np.clip(1.2 - (x**2 + y**2 + 0.5 * depth), 0, 1)
        texture = rng.integers(0, 40, size=brain.shape)
        plane = np.where(brain > 0, 60 + 150 * brain + texture, 0).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(plane).save(buffer, format="PNG")
        sections[f"stack/s{z + 1}.png"] = buffer.getvalue()
    return sections


def put_source(swift: dict, objects: dict[str, bytes]) -> str:
    """Uploads the sections to a new public container; returns its URL."""
    connection = swift_connection(swift)
    name = f"bench-array-{uuid.uuid4().hex[:8]}"
    connection.put_container(name, headers={"X-Container-Read": ".r:*,.rlistings"})
    for key, data in objects.items():
        connection.put_object(name, key, data)
    connection.close()
    return f"{swift['storage_url']}/{name}"


def ingest(argv: list[str], env: dict, cwd: Path) -> float:
    """Runs ingest to completion; returns its wall-clock seconds."""
    os.sync()  # the previous run's files are on disk: no writeback during this one
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hbp_image_tasks.ingest", *argv, "-q"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"ingest {' '.join(argv[-6:])} failed:\n{done.stderr[-3000:]}")
    return time.monotonic() - started


def convert(directories: list[Path], parameters: dict, env: dict, out: Path) -> float:
    """Runs one ``ingest_ngs --jobs 1`` per directory of sections, all at once;
    returns the wall-clock seconds until the last one ends."""

    def command(directory: Path) -> list[str]:
        # A destination of its own per round: ingest_ngs would resume, not redo,
        # a conversion whose output the round before left there.
        destination = out / f"{directory.name}-{len(directories)}"
        return [
            sys.executable, "-m", "hbp_image_tasks.ingest_ngs", str(directory),
            "--destination", str(destination), "--parameters", json.dumps(parameters),
            "--jobs", "1", "--no-progress", "-q",
        ]  # fmt: skip

    os.sync()
    started = time.monotonic()
    processes = [
        subprocess.Popen(command(directory), env=env, stdout=subprocess.DEVNULL)
        for directory in directories
    ]
    if any([process.wait() != 0 for process in processes]):  # waits for every one
        raise SystemExit(f"ingest_ngs of {directories} failed")
    return time.monotonic() - started


def conversion_scaling(sections: Path, parameters: dict, env: dict, out: Path) -> float:
    """Converts two units' fetched sections one after the other, then both at once (no
    fetch, no Swift): returns the throughput of two at once over one (2.0: no
    contention). Both ways convert the same sections: units of a brain differ in
    their content, and so in their time."""
    first, second = sorted(sections.glob("sections-*"))[:2]
    one_by_one = convert([first], parameters, env, out) + convert([second], parameters, env, out)
    both = convert([first, second], parameters, env, out)
    shutil.rmtree(out, ignore_errors=True)
    return one_by_one / both


def plan_summary(results: Path) -> str:
    """Returns what an array run's plan cut the stack into."""
    plan = json.loads((results / ".hbp-array" / "plan.json").read_text())["plan"]
    depths = sorted({u["stop"][2] - u["start"][2] for u in plan["units"]})
    return (
        f"{len(plan['units'])} units of {'/'.join(map(str, depths))} sections "
        f"building scales 0-{plan['top_scale']}, the finishing job "
        f"{plan['top_scale'] + 1}-{plan['scale_count'] - 1}"
    )


def busiest_task_seconds(results: Path) -> float:
    """Returns the unit seconds of an array run's busiest task: its wall time less
    its interpreter's start, the scheduling and the finishing job."""
    submission = max((results / ".hbp-array").glob("submission-*.json"))
    seconds = {record["id"]: record["seconds"] for record in unit_records(results)}
    tasks = json.loads(submission.read_text())["tasks"]
    return max(sum(seconds[unit] for unit in task) for task in tasks)


def unit_records(results: Path) -> list[dict]:
    """Returns the records of an array run's units (seconds, and seconds per phase)."""
    records = sorted((results / ".hbp-array" / "units").glob("*.json"))
    return [json.loads(p.read_text()) for p in records]


def phase_summary(records: list[dict]) -> str:
    """Returns the mean seconds of a unit and of its fetch, convert and upload."""
    mean = sum(record["seconds"] for record in records) / len(records)
    phases = {
        name: sum(record["phases"][name] for record in records) / len(records)
        for name in ("fetch", "convert", "upload")
    }
    return f"{mean:.1f} s (" + ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()) + ")"


def duration(seconds: float) -> str:
    if seconds >= 86400:
        return f"{seconds / 86400:.1f} d"
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds:.0f} s"


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1024, help="section width and height")
    parser.add_argument("--sections", type=int, default=256, help="number of sections")
    parser.add_argument("--chunk", type=int, default=64, help="chunk_size (a unit: its z grid)")
    parser.add_argument("--upload", action="store_true", help="also upload (default: --no-upload)")
    parser.add_argument(
        "--disk",
        action="store_true",
        help="measure the peak disk of --array 2 with and without --cleanup instead",
    )
    parser.add_argument(
        "--nodes", type=int, nargs="+", default=[1, 10, 100], help="node counts to project to"
    )
    parser.add_argument("--cores-per-node", type=int, default=128, help="cores of one node")
    parser.add_argument("--work-dir", type=Path, default=None, help="kept when given")
    parser.add_argument(
        "--swift-dir", type=Path, default=None, help="state dir of a local Swift to use"
    )
    parser.add_argument(
        "--slurm-dir", type=Path, default=None, help="state dir of a local Slurm to use"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_command_line(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="bench-array-"))
    work.mkdir(parents=True, exist_ok=True)
    states = {
        "swift": args.swift_dir or work / "local-swift",
        "slurm": args.slurm_dir or work / "local-slurm",
    }
    # Servers named by --swift-dir/--slurm-dir belong to the caller and are never
    # stopped here, even when a busy machine makes their health check time out.
    given = {"swift": args.swift_dir, "slurm": args.slurm_dir}
    ours = [name for name, state in states.items() if not given[name] and not running(name, state)]
    try:
        swift, slurm = (
            attach(name, state) if given[name] else start(name, state)
            for name, state in states.items()
        )
        return run_benchmark(args, work, swift, slurm)
    finally:
        for name in ours:  # stops only what this run started
            stop(name, states[name])
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def run_benchmark(args: argparse.Namespace, work: Path, swift: dict, slurm: dict) -> int:
    made: list[str] = []
    try:
        return measure(args, work, swift, slurm, made)
    finally:
        for name in made:
            delete_container(swift, name)


def measure(args, work: Path, swift: dict, slurm: dict, made: list[str]) -> int:
    source = put_source(swift, brain_sections(args.size, args.sections))
    made.append(source.rsplit("/", 1)[1])
    # Every job is a new interpreter: start it from bytecode, as after a pip install
    # (a source tree run with PYTHONDONTWRITEBYTECODE compiles the package each time).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "hbp_image_tasks")])
    env = {
        **os.environ,
        "SLURM_CONF": slurm["slurm_conf"],
        "SWIFT_SETTINGS": swift["settings_file"],
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    parameters = {"chunk_size": args.chunk, "voxel_size": [20, 20, 20], "voxel_unit": "um"}

    def argv(name: str, *extra: str) -> list[str]:
        target = ["--container", f"bench-{name}-{uuid.uuid4().hex[:6]}"]
        made.append(target[1])
        return [
            "--source", source, "--stacks", "--filter", r"stack/s\d+\.png",
            "--download-dir", str(work / name / "source"),
            "--results-dir", str(work / name / "results"),
            "--parameters", json.dumps(parameters),
            *(target if args.upload or args.disk else ["--no-upload"]), *extra,
        ]  # fmt: skip

    if args.disk:
        return measure_disk(args, work, env, argv)

    runs = {
        "single ingest --jobs 2": ("single", "--jobs", "2"),
        "array, 1 task": ("array1", "--jobs", "1", "--array", "1", "--wait"),
        "array, 2 concurrent tasks": ("array2", "--jobs", "1", "--array", "2", "--wait"),
    }
    # The local Swift serves the fetches from the same cores: its CPU seconds during
    # a run are cores the run's own work did not get (a production Swift has its own).
    walls, swift_cpu = {}, {}
    for label, (name, *extra) in runs.items():
        before = server_cpu_seconds(swift, SWIFT_SERVERS)
        walls[label] = ingest(argv(name, *extra), env, work)
        swift_cpu[label] = server_cpu_seconds(swift, SWIFT_SERVERS) - before
    # The array's ceiling without the object store on the same cores: the
    # conversion of two units' sections by two processes at once against one.
    scaling = conversion_scaling(work / "array2" / "source", parameters, env, work / "scaling")
    tasks_alone = busiest_task_seconds(work / "array1" / "results") / busiest_task_seconds(
        work / "array2" / "results"
    )
    results = work / "array1" / "results"
    per_unit = [record["seconds"] for record in unit_records(results)]
    finishing = json.loads((results / ".hbp-ingest-report.json").read_text())["array"]
    voxels = args.size * args.size * args.sections
    for name in ("array1", "array2"):
        print(f"plan of {name}: {plan_summary(work / name / 'results')}")
        print(f"  a unit of {name}: {phase_summary(unit_records(work / name / 'results'))}")
    times = {"walls": walls, "swift_cpu": swift_cpu, "per_unit": per_unit}
    report(args, times, finishing["finishing_seconds"], voxels, scaling, tasks_alone)
    (work / "results.json").write_text(
        json.dumps(
            {
                "walls": walls,
                "swift_cpu": swift_cpu,
                "units": per_unit,
                "finishing": finishing,
                "scaling": scaling,
                "tasks_alone": tasks_alone,
            },
            indent=1,
        )
    )
    return 0


def tree_bytes(*roots: Path) -> int:
    """Returns the bytes the files under ``roots`` take on disk (sparse files count less)."""
    total = 0
    for root in roots:
        for directory, _, files in os.walk(root):
            for name in files:
                try:
                    total += os.lstat(os.path.join(directory, name)).st_blocks * 512
                except FileNotFoundError:  # deleted while walking
                    pass
    return total


def peak_disk(argv: list[str], env: dict, cwd: Path, roots: list[Path]) -> tuple[int, float]:
    """Runs ingest, sampling the size of ``roots`` every 0.1 s and once at the end;
    returns the largest and the wall-clock seconds."""
    peak, done = [0], threading.Event()

    def sample() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], tree_bytes(*roots))

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        seconds = ingest(argv, env, cwd)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], tree_bytes(*roots)), seconds


def measure_disk(args, work: Path, env: dict, argv: Callable[..., list[str]]) -> int:
    """Prints the peak disk of ``ingest --array 2`` with upload, without and with --cleanup."""
    runs = {"without --cleanup": ("keep",), "with --cleanup": ("cleanup", "--cleanup")}
    peaks, walls = {}, {}
    for label, (name, *extra) in runs.items():
        # Units one chunk deep: the most units, hence the least of the stack at once.
        units = ["--sections-per-unit", str(args.chunk)]
        command = argv(name, "--jobs", "1", "--array", "2", *units, "--wait", *extra)
        roots = [work / name / "source", work / name / "results"]
        peaks[label], walls[label] = peak_disk(command, env, work, roots)
    kept, cleaned = peaks.values()
    for label in runs:
        print(f"  {label:18s} peak {peaks[label] / 2**20:8.1f} MiB on disk, {walls[label]:.1f} s")
    stack, dataset = tree_bytes(work / "keep" / "source"), tree_bytes(work / "keep" / "results")
    print(f"the whole stack {stack / 2**20:.1f} MiB, the dataset {dataset / 2**20:.1f} MiB")
    print(f"peak disk, without / with --cleanup: {kept / max(cleaned, 1):.2f}x")
    (work / "results.json").write_text(json.dumps({"disk": peaks, "walls": walls}, indent=1))
    return 0


def report(
    args, times: dict, finishing: float, voxels: int, scaling: float, tasks_alone: float
) -> None:
    """Prints the measurements (``times``: the runs' walls, the local Swift's CPU
    seconds during each, array1's unit seconds), the ratios and the projection."""
    walls, swift_cpu, per_unit = times["walls"], times["swift_cpu"], times["per_unit"]
    single, one, two = walls.values()
    print(f"stack: {args.sections} sections of {args.size} x {args.size}")
    for name, seconds in walls.items():
        print(f"  {name:28s} {seconds:7.1f} s  (local Swift servers: {swift_cpu[name]:.1f} CPU s)")
    mean = sum(per_unit) / len(per_unit)
    print(f"time per unit of array1 (1 core, fetch + convert): {mean:.1f} s, {len(per_unit)} units")
    fixed = max(0.0, one - sum(per_unit) - finishing)
    print(
        f"array overhead: {fixed:.1f} s per run (submission, scheduling, job start), "
        f"finishing job {finishing:.1f} s"
    )
    print(f"array (2 tasks) / single ingest (2 cores): {two / single:.2f} (target <= 1.15)")
    print(f"2 concurrent tasks vs 1: {one / two:.2f}x (target >= 1.7x)")
    print(
        f"  the busiest task's units (no job start, no finishing job), 2 vs 1: {tasks_alone:.2f}x"
    )
    print(f"  the conversion alone (fetched sections, no Swift), 2 processes vs 1: {scaling:.2f}x")
    unit_cost, finish_cost = sum(per_unit) / voxels, finishing / voxels
    bigbrain = BIGBRAIN[0] * BIGBRAIN[1] * BIGBRAIN[2]
    section = ONE_MICRON_SECTION[0] * ONE_MICRON_SECTION[1]
    print(
        "projection (linear in voxels from this machine's one-core times; units spread "
        f"over all cores, the finishing job on one node; {args.cores_per_node} cores a node):"
    )
    for nodes in args.nodes:
        cores = nodes * args.cores_per_node
        whole, one_section, full_1um = (
            duration(count * unit_cost / cores + count * finish_cost / args.cores_per_node + fixed)
            for count in (bigbrain, section, section * BIGBRAIN[2])
        )
        print(
            f"  {nodes:4d} node(s): BigBrain 20 um {whole}; 1 um: one section "
            f"{one_section}, {BIGBRAIN[2]} sections {full_1um}"
        )


if __name__ == "__main__":
    sys.exit(main())
