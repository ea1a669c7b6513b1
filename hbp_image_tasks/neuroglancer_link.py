"""Neuroglancer viewer links for a precomputed dataset at a public URL.

The link carries the viewer state in its fragment (``#!<JSON>``), so opening it
shows the dataset with no further input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import quote

DEFAULT_VIEWER_BASE = "https://neuroglancer-demo.appspot.com/"


RGB_SHADER = (
    "void main() {\n  emitRGB(vec3(toNormalized(getDataValue(0)), "
    "toNormalized(getDataValue(1)), toNormalized(getDataValue(2))));\n}\n"
)


def default_layer_type(info: Mapping[str, Any] | None) -> str:
    """Returns the Neuroglancer layer type for a precomputed ``info``."""
    if info and info.get("type") == "segmentation":
        return "segmentation"
    return "image"


def layer_state(
    source_url: str,
    name: str,
    info: Mapping[str, Any] | None = None,
    layer_type: str | None = None,
    segments: Sequence[int] = (),
) -> dict[str, Any]:
    """Returns the layer that shows ``precomputed://source_url``: RGB images in colour,
    the chosen segments of a segmentation (none chosen: all of them, half visible)."""
    layer_type = layer_type or default_layer_type(info)
    layer: dict[str, Any] = {
        "type": layer_type,
        "source": f"precomputed://{source_url}",
        "name": name,
    }
    if layer_type == "image" and info and int(info.get("num_channels", 1)) == 3:
        layer["shader"] = RGB_SHADER
    if layer_type == "segmentation":
        if segments:
            layer["segments"] = [str(s) for s in segments]
        else:
            # Without selected segments, show all of them in the cross-sections.
            layer["notSelectedAlpha"] = 0.5
    return layer


def viewer_state(
    public_url: str,
    name: str = "",
    info: Mapping[str, Any] | None = None,
    *,
    layer_type: str | None = None,
    segments: Sequence[int] = (),
    layout: str = "4panel",
) -> dict[str, Any]:
    """Returns a viewer state with one layer (see :func:`layer_state`) showing
    ``precomputed://public_url``, named ``name`` or after the URL's last component."""
    url = public_url.rstrip("/")
    layer_name = name or url.rsplit("/", 1)[-1] or "dataset"
    return {
        "layers": [layer_state(url, layer_name, info, layer_type, segments)],
        "selectedLayer": {"layer": layer_name, "visible": True},
        "layout": layout,
    }


def neuroglancer_link(
    public_url: str,
    viewer_base: str = DEFAULT_VIEWER_BASE,
    name: str = "",
    info: Mapping[str, Any] | None = None,
) -> str:
    """Returns a viewer URL that opens the dataset at ``public_url``."""
    base = viewer_base.split("#", 1)[0]
    if "?" not in base and not base.endswith("/"):
        base += "/"
    state = json.dumps(viewer_state(public_url, name, info), separators=(",", ":"))
    # Neuroglancer parses the fragment after '#!' as URL-encoded JSON.
    return f"{base}#!{quote(state, safe=',:{}[]/')}"
