"""Safetensors files written one tensor at a time, atomically: the derived weight caches.

The int8 UNet (quant.py) and the channels-last convolution weights (layout.py) are built from
the loaded model once and mapped from cache_dir afterwards. Both are written here: the header
is computed from the shapes first, then each tensor is produced and written in turn, so only
one layer's tensors exist in memory at a time (a 1.0 GiB cap survives building them), into a
temp file beside the target that is fsynced and renamed into place (a crash leaves the old
file or none, never half of one).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

_ST_DTYPES = {torch.int8: "I8", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


@dataclass(frozen=True)
class Entry:
    """One tensor of the file: its key, dtype and shape up front, its values produced when written."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    produce: Callable[[], torch.Tensor]


def write_streamed(path: Path, entries: Sequence[Entry], metadata: dict[str, str]) -> None:
    """Write `entries` as a safetensors file at `path` (temp file, fsync, rename)."""
    # Wider dtypes first: every tensor then starts on a multiple of its element size, as
    # safetensors' own writer guarantees (an unaligned float tensor crashes vectorised
    # kernels), and the data buffer has no holes.
    ordered = sorted(entries, key=lambda e: -_itemsize(e.dtype))
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    offset = 0
    for entry in ordered:
        nbytes = _itemsize(entry.dtype)
        for dim in entry.shape:
            nbytes *= int(dim)
        header[entry.key] = {"dtype": _ST_DTYPES[entry.dtype], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(len(raw).to_bytes(8, "little"))
            handle.write(raw)
            for entry in ordered:
                tensor = entry.produce().detach().contiguous()
                if tuple(tensor.shape) != tuple(entry.shape) or tensor.dtype != entry.dtype:
                    raise ValueError(f"{entry.key}: produced {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"announced {tuple(entry.shape)} {entry.dtype}")
                if tensor.dtype == torch.bfloat16:
                    tensor = tensor.view(torch.int16)  # numpy has no bf16; the bytes are what count
                handle.write(tensor.numpy().tobytes())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()
