"""Shared command-line plumbing: logging options, job counts, error-to-exit-code mapping.

Every console script builds its parser from these helpers and runs its work
through :func:`run_command`, so options and exit codes never drift apart.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterable, Iterator, Mapping
from typing import Callable

from . import errors

logger = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class RedactingFilter(logging.Filter):
    """Replaces every registered secret in log records by ``***``."""

    def __init__(self, secrets: Iterable[str] = ()):
        super().__init__()
        self._secrets: set[str] = {s for s in secrets if s}

    def add(self, secret: str | None) -> None:
        """Registers one more secret to hide from every later line."""
        if secret:
            self._secrets.add(secret)

    def redact(self, text: str) -> str:
        """Returns ``text`` with every registered secret replaced."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if self._secrets:
            message = self.redact(record.getMessage())
            record.msg, record.args = message, None
            if record.exc_info:
                record.exc_text = self.redact(
                    "".join(traceback.format_exception(*record.exc_info))
                ).rstrip("\n")
                record.exc_info = None
        return True


def add_logging_options(parser: argparse.ArgumentParser) -> None:
    """Adds the stacked ``-v``/``-q`` counters."""
    group = parser.add_argument_group("logging")
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="more output: -v shows debug messages and tracebacks, -vv also "
        "the HTTP libraries' debug messages (secrets are always hidden)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=0,
        help="less output: -q shows only warnings and errors (no progress), -qq only errors",
    )


def verbosity(args: argparse.Namespace) -> int:
    """Returns the net verbosity: 0 normal, >0 verbose, <0 quiet."""
    return getattr(args, "verbose", 0) - getattr(args, "quiet", 0)


def configure_logging(level: int, stream=None) -> RedactingFilter:
    """Sets up the root logger for a command run; returns its redacting filter."""
    python_level = {-2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        max(level, -2), logging.DEBUG
    )
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATE_FORMAT))
    redactor = RedactingFilter()
    handler.addFilter(redactor)
    redactor.handler = handler  # type: ignore[attr-defined]
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(python_level)
    # Third-party libraries are noisy at DEBUG; show them only from -vv on.
    library_level = logging.DEBUG if level >= 2 else max(python_level, logging.WARNING)
    for name in (
        "urllib3",
        "swiftclient",
        "keystoneauth",
        "requests",
        "PIL",
        "neuroglancer_scripts",
    ):
        logging.getLogger(name).setLevel(library_level)
    return redactor


def default_jobs() -> int:
    """Returns the CPUs this process may use, honouring Slurm's allocation."""
    for variable in ("SLURM_CPUS_PER_TASK", "HBP_JOBS"):
        value = os.environ.get(variable, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def checked_number(
    convert: Callable[[str], float],
    accept: Callable[[float], bool],
    requirement: str,
    noun: str = "a number",
) -> Callable[[str], float]:
    """Returns an argparse type: ``convert`` the text, then refuse values not ``accept``ed."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"{value:g} is not {requirement}")
        return value

    return parse


positive_int = checked_number(int, lambda value: value >= 1, ">= 1", "an integer")


def add_jobs_option(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, what: str = "parallel workers"
) -> None:
    """Adds ``--jobs N`` with the allocation-aware default."""
    parser.add_argument(
        "-j",
        "--jobs",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"number of {what} (default: the CPUs this process may use, "
        "from SLURM_CPUS_PER_TASK or the CPU affinity mask)",
    )


class StopRequest:
    """Callable flag set by SIGTERM/SIGINT; the steps poll it between work items."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signal_number: int | None = None

    def __call__(self) -> bool:
        return self._event.is_set()

    def set(self, signal_number: int) -> None:
        """Records the signal and asks the work to stop."""
        self.signal_number = signal_number
        self._event.set()


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """Turns SIGTERM and SIGINT into a stop request for the block.

    The work in flight finishes and its state is saved; a second SIGINT stops
    at once. An ``Interrupted`` raised in the block gets the signal's exit code.
    """
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(number: int, frame) -> None:
        if stop() and number == signal.SIGINT:
            raise KeyboardInterrupt
        if not stop():
            logger.warning(
                "received %s: finishing the work in flight, then saving "
                "the state (Ctrl-C again to stop at once)",
                signal.Signals(number).name,
            )
        stop.set(number)

    previous = {number: signal.signal(number, handle) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    except errors.Interrupted as exc:
        raise errors.Interrupted(str(exc), stop.signal_number) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks; shows a default only where it says something."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text.lower()
            or action.default in (None, False, "", 0)
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or isinstance(action, argparse._StoreFalseAction)
        ):
            return text
        return text + " (default: %(default)s)"


def exit_codes_help(command: str, meanings: Mapping[int, str] | None = None) -> str:
    """Returns the "exit codes:" block of ``command``'s help: only the codes it can return.

    ``meanings`` overrides the general wording of some codes for this command.
    """
    wording = {**errors.EXIT_MEANINGS, **(meanings or {})}
    lines = [f"  {code:<4} {wording[code]}" for code in errors.command_exit_codes(command)]
    return "exit codes:\n" + "\n".join(lines) + "\n"


def run_command(
    work: Callable[[RedactingFilter], int | None], args: argparse.Namespace, stream=None
) -> int:
    """Runs ``work`` with logging set up; maps failures to one line and an exit code."""
    level = verbosity(args)
    redactor = configure_logging(level, stream)
    root = logging.getLogger()
    previous_level = root.level
    try:
        result = work(redactor)
        return errors.EXIT_OK if result is None else int(result)
    except errors.HbpError as exc:
        if level >= 1:
            logger.debug("traceback", exc_info=True)
        logger.error("%s", exc)
        return exc.exit_code
    except KeyboardInterrupt:
        logger.error("interrupted; run the same command again to resume")
        return errors.EXIT_SIGINT
    except Exception as exc:  # a bug: one line, the traceback only with -v
        if level >= 1:
            logger.error("unexpected error", exc_info=True)
        else:
            logger.error(
                "unexpected error: %s: %s (run with -v for the traceback)",
                type(exc).__name__,
                redactor.redact(str(exc)),
            )
        return errors.EXIT_INTERNAL
    finally:
        # In-process callers (ingest, tests) get the logging they had before.
        root.removeHandler(redactor.handler)  # type: ignore[attr-defined]
        root.setLevel(previous_level)
