"""Random LoRA files in the layouts users download (kohya/A1111, diffusers/PEFT), for tests and benchmarks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..demo.model import SEED as _SEED
from ..modelprep import lora

# The layers the published SD-1.5 LCM-LoRA (latent-consistency/lcm-lora-sdv1-5) adapts, at rank
# 64: diffusers' LCM-LoRA distillation script's default target modules
# (examples/consistency_distillation/train_lcm_distill_lora_sd_wds.py).
LCM_LORA_UNET_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
    "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj",
)


LCM_LORA_RANK = 64


TEXT_ENCODER_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def build_random_lora(
    model: Path,
    out: Path,
    *,
    rank: int = LCM_LORA_RANK,
    alpha: float | None = 8.0,
    layout: str = "kohya",
    unet_targets: tuple[str, ...] = LCM_LORA_UNET_TARGETS,
    text_encoder_targets: tuple[str, ...] = (),
    strength: float = 1.0,
    seed: int = _SEED,
    dtype: str = "fp16",
) -> Path:
    """A random-weight LoRA for the diffusers folder `model`, in `layout` kohya or peft.

    kohya: ``lora_unet_...lora_down/lora_up/.alpha`` (the layout of the published LCM-LoRA file);
    peft: ``unet....lora_A/lora_B`` with alpha in diffusers' ``lora_adapter_metadata``. The rank
    is capped by each layer's sides. `strength` scales the update's size relative to the weights
    (tests need a LoRA that visibly changes the output; benchmarks only need the shapes).
    """
    import torch
    from safetensors.torch import save_file

    shapes = lora.model_shapes(Path(model))
    generator = torch.Generator().manual_seed(seed)
    st_dtype = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    tensors: dict[str, Any] = {}
    metadata = {"format": "pt"}
    config: dict[str, Any] = {}
    for component, targets in (("unet", unet_targets), ("text_encoder", text_encoder_targets)):
        modules = sorted(
            n[: -len(".weight")] for n, shape in shapes.get(component, {}).items()
            if n.endswith(".weight") and len(shape) in (2, 4)
            and any(n[: -len(".weight")] == t or n[: -len(".weight")].endswith("." + t) for t in targets)
        )
        for module in modules:
            shape = shapes[component][module + ".weight"]
            fan_in = 1
            for d in shape[1:]:
                fan_in *= d
            r = max(1, min(rank, shape[0], fan_in))
            down = torch.randn((r, *shape[1:]), generator=generator) / fan_in**0.5
            up_shape = (shape[0], r, 1, 1) if len(shape) == 4 else (shape[0], r)
            up = torch.randn(up_shape, generator=generator) * (strength / r**0.5)
            if layout == "kohya":
                stem = ("lora_unet_" if component == "unet" else "lora_te_") + module.replace(".", "_")
                tensors[f"{stem}.lora_down.weight"] = down.to(st_dtype)
                tensors[f"{stem}.lora_up.weight"] = up.to(st_dtype)
                if alpha is not None:
                    tensors[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=st_dtype)
            elif layout == "peft":
                tensors[f"{component}.{module}.lora_A.weight"] = down.to(st_dtype)
                tensors[f"{component}.{module}.lora_B.weight"] = up.to(st_dtype)
                config.setdefault(component, set()).add(module)
            else:
                raise ValueError(f"layout must be kohya or peft, got {layout!r}")
    if layout == "peft" and alpha is not None:
        packed: dict[str, Any] = {}
        for component, modules in config.items():
            packed.update({f"{component}.r": rank, f"{component}.lora_alpha": alpha,
                           f"{component}.target_modules": sorted(modules), f"{component}.lora_dropout": 0.0,
                           f"{component}.init_lora_weights": True})
        metadata["lora_adapter_metadata"] = json.dumps(packed, sort_keys=True)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, out)
    return out
