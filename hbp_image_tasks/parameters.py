"""Conversion parameters of `ingest_ngs`: one validated, frozen schema with defaults.

Parameters come as JSON (inline or ``@file.json``); every key is optional.
``ConversionParameters.to_json()`` is what ``--print-parameters`` shows and
what the resume fingerprint is computed from.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from .errors import UsageError
from .shards import DEFAULT_SHARD_SIZE

TYPES = ("image", "segmentation")
DATA_TYPES = ("uint8", "uint16", "uint32", "uint64", "float32")
ENCODINGS = ("raw", "jpeg", "compressed_segmentation")
DOWNSCALING_METHODS = ("auto", "average", "majority", "stride")
VOXEL_UNITS = {"nm": 1.0, "um": 1e3, "µm": 1e3, "mm": 1e6}
CHANNELS = (1, 3)

# zlib level 5: on brain-like 8-bit chunks 1.8 % bigger than level 9 for a
# quarter of its CPU time (level 4: +3 to +5 %, level 6: +0 to +2.4 % at twice
# level 5's time); noisy data does not compress at any level. See docs/performance.md.
DEFAULT_COMPRESSION_LEVEL = 5
DEFAULT_STACK_VOXEL_SIZE_NM = 1000.0

SCHEMA_HELP = """\
parameters (JSON object, every key optional):
  type                image | segmentation                     (image)
  data_type           uint8 | uint16 | uint32 | uint64 | float32
                      (default: the input's type; signed volumes become
                      unsigned when no value is negative, else float32)
  encoding            raw | jpeg | compressed_segmentation
                      (default: raw for images, compressed_segmentation for
                      segmentations)
  jpeg_quality        1..100                                   (95)
  voxel_size          [x, y, z] positive numbers in voxel_unit
                      (default: a volume's header; 1 um for section stacks)
  voxel_unit          nm | um | mm                             (nm)
  voxel_offset        [x, y, z] integers                       ([0, 0, 0])
  chunk_size          power of two, target chunk edge          (64)
  max_scales          integer >= 1, or null for a full pyramid (null)
  downscaling_method  auto | average | majority | stride       (auto:
                      average for images, stride for segmentations)
  gzip                true | false                             (true)
  compression_level   1..9, zlib-like level; 9: smallest, slowest (5)
  input_min/input_max numbers: rescale [input_min, input_max] linearly onto
                      the output range (e.g. 16-bit or float input to uint8)
  channels            1 | 3, or null for the input's channels  (null)
  sharding            "auto" | true | false | {"preshift_bits": p,
                      "minishard_bits": m, "shard_bits": s}  (auto: sharded
                      when scale 0 has more than 10000 chunks)
  shard_size          uncompressed bytes per shard, at least one chunk
                      (2147483648: 2 GiB)
"""


@dataclasses.dataclass(frozen=True)
class ConversionParameters:
    """Validated conversion parameters; ``None`` means "derive from the input"."""

    type: str = "image"
    data_type: str | None = None
    encoding: str | None = None
    jpeg_quality: int = 95
    voxel_size: tuple[float, float, float] | None = None
    voxel_unit: str = "nm"
    voxel_offset: tuple[int, int, int] = (0, 0, 0)
    chunk_size: int = 64
    max_scales: int | None = None
    downscaling_method: str = "auto"
    gzip: bool = True
    compression_level: int = DEFAULT_COMPRESSION_LEVEL
    input_min: float | None = None
    input_max: float | None = None
    channels: int | None = None
    sharding: bool | str | dict = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE

    def __post_init__(self) -> None:
        _check_choice("type", self.type, TYPES)
        if self.data_type is not None:
            _check_choice("data_type", self.data_type, DATA_TYPES)
        if self.encoding is not None:
            _check_choice("encoding", self.encoding, ENCODINGS)
        _check_int("jpeg_quality", self.jpeg_quality, 1, 100)
        if self.voxel_size is not None:
            object.__setattr__(
                self, "voxel_size", _check_triple("voxel_size", self.voxel_size, float)
            )
        _check_choice("voxel_unit", self.voxel_unit, tuple(VOXEL_UNITS))
        object.__setattr__(
            self, "voxel_offset", _check_triple("voxel_offset", self.voxel_offset, int)
        )
        _check_int("chunk_size", self.chunk_size, 1, 4096)
        if self.chunk_size & (self.chunk_size - 1):
            raise UsageError(
                f"parameter 'chunk_size' must be a power of two "
                f"(e.g. 32, 64, 128), got {self.chunk_size}"
            )
        if self.max_scales is not None:
            _check_int("max_scales", self.max_scales, 1, 64)
        _check_choice("downscaling_method", self.downscaling_method, DOWNSCALING_METHODS)
        if not isinstance(self.gzip, bool):
            raise UsageError(f"parameter 'gzip' must be true or false, got {self.gzip!r}")
        _check_int("compression_level", self.compression_level, 1, 9)
        for key in ("input_min", "input_max"):
            value = getattr(self, key)
            if value is not None:
                if (
                    isinstance(value, bool)
                    or not isinstance(value, (int, float))
                    or not math.isfinite(value)
                ):
                    raise UsageError(
                        f"parameter '{key}' must be a finite number or null, got {value!r}"
                    )
                object.__setattr__(self, key, float(value))
        if self.channels is not None:
            _check_choice("channels", self.channels, CHANNELS)
        object.__setattr__(self, "sharding", _check_sharding(self.sharding))
        _check_int("shard_size", self.shard_size, 1, 1 << 62)
        self._check_combinations()

    def _check_combinations(self) -> None:
        if (
            self.input_min is not None
            and self.input_max is not None
            and self.input_min >= self.input_max
        ):
            raise UsageError(
                "parameters 'input_min' and 'input_max': input_min "
                f"({self.input_min:g}) must be below input_max "
                f"({self.input_max:g})"
            )
        if self.input_min is not None and self.input_max is None:
            raise UsageError("parameter 'input_min' needs 'input_max' too")
        segmentation = self.type == "segmentation"
        if self.encoding == "compressed_segmentation" and not segmentation:
            raise UsageError(
                "parameter 'encoding': compressed_segmentation needs "
                "'type': 'segmentation' (allowed for images: raw, jpeg)"
            )
        if self.encoding == "jpeg" and segmentation:
            raise UsageError(
                "parameter 'encoding': jpeg is lossy and cannot hold "
                "labels (allowed for segmentations: raw, "
                "compressed_segmentation)"
            )
        if self.encoding == "jpeg" and self.data_type not in (None, "uint8"):
            raise UsageError(
                f"parameter 'data_type': the jpeg encoding needs uint8, got {self.data_type}"
            )
        if self.encoding == "compressed_segmentation" and self.data_type in (
            "uint8",
            "uint16",
            "float32",
        ):
            raise UsageError(
                "parameter 'data_type': compressed_segmentation needs "
                f"uint32 or uint64, got {self.data_type}"
            )
        if segmentation and self.channels == 3:
            raise UsageError(
                "parameter 'channels': a segmentation has 1 channel "
                "(RGB is only allowed with 'type': 'image')"
            )
        if segmentation and self.data_type == "float32":
            raise UsageError(
                "parameter 'data_type': a segmentation needs an "
                "integer type (uint8, uint16, uint32, uint64)"
            )
        if segmentation and self.downscaling_method == "average":
            raise UsageError(
                "parameter 'downscaling_method': average mixes labels; "
                "allowed for segmentations: auto, majority, stride"
            )
        if segmentation and self.input_max is not None:
            raise UsageError(
                "parameters 'input_min'/'input_max' rescale "
                "intensities and cannot be used with segmentations"
            )

    @property
    def effective_encoding(self) -> str:
        """Returns the chunk encoding, resolving the type-dependent default."""
        if self.encoding is not None:
            return self.encoding
        return "compressed_segmentation" if self.type == "segmentation" else "raw"

    @property
    def effective_downscaling_method(self) -> str:
        """Returns the downscaling method, resolving ``auto`` as neuroglancer-scripts does."""
        if self.downscaling_method != "auto":
            return self.downscaling_method
        return "average" if self.type == "image" else "stride"

    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """Returns the voxel size in nanometres, or None when not given."""
        if self.voxel_size is None:
            return None
        factor = VOXEL_UNITS[self.voxel_unit]
        return tuple(v * factor for v in self.voxel_size)  # type: ignore[return-value]

    def resolved(self) -> ConversionParameters:
        """Returns a copy with ``encoding`` and ``downscaling_method`` made explicit."""
        return self.replace(
            encoding=self.effective_encoding, downscaling_method=self.effective_downscaling_method
        )

    def to_dict(self) -> dict[str, Any]:
        """Returns the parameters as a JSON-ready dict (lists, not tuples)."""
        result = dataclasses.asdict(self)
        for key in ("voxel_size", "voxel_offset"):
            if result[key] is not None:
                result[key] = list(result[key])
        return result

    def to_json(self, indent: int | None = 2) -> str:
        """Returns the parameters as JSON with sorted keys (stable for fingerprints)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    def replace(self, **changes: Any) -> ConversionParameters:
        """Returns a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: Any, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise UsageError(
            f"parameter '{key}' must be one of {', '.join(str(a) for a in allowed)}; got {value!r}"
        )


def _check_int(key: str, value: Any, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(
            f"parameter '{key}' must be an integer from {low} to {high}; got {value!r}"
        )


SHARDING_BITS = ("preshift_bits", "minishard_bits", "shard_bits")


def _check_sharding(value: Any) -> bool | str | dict:
    """Returns ``value`` as a valid ``sharding`` (explicit bits as a plain dict)."""
    if value == "auto" or isinstance(value, bool):
        return value
    if not isinstance(value, dict) or sorted(value) != sorted(SHARDING_BITS):
        raise UsageError(
            'parameter \'sharding\' must be "auto", true, false or {"preshift_bits": p, '
            f'"minishard_bits": m, "shard_bits": s}}; got {value!r}'
        )
    for key in SHARDING_BITS:
        _check_int(f"sharding.{key}", value[key], 0, 64)
    if sum(value.values()) > 64:
        raise UsageError(f"parameter 'sharding': the bits add up to more than 64; got {value!r}")
    return {key: value[key] for key in SHARDING_BITS}


def _check_triple(key: str, value: Any, kind: type) -> tuple:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise UsageError(f"parameter '{key}' must be a list of 3 numbers [x, y, z]; got {value!r}")
    result = []
    for item in value:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise UsageError(
                f"parameter '{key}' must be a list of 3 numbers [x, y, z]; got {value!r}"
            )
        if kind is int:
            if float(item) != int(item):
                raise UsageError(f"parameter '{key}' must hold integers; got {value!r}")
            result.append(int(item))
        else:
            if not math.isfinite(item) or item <= 0:
                raise UsageError(f"parameter '{key}' must hold positive numbers; got {value!r}")
            result.append(float(item))
    return tuple(result)


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(ConversionParameters))


def parameters_from_dict(values: dict[str, Any]) -> ConversionParameters:
    """Returns validated parameters from a decoded JSON object."""
    if not isinstance(values, dict):
        raise UsageError('--parameters must be a JSON object such as {"voxel_size": [20, 20, 20]}')
    unknown = sorted(set(values) - set(FIELD_NAMES))
    if unknown:
        raise UsageError(f"unknown parameter '{unknown[0]}' (allowed: {', '.join(FIELD_NAMES)})")
    return ConversionParameters(**values)


def parse_parameters(text: str | None) -> ConversionParameters:
    """Returns parameters parsed from inline JSON or ``@file.json`` (None: defaults)."""
    if text is None or not text.strip():
        return ConversionParameters()
    origin = "--parameters"
    if text.startswith("@"):
        path = Path(text[1:]).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(
                f"cannot read parameters file {path}: {getattr(exc, 'strerror', None) or exc}"
            ) from None
        origin = str(path)
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"{origin}: invalid JSON ({exc})") from None
    return parameters_from_dict(values)
