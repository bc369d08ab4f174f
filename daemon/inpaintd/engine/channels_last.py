"""Convolution weights in channels-last order, memory-mapped from a cache file.

oneDNN runs convolutions in NHWC. The engine's activations are channels-last already (a
pre-hook, engine._to_channels_last); with the weights in the files' NCHW order every
convolution call also re-lays its weight out. Converting the weights in memory would cost an
anonymous copy of them (1.1 GiB of the SD-1.5 UNet in bf16) in place of the mapped file
pages. Instead the weights are written once, permuted to [out, kh, kw, in] and contiguous,
into ``cache_dir/layout/<component>-nhwc-v1-<model id>.safetensors``, and each Conv2d's weight
becomes a channels-last *view* of that file's mapping: zero copies, clean pages the kernel may
drop and re-read under pressure, exactly as the model's own files are. Measured (UNet call,
512x512, bf16, AMX; BENCHMARKS.md 9.4): faster than both the NCHW weights and the anonymous
channels-last copy.

The file is keyed by the model id (a prepared model's id covers its weight files' sha256) and
is checked before use: it must name the same source files (name, size, mtime of the
component's folder: a raw folder's id only covers names and sizes, so a fine-tune copied over
another of the same size is caught here), and the same tensor names, shapes and dtype, and the
first and last value of every tensor must equal the loaded weight's (two page reads a tensor,
not the 1.3 GiB). Anything else is rebuilt, never trusted. The values are the model's own; only
their order in memory changes.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .weightcache import Entry, write_streamed

FORMAT = "inpaintd.conv-nhwc/1"
SAMPLES = 2  # values compared per tensor (first and last): each may cost a page read from disk


@dataclass(frozen=True)
class LayoutStats:
    """What apply_channels_last did to one component."""

    component: str
    cache: str
    layers: int
    bytes: int
    built: bool


def cache_path(cache_dir: Path, model_id: str, component: str) -> Path:
    return Path(cache_dir) / "layout" / f"{component}-nhwc-v1-{model_id}.safetensors"


def folder_identity(folder: Path) -> str:
    """A digest of the names, sizes and mtimes of the files in a component's folder."""
    entries = []
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        if f.is_file():
            st = f.stat()
            entries.append([f.name, st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def conv_weights(module: nn.Module) -> dict[str, nn.Conv2d]:
    """Every nn.Conv2d under `module` whose weight is 4-d, by its name (int8 layers are not Conv2d)."""
    return {name: m for name, m in module.named_modules()
            if isinstance(m, nn.Conv2d) and isinstance(m.weight, torch.Tensor) and m.weight.dim() == 4}


def to_file_order(weight: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw] -> [out, kh, kw, in], the byte order of a channels-last weight."""
    return weight.detach().permute(0, 2, 3, 1)


def from_file_order(stored: torch.Tensor) -> torch.Tensor:
    """The inverse view: [out, kh, kw, in] contiguous -> [out, in, kh, kw] with channels-last strides."""
    return stored.permute(0, 3, 1, 2)


def apply_channels_last(module: nn.Module, cache_file: Path, *, model_id: str, component: str,
                        source: str = "") -> LayoutStats:
    """Point every Conv2d weight of `module` at a channels-last view of `cache_file`, building it first
    when it is missing, stale or damaged. `source` identifies the files the weights were loaded
    from (folder_identity). Raises OSError when it cannot be written (the caller keeps the weights
    as loaded)."""
    convs = conv_weights(module)
    stored = _read_checked(cache_file, convs, source)
    built = stored is None
    if stored is None:
        entries = [Entry(name, conv.weight.dtype, tuple(to_file_order(conv.weight).shape),
                         lambda c=conv: to_file_order(c.weight)) for name, conv in convs.items()]
        write_streamed(cache_file, entries,
                       {"format": FORMAT, "model_id": model_id, "component": component, "source": source})
        stored = _read_checked(cache_file, convs, source)
        if stored is None:  # written and read back different: the disk is not keeping what it was given
            raise OSError(f"{cache_file}: the written cache does not read back as the model's weights")
    total = 0
    for name, conv in convs.items():
        view = from_file_order(stored[name])
        conv.weight = nn.Parameter(view, requires_grad=False)
        total += view.numel() * view.element_size()
    return LayoutStats(component=component, cache=str(cache_file), layers=len(convs), bytes=total, built=built)


def _read_checked(cache_file: Path, convs: dict[str, nn.Conv2d], source: str) -> dict[str, torch.Tensor] | None:
    """The cache's tensors (mapped, not read), or None when it is missing or does not hold these weights."""
    if not cache_file.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT or metadata.get("source", "") != source:
            return None
        stored = load_file(str(cache_file))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        return None
    if set(stored) != set(convs):
        return None
    for name, conv in convs.items():
        weight = conv.weight.detach()
        tensor = stored[name]
        if tensor.dtype != weight.dtype or tuple(tensor.shape) != tuple(to_file_order(weight).shape):
            return None
        if not _sample_equal(from_file_order(tensor), weight):
            return None
    return stored


def _sample_equal(candidate: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal at SAMPLES positions spread over the whole tensor (first and last included)."""
    count = weight.numel()
    positions = torch.linspace(0, count - 1, steps=min(SAMPLES, count)).long().unique()
    # unravel into 4-d indices: both tensors are indexed logically, whatever their strides
    index = []
    rest = positions
    for size in reversed(weight.shape):
        index.append(rest % size)
        rest = rest // size
    index.reverse()
    # compared as bits: a NaN in the weights must not make a good cache look stale
    as_bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[weight.element_size()]
    return bool(torch.equal(candidate[tuple(index)].view(as_bits), weight[tuple(index)].view(as_bits)))
