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

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def temporary_name(path: str | Path, unique: bool = True) -> str:
    """Returns the hidden name ``.NAME.<owner>.tmp`` under which ``path`` is written.

    ``unique`` makes the name this process's and thread's own (two writers of
    the same file never share it); without it the name is ``.NAME.tmp``, which
    the next writer reuses, so a killed long transfer leaves no extra copy.
    """
    directory, name = os.path.split(os.fspath(path))
    owner = f".{os.getpid()}.{threading.get_ident()}" if unique else ""
    return os.path.join(directory, f".{name}{owner}.tmp")


def write_bytes_atomically(path: str | Path, data, durable: bool = False) -> None:
    """Writes ``data`` (bytes or a C-contiguous array) to ``path``; ``durable`` also
    flushes it to the disk first.

    Plain ``os`` calls on strings: chunk writers call this thousands of times a
    second from many threads, and pathlib and buffered files would hold the GIL.
    """
    temporary = temporary_name(path)
    try:
        view = memoryview(data).cast("B")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | O_CLOEXEC, 0o666)
        try:
            while view:
                view = view[os.write(descriptor, view) :]
            if durable:
                os.fsync(descriptor)
        finally:
            os.close(descriptor)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def write_json_atomically(path: Path, data: Any) -> None:
    """Writes ``data`` as indented JSON to ``path``, durably (state and manifests)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    write_bytes_atomically(Path(path), text.encode("utf-8"), durable=True)
