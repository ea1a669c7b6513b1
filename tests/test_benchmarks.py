"""The conversion benchmark runs end to end on a tiny stack and checks its own voxels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_convert.py"


def test_convert_benchmark_compares_both_tools_at_each_job_count(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            str(BENCHMARK),
            "--size",
            "128",
            "--sections",
            "8",
            "--kinds",
            "brain",
            "--formats",
            "png8",
            "tiff16",
            "--jobs",
            "1",
            "2",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("(identical voxels)") == 4  # 2 inputs x 2 job counts
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [row["input"] for row in rows] == ["brain-png8-128x8", "brain-tiff16-128x8"]
    for row in rows:
        assert {tool: row[tool]["jobs"] for tool in ("ours/j1", "ours/j2")} == {
            "ours/j1": 1,
            "ours/j2": 2,
        }
        assert row["plain"]["bytes"] > 0 and row["ours/j2"]["bytes"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


TILES = BENCHMARK.parent / "bench_tiles.py"


@pytest.mark.parametrize("fmt", ["tiff", "png"])
def test_tiles_benchmark_converts_within_the_limit_and_matches_the_single_pass(tmp_path, fmt):
    # 2048 x 2048 x 16 sections: a 64 MiB slab in one pass, 16 MiB allowed.
    done = subprocess.run(
        [sys.executable, str(TILES), "--size", "2048", "--reference-size", "512"]
        + ["--sections", "16", "--limit", "16M", "--workdir", str(tmp_path), "--format", fmt],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "identical bytes" in done.stdout and "(within)" in done.stdout
    rows = json.loads((tmp_path / "results.json").read_text())
    assert rows["identical"]
    assert rows["tiled-large"]["rss_mb"] <= 16 + rows["base_rss_mb"]
    assert rows["tiled-large"]["voxels"] == 2048 * 2048 * 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


REGIONS = BENCHMARK.parent / "bench_png_regions.py"


def test_png_regions_benchmark_checks_each_region_against_the_whole_decode(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REGIONS), "--size", "256", "--tile", "64", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and " s |" in line]
    assert len(rows) == 2 * 6  # two writers, six regions each


PUBLISH = BENCHMARK.parent / "bench_publish.py"


@pytest.mark.swift
def test_publish_benchmark_ingests_unsharded_and_sharded_to_the_local_swift(tmp_path, local_swift):
    env = tmp_path / "swift-env.json"
    env.write_text(json.dumps(local_swift.env))
    done = subprocess.run(
        [
            sys.executable,
            str(PUBLISH),
            "--sections",
            "3",
            "--size",
            "700x300",
            "--jobs",
            "2",
            "--swift-env",
            str(env),
            "--workdir",
            str(tmp_path / "work"),
            "--json",
            str(tmp_path / "rows.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    plain, sharded = json.loads((tmp_path / "rows.json").read_text())
    assert (plain["label"], sharded["label"]) == ("unsharded", "sharded")
    # info and every chunk, against info and one 0.shard per (small) scale.
    assert plain["objects"] == 1 + plain["chunks"] and plain["chunks"] > 11 * 5
    assert sharded["objects"] == 1 + sharded["scales"] and sharded["scales"] >= 3
    assert abs(plain["bytes"] - sharded["bytes"]) < 0.05 * plain["bytes"]
    assert all(row[step] >= 0 for row in (plain, sharded) for step in ("fetch", "upload"))
    assert "projection to BigBrain, 7404 sections" in done.stdout
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == []


ARRAY_BENCHMARK = BENCHMARK.parent / "bench_array.py"


def run_array_benchmark(work: Path, local_swift, local_slurm, *options: str):
    """Runs bench_array.py small on the test Swift and Slurm; returns the finished process."""
    done = subprocess.run(
        [sys.executable, str(ARRAY_BENCHMARK), "--size", "64", "--chunk", "8", *options]
        + ["--work-dir", str(work), "--swift-dir", local_swift.env["state_dir"]]
        + ["--slurm-dir", str(local_slurm.slurm_conf.parent)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.swift
def test_array_benchmark_runs_single_and_array_ingests_on_the_local_slurm(
    tmp_path, local_swift, local_slurm
):
    options = ["--sections", "16", "--nodes", "1"]
    done = run_array_benchmark(tmp_path, local_swift, local_slurm, *options)
    assert "2 concurrent tasks vs 1:" in done.stdout and "BigBrain 20 um" in done.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["units"]) == 2 and results["finishing"]["units"] == 2
    assert "the conversion alone (fetched sections, no Swift), 2 processes vs 1:" in done.stdout
    assert results["scaling"] > 0 and not (tmp_path / "scaling").exists()
    assert "the busiest task's units (no job start, no finishing job), 2 vs 1:" in done.stdout
    assert results["tasks_alone"] > 0
    # Every run fetches its sections from the local Swift, whose CPU it reports.
    assert set(results["swift_cpu"]) == set(results["walls"])
    assert all(seconds > 0 for seconds in results["swift_cpu"].values())
    assert done.stdout.count("(local Swift servers: ") == 3


@pytest.mark.swift
def test_array_benchmark_measures_the_disk_with_and_without_cleanup(
    tmp_path, local_swift, local_slurm
):
    done = run_array_benchmark(tmp_path, local_swift, local_slurm, "--disk", "--sections", "32")
    assert "peak disk, without / with --cleanup: " in done.stdout
    peaks = json.loads((tmp_path / "results.json").read_text())["disk"]
    # Four units, two at a time: with --cleanup the finished ones are gone.
    assert 0 < peaks["with --cleanup"] < peaks["without --cleanup"]
    assert not (tmp_path / "cleanup" / "results").exists()
    assert (tmp_path / "keep" / "results" / "info").is_file()


HEADERS = BENCHMARK.parent / "bench_headers.py"


def test_headers_benchmark_times_the_check_against_decoding(tmp_path):
    done = subprocess.run(
        [sys.executable, str(HEADERS), "--sections", "20", "--size", "16"]
        + ["--jobs", "1", "2", "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "decode every section (baseline)" in done.stdout
    assert done.stdout.count("faster than decoding") == 2


FETCH_BENCHMARK = BENCHMARK.parent / "bench_fetch.py"


@pytest.mark.swift
def test_fetch_benchmark_times_both_tools_and_the_reading_with_credentials(local_swift):
    done = subprocess.run(
        [sys.executable, str(FETCH_BENCHMARK), "--objects", "6", "--size", "1000"]
        + ["--repeat", "1", "--private", "--swift-dir", local_swift.env["state_dir"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for label in ("swift download", "fetch_input", "fetch_input --settings"):
        assert f"  {label:22s} median" in done.stdout
    assert done.stdout.count("Keystone CPU per run") == 3
    assert "speed ratio fetch_input --settings / fetch_input anonymous:" in done.stdout
    # The session's Swift was used as it is: same servers, same ports.
    now = subprocess.run(
        [sys.executable, str(BENCHMARK.parent.parent / "scripts" / "local_swift.py"), "env"]
        + ["--dir", local_swift.env["state_dir"]],
        capture_output=True,
        text=True,
        check=True,
    )
    assert json.loads(now.stdout)["pids"] == local_swift.env["pids"]


PLANNING_BENCHMARK = BENCHMARK.parent / "bench_planning.py"


@pytest.mark.swift
def test_planning_benchmark_reads_each_formats_header_by_ranges(local_swift):
    done = subprocess.run(
        [sys.executable, str(PLANNING_BENCHMARK), "--size", "1024", "--repeat", "1"]
        + ["--swift-dir", local_swift.env["state_dir"]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for suffix in (".tif", ".png", ".jpg"):
        assert f"  {suffix:5s} " in done.stdout and "whole fetch (baseline)" in done.stdout
    assert "a 1 um section of 130000 x 110000" in done.stdout
    assert done.stdout.count("x fewer bytes") == 4
