"""Upload a Neuroglancer precomputed dataset to OpenStack Swift, ready to be served.

The container is made publicly readable with CORS (unless --private), chunks are
stored under the names Neuroglancer requests with the right Content-Encoding,
identical objects are skipped, and the result is verified against a fresh listing.

examples:
  upload_results results/bigbrain --container bigbrain --prefix 2015/8um
  upload_results results/bigbrain --container bigbrain --dry-run
  SWIFT_SETTINGS=~/.os_settings upload_results results/ --container test -j 32
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar
from urllib.parse import quote

from . import cli, errors, layout
from .errors import InputError, RemoteError, UploadError, UsageError
from .neuroglancer_link import DEFAULT_VIEWER_BASE, neuroglancer_link
from .object_names import join_prefix, listing_prefix
from .pool import run_bounded
from .progress import Progress, format_bytes, format_duration
from .settings import add_settings_option, load_settings_from
from .swift import PUBLIC_READ_ACL, ObjectInfo, SwiftConnection, http_session
from .upload_plan import (
    Digest,
    LocalObject,
    SegmentReader,
    check_conversion_complete,
    check_object_names,
    content_type_for,
    file_digest,
    normalize_prefix,
    read_exactly,
    read_manifest_digests,
    scan,
    validate_container_name,
)

__all__ = [
    "UploadResult",
    "add_publish_options",
    "add_target_options",
    "upload",
    "UploadOptions",
    "validate_container_name",
    "main",
    "DEFAULT_VIEWER_BASE",
]

logger = logging.getLogger(__name__)

UPLOAD_GROUP = "upload to Swift"
CORS_EXPOSE_HEADERS = "Content-Range Content-Length Content-Encoding"
DEFAULT_SEGMENT_SIZE = 1 << 30
PUT_ATTEMPTS = 3  # for the refusal swiftclient does not retry: 422 (body != its MD5)
MAX_EXAMPLES = 5
HEADER_SAMPLE = 20  # objects whose served headers are checked after the upload
# Listings ask for the server's own page size: more than its
# container_listing_limit is refused with 412.
LISTING_PAGE = None
SIZE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

T = TypeVar("T")


@dataclasses.dataclass
class UploadResult:
    """What an upload did (or, with ``dry_run``, would do)."""

    uploaded: int
    skipped: int
    bytes_uploaded: int
    total_objects: int
    total_bytes: int
    retries: int
    public_url: str
    neuroglancer_link: str
    manifest_path: str | None
    elapsed: float
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Returns the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


# How default_upload_jobs() sizes the uploads, for the commands' --help.
DEFAULT_UPLOAD_JOBS_HELP = "4 per CPU, between 8 and 32"


def default_upload_jobs() -> int:
    """Returns the default number of parallel uploads: requests wait on the network."""
    return min(32, max(8, 4 * cli.default_jobs()))


def parse_size(text: str) -> int:
    """argparse type: ``1073741824``, ``512M``, ``1G`` (binary units) -> bytes."""
    value = text.strip().upper().rstrip("B").rstrip("I")
    suffix = value[-1:] if value[-1:] in SIZE_SUFFIXES and value[-1:] else ""
    number = value[:-1] if suffix else value
    try:
        size = int(float(number) * SIZE_SUFFIXES[suffix])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size (examples: 1073741824, 512M, 1G)"
        ) from None
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def _container_name(text: str) -> str:
    try:
        return validate_container_name(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_target_options(group: argparse._ArgumentGroup, container_required: bool = True) -> None:
    """Adds where the dataset goes: ``--container`` (optional for ``ingest --no-upload``)
    and ``--prefix``."""
    group.add_argument(
        "--container",
        required=container_required,
        type=_container_name,
        metavar="NAME",
        default=argparse.SUPPRESS if container_required else None,
        help="Swift container to upload to, created if missing (e.g. bigbrain)",
    )
    group.add_argument(
        "--prefix",
        default="",
        metavar="PATH",
        help="path of the dataset inside the container (e.g. 2015/8um); the "
        "dataset's public URL is <storage URL>/<container>/<prefix>",
    )


def add_publish_options(group: argparse._ArgumentGroup) -> None:
    """Adds how the dataset is published: the fields of :class:`UploadOptions` but the
    prefix and ``dry_run``."""
    group.add_argument(
        "--private",
        action="store_true",
        help="do not make the container publicly readable nor set CORS; a viewer "
        "will then need credentials to read the dataset",
    )
    group.add_argument(
        "--cors-origin",
        default="*",
        metavar="ORIGIN",
        help="origin allowed to read the dataset from a browser "
        "(e.g. https://neuroglancer.example.org)",
    )
    for flag, text in (
        (
            "--force",
            "upload every object, even those already in Swift with the same MD5 "
            "(by default they are skipped, so a rerun sends only what is missing)",
        ),
        ("--no-skip-identical", "same as --force"),
    ):
        group.add_argument(
            flag, dest="skip_identical", action="store_false", default=argparse.SUPPRESS, help=text
        )
    group.set_defaults(skip_identical=True)
    group.add_argument(
        "--segment-size",
        type=parse_size,
        default=DEFAULT_SEGMENT_SIZE,
        metavar="BYTES",
        help="files larger than this are uploaded as static large objects in "
        "segments of this size (e.g. 512M, 1G)",
    )
    group.add_argument(
        "--viewer-base",
        default=DEFAULT_VIEWER_BASE,
        metavar="URL",
        help="Neuroglancer viewer used for the printed link "
        "(e.g. https://neuroglancer.example.org/)",
    )


@dataclasses.dataclass(frozen=True)
class UploadOptions:
    """How a dataset is published: where in the container, who may read it, what is
    sent again. The prefix is normalised and the segment size checked once, here."""

    prefix: str = ""
    public: bool = True
    cors_origin: str = "*"
    skip_identical: bool = True
    segment_size: int = DEFAULT_SEGMENT_SIZE
    dry_run: bool = False
    viewer_base: str = DEFAULT_VIEWER_BASE

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefix", normalize_prefix(self.prefix))
        if self.segment_size < 1:
            raise UsageError(f"segment size {self.segment_size} is not positive")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> UploadOptions:
        """Returns the options of :func:`add_target_options` and :func:`add_publish_options`."""
        return cls(
            prefix=args.prefix,
            public=not args.private,
            cors_origin=args.cors_origin,
            skip_identical=args.skip_identical,
            segment_size=args.segment_size,
            dry_run=args.dry_run,
            viewer_base=args.viewer_base,
        )

    def container_headers(self) -> dict[str, str]:
        """Returns the headers that make the container readable by any viewer (none if private)."""
        if not self.public:
            return {}
        return {
            "X-Container-Read": PUBLIC_READ_ACL,
            "X-Container-Meta-Access-Control-Allow-Origin": self.cors_origin,
            # A viewer on another origin reads shards with Range requests.
            "X-Container-Meta-Access-Control-Expose-Headers": CORS_EXPOSE_HEADERS,
        }


class _Uploader:
    """PUTs objects of one dataset; safe to call from several threads."""

    def __init__(
        self,
        connection: SwiftConnection,
        container: str,
        prefix: str,
        segment_size: int,
        container_headers: Mapping[str, str],
    ):
        self.connection = connection
        self.container = container
        self.prefix = prefix
        self.segment_size = segment_size
        self.container_headers = dict(container_headers)
        self.segment_container = f"{container}_segments"
        self._segments_ready = False
        self._lock = threading.Lock()

    def full_name(self, name: str) -> str:
        return join_prefix(self.prefix, name)

    def _retries_of_last_call(self) -> int:
        # swiftclient counts the attempts of the last request on this thread.
        return max(0, int(getattr(self.connection.connection(), "attempts", 1)) - 1)

    def upload(self, local: LocalObject) -> tuple[Digest, int]:
        """Uploads one object; returns its digest and the retries it needed."""
        if local.size > self.segment_size:
            return self._upload_large(local)
        return self._upload_small(local)

    def _headers(self, local: LocalObject) -> dict[str, str]:
        return {"Content-Encoding": local.content_encoding} if local.content_encoding else {}

    def _put(
        self, container: str, name: str, body: Callable[[], tuple[Any, str]], **options
    ) -> tuple[str, int]:
        """PUTs the ``(body, md5)`` that ``body()`` returns; returns the MD5 and retries.

        swiftclient already retries 5xx, 408, 429, timeouts and dropped
        connections, and renews the token after a 401 (the shared session
        allows that in every thread). Here a 422 (the body did not match its MD5
        on the way) is sent again from the file.
        """
        retries = 0
        for attempt in range(1, PUT_ATTEMPTS + 1):
            contents, md5 = body()
            try:
                etag = self.connection.put_object(container, name, contents, etag=md5, **options)
            except RemoteError as exc:
                retries += self._retries_of_last_call()
                if exc.http_status == 422 and attempt < PUT_ATTEMPTS:
                    logger.warning("%s; sending it again", exc)
                    retries += 1
                    continue
                raise
            finally:
                if hasattr(contents, "close"):
                    contents.close()
            retries += self._retries_of_last_call()
            if (etag or "").strip('"') != md5:
                raise UploadError(
                    f"PUT {container}/{name}: Swift answered ETag "
                    f"{etag!r}, expected the MD5 {md5} that was sent",
                    object_name=name,
                )
            return md5, retries
        raise AssertionError("unreachable")  # pragma: no cover

    def _upload_small(self, local: LocalObject) -> tuple[Digest, int]:
        def body() -> tuple[Any, str]:
            # Read once and hash what is sent, so the ETag matches the body.
            data = read_exactly(local.path, local.size)
            return io.BytesIO(data), _md5(data)

        md5, retries = self._put(
            self.container,
            self.full_name(local.name),
            body,
            content_length=local.size,
            content_type=local.content_type,
            headers=self._headers(local),
        )
        return Digest(md5), retries

    def _ensure_segment_container(self) -> None:
        with self._lock:
            if not self._segments_ready:
                self.connection.ensure_container(self.segment_container, self.container_headers)
                self._segments_ready = True

    def _upload_large(self, local: LocalObject) -> tuple[Digest, int]:
        """Uploads a static large object: its segments, then its manifest."""
        name = self.full_name(local.name)
        digest = file_digest(local.path, local.size, self.segment_size)
        self._ensure_segment_container()
        # Segment names carry the content's ETag, so a rerun reuses them.
        segment_prefix = f"{name}/slo/{local.size}/{self.segment_size}/{digest.slo_etag}/"
        existing = {
            o.name: o
            for o in self.connection.iter_objects(
                self.segment_container, prefix=segment_prefix, page_size=LISTING_PAGE
            )
        }
        retries = 0
        manifest = []
        for index, (offset, length, md5) in enumerate(digest.segments):
            segment_name = f"{segment_prefix}{index:08d}"
            present = existing.get(segment_name)
            if present is None or present.bytes != length or present.hash != md5:

                def segment(offset=offset, length=length, md5=md5):
                    return SegmentReader(local.path, offset, length), md5

                _, segment_retries = self._put(
                    self.segment_container,
                    segment_name,
                    segment,
                    content_length=length,
                    content_type="application/octet-stream",
                )
                retries += segment_retries
            manifest.append(
                {
                    "path": f"/{self.segment_container}/{segment_name}",
                    "etag": md5,
                    "size_bytes": length,
                }
            )
        # Swift checks the ETag sent with a manifest against its segments' MD5s.
        _, manifest_retries = self._put(
            self.container,
            name,
            lambda: (json.dumps(manifest), digest.slo_etag),
            content_type=local.content_type,
            headers=self._headers(local),
            query_string="multipart-manifest=put",
        )
        return digest, retries + manifest_retries


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _is_identical(remote: ObjectInfo, local: LocalObject, digest: Digest) -> bool:
    """True if the listed object has the local size and content MD5."""
    if remote.bytes != local.size:
        return False
    if remote.is_large:
        # A large object's listed hash is its manifest's; compare the SLO ETag.
        return bool(digest.segments) and remote.slo_etag == digest.slo_etag
    return remote.hash == digest.md5


def _describe_difference(
    remote: ObjectInfo | None, local: LocalObject, digest: Digest, full_name: str
) -> str | None:
    """Returns why the listed object differs from the local file, or None."""
    if remote is None:
        return f"{full_name}: missing"
    if remote.bytes != local.size:
        return f"{full_name}: {remote.bytes} bytes in Swift, {local.size} in {local.path}"
    if remote.is_large:
        if remote.slo_etag and digest.segments and remote.slo_etag != digest.slo_etag:
            return (
                f"{full_name}: large object ETag {remote.slo_etag} in Swift, "
                f"{digest.slo_etag} expected"
            )
        return None
    if remote.hash != digest.md5:
        return f"{full_name}: MD5 {remote.hash} in Swift, {digest.md5} in {local.path}"
    return None


def _examples(problems: list[str]) -> str:
    shown = "; ".join(problems[:MAX_EXAMPLES])
    return shown + ("; ..." if len(problems) > MAX_EXAMPLES else "")


def _public_url(connection: SwiftConnection, container: str, prefix: str) -> str:
    url = connection.container_url(container, prefix).url
    return f"{url}/{quote(prefix, safe='/')}" if prefix else url


def _read_local_info(results_dir: Path) -> Mapping[str, Any] | None:
    try:
        info = json.loads((results_dir / "info").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _check_served_headers(
    connection: SwiftConnection,
    container: str,
    objects: list[LocalObject],
    full_name: Callable[[str], str],
) -> None:
    """HEADs a sample of objects (info, one chunk per directory) and checks their headers.

    Skipped objects may come from an older upload with other headers, and
    wrong headers fail silently in the viewer (black volume), so look.
    """
    sample: dict[tuple[str, str, str], LocalObject] = {}
    for local in objects:
        key = (
            local.name.rsplit("/", 1)[0] if "/" in local.name else "",
            local.content_type,
            local.content_encoding,
        )
        sample.setdefault(key, local)
    problems = []
    for local in list(sample.values())[:HEADER_SAMPLE]:
        name = full_name(local.name)
        headers = connection.call(f"HEAD {container}/{name}", "head_object", container, name)
        headers = {k.lower(): v for k, v in headers.items()}
        encoding = headers.get("content-encoding", "")
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if encoding != local.content_encoding:
            problems.append(
                f"{name}: Content-Encoding {encoding!r}, expected {local.content_encoding!r}"
            )
        elif content_type != local.content_type:
            problems.append(
                f"{name}: Content-Type {content_type!r}, expected {local.content_type!r}"
            )
    if problems:
        raise UploadError(
            f"{len(problems)} object(s) in {container} are served with the wrong "
            f"headers (left by an older upload?): {_examples(problems)}; upload "
            f"again with --force"
        )


def _check_public_access(public_url: str, cors_origin: str) -> None:
    """GETs ``info`` anonymously, as a browser would, and checks the CORS answer."""
    import requests

    url = f"{public_url}/info"
    origin = "https://example.org" if cors_origin == "*" else cors_origin.split()[0]
    session = http_session(pool_size=1, retries=3)
    try:
        response = session.get(url, headers={"Origin": origin}, timeout=(15, 60))
    except requests.RequestException as exc:
        raise UploadError(f"anonymous GET {url} failed: {exc}") from None
    finally:
        session.close()
    if response.status_code != 200:
        raise UploadError(
            f"anonymous GET {url}: {response.status_code} {response.reason}: the "
            f"dataset is not publicly readable (X-Container-Read {PUBLIC_READ_ACL!r} "
            f"refused by the cluster?)"
        )
    allowed = response.headers.get("Access-Control-Allow-Origin", "")
    if allowed not in ("*", origin):
        raise UploadError(
            f"anonymous GET {url} with Origin {origin}: no matching "
            f"Access-Control-Allow-Origin header (got {allowed!r}); a browser "
            f"viewer would be refused (does the cluster enable CORS?)"
        )


@dataclasses.dataclass
class _Plan:
    """What an upload will do: the dataset's objects, which to send, which are there."""

    results_dir: Path
    objects: list[LocalObject]
    to_upload: list[LocalObject]
    skipped: list[LocalObject]
    digests: dict[str, Digest]  # by local name: those known so far

    @property
    def total_bytes(self) -> int:
        return sum(local.size for local in self.objects)

    @property
    def upload_bytes(self) -> int:
        return sum(local.size for local in self.to_upload)


def _scan_dataset(results_dir: Path, container: str, options: UploadOptions) -> list[LocalObject]:
    """Returns the dataset's objects, refusing what cannot be published, before any request."""
    validate_container_name(container)
    if not results_dir.is_dir():
        raise InputError(f"{results_dir} is not a directory")
    check_conversion_complete(results_dir)
    objects, _ = scan(results_dir)
    if "info" not in {local.name for local in objects}:
        raise InputError(
            f"{results_dir} has no 'info' file: it is not a Neuroglancer "
            f"precomputed dataset (the output directory of ingest_ngs)"
        )
    check_object_names(objects, options.prefix)
    logger.info(
        "%s: %d files, %s",
        results_dir,
        len(objects),
        format_bytes(sum(local.size for local in objects)),
    )
    return objects


def _prepare_container(connection: SwiftConnection, container: str, options: UploadOptions) -> bool:
    """Creates the container (or sets its headers) unless a dry run; True if it exists now."""
    if not options.public:
        logger.warning(
            "--private: the container is not made public; a viewer will "
            "need credentials to read the dataset"
        )
    if options.dry_run:
        return connection.head_container(container) is not None
    created = connection.ensure_container(container, options.container_headers())
    logger.info(
        "container %s %s%s",
        container,
        "created" if created else "exists",
        ", publicly readable with CORS origin " + options.cors_origin if options.public else "",
    )
    return True


def _list_remote(connection: SwiftConnection, container: str, prefix: str) -> dict[str, ObjectInfo]:
    """Returns the objects under ``prefix`` by full name, from a fresh listing."""
    under = listing_prefix(prefix)
    return {o.name: o for o in connection.iter_objects(container, under, page_size=LISTING_PAGE)}


def _plan(
    results_dir: Path,
    objects: list[LocalObject],
    remote: Mapping[str, ObjectInfo],
    options: UploadOptions,
    hash_files: Callable[[list[LocalObject]], dict[str, Digest]],
) -> _Plan:
    """Decides which objects to send: all but those already in Swift with the same MD5."""
    prefix = options.prefix
    # Compare only what may be identical: present with the same size.
    candidates = [
        local
        for local in objects
        if options.skip_identical
        and join_prefix(prefix, local.name) in remote
        and remote[join_prefix(prefix, local.name)].bytes == local.size
    ]
    # A file unchanged (size, mtime) since the last verified upload keeps its
    # MD5: an unchanged rerun then reads no file at all.
    known = read_manifest_digests(results_dir) if candidates else {}
    digests: dict[str, Digest] = {}
    for local in candidates:
        cached = known.get(join_prefix(prefix, local.name))
        if (
            cached
            and local.size <= options.segment_size
            and cached[:2]
            == (
                local.size,
                local.mtime_ns,
            )
        ):
            digests[local.name] = Digest(cached[2])
    digests.update(hash_files([local for local in candidates if local.name not in digests]))
    skipped = [
        local
        for local in candidates
        if _is_identical(remote[join_prefix(prefix, local.name)], local, digests[local.name])
    ]
    skipped_names = {local.name for local in skipped}
    to_upload = [local for local in objects if local.name not in skipped_names]
    return _Plan(results_dir, objects, to_upload, skipped, digests)


class ReleasedObjectsMissing(UploadError):
    """Files deleted after their upload (``ingest --array --cleanup``) are not in the
    container as recorded; ``names`` are their object names (without the prefix)."""

    def __init__(self, message: str, names: list[str]):
        super().__init__(message, object_name=names[0])
        self.names = names


def check_released_target(results_dir: Path, container: str, prefix: str) -> dict[str, dict]:
    """Returns the records of the files deleted after their upload (``ingest --array
    --cleanup``) by unit id; refuses a container or prefix other than theirs."""
    records = layout.read_released(results_dir)
    for unit_id, record in records.items():
        target = (record.get("container"), record.get("prefix", ""))
        if target != (container, prefix):
            where = f"container {target[0]}" + (f" under {target[1]}" if target[1] else "")
            raise InputError(
                f"{results_dir}: {len(record['objects'])} files of unit {unit_id} were "
                f"deleted after their upload to {where} (ingest --array --cleanup); publish "
                "to that container and prefix, or convert again with --restart"
            )
    return records


def _released_objects(
    results_dir: Path, container: str, prefix: str, objects: list[LocalObject]
) -> tuple[list[LocalObject], dict[str, Digest]]:
    """Returns the dataset's files that were deleted after their upload, as objects to
    verify, with their recorded digests; refuses another container or prefix."""
    on_disk = {local.name for local in objects}
    released: list[LocalObject] = []
    digests: dict[str, Digest] = {}
    for record in check_released_target(results_dir, container, prefix).values():
        for entry in record["objects"]:
            name = entry["name"]
            if name in on_disk:  # deleting them was cut short: the file is used
                continue
            released.append(
                LocalObject(
                    f"{results_dir}/{name} (deleted after its upload)",
                    name,
                    entry["bytes"],
                    content_type_for(name),
                    entry.get("content_encoding", ""),
                    entry.get("mtime_ns", 0),
                )
            )
            segments = tuple(tuple(segment) for segment in entry.get("segments", ()))
            digests[name] = Digest(entry["md5"], segments)
    if released:
        logger.info(
            "%s: %d files deleted after their upload are verified in the container",
            results_dir,
            len(released),
        )
    return released, digests


def _check_released(
    released: list[LocalObject],
    digests: Mapping[str, Digest],
    remote: Mapping[str, ObjectInfo],
    container: str,
    prefix: str,
) -> None:
    """Refuses to go on when a released file is not in the listing as recorded:
    uploading the rest would publish a dataset with holes."""
    missing, problems = [], []
    for local in released:
        full_name = join_prefix(prefix, local.name)
        problem = _describe_difference(remote.get(full_name), local, digests[local.name], full_name)
        if problem:
            missing.append(local.name)
            problems.append(problem)
    if problems:
        raise ReleasedObjectsMissing(
            f"{len(problems)} of {len(released)} objects deleted locally after their upload "
            f"(ingest --array --cleanup) are missing or different in container {container}: "
            f"{_examples(problems)}",
            missing,
        )


class _Runner:
    """Runs the bounded pool over the dataset's files: hashing them, uploading them."""

    def __init__(
        self, jobs: int, show_progress: bool, should_stop: Callable[[], bool] | None
    ) -> None:
        self.jobs = jobs
        self.show_progress = show_progress
        self.should_stop = should_stop

    def hash_files(self, files: list[LocalObject], segment_size: int) -> dict[str, Digest]:
        """Returns the digests of ``files`` by local name, computed in parallel."""
        digests: dict[str, Digest] = {}
        if not files:
            return digests
        with Progress(
            "comparing",
            total=len(files),
            total_bytes=sum(local.size for local in files),
            unit="files",
            enabled=self.show_progress,
        ) as progress:

            def record(local: LocalObject, digest: Digest) -> None:
                digests[local.name] = digest
                progress.update(1, local.size)

            run_bounded(
                files,
                lambda local: file_digest(local.path, local.size, segment_size),
                jobs=self.jobs,
                what="comparing local files",
                done=record,
                should_stop=self.should_stop,
            )
        return digests

    def upload_all(self, uploader: _Uploader, plan: _Plan) -> int:
        """Uploads the plan's objects, chunks first; records their digests; returns the retries."""
        retries = 0
        with Progress(
            "uploading",
            total=len(plan.to_upload),
            total_bytes=plan.upload_bytes,
            unit="objects",
            enabled=self.show_progress,
        ) as progress:

            def record(local: LocalObject, outcome: tuple[Digest, int]) -> None:
                nonlocal retries
                plan.digests[local.name], object_retries = outcome
                retries += object_retries
                progress.update(1, local.size)
                if object_retries:
                    progress.add_retry(object_retries)

            # Chunks first, then info and other JSON: a dataset whose info is
            # visible never points at chunks that are not there yet.
            for batch in (
                [o for o in plan.to_upload if not o.is_metadata],
                [o for o in plan.to_upload if o.is_metadata],
            ):
                run_bounded(
                    batch,
                    uploader.upload,
                    jobs=self.jobs,
                    what="uploading",
                    done=record,
                    should_stop=self.should_stop,
                )
        return retries


def upload(
    results_dir: Path,
    container: str,
    connection: SwiftConnection,
    options: UploadOptions | None = None,
    *,
    jobs: int | None = None,
    show_progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
) -> UploadResult:
    """Uploads RESULTS_DIR to ``container``/``options.prefix``, verifies it; returns what
    was done (with ``options.dry_run``, what would be done)."""
    started = time.monotonic()
    options = options or UploadOptions()
    results_dir = Path(results_dir)
    objects = _scan_dataset(results_dir, container, options)
    released, released_digests = _released_objects(results_dir, container, options.prefix, objects)
    runner = _Runner(jobs or default_upload_jobs(), show_progress, should_stop)
    exists = _prepare_container(connection, container, options)
    remote = _list_remote(connection, container, options.prefix) if exists else {}
    if exists:
        under = listing_prefix(options.prefix)
        logger.info("%d objects already under %s/%s", len(remote), container, under)
    _check_released(released, released_digests, remote, container, options.prefix)
    plan = _plan(
        results_dir,
        objects,
        remote,
        options,
        lambda files: runner.hash_files(files, options.segment_size),
    )
    # Verified above, never sent: they count as identical objects of the dataset.
    plan.objects += released
    plan.skipped += released
    plan.digests.update(released_digests)
    public_url = _public_url(connection, container, options.prefix)
    link = neuroglancer_link(public_url, options.viewer_base, info=_read_local_info(results_dir))
    if options.dry_run:
        return _report(plan, options, public_url, link, started, 0, None)
    uploader = _Uploader(
        connection,
        container,
        options.prefix,
        options.segment_size,
        options.container_headers(),
    )
    retries = runner.upload_all(uploader, plan)
    _verify(connection, container, options.prefix, plan.objects, plan.digests)
    if options.public:
        _check_public_access(public_url, options.cors_origin)
    manifest_path = _write_manifest(
        results_dir, container, options.prefix, public_url, plan.objects, plan.digests
    )
    return _report(plan, options, public_url, link, started, retries, manifest_path)


def _report(
    plan: _Plan,
    options: UploadOptions,
    public_url: str,
    link: str,
    started: float,
    retries: int,
    manifest_path: Path | None,
) -> UploadResult:
    """Logs what was done (or, in a dry run, would be) and returns it."""
    elapsed = time.monotonic() - started
    sent = f"{len(plan.to_upload)} objects ({format_bytes(plan.upload_bytes)})"
    kept = f"{len(plan.skipped)} identical ({format_bytes(plan.total_bytes - plan.upload_bytes)})"
    if options.dry_run:
        for local in plan.to_upload:
            logger.debug(
                "would upload %s -> %s", local.path, join_prefix(options.prefix, local.name)
            )
        logger.info("dry run: would upload %s, skip %s", sent, kept)
    else:
        logger.info(
            "uploaded %s, skipped %s, %d retries, verified %d objects in %s",
            sent,
            kept,
            retries,
            len(plan.objects),
            format_duration(elapsed),
        )
    return UploadResult(
        uploaded=len(plan.to_upload),
        skipped=len(plan.skipped),
        bytes_uploaded=plan.upload_bytes,
        total_objects=len(plan.objects),
        total_bytes=plan.total_bytes,
        retries=retries,
        public_url=public_url,
        neuroglancer_link=link,
        manifest_path=str(manifest_path) if manifest_path else None,
        elapsed=elapsed,
        dry_run=options.dry_run,
    )


def _verify(
    connection: SwiftConnection,
    container: str,
    prefix: str,
    objects: list[LocalObject],
    digests: Mapping[str, Digest],
) -> None:
    """Checks a fresh listing (names, sizes, MD5s) and a sample of served headers.

    The listing, not what the PUTs answered, is the truth a viewer will see.
    """

    def full_name(name: str) -> str:
        return join_prefix(prefix, name)

    listed = _list_remote(connection, container, prefix)
    problems = [
        problem
        for problem in (
            _describe_difference(
                listed.get(full_name(local.name)), local, digests[local.name], full_name(local.name)
            )
            for local in objects
        )
        if problem
    ]
    if problems:
        raise UploadError(
            f"verification failed: {len(problems)} of {len(objects)} objects missing "
            f"or different in container {container}: {_examples(problems)}"
        )
    extra = sorted(set(listed) - {full_name(local.name) for local in objects})
    if extra:
        logger.warning(
            "%d object(s) under %s/%s are not in the results directory (left in place), e.g. %s",
            len(extra),
            container,
            listing_prefix(prefix),
            extra[0],
        )
    _check_served_headers(connection, container, objects, full_name)


def _write_manifest(
    results_dir: Path,
    container: str,
    prefix: str,
    public_url: str,
    objects: list[LocalObject],
    digests: Mapping[str, Digest],
) -> Path:
    """Writes the verified manifest (name, bytes, MD5 per object); returns its path."""
    entries = []
    for local in objects:
        digest = digests[local.name]
        entry = {
            "name": join_prefix(prefix, local.name),
            "bytes": local.size,
            "md5": digest.md5,
            # with the size, lets a rerun trust this MD5 without reading the file
            "mtime_ns": local.mtime_ns,
        }
        if digest.segments:
            entry["slo_etag"] = digest.slo_etag
        entries.append(entry)
    return layout.write_upload_manifest(
        results_dir,
        {
            "container": container,
            "prefix": prefix,
            "public_url": public_url,
            "verified": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "objects": entries,
        },
    )


def upload_objects(
    connection: SwiftConnection,
    container: str,
    objects: list[LocalObject],
    options: UploadOptions,
    *,
    jobs: int | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Digest]:
    """Uploads part of a dataset (no listing, no verification); returns name -> digest.

    For the units of a job array: each uploads its own files, and :func:`upload`
    of the whole results directory verifies them all at the end.
    """
    connection.ensure_container(container, options.container_headers())
    uploader = _Uploader(
        connection, container, options.prefix, options.segment_size, options.container_headers()
    )
    digests: dict[str, Digest] = {}

    def record(local: LocalObject, outcome: tuple[Digest, int]) -> None:
        digests[local.name] = outcome[0]

    run_bounded(
        objects,
        uploader.upload,
        jobs=jobs or default_upload_jobs(),
        what="uploading",
        done=record,
        should_stop=should_stop,
    )
    return digests


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line of `upload_results`."""
    return build_parser().parse_args(argv)


def build_parser() -> argparse.ArgumentParser:
    """Returns the parser of `upload_results`."""
    parser = argparse.ArgumentParser(
        prog="upload_results",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 2)[2] + "\n" + cli.exit_codes_help("upload_results"),
        formatter_class=cli.HelpFormatter,
    )
    parser.add_argument(
        "results_dir",
        metavar="RESULTS_DIR",
        type=Path,
        help="directory with the dataset's info file and chunks (the output of "
        "ingest_ngs); dotfiles and symlinks in it are never uploaded",
    )
    group = parser.add_argument_group(UPLOAD_GROUP)
    add_target_options(group)
    add_settings_option(group)
    add_publish_options(group)
    group.add_argument(
        "--dry-run",
        action="store_true",
        help="only list what would be uploaded and skipped (counts and bytes); writes nothing",
    )
    parser.add_argument(
        "-j",
        "--jobs",
        type=cli.positive_int,
        metavar="N",
        help=f"parallel uploads (default: {DEFAULT_UPLOAD_JOBS_HELP}; here "
        f"{default_upload_jobs()})",
    )
    parser.set_defaults(jobs=None)
    cli.add_logging_options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `upload_results`; returns the exit code."""
    args = parse_command_line(argv)

    def work(redactor: cli.RedactingFilter) -> int:
        settings = load_settings_from(args.settings)
        redactor.add(settings.os_password.reveal())
        connection = SwiftConnection(settings, error_type=UploadError)
        with cli.stop_on_signals() as should_stop:
            try:
                result = upload(
                    args.results_dir,
                    args.container,
                    connection,
                    UploadOptions.from_args(args),
                    jobs=args.jobs,
                    show_progress=cli.verbosity(args) >= 0,
                    should_stop=should_stop,
                )
            finally:
                connection.close()
        if result.dry_run:
            print(
                f"dry run: would upload {result.uploaded} objects "
                f"({format_bytes(result.bytes_uploaded)}), skip {result.skipped} "
                f"identical ({format_bytes(result.total_bytes - result.bytes_uploaded)})"
            )
        if args.private:
            print("the dataset is private: a viewer needs credentials to read it")
        print(f"{'URL' if args.private else 'public URL'}: {result.public_url}")
        print(f"Neuroglancer: {result.neuroglancer_link}")
        return errors.EXIT_OK

    return cli.run_command(work, args)


if __name__ == "__main__":
    sys.exit(main())
