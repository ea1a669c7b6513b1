"""Fetch brain images, convert them to Neuroglancer precomputed, publish them on Swift.

The four console scripts (``fetch_input``, ``ingest_ngs``, ``upload_results``
and ``ingest``) are thin command-line layers over plain functions.
"""

from importlib import metadata

try:
    __version__ = metadata.version("hbp-image-tasks")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0+unknown"
