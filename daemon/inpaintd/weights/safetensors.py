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
from ..core.quoting import quote

# Bytes per value of each safetensors dtype (the format's own list).
ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
              "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


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
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: nesting a hostile file chose
            raise ModelError(f"{path} is not a safetensors file (unreadable header: {type(exc).__name__})") from exc
    if not isinstance(header, dict):
        raise ModelError(f"{path} is not a safetensors file (the header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    metadata = {str(k): str(v) for k, v in metadata.items()} if isinstance(metadata, dict) else {}
    end = 0
    for name, info in header.items():
        try:
            start, stop = (int(x) for x in info["data_offsets"])
            info["shape"] = [int(d) for d in info["shape"]]
            dtype = info["dtype"]
            count = 1
            for dim in info["shape"]:
                count *= dim
        except (TypeError, KeyError, ValueError, AttributeError) as exc:
            raise ModelError(f"{path} is not a safetensors file (tensor {quote(name)} is malformed)") from exc
        if not isinstance(dtype, str) or dtype not in ITEM_BYTES:
            raise ModelError(f"{path}: tensor {quote(name)} has an unknown dtype {quote(dtype)}")
        if not 0 <= start <= stop or any(d < 0 for d in info["shape"]) or stop - start != count * ITEM_BYTES[dtype]:
            raise ModelError(f"{path} is not a safetensors file (tensor {quote(name)}: offsets {start}..{stop} do not "
                             f"hold {info['shape']} {dtype} values)")
        end = max(end, stop)
    available = size - 8 - length
    if end > available:
        raise ModelError(
            f"{path} is truncated: its header describes {end} bytes of tensor data but the file holds "
            f"{available}; copy or download it again"
        )
    return header, metadata
