#!/usr/bin/env python3
"""Benchmark: reading a region of a PNG section row block by row block, against
decoding the whole section and cropping it.

Writes one brain-like 8-bit SIZE x SIZE section twice, by Pillow and by libpng
(imagecodecs; their row filters differ, and the rows above a region cost what
their filters need), then times in the same run, each the median of REPEAT:
the whole decode + crop that a region read replaces (the baseline) and the
region read, for full-width bands at the top, middle and bottom, a tile in
the centre and the bottom-right corner, and the whole image. Prints seconds,
the ratio to the baseline and the peak of Python-visible allocations
(tracemalloc: numpy arrays and bytes, not libpng's own row buffers).

  python benchmarks/bench_png_regions.py --size 8192 --repeat 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from hbp_image_tasks import sections

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tiles import brain_plane  # noqa: E402


def write_section(path: Path, size: int, writer: str) -> Path:
    noise = np.random.default_rng(0).integers(0, 8, (min(size, 1024),) * 2, dtype=np.uint8)
    plane = brain_plane(20, 64, size, noise)
    if writer == "pillow":
        from PIL import Image

        Image.fromarray(plane).save(path)
    else:
        import imagecodecs

        path.write_bytes(imagecodecs.png_encode(plane))
    return path


def regions(size: int, tile: int) -> dict:
    """Returns name -> (x0, x1, y0, y1)."""
    middle, low = (size - tile) // 2, size - tile
    return {
        "top band": (0, size, 0, tile),
        "middle band": (0, size, middle, middle + tile),
        "bottom band": (0, size, low, size),
        "centre tile": (middle, middle + tile, middle, middle + tile),
        "bottom-right tile": (low, size, low, size),
        "whole image": (0, size, 0, size),
    }


def measure(repeat: int, work) -> tuple[float, float]:
    """Returns the median seconds of ``work`` and its peak traced allocation in MB."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    tracemalloc.start()
    try:
        work()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return statistics.median(times), peak / 1e6


def crop_of_whole(path: Path, expected, region) -> np.ndarray:
    """Returns ``region`` of the whole decoded section: what a region read replaces."""
    x0, x1, y0, y1 = region
    return sections.read_section(path, expected)[y0:y1, x0:x1].copy()


def run(path: Path, size: int, tile: int, repeat: int) -> list[dict]:
    expected = sections.probe_section(path)
    assert sections.reads_regions(path, expected)
    rows = []
    for name, region in regions(size, tile).items():
        part = sections.read_section_region(path, expected, region)
        assert np.array_equal(part, crop_of_whole(path, expected, region)), name
        base, base_peak = measure(repeat, lambda r=region: crop_of_whole(path, expected, r))
        took, peak = measure(
            repeat, lambda r=region: sections.read_section_region(path, expected, r)
        )
        rows.append(dict(region=name, whole=base, whole_mb=base_peak, rows=took, rows_mb=peak))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=8192, help="section edge")
    parser.add_argument("--tile", type=int, default=512, help="band height and tile edge")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--writers", nargs="+", default=["pillow", "libpng"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as workdir:
        for writer in args.writers:
            path = write_section(Path(workdir) / f"{writer}.png", args.size, writer)
            print(
                f"\n{args.size}x{args.size} 8-bit PNG written by {writer} "
                f"({path.stat().st_size / 1e6:.1f} MB); median of {args.repeat}"
            )
            print(
                "| region | decode whole + crop | region read | ratio | peak MB (whole / region) |"
            )
            print("|---|--:|--:|--:|--:|")
            for row in run(path, args.size, args.tile, args.repeat):
                print(
                    f"| {row['region']} | {row['whole']:.3f} s | {row['rows']:.3f} s | "
                    f"{row['rows'] / row['whole']:.2f} | "
                    f"{row['whole_mb']:.0f} / {row['rows_mb']:.0f} |"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
