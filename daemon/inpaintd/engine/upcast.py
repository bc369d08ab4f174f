"""16-bit weights kept as mapped from the files, each layer's weight upcast to fp32 when it runs.

On a CPU without native bf16 the engine computes in fp32. An fp16 (or bf16) prepared folder
then needs no fp32 copy of its weights: every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Embedding``
keeps its weight as loaded (a view of the safetensors mapping, or of the channels-last layout
cache), and converts it to the input's dtype inside ``forward``; only one layer's fp32 weight
exists at a time. fp16 -> fp32 and bf16 -> fp32 are exact, so the pixels are those of fp32
weights. The small tensors (norms, biases) become fp32 in memory.

Why not diffusers' ``enable_layerwise_casting``: its hook casts the whole module to fp32 before
the call and back to fp16 after, which replaces each mapped weight with an anonymous copy on
the first call (the file-backed UNet becomes 1.6 GiB that a memory cap cannot reclaim), and it
covers diffusers models only, not the transformers text encoder.

The 16-bit weight moves from the module's parameters to its buffers under the same name
(``layer.weight`` still reads it): ``parameters()`` then holds fp32 tensors only, so the
pipeline's ``unet.dtype``/``vae.dtype`` say fp32 and nothing upcasts a "fp16 VAE" by copying it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class UpcastLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class UpcastConv2d(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # .to() keeps a channels-last weight channels-last (memory_format=preserve_format)
        return self._conv_forward(x, self.weight.to(x.dtype), self.bias)


class UpcastEmbedding(nn.Embedding):
    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Look up first, convert the few rows looked up, not the 49408-row table.
        return super().forward(ids).to(self.compute_dtype)


_WRAPPERS: dict[type, type] = {nn.Linear: UpcastLinear, nn.Conv2d: UpcastConv2d, nn.Embedding: UpcastEmbedding}


@dataclass(frozen=True)
class UpcastStats:
    layers: int  # layers whose weight stays 16-bit and is upcast per call
    weight_bytes: int  # bytes of those weights (mapped, not copied)
    converted_bytes: int  # bytes of the other floating tensors, now fp32 in memory


def upcast_at_call(module: nn.Module, compute: torch.dtype = torch.float32) -> UpcastStats:
    """Make `module` compute in `compute` while its Linear/Conv2d/Embedding weights stay as they are."""
    layers = weight_bytes = converted = 0
    for sub in module.modules():
        wrapper = _WRAPPERS.get(type(sub))  # exact types: a subclass may have its own forward
        weight = sub._parameters.get("weight") if wrapper is not None else None
        if weight is not None and weight.is_floating_point() and weight.dtype != compute:
            del sub._parameters["weight"]
            sub._buffers["weight"] = weight.detach()
            sub.__class__ = wrapper
            if wrapper is UpcastEmbedding:
                sub.compute_dtype = compute  # type: ignore[attr-defined]
            layers += 1
            weight_bytes += weight.numel() * weight.element_size()
        for store in (sub._parameters, sub._buffers):
            for name, tensor in list(store.items()):
                if tensor is None or not tensor.is_floating_point() or tensor.dtype == compute:
                    continue
                if store is sub._buffers and name == "weight" and isinstance(sub, tuple(_WRAPPERS.values())):
                    continue  # the wrapped weight itself
                cast = tensor.detach().to(compute)
                store[name] = nn.Parameter(cast, requires_grad=False) if store is sub._parameters else cast
                converted += cast.numel() * cast.element_size()
    return UpcastStats(layers=layers, weight_bytes=weight_bytes, converted_bytes=converted)
