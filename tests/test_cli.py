"""Shared command-line plumbing: exit codes, job counts, progress lines, redaction."""

from __future__ import annotations

import argparse
import io
import logging

import pytest

from hbp_image_tasks import cli, errors
from hbp_image_tasks.progress import Progress, format_bytes, format_duration


def namespace(verbose: int = 0, quiet: int = 0) -> argparse.Namespace:
    return argparse.Namespace(verbose=verbose, quiet=quiet)


@pytest.mark.parametrize(
    "error, code",
    [
        (errors.UsageError("bad option"), 2),
        (errors.SettingsError("bad settings"), 2),
        (errors.FetchError("404"), 3),
        (errors.ConversionError("corrupt"), 4),
        (errors.UploadError("403"), 5),
        (errors.Interrupted("stop", signal_number=15), 143),
        (errors.Interrupted("stop", signal_number=2), 130),
    ],
)
def test_run_command_maps_each_error_to_its_exit_code_and_one_line(error, code):
    stream = io.StringIO()

    def work(redactor):
        raise error

    assert cli.run_command(work, namespace(), stream=stream) == code
    lines = stream.getvalue().strip().splitlines()
    assert len(lines) == 1 and str(error) in lines[0]


def test_unexpected_error_is_one_line_without_verbose_and_a_traceback_with_it():
    def work(redactor):
        raise ValueError("boom")

    quiet, verbose = io.StringIO(), io.StringIO()
    assert cli.run_command(work, namespace(), stream=quiet) == errors.EXIT_INTERNAL
    assert cli.run_command(work, namespace(verbose=1), stream=verbose) == 1
    assert len(quiet.getvalue().strip().splitlines()) == 1
    assert "Traceback" not in quiet.getvalue()
    assert "Traceback" in verbose.getvalue()


def test_registered_secret_is_hidden_in_messages_and_tracebacks():
    stream = io.StringIO()

    def work(redactor):
        redactor.add("s3cr3t-value")
        logging.getLogger("test").debug("password is %s", "s3cr3t-value")
        raise RuntimeError("auth failed for s3cr3t-value")

    cli.run_command(work, namespace(verbose=2), stream=stream)
    output = stream.getvalue()
    assert "s3cr3t-value" not in output
    assert "password is ***" in output and "Traceback" in output


def test_default_jobs_honours_slurm_allocation(monkeypatch):
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "7")
    assert cli.default_jobs() == 7
    monkeypatch.delenv("SLURM_CPUS_PER_TASK")
    monkeypatch.delenv("HBP_JOBS", raising=False)
    import os

    assert cli.default_jobs() == len(os.sched_getaffinity(0))


def test_progress_without_tty_logs_counts_bytes_and_rate(caplog):
    caplog.set_level(logging.INFO)
    with Progress("fetch", total=4, total_bytes=4096, interval=0.05, use_tty=False) as progress:
        for _ in range(3):
            progress.update(1, 1024)
        progress.add_retry()
    final = caplog.records[-1].getMessage()
    assert final.startswith("fetch: 3/4 files, 3.0 KiB/4.0 KiB")
    assert "files/s" in final and "1 retries" in final
    assert "\r" not in caplog.text and "\x1b" not in caplog.text


def test_progress_with_nothing_to_do_logs_no_final_line(caplog):
    caplog.set_level(logging.INFO)
    with Progress("uploading", total=0, unit="objects", interval=60, use_tty=False):
        pass
    with Progress("chunks", total=2, unit="chunks", interval=60, use_tty=False) as progress:
        progress.update(2)
    assert [record.getMessage().split(":")[0] for record in caplog.records] == ["chunks"]


def test_human_formats():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 1024**3) == "3.0 GiB"
    assert format_duration(3723) == "1h02m03s"
    assert format_duration(65) == "1m05s"


def test_sigterm_becomes_a_stop_request_and_interrupted_gets_its_exit_code():
    import os
    import signal

    with pytest.raises(errors.Interrupted) as caught:
        with cli.stop_on_signals() as stop:
            assert not stop()
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop() and stop.signal_number == signal.SIGTERM
            raise errors.Interrupted("stopped after slab 3")
    assert caught.value.exit_code == errors.EXIT_INTERRUPTED
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_second_sigint_stops_at_once():
    import os
    import signal

    with pytest.raises(KeyboardInterrupt):
        with cli.stop_on_signals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop.signal_number == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)


def _options(parser: argparse.ArgumentParser, group_title: str) -> dict[str, tuple]:
    """Returns the options of one group: flag -> what ``--help`` and parsing show of it."""
    (group,) = [g for g in parser._action_groups if g.title == group_title]
    return {
        action.option_strings[-1]: (
            action.dest,
            action.help,
            action.default,
            action.type,
            action.choices,
            action.metavar,
        )
        for action in group._group_actions
    }


@pytest.mark.parametrize(
    "step, group_title, own_options",
    [
        ("fetch_input", "fetching the input", {"--jobs", "--force", "--dry-run", "--output"}),
        ("ingest_ngs", "conversion", {"--jobs"}),
        ("upload_results", "upload to Swift", {"--dry-run", "--container"}),
    ],
)
def test_ingest_offers_each_step_option_exactly_as_the_step_command_does(
    step, group_title, own_options
):
    import importlib

    from hbp_image_tasks import ingest

    step_module = importlib.import_module(f"hbp_image_tasks.{step}")
    if hasattr(step_module, "build_parser"):
        step_parser = step_module.build_parser()
    else:  # ingest_ngs builds its parser inside parse_command_line
        step_parser = argparse.ArgumentParser()
        step_module.add_conversion_options(step_parser)
    shared = _options(step_parser, group_title)
    in_ingest = _options(ingest.build_parser(), group_title)
    # The destination is --download-dir in ingest; --settings reads both source and target.
    renamed = {"--destination": "--download-dir"}
    for flag, seen in shared.items():
        if flag in own_options or (flag == "--settings" and step == "fetch_input"):
            continue
        assert in_ingest[renamed.get(flag, flag)] == seen, flag
    # ingest's own variants: its --container may be left out with --no-upload.
    if step == "upload_results":
        container = ingest.build_parser().parse_args(
            ["--source", "s", "--download-dir", "d", "--results-dir", "r", "--no-upload"]
        )
        assert container.container is None
