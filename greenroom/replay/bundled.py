"""Trace slices shipped in the package (greenroom/data/SOURCE.md names their sources)."""

from __future__ import annotations

from importlib import resources

AZURE_CONV = "azure_conv_slice.csv"
MOONCAKE = "mooncake_slice.jsonl"
OPENORCA = "openorca_slice.csv"


def bundled_trace(name: str) -> str:
    """The path of a bundled slice, e.g. ``bundled_trace(AZURE_CONV)``."""
    path = resources.files("greenroom") / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{name!r} is not a bundled trace slice (greenroom/data)")
    return str(path)
