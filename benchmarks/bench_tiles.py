"""Benchmark: a conversion bounded by --memory-limit (x-y tiles) against the single pass.

Generates brain-like 8-bit sections as tiled, deflated TIFF (or, with --format
png, as PNG, read block of rows by block of rows): a large stack whose
single-pass slab exceeds the limit, and a reference stack that fits. In the same
run it converts the reference in one pass and in tiles (checking that both write
the same bytes), then the large stack within the limit, and prints wall time, CPU
time, peak RSS and the speed per voxel of each against the single pass, and the
interpreter's own base RSS (imports only).

    python benchmarks/bench_tiles.py --quick       # seconds
    python benchmarks/bench_tiles.py --size 16384 --sections 64 --limit 1G   # 16 GiB slab
    python benchmarks/bench_tiles.py --format png --size 8192 --sections 64 --limit 512M
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import tifffile

BIN = Path(sys.executable).parent
# Runs a command in a fresh process (so RUSAGE_CHILDREN is that command's alone),
# its stderr into a log file; prints wall, CPU and peak RSS as JSON.
WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
with open(sys.argv[1], "wb") as log:
    code = subprocess.run(sys.argv[2:], stdout=subprocess.DEVNULL, stderr=log).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "wall": time.monotonic() - start,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mb": usage.ru_maxrss / 1024}))
"""


def measure(command: list, log: Path) -> dict:
    """Runs ``command``; returns its wall, CPU and peak RSS, or exits with its log's end."""
    output = subprocess.run(
        [sys.executable, "-c", WRAPPER, str(log)] + command,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result = json.loads(output)
    if result["code"] != 0:
        tail = log.read_text(errors="replace").splitlines()[-5:]
        raise SystemExit(f"failed ({result['code']}): {' '.join(command)}\n" + "\n".join(tail))
    log.unlink()
    return result


IMPORTS = (
    "import hbp_image_tasks.ingest_ngs, hbp_image_tasks.unit_conversion, imagecodecs, "
    "tifffile, PIL.Image, neuroglancer_scripts.chunk_encoding, isal, zlib_ng"
)


def brain_plane(z: int, depth: int, size: int, noise: np.ndarray) -> np.ndarray:
    """Returns a size x size uint8 section: a smooth head-like blob over a zero
    background, at 1/16 resolution upsampled, with faint noise."""
    low = max(size // 16, 1)
    axis = np.linspace(-1, 1, low, dtype=np.float32)
    zz = (2 * z / max(depth - 1, 1) - 1) * 0.8
    radius = np.sqrt(axis[:, None] ** 2 + axis[None, :] ** 2 + zz**2)
    small = np.clip(1.05 - radius, 0, 1) * 200 + 20 * np.cos(9 * axis)[None, :] ** 2
    small[radius > 0.95] = 0
    plane = np.repeat(np.repeat(small.astype(np.uint8), size // low, 0), size // low, 1)
    repeats = size // noise.shape[0]
    plane += np.tile(noise, (repeats, repeats)) * (plane > 0)
    return plane


def write_stack(directory: Path, size: int, sections: int, tile: int, fmt: str = "tiff") -> None:
    """Writes ``sections`` sections of size x size: tiled TIFF (deflate level 1) or
    PNG (Pillow's default level and filters)."""
    directory.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 8, (min(size, 1024),) * 2, dtype=np.uint8)
    for z in range(sections):
        path = directory / f"s{z:04d}.{'png' if fmt == 'png' else 'tif'}"
        if path.is_file():
            continue  # kept from an earlier run (--keep-input)
        plane = brain_plane(z, sections, size, noise)
        if fmt == "png":
            from PIL import Image

            Image.fromarray(plane).save(path)
            continue
        tifffile.imwrite(
            path,
            plane,
            tile=(tile, tile),
            compression="zlib",
            compressionargs={"level": 1},
            maxworkers=2,
        )


def convert(stack: Path, out: Path, limit: str, jobs: int) -> dict:
    """Runs ingest_ngs with a memory limit in a fresh process; returns its measures."""
    params = '{"voxel_size": [1, 1, 1], "voxel_unit": "um"}'
    command = [str(BIN / "ingest_ngs"), str(stack), "-d", str(out), "--parameters", params]
    log = out.parent / f"{out.name}.log"
    result = measure(command + ["--jobs", str(jobs), "--memory-limit", limit, "-q"], log)
    info = json.loads((out / "info").read_text())
    result["voxels"] = int(np.prod(info["scales"][0]["size"]))
    result["mvoxel_per_s"] = result["voxels"] / result["wall"] / 1e6
    return result


def same_files(one: Path, other: Path) -> bool:
    """Returns whether two outputs hold the same files with the same bytes (the tools'
    dotfiles, which record timings, aside)."""

    def names(root: Path) -> list:
        return sorted(
            p.relative_to(root) for p in root.rglob("*") if p.is_file() and p.name[0] != "."
        )

    if names(one) != names(other):
        return False
    return all(filecmp.cmp(one / n, other / n, shallow=False) for n in names(one))


def tiling_limit(size: int, sections: int, jobs: int, rows: bool) -> int:
    """Returns a memory limit that cuts a size x size stack into several x-y tiles
    (sections read by rows: PNG)."""
    from hbp_image_tasks import pyramid, units

    info = pyramid.build_info(
        "uint8", 1, (size, size, sections), (1e3,) * 3, (0, 0, 0), "image", "raw", 64, None
    )
    limit = units.single_pass_memory(info, jobs) // 4
    while True:
        try:
            plan = units.plan_units(info, limit, jobs, bands=rows)
        except Exception:
            limit = limit * 5 // 4
            continue
        if len(plan.units) > 1:
            return limit
        limit = limit * 3 // 4


def parse_size(text: str) -> int:
    from hbp_image_tasks.memory import parse_size as parse

    return parse(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=16384, help="large sections' edge")
    parser.add_argument("--sections", type=int, default=64, help="sections per stack")
    parser.add_argument("--reference-size", type=int, default=4096, help="edge that fits")
    parser.add_argument("--limit", default="1G", help="--memory-limit of the large stack")
    parser.add_argument("--jobs", type=int, default=2, help="ingest_ngs --jobs")
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile edge")
    parser.add_argument("--format", choices=("tiff", "png"), default="tiff", help="sections")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    parser.add_argument(
        "--keep-input", action="store_true", help="keep the stacks for the next run (same sizes)"
    )
    parser.add_argument("--quick", action="store_true", help="1024 / 256 pixels, 16 sections")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.reference_size, args.sections, args.limit = 1024, 256, 16, "24M"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-tiles-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows = run(args, work)
    finally:
        kept = ("large", "reference") if args.keep_input else ()
        for name in ("large", "reference", "one-pass", "tiled-reference", "tiled-large"):
            if name in kept:
                continue
            shutil.rmtree(work / name, ignore_errors=True)
    (work / "results.json").write_text(json.dumps(rows, indent=2))
    return 0


def run(args, work: Path) -> dict:
    write_stack(
        work / "reference", args.reference_size, args.sections, min(args.tile, 256), args.format
    )
    write_stack(work / "large", args.size, args.sections, args.tile, args.format)
    base = measure([sys.executable, "-c", IMPORTS], work / "imports.log")["rss_mb"]
    tiling = tiling_limit(args.reference_size, args.sections, args.jobs, args.format == "png")
    rows = {
        "base_rss_mb": base,
        "one-pass": convert(work / "reference", work / "one-pass", "64G", args.jobs),
        # The reference again, with a limit that forces tiles: a same-data speed ratio.
        "tiled-reference": convert(
            work / "reference", work / "tiled-reference", f"{tiling >> 10}K", args.jobs
        ),
    }
    rows["identical"] = same_files(work / "one-pass", work / "tiled-reference")
    shutil.rmtree(work / "one-pass")
    rows["tiled-large"] = convert(work / "large", work / "tiled-large", args.limit, args.jobs)
    limit_mb = parse_size(args.limit) / (1 << 20)
    print(
        f"{args.format} sections; interpreter base RSS (imports only): {base:.0f} MB; "
        f"--jobs {args.jobs}"
    )
    print("| run | voxels | wall | CPU | peak RSS | Mvoxel/s | speed / one pass |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    one = rows["one-pass"]["mvoxel_per_s"]
    for name in ("one-pass", "tiled-reference", "tiled-large"):
        row = rows[name]
        print(
            f"| {name} | {row['voxels']:,} | {row['wall']:.1f} s | {row['cpu']:.1f} s | "
            f"{row['rss_mb']:.0f} MB | {row['mvoxel_per_s']:.1f} | "
            f"{row['mvoxel_per_s'] / one:.2f} |"
        )
    large = rows["tiled-large"]
    print(
        f"tiled and one-pass outputs of the reference: "
        f"{'identical bytes' if rows['identical'] else 'DIFFERENT'}"
    )
    print(
        f"large stack: peak RSS {large['rss_mb']:.0f} MB against the limit {limit_mb:.0f} MB "
        f"+ base {base:.0f} MB = {limit_mb + base:.0f} MB "
        f"({'within' if large['rss_mb'] <= limit_mb + base else 'ABOVE'})"
    )
    return rows


if __name__ == "__main__":
    sys.exit(main())
