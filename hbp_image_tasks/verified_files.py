"""The sidecar that remembers which downloaded files were verified, so that a
rerun over terabytes does not read every complete file again.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

from .atomic import write_bytes_atomically

logger = logging.getLogger(__name__)


class VerifiedFiles:
    """The sidecar ``.fetch_state.jsonl``: files already verified, so reruns skip hashing.

    A line per verified file records its MD5 with the size, mtime and inode it
    had then; a file whose stat still matches needs no re-reading. Any change
    to the file (a rewrite, a truncation, a replacement) changes its stat, so it
    is hashed again. The file is append-only, so a killed run loses nothing.
    """

    def __init__(self, path: Path):
        self.path = path
        self._known: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        try:
            with open(path, encoding="utf-8") as stream:
                for line in stream:
                    try:
                        record = json.loads(line)
                        self._known[record["name"]] = record
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by a kill
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("ignoring %s: %s", path, exc)
        self._stream = open(path, "a", encoding="utf-8")

    @staticmethod
    def _stat_key(info: os.stat_result) -> dict[str, int]:
        return {"bytes": info.st_size, "mtime_ns": info.st_mtime_ns, "inode": info.st_ino}

    def known_md5(self, name: str, info: os.stat_result) -> str | None:
        """Returns the recorded MD5 of ``name`` if its file is unchanged since."""
        record = self._known.get(name)
        if record and all(record.get(k) == v for k, v in self._stat_key(info).items()):
            return record.get("md5")
        return None

    def record(self, name: str, path: Path, md5: str) -> None:
        """Records that the file at ``path`` holds ``name`` with this MD5."""
        record = {"name": name, "md5": md5, **self._stat_key(os.stat(path))}
        line = json.dumps(record) + "\n"
        with self._lock:
            self._known[name] = record
            self._stream.write(line)
            self._stream.flush()

    def compact(self, names: set[str]) -> None:
        """Rewrites the sidecar with the records of ``names`` only, and closes it."""
        with self._lock:
            self._stream.close()
            text = "".join(
                json.dumps(record) + "\n" for name, record in self._known.items() if name in names
            )
            write_bytes_atomically(self.path, text.encode("utf-8"))

    def close(self) -> None:
        """Closes the sidecar."""
        self._stream.close()

    def __enter__(self) -> VerifiedFiles:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
