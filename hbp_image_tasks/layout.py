"""The files the steps leave for each other: names, readers and writers, and the publish contract.

Every manifest, state and marker file that fetch_input, ingest_ngs, upload_results
and ingest exchange is named and read or written here, and nowhere else.

In a fetch destination (``fetch_input``, read by ``ingest_ngs``):
  fetch_manifest.json            the selected objects in order (name, path, bytes, md5)
  .fetch_state.jsonl             the files already verified (see verified_files)

In a conversion destination (``ingest_ngs``, read by ``upload_results`` and ``ingest``):
  .hbp-conversion-state.json     a conversion that started and has not finished:
                                 its fingerprint, finished slabs, checkpoint; written
                                 first, removed last
  .hbp-conversion-checkpoint-N.npz  the lower scales' pending planes after N slabs
  .hbp-conversion-complete.json  the complete marker: written once every file of
                                 the dataset is in place, with the fingerprint, the
                                 result and the SHA-256 of the ``info`` it finished
  .hbp-units/                    the work units of a split conversion: done/<id>.json
                                 per finished unit, pieces/<id>.npy for the finishing step
  <scale>/.hbp-shard-pieces/<shard>/  the chunks of a shard not yet assembled
  .hbp-array/                    an ``ingest --array`` run: plan, unit records, jobs
                                 (see array_state)
  .hbp-released/                 <unit id>.json per work unit of ``ingest --array
                                 --cleanup`` whose files were deleted once uploaded:
                                 the container, prefix and objects (name, bytes, MD5)
  .hbp-upload-manifest.json      what upload_results verified in the container
  .hbp-ingest-state.json         the steps an ``ingest`` run finished
  .hbp-ingest-report.json        the report of the last ``ingest`` run

In a download directory of ``ingest --array``, each z range's sections-Z0-Z1/
holds ``.hbp-array-lock``, locked while a unit fetches them; first-section/ holds
the first section when the submission fetches it whole to plan from (one of at
most 1 MiB, or one whose header could not be read by ranges), then becomes the
first z range's directory (the first unit finds that section fetched and verified).

Hidden names are never uploaded; further per-run records belong here too, as
hidden names.

The publish contract: a conversion destination is publishable only when
:func:`conversion_status` says ``complete``, that is when

* its complete marker is present and readable, and
* the ``info`` file is the one the marker finished (same SHA-256; markers of
  format 1, written before this check existed, are trusted when no conversion
  state is present), and
* no conversion state of another fingerprint is present, and
* no shard is left unassembled.

Files listed in ``.hbp-released/`` are part of the dataset although they are no
longer on disk: upload_results verifies them in the container they were uploaded
to (names, sizes, MD5s) and refuses to publish the destination anywhere else.

It is *unfinished* when a conversion state is present and no marker of the
same fingerprint, or a shard is unassembled (a killed or running conversion;
*stopped* when the state records the signal that stopped it), and *from an
older run* when a marker is present but its ``info`` has been replaced since,
or a later conversion with other inputs or parameters has started in the same
directory. A destination with no conversion file at all (a dataset made by
another tool) is *foreign*; it is published as it is. ingest_ngs keeps one of
the state or the marker present at every moment, so a conversion it ran is
never foreign; ``ingest --array`` writes the state with its plan and the marker
in its finishing job.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .atomic import write_json_atomically
from .errors import InputError, UsageError

FETCH_MANIFEST_NAME = "fetch_manifest.json"
FETCH_MANIFEST_VERSION = 1
FETCH_STATE_NAME = ".fetch_state.jsonl"

CONVERSION_STATE_NAME = ".hbp-conversion-state.json"
CHECKPOINT_PREFIX = ".hbp-conversion-checkpoint-"
CHECKPOINT_SUFFIX = ".npz"
COMPLETE_MARKER_NAME = ".hbp-conversion-complete.json"
COMPLETE_MARKER_FORMAT = 2
INFO_NAME = "info"
UNITS_DIR_NAME = ".hbp-units"
ARRAY_DIR_NAME = ".hbp-array"
ARRAY_LOCK_NAME = ".hbp-array-lock"
PLANNING_SECTION_DIR_NAME = "first-section"
SHARD_PIECES_DIR_NAME = ".hbp-shard-pieces"
RELEASED_DIR_NAME = ".hbp-released"

UPLOAD_MANIFEST_NAME = ".hbp-upload-manifest.json"

INGEST_STATE_NAME = ".hbp-ingest-state.json"
INGEST_STATE_VERSION = 1
INGEST_REPORT_NAME = ".hbp-ingest-report.json"

COMPLETE = "complete"
UNFINISHED = "unfinished"
STOPPED = "stopped"
OLDER_RUN = "older run"
FOREIGN = "foreign"


def read_json(path: Path) -> Any | None:
    """Returns the JSON document in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def remove_files(paths) -> None:
    """Deletes each of ``paths`` that exists."""
    for path in paths:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------
# Fetch manifest
# --------------------------------------------------------------------------


def write_fetch_manifest(
    destination: Path, source: str, filter_regex: str | None, objects: list[dict[str, Any]]
) -> Path:
    """Writes ``fetch_manifest.json`` (objects: name, path, bytes, md5) atomically; returns it."""
    path = Path(destination) / FETCH_MANIFEST_NAME
    write_json_atomically(
        path,
        {
            "version": FETCH_MANIFEST_VERSION,
            "source": source,
            "filter": filter_regex,
            "objects": objects,
        },
    )
    return path


def find_fetch_manifest(source: Path) -> Path | None:
    """Returns the fetch manifest that ``source`` is or contains, else None."""
    source = Path(source)
    if source.is_file() and source.name == FETCH_MANIFEST_NAME:
        return source
    if source.is_dir() and (source / FETCH_MANIFEST_NAME).is_file():
        return source / FETCH_MANIFEST_NAME
    return None


def read_fetch_manifest(manifest: Path) -> list[tuple[str, Path]]:
    """Returns (object name, local path) of every object a fetch manifest lists, in its order."""
    try:
        document = json.loads(Path(manifest).read_text(encoding="utf-8"))
        entries = [(str(entry["name"]), str(entry["path"])) for entry in document["objects"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{manifest}: not a valid fetch manifest ({exc})") from None
    base = Path(manifest).parent
    return [(name, base / relative) for name, relative in entries]


# --------------------------------------------------------------------------
# Conversion state, checkpoints and complete marker
# --------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionState:
    """A conversion in progress: what it converts and how far it got."""

    fingerprint: str
    slabs_done: int = 0
    levels: list = dataclasses.field(default_factory=list)
    chunks: int = 0
    bytes: int = 0
    pending: list = dataclasses.field(default_factory=list)
    checkpoint: str | None = None
    saved: float | None = None
    stopped: str | None = None  # the signal that stopped it, e.g. "SIGTERM"
    slab_count: int | None = None

    @classmethod
    def from_dict(cls, data: Any) -> ConversionState | None:
        """Returns the state a JSON document describes, or None if it describes none."""
        if not isinstance(data, dict) or not isinstance(data.get("fingerprint"), str):
            return None
        known = {field.name for field in dataclasses.fields(cls)}
        try:
            return cls(**{key: value for key, value in data.items() if key in known})
        except TypeError:
            return None

    def to_dict(self) -> dict[str, Any]:
        """Returns the state as a JSON-ready dict."""
        return dataclasses.asdict(self)


def fingerprint_of(document: Any) -> str:
    """Returns the SHA-256 of a JSON document, keys sorted: what a conversion converts."""
    return hashlib.sha256(json.dumps(document, sort_keys=True).encode("utf-8")).hexdigest()


def read_conversion_state(destination: Path) -> ConversionState | None:
    """Returns the conversion state in ``destination``, or None when there is none."""
    return ConversionState.from_dict(read_json(Path(destination) / CONVERSION_STATE_NAME))


def has_conversion_state(destination: Path) -> bool:
    """Returns whether a conversion state file (readable or not) is in ``destination``."""
    return (Path(destination) / CONVERSION_STATE_NAME).exists()


def write_conversion_state(destination: Path, state: ConversionState) -> None:
    """Writes the conversion state atomically and durably."""
    write_json_atomically(Path(destination) / CONVERSION_STATE_NAME, state.to_dict())


def checkpoint_name(slabs_done: int) -> str:
    """Returns the name of the checkpoint saved after ``slabs_done`` slabs."""
    return f"{CHECKPOINT_PREFIX}{slabs_done}{CHECKPOINT_SUFFIX}"


def checkpoint_files(destination: Path) -> list[Path]:
    """Returns the checkpoint files in ``destination``."""
    return sorted(Path(destination).glob(CHECKPOINT_PREFIX + "*" + CHECKPOINT_SUFFIX))


def remove_conversion_state(destination: Path) -> None:
    """Deletes the conversion state and its checkpoints (the state last)."""
    remove_files(checkpoint_files(destination))
    remove_files([Path(destination) / CONVERSION_STATE_NAME])


def sections_directory(download_dir: Path, z0: int, z1: int) -> Path:
    """Returns where ``ingest --array`` fetches the sections z0..z1-1 of a stack."""
    return download_dir / f"sections-{z0}-{z1}"


def unit_record_path(destination: Path, unit_id: str) -> Path:
    """Returns the record a finished work unit leaves."""
    return Path(destination) / UNITS_DIR_NAME / "done" / f"{unit_id}.json"


def write_unit_record(destination: Path, unit_id: str, chunks: int, nbytes: int) -> None:
    """Records a finished work unit with the chunks and bytes it wrote."""
    path = unit_record_path(destination, unit_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, {"id": unit_id, "chunks": chunks, "bytes": nbytes})


def read_unit_record(destination: Path, unit_id: str) -> tuple[int, int] | None:
    """Returns (chunks, bytes) a finished work unit recorded, None when it is not finished."""
    document = read_json(unit_record_path(destination, unit_id))
    try:
        return int(document["chunks"]), int(document["bytes"])
    except (KeyError, TypeError, ValueError):
        return None


def unit_piece_path(destination: Path, unit_id: str) -> Path:
    """Returns the piece a work unit leaves for the finishing step."""
    return Path(destination) / UNITS_DIR_NAME / "pieces" / f"{unit_id}.npy"


def released_path(destination: Path, unit_id: str) -> Path:
    """Returns the record of a work unit's files deleted after their upload."""
    return Path(destination) / RELEASED_DIR_NAME / f"{unit_id}.json"


def write_released(destination: Path, unit_id: str, document: dict[str, Any]) -> None:
    """Records the files of a work unit about to be deleted after their upload."""
    path = released_path(destination, unit_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, document)


def read_released(destination: Path) -> dict[str, dict[str, Any]]:
    """Returns the released files' records by unit id; an unreadable one is an input
    error (without it the dataset would be published without those files)."""
    directory = Path(destination) / RELEASED_DIR_NAME
    if not directory.is_dir():
        return {}
    records = {}
    for path in sorted(directory.glob("*.json")):
        document = read_json(path)
        if not isinstance(document, dict) or not isinstance(document.get("objects"), list):
            raise InputError(f"{path}: unreadable record of files deleted after their upload")
        records[path.stem] = document
    return records


def released_units(destination: Path) -> set[str]:
    """Returns the ids of the units whose files were deleted after their upload."""
    directory = Path(destination) / RELEASED_DIR_NAME
    return {path.stem for path in directory.glob("*.json")} if directory.is_dir() else set()


def forget_released(destination: Path, unit_ids) -> None:
    """Deletes the released files' records of ``unit_ids`` (their units run again)."""
    remove_files(released_path(destination, unit_id) for unit_id in unit_ids)


def unassembled_shards(destination: Path) -> list[Path]:
    """Returns the piece directories of shards not yet assembled, in every scale."""
    found = []
    for pieces in sorted(Path(destination).glob(f"*/{SHARD_PIECES_DIR_NAME}")):
        found.extend(p for p in sorted(pieces.iterdir()) if p.is_dir())
    return found


def info_digest(destination: Path) -> str | None:
    """Returns the SHA-256 of the ``info`` file in ``destination``, or None without one."""
    try:
        return hashlib.sha256((Path(destination) / INFO_NAME).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def write_complete_marker(destination: Path, fingerprint: str, result: dict[str, Any]) -> None:
    """Marks the conversion in ``destination`` finished, for the ``info`` it has now."""
    write_json_atomically(
        Path(destination) / COMPLETE_MARKER_NAME,
        {
            "format": COMPLETE_MARKER_FORMAT,
            "fingerprint": fingerprint,
            "info_sha256": info_digest(destination),
            "result": result,
        },
    )


def read_complete_marker(destination: Path) -> dict[str, Any] | None:
    """Returns the complete marker of ``destination``, or None without a readable one."""
    marker = read_json(Path(destination) / COMPLETE_MARKER_NAME)
    if not isinstance(marker, dict) or not isinstance(marker.get("fingerprint"), str):
        return None
    return marker


def remove_complete_marker(destination: Path) -> None:
    """Deletes the complete marker: the dataset is no longer a finished conversion."""
    remove_files([Path(destination) / COMPLETE_MARKER_NAME])


@dataclasses.dataclass(frozen=True)
class ConversionStatus:
    """Whether a conversion destination is publishable, and if not, why."""

    kind: str  # COMPLETE, UNFINISHED, STOPPED, OLDER_RUN or FOREIGN
    reason: str = ""
    marker: dict[str, Any] | None = None

    @property
    def publishable(self) -> bool:
        """True for a finished conversion and for a dataset no conversion of ours wrote."""
        return self.kind in (COMPLETE, FOREIGN)


def _unfinished(state: ConversionState | None) -> ConversionStatus:
    if state is None:
        return ConversionStatus(UNFINISHED, "its conversion state is unreadable")
    done = f"{state.slabs_done}/{state.slab_count}" if state.slab_count else str(state.slabs_done)
    if state.stopped:
        return ConversionStatus(
            STOPPED, f"its conversion was stopped by {state.stopped} after slab {done}"
        )
    return ConversionStatus(
        UNFINISHED,
        f"its conversion has not finished (killed or still running; slabs saved: {done})",
    )


def conversion_status(destination: Path) -> ConversionStatus:
    """Returns the publish status of ``destination`` (see the module docstring)."""
    destination = Path(destination)
    marker = read_complete_marker(destination)
    state_present = has_conversion_state(destination)
    state = read_conversion_state(destination) if state_present else None
    shards = unassembled_shards(destination)
    if shards:
        return ConversionStatus(UNFINISHED, f"{len(shards)} shard(s) not assembled")
    if marker is None:
        if state_present or checkpoint_files(destination):
            return _unfinished(state)
        if (destination / COMPLETE_MARKER_NAME).exists():
            return ConversionStatus(OLDER_RUN, "its complete marker is unreadable")
        return ConversionStatus(FOREIGN)
    if state_present and (state is None or state.fingerprint != marker["fingerprint"]):
        return ConversionStatus(
            OLDER_RUN,
            "its complete marker is from an older run (another conversion has started "
            f"since: {_unfinished(state).reason})",
        )
    digest = info_digest(destination)
    if digest is None:
        return ConversionStatus(OLDER_RUN, "its complete marker has no 'info' file beside it")
    expected = marker.get("info_sha256")
    if expected is None and state_present:
        return _unfinished(state)
    if expected is not None and expected != digest:
        return ConversionStatus(
            OLDER_RUN, "its complete marker is from an older run ('info' has changed since)"
        )
    return ConversionStatus(COMPLETE, marker=marker)


def check_publishable(destination: Path) -> ConversionStatus:
    """Returns the status of a publishable ``destination``; raises InputError otherwise."""
    status = conversion_status(destination)
    if not status.publishable:
        raise InputError(
            f"{destination}: not publishable, {status.reason}; run the same ingest_ngs "
            "(or ingest) command again to finish the conversion, then upload"
        )
    return status


# --------------------------------------------------------------------------
# Upload manifest
# --------------------------------------------------------------------------


def write_upload_manifest(results_dir: Path, document: dict[str, Any]) -> Path:
    """Writes the verified upload manifest atomically; returns its path."""
    path = Path(results_dir) / UPLOAD_MANIFEST_NAME
    write_json_atomically(path, document)
    return path


def read_upload_manifest(results_dir: Path) -> dict[str, Any] | None:
    """Returns the last verified upload manifest, or None (it is only a cache)."""
    document = read_json(Path(results_dir) / UPLOAD_MANIFEST_NAME)
    return document if isinstance(document, dict) else None


# --------------------------------------------------------------------------
# Ingest run state and report
# --------------------------------------------------------------------------


def read_ingest_state(results_dir: Path) -> dict[str, Any] | None:
    """Returns the saved ``ingest`` state ({inputs, steps}), or None when there is none."""
    path = Path(results_dir) / INGEST_STATE_NAME
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(
            f"state file {path} is unreadable ({exc}); rerun with --restart to start over"
        ) from None
    return {"inputs": data.get("inputs", {}), "steps": data.get("steps", {})}


def write_ingest_state(results_dir: Path, inputs: dict[str, Any], steps: dict[str, Any]) -> None:
    """Writes the ``ingest`` state atomically."""
    write_json_atomically(
        Path(results_dir) / INGEST_STATE_NAME,
        {"version": INGEST_STATE_VERSION, "inputs": inputs, "steps": steps},
    )


def ingest_report_path(results_dir: Path) -> Path:
    """Returns where ``ingest`` writes its run report by default."""
    return Path(results_dir) / INGEST_REPORT_NAME
