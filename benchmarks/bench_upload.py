#!/usr/bin/env python3
"""Benchmark: `upload_results` against `swift upload` on the same dataset and local Swift.

Converts a 2048x2048x64 volume with neuroglancer-scripts (64^3 chunks, gzip,
about 1400 files), then times, each as a separate command as a user runs it:
a first upload and an unchanged rerun (``swift upload --skip-identical``),
and an unchanged rerun of 20 000 small objects. Ratios are from the same run.

examples:
  benchmarks/bench_upload.py
  benchmarks/bench_upload.py --objects 5000 --work-dir /tmp/bench
  pip install --target /tmp/ksc python-keystoneclient
  benchmarks/bench_upload.py --swift-pythonpath /tmp/ksc
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from swift_servers import keystone_session, start_swift, stop_swift

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> float:
    """Runs a command to completion; returns its wall-clock seconds."""
    started = time.monotonic()
    result = subprocess.run(
        argv, env=env, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    elapsed = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv[:3])} ... failed ({result.returncode}):\n{result.stderr[-2000:]}"
        )
    return elapsed


def make_volume_dataset(directory: Path) -> Path:
    """Converts a smooth 2048x2048x64 uint8 volume to flat gzipped precomputed."""
    import nibabel
    import numpy as np

    directory.mkdir(parents=True)
    x, y, z = np.meshgrid(
        np.arange(2048), np.arange(2048), np.arange(64), indexing="ij", sparse=True
    )
    rng = np.random.default_rng(0)
    volume = (
        (128 + 60 * np.sin(x / 97.0) * np.cos(y / 61.0) + z + rng.normal(0, 6, (2048, 2048, 64)))
        .clip(0, 255)
        .astype(np.uint8)
    )
    nifti = directory.parent / "volume.nii"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    out = str(directory)
    for argv in (
        ["volume-to-precomputed", str(nifti), out, "--generate-info"],
        ["generate-scales-info", f"{out}/info_fullres.json", out],
        ["volume-to-precomputed", str(nifti), out, "--flat"],
        ["compute-scales", out, "--flat"],
    ):
        run([str(BIN / argv[0])] + argv[1:])
    nifti.unlink()
    return directory


def make_small_objects(directory: Path, count: int) -> Path:
    """Writes ``count`` tiny raw chunk files (names identical for both tools) and an info."""
    directory.mkdir(parents=True)
    (directory / "info").write_text(
        json.dumps(
            {
                "type": "image",
                "data_type": "uint8",
                "num_channels": 1,
                "scales": [
                    {
                        "key": "s",
                        "size": [count, 1, 1],
                        "resolution": [1, 1, 1],
                        "voxel_offset": [0, 0, 0],
                        "chunk_sizes": [[1, 1, 1]],
                        "encoding": "raw",
                    }
                ],
            }
        )
    )
    (directory / "s").mkdir()
    for i in range(count):
        (directory / "s" / f"{i}-{i + 1}_0-1_0-1").write_bytes(bytes([i % 256]))
    return directory


def swift_env(local: dict, pythonpath: str | None) -> tuple[dict, str]:
    """Returns the environment for the `swift` CLI and how it authenticates.

    The CLI's own Keystone v3 login needs python-keystoneclient (found on
    ``pythonpath``); without it the CLI gets a token made beforehand, which
    spares it the login and makes the ratios conservative.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OS_", "ST_"))}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    probe = subprocess.run(
        [sys.executable, "-c", "import keystoneclient"], env=env, capture_output=True
    )
    if probe.returncode == 0:
        env.update(
            {
                "OS_AUTH_URL": local["auth_url"],
                "OS_AUTH_VERSION": "3",
                "OS_IDENTITY_API_VERSION": "3",
                "OS_USERNAME": local["username"],
                "OS_PASSWORD": local["password"],
                "OS_PROJECT_ID": local["project_id"],
                "OS_USER_DOMAIN_NAME": "Default",
                "OS_PROJECT_DOMAIN_NAME": "Default",
            }
        )
        return env, "its own Keystone v3 login"
    env.update(
        {
            "OS_AUTH_TOKEN": keystone_session(local).get_token(),
            "OS_STORAGE_URL": local["storage_url"],
        }
    )
    return env, "a token made beforehand (no python-keystoneclient)"


def copy_of(source: Path, destination: Path) -> Path:
    """Returns a fresh copy of ``source`` without its dotfiles."""
    shutil.rmtree(destination, ignore_errors=True)
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns(".*"))
    return destination


def count_files(directory: Path) -> int:
    return sum(1 for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--objects",
        type=int,
        default=20000,
        help="objects of the large unchanged rerun (0 skips it)",
    )
    parser.add_argument(
        "--work-dir",
        default=None,
        help="where datasets are written (default: a temporary directory, removed at the end)",
    )
    parser.add_argument(
        "--swift-pythonpath",
        default=None,
        metavar="DIR",
        help="PYTHONPATH for the swift CLI only, e.g. a "
        "`pip install --target DIR python-keystoneclient`",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="upload_results --jobs (default: its own default)"
    )
    args = parser.parse_args(argv)

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-upload-"))
    state = work / "local-swift"
    local = start_swift(state)
    env, swift_auth = swift_env(local, args.swift_pythonpath)
    ours_env = dict(os.environ, SWIFT_SETTINGS=local["settings_file"])
    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    swift_cli = str(BIN / "swift")
    upload_results = [sys.executable, "-m", "hbp_image_tasks.upload_results"]
    tag = uuid.uuid4().hex[:6]
    results = {}
    try:
        dataset = work / "dataset"
        if not (dataset / "info").exists():
            shutil.rmtree(dataset, ignore_errors=True)
            make_volume_dataset(dataset)
        files = count_files(dataset)
        # Separate copies: upload_results writes its manifest into its directory.
        swift_copy = copy_of(dataset, work / "dataset-swift")
        theirs, ours = f"bench-swift-{tag}", f"bench-ours-{tag}"
        # swift upload keeps the .gz names; the header makes the chunks decodable.
        swift_upload = [
            swift_cli,
            "upload",
            theirs,
            ".",
            "--header",
            "Content-Encoding: gzip",
            "--skip-identical",
        ]
        results["files"] = files
        results["swift_first"] = run(swift_upload[:-1], env, cwd=swift_copy)
        results["ours_first"] = run(
            upload_results + [str(dataset), "--container", ours, "-q"] + jobs, ours_env
        )
        results["swift_rerun"] = run(swift_upload, env, cwd=swift_copy)
        results["ours_rerun"] = run(
            upload_results + [str(dataset), "--container", ours, "-q"] + jobs, ours_env
        )
        if args.objects:
            small = work / f"small-{args.objects}"
            if not (small / "info").exists():
                shutil.rmtree(small, ignore_errors=True)
                make_small_objects(small, args.objects)
            small_swift = copy_of(small, work / f"small-{args.objects}-swift")
            many = f"bench-many-{tag}"
            # One container with identical names, filled once, rerun by both tools.
            results["many_objects"] = args.objects + 1
            results["ours_many_first"] = run(
                upload_results + [str(small), "--container", many, "-q"] + jobs, ours_env
            )
            results["swift_many_rerun"] = run(
                [swift_cli, "upload", many, ".", "--skip-identical"], env, cwd=small_swift
            )
            results["ours_many_rerun"] = run(
                upload_results + [str(small), "--container", many, "-q"] + jobs, ours_env
            )
    finally:
        stop_swift(state)
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print(
        f"dataset: {results['files']} files (2048x2048x64 uint8, 64^3 chunks, gzip); "
        f"swift upload authenticates with {swift_auth}"
    )
    print(
        f"first upload:     swift upload {results['swift_first']:6.1f} s   "
        f"upload_results {results['ours_first']:6.1f} s   "
        f"ratio {results['swift_first'] / results['ours_first']:.1f}x"
    )
    print(
        f"unchanged rerun:  swift upload {results['swift_rerun']:6.1f} s   "
        f"upload_results {results['ours_rerun']:6.1f} s   "
        f"ratio {results['swift_rerun'] / results['ours_rerun']:.1f}x"
    )
    if "swift_many_rerun" in results:
        print(
            f"{results['many_objects']} objects, unchanged rerun: swift upload "
            f"{results['swift_many_rerun']:6.1f} s   upload_results "
            f"{results['ours_many_rerun']:6.1f} s   ratio "
            f"{results['swift_many_rerun'] / results['ours_many_rerun']:.1f}x "
            f"(first upload_results {results['ours_many_first']:.1f} s)"
        )
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
