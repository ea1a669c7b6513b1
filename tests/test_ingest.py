"""ingest end to end against the local Swift + Keystone: results, resuming, signals, pre-flight.

Datasets are read back anonymously over HTTP from the output container's
public URL, as a viewer would, and compared voxel by voxel with the input.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import nibabel
import numpy as np
import pytest
from PIL import Image
from precomputed_reference import assert_pyramid

from hbp_image_tasks import errors, fetch_input, ingest, layout, pool, upload_results
from hbp_image_tasks.upload_plan import check_conversion_complete

pytestmark = pytest.mark.swift

FILTER = r"data/raw/original/s\d+\.png"
DECOYS = {
    "data/raw/original/s1.png.bak": b"not a section",
    "data/raw/original/README.txt": b"sections of a test brain",
    "other/data/raw/original/s1.png": b"a section of another brain",
    "data/raw/original/sub/s1.png": b"not in the stack",
}


def smooth_stack(depth: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Returns a (Z, Y, X) uint8 stack with smooth structure and a dark background."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(
        np.linspace(-1, 1, depth),
        np.linspace(-1, 1, height),
        np.linspace(-1, 1, width),
        indexing="ij",
    )
    brain = np.clip(1.2 - (x**2 + y**2 + 0.5 * z**2), 0, 1)
    texture = rng.integers(0, 40, size=brain.shape)
    return np.where(brain > 0, 60 + 150 * brain + texture, 0).astype(np.uint8)


def png_bytes(plane: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(plane).save(buffer, format="PNG")
    return buffer.getvalue()


def stack_objects(volume: np.ndarray, with_decoys: bool = True) -> dict[str, bytes]:
    """Names s1..sN (natural order = z order) under data/raw/original/, plus decoys."""
    objects = {
        f"data/raw/original/s{z + 1}.png": png_bytes(plane) for z, plane in enumerate(volume)
    }
    if with_decoys:
        objects.update(DECOYS)
    return objects


def ingest_argv(
    source: str,
    work: Path,
    container: str | None,
    *extra: str,
    stacks: bool = True,
    parameters: dict | None = None,
) -> list[str]:
    argv = [
        "--source",
        source,
        "--download-dir",
        str(work / "source"),
        "--results-dir",
        str(work / "results"),
        "--jobs",
        "2",
        "--parameters",
        json.dumps(
            parameters or {"chunk_size": 16, "voxel_size": [20, 20, 40], "voxel_unit": "um"}
        ),
    ]
    if stacks:
        argv += ["--stacks", "--filter", FILTER]
    argv += ["--container", container] if container else ["--no-upload"]
    return argv + list(extra)


@pytest.fixture
def settings_env(monkeypatch, swift_settings_file):
    monkeypatch.setenv("SWIFT_SETTINGS", str(swift_settings_file))
    return swift_settings_file


def public_url(local_swift, container: str) -> str:
    return f"{local_swift.storage_url}/{quote(container)}"


# ------------------------------------------------------------- end to end


def test_stack_ingested_from_a_public_container_matches_the_input_at_every_scale(
    make_container, unique_container, local_swift, settings_env, tmp_path, capsys, proxy_log
):
    volume = smooth_stack(12, 40, 56)
    source = make_container(stack_objects(volume))
    output = unique_container("out")
    proxy_log.mark()
    code = ingest.main(
        ingest_argv(
            source.url, tmp_path, output, "--cleanup", "--report", str(tmp_path / "report.json")
        )
    )
    assert code == 0
    # Only the 12 sections were read, never the decoys.
    fetched = {
        e.path.split(f"/{source.name}/", 1)[1]
        for e in proxy_log.entries("GET", f"/v1/AUTH_{local_swift.project_id}/{source.name}/")
    }
    assert fetched == {f"data/raw/original/s{z}.png" for z in range(1, 13)}
    assert_pyramid(public_url(local_swift, output), volume[None], "average")
    # --cleanup after a verified upload removes both directories.
    assert not (tmp_path / "source").exists() and not (tmp_path / "results").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["status"] == "success"
    assert report["inputs"]["files"] == 12
    assert report["public_url"] == public_url(local_swift, output)
    assert "precomputed://" in report["neuroglancer_link"]
    assert report["outputs"]["chunks"] > 0
    assert report["versions"]["neuroglancer-scripts"]
    stdout = capsys.readouterr().out
    assert report["public_url"] in stdout and "Neuroglancer link" in stdout


def test_nifti_volume_from_a_single_url_becomes_a_segmentation(
    make_container, unique_container, local_swift, settings_env, tmp_path
):
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, size=(8, 10, 6)).repeat(6, 0).repeat(5, 1).repeat(9, 2)
    labels = labels.astype(np.uint16)  # (x, y, z) as nibabel stores it
    path = tmp_path / "labels.nii.gz"
    nibabel.save(nibabel.Nifti1Image(labels, np.diag([0.5, 0.5, 0.5, 1])), str(path))
    source = make_container({"volumes/labels.nii.gz": path.read_bytes()})
    output = unique_container("seg")
    code = ingest.main(
        ingest_argv(
            f"{source.url}/volumes/labels.nii.gz",
            tmp_path / "work",
            output,
            stacks=False,
            parameters={"type": "segmentation", "chunk_size": 16, "downscaling_method": "majority"},
        )
    )
    assert code == 0
    info = assert_pyramid(
        public_url(local_swift, output), labels.transpose(2, 1, 0)[None], "majority"
    )
    assert info["type"] == "segmentation"
    assert info["scales"][0]["resolution"] == [500000, 500000, 500000]


def test_cleanup_keeps_everything_after_a_failure(
    make_container, unique_container, settings_env, tmp_path, capsys
):
    volume = smooth_stack(6, 24, 24)
    objects = stack_objects(volume, with_decoys=False)
    objects["data/raw/original/s4.png"] = objects["data/raw/original/s4.png"][:60]
    source = make_container(objects)
    capsys.readouterr()
    code = ingest.main(ingest_argv(source.url, tmp_path, unique_container(), "--cleanup"))
    assert code == errors.EXIT_USAGE  # bad input, named in one line
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "s4.png" in message and "truncated" in message
    assert len(list((tmp_path / "source").rglob("s*.png"))) == 6
    assert (tmp_path / "results" / layout.INGEST_STATE_NAME).is_file()


# ------------------------------------------------------- resuming


def run_ingest(argv: list[str], env_settings: Path) -> subprocess.Popen:
    """Starts ingest in its own process (so that it can be killed)."""
    env = dict(os.environ, SWIFT_SETTINGS=str(env_settings), PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "hbp_image_tasks.ingest"] + argv,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    """Polls ``condition`` until true; fails if the process ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"ingest ended (code {process.returncode}) before "
                f"the moment to kill it:\n{process.stdout.read()}"
            )
        assert time.monotonic() < deadline, "timed out waiting to kill ingest"
        time.sleep(0.01)


def kill(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)


def finish(argv: list[str], settings: Path) -> str:
    process = run_ingest(argv, settings)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


@pytest.fixture(scope="module")
def big_stack(local_swift):
    """A public container of 192 sections of 128x128 (many small transfers)."""
    from conftest import PUBLIC_READ_ACL, put_objects

    volume = smooth_stack(192, 128, 128, seed=7)
    connection = local_swift.connection()
    name = f"ingest-big-stack-{os.getpid()}"
    connection.put_container(name, headers={"X-Container-Read": PUBLIC_READ_ACL})
    put_objects(connection, name, stack_objects(volume))
    yield name, volume
    connection.close()
    local_swift.delete_container(name)


# 32^3 chunks of the big stack: 4 x 4 x 6 at scale 0, about 120 objects in all.
FEW_CHUNKS = {"chunk_size": 32, "voxel_size": [20, 20, 40], "voxel_unit": "um"}


def section_paths(local_swift, container: str) -> str:
    return f"/v1/AUTH_{local_swift.project_id}/{container}/data/raw/original/s"


def test_killed_during_download_resumes_without_fetching_a_file_twice(
    big_stack, local_swift, swift_settings_file, unique_container, tmp_path, proxy_log
):
    container, volume = big_stack
    # Many sections, few chunks: the download is what gets killed.
    argv = ingest_argv(
        public_url(local_swift, container), tmp_path, unique_container(), parameters=FEW_CHUNKS
    )
    argv[argv.index("--jobs") + 1] = "1"
    argv += ["--transfers", "1"]  # one transfer at a time: time to stop it mid-way
    downloaded = tmp_path / "source" / "data" / "raw" / "original"
    process = run_ingest(argv, swift_settings_file)
    wait_for(lambda: downloaded.is_dir() and len(list(downloaded.glob("s*.png"))) >= 20, process)
    kill(process)
    complete = len(list(downloaded.glob("s*.png")))
    assert complete < len(volume), "the download finished before the kill"
    proxy_log.mark()
    argv[argv.index("--jobs") + 1] = "2"
    finish(argv, swift_settings_file)
    gets = proxy_log.count("GET", section_paths(local_swift, container))
    assert gets == len(volume) - complete
    assert_pyramid(
        public_url(local_swift, argv[argv.index("--container") + 1]), volume[None], "average"
    )


def chunk_files(results: Path) -> dict[str, int]:
    return {
        str(p.relative_to(results)): p.stat().st_mtime_ns
        for p in results.rglob("*")
        if p.is_file() and not p.name.startswith(".")
    }


def test_killed_during_conversion_resumes_at_the_last_saved_slab_with_the_same_output(
    big_stack, local_swift, swift_settings_file, tmp_path
):
    container, volume = big_stack
    source = public_url(local_swift, container)
    argv = ingest_argv(source, tmp_path / "killed", None)
    argv[argv.index("--jobs") + 1] = "1"
    results = tmp_path / "killed" / "results"
    state = results / layout.CONVERSION_STATE_NAME

    def some_slabs_saved() -> bool:
        try:
            return json.loads(state.read_text()).get("slabs_done", 0) >= 2
        except (OSError, ValueError):
            return False

    process = run_ingest(argv, swift_settings_file)
    wait_for(some_slabs_saved, process)
    kill(process)
    saved = json.loads(state.read_text())
    with pytest.raises(errors.InputError, match="conversion has not finished"):
        check_conversion_complete(results)  # the check upload_results runs first
    before = chunk_files(results)
    output = finish(argv, swift_settings_file)
    assert "fetch: already done in an earlier run" in output
    assert f"at slab {saved['slabs_done'] + 1}/" in output
    after = chunk_files(results)
    # Chunks of the slabs saved before the kill were not written again (a slab
    # is at least one chunk deep).
    scale0 = json.loads((results / "info").read_text())["scales"][0]
    done_z = saved["slabs_done"] * scale0["chunk_sizes"][0][2]
    kept = [
        name
        for name in before
        if name.split("/")[0] == scale0["key"]
        and int(name.rsplit("_", 1)[1].split("-")[1].split(".")[0]) <= done_z
    ]
    assert kept and all(after[name] == before[name] for name in kept)
    # Same dataset as a run that was never interrupted.
    reference = tmp_path / "reference"
    finish(ingest_argv(source, reference, None), swift_settings_file)
    reference_files = chunk_files(reference / "results")
    assert set(after) == set(reference_files)
    for name in after:
        assert (results / name).read_bytes() == (reference / "results" / name).read_bytes(), name


def puts_so_far(proxy_log, prefix: str) -> int:
    """Counts PUT lines since the mark without waiting for the log to settle."""
    with open(proxy_log.path, "rb") as handle:
        handle.seek(proxy_log.start)
        text = handle.read().decode("utf-8", "replace")
    return sum(1 for line in text.splitlines() if f" PUT {prefix}" in line)


def test_killed_during_upload_resumes_sending_only_the_missing_objects(
    big_stack, local_swift, swift_settings_file, swift_client, unique_container, tmp_path, proxy_log
):
    container, volume = big_stack
    output = unique_container("out")
    argv = ingest_argv(public_url(local_swift, container), tmp_path, output, parameters=FEW_CHUNKS)
    argv[argv.index("--jobs") + 1] = "1"
    argv += ["--transfers", "1"]  # one transfer at a time: time to stop it mid-way
    prefix = f"/v1/AUTH_{local_swift.project_id}/{output}/"
    proxy_log.mark()
    process = run_ingest(argv, swift_settings_file)
    wait_for(lambda: puts_so_far(proxy_log, prefix) >= 30, process)
    kill(process)
    _, present = swift_client.get_container(output, full_listing=True)
    total = len(chunk_files(tmp_path / "results"))
    assert len(present) < total, "the upload finished before the kill"
    proxy_log.mark()
    log = finish(argv, swift_settings_file)
    assert "convert: already done in an earlier run" in log
    assert proxy_log.count("GET", section_paths(local_swift, container)) == 0
    puts = [e for e in proxy_log.entries("PUT", prefix) if e.path != prefix.rstrip("/")]
    assert len(puts) == total - len(present)
    assert_pyramid(public_url(local_swift, output), volume[None], "average")


def test_sigterm_saves_the_state_and_exits_with_the_interrupted_code(
    big_stack, local_swift, swift_settings_file, tmp_path
):
    container, volume = big_stack
    argv = ingest_argv(public_url(local_swift, container), tmp_path, None)
    argv[argv.index("--jobs") + 1] = "1"
    argv += ["--transfers", "1"]  # one transfer at a time: time to stop it mid-way
    downloaded = tmp_path / "source" / "data" / "raw" / "original"
    process = run_ingest(argv, swift_settings_file)
    wait_for(lambda: downloaded.is_dir() and len(list(downloaded.glob("s*.png"))) >= 10, process)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == errors.EXIT_INTERRUPTED, output
    assert "submit the same command again to resume" in output
    assert not list(downloaded.glob(".*.tmp"))  # nothing half-written left
    state = json.loads((tmp_path / "results" / layout.INGEST_STATE_NAME).read_text())
    assert not state["steps"].get("fetch", {}).get("done")
    finish(argv, swift_settings_file)


# ------------------------------------------------------- pre-flight


def test_other_inputs_in_the_same_results_dir_are_refused_until_restart(
    make_container, settings_env, tmp_path, capsys
):
    volume = smooth_stack(4, 16, 16)
    source = make_container(stack_objects(volume, with_decoys=False))
    assert ingest.main(ingest_argv(source.url, tmp_path, None)) == 0
    changed = ingest_argv(source.url, tmp_path, None, parameters={"chunk_size": 32})
    capsys.readouterr()
    assert ingest.main(changed) == errors.EXIT_USAGE
    message = capsys.readouterr().err
    assert "changed: parameters" in message and "--restart" in message
    assert ingest.main(changed + ["--restart"]) == 0
    info = json.loads((tmp_path / "results" / "info").read_text())
    assert info["scales"][0]["chunk_sizes"][0][0] == 32


def test_rerun_to_another_container_uploads_again_without_converting_again(
    make_container, unique_container, swift_client, settings_env, tmp_path, caplog
):
    volume = smooth_stack(4, 16, 16)
    source = make_container(stack_objects(volume, with_decoys=False))
    first, second = unique_container("first"), unique_container("second")
    assert ingest.main(ingest_argv(source.url, tmp_path, first)) == 0
    caplog.clear()
    assert ingest.main(ingest_argv(source.url, tmp_path, second)) == 0
    assert "convert: already done in an earlier run" in caplog.text
    assert "upload: already done" not in caplog.text

    def names(container: str) -> list[str]:
        return sorted(
            o["name"] for o in swift_client.get_container(container, full_listing=True)[1]
        )

    assert names(second) == names(first) and "info" in names(second)


def test_private_source_is_read_and_published_with_one_login(
    make_container, unique_container, local_swift, settings_env, tmp_path, capsys, monkeypatch
):
    from keystoneauth1.identity import v3

    volume = smooth_stack(12, 40, 56)
    source = make_container(stack_objects(volume), public=False)
    output = unique_container("out")
    code, error = preflight_failure(ingest_argv(source.url, tmp_path, output), capsys)
    assert code == errors.EXIT_SOURCE and nothing_downloaded(tmp_path)
    assert source.name in error and "--source-private" in error
    logins = []
    log_in = v3.Password.get_auth_ref
    monkeypatch.setattr(
        v3.Password, "get_auth_ref", lambda self, *a, **k: logins.append(1) or log_in(self, *a, **k)
    )
    assert ingest.main(ingest_argv(source.url, tmp_path, output, "--source-private")) == 0
    # The account check, the listing, the downloads and the upload share one token.
    assert len(logins) == 1
    assert_pyramid(public_url(local_swift, output), volume[None], "average")


@pytest.mark.parametrize(
    "extra, fetching, uploading",
    [
        ((), fetch_input.DEFAULT_JOBS, upload_results.default_upload_jobs()),
        (("--transfers", "3"), 3, 3),
    ],
    ids=["defaults", "transfers-3"],
)
def test_one_worker_still_downloads_and_uploads_in_parallel(
    make_container,
    unique_container,
    settings_env,
    tmp_path,
    monkeypatch,
    extra,
    fetching,
    uploading,
):
    widths: dict[str, set[int]] = {}
    real_run_bounded = pool.run_bounded

    def recording(items, work, *, jobs, what, **kwargs):
        widths.setdefault(what, set()).add(jobs)
        return real_run_bounded(items, work, jobs=jobs, what=what, **kwargs)

    monkeypatch.setattr(pool, "run_bounded", recording)
    monkeypatch.setattr(upload_results, "run_bounded", recording)
    source = make_container(stack_objects(smooth_stack(4, 16, 16), with_decoys=False))
    argv = ingest_argv(source.url, tmp_path, unique_container(), *extra)
    argv[argv.index("--jobs") + 1] = "1"
    assert ingest.main(argv) == 0
    assert widths["fetching"] == {fetching}
    assert widths["uploading"] == {uploading}


@pytest.fixture
def small_source(make_container):
    return make_container(stack_objects(smooth_stack(3, 8, 8), with_decoys=False))


def preflight_failure(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = ingest.main(argv)
    return code, capsys.readouterr().err


def nothing_downloaded(work: Path) -> bool:
    return not list((work / "source").rglob("*.png"))


def test_unprotected_settings_file_fails_before_any_download(
    small_source, swift_settings_file, unique_container, tmp_path, capsys, monkeypatch
):
    settings = tmp_path / "settings.json"
    settings.write_text(swift_settings_file.read_text())
    settings.chmod(0o644)
    monkeypatch.setenv("SWIFT_SETTINGS", str(settings))
    code, message = preflight_failure(
        ingest_argv(small_source.url, tmp_path, unique_container()), capsys
    )
    assert code == errors.EXIT_USAGE and f"chmod 600 {settings}" in message
    assert nothing_downloaded(tmp_path)


def test_refused_credentials_fail_before_any_download(
    small_source, swift_settings_file, unique_container, tmp_path, capsys, monkeypatch
):
    data = json.loads(swift_settings_file.read_text())
    data["os_password"] = "wrong-password"
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps(data))
    settings.chmod(0o600)
    monkeypatch.setenv("SWIFT_SETTINGS", str(settings))
    code, message = preflight_failure(
        ingest_argv(small_source.url, tmp_path, unique_container()), capsys
    )
    assert code == errors.EXIT_UPLOAD and "authentication" in message
    assert "wrong-password" not in message
    assert nothing_downloaded(tmp_path)


@pytest.mark.parametrize(
    "parameters, key",
    [
        ({"encodingg": "raw"}, "encodingg"),
        ({"type": "image", "encoding": "compressed_segmentation"}, "encoding"),
    ],
)
def test_bad_parameters_fail_before_any_download(
    small_source, settings_env, unique_container, tmp_path, capsys, parameters, key
):
    code, message = preflight_failure(
        ingest_argv(small_source.url, tmp_path, unique_container(), parameters=parameters), capsys
    )
    assert code == errors.EXIT_USAGE and key in message
    assert nothing_downloaded(tmp_path)


def test_bad_container_name_is_a_usage_error(small_source, settings_env, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        ingest.main(ingest_argv(small_source.url, tmp_path, "a/b"))
    assert exit_info.value.code == errors.EXIT_USAGE


def test_source_private_without_stacks_is_a_usage_error(tmp_path, settings_env, capsys):
    argv = ingest_argv("https://example.org/v.nii.gz", tmp_path, None, stacks=False)
    code, error = preflight_failure(argv + ["--source-private"], capsys)
    assert code == errors.EXIT_USAGE and "--source-private" in error and "--stacks" in error


def test_unwritable_download_dir_fails_fast(
    small_source, settings_env, unique_container, tmp_path, capsys
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ingest_argv(small_source.url, tmp_path, unique_container())
    argv[argv.index("--download-dir") + 1] = str(blocker / "source")
    code, message = preflight_failure(argv, capsys)
    assert code == errors.EXIT_USAGE and str(blocker) in message


def test_too_little_free_disk_fails_before_any_download(
    small_source, settings_env, unique_container, tmp_path, capsys, monkeypatch
):
    real = ingest.shutil.disk_usage
    monkeypatch.setattr(ingest.shutil, "disk_usage", lambda path: real(path)._replace(free=100))
    code, message = preflight_failure(
        ingest_argv(small_source.url, tmp_path, unique_container()), capsys
    )
    assert code == errors.EXIT_USAGE and "not enough free disk" in message
    assert nothing_downloaded(tmp_path)


def test_filter_matching_nothing_says_what_was_listed(
    small_source, settings_env, unique_container, tmp_path, capsys
):
    argv = ingest_argv(small_source.url, tmp_path, unique_container())
    argv[argv.index("--filter") + 1] = r"data/raw/original/pm\d+\.png"
    code, message = preflight_failure(argv, capsys)
    assert code == errors.EXIT_USAGE
    # The listing was narrowed to the regex's literal prefix, and says so.
    assert "0 object(s) listed" in message
    assert "prefix 'data/raw/original/pm'" in message and r"pm\\d+" in message


def test_dry_run_writes_nothing(
    small_source, settings_env, unique_container, tmp_path, capsys, swift_client
):
    output = unique_container()
    code = ingest.main(ingest_argv(small_source.url, tmp_path, output, "--dry-run"))
    assert code == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["objects"] == 3
    assert not (tmp_path / "source").exists() and not (tmp_path / "results").exists()
    assert swift_client.get_account(prefix=output)[1] == []
