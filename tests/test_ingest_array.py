"""``ingest --array N`` on the local Slurm and Swift: the same objects as a single ingest,
whatever the split, and a rerun after a cancelled task finishes the run.

The bundled example (examples/brain-stack, 16 sections) is the source; small
chunks make several units of it.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from hbp_image_tasks import array_job, array_state, ingest

pytestmark = pytest.mark.swift

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "brain-stack"
FILTER = r"brain-stack/brain_s\d+\.png"
PARAMETERS = {"chunk_size": 16, "voxel_size": [20, 20, 20], "voxel_unit": "um"}


def example_container(local_swift, public: bool):
    """Yields the URL of a container holding the bundled example stack."""
    import uuid

    name = f"array-example-{uuid.uuid4().hex[:8]}"
    objects = {f"brain-stack/{p.name}": p.read_bytes() for p in sorted(EXAMPLE.glob("*.png"))}
    yield local_swift.create_container(name, objects, public)
    local_swift.delete_container(name)


@pytest.fixture(scope="module")
def example_source(local_swift):
    """A public container holding the bundled example stack; returns its URL."""
    yield from example_container(local_swift, public=True)


@pytest.fixture(scope="module")
def private_example_source(local_swift):
    """The example stack in a private container, read with --source-private."""
    yield from example_container(local_swift, public=False)


def argv_for(
    source: str, work: Path, container: str, *extra: str, parameters: dict = PARAMETERS
) -> list[str]:
    return [
        "--source",
        source,
        "--stacks",
        "--filter",
        FILTER,
        "--download-dir",
        str(work / "source"),
        "--results-dir",
        str(work / "results"),
        "--parameters",
        json.dumps(parameters),
        "--container",
        container,
        "--jobs",
        "1",
        *extra,
    ]


@pytest.fixture
def cluster_env(local_slurm, swift_settings_file, monkeypatch):
    """The environment the jobs inherit: this cluster, the test Swift, this package."""
    monkeypatch.setenv("SLURM_CONF", str(local_slurm.slurm_conf))
    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    package_root = str(Path(__file__).resolve().parent.parent)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    )
    return local_slurm


def listing(connection, container: str) -> dict[str, str]:
    """Returns name -> MD5 of every object in ``container``."""
    _, objects = connection.get_container(container, full_listing=True)
    return {o["name"]: o["hash"] for o in objects}


@pytest.fixture(scope="module")
def reference_listings(local_swift, example_source, tmp_path_factory, swift_settings_file):
    """Returns what one ``ingest`` process publishes from the example, per parameters."""
    import uuid

    made: dict[str, dict[str, str]] = {}

    def listing_for(parameters: dict) -> dict[str, str]:
        key = json.dumps(parameters, sort_keys=True)
        if key not in made:
            container = f"array-reference-{uuid.uuid4().hex[:8]}"
            work = tmp_path_factory.mktemp("single")
            previous = os.environ.get("SWIFT_SETTINGS")
            os.environ["SWIFT_SETTINGS"] = str(swift_settings_file)
            try:
                argv = argv_for(example_source, work, container, parameters=parameters)
                assert ingest.main(argv) == 0
            finally:
                if previous is None:
                    del os.environ["SWIFT_SETTINGS"]
                else:
                    os.environ["SWIFT_SETTINGS"] = previous
            connection = local_swift.connection()
            made[key] = listing(connection, container)
            connection.close()
            local_swift.delete_container(container)
        return made[key]

    return listing_for


@pytest.fixture
def single_ingest_listing(reference_listings):
    return reference_listings(PARAMETERS)


# Shards of 2 x 2 x 1 chunks: the units' tiles lie on shard boxes, so each unit
# assembles and uploads its own scale-0 shards.
SHARDED = {**PARAMETERS, "sharding": True, "shard_size": 16384}


@pytest.mark.parametrize(
    "parameters, private",
    [(PARAMETERS, False), (SHARDED, True)],
    ids=["chunk-files", "sharded-private-source"],
)
def test_array_publishes_the_same_objects_as_a_single_ingest(
    cluster_env,
    request,
    reference_listings,
    unique_container,
    swift_client,
    tmp_path,
    capsys,
    parameters,
    private,
):
    container = unique_container("array")
    source = request.getfixturevalue("private_example_source" if private else "example_source")
    extra = ["--source-private"] if private else []
    # A unit budget of 768 KiB (a third of it for the PNG row reader) cuts the example
    # into 4 tiles of about 128 x 128 x 16 voxels.
    argv = argv_for(source, tmp_path, container, *extra, parameters=parameters)
    assert ingest.main(argv + ["--memory-limit", "768K", "--array", "4", "--wait"]) == 0
    published = listing(swift_client, container)
    assert published == reference_listings(parameters)
    assert any(name.endswith(".shard") for name in published) == ("sharding" in parameters)
    run = array_state.ArrayRun(tmp_path / "results")
    assert len(run.finished_units()) == 4
    assert "ingest --array finished: 4 units" in capsys.readouterr().out
    # Each task stayed within the memory its job asked Slurm for.
    asked = run.read_plan()["plan"]["unit_memory"] + array_job.JOB_BASE_BYTES
    for unit_id in run.finished_units():
        assert 0 < run.unit_record(unit_id)["peak_rss_bytes"] <= asked
    # The first section, fetched whole to plan from (it is smaller than
    # WHOLE_SECTION_BYTES), was handed to the units' z range: no unit downloaded it again.
    downloaded = [run.unit_record(u)["downloaded_sections"] for u in run.finished_units()]
    assert sum(downloaded) == len(list(EXAMPLE.glob("*.png"))) - 1
    assert sorted(p.name for p in (tmp_path / "source").iterdir()) == ["sections-0-16"]


def wait_until(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_cancelled_task_ends_the_wait_with_143_and_a_rerun_submits_only_unfinished_units(
    cluster_env, example_source, single_ingest_listing, unique_container, swift_client, tmp_path
):
    from hbp_image_tasks import slurm

    container = unique_container("array")
    argv = argv_for(example_source, tmp_path, container, "--memory-limit", "768K", "--array", "4")
    waiting = subprocess.Popen(
        [sys.executable, "-m", "hbp_image_tasks.ingest", *argv, "--wait"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    run = array_state.ArrayRun(tmp_path / "results")

    def submitted():
        assert waiting.poll() is None, waiting.communicate()[0]
        return run.submissions() and run.read_submission(1)["finish_job"]

    wait_until(submitted, what="the submission")
    first = run.read_submission(1)
    assert len(first["tasks"]) == 4

    def running_unfinished_task():
        for task in slurm.show_job(first["array_job"]):
            index = task.get("ArrayTaskId", "")
            if task.get("JobState") == "RUNNING" and index.isdigit():
                if not set(first["tasks"][int(index)]) & run.finished_units():
                    return index
        return None

    index = wait_until(running_unfinished_task, what="a running task")
    subprocess.run(["scancel", f"{first['array_job']}_{index}"], check=True)
    # afterok can no longer hold: the finishing job never runs, and --wait says why.
    output = waiting.communicate(timeout=300)[0]
    assert waiting.returncode == 143, output
    assert f"task-{first['array_job']}_{index}" in output and "run the same command" in output
    assert slurm.wait(first["finish_job"], poll_seconds=0.5) in ("CANCELLED", slurm.NEVER_RUNS)
    slurm.wait(first["array_job"], poll_seconds=0.5)
    finished = run.finished_units()
    assert len(finished) < 4

    assert ingest.main(argv + ["--wait"]) == 0
    second = run.read_submission(2)
    resubmitted = [unit for task in second["tasks"] for unit in task]
    assert sorted(resubmitted) == sorted(set(first_units(first)) - finished)
    assert listing(swift_client, container) == single_ingest_listing


def test_with_cleanup_units_delete_what_they_uploaded_and_a_lost_object_runs_its_unit_again(
    cluster_env,
    example_source,
    single_ingest_listing,
    unique_container,
    swift_client,
    tmp_path,
    caplog,
):
    from hbp_image_tasks import layout, slurm

    container = unique_container("array")
    argv = argv_for(
        example_source, tmp_path, container, "--memory-limit", "768K", "--array", "4", "--cleanup"
    )
    # Held jobs: the units run once released, the finishing job when the test says.
    assert ingest.main(argv + ["--sbatch-option=--hold"]) == 0
    run = array_state.ArrayRun(tmp_path / "results")
    first = run.read_submission(1)
    subprocess.run(["scontrol", "release", first["array_job"]], check=True)
    assert slurm.wait(first["array_job"], poll_seconds=0.5) == "COMPLETED"

    results = tmp_path / "results"
    released = layout.read_released(results)
    assert sorted(released) == sorted(run.finished_units()) and len(released) == 4
    published = listing(swift_client, container)
    for unit_id, record in released.items():
        assert record["objects"] == run.unit_record(unit_id)["files"]
        for entry in record["objects"]:
            assert published[entry["name"]] == entry["md5"]
    # Of the dataset's files only 'info' is on disk: every chunk went once uploaded.
    on_disk = [p.relative_to(results) for p in results.rglob("*") if p.is_file()]
    assert [str(p) for p in on_disk if not str(p).startswith(".")] == ["info"]

    # A released object is lost from the container before the finishing job runs.
    lost_unit = sorted(released)[0]
    lost = released[lost_unit]["objects"][0]["name"]
    swift_client.delete_object(container, lost)
    subprocess.run(["scontrol", "release", first["finish_job"]], check=True)
    assert slurm.wait(first["finish_job"], poll_seconds=0.5) == "FAILED"
    (outcome,) = run.outcomes("finish").values()
    assert outcome["exit_code"] == 5
    assert f"{lost}: missing" in outcome["message"]
    assert f"their 1 unit(s) are marked unfinished (e.g. {lost_unit})" in outcome["message"]
    assert run.finished_units() == set(released) - {lost_unit}
    assert layout.conversion_status(results).kind == layout.UNFINISHED

    # Another container would lack the deleted files: refused before anything is submitted.
    caplog.clear()
    elsewhere = argv_for(
        example_source, tmp_path, unique_container("other"), "--array", "4", "--cleanup"
    )
    assert ingest.main(elsewhere + ["--memory-limit", "768K", "--wait"]) == 2
    assert f"were deleted after their upload to container {container} " in caplog.text
    assert run.submissions() == [1]

    # The same command converts that unit again, and publishes the whole dataset.
    caplog.clear()
    assert ingest.main(argv + ["--wait"]) == 0
    assert ", 3 finished, 1 left for 1 task(s)" in caplog.text
    assert listing(swift_client, container) == single_ingest_listing
    assert not results.exists()  # --cleanup, after the verification


def first_units(record: dict) -> list[str]:
    return [unit for task in record["tasks"] for unit in task]


@pytest.fixture
def no_slurm_path(monkeypatch, tmp_path):
    """A PATH with Python but without sbatch."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))


def test_no_sbatch_on_path_fails_before_anything_is_written(
    example_source, swift_settings_file, monkeypatch, no_slurm_path, tmp_path, caplog
):
    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    argv = argv_for(example_source, tmp_path, "never-made", "--array", "2")
    assert ingest.main(argv) == 2
    assert "sbatch not found on PATH" in caplog.text
    assert not (tmp_path / "results" / array_state.DIRECTORY).exists()


def test_more_tasks_than_units_or_a_plan_of_other_inputs_are_refused_before_submitting(
    cluster_env, example_source, tmp_path, caplog
):
    argv = argv_for(example_source, tmp_path, "never-made", "--memory-limit", "768K")
    assert ingest.main(argv + ["--array", "5"]) == 2
    assert "--array 5: the plan has only 4 unit(s)" in caplog.text
    run = array_state.ArrayRun(tmp_path / "results")
    assert run.read_plan() is not None and run.submissions() == []

    other = [a.replace('"chunk_size": 16', '"chunk_size": 32') for a in argv]
    assert ingest.main(other + ["--array", "2"]) == 2
    assert "holds the plan of an --array run with other inputs (changed: parameters)" in (
        caplog.text
    )
    assert run.submissions() == []


def test_dry_run_prints_the_units_and_sbatch_lines_and_writes_nothing(
    example_source, swift_settings_file, monkeypatch, tmp_path, capsys
):
    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    argv = argv_for(example_source, tmp_path, "never-made", "--memory-limit", "768K")
    argv += ["--array", "3", "--dry-run", "--sbatch-option=--time=0:10:00"]
    assert ingest.main(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert len(plan["units"]) == 4 and [len(t) for t in plan["tasks"]] == [2, 1, 1]
    array_line, finish_line = plan["sbatch"]
    assert "--array=0-2" in array_line and "--time=0:10:00" in array_line
    assert "--dependency=afterok:" in finish_line and "array_task finish" in finish_line
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def with_text_chunk(png: bytes, size: int) -> bytes:
    """Returns ``png`` with a tEXt chunk of ``size`` bytes after its IHDR (none for 0)."""
    if not size:
        return png
    data = b"comment\0" + b"x" * size
    crc = zlib.crc32(b"tEXt" + data)
    return (
        png[:33] + struct.pack(">I", len(data)) + b"tEXt" + data + struct.pack(">I", crc) + png[33:]
    )


def section_as(png: bytes, suffix: str) -> bytes:
    """Returns an example section as ``suffix``: a PNG with a 200 KB text chunk before
    its pixels, a TIFF written by libtiff (its directory at the end) or a JPEG."""
    import io

    from PIL import Image

    if suffix == ".png":
        return with_text_chunk(png, 200_000)
    out = io.BytesIO()
    with Image.open(io.BytesIO(png)) as image:
        if suffix == ".tif":
            image.save(out, format="TIFF", compression="tiff_lzw")
        else:
            image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.mark.parametrize("suffix", [".png", ".tif", ".jpg"])
def test_the_plan_reads_only_the_first_sections_header_by_ranges(
    make_container, swift_settings_file, monkeypatch, tmp_path, capsys, caplog, suffix
):
    objects = {
        f"brain-stack/{p.stem}{suffix}": section_as(p.read_bytes(), suffix)
        for p in EXAMPLE.glob("*.png")
    }
    source = make_container(objects)
    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    argv = argv_for(source.url, tmp_path, "never-made", "--memory-limit", "768K")
    argv[argv.index(FILTER)] = rf"brain-stack/brain_s\d+\{suffix}"
    argv += ["--array", "2", "--dry-run"]
    monkeypatch.setattr(array_job, "WHOLE_SECTION_BYTES", 1 << 30)  # the whole first section
    assert ingest.main(argv) == 0
    from_whole_section = json.loads(capsys.readouterr().out)
    assert "planning from the header" not in caplog.text
    monkeypatch.setattr(array_job, "WHOLE_SECTION_BYTES", 0)
    caplog.clear()
    assert ingest.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == from_whole_section
    assert f"planning from the header of brain-stack/brain_s1{suffix} (" in caplog.text
    assert not (tmp_path / "source").exists()  # nothing fetched whole


def test_a_rerun_while_the_earlier_jobs_wait_is_refused(
    cluster_env, example_source, unique_container, tmp_path, caplog
):
    from hbp_image_tasks import slurm

    argv = argv_for(example_source, tmp_path, unique_container("array"), "--memory-limit", "768K")
    argv += ["--array", "2", "--sbatch-option=--begin=now+1hour"]
    assert ingest.main(argv) == 0
    run = array_state.ArrayRun(tmp_path / "results")
    first = run.read_submission(1)
    try:
        assert ingest.main(argv) == 2
        assert f"job {first['array_job']} of the earlier submission is still PENDING" in (
            caplog.text
        )
        assert run.submissions() == [1]
    finally:
        slurm.cancel(first["array_job"])
        slurm.cancel(first["finish_job"])


def volume_bytes(suffix: str, segmentation: bool) -> bytes:
    """Returns a small NIfTI volume (signed brain-like image, or labels) as file bytes."""
    import gzip

    import nibabel
    import numpy as np

    z, y, x = np.mgrid[0:40, 0:60, 0:70].astype(np.float32)
    radius = ((x - 35) / 30) ** 2 + ((y - 30) / 26) ** 2 + ((z - 20) / 18) ** 2
    if segmentation:
        volume = (np.floor(radius * 5) * (radius < 1)).astype(np.uint16)
    else:
        volume = (900 * np.sin(6 * radius) * (radius < 1) - 40).astype(np.int16)
    image = nibabel.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.5, 0.5, 0.5, 1]))
    data = image.to_bytes()
    return gzip.compress(data, mtime=0) if suffix == ".nii.gz" else data


@pytest.mark.parametrize(
    "suffix, segmentation, extra",
    [
        (".nii.gz", False, ["--array", "2"]),
        (".nii", True, ["--memory-limit", "512K", "--array", "3"]),
    ],
    ids=["compressed-image", "labels-in-tiles"],
)
def test_array_of_a_volume_publishes_the_same_objects_as_a_single_ingest(
    cluster_env, local_swift, unique_container, swift_client, tmp_path, suffix, segmentation, extra
):
    source = unique_container("volume-source")
    url = local_swift.create_container(
        source, {f"brain{suffix}": volume_bytes(suffix, segmentation)}
    )
    parameters = {"chunk_size": 16, **({"type": "segmentation"} if segmentation else {})}

    def argv(work: Path, container: str) -> list[str]:
        return [
            "--source", f"{url}/brain{suffix}",
            "--download-dir", str(work / "source"), "--results-dir", str(work / "results"),
            "--parameters", json.dumps(parameters), "--container", container, "--jobs", "1",
        ]  # fmt: skip

    single, array = unique_container("volume-single"), unique_container("volume-array")
    assert ingest.main(argv(tmp_path / "single", single)) == 0
    assert ingest.main(argv(tmp_path / "array", array) + extra + ["--wait"]) == 0
    published = listing(swift_client, array)
    assert published == listing(swift_client, single)
    assert "info" in published and len(published) > 10
    run = array_state.ArrayRun(tmp_path / "array" / "results")
    assert len(run.finished_units()) >= int(extra[-1])
    # The tasks read the one volume the submission fetched; none fetched sections.
    assert not list((tmp_path / "array" / "source").glob("sections-*"))
