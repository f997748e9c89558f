"""Bytes as stored: read tensor sizes from safetensors headers, not from arithmetic."""

from __future__ import annotations

import json
import struct
from pathlib import Path


def tensor_sizes(path: Path) -> dict[str, int]:
    """Data bytes of every tensor in a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def folder_tensor_sizes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    from pqflow.models import weight_files

    for p in weight_files(Path(folder)):
        sizes.update(tensor_sizes(p))
    return sizes


def module_bytes(sizes: dict[str, int], modules: list[str]) -> int:
    """Bytes of all tensors that belong to the given modules (``<module>.<tensor>``)."""
    prefixes = tuple(f"{m}." for m in modules)
    return sum(v for k, v in sizes.items() if k.startswith(prefixes))
