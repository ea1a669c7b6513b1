"""Progress that reads well both on a terminal (a tqdm bar) and in a batch log.

Without a terminal, a line with counts, bytes, rate and ETA is logged every
``interval`` seconds and once at the end; no control characters are written.
"""

from __future__ import annotations

import logging
import sys
import threading
import time

logger = logging.getLogger(__name__)


def format_bytes(count: float) -> str:
    """Returns ``count`` bytes in human units (``12.3 MiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"  # pragma: no cover


def format_duration(seconds: float) -> str:
    """Returns ``seconds`` as ``1h02m03s`` / ``2m03s`` / ``3s``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{seconds:02d}s"
    if minutes:
        return f"{minutes}m{seconds:02d}s"
    return f"{seconds}s"


class Progress:
    """Thread-safe progress of ``total`` items (and optionally ``total_bytes``)."""

    def __init__(
        self,
        description: str,
        total: int | None = None,
        total_bytes: int | None = None,
        unit: str = "files",
        interval: float = 10.0,
        enabled: bool = True,
        use_tty: bool | None = None,
    ):
        self.description = description
        self.total = total
        self.total_bytes = total_bytes
        self.unit = unit
        self.interval = interval
        self.done = 0
        self.bytes_done = 0
        self.retries = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        self._thread = None
        if not enabled:
            return
        if use_tty is None:
            use_tty = sys.stderr.isatty()
        if use_tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                desc=description,
                unit=unit[:-1] if unit.endswith("s") else unit,
                dynamic_ncols=True,
            )
        else:
            self._thread = threading.Thread(
                target=self._log_periodically, name="progress", daemon=True
            )
            self._thread.start()

    def update(self, count: int = 1, nbytes: int = 0) -> None:
        """Records ``count`` more items done and ``nbytes`` more bytes."""
        with self._lock:
            self.done += count
            self.bytes_done += nbytes
        if self._bar is not None:
            self._bar.update(count)

    def add_retry(self, count: int = 1) -> None:
        """Records retried requests, shown in the log lines."""
        with self._lock:
            self.retries += count

    def line(self) -> str:
        """Returns the one-line summary used in batch logs."""
        with self._lock:
            done, nbytes, retries = self.done, self.bytes_done, self.retries
        elapsed = max(time.monotonic() - self.started, 1e-9)
        parts = [
            f"{self.description}: {done}"
            + (f"/{self.total}" if self.total is not None else "")
            + f" {self.unit}"
        ]
        if nbytes or self.total_bytes:
            parts.append(
                format_bytes(nbytes)
                + (f"/{format_bytes(self.total_bytes)}" if self.total_bytes else "")
            )
        rate = done / elapsed
        parts.append(f"{rate:.1f} {self.unit}/s")
        if nbytes:
            parts.append(f"{format_bytes(nbytes / elapsed)}/s")
        if self.total and done and done < self.total:
            parts.append(f"ETA {format_duration((self.total - done) / rate)}")
        parts.append(f"elapsed {format_duration(elapsed)}")
        if retries:
            parts.append(f"{retries} retries")
        return ", ".join(parts)

    def _log_periodically(self) -> None:
        while not self._stop.wait(self.interval):
            logger.info("%s", self.line())

    def close(self) -> None:
        """Stops the periodic lines and logs (or draws) the final state."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            if self.total != 0 or self.done:  # "0/0 objects" says nothing
                logger.info("%s", self.line())

    @property
    def elapsed(self) -> float:
        """Seconds since the progress started."""
        return time.monotonic() - self.started

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
