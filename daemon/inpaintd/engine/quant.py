"""Weight-only int8 for the UNet: half the bytes of bf16, computed in the runtime dtype.

Every ``nn.Linear`` and ``nn.Conv2d`` of the UNet above a size threshold keeps its weight as
int8 with one scale per output channel (symmetric, ``scale = max|w| / 127``); activations stay
in bf16/fp32. Each layer converts its weight into the compute dtype just before the call and runs the
usual oneDNN bf16/fp32 matmul or convolution, so only one layer's full-precision weight
exists at any moment; the per-channel scale goes on the weight or, when that is the smaller
tensor, on the output (the two are equal: a per-output-channel scale commutes with the
matmul/convolution). A
Linear with only a few input rows uses the fused ``aten._weight_int8pack_mm`` instead.

Why: the SD-1.5 UNet is 860M parameters, 1.64 GiB in bf16. Each denoising step reads all of
it, so under a memory cap near that size the kernel keeps evicting and re-reading weight
pages. In int8 it is 0.82 GiB and fits with room for activations.

The quantized weights are cached as a safetensors file (``unet-int8-<model id>.safetensors``
in the cache directory, written atomically) and loaded by mmap, so they are file-backed pages
the kernel may drop and re-read under pressure instead of anonymous memory it must keep. The
first load quantizes (tens of seconds for SD-1.5 on 2 cores) and writes the cache; later loads
map it in well under a second.

Quality: per-channel int8 weight rounding is the standard weight-only scheme; it cannot be
judged with random weights, so it is an option (``model.unet_int8``: auto turns it on only
under a tight memory limit), not something the benchmarks here can vouch for on pictures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .weightcache import Entry, write_streamed

FORMAT = "inpaintd.unet-int8/1"
MIN_PARAMS = 16384  # smaller layers are not worth the bookkeeping (and keep their float weights)
# _weight_int8pack_mm is a GEMV-style kernel: measured 3.1 s of a 5.3 s UNet step at 512x512
# (8192 rows per call) against ~0.3 s for dequantize + oneDNN bf16 matmul. It only wins for
# a few rows (the text-embedding projections), so bigger inputs take the dequantize path.
FUSED_MAX_ROWS = 256
# Where the layer's output has fewer elements than its weight (the 1280-channel layers at
# 8x8 and 16x16 latents, which hold most of the parameters), convert the weight only and
# scale the output: measured UNet step at 512x512, 2 threads of an AMX Xeon: bf16 2.04 s, int8
# scaling the weight 2.39 s, int8 scaling the smaller side 2.25 s (AMD EPYC without AMX, full
# job step incl. CFG: bf16 4.03 s, int8 4.30 s; BENCHMARKS.md). (A shared scratch buffer for the
# dequantized weight measured the same, 2.26 s, and was dropped.)
SCALE_OUTPUT = True


def _dequantize(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qweight * scale (per output channel) in `dtype`."""
    view = (-1,) + (1,) * (qweight.dim() - 1)
    return qweight * scale.to(dtype).view(view)


def _has_int8pack_mm() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 [out, in] with a per-output scale [out]."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = qweight.shape[1]
        self.out_features = qweight.shape[0]
        self.register_buffer("qweight", qweight, persistent=True)
        self.register_buffer("scale", scale, persistent=True)
        if bias is not None:
            self.register_buffer("bias", bias, persistent=True)
        else:
            self.bias = None
        self.fused = _has_int8pack_mm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.numel() // shape[-1]
        if self.fused and rows <= FUSED_MAX_ROWS and x.dtype == torch.bfloat16 and self.scale.dtype == torch.bfloat16:
            flat = x.reshape(-1, shape[-1])
            if not flat.is_contiguous():
                flat = flat.contiguous()
            out = torch.ops.aten._weight_int8pack_mm(flat, self.qweight, self.scale)
            if self.bias is not None:
                out = out.add_(self.bias)
            return out.reshape(*shape[:-1], self.out_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if SCALE_OUTPUT and rows * self.out_features < self.qweight.numel():
            # Per-output-channel scale commutes with the matmul: convert only (cheap) and scale
            # the smaller output instead of the weight.
            out = F.linear(x, self.qweight.to(x.dtype))
            out.mul_(self.scale.to(x.dtype))
            return out if bias is None else out.add_(bias)
        return F.linear(x, _dequantize(self.qweight, self.scale, x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, fused={self.fused}"


class Int8Conv2d(nn.Module):
    """A Conv2d whose weight is int8 [out, in/groups, kh, kw] with a per-output scale [out]."""

    def __init__(self, conv: nn.Conv2d, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.stride = conv.stride
        self.padding = conv.padding
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = conv.kernel_size
        self.register_buffer("qweight", qweight, persistent=True)
        self.register_buffer("scale", scale, persistent=True)
        if bias is not None:
            self.register_buffer("bias", bias, persistent=True)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if SCALE_OUTPUT and x.dim() == 4:
            out_elems = x.shape[0] * self.out_channels * (x.shape[2] // self.stride[0]) * (x.shape[3] // self.stride[1])
            if out_elems < self.qweight.numel():
                out = F.conv2d(x, self.qweight.to(x.dtype), None, self.stride, self.padding, self.dilation, self.groups)
                out.mul_(self.scale.to(x.dtype).view(1, -1, 1, 1))
                return out if bias is None else out.add_(bias.view(1, -1, 1, 1))
        weight = _dequantize(self.qweight, self.scale, x.dtype)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, int8"


def weight_scale(weight: torch.Tensor) -> torch.Tensor:
    """The per-output-channel scale of symmetric int8: max|w| / 127, float32 [out]."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    return flat.abs().amax(dim=1).clamp(min=1e-12) / 127.0


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (qweight int8, scale float32 [out])."""
    w = weight.detach().float()
    flat = w.reshape(w.shape[0], -1)
    scale = weight_scale(weight)
    q = torch.round(flat / scale.unsqueeze(1)).clamp_(-127, 127).to(torch.int8).reshape(w.shape)
    return q.contiguous(), scale


def _eligible(module: nn.Module, min_params: int) -> bool:
    if isinstance(module, nn.Linear):
        return module.weight.numel() >= min_params
    if isinstance(module, nn.Conv2d):
        return module.weight.numel() >= min_params and module.padding_mode == "zeros" and isinstance(module.padding, tuple)
    return False


def quantized_state(unet: nn.Module, min_params: int = MIN_PARAMS) -> dict[str, torch.Tensor]:
    """name.qweight / name.scale / name.bias tensors for every eligible layer (bias in its own dtype)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if _eligible(module, min_params):
            q, scale = quantize_weight(module.weight)
            state[f"{name}.qweight"] = q
            state[f"{name}.scale"] = scale
            if module.bias is not None:
                state[f"{name}.bias"] = module.bias.detach().clone()
    return state


def apply_state(unet: nn.Module, state: dict[str, torch.Tensor], compute_dtype: torch.dtype) -> dict[str, Any]:
    """Swap every layer named in state for its int8 version; return byte counts."""
    names = sorted({key.rsplit(".", 1)[0] for key in state})
    before = after = 0
    modules = dict(unet.named_modules())
    for name in names:
        old = modules[name]
        q = state[f"{name}.qweight"]
        scale = state[f"{name}.scale"].to(compute_dtype)
        bias = state.get(f"{name}.bias")
        if bias is not None and bias.dtype != compute_dtype:
            bias = bias.to(compute_dtype)
        before += old.weight.numel() * old.weight.element_size()
        after += q.numel() + scale.numel() * scale.element_size()
        new: nn.Module
        if isinstance(old, nn.Linear):
            new = Int8Linear(q, scale, bias)
        else:
            new = Int8Conv2d(old, q, scale, bias)
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else unet
        setattr(parent, child, new)
    return {"layers": len(names), "weight_bytes_before": before, "weight_bytes_after": after}


def quantize_module(unet: nn.Module, compute_dtype: torch.dtype, min_params: int = MIN_PARAMS) -> dict[str, Any]:
    """Quantize in memory (no cache): for experiments and tests."""
    return apply_state(unet, quantized_state(unet, min_params), compute_dtype)


def cache_path(cache_dir: Path, model_id: str) -> Path:
    return Path(cache_dir) / "int8" / f"unet-int8-v2-{model_id}.safetensors"


def write_quantized(unet: nn.Module, path: Path, *, model_id: str = "", min_params: int = MIN_PARAMS) -> int:
    """Write the int8 state of `unet` to `path`, one layer at a time; returns the layer count."""
    layers = [(name, m) for name, m in unet.named_modules() if _eligible(m, min_params)]
    entries: list[Entry] = []
    for name, module in layers:
        # The scales are written before any weight (wider dtype first), so each is computed
        # on its own; nothing outlives its own write.
        entries.append(Entry(f"{name}.scale", torch.float32, (module.weight.shape[0],),
                             lambda m=module: weight_scale(m.weight)))
        if module.bias is not None:
            entries.append(Entry(f"{name}.bias", module.bias.dtype, tuple(module.bias.shape),
                                 lambda m=module: m.bias))
        entries.append(Entry(f"{name}.qweight", torch.int8, tuple(module.weight.shape),
                             lambda m=module: quantize_weight(m.weight)[0]))
    write_streamed(path, entries, {"format": FORMAT, "model_id": model_id, "layers": str(len(layers))})
    return len(layers)


def load_or_build(unet: nn.Module, cache_file: Path, compute_dtype: torch.dtype, *, model_id: str = "") -> dict[str, Any]:
    """Apply int8 weights from cache_file (mmap), building and writing it first when missing.

    A cache file that cannot be read or does not match this UNet's layers is rebuilt. Raises
    OSError when the cache cannot be written (the caller may quantize in memory instead).
    """
    from safetensors.torch import load_file

    built = False
    state: dict[str, torch.Tensor] | None = None
    if cache_file.exists():
        try:
            state = load_file(str(cache_file))  # tensors map the file: clean, reclaimable pages
            modules = dict(unet.named_modules())
            expected = {name for name, m in modules.items() if _eligible(m, MIN_PARAMS)}
            if {key.rsplit(".", 1)[0] for key in state} != expected:
                state = None
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
            state = None
    if state is None:
        write_quantized(unet, cache_file, model_id=model_id)
        state = load_file(str(cache_file))
        built = True
    stats = apply_state(unet, state, compute_dtype)
    stats["cache"] = str(cache_file)
    stats["built"] = built
    return stats
