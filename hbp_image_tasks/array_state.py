"""The files of an ``ingest --array`` run, kept under RESULTS_DIR/.hbp-array/.

The submitting command, the array tasks and the finishing job share nothing but
this directory (on the cluster's shared file system): the plan, one record per
finished unit, one file per submission and the outcome of each job. Every file
is written atomically, so a killed task leaves either a whole record or none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from . import layout
from .atomic import write_json_atomically
from .errors import UsageError

DIRECTORY = layout.ARRAY_DIR_NAME
PLAN_VERSION = 1


def _read(path: Path) -> Any:
    """Returns the JSON in ``path``, None when missing; a broken file is a usage error."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path} is unreadable ({exc}); rerun with --restart") from None


@dataclasses.dataclass(frozen=True)
class ArrayRun:
    """The .hbp-array directory of one results directory."""

    results_dir: Path

    @property
    def root(self) -> Path:
        """Returns the directory holding the run's files."""
        return self.results_dir / DIRECTORY

    @property
    def logs(self) -> Path:
        """Returns the directory of the jobs' Slurm output files."""
        return self.root / "logs"

    def plan_path(self) -> Path:
        return self.root / "plan.json"

    def read_plan(self) -> dict | None:
        """Returns the saved plan (inputs, argv, sections, units), None when none."""
        return _read(self.plan_path())

    def write_plan(self, plan: dict) -> None:
        """Saves the plan; the tasks and the finishing job read it."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.plan_path(), {"version": PLAN_VERSION, **plan})

    # one record per finished unit: the files it wrote, with their MD5s

    def unit_path(self, unit_id: str) -> Path:
        return self.root / "units" / f"{unit_id}.json"

    def unit_record(self, unit_id: str) -> dict | None:
        """Returns the record of a finished unit, None when it is not finished."""
        return _read(self.unit_path(unit_id))

    def record_unit(self, unit_id: str, record: dict) -> None:
        """Marks a unit as finished (converted and, with an upload, uploaded)."""
        self.unit_path(unit_id).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.unit_path(unit_id), record)

    def finished_units(self) -> set[str]:
        """Returns the ids of the units recorded as finished."""
        directory = self.root / "units"
        if not directory.is_dir():
            return set()
        return {p.name[: -len(".json")] for p in directory.glob("*.json")}

    # submissions: which units each task of an array runs

    def submission_path(self, number: int) -> Path:
        return self.root / f"submission-{number}.json"

    def submissions(self) -> list[int]:
        """Returns the numbers of the earlier submissions, oldest first."""
        if not self.root.is_dir():
            return []
        numbers = [p.stem.split("-", 1)[1] for p in self.root.glob("submission-*.json")]
        return sorted(int(n) for n in numbers if n.isdigit())

    def read_submission(self, number: int) -> dict:
        """Returns a submission's record (tasks' units, job ids)."""
        record = _read(self.submission_path(number))
        if record is None:
            raise UsageError(f"{self.submission_path(number)} is missing")
        return record

    def write_submission(self, number: int, record: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.submission_path(number), record)

    # outcomes: what a failed task or the finishing job leaves for the submitter

    def outcome_path(self, job: str) -> Path:
        return self.root / "outcomes" / f"{job}.json"

    def write_outcome(self, job: str, outcome: dict) -> None:
        """Records how a job ended (exit code, one-line message)."""
        self.outcome_path(job).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomically(self.outcome_path(job), outcome)

    def outcomes(self, prefix: str) -> dict[str, dict]:
        """Returns the outcomes of the jobs whose name starts with ``prefix``."""
        directory = self.root / "outcomes"
        if not directory.is_dir():
            return {}
        return {p.stem: _read(p) for p in sorted(directory.glob(f"{prefix}*.json"))}


def split_evenly(items: list, parts: int) -> list[list]:
    """Returns ``items`` cut into ``parts`` contiguous runs whose lengths differ by at most one."""
    size, extra = divmod(len(items), parts)
    result, start = [], 0
    for index in range(parts):
        stop = start + size + (1 if index < extra else 0)
        result.append(items[start:stop])
        start = stop
    return result
