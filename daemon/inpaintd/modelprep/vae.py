"""`prepare-model --vae`: replace the model's VAE with a drop-in one, baked into the folder's own files.

The source is a single file (original LDM layout, with or without ``first_stage_model.``, or
diffusers names) or a diffusers AutoencoderKL folder. It must be a drop-in: the same tensors
and shapes as the model's VAE. Written in the runtime dtype, so the daemon still maps its
weights without copying.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from . import checkpoints, keymaps
from .convert import component_shapes, folder_state, source_hash


def apply_vae(model: Path, source: Path, dtype: str, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Replace `model`/vae with `source`; return what the manifest records about it."""
    import torch
    from safetensors.torch import save_file

    model, source = Path(model), Path(source)
    target = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    config = json.loads((model / "vae" / "config.json").read_text(encoding="utf-8"))
    if source.is_dir() and (source / "model_index.json").is_file():
        source = source / "vae"  # a whole diffusers model: take its VAE
    if source.is_dir():
        layout_config = checkpoints.read_config(source / "config.json")
        if layout_config.get("_class_name") not in (None, "AutoencoderKL"):
            raise ModelError(f"--vae {source}: a {layout_config.get('_class_name')}, not an AutoencoderKL")
        state = folder_state(source, allow_pickle=allow_pickle)
        config = layout_config
        fmt = "diffusers-folder"
    elif source.is_file():
        state, fmt = _vae_file_state(source, config, allow_pickle=allow_pickle)
    else:
        raise ModelError(f"--vae {source} does not exist")
    expected = {k: tuple(v.shape) for k, v in checkpoints.build_meta("vae", config).state_dict().items()}
    current = component_shapes(model / "vae")
    if expected != current:
        raise ModelError(f"--vae {source}: its architecture differs from the model's VAE; it must be a drop-in replacement")
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))
        example = f"no {missing[0]}" if missing else f"an extra {sorted(set(state) - set(expected))[0]}"
        raise ModelError(f"--vae {source}: not a complete VAE for this model (e.g. {example})")
    out: dict[str, Any] = {}
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise ModelError(f"--vae {source}: {key} has shape {list(tensor.shape)}, the model's VAE {list(shape)}")
        out[key] = (tensor.to(target) if tensor.is_floating_point() else tensor).contiguous()
    folder = model / "vae"
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(out, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return {"source": str(source.resolve()), "format": fmt, "sha256": source_hash(source)}


def _vae_file_state(path: Path, config: dict[str, Any], *, allow_pickle: bool) -> tuple[dict[str, Any], str]:
    tensors = checkpoints.TensorFile(path, allow_pickle=allow_pickle)
    keys = tensors.keys()
    expected = checkpoints.build_meta("vae", config).state_dict()
    if "encoder.conv_in.weight" in tensors and any(k.startswith("encoder.down_blocks.") for k in keys):
        return {k: tensors.get(k) for k in expected if k in tensors}, "diffusers-file"
    prefix = keymaps.VAE_PREFIX if any(k.startswith(keymaps.VAE_PREFIX) for k in keys) else ""
    if prefix + "encoder.conv_in.weight" not in tensors:
        problem = checkpoints.what_is_it(keys) or "has no VAE encoder"
        raise ModelError(f"--vae {path}: not a VAE file ({problem.removeprefix('is ')})")
    state: dict[str, Any] = {}
    for key, meta in expected.items():
        name = prefix + keymaps.vae_to_ldm(key, config)
        if name in tensors:
            tensor = tensors.get(name)
            if tensor.dim() == 4 and meta.dim() == 2 and tuple(tensor.shape[2:]) == (1, 1):
                tensor = tensor[:, :, 0, 0]  # LDM's attention uses 1x1 convolutions
            state[key] = tensor
    return state, "original"
