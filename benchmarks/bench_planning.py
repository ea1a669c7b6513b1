#!/usr/bin/env python3
"""Benchmark: what ``ingest --array`` reads of the first section to plan, by ranges,
against fetching that section whole.

Starts (or reuses) the local Swift of scripts/local-swift and puts one section of
SIZE x SIZE in a public container for each format: a 16-bit LZW TIFF written by
libtiff (its directory after its strips), an 8-bit PNG and a JPEG. Then times,
each the median of REPEAT in the same run, the sparse header copy the plan makes
by range requests (array_job.header_copy) and, as the baseline, fetching the
section whole (fetch_input, as the plan did for TIFF and JPEG stacks before).
Prints bytes, requests, seconds and ratios; with --one-micron also the bytes the
plan reads of a section of a 1 um scan (130 000 x 110 000, one-row strips, a
sparse local file read through the same RangeFile). Run it by hand:

  python benchmarks/bench_planning.py --size 8192 --repeat 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from swift_servers import add_swift_options, delete_container, swift_connection, swift_of_options

from hbp_image_tasks import array_job, fetch_input, remote_file, sections
from hbp_image_tasks.progress import format_bytes
from hbp_image_tasks.swift import ObjectStream

ONE_MICRON_SECTION = (130000, 110000)


def section_bytes(size: int, suffix: str) -> bytes:
    """Returns a brain-like section of ``size`` x ``size`` (a disc of texture) as ``suffix``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.ogrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    disc = (x**2 + y**2 < 0.8).astype(np.float32)
    samples = disc * (0.5 + 0.3 * np.sin(40 * x) * np.cos(30 * y))
    samples += rng.normal(0, 0.02, samples.shape).astype(np.float32)
    out = io.BytesIO()
    if suffix == ".tif":
        image = Image.fromarray((np.clip(samples, 0, 1) * 65535).astype(np.uint16))
        image.save(out, format="TIFF", compression="tiff_lzw")
    else:
        image = Image.fromarray((np.clip(samples, 0, 1) * 255).astype(np.uint8))
        image.save(out, format="PNG" if suffix == ".png" else "JPEG", quality=90)
    return out.getvalue()


def median_time(repeat: int, work) -> tuple[float, object]:
    """Returns the median seconds of ``repeat`` calls of ``work`` and its last result."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - started)
    return statistics.median(times), result


def one_micron_header(directory: Path) -> tuple[int, int, int]:
    """Returns (section bytes, bytes read, requests) of the plan's header read of a sparse
    1 um section in one-row strips, through a RangeFile over the local file."""
    import tifffile

    path = directory / "one-micron.tif"
    width, height = ONE_MICRON_SECTION
    tifffile.imwrite(
        path,
        shape=(height, width),
        dtype=np.uint8,
        bigtiff=True,
        rowsperstrip=1,
        photometric="minisblack",
    )
    size = path.stat().st_size

    def opener(name: str, start: int) -> ObjectStream:
        handle = open(path, "rb")
        handle.seek(start)
        headers = {"content-range": f"bytes {start}-{size - 1}/{size}"} if start else {}
        return ObjectStream(
            206 if start else 200, headers, iter(lambda: handle.read(1 << 20), b""), handle.close
        )

    remote = remote_file.RangeFile(opener, path.name, size, array_job.HEADER_LIMIT)
    found = sections.header_facts(remote)
    assert found[0].width == width and remote.failure is None, found
    path.unlink()
    return size, remote.fetched, remote.requests


def compare(connection, url: str, container: str, name: str, args, scratch: Path) -> None:
    """Puts section ``name`` in the container, then prints its whole fetch and its
    header copy by ranges: bytes, requests, median seconds."""
    connection.put_object(container, name, section_bytes(args.size, Path(name).suffix))
    source = fetch_input.open_container(url, None)
    (info,) = [i for i in source[1]("stack/") if i.name == name]
    whole, _ = median_time(
        args.repeat,
        lambda: fetch_input.fetch(
            f"{url}/{name}", Path(tempfile.mkdtemp(dir=scratch)), show_progress=False
        ),
    )
    ranges, copy = median_time(
        args.repeat,
        lambda: array_job.header_copy(source, info, Path(tempfile.mkdtemp(dir=scratch))),
    )
    assert copy is not None, f"{name}: not read by ranges"
    print(
        f"  {Path(name).suffix:5s} {format_bytes(info.bytes):>10s}: whole fetch (baseline) "
        f"{whole:6.3f} s; by ranges {format_bytes(copy.bytes_read):>10s} in "
        f"{copy.requests} requests, {ranges:6.3f} s: {whole / ranges:5.1f}x faster, "
        f"{info.bytes / copy.bytes_read:6.1f}x fewer bytes"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=8192, help="section width and height")
    parser.add_argument("--formats", nargs="+", default=[".tif", ".png", ".jpg"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--one-micron",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also read the header of a sparse 130 000 x 110 000 section (default: on)",
    )
    add_swift_options(parser)
    args = parser.parse_args(argv)

    env = swift_of_options(args)
    container = f"bench-planning-{args.size}"
    connection = swift_connection(env)
    connection.put_container(container, headers={"X-Container-Read": ".r:*,.rlistings"})
    url = f"{env['storage_url']}/{container}"
    print(f"one section of {args.size} x {args.size} per format from {url}")
    try:
        with tempfile.TemporaryDirectory(prefix="bench-planning-") as scratch:
            for suffix in args.formats:
                compare(connection, url, container, f"stack/s0001{suffix}", args, Path(scratch))
            if args.one_micron:
                size, read, requests = one_micron_header(Path(scratch))
                print(
                    f"  a 1 um section of {ONE_MICRON_SECTION[0]} x {ONE_MICRON_SECTION[1]} "
                    f"(uint8 TIFF, one-row strips, {format_bytes(size)}): the plan reads "
                    f"{format_bytes(read)} in {requests} requests "
                    f"({size / read:.0f}x fewer bytes than the whole section)"
                )
    finally:
        delete_container(env, container)
    return 0


if __name__ == "__main__":
    sys.exit(main())
