"""Benchmark: ingest_ngs against the plain neuroglancer-scripts sequence on the same stacks.

Generates 2048x2048 stacks (noisy synthetic and brain-like; 8-bit PNG and
16-bit TIFF), runs generate-scales-info + slices-to-precomputed --flat +
compute-scales --flat and then ingest_ngs, checks that every scale decodes to
identical voxels, and prints wall time, CPU time, peak RSS and output bytes
of both with their ratios (measured in the same run).

    python benchmarks/bench_convert.py --quick            # about a minute
    python benchmarks/bench_convert.py --sections 64 256 --kinds noise brain --repeat 3
    python benchmarks/bench_convert.py --sections 256 --jobs 1 2 4 8 16   # scaling
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Returns a console script: beside this interpreter, else the first on PATH."""
    beside = BIN / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found beside {sys.executable} nor on PATH")
    return found


WRAPPER = r"""
import json, resource, subprocess, sys, time
start = time.monotonic()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL,
                      stderr=subprocess.DEVNULL).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({"code": code, "wall": time.monotonic() - start,
                  "cpu": usage.ru_utime + usage.ru_stime,
                  "rss_mb": usage.ru_maxrss / 1024}))
"""


def measure(command: list, env: dict | None = None) -> dict:
    """Runs one command in a fresh wrapper process; returns wall, CPU and peak RSS."""
    output = subprocess.run(
        [sys.executable, "-c", WRAPPER] + command,
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout
    result = json.loads(output)
    if result["code"] != 0:
        raise SystemExit(f"failed ({result['code']}): {' '.join(command)}")
    return result


# ------------------------------------------------------------------ inputs


def noise_plane(z: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Returns a float plane in [0, 1): a faint gradient under strong noise."""
    ramp = np.linspace(0, 0.3, size, dtype=np.float32)
    return (
        ramp[np.newaxis, :] * 0
        + ramp[:, np.newaxis]
        + rng.random((size, size), dtype=np.float32) * 0.7
    )


class BrainLike:
    """MRI-like sections: a smooth low-resolution head (like a 1 mm T1 template,
    181x217 voxels per section, bands of grey/white contrast, faint noise, ~40 %
    zero background) upsampled bilinearly to the section size."""

    def __init__(self, size: int, depth: int, seed: int = 0, low=(181, 217), noise: float = 0.015):
        self.noise = noise
        rng = np.random.default_rng(seed)
        self.size, self.depth = size, depth
        yy, xx = np.mgrid[-1 : 1 : low[1] * 1j, -1 : 1 : low[0] * 1j].astype(np.float32)
        self.xx, self.yy, self.rng = xx, yy, rng
        self.radius2d = (xx / 0.97) ** 2 + (yy / 0.93) ** 2

    def plane(self, z: int) -> np.ndarray:
        zz = np.float32(2 * z / max(self.depth - 1, 1) - 1)
        radius = self.radius2d + (zz * 0.9) ** 2
        tissue = 0.5 + 0.25 * np.sin(9 * np.sqrt(radius) + 4 * self.xx * self.yy + 2 * zz)
        tissue += self.rng.normal(0, self.noise, tissue.shape).astype(np.float32)
        tissue[radius > 1] = 0
        low = np.clip(tissue, 0, 0.999).astype(np.float32)
        return np.asarray(
            Image.fromarray(low, mode="F").resize((self.size, self.size), Image.BILINEAR)
        )


def write_stack(directory: Path, kind: str, fmt: str, sections: int, size: int) -> int:
    """Writes a stack; returns the bytes of one scale-0 slab (64 sections)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    brain = BrainLike(size, sections)
    for z in range(sections):
        plane = brain.plane(z) if kind == "brain" else noise_plane(z, size, rng)
        if fmt == "png8":
            Image.fromarray((plane * 255).astype(np.uint8)).save(
                directory / f"section_{z:05d}.png", compress_level=1
            )
        else:
            Image.fromarray((plane * 65535).astype(np.uint16)).save(
                directory / f"section_{z:05d}.tif"
            )
    return size * size * 64 * (1 if fmt == "png8" else 2)


# ------------------------------------------------------------------ runs


def run_plain(stack: Path, out: Path, size: int, sections: int, fmt: str) -> dict:
    """Runs the three plain neuroglancer-scripts commands; returns summed measures."""
    fullres = out.parent / f"{out.name}_fullres.json"
    fullres.write_text(
        json.dumps(
            {
                "type": "image",
                "data_type": "uint8" if fmt == "png8" else "uint16",
                "num_channels": 1,
                "scales": [
                    {
                        "encoding": "raw",
                        "size": [size, size, sections],
                        "resolution": [1000.0, 1000.0, 1000.0],
                        "voxel_offset": [0, 0, 0],
                    }
                ],
            }
        )
    )
    steps = [
        measure([tool("generate-scales-info"), str(fullres), str(out)]),
        measure([tool("slices-to-precomputed"), "--flat", str(stack), str(out)]),
        measure([tool("compute-scales"), "--flat", str(out)]),
    ]
    fullres.unlink()
    return {
        "wall": sum(s["wall"] for s in steps),
        "cpu": sum(s["cpu"] for s in steps),
        "rss_mb": max(s["rss_mb"] for s in steps),
        "steps": [round(s["wall"], 1) for s in steps],
    }


def run_ours(stack: Path, out: Path, jobs: int, extra: list, repeat: int = 1) -> dict:
    """Runs ingest_ngs ``repeat`` times into a fresh ``out``; returns the median run
    (by wall time) with the highest peak RSS of all."""
    runs = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        runs.append(
            measure(
                [
                    tool("ingest_ngs"),
                    str(stack),
                    "--destination",
                    str(out),
                    "--jobs",
                    str(jobs),
                    "--no-progress",
                    "-q",
                    "--parameters",
                    json.dumps({"voxel_size": [1, 1, 1], "voxel_unit": "um"}),
                ]
                + extra
            )
        )
    median = dict(sorted(runs, key=lambda r: r["wall"])[len(runs) // 2])
    median["rss_mb"] = max(r["rss_mb"] for r in runs)
    median["walls"] = [round(r["wall"], 2) for r in runs]
    return median


def output_bytes(directory: Path) -> int:
    return sum(
        p.stat().st_size
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def compare(plain: Path, ours: Path) -> None:
    """Checks chunk by chunk that both datasets decode to identical voxels."""
    from neuroglancer_scripts import accessor, precomputed_io

    a = precomputed_io.get_IO_for_existing_dataset(accessor.get_accessor_for_url(str(plain)))
    b = precomputed_io.get_IO_for_existing_dataset(accessor.get_accessor_for_url(str(ours)))
    assert [s["size"] for s in a.info["scales"]] == [s["size"] for s in b.info["scales"]]
    for scale in a.info["scales"]:
        (sx, sy, sz), (cx, cy, cz) = scale["size"], scale["chunk_sizes"][0]
        for z in range(0, sz, cz):
            for y in range(0, sy, cy):
                for x in range(0, sx, cx):
                    coords = (x, min(x + cx, sx), y, min(y + cy, sy), z, min(z + cz, sz))
                    if not np.array_equal(
                        a.read_chunk(scale["key"], coords), b.read_chunk(scale["key"], coords)
                    ):
                        raise SystemExit(f"decoded voxels differ: {scale['key']} {coords}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections",
        type=int,
        nargs="+",
        default=[64, 256],
        help="stack depths to generate (default: 64 256)",
    )
    parser.add_argument(
        "--size", type=int, default=2048, help="section width and height in pixels (default: 2048)"
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=["noise", "brain"],
        choices=["noise", "brain"],
        help="noise: uniform noise on a faint ramp; brain: smooth "
        "MRI-like head with zero background",
    )
    parser.add_argument(
        "--formats",
        nargs="+",
        default=["png8", "tiff16"],
        choices=["png8", "tiff16"],
        help="8-bit grey PNG and/or 16-bit grey TIFF sections",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        nargs="+",
        default=[len(os.sched_getaffinity(0))],
        help="ingest_ngs --jobs; several values (e.g. 1 2 4 8 16) "
        "measure how the conversion scales with cores against one "
        "baseline run (default: the CPUs this process may use)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run ingest_ngs this many times per input and report "
        "the median (short runs vary by 10-20 %% on a shared machine)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="1024x1024x64 noise and brain 8-bit PNG only"
    )
    parser.add_argument(
        "--no-baseline", action="store_true", help="run ingest_ngs only (no ratios)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where stacks and outputs go (default: a new temporary "
        "directory); results.json is written there",
    )
    parser.add_argument("--extra", default="", help="more ingest_ngs arguments")
    args = parser.parse_args(argv)
    if args.quick:
        args.sections, args.size, args.formats = [64], 1024, ["png8"]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-convert-"))
    rows = []
    header = (
        f"{'input':<28} {'tool':<8} {'wall s':>8} {'CPU s':>8} {'RSS MB':>8} "
        f"{'RSS/slab':>8} {'out MB':>9}"
    )
    print(
        f"# {args.size}x{args.size}, jobs={' '.join(map(str, args.jobs))}, "
        f"cpus={len(os.sched_getaffinity(0))} of {os.cpu_count()}"
    )
    print(header)
    for kind in args.kinds:
        for fmt in args.formats:
            for sections in args.sections:
                name = f"{kind}-{fmt}-{args.size}x{sections}"
                stack = workdir / name
                shutil.rmtree(stack, ignore_errors=True)
                slab = write_stack(stack, kind, fmt, sections, args.size) / 2**20
                results = {}
                if not args.no_baseline:
                    out = workdir / f"{name}-plain"
                    shutil.rmtree(out, ignore_errors=True)
                    results["plain"] = run_plain(stack, out, args.size, sections, fmt)
                    results["plain"]["bytes"] = output_bytes(out)
                out = workdir / f"{name}-ours"
                for jobs in args.jobs:
                    tool = "ours" if len(args.jobs) == 1 else f"ours/j{jobs}"
                    results[tool] = run_ours(stack, out, jobs, args.extra.split(), args.repeat)
                    results[tool]["jobs"] = jobs
                    results[tool]["bytes"] = output_bytes(out)
                    if not args.no_baseline:
                        compare(workdir / f"{name}-plain", out)
                if not args.no_baseline:
                    shutil.rmtree(workdir / f"{name}-plain")
                for tool, r in results.items():
                    print(
                        f"{name:<28} {tool:<8} {r['wall']:8.1f} {r['cpu']:8.1f} "
                        f"{r['rss_mb']:8.0f} {r['rss_mb'] / slab:8.2f} "
                        f"{r['bytes'] / 2**20:9.1f}"
                        + (f"   (median of {r['walls']} s)" if len(r.get("walls", ())) > 1 else ""),
                        flush=True,
                    )
                for tool, o in results.items():
                    if tool == "plain" or "plain" not in results:
                        continue
                    p = results["plain"]
                    label = "ratio" if tool == "ours" else f"ratio/j{o['jobs']}"
                    print(
                        f"{name:<28} {label:<8} {p['wall'] / o['wall']:7.1f}x "
                        f"{p['cpu'] / o['cpu']:7.1f}x {o['rss_mb'] / p['rss_mb']:8.2f} "
                        f"{'':>8} {o['bytes'] / p['bytes']:9.3f}   (identical voxels)",
                        flush=True,
                    )
                rows.append({"input": name, **results})
                shutil.rmtree(out)
                shutil.rmtree(stack)
    (workdir / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"# results: {workdir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
