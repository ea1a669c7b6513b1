"""The plan-side pieces of ``ingest --array`` that need no cluster: the tasks' argv,
the split of units among tasks, the jobs' memory and the files of a unit."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from hbp_image_tasks import (
    array_job,
    array_state,
    array_task,
    errors,
    layout,
    pyramid,
    unit_setup,
    units,
)


def test_tasks_get_the_ingest_argv_without_the_submission_options():
    argv = ["--source", "u", "--array", "4", "--wait", "--sbatch-option=--time=1:00:00"]
    argv += ["--sbatch-option", "--qos=high", "--dry-run", "--restart", "--jobs", "2"]
    assert array_job.task_argv(argv) == ["--source", "u", "--jobs", "2"]


@pytest.mark.parametrize(
    "count, parts, lengths",
    [(4, 4, [1, 1, 1, 1]), (10, 4, [3, 3, 2, 2]), (3, 1, [3]), (5, 5, [1] * 5)],
)
def test_units_are_split_into_contiguous_runs_of_nearly_equal_length(count, parts, lengths):
    items = list(range(count))
    runs = array_state.split_evenly(items, parts)
    assert [len(run) for run in runs] == lengths
    assert [item for run in runs for item in run] == items


@pytest.mark.parametrize(
    "options, expected",
    [((), ("--mem=513M",)), (("--mem=2G",), ()), (("--mem-per-cpu=1G",), ())],
)
def test_jobs_ask_for_their_planned_memory_unless_the_user_says(options, expected):
    assert array_job.memory_option(options, 1 << 20) == expected


@pytest.mark.parametrize(
    "options, expected",
    [
        ((), ("--cpus-per-task=4",)),
        (("--cpus-per-task=8",), ()),
        (("-c8",), ()),
        (("--partition=batch",), ("--cpus-per-task=4",)),
    ],
)
def test_jobs_ask_for_the_cpus_of_their_workers_unless_the_user_says(options, expected):
    assert array_job.cpus_option(options, 4) == expected


@pytest.mark.parametrize(
    "jobs, options, expected",
    [
        (3, ("--cpus-per-task=8",), 3),
        (None, ("--cpus-per-task=8",), 8),
        (None, ("-c6",), 6),
        (None, ("--comment=x", "--partition=batch"), 1),
        (None, (), 1),
    ],
)
def test_a_tasks_workers_are_its_jobs_else_its_cpus_else_one(jobs, options, expected):
    class Options:
        pass

    given = Options()
    given.jobs = jobs
    assert array_job.task_jobs(given, options) == expected


@pytest.mark.parametrize("text", ["0", "x", "4%0", "4%", "-1"])
def test_bad_array_counts_are_usage_errors(text):
    class Args:
        array, sbatch_option, sections_per_unit, wait = text, [], None, False

    with pytest.raises(errors.UsageError):
        array_job.array_options_from_args(Args())


def test_array_with_at_most_m_running_tasks():
    class Args:
        array, sbatch_option, sections_per_unit, wait = "16%4", [], None, False

    options = array_job.array_options_from_args(Args())
    assert (options.tasks, options.at_once) == (16, 4)


def test_a_units_chunk_names_cover_its_box_at_every_scale_it_builds():
    info = pyramid.build_info(
        "uint8", 1, (100, 70, 16), (1000.0,) * 3, (0, 0, 0), "image", "raw", 16, None
    )
    plan = units.plan_units(info, None, 1)
    names = [name for unit in plan.units for name in unit_setup.unit_file_names(info, unit)]
    # The units together name every chunk of the scales they build, each once.
    expected = set()
    for scale in info["scales"][: plan.top_scale + 1]:
        (cx, cy, cz), (sx, sy, sz) = scale["chunk_sizes"][0], scale["size"]
        for z in range(0, sz, cz):
            for y in range(0, sy, cy):
                for x in range(0, sx, cx):
                    expected.add(
                        f"{scale['key']}/{x}-{min(x + cx, sx)}_{y}-{min(y + cy, sy)}_"
                        f"{z}-{min(z + cz, sz)}"
                    )
    assert len(names) == len(set(names)) and set(names) == expected


def test_the_planning_section_becomes_the_first_z_ranges_directory(tmp_path: Path):
    info = pyramid.build_info(
        "uint8", 1, (100, 70, 48), (1000.0,) * 3, (0, 0, 0), "image", "raw", 16, None
    )
    plan = units.plan_units(info, None, 1, sections_per_unit=16)
    planning = tmp_path / "first-section"
    planning.mkdir()
    (planning / "s1.png").write_bytes(b"section")
    array_job.hand_over_planning_section(tmp_path, plan)
    assert not planning.exists()
    assert (tmp_path / "sections-0-16" / "s1.png").read_bytes() == b"section"
    # A z range an earlier run's units fetched into is kept; the copy goes.
    planning.mkdir()
    (planning / "s1.png").write_bytes(b"newer")
    array_job.hand_over_planning_section(tmp_path, plan)
    assert not planning.exists()
    assert (tmp_path / "sections-0-16" / "s1.png").read_bytes() == b"section"
    array_job.hand_over_planning_section(tmp_path, plan)  # nothing to hand over


def test_a_missing_chunk_of_a_finished_unit_is_a_conversion_error(tmp_path: Path):
    info = pyramid.build_info(
        "uint8", 1, (32, 32, 16), (1000.0,) * 3, (0, 0, 0), "image", "raw", 16, None
    )
    unit = units.plan_units(info, None, 1).units[0]
    with pytest.raises(errors.ConversionError, match="was not written"):
        unit_setup.unit_files(tmp_path, info, unit)


def recorded_unit(results_dir: Path) -> tuple[types.SimpleNamespace, list[dict]]:
    """Writes the two files of a recorded unit; returns the job and the unit records."""
    # Gzipped chunks are on disk as NAME.gz, the other files under their name.
    (results_dir / "20um").mkdir()
    (results_dir / "20um" / "0-8_0-8_0-8.gz").write_bytes(b"abc")
    (results_dir / "20um" / "8-16_0-8_0-8").write_bytes(b"def")
    records = [
        {
            "id": "unit-a",
            "files": [
                {"name": "20um/0-8_0-8_0-8", "bytes": 3},
                {"name": "20um/8-16_0-8_0-8", "bytes": 3},
            ],
        }
    ]
    return types.SimpleNamespace(options=types.SimpleNamespace(results_dir=results_dir)), records


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda path: path.write_bytes(b"longer"), "with 3 bytes, now 6 bytes"),
        (lambda path: path.unlink(), "with 3 bytes, now missing"),
    ],
)
def test_a_unit_file_changed_after_its_unit_was_recorded_stops_the_finishing_step(
    tmp_path: Path, change, message
):
    job, records = recorded_unit(tmp_path)
    array_task.check_unit_files(job, records)
    change(tmp_path / "20um" / "8-16_0-8_0-8")
    with pytest.raises(errors.ConversionError) as caught:
        array_task.check_unit_files(job, records)
    assert str(caught.value) == (
        f"{tmp_path / '20um' / '8-16_0-8_0-8'}: recorded by unit unit-a {message}; "
        "run with --restart"
    )


def test_the_files_a_unit_deleted_after_their_upload_may_be_missing_but_not_changed(
    tmp_path: Path,
):
    job, records = recorded_unit(tmp_path)
    (tmp_path / "20um" / "0-8_0-8_0-8.gz").unlink()
    with pytest.raises(errors.ConversionError, match="now missing"):
        array_task.check_unit_files(job, records)
    array_task.check_unit_files(job, records, {"unit-a"})
    (tmp_path / "20um" / "8-16_0-8_0-8").write_bytes(b"longer")
    with pytest.raises(errors.ConversionError, match="now 6 bytes"):
        array_task.check_unit_files(job, records, {"unit-a"})


@pytest.mark.parametrize("option", [["--wait"], ["--sbatch-option=--qos=high"]])
def test_array_options_without_array_are_refused(tmp_path, caplog, option):
    from hbp_image_tasks import ingest

    argv = ["--source", "https://example.org/brain.nii.gz", "--no-upload"]
    argv += ["--download-dir", str(tmp_path / "src"), "--results-dir", str(tmp_path / "out")]
    assert ingest.main(argv + option) == errors.EXIT_USAGE
    assert "need --array N" in caplog.text


def listing_entries(names: list[str]) -> list:
    from hbp_image_tasks.swift import ObjectInfo

    return [ObjectInfo(name, 1, "0" * 32) for name in names]


def test_sections_are_in_natural_order_of_their_names_without_an_order_file():
    entries = listing_entries(["d/s10.png", "d/s2.png", "d/notes.txt", "d/s1.png"])
    ordered = unit_setup.ordered_sections(entries)
    assert [item.name for item in ordered] == ["d/s1.png", "d/s2.png", "d/s10.png"]


def test_an_order_file_gives_the_z_order_as_for_a_single_ingest(tmp_path):
    from hbp_image_tasks import sections

    names = ["d/s1.png", "d/s2.png", "d/s10.png"]
    for name in names:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    order = tmp_path / "order.txt"
    order.write_text("# top first\nd/s10.png\n\nd/s1.png\nd/s2.png\n")
    ordered = unit_setup.ordered_sections(listing_entries(names), order)
    single = sections.sections_from_order_file(order, tmp_path)
    assert [tmp_path / item.name for item in ordered] == single


@pytest.mark.parametrize(
    "text, message",
    [("d/s1.png\nd/s9.png\n", "order.txt:2: section 'd/s9.png' is not among"),
     ("d/s1.png\nd/s1.png\n", "listed twice"),
     ("# nothing\n", "names no section")],
)  # fmt: skip
def test_bad_order_files_name_the_line_or_the_problem(tmp_path, text, message):
    order = tmp_path / "order.txt"
    order.write_text(text)
    with pytest.raises(errors.InputError, match=message):
        unit_setup.ordered_sections(listing_entries(["d/s1.png"]), order)


@pytest.mark.parametrize("cleanup", [True, False])
def test_with_cleanup_a_z_ranges_sections_go_once_all_its_units_are_finished(
    tmp_path: Path, monkeypatch, cleanup
):
    tiles = [
        units.Unit(units.Box((x, 0, z), (x + 64, 64, z + 16)), 0, False)
        for z in (0, 16)
        for x in (0, 64)
    ]
    download = tmp_path / "download"
    for z in (0, 16):
        stack = layout.sections_directory(download, z, z + 16) / "stack"
        stack.mkdir(parents=True)
        (stack / "s.png").write_bytes(b"section")
        (stack.parent / ".fetch_state.jsonl").write_text("{}\n")
    job = types.SimpleNamespace(
        run=array_state.ArrayRun(tmp_path / "results"),
        plan=types.SimpleNamespace(units=tuple(tiles)),
        units={unit.id: unit for unit in tiles},
        document={"sections": []},
        options=types.SimpleNamespace(cleanup=cleanup, download_dir=download, jobs=1),
        connection=None,  # no upload: the units have no files to delete
        # Task 0 runs z 0-16 and the first tile of z 16-32, task 1 the last tile.
        record={"tasks": [[tiles[0].id, tiles[1].id, tiles[2].id], [tiles[3].id]]},
    )
    left = []

    def run_unit(job, unit, executor, should_stop):  # the unit's own work is not at issue
        left.append(sorted(p.name for p in download.iterdir()))
        return {"seconds": 0.0, "files": [], "phases": {}}

    monkeypatch.setattr(array_task, "run_unit", run_unit)
    assert array_task.run_task(job, 0, lambda: False) == 3
    both = ["sections-0-16", "sections-16-32"]
    assert left == [both, both, (["sections-16-32"] if cleanup else both)]
    assert array_task.run_task(job, 1, lambda: False) == 1
    assert sorted(p.name for p in download.iterdir()) == ([] if cleanup else both)
    # A z range that is gone already is left alone.
    assert array_task.release_sections(job.run, tiles, download, tiles[0]) != cleanup
