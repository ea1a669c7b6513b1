#!/usr/bin/env python3
"""Benchmark: `ingest` publishing a BigBrain-shaped stack unsharded and sharded.

Writes SECTIONS brain-like 8-bit PNG sections of 6572 x 5711 pixels (BigBrain's
section size at 20 um) once into a public container of the local Swift
(scripts/local-swift), then runs `ingest --stacks` from that container to a new
container twice in the same run, with `"sharding": false` and `"sharding": true`,
and prints per step (fetch, convert, upload) the seconds, the objects and bytes
published, the ratios, the peak RSS of the ingest process, and a projection of
both to BigBrain's 7404 sections (objects counted from the full pyramid's
plan, seconds and bytes scaled by the number of sections).

    python benchmarks/bench_publish.py --sections 8 --workdir /tmp/bench-publish
    python benchmarks/bench_publish.py                    # 128 sections, ~10 GB of disk
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from swift_servers import delete_container, start_swift, swift_connection

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]
BIGBRAIN = (6572, 5711, 7404)  # section width, height, sections
PARAMETERS = {"voxel_size": [20, 20, 20], "voxel_unit": "um"}


def section(brain, z: int, width: int, height: int) -> bytes:
    """Returns section z as an 8-bit PNG of width x height."""
    import io

    plane = brain.plane(z)  # square: cut to the section's shape
    image = Image.fromarray((plane[:height, :width] * 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def fill_source(env: dict, container: str, sections: int, width: int, height: int) -> str:
    """Puts the stack into a public container once; returns the container's URL."""
    import swiftclient

    connection = swift_connection(env)
    try:
        count = int(connection.head_container(container).get("x-container-object-count", -1))
    except swiftclient.ClientException:
        count = -1
    if count != sections:
        from bench_convert import BrainLike

        connection.put_container(container, headers={"X-Container-Read": ".r:*,.rlistings"})
        brain = BrainLike(max(width, height), sections)

        def put(z: int) -> None:
            swift_connection(env).put_object(
                container, f"stack/section_{z:05d}.png", section(brain, z, width, height)
            )

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(put, range(sections)))
    return f"{env['storage_url']}/{container}"


def run_ingest(env: dict, source: str, work: Path, sharding: bool, jobs: int | None) -> dict:
    """Runs one `ingest` in a fresh process; returns its steps, objects, bytes and peak RSS."""
    label = "sharded" if sharding else "unsharded"
    container = f"bench-publish-{label}-{uuid.uuid4().hex[:8]}"
    results = work / f"results-{label}"
    command = [
        str(BIN / "ingest"),
        "--stacks",
        "--source",
        source,
        "--download-dir",
        str(work / f"download-{label}"),
        "--results-dir",
        str(results),
        "--container",
        container,
        "--settings",
        env["settings_file"],
        "--parameters",
        json.dumps({**PARAMETERS, "sharding": sharding}),
    ] + (["--jobs", str(jobs)] if jobs else [])
    from bench_convert import WRAPPER

    output = subprocess.run(
        [sys.executable, "-c", WRAPPER] + command, check=True, capture_output=True, text=True
    ).stdout
    measured = json.loads(output)
    if measured["code"] != 0:
        raise SystemExit(f"ingest ({label}) failed with exit code {measured['code']}")
    report = json.loads((results / ".hbp-ingest-report.json").read_text())
    uploaded = report["steps"]["upload"]["result"]
    row = {
        "label": label,
        "wall": measured["wall"],
        "rss_mb": measured["rss_mb"],
        "objects": uploaded["total_objects"],
        "bytes": uploaded["total_bytes"],
        "input_bytes": report["inputs"]["bytes"],
        "scales": len(report["outputs"]["scales"]),
        "chunks": report["outputs"]["chunks"],
    }
    for step in ("fetch", "convert", "upload"):
        row[step] = report["steps"][step]["seconds"]
    delete_container(env, container)
    shutil.rmtree(work / f"download-{label}")
    shutil.rmtree(results)
    return row


def full_objects(sharding: bool) -> int:
    """Returns the objects of BigBrain's whole pyramid, from the conversion's plan."""
    from hbp_image_tasks import pyramid, shards

    info = pyramid.build_info("uint8", 1, BIGBRAIN, (2e4,) * 3, (0, 0, 0), "image", "raw", 64, None)
    specs = shards.plan_sharding(info, sharding, shards.DEFAULT_SHARD_SIZE, "gzip")
    total = 1  # info
    for scale, spec in zip(info["scales"], specs):
        grid = shards.grid_shape(scale["size"], scale["chunk_sizes"][0])
        if spec is None:
            total += int(np.prod(grid))
        else:
            box = shards.box_shape(grid, spec.box_bits)
            total += int(np.prod([-(-g // b) for g, b in zip(grid, box)]))
    return total


def ratio(a: float, b: float) -> float:
    """Returns a / b, with tiny runs' zero seconds counted as a millisecond."""
    return a / max(b, 1e-3)


def print_rows(rows: list[dict], sections: int, width: int, height: int) -> None:
    plain, sharded = rows
    print(f"{sections} sections of {width} x {height}, {plain['input_bytes'] / 1e9:.2f} GB input")
    print(
        f"{'':10s} {'fetch s':>8s} {'convert s':>10s} {'upload s':>9s} {'total s':>8s} "
        f"{'objects':>8s} {'bytes':>14s} {'peak RSS':>9s}"
    )
    for row in rows:
        print(
            f"{row['label']:10s} {row['fetch']:8.1f} {row['convert']:10.1f} {row['upload']:9.1f} "
            f"{row['wall']:8.1f} {row['objects']:8d} {row['bytes']:14d} {row['rss_mb']:6.0f} MB"
        )
    print(
        f"ratios unsharded / sharded: objects {ratio(plain['objects'], sharded['objects']):.0f}x, "
        f"upload {ratio(plain['upload'], sharded['upload']):.1f}x, "
        f"convert {ratio(plain['convert'], sharded['convert']):.2f}x, "
        f"bytes {ratio(plain['bytes'], sharded['bytes']):.4f}"
    )
    for row in rows:
        print(
            f"{row['label']}: whole ingest / its conversion step "
            f"{ratio(row['wall'], row['convert']):.2f}x"
        )
    scale = BIGBRAIN[0] * BIGBRAIN[1] * BIGBRAIN[2] / (width * height * sections)
    print(
        f"projection to BigBrain, {BIGBRAIN[2]} sections of {BIGBRAIN[0]} x {BIGBRAIN[1]} "
        f"(x{scale:.1f}; objects from the plan):"
    )
    for row, sharding in zip(rows, (False, True)):
        print(
            f"  {row['label']:10s} {full_objects(sharding):8d} objects, "
            f"{row['bytes'] * scale / 1e9:7.1f} GB, fetch {row['fetch'] * scale / 60:5.0f} min, "
            f"convert {row['convert'] * scale / 60:5.0f} min, "
            f"upload {row['upload'] * scale / 60:5.0f} min"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sections", type=int, default=128, help="sections in the stack")
    parser.add_argument(
        "--size",
        default="6572x5711",
        help="section WIDTHxHEIGHT (default: BigBrain's at 20 um)",
    )
    parser.add_argument("--jobs", type=int, default=None, help="ingest --jobs (default: its own)")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)"
    )
    parser.add_argument(
        "--state",
        default=str(REPO / ".local-swift" / "bench"),
        help="local-swift state directory (a running one is reused)",
    )
    parser.add_argument(
        "--swift-env",
        type=Path,
        default=None,
        help="env JSON of a running local Swift (scripts/local-swift env) instead of --state",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    env = json.loads(args.swift_env.read_text()) if args.swift_env else start_swift(args.state)
    width, height = (int(n) for n in args.size.lower().split("x"))
    source = fill_source(
        env, f"bench-publish-source-{args.sections}x{width}x{height}", args.sections, width, height
    )
    scratch = None
    if args.workdir is None:
        scratch = tempfile.TemporaryDirectory(prefix="bench-publish-")
        args.workdir = Path(scratch.name)
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        rows = [run_ingest(env, source, args.workdir, s, args.jobs) for s in (False, True)]
    finally:
        if scratch is not None:
            scratch.cleanup()
    print_rows(rows, args.sections, width, height)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
