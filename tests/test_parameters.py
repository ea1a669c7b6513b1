"""Conversion parameters: defaults, inline and @file JSON, one-line errors naming the key."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hbp_image_tasks.errors import UsageError
from hbp_image_tasks.parameters import (
    DEFAULT_COMPRESSION_LEVEL,
    FIELD_NAMES,
    ConversionParameters,
    parse_parameters,
)


@pytest.mark.parametrize("text", [None, "", "  ", "{}"])
def test_missing_or_empty_parameters_give_the_defaults(text):
    params = parse_parameters(text)
    assert params == ConversionParameters()
    assert params.type == "image" and params.gzip is True
    assert params.compression_level == DEFAULT_COMPRESSION_LEVEL
    assert params.effective_encoding == "raw"
    assert params.effective_downscaling_method == "average"


def test_inline_json_and_file_give_the_same_parameters(tmp_path):
    document = {
        "voxel_size": [20, 20, 40],
        "voxel_unit": "um",
        "chunk_size": 32,
        "gzip": False,
        "max_scales": 3,
    }
    path = tmp_path / "params.json"
    path.write_text(json.dumps(document))
    inline = parse_parameters(json.dumps(document))
    assert parse_parameters(f"@{path}") == inline
    assert inline.voxel_size_nm() == (20000.0, 20000.0, 40000.0)
    assert inline.voxel_size == (20.0, 20.0, 40.0)


def test_to_json_round_trips_and_lists_every_key():
    params = parse_parameters('{"type": "segmentation", "voxel_size": [1, 2, 3]}')
    shown = json.loads(params.to_json())
    assert sorted(shown) == sorted(FIELD_NAMES)
    assert parse_parameters(params.to_json()) == params
    assert params.effective_encoding == "compressed_segmentation"
    assert params.effective_downscaling_method == "stride"


@pytest.mark.parametrize(
    "text, words",
    [
        ('{"colour": "red"}', ["colour", "allowed", "voxel_size"]),
        ('{"type": "mesh"}', ["'type'", "image", "segmentation"]),
        ('{"encoding": "png"}', ["'encoding'", "raw", "jpeg", "compressed_segmentation"]),
        ('{"data_type": "int16"}', ["'data_type'", "uint8", "float32"]),
        ('{"downscaling_method": "max"}', ["'downscaling_method'", "majority", "stride"]),
        ('{"jpeg_quality": 101}', ["'jpeg_quality'", "1", "100"]),
        ('{"compression_level": 0}', ["'compression_level'", "1", "9"]),
        ('{"compression_level": "6"}', ["'compression_level'"]),
        ('{"gzip": "yes"}', ["'gzip'", "true", "false"]),
        ('{"chunk_size": 48}', ["'chunk_size'", "power of two"]),
        ('{"voxel_size": [1, 2]}', ["'voxel_size'", "3"]),
        ('{"voxel_size": [1, -2, 3]}', ["'voxel_size'", "positive"]),
        ('{"voxel_unit": "inch"}', ["'voxel_unit'", "nm", "um", "mm"]),
        ('{"voxel_offset": [0.5, 0, 0]}', ["'voxel_offset'", "integers"]),
        ('{"max_scales": 0}', ["'max_scales'"]),
        ('{"channels": 2}', ["'channels'", "1", "3"]),
        ('{"input_min": 10, "input_max": 5}', ["input_min", "input_max"]),
        ('{"input_min": 10}', ["input_max"]),
        ('{"encoding": "compressed_segmentation"}', ["'encoding'", "segmentation"]),
        ('{"type": "segmentation", "encoding": "jpeg"}', ["'encoding'", "raw"]),
        ('{"type": "segmentation", "channels": 3}', ["'channels'", "RGB"]),
        (
            '{"type": "segmentation", "downscaling_method": "average"}',
            ["'downscaling_method'", "majority", "stride"],
        ),
        ('{"encoding": "jpeg", "data_type": "uint16"}', ["'data_type'", "uint8"]),
        ('{"sharding": "yes"}', ["'sharding'", "auto", "true", "false", "shard_bits"]),
        ('{"sharding": {"shard_bits": 2}}', ["'sharding'", "preshift_bits", "minishard_bits"]),
        (
            '{"sharding": {"preshift_bits": 1, "minishard_bits": -1, "shard_bits": 2}}',
            ["'sharding.minishard_bits'", "0", "64"],
        ),
        (
            '{"sharding": {"preshift_bits": 30, "minishard_bits": 30, "shard_bits": 30}}',
            ["'sharding'", "64"],
        ),
        ('{"shard_size": 0}', ["'shard_size'"]),
        ('{"shard_size": "2G"}', ["'shard_size'", "integer"]),
        ("[1, 2]", ["JSON object"]),
        ('{"type": ', ["invalid JSON"]),
    ],
)
def test_bad_parameters_give_one_line_naming_the_key_and_allowed_values(text, words):
    with pytest.raises(UsageError) as caught:
        parse_parameters(text)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_unreadable_parameters_file_is_named(tmp_path):
    with pytest.raises(UsageError, match="missing.json"):
        parse_parameters(f"@{tmp_path / 'missing.json'}")


def test_parameters_are_frozen():
    params = ConversionParameters()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.gzip = False  # type: ignore[misc]
    assert params.replace(gzip=False).gzip is False


@pytest.mark.parametrize(
    "value",
    ["auto", True, False, {"shard_bits": 3, "minishard_bits": 2, "preshift_bits": 6}],
)
def test_sharding_values_round_trip_through_print_parameters(value):
    params = parse_parameters(json.dumps({"sharding": value, "shard_size": 1 << 20}))
    assert params.sharding == value and params.shard_size == 1 << 20
    assert parse_parameters(params.to_json()) == params
    assert json.loads(params.to_json())["sharding"] == value


def test_the_auto_sharding_threshold_is_the_documented_one():
    from hbp_image_tasks.parameters import SCHEMA_HELP
    from hbp_image_tasks.shards import AUTO_MIN_CHUNKS, DEFAULT_SHARD_SIZE

    assert f"more than {AUTO_MIN_CHUNKS} chunks" in SCHEMA_HELP
    assert f"({DEFAULT_SHARD_SIZE}: 2 GiB)" in SCHEMA_HELP
    assert DEFAULT_SHARD_SIZE == 2 << 30
