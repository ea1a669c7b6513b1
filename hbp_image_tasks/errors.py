"""Error types of hbp-image-tasks, one per boundary, and the exit codes they map to.

``main()`` of every command turns these into a one-line message and the exit
code documented here (and in the README), so job scripts can act on it;
``COMMAND_ERRORS`` says which of them each command can raise.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_USAGE = 2
EXIT_SOURCE = 3
EXIT_CONVERSION = 4
EXIT_UPLOAD = 5
EXIT_SIGINT = 130
EXIT_INTERRUPTED = 143

EXIT_MEANINGS = {
    EXIT_OK: "success",
    EXIT_INTERNAL: "unexpected internal error (a bug: please report it with -v output)",
    EXIT_USAGE: "bad usage or bad input (options, settings file, parameters, input files)",
    EXIT_SOURCE: "fetching the input failed (HTTP or Swift error, verification failed)",
    EXIT_CONVERSION: "conversion to Neuroglancer precomputed failed",
    EXIT_UPLOAD: "upload to Swift or its verification failed",
    EXIT_SIGINT: "interrupted by SIGINT (Ctrl-C); the same command resumes",
    EXIT_INTERRUPTED: "interrupted by SIGTERM (e.g. walltime); the same command resumes",
}


class HbpError(Exception):
    """Base of all expected failures; ``exit_code`` is what ``main()`` returns.

    ``http_status`` and ``object_name`` say which answer and which object (file or
    Swift object) failed, when known; ``also_failed`` holds the failures that
    :func:`aggregate` folded into this one, each with its own fields.
    """

    exit_code = EXIT_INTERNAL

    def __init__(
        self, message: str = "", *, http_status: int | None = None, object_name: str | None = None
    ):
        super().__init__(message)
        self.http_status = http_status
        self.object_name = object_name
        self.also_failed: list[BaseException] = []
        self.context = ""

    def __str__(self) -> str:
        return super().__str__() + self.context


class UsageError(HbpError):
    """Bad options, settings or parameters given by the user."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """Input data that cannot be used (corrupt image, mixed sizes, bad names)."""


class SettingsError(UsageError):
    """The Swift settings file is missing, unsafe or invalid."""


class RemoteError(HbpError):
    """A remote store (HTTP server, Swift, Keystone) failed or refused a request."""

    exit_code = EXIT_SOURCE


class FetchError(RemoteError):
    """Fetching the input failed."""

    exit_code = EXIT_SOURCE


class ConversionError(HbpError):
    """Converting the input to Neuroglancer precomputed failed."""

    exit_code = EXIT_CONVERSION


class UploadError(RemoteError):
    """Uploading or verifying the uploaded dataset failed."""

    exit_code = EXIT_UPLOAD


class Interrupted(HbpError):
    """A signal asked the work to stop; state was saved so the same command resumes."""

    exit_code = EXIT_INTERRUPTED

    def __init__(self, message: str, signal_number: int | None = None):
        super().__init__(message)
        if signal_number == 2:
            self.exit_code = EXIT_SIGINT


def aggregate(failures: list[BaseException], context: str) -> BaseException:
    """Returns the first of ``failures``, to be raised for all of them.

    An HbpError keeps its type and fields; the others are kept in its
    ``also_failed`` and counted in its message (``context`` says what was being
    done). Any other exception is a bug and is returned unchanged.
    """
    first = failures[0]
    if isinstance(first, HbpError) and len(failures) > 1:
        first.also_failed = list(failures[1:])
        first.context = f" (and {len(failures) - 1} more failure(s) {context})"
    return first


# Which errors each command can raise, hence which exit codes its --help lists.
# Every command can also return 0, 1 (a bug) and 130 (Ctrl-C, via KeyboardInterrupt).
# tests/test_exit_codes.py checks this against the raise statements of the code
# each command reaches, so a new kind of failure must be added here too.
COMMAND_ERRORS: dict[str, tuple[type[HbpError], ...]] = {
    "fetch_input": (UsageError, FetchError, Interrupted),
    "ingest_ngs": (UsageError, ConversionError, Interrupted),
    "upload_results": (UsageError, UploadError, Interrupted),
    "ingest": (UsageError, FetchError, ConversionError, UploadError, Interrupted),
    "check_viewer": (UsageError, RemoteError),
}
ALWAYS_POSSIBLE = (EXIT_OK, EXIT_INTERNAL, EXIT_SIGINT)


def exit_codes_of(error_type: type[HbpError]) -> set[int]:
    """Returns the exit codes that an error of ``error_type`` can give."""
    if issubclass(error_type, Interrupted):
        return {EXIT_SIGINT, EXIT_INTERRUPTED}
    return {error_type.exit_code}


def command_exit_codes(command: str) -> list[int]:
    """Returns the sorted exit codes that ``command`` can return."""
    codes = set(ALWAYS_POSSIBLE)
    for error_type in COMMAND_ERRORS[command]:
        codes |= exit_codes_of(error_type)
    return sorted(codes)
