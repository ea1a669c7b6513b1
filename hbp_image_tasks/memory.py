"""The conversion's memory budget: `--memory-limit SIZE` parsed, or its default;
and freed memory handed back, so that the process stays within it.

The default is the Slurm allocation's memory when the job has one, else a share
of the machine's physical memory; the interpreter's own base is left out of it.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
from collections.abc import Callable, Mapping

from .errors import UsageError

UNITS = {"": 1 << 20, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
PHYSICAL_SHARE = 0.5  # of physical memory, outside Slurm: other jobs share the machine
BASE_BYTES = 256 << 20  # left to the interpreter and libraries out of a Slurm allocation
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Returns the bytes of a size such as ``512M``, ``4G`` or ``1.5G`` (binary
    units; a bare number is MiB, as in Slurm)."""
    match = _SIZE.fullmatch(text)
    if match is None or float(match.group(1)) <= 0:
        raise UsageError(f"--memory-limit {text!r}: give a positive size such as 512M, 4G or 1.5G")
    return int(float(match.group(1)) * UNITS[match.group(2).upper()])


def slurm_memory(environ: Mapping[str, str]) -> int | None:
    """Returns the memory of this Slurm allocation on this node, None outside Slurm.

    SLURM_MEM_PER_NODE, else SLURM_MEM_PER_CPU times the CPUs of the task
    (SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE); both in MiB.
    """
    try:
        if environ.get("SLURM_MEM_PER_NODE"):
            return int(environ["SLURM_MEM_PER_NODE"]) << 20
        if environ.get("SLURM_MEM_PER_CPU"):
            cpus = environ.get("SLURM_CPUS_PER_TASK") or environ.get("SLURM_CPUS_ON_NODE") or "1"
            return int(environ["SLURM_MEM_PER_CPU"]) * int(cpus) << 20
    except ValueError:
        return None
    return None


def physical_memory() -> int:
    """Returns the machine's physical memory in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit(environ: Mapping[str, str] | None = None) -> int:
    """Returns the budget when no --memory-limit is given: the Slurm allocation less
    BASE_BYTES, else PHYSICAL_SHARE of physical memory."""
    allocated = slurm_memory(os.environ if environ is None else environ)
    if allocated is not None:
        return max(allocated - BASE_BYTES, allocated // 2)
    return int(physical_memory() * PHYSICAL_SHARE)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """Returns glibc's malloc_trim, None where the C library has none."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> None:
    """Hands the C heap's free pages back to the system (glibc; elsewhere nothing).

    Decoders that allocate and resize buffers of varying sizes from several threads
    leave the heap fragmented: without this, freed memory stays in the process and
    its RSS creeps above the budget as a conversion goes on.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
