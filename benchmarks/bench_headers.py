#!/usr/bin/env python3
"""Benchmark: checking every section's header before a conversion, against decoding them.

Writes SECTIONS PNG sections of SIZE x SIZE (8-bit, noise, so they do not
compress to nothing), then times in the same run, each the best of REPEAT:
the header check ingest_ngs runs up front (sections.check_sections) with one
thread and with JOBS threads, and, as the baseline, decoding every section
(what a conversion does anyway, and what a check by reading would cost).
Prints the seconds, the time per section and the ratios. Run it by hand:

  python benchmarks/bench_headers.py --sections 1000 --size 256 --jobs 1 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from hbp_image_tasks import sections


def write_sections(directory: Path, count: int, size: int) -> list[Path]:
    rng = np.random.default_rng(0)
    plane = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
    paths = []
    for z in range(count):
        path = directory / f"s{z:05d}.png"
        Image.fromarray(np.roll(plane, z, axis=0)).save(path, compress_level=1)
        paths.append(path)
    return paths


def best_of(repeat: int, work) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        paths = write_sections(Path(workdir), args.sections, args.size)
        expected = sections.probe_section(paths[0])
        decode = best_of(args.repeat, lambda: [sections.read_section(p, expected) for p in paths])
        print(
            f"{args.sections} sections of {args.size}x{args.size} PNG; best of {args.repeat}\n"
            f"decode every section (baseline): {decode:8.3f} s "
            f"({decode / args.sections * 1e6:7.1f} us per section)"
        )
        for jobs in args.jobs:
            check = best_of(
                args.repeat, lambda jobs=jobs: sections.check_sections(paths, expected, jobs)
            )
            print(
                f"header check, {jobs:2d} thread(s):     {check:8.3f} s "
                f"({check / args.sections * 1e6:7.1f} us per section), "
                f"{decode / check:6.1f}x faster than decoding"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
