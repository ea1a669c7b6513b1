"""Neuroglancer viewer links for a precomputed dataset at a public URL.

The link carries the viewer state in its fragment (``#!<JSON>``), so opening it
shows the dataset with no further input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

DEFAULT_VIEWER_BASE = "https://neuroglancer-demo.appspot.com/"


def layer_type(info: Mapping[str, Any] | None) -> str:
    """Returns the Neuroglancer layer type for a precomputed ``info``."""
    if info and info.get("type") == "segmentation":
        return "segmentation"
    return "image"


def viewer_state(
    public_url: str, name: str = "", info: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Returns a viewer state with one layer showing ``precomputed://public_url``."""
    url = public_url.rstrip("/")
    layer_name = name or url.rsplit("/", 1)[-1] or "dataset"
    return {
        "layers": [
            {
                "type": layer_type(info),
                "source": f"precomputed://{url}",
                "name": layer_name,
            }
        ],
        "selectedLayer": {"layer": layer_name, "visible": True},
        "layout": "4panel",
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
