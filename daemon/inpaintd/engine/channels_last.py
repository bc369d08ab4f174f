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

The same file, one mechanism, also holds a component in *another dtype* (`apply_derived`):
every floating tensor of the module cast once to the compute dtype (bf16 from an fp16 or fp32
folder on a bf16 CPU; fp32 from a 16-bit folder where ``model.weights: cache``), the conv
weights in channels-last order too, into
``cache_dir/layout/<component>-<nhwc|nchw>-<dtype>-v1-<model id>.safetensors``. Loading in the
folder's own dtype maps it without a copy, and casting from there one tensor at a time keeps
the peak at one tensor: diffusers' own cast at load would make every weight an anonymous copy.
It is checked as above, the samples compared after the same cast.
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
DERIVED_FORMAT = "inpaintd.derived-weights/1"
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


def derived_path(cache_dir: Path, model_id: str, component: str, dtype: torch.dtype, nhwc: bool) -> Path:
    name = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    order = "nhwc" if nhwc else "nchw"
    return Path(cache_dir) / "layout" / f"{component}-{order}-{name}-v1-{model_id}.safetensors"


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


@dataclass(frozen=True)
class _Slot:
    """One tensor of the module that the cache file replaces: owner.attr, a parameter or a buffer."""

    owner: nn.Module
    attr: str
    parameter: bool
    nhwc: bool  # stored as [out, kh, kw, in], mapped back as a channels-last view

    def current(self) -> torch.Tensor:
        return getattr(self.owner, self.attr).detach()

    def file_shape(self) -> tuple[int, ...]:
        tensor = self.current()
        return tuple((to_file_order(tensor) if self.nhwc else tensor).shape)


def _conv_slots(module: nn.Module) -> dict[str, _Slot]:
    return {name: _Slot(conv, "weight", True, True) for name, conv in conv_weights(module).items()}


def _all_slots(module: nn.Module, nhwc: bool) -> dict[str, _Slot]:
    convs = {id(conv) for conv in conv_weights(module).values()} if nhwc else set()
    slots: dict[str, _Slot] = {}
    for prefix, owner in module.named_modules():
        for attr, tensor in list(owner._parameters.items()) + list(owner._buffers.items()):
            if tensor is None or not tensor.is_floating_point():
                continue
            key = f"{prefix}.{attr}" if prefix else attr
            slots[key] = _Slot(owner, attr, attr in owner._parameters, attr == "weight" and id(owner) in convs)
    return slots


def apply_channels_last(module: nn.Module, cache_file: Path, *, model_id: str, component: str,
                        source: str = "") -> LayoutStats:
    """Point every Conv2d weight of `module` at a channels-last view of `cache_file`, building it first
    when it is missing, stale or damaged. `source` identifies the files the weights were loaded
    from (folder_identity). Raises OSError when it cannot be written (the caller keeps the weights
    as loaded)."""
    return _apply(module, cache_file, _conv_slots(module), None, FORMAT,
                  {"model_id": model_id, "component": component, "source": source})


def apply_derived(module: nn.Module, cache_file: Path, *, dtype: torch.dtype, nhwc: bool, model_id: str,
                  component: str, source: str = "") -> LayoutStats:
    """Point every floating parameter and buffer of `module` at `cache_file`'s copy of it in `dtype`
    (conv weights channels-last when `nhwc`), building the file first when it is missing, stale or
    damaged. Raises OSError when it cannot be written (the caller converts in memory instead)."""
    return _apply(module, cache_file, _all_slots(module, nhwc), dtype, DERIVED_FORMAT,
                  {"model_id": model_id, "component": component, "source": source, "dtype": str(dtype),
                   "order": "nhwc" if nhwc else "nchw"})


def _apply(module: nn.Module, cache_file: Path, slots: dict[str, _Slot], dtype: torch.dtype | None, fmt: str,
           metadata: dict[str, str]) -> LayoutStats:
    stored = _read_checked(cache_file, slots, dtype, fmt, metadata["source"])
    built = stored is None
    if stored is None:
        entries = [Entry(key, dtype or slot.current().dtype, slot.file_shape(),
                         lambda s=slot: _produce(s, dtype)) for key, slot in slots.items()]
        write_streamed(cache_file, entries, {"format": fmt, **metadata})
        stored = _read_checked(cache_file, slots, dtype, fmt, metadata["source"])
        if stored is None:  # written and read back different: the disk is not keeping what it was given
            raise OSError(f"{cache_file}: the written cache does not read back as the model's weights")
    total = 0
    for key, slot in slots.items():
        view = from_file_order(stored[key]) if slot.nhwc else stored[key]
        if slot.parameter:
            slot.owner._parameters[slot.attr] = nn.Parameter(view, requires_grad=False)
        else:
            slot.owner._buffers[slot.attr] = view
        total += view.numel() * view.element_size()
    return LayoutStats(component=metadata["component"], cache=str(cache_file), layers=len(slots), bytes=total,
                       built=built)


def _produce(slot: _Slot, dtype: torch.dtype | None) -> torch.Tensor:
    tensor = slot.current()
    tensor = to_file_order(tensor) if slot.nhwc else tensor
    return tensor if dtype is None else tensor.to(dtype)


def _read_checked(cache_file: Path, slots: dict[str, _Slot], dtype: torch.dtype | None, fmt: str,
                  source: str) -> dict[str, torch.Tensor] | None:
    """The cache's tensors (mapped, not read), or None when it is missing or does not hold these weights."""
    if not cache_file.is_file():
        return None
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(cache_file), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != fmt or metadata.get("source", "") != source:
            return None
        stored = load_file(str(cache_file))
    except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        return None
    if set(stored) != set(slots):
        return None
    for key, slot in slots.items():
        weight = slot.current()
        tensor = stored[key]
        if tensor.dtype != (dtype or weight.dtype) or tuple(tensor.shape) != slot.file_shape():
            return None
        if not _sample_equal(from_file_order(tensor) if slot.nhwc else tensor, weight):
            return None
    return stored


def _sample_equal(candidate: torch.Tensor, weight: torch.Tensor) -> bool:
    """Equal at SAMPLES positions spread over the whole tensor (first and last included), `weight`'s
    values cast to `candidate`'s dtype first (a derived cache holds them cast)."""
    count = weight.numel()
    positions = torch.linspace(0, count - 1, steps=min(SAMPLES, count)).long().unique()
    # unravel into n-d indices: both tensors are indexed logically, whatever their strides
    index = []
    rest = positions
    for size in reversed(weight.shape):
        index.append(rest % size)
        rest = rest // size
    index.reverse()
    # compared as bits: a NaN in the weights must not make a good cache look stale
    as_bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[candidate.element_size()]
    expected = weight[tuple(index)].to(candidate.dtype)
    return bool(torch.equal(candidate[tuple(index)].view(as_bits), expected.view(as_bits)))
