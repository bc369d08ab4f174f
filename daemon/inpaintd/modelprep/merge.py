"""The "add difference" merge that turns an ordinary SD model into a 9-channel inpainting model.

    merged = inpainting + (custom - base)      for every tensor of UNet, text encoder and VAE

(A1111's "Add difference" with A = the inpainting model, B = the custom model, C = the base
the custom model was fine-tuned from, multiplier 1). The UNet's first convolution has 9 input
channels in the inpainting model and 4 in the others: its first 4 channels get the difference,
the 5 extra ones (mask, masked-image latent) stay the inpainting model's. What the custom
fine-tune learned is carried over as a weight delta onto a model that was trained to look at
the mask. Computed in fp32 one component at a time; the caller converts to the runtime dtype.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from ..weights.folder import PICKLE_SUFFIXES, SOURCE_FILE, ModelFolder, inspect_model
from .convert import read_state
from .keymaps import text_canonical

COMPONENT_FILES = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
_CONV_IN = "conv_in.weight"


@dataclass(frozen=True)
class MergeSources:
    """The three diffusers folders of an add-difference merge."""

    custom: Path  # the 4-channel fine-tune the user wants to inpaint with
    inpainting: Path  # the 9-channel inpainting model of the same family (e.g. SD-1.5-inpainting)
    base: Path  # the 4-channel model `custom` was fine-tuned from (e.g. SD-1.5)


def add_difference(sources: MergeSources, out: Path, *, allow_pickle: bool = False) -> None:
    """Write the merged 9-channel diffusers folder `out` (must not exist) in fp32."""
    layouts = {
        role: inspect_model(getattr(sources, role), allow_pickle=allow_pickle)
        for role in ("custom", "inpainting", "base")
    }
    wanted = {"custom": 4, "inpainting": 9, "base": 4}
    for role, channels in wanted.items():
        got = layouts[role].unet_in_channels
        if got != channels:
            what = "an inpainting model" if got == 9 else "a text-to-image model"
            raise ModelError(
                f"add-difference merge: the {role} model {getattr(sources, role)} is {what} ({got} UNet input "
                f"channels); it needs {channels} (custom and base: 4-channel, inpainting base: 9-channel)"
            )
    out = Path(out)
    out.mkdir(parents=True)
    inpainting = layouts["inpainting"].path
    for name in ("model_index.json",):
        shutil.copy2(inpainting / name, out / name)
    for folder in ("scheduler", "tokenizer"):
        pickles = shutil.ignore_patterns(*[f"*{s}" for s in PICKLE_SUFFIXES])
        shutil.copytree(inpainting / folder, out / folder, ignore=pickles)
    for component, filename in COMPONENT_FILES.items():
        state = {role: _load(layouts[role], component) for role in ("custom", "inpainting", "base")}
        if component == "text_encoder":
            for role in ("custom", "base"):
                state[role] = _align(state[role], state["inpainting"])
        merged = merge_state(state["custom"], state["inpainting"], state["base"], component)
        del state
        target = out / component
        target.mkdir()
        shutil.copy2(inpainting / component / "config.json", target / "config.json")
        from safetensors.torch import save_file

        save_file(merged, str(target / filename), metadata={"format": "pt"})
        del merged
    random = [role for role, layout in layouts.items() if layout.random_weights]
    if random:
        (out / SOURCE_FILE).write_text(
            json.dumps({"random_weights": True, "merged_from_random": random}, indent=2) + "\n", encoding="utf-8"
        )


def merge_state(custom: dict[str, Any], inpainting: dict[str, Any], base: dict[str, Any], component: str) -> dict[str, Any]:
    """inpainting + (custom - base) per tensor, in fp32; the UNet's extra input channels from inpainting."""
    import torch

    if not (custom.keys() == inpainting.keys() == base.keys()):
        differ = sorted((custom.keys() | base.keys()) ^ inpainting.keys()) or sorted(custom.keys() ^ base.keys())
        raise ModelError(
            f"add-difference merge: the {component}s have different tensors (e.g. {differ[0]}); "
            "the three models must share one architecture"
        )
    merged: dict[str, Any] = {}
    for key, target in inpainting.items():
        c, b = custom[key], base[key]
        if c.shape != b.shape:
            raise ModelError(
                f"add-difference merge: {component} {key} is {list(c.shape)} in custom, {list(b.shape)} in base; "
                "the three models must share one architecture"
            )
        if not target.is_floating_point():
            merged[key] = target.contiguous()
            continue
        delta = c.to(torch.float32) - b.to(torch.float32)
        result = target.to(torch.float32).clone()
        if component == "unet" and key == _CONV_IN and result.shape != delta.shape:
            if result.shape[0] != delta.shape[0] or result.shape[2:] != delta.shape[2:] or result.shape[1] < delta.shape[1]:
                raise ModelError(
                    f"add-difference merge: unet {key} is {list(result.shape)} in inpainting, "
                    f"{list(delta.shape)} in custom"
                )
            result[:, : delta.shape[1]] += delta
        elif result.shape != delta.shape:
            raise ModelError(
                f"add-difference merge: {component} {key} is {list(result.shape)} in the inpainting model, "
                f"{list(delta.shape)} in the others; the three models must share one architecture"
            )
        else:
            result += delta
        merged[key] = result.contiguous()
    return merged


def _load(layout: ModelFolder, component: str) -> dict[str, Any]:
    return read_state(layout.path / component, layout.weight_format, layout.variant)


def _align(state: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """`state` keyed like `reference`: transformers 4 and 5 name CLIP's tensors with and without "text_model."."""
    names = {text_canonical(k): k for k in reference}
    return {names.get(text_canonical(k), k): v for k, v in state.items()}
