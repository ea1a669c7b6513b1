"""Reference readers of precomputed datasets for the tests, independent of the package.

Datasets are read with neuroglancer-scripts (a local path or an http URL) and
lower scales are recomputed with plain numpy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from neuroglancer_scripts import accessor as ngs_accessor
from neuroglancer_scripts import precomputed_io


def read_scale(destination: Path | str, index: int) -> np.ndarray:
    """Returns one scale of a dataset decoded into a (C, Z, Y, X) array."""
    io = precomputed_io.get_IO_for_existing_dataset(
        ngs_accessor.get_accessor_for_url(str(destination))
    )
    scale = io.info["scales"][index]
    (sx, sy, sz), (cx, cy, cz) = scale["size"], scale["chunk_sizes"][0]
    out = np.zeros((io.info["num_channels"], sz, sy, sx), dtype=np.dtype(io.info["data_type"]))
    for z in range(0, sz, cz):
        for y in range(0, sy, cy):
            for x in range(0, sx, cx):
                coords = (x, min(x + cx, sx), y, min(y + cy, sy), z, min(z + cz, sz))
                out[:, coords[4] : coords[5], coords[2] : coords[3], coords[0] : coords[1]] = (
                    io.read_chunk(scale["key"], coords)
                )
    return out


def factors_between(info: dict, index: int) -> tuple:
    old, new = info["scales"][index - 1]["size"], info["scales"][index]["size"]
    return tuple(1 if o == n else 2 for o, n in zip(old, new))  # x, y, z


def reference_downscale(volume: np.ndarray, factors: tuple, method: str) -> np.ndarray:
    """Independent numpy downsampling of a (C, Z, Y, X) array by (fx, fy, fz)."""
    fx, fy, fz = factors
    if method == "stride":
        return volume[:, ::fz, ::fy, ::fx]
    if method == "average":
        pad = [(0, 0)] + [(0, s % f) for s, f in zip(volume.shape[1:], (fz, fy, fx))]
        padded = np.pad(volume.astype(np.float64), pad, mode="edge")
        c, z, y, x = padded.shape
        blocks = padded.reshape(c, z // fz, fz, y // fy, fy, x // fx, fx)
        return np.rint(blocks.mean(axis=(2, 4, 6))).astype(volume.dtype)
    assert method == "majority"
    c, z, y, x = volume.shape
    out = np.empty((c, -(-z // fz), -(-y // fy), -(-x // fx)), volume.dtype)
    for index in np.ndindex(*out.shape):
        t, k, j, i = index
        block = volume[t, k * fz : (k + 1) * fz, j * fy : (j + 1) * fy, i * fx : (i + 1) * fx]
        values, counts = np.unique(block, return_counts=True)
        out[index] = values[np.argmax(counts)]  # ties: the smallest label
    return out


def assert_pyramid(location: Path | str, expected0: np.ndarray, method: str) -> dict:
    """Checks scale 0 against the input and each lower scale against numpy; returns info.

    ``location`` is a dataset directory or its http URL (read as a viewer would).
    """
    accessor = ngs_accessor.get_accessor_for_url(str(location))
    info = json.loads(accessor.fetch_file("info"))
    assert len(info["scales"]) >= 2
    expected = expected0
    for index in range(len(info["scales"])):
        if index:
            expected = reference_downscale(expected, factors_between(info, index), method)
        np.testing.assert_array_equal(
            read_scale(location, index), expected, err_msg=f"scale {index}"
        )
    return info
