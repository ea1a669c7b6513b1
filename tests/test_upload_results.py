"""upload_results: a converted dataset goes up to the real local Swift + Keystone v3 and is
read back anonymously as a viewer would; faults (5xx, 401, 403, 413, 422, dropped
connections) are injected with ``responses`` against an in-memory Swift."""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import threading
import time
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlparse

import numpy as np
import pytest
import requests
import responses

from hbp_image_tasks import errors, upload_results
from hbp_image_tasks.errors import InputError, Interrupted, UploadError, UsageError
from hbp_image_tasks.neuroglancer_link import neuroglancer_link
from hbp_image_tasks.settings import Secret, SwiftSettings, load_settings
from hbp_image_tasks.swift import SwiftConnection
from hbp_image_tasks.upload_plan import (MANIFEST_FILE, content_type_for,
                                         normalize_prefix, object_name_for, scan,
                                         validate_container_name)
from hbp_image_tasks.upload_results import main, parse_size, upload

swift = pytest.mark.swift

VOLUME_SHAPE = (70, 60, 50)  # x, y, z
CHUNK = 16


# ---------------------------------------------------------------------------
# a real converted dataset, made with neuroglancer-scripts

def make_dataset(directory: Path, volume: np.ndarray, flat: bool) -> Path:
    """Converts ``volume`` (x, y, z) to precomputed in ``directory``; returns it."""
    import nibabel
    from neuroglancer_scripts.scripts import compute_scales
    from neuroglancer_scripts.scripts import generate_scales_info
    from neuroglancer_scripts.scripts import volume_to_precomputed

    directory.mkdir(parents=True)
    nifti = directory.parent / f"{directory.name}.nii.gz"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), str(nifti))
    layout = ["--flat"] if flat else []
    out = str(directory)
    assert volume_to_precomputed.main(["v2p", str(nifti), out, "--generate-info"]) == 0
    assert generate_scales_info.main(["gsi", f"{out}/info_fullres.json", out,
                                      "--target-chunk-size", str(CHUNK)]) == 0
    assert volume_to_precomputed.main(["v2p", str(nifti), out] + layout) == 0
    assert compute_scales.main(["cs", out] + layout) == 0
    return directory


@pytest.fixture(scope="session")
def volume() -> np.ndarray:
    rng = np.random.default_rng(42)
    return (rng.random(VOLUME_SHAPE) * 255).astype(np.uint8)


@pytest.fixture(scope="session")
def datasets(tmp_path_factory, volume) -> dict[str, Path]:
    """Returns the flat and the nested conversion of the same volume (read-only)."""
    base = tmp_path_factory.mktemp("datasets")
    return {"flat": make_dataset(base / "flat", volume, flat=True),
            "nested": make_dataset(base / "nested", volume, flat=False)}


@pytest.fixture
def dataset(datasets, tmp_path) -> Path:
    """Returns a private copy of the flat dataset that a test may change."""
    copy = tmp_path / "results"
    shutil.copytree(datasets["flat"], copy)
    return copy


def local_objects(results: Path) -> dict[str, Path]:
    """Returns object name -> file of a dataset, as a viewer expects the names."""
    objects = {}
    for path in results.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            parts = list(path.relative_to(results).parts)
            name, _ = object_name_for(parts)
            objects[name] = path
    return objects


# ---------------------------------------------------------------------------
# the local side: names, headers, what is left out

@pytest.mark.parametrize("parts, name, encoding", [
    (["1mm", "0-16_0-16_32-48.gz"], "1mm/0-16_0-16_32-48", "gzip"),
    (["1mm", "0-16_0-16_32-48"], "1mm/0-16_0-16_32-48", ""),
    (["1mm", "0-16", "16-32", "32-48.gz"], "1mm/0-16_16-32_32-48", "gzip"),
    (["1mm", "0-16", "16-32", "32-48"], "1mm/0-16_16-32_32-48", ""),
    (["info"], "info", ""),
    (["transform.json"], "transform.json", ""),
    (["mesh", "1", "2", "3"], "mesh/1/2/3", ""),
])
def test_object_names_are_the_ones_neuroglancer_requests(parts, name, encoding):
    assert object_name_for(parts) == (name, encoding)


@pytest.mark.parametrize("name, content_type", [
    ("info", "application/json"),
    ("transform.json", "application/json"),
    ("segment_properties/info", "application/json"),
    ("8um/0-64_0-64_0-64", "application/octet-stream"),
    ("README.txt", "text/plain"),
])
def test_content_types(name, content_type):
    assert content_type_for(name) == content_type


@pytest.mark.parametrize("name", ["", "a/b", "x" * 257, "é" * 129])
def test_bad_container_names_are_refused(name):
    with pytest.raises(UsageError):
        validate_container_name(name)


@pytest.mark.parametrize("name", ["bigbrain", "x" * 256, "é" * 128, "a b"])
def test_good_container_names_are_accepted(name):
    assert validate_container_name(name) == name


@pytest.mark.parametrize("prefix, normalized", [
    ("", ""), ("/", ""), ("a/b/", "a/b"), ("/a", "a")])
def test_prefix_is_normalized(prefix, normalized):
    assert normalize_prefix(prefix) == normalized


@pytest.mark.parametrize("prefix", ["a//b", "a/../b", "./a"])
def test_prefix_with_dot_components_is_refused(prefix):
    with pytest.raises(UsageError):
        normalize_prefix(prefix)


@pytest.mark.parametrize("text, size", [("1073741824", 1 << 30), ("512M", 512 << 20),
                                        ("1G", 1 << 30), ("64KiB", 64 << 10)])
def test_segment_size_option(text, size):
    assert parse_size(text) == size


def test_dotfiles_and_symlinks_are_never_uploaded(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not part of the dataset")
    results = tmp_path / "results"
    (results / "1mm").mkdir(parents=True)
    (results / "info").write_text("{}")
    (results / "1mm" / "0-1_0-1_0-1.gz").write_bytes(gzip.compress(b"x"))
    (results / ".hbp-conversion-state.json").write_text('{"complete": true}')
    (results / ".hidden").mkdir()
    (results / ".hidden" / "file").write_text("x")
    (results / "link-to-file").symlink_to(outside / "secret")
    (results / "link-to-dir").symlink_to(outside)
    objects, links = scan(results)
    assert [o.name for o in objects] == ["1mm/0-1_0-1_0-1", "info"]
    assert sorted(links) == ["link-to-dir", "link-to-file"]


def test_two_files_for_one_object_are_refused(tmp_path):
    (tmp_path / "1mm").mkdir()
    (tmp_path / "info").write_text("{}")
    (tmp_path / "1mm" / "0-1_0-1_0-1").write_bytes(b"raw")
    (tmp_path / "1mm" / "0-1_0-1_0-1.gz").write_bytes(gzip.compress(b"raw"))
    with pytest.raises(InputError, match="both be uploaded"):
        scan(tmp_path)


@pytest.mark.parametrize("state, refused", [
    ({"complete": False}, True), ({"complete": True}, False), (None, False)])
def test_incomplete_conversion_is_refused(tmp_path, state, refused):
    (tmp_path / "info").write_text("{}")
    if state is not None:
        (tmp_path / ".hbp-conversion-state.json").write_text(json.dumps(state))

    class Unreachable:  # the refusal must come before any request
        def __getattr__(self, name):
            raise RuntimeError("no request expected")

    if refused:
        with pytest.raises(InputError, match="conversion is not complete"):
            upload(tmp_path, "c", Unreachable(), show_progress=False)
    else:
        with pytest.raises(RuntimeError, match="no request expected"):
            upload(tmp_path, "c", Unreachable(), show_progress=False)


def test_directory_without_info_is_refused(tmp_path):
    (tmp_path / "1mm").mkdir()
    with pytest.raises(InputError, match="no 'info'"):
        upload(tmp_path, "c", None, show_progress=False)


def test_neuroglancer_link_opens_the_public_url():
    link = neuroglancer_link("https://swift.example.org/v1/AUTH_x/c/a/b",
                             "https://viewer.example.org", info={"type": "image"})
    base, _, fragment = link.partition("#!")
    assert base == "https://viewer.example.org/"
    state = json.loads(unquote(fragment))
    assert state["layers"][0]["source"] == "precomputed://https://swift.example.org/v1/AUTH_x/c/a/b"
    assert state["layers"][0]["type"] == "image"
