"""fetch_input: download the input of a conversion (one URL, or a selection of a
Swift container's objects with --stacks) to the cluster's filesystem, verified.
"""

from __future__ import annotations

import argparse
import dataclasses
import email.message
import hashlib
import logging
import os
import stat
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Callable
from urllib.parse import unquote, urlparse

from . import cli, errors, layout, pool
from .download import DEFAULT_RETRY, RetryPolicy, download, file_md5, stated_md5
from .errors import FetchError, InputError, UsageError
from .object_names import (
    check_layout,
    check_object_name,
    compile_filter,
    is_directory_marker,
    literal_prefix,
)
from .progress import Progress, format_bytes
from .settings import SwiftSettings, add_settings_option, load_settings_from
from .swift import (
    ContainerUrl,
    ObjectInfo,
    ObjectStream,
    PublicContainer,
    SwiftConnection,
    http_session,
    open_url,
    parse_container_url,
)
from .verified_files import VerifiedFiles

logger = logging.getLogger(__name__)

FETCH_GROUP = "fetching the input"
# Downloads wait on the network, not the CPU: more streams than cores pay off.
DEFAULT_JOBS = 16

SEED_STACK_EXAMPLE = r"""
examples:
  # a selection of a public container's objects (a stack of sections)
  CASE=Pitx3-tTA-horizontal-case6513/6513_PitX3_tiffs
  fetch_input --stacks \
    --filter "$CASE/6513_Pitx3_tTA_lacZ_Xgal_s01\d_0.22.tif" \
    --destination ./source \
    https://object.cscs.ch/v1/AUTH_6ebec77683fb472f94d352be92b5a577/tTA-atlas

  # one file (a volume)
  fetch_input --destination ./source \
    https://github.com/HumanBrainProject/neuroglancer-scripts/raw/master/examples/JuBrain/colin27T1_seg.nii.gz

--filter is a Python regular expression matched against the WHOLE object name
(re.fullmatch): 'data/raw/original/pm31\d{2}o.png' selects pm3100o.png ..
pm3199o.png under data/raw/original/, but not pm3100o.png.bak nor
other/data/raw/original/pm3100o.png. Quote it for the shell. Its literal start
(here 'data/raw/original/pm31') is sent as the listing's prefix, so only
matching names are listed. Objects keep their names as paths under the
destination; a rerun fetches only what is missing or differs (size and MD5),
and fetch_manifest.json in the destination lists the selected objects in order.
"""


# --------------------------------------------------------------------------
# Results and manifest
# --------------------------------------------------------------------------


@dataclasses.dataclass
class FetchResult:
    """What a fetch did; ``to_dict()`` gives it as a JSON-ready dict."""

    files: int
    bytes: int
    downloaded: int
    skipped: int
    manifest_path: Path | None
    listing_fingerprint: str
    elapsed: float
    retries: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Returns the result as a JSON-ready dict."""
        data = dataclasses.asdict(self)
        data["manifest_path"] = str(self.manifest_path) if self.manifest_path else None
        return data

    def summary(self) -> str:
        """Returns the one-line result shown to the user."""
        if self.dry_run:
            return (
                f"would fetch {self.files} file(s), {format_bytes(self.bytes)} "
                f"({self.bytes} bytes); {self.skipped} already present with the "
                f"right size"
            )
        if not self.downloaded:
            return (
                f"nothing to do: all {self.files} file(s) "
                f"({format_bytes(self.bytes)}) already complete and verified"
            )
        return (
            f"fetched {self.files} file(s), {format_bytes(self.bytes)}: "
            f"{self.downloaded} downloaded, {self.skipped} already complete, "
            f"in {self.elapsed:.1f} s"
        )


def listing_fingerprint(entries: Iterable[tuple[str, int, str | None]]) -> str:
    """Returns the SHA-256 of the sorted (name, bytes, hash) list."""
    digest = hashlib.sha256()
    for name, size, md5 in sorted(entries):
        digest.update(f"{name}\0{size}\0{md5 or ''}\n".encode())
    return digest.hexdigest()


def selection_fingerprint(objects: Iterable[ObjectInfo]) -> str:
    """Returns the :func:`listing_fingerprint` of selected objects."""
    return listing_fingerprint((info.name, info.bytes, info.hash) for info in objects)


# --------------------------------------------------------------------------
# Selecting objects
# --------------------------------------------------------------------------


SourceContainer = tuple[
    ContainerUrl,
    Callable[..., Iterable[ObjectInfo]],
    Callable[[str, int], ObjectStream],
]


def open_container(
    source_url: str,
    settings: SwiftSettings | None,
    jobs: int | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    login: SwiftConnection | None = None,
) -> SourceContainer:
    """Returns (location, lister(prefix, page_size), opener(name, start)) for
    ``jobs`` parallel downloads; anonymous when ``settings`` is None, else with
    the Keystone token of ``login`` when given (a connection with those settings)."""
    location = parse_container_url(source_url)
    if settings is None:
        container = PublicContainer(
            location,
            session=http_session(jobs or DEFAULT_JOBS, policy.attempts, policy.backoff),
            error_type=FetchError,
        )
        return (location, container.iter_objects, container.open_object)
    # The URL names the account; the credentials only bring the token.
    connection = SwiftConnection(
        dataclasses.replace(settings, os_storage_url=location.storage_url),
        retries=policy.attempts,
        starting_backoff=policy.backoff,
        max_backoff=policy.max_backoff,
        error_type=FetchError,
        login=login,
    )

    def lister(prefix: str = "", page_size: int | None = None):
        return connection.iter_objects(location.container, prefix, page_size)

    def opener(name: str, start: int = 0) -> ObjectStream:
        return connection.open_object(location.container, name, start)

    return location, lister, opener


def has_right_size(destination: Path, info: ObjectInfo) -> bool:
    """True when ``info`` is already a file of its listed size under ``destination``."""
    try:
        found = (destination / info.name).stat()
    except OSError:
        return False
    return stat.S_ISREG(found.st_mode) and found.st_size == info.bytes


def select_objects(
    source_url: str,
    filter_regex: str | None,
    settings: SwiftSettings | None = None,
    page_size: int | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    container: SourceContainer | None = None,
) -> list[ObjectInfo]:
    """Returns the container's objects whose whole name matches ``filter_regex``.

    Lists every page (``marker``; ``page_size`` None asks for the server's
    maximum, ``container_listing_limit``), narrowed by the URL's path and the regex's
    literal prefix; pseudo-directory markers are dropped; raises InputError for
    unsafe or colliding names and UsageError when nothing matches. ``container``,
    when given, is the source already opened (its connection and token reused).
    """
    pattern = compile_filter(filter_regex)
    location, lister, _ = container or open_container(source_url, settings, 1, policy)
    prefix = location.prefix
    if pattern is not None:
        regex_prefix = literal_prefix(pattern.pattern)
        if regex_prefix.startswith(prefix):
            prefix = regex_prefix
    listed = 0
    selected: list[ObjectInfo] = []
    for info in lister(prefix=prefix, page_size=page_size):
        listed += 1
        if not info.name.startswith(location.prefix) or is_directory_marker(info):
            continue
        if pattern is None or pattern.fullmatch(info.name):
            check_object_name(info.name)
            selected.append(info)
    where = location.url + (f" (prefix {prefix!r})" if prefix else "")
    logger.info("listed %d object(s) of %s; %d selected", listed, where, len(selected))
    if not selected:
        raise UsageError(
            f"no object of {where} matches: {listed} object(s) listed, "
            + (
                f"none matches --filter {filter_regex!r} as a whole name"
                if filter_regex is not None
                else "none is a file"
            )
        )
    check_layout(selected)
    return selected


# --------------------------------------------------------------------------
# Stacks
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Done:
    downloaded: bool
    md5: str
    bytes: int


@dataclasses.dataclass
class _StackFetcher:
    """Fetches single objects of a stack into ``destination``; safe to call from several
    threads."""

    destination: Path
    opener: Callable[[str, int], ObjectStream]
    state: VerifiedFiles
    progress: Progress
    force: bool
    policy: RetryPolicy
    _made_directories: set[Path] = dataclasses.field(default_factory=set)

    def fetch_one(self, info: ObjectInfo) -> _Done:
        """Fetches ``info`` unless a verified copy is there; returns what was done."""
        path = self.destination / info.name
        try:
            found = os.stat(path)
        except FileNotFoundError:
            found = None
        if found is not None and stat.S_ISDIR(found.st_mode):
            raise InputError(
                f"{path} is a directory, but object {info.name!r} must be written there",
                object_name=info.name,
            )
        try:
            if not self.force and found is not None and found.st_size == info.bytes:
                present = self._verified_copy(info, path, found)
                if present is not None:
                    return present
            return self._download(info, path)
        except OSError as exc:
            raise FetchError(
                f"writing {exc.filename or path}: {exc.strerror or exc}", object_name=info.name
            ) from None

    def _verified_copy(self, info: ObjectInfo, path: Path, found: os.stat_result) -> _Done | None:
        """Returns the file of the right size at ``path`` when its MD5 matches, else None."""
        expected_md5 = None if info.is_large else info.hash
        md5 = self.state.known_md5(info.name, found)
        if md5 is None:
            # Hashing is the only proof that a file of the right size is
            # complete; it is recorded so that the next rerun need not.
            md5 = file_md5(path)
            if expected_md5 is None or md5 == expected_md5:
                self.state.record(info.name, path, md5)
        if expected_md5 is None or md5 == expected_md5:
            self.progress.update(1, info.bytes)
            return _Done(False, md5, info.bytes)
        logger.warning(
            "%s differs from %s (MD5 %s, expected %s): fetching it again",
            path,
            info.name,
            md5,
            expected_md5,
        )
        return None

    def _download(self, info: ObjectInfo, path: Path) -> _Done:
        if path.parent not in self._made_directories:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made_directories.add(path.parent)
        md5 = download(
            path,
            lambda start: self.opener(info.name, start),
            expected_size=info.bytes,
            expected_md5=None if info.is_large else info.hash,
            description=f"object {info.name!r}",
            policy=self.policy,
            on_bytes=lambda n: self.progress.update(0, n),
            on_retry=self.progress.add_retry,
            object_name=info.name,
        )
        self.state.record(info.name, path, md5)
        self.progress.update(1, 0)
        return _Done(True, md5, path.stat().st_size)


def _fetch_stack(
    source: str,
    destination: Path,
    objects: list[ObjectInfo],
    *,
    filter_regex: str | None,
    jobs: int,
    force: bool,
    show_progress: bool,
    should_stop: Callable[[], bool],
    policy: RetryPolicy,
    container: SourceContainer,
) -> FetchResult:
    """Fetches the selected ``objects`` from the opened ``container``; the manifest is
    written only once all are there."""
    started = time.monotonic()
    _, _, opener = container
    # An old manifest would describe an input set that is not complete any more.
    (destination / layout.FETCH_MANIFEST_NAME).unlink(missing_ok=True)
    results: dict[str, _Done] = {}
    total_bytes = sum(info.bytes for info in objects)
    # Exited in reverse: the pool's threads are done before the sidecar closes.
    with (
        VerifiedFiles(destination / layout.FETCH_STATE_NAME) as state,
        Progress(
            "fetch", total=len(objects), total_bytes=total_bytes, enabled=show_progress
        ) as progress,
    ):
        fetcher = _StackFetcher(destination, opener, state, progress, force, policy)
        pool.run_bounded(
            objects,
            fetcher.fetch_one,
            jobs=jobs,
            what="fetching",
            done=lambda info, done: results.__setitem__(info.name, done),
            should_stop=should_stop,
        )
        retries = progress.retries
    manifest_path = layout.write_fetch_manifest(
        destination,
        source,
        filter_regex,
        [_manifest_entry(info.name, results[info.name]) for info in objects],
    )
    state.compact({info.name for info in objects})
    downloaded = sum(1 for done in results.values() if done.downloaded)
    return FetchResult(
        files=len(objects),
        bytes=total_bytes,
        downloaded=downloaded,
        skipped=len(objects) - downloaded,
        manifest_path=manifest_path,
        listing_fingerprint=selection_fingerprint(objects),
        elapsed=time.monotonic() - started,
        retries=retries,
    )


def _manifest_entry(name: str, done: _Done) -> dict[str, Any]:
    return {"name": name, "path": name, "bytes": done.bytes, "md5": done.md5}


# --------------------------------------------------------------------------
# Single URL
# --------------------------------------------------------------------------


def file_name_from(url: str, headers: Mapping[str, str]) -> str | None:
    """Returns the file name from ``Content-Disposition``, else the URL's path."""
    disposition = headers.get("content-disposition")
    if disposition:
        message = email.message.Message()
        message["content-disposition"] = disposition
        name = message.get_filename()
        if name:
            # Only the last component: a server must not choose the directory.
            name = name.replace("\\", "/").rsplit("/", 1)[-1]
            if name not in ("", ".", ".."):
                return name
    name = unquote(PurePosixPath(urlparse(url).path).name)
    return name if name not in ("", ".", "..") else None


def _validator(headers: Mapping[str, str]) -> str | None:
    etag = headers.get("etag")
    if etag and not etag.startswith("W/"):
        return etag
    return headers.get("last-modified")


@dataclasses.dataclass
class _UrlFile:
    """The one file of a URL fetch: where it goes and what the server said about it."""

    url: str
    destination: Path
    relative: PurePosixPath
    size: int | None  # from Content-Length, when known
    md5: str | None  # as stated by the server, when it did
    started: float

    @property
    def path(self) -> Path:
        return self.destination / self.relative

    @classmethod
    def from_response(
        cls, url: str, destination: Path, output: str | None, first: ObjectStream, started: float
    ) -> _UrlFile:
        """Names the file (``output``, Content-Disposition or the URL) from the first answer."""
        name = output or file_name_from(url, first.headers)
        if not name:
            raise UsageError(f"{url} names no file: pass --output NAME")
        size = (
            int(first.headers["content-length"])
            if first.status == 200 and "content-length" in first.headers
            else None
        )
        relative = check_object_name(name)
        return cls(url, destination, relative, size, stated_md5(first.headers), started)

    def is_present(self) -> bool:
        """True when a file of the announced size is already there."""
        path = self.path
        return path.is_file() and self.size is not None and path.stat().st_size == self.size

    def result(
        self, downloaded: bool, md5: str | None, manifest: Path | None, **fields: Any
    ) -> FetchResult:
        """Returns the FetchResult of this file (``fields``: skipped, dry_run, retries)."""
        path = self.path
        nbytes = (
            self.size if self.size is not None else (path.stat().st_size if path.is_file() else 0)
        )
        fields.setdefault("skipped", int(not downloaded))
        return FetchResult(
            files=1,
            bytes=nbytes,
            downloaded=int(downloaded),
            manifest_path=manifest,
            listing_fingerprint=listing_fingerprint(
                [(str(self.relative), nbytes, md5 or self.md5)]
            ),
            elapsed=time.monotonic() - self.started,
            **fields,
        )

    def write_manifest(self, md5: str) -> Path:
        """Writes the manifest that lists this file; returns its path."""
        entry = {
            "name": str(self.relative),
            "path": str(self.relative),
            "bytes": self.path.stat().st_size,
            "md5": md5,
        }
        return layout.write_fetch_manifest(self.destination, self.url, None, [entry])


def _check_existing(target: _UrlFile, force: bool) -> FetchResult | None:
    """Returns the result when the file is already complete; refuses a different one."""
    path = target.path
    if path.is_dir():
        raise InputError(f"{path} is a directory; pass --output NAME")
    if not path.exists() or force:
        return None
    present = target.is_present()
    local_md5 = file_md5(path) if present else None
    if present and (target.md5 is None or local_md5 == target.md5):
        logger.info(
            "%s is already complete (%d bytes%s): nothing to do",
            path,
            target.size,
            f", MD5 {target.md5}" if target.md5 else "",
        )
        return target.result(False, local_md5, target.write_manifest(local_md5))
    raise UsageError(
        f"{path} exists and differs from {target.url} (local "
        f"{path.stat().st_size} bytes, remote "
        f"{target.size if target.size is not None else 'unknown'} bytes"
        + (f", MD5 {local_md5} vs {target.md5}" if target.md5 and local_md5 else "")
        + "): pass --force to replace it"
    )


def _download_url(
    target: _UrlFile,
    session,
    first: ObjectStream,
    base_headers: Mapping[str, str],
    show_progress: bool,
    policy: RetryPolicy,
) -> tuple[str, int]:
    """Downloads the file, resuming from the first answer; returns its MD5 and the retries."""
    validator = _validator(first.headers)

    def opener(start: int) -> ObjectStream:
        headers = dict(base_headers)
        if start and validator:
            headers["If-Range"] = validator  # never splice two versions
        return open_url(session, target.url, start, error_type=FetchError, headers=headers)

    target.path.parent.mkdir(parents=True, exist_ok=True)
    with Progress(
        f"fetch {target.relative}", total=1, total_bytes=target.size, enabled=show_progress
    ) as progress:
        md5 = download(
            target.path,
            opener,
            expected_size=target.size,
            expected_md5=target.md5,
            first=first,
            description=target.url,
            policy=policy,
            on_bytes=lambda n: progress.update(0, n),
            on_retry=progress.add_retry,
            object_name=str(target.relative),
        )
        progress.update(1, 0)
        return md5, progress.retries


def _fetch_url(
    url: str,
    destination: Path,
    *,
    output: str | None,
    force: bool,
    dry_run: bool,
    show_progress: bool,
    policy: RetryPolicy,
) -> FetchResult:
    """Fetches the one file at ``url``, unless it is already there, complete."""
    started = time.monotonic()
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"{url!r} is not an http(s) URL")
    session = http_session(2, policy.attempts, policy.backoff)
    # Compression would make Content-Length describe other bytes than we write.
    base_headers = {"Accept-Encoding": "identity"}
    with open_url(session, url, 0, error_type=FetchError, headers=base_headers) as first:
        target = _UrlFile.from_response(url, destination, output, first, started)
        if dry_run:
            return target.result(False, None, None, dry_run=True, skipped=int(target.is_present()))
        existing = _check_existing(target, force)
        if existing is not None:
            return existing
        md5, retries = _download_url(target, session, first, base_headers, show_progress, policy)
    return target.result(True, md5, target.write_manifest(md5), retries=retries)


# --------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------


def _dry_run_stack(destination: Path, objects: list[ObjectInfo]) -> FetchResult:
    """Returns what fetching ``objects`` would do; writes nothing."""
    present = sum(1 for info in objects if has_right_size(destination, info))
    for info in objects:
        logger.debug("would fetch %s (%d bytes)", info.name, info.bytes)
    return FetchResult(
        files=len(objects),
        bytes=sum(info.bytes for info in objects),
        downloaded=0,
        skipped=present,
        manifest_path=None,
        listing_fingerprint=selection_fingerprint(objects),
        elapsed=0.0,
        dry_run=True,
    )


def fetch(
    source: str,
    destination: Path,
    *,
    stacks: bool = False,
    filter_regex: str | None = None,
    jobs: int | None = None,
    settings: SwiftSettings | None = None,
    force: bool = False,
    dry_run: bool = False,
    output: str | None = None,
    show_progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    objects: list[ObjectInfo] | None = None,
    policy: RetryPolicy = DEFAULT_RETRY,
    page_size: int | None = None,
    container: SourceContainer | None = None,
) -> FetchResult:
    """Fetches ``source`` into ``destination``; returns what was done.

    With ``stacks``, ``source`` is a Swift container URL and every object
    whose whole name matches ``filter_regex`` is fetched (``objects``, if
    given, is the selection already made by :func:`select_objects`;
    ``container``, if given, is ``source`` already opened by :func:`open_container`).
    Raises FetchError for remote failures, UsageError/InputError for bad
    options or names, Interrupted when ``should_stop()`` became true.
    """
    destination = Path(destination)
    jobs = jobs or DEFAULT_JOBS
    should_stop = should_stop or (lambda: False)
    if not stacks:
        if filter_regex is not None:
            raise UsageError("--filter needs --stacks (a container URL)")
        if not dry_run:
            destination.mkdir(parents=True, exist_ok=True)
        return _fetch_url(
            source,
            destination,
            output=output,
            force=force,
            dry_run=dry_run,
            show_progress=show_progress,
            policy=policy,
        )
    if output is not None:
        raise UsageError("--output applies to a single URL, not to --stacks")
    # One connection (and one Keystone token) for the listing and the downloads.
    container = container or open_container(source, settings, jobs, policy)
    if objects is None:
        objects = select_objects(source, filter_regex, settings, page_size, policy, container)
    if dry_run:
        return _dry_run_stack(destination, objects)
    destination.mkdir(parents=True, exist_ok=True)
    return _fetch_stack(
        source,
        destination,
        objects,
        filter_regex=filter_regex,
        jobs=jobs,
        force=force,
        show_progress=show_progress,
        should_stop=should_stop,
        policy=policy,
        container=container,
    )


def add_selection_options(
    group: argparse._ArgumentGroup,
    destination_flag: str = "--destination",
    destination_default: str | None = None,
) -> None:
    """Adds what to fetch and where: ``--stacks``, ``--filter`` and the destination.

    The destination is stored as ``args.destination`` whatever its flag, and
    is required unless ``destination_default`` is given.
    """
    group.add_argument(
        "--stacks",
        action="store_true",
        help="the URL is a Swift container (https://HOST/v1/AUTH_<project>/"
        "<container>[/<prefix>]): fetch its objects selected by --filter, "
        "listing every page",
    )
    group.add_argument(
        "--filter",
        metavar="REGEX",
        default=None,
        help="with --stacks: a Python regular expression that must match the "
        "WHOLE object name (re.fullmatch), e.g. "
        r"'data/raw/original/pm31\d{2}o.png'. Default: every object",
    )
    group.add_argument(
        destination_flag,
        dest="destination",
        metavar="DIR",
        required=destination_default is None,
        default=destination_default,
        help="directory to write to; objects keep their names as relative paths",
    )


def add_transfer_options(group: argparse._ArgumentGroup) -> None:
    """Adds the options of a fetch on its own: ``--jobs``, ``--settings``, ``--force``,
    ``--dry-run``, ``--output`` (``ingest`` has its own or none)."""
    group.add_argument(
        "--jobs",
        dest="jobs",
        type=cli.positive_int,
        default=DEFAULT_JOBS,
        metavar="N",
        help="parallel downloads for --stacks",
    )
    add_settings_option(
        group, purpose="to read a private container (without it, the container must be public)"
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="fetch again even files that are already complete, and replace "
        "an existing different file",
    )
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="only list what would be fetched (count, bytes) and exit",
    )
    group.add_argument(
        "--output",
        metavar="NAME",
        default=None,
        help="without --stacks: file name to write under the destination "
        "(default: from Content-Disposition or the URL)",
    )


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line of `fetch_input`."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of `fetch_input`."""
    parser = argparse.ArgumentParser(
        prog="fetch_input",
        description=__doc__,
        epilog=SEED_STACK_EXAMPLE + "\n" + cli.exit_codes_help("fetch_input"),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "url", metavar="URL", help="URL of one file, or with --stacks of a Swift container"
    )
    group = parser.add_argument_group(FETCH_GROUP)
    add_selection_options(group)
    add_transfer_options(group)
    cli.add_logging_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `fetch_input`; returns the exit code."""
    args = parse_command_line(argv)

    def work(redactor: cli.RedactingFilter) -> int:
        settings = load_settings_from(args.settings, required=False)
        if settings is not None:
            redactor.add(settings.os_password.reveal())
        with cli.stop_on_signals() as stop:
            result = fetch(
                args.url,
                Path(args.destination),
                stacks=args.stacks,
                filter_regex=args.filter,
                jobs=args.jobs,
                settings=settings,
                force=args.force,
                dry_run=args.dry_run,
                output=args.output,
                show_progress=cli.verbosity(args) >= 0,
                should_stop=stop,
            )
        print(result.summary())
        return errors.EXIT_OK

    return cli.run_command(work, args)


if __name__ == "__main__":
    sys.exit(main())
