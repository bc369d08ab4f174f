"""The one reader of safetensors headers: names, dtypes, shapes and offsets, checked against the file.

Reads only the 8-byte length and the JSON header, so a corrupt, truncated or foreign file is
refused (ModelError naming the file) before a byte of tensor data is read or mapped.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from ..core.errors import ModelError


def read_header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors header, validated against the file's size (a truncated copy is refused)."""
    return read_header_and_metadata(path)[0]


def read_header_and_metadata(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """read_header plus the file's free-form ``__metadata__`` strings."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path} is not a safetensors file (only {len(raw)} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > min(100 * 2**20, size - 8):
            raise ModelError(f"{path} is not a safetensors file (its header claims {length} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelError(f"{path} is not a safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    end = 0
    for name, info in header.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            info["shape"] = [int(d) for d in info["shape"]]
            str(info["dtype"])
        except (TypeError, KeyError, ValueError) as exc:
            raise ModelError(f"{path} is not a safetensors file (tensor {name!r} is malformed)") from exc
        end = max(end, stop)
    available = size - 8 - length
    if end > available:
        raise ModelError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but the file holds "
            f"{available}; copy or download it again"
        )
    return header, metadata
