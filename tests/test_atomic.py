"""Atomic writes: the final name holds the old or the new content, never a part."""

from __future__ import annotations

import json

import pytest

from hbp_image_tasks.atomic import write_bytes_atomically, write_json_atomically


def test_json_is_written_whole_and_replaces_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomically(path, {"slabs_done": 1})
    write_json_atomically(path, {"slabs_done": 2})
    assert json.loads(path.read_text()) == {"slabs_done": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "info"
    write_bytes_atomically(path, b"old")

    with pytest.raises(TypeError):
        write_bytes_atomically(path, object())  # not bytes: the write fails
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["info"]


def test_arrays_and_string_paths_are_written_as_their_bytes(tmp_path):
    import numpy as np

    samples = np.arange(70000, dtype="<u4").reshape(7, 10000)
    write_bytes_atomically(str(tmp_path / "chunk"), samples)
    assert (tmp_path / "chunk").read_bytes() == samples.tobytes()
    assert [p.name for p in tmp_path.iterdir()] == ["chunk"]
