"""Original-layout (CompVis/A1111) single files from diffusers folders: how users get models.

The inverse of modelprep.checkpoints' conversion, for tests and benchmarks only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

from ..demo.model import SEED as _SEED
from ..modelprep import checkpoints, keymaps
from ..weights.folder import is_random_weights


def vae_to_original(vae: Mapping[str, Any], config: Mapping[str, Any], *, prefix: str = "") -> dict[str, Any]:
    """A diffusers VAE state dict in LDM names (a standalone VAE file has no prefix)."""
    out: dict[str, Any] = {}
    for key, tensor in vae.items():
        name = keymaps.vae_to_ldm(key, config)
        if ".mid.attn_1." in name and tensor.dim() == 2:
            tensor = tensor[:, :, None, None]  # LDM's attention uses 1x1 convolutions
        out[prefix + name] = tensor
    return out


def to_original(
    unet: Mapping[str, Any],
    vae: Mapping[str, Any],
    text: Mapping[str, Any],
    *,
    unet_config: Mapping[str, Any],
    vae_config: Mapping[str, Any],
    text_encoder: str = "clip",
    extra_text_layer: Mapping[str, Any] | None = None,
    ema: bool = False,
) -> dict[str, Any]:
    """One original-layout state dict from diffusers component state dicts.

    `text_encoder` "open_clip" writes SD-2's layout, where the q/k/v projections are fused and
    the model has one more (unused, SD-2 takes the penultimate layer's output) resblock:
    `extra_text_layer` supplies it (diffusers names of layer 0's tensors). `ema` also writes
    every UNet tensor under its EMA name, as training code leaves it.
    """
    import torch

    out: dict[str, Any] = {}
    for key, tensor in unet.items():
        ldm = keymaps.unet_to_ldm(key, unet_config)
        out[keymaps.UNET_PREFIX + ldm] = tensor
        if ema:
            out[keymaps.ema_name(ldm)] = tensor.clone()
    out.update(vae_to_original(vae, vae_config, prefix=keymaps.VAE_PREFIX))
    text = {keymaps.text_canonical(k): v for k, v in text.items()}
    if text_encoder == "clip":
        for key, tensor in text.items():
            out[keymaps.CLIP_PREFIX + key] = tensor
        return out
    layers = {k for k in text if k.startswith("text_model.encoder.layers.")}
    count = len({k.split(".")[3] for k in layers})
    source = dict(text)
    if extra_text_layer is not None:
        for key, tensor in extra_text_layer.items():
            key = keymaps.text_canonical(key)
            source[key.replace("text_model.encoder.layers.0.", f"text_model.encoder.layers.{count}.")] = tensor
    fused: dict[str, dict[str, Any]] = {}
    for key, tensor in source.items():
        name, part = keymaps.open_clip_layer(key)
        if part is None:
            out[keymaps.OPEN_CLIP_PREFIX + name] = tensor
        else:
            fused.setdefault(name, {})[part] = tensor
    for name, parts in fused.items():
        out[keymaps.OPEN_CLIP_PREFIX + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    hidden = text["text_model.final_layer_norm.weight"].shape[0]
    out[keymaps.OPEN_CLIP_PREFIX + "text_projection"] = torch.zeros(hidden, hidden, dtype=torch.float32)
    return out


def write_single_file(folder: Path, path: Path, *, ema: bool = False, dtype: Any = None, seed: int = _SEED) -> Path:
    """Write a diffusers folder's weights as one original-layout (CompVis/A1111) .safetensors file.

    This is how users get models: SD-2-style folders (linear transformer projections) get
    OpenCLIP's text encoder layout with the extra, unused last resblock (seeded random);
    `ema` adds the EMA copy of the UNet; `dtype` casts floating tensors (e.g. torch.float16).
    """
    import torch
    from safetensors.torch import load_file, save_file

    folder, path = Path(folder), Path(path)

    def weights(component: str) -> dict[str, Any]:
        state: dict[str, Any] = {}
        for f in sorted((folder / component).glob("*.safetensors")):
            state.update(load_file(str(f)))
        return state

    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    text = weights("text_encoder")
    open_clip = bool(unet_config.get("use_linear_projection"))
    extra = None
    if open_clip:
        generator = torch.Generator().manual_seed(seed + 3)
        extra = {
            k: torch.randn(v.shape, generator=generator, dtype=torch.float32).to(v.dtype)
            for k, v in text.items()
            if k.startswith(("text_model.encoder.layers.0.", "encoder.layers.0."))
        }
    state = to_original(
        weights("unet"),
        weights("vae"),
        text,
        unet_config=unet_config,
        vae_config=vae_config,
        text_encoder="open_clip" if open_clip else "clip",
        extra_text_layer=extra,
        ema=ema,
    )
    if dtype is not None:
        state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    state = {k: v.contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt"}
    if is_random_weights(folder):
        metadata[checkpoints.RANDOM_METADATA] = "true"
    save_file(state, str(path), metadata=metadata)
    return path
