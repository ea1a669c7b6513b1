"""Files written whole or not at all: a hidden temporary name, then a rename.

A reader (or a rerun after a kill) sees either the old file or the new one,
never a half-written file under the final name.
"""
from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path
from typing import Any


def temporary_name(path: Path) -> Path:
    """Returns a hidden name next to ``path``, unique to this process and thread."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_bytes_atomically(path: Path, data: bytes, durable: bool = False) -> None:
    """Writes ``data`` to ``path``; ``durable`` also flushes it to the disk first."""
    temporary = temporary_name(path)
    try:
        with open(temporary, "wb") as stream:
            stream.write(data)
            if durable:
                stream.flush()
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON to ``path``, durably (state and manifests)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_bytes_atomically(Path(path), text.encode("utf-8"), durable=True)
