"""Conversion inputs read slab by slab: section stacks and nibabel volumes.

Both give (x, y, z) size, channels and sample type up front and then fill
(C, Z, Y, X) slabs on demand, so memory never holds more than one slab.
"""

from __future__ import annotations

import logging
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable

import numpy as np

from . import layout, sections
from .errors import InputError

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]
Region = tuple[int, int, int, int]  # x0, x1, y0, y1
WHOLE_VOLUME_BYTES = 2 << 30


class StackSource:
    """A stack of 2D sections: column -> x, row -> y, section -> z."""

    kind = "stack"

    def __init__(self, paths: list[Path], channels: int | None = None):
        self.paths = paths
        self.format = sections.probe_section(paths[0])
        if channels == 3 and self.format.channels == 1:
            raise InputError(f"{paths[0]}: grey sections cannot give 'channels': 3")
        self.grey = channels == 1 and self.format.channels == 3
        self.channels = 1 if self.grey else self.format.channels
        self.dtype = np.dtype(self.format.dtype)
        self.size = (self.format.width, self.format.height, len(paths))
        self.voxel_size_nm: tuple[float, float, float] | None = None
        self.input_bytes = sum(p.stat().st_size for p in paths)
        self.description = (
            f"{len(paths)} sections of {self.format.describe()} from {paths[0].parent}"
        )

    @property
    def reads_regions(self) -> bool:
        """Returns whether a region of a section is read without decoding it whole
        (judged from the first section)."""
        return sections.reads_regions(self.paths[0], self.format, self.grey)

    @property
    def reads_rows(self) -> bool:
        """Returns whether regions are read by rows from each section's top (PNG), so
        that full-width bands cost least (judged from the first section)."""
        return sections.reads_rows(self.paths[0])

    def identity(self) -> list:
        """Returns what identifies the input for resuming (names, sizes, mtimes)."""
        result = []
        for path in self.paths:
            stat = path.stat()
            result.append([str(path), stat.st_size, stat.st_mtime_ns])
        return result

    def minimum(self) -> float | None:
        """Returns None: sections are never signed."""
        return None

    def read(
        self,
        z0: int,
        z1: int,
        out: np.ndarray,
        transform: Transform | None,
        executor: Executor,
        region: Region | None = None,
    ) -> None:
        """Decodes sections ``z0:z1`` in parallel into ``out`` (C, z1 - z0, Y, X), or
        only their ``region`` (x0, x1, y0, y1) when given."""

        def load(index: int) -> None:
            path = self.paths[index]
            target = out[0, index - z0] if self.channels == 1 and transform is None else None
            if region is not None:
                array = sections.read_section_region(
                    path, self.format, region, grey=self.grey, out=target
                )
            else:
                array = sections.read_section(path, self.format, grey=self.grey, out=target)
            if target is not None and np.shares_memory(array, target):
                return  # decoded in place
            plane = array[np.newaxis] if array.ndim == 2 else array.transpose(2, 0, 1)
            if transform is not None:
                plane = transform(plane)
            out[:, index - z0] = plane

        for future in [executor.submit(load, i) for i in range(z0, z1)]:
            future.result()


class VolumeSource:
    """A 3D (or 3D + channels) volume that nibabel reads; voxel (i, j, k) -> (x, y, z)."""

    kind = "volume"
    reads_rows = False  # any box of planes is read alone

    def __init__(self, path: Path):
        import nibabel

        self.path = path
        try:
            self.image = nibabel.load(str(path))
            shape = tuple(int(s) for s in self.image.shape)
            first = np.asanyarray(self.image.dataobj[(0,) * len(shape)])
        except Exception as exc:  # nibabel raises many types for bad files
            raise InputError(f"{path}: cannot read volume ({type(exc).__name__}: {exc})") from None
        if first.dtype.names is not None:
            raise InputError(f"{path}: structured (RGB) volumes are not supported")
        if len(shape) == 3:
            channels = 1
        elif len(shape) == 4 and shape[3] in (1, 3):
            channels = shape[3]
        elif len(shape) == 5 and shape[3] == 1 and shape[4] in (1, 3):
            channels = shape[4]
        else:
            raise InputError(f"{path}: volume shape {shape} is not 3D (or 3D with 1 or 3 channels)")
        self.shape = shape
        self.channels = channels
        self.dtype = first.dtype
        if self.dtype == np.float64:
            logger.info("%s: float64 samples are stored as float32", path)
        self.size = shape[:3]
        zooms = self.image.header.get_zooms()[:3]
        try:
            import nibabel.affines

            zooms = nibabel.affines.voxel_sizes(self.image.affine)[:3]
        except Exception:  # some formats have no affine; keep the header zooms
            pass
        self.voxel_size_nm = tuple(float(z) * 1e6 for z in zooms)
        self.input_bytes = path.stat().st_size
        # Slicing a compressed file decompresses it from the start every time;
        # up to WHOLE_VOLUME_BYTES a compressed volume is read once instead.
        self._whole = None
        self._read_whole = (
            path.suffix in (".gz", ".bz2", ".zst")
            and int(np.prod(shape)) * first.dtype.itemsize <= WHOLE_VOLUME_BYTES
        )
        self.paths = [path]
        self.description = f"volume {path.name} {'x'.join(map(str, shape))} {self.dtype}"

    @property
    def reads_regions(self) -> bool:
        """Returns whether planes are read region by region (uncompressed files)."""
        return not self._read_whole

    @property
    def held_bytes(self) -> int:
        """Returns the bytes of the samples held once read (a compressed volume's all)."""
        return int(np.prod(self.shape)) * self.dtype.itemsize if self._read_whole else 0

    def identity(self) -> list:
        """Returns what identifies the input for resuming."""
        stat = self.path.stat()
        return [[str(self.path), stat.st_size, stat.st_mtime_ns]]

    def _planes(self, z0: int, z1: int, region: Region | None = None) -> np.ndarray:
        x0, x1, y0, y1 = region if region is not None else (None, None, None, None)
        try:
            if self._read_whole and self._whole is None:
                self._whole = np.asanyarray(self.image.dataobj)
            source = self._whole if self._whole is not None else self.image.dataobj
            data = np.asanyarray(source[x0:x1, y0:y1, z0:z1])
            if len(self.shape) == 3:
                return data.transpose(2, 1, 0)[np.newaxis]
            data = data.reshape(data.shape[:3] + (self.channels,))
            return data.transpose(3, 2, 1, 0)
        except Exception as exc:
            raise InputError(
                f"{self.path}: cannot read planes {z0}-{z1} ({type(exc).__name__}: {exc})"
            ) from None

    def minimum(self) -> float | None:
        """Returns the smallest sample (one pass over the file)."""
        step = 64
        return min(
            float(self._planes(z, min(z + step, self.size[2])).min())
            for z in range(0, self.size[2], step)
        )

    def read(
        self,
        z0: int,
        z1: int,
        out: np.ndarray,
        transform: Transform | None,
        executor: Executor,
        region: Region | None = None,
    ) -> None:
        """Reads planes ``z0:z1`` into ``out`` (C, z1 - z0, Y, X), or only their
        ``region`` (x0, x1, y0, y1) when given."""
        planes = self._planes(z0, z1, region)
        if transform is not None:
            planes = transform(planes)
        out[...] = planes


def open_source(
    source: Path, order_file: Path | None = None, channels: int | None = None, jobs: int = 8
):
    """Returns a StackSource or VolumeSource for a directory, manifest or volume file.

    A stack's every section header is checked (``jobs`` at a time) before it is returned.
    """
    if not source.exists():
        raise InputError(f"{source}: no such file or directory")
    if source.is_dir() or layout.find_fetch_manifest(source) is not None:
        stack = StackSource(sections.list_sections(source, order_file), channels)
        sections.check_sections(stack.paths, stack.format, jobs)
        return stack
    if order_file is not None:
        raise InputError(f"{source}: --order-file only applies to section stacks")
    if sections.is_section_name(source.name):
        raise InputError(f"{source}: a single section; give the directory that holds the stack")
    volume = VolumeSource(source)
    if channels is not None and channels != volume.channels:
        raise InputError(
            f"{source}: has {volume.channels} channel(s), 'channels' asks for {channels}"
        )
    return volume
