"""`prepare-model --draft-decoder`: an AutoencoderTiny (TAESD-class) beside the VAE, for `decoder: draft`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import ModelError
from ..weights.folder import DRAFT_DECODER
from .checkpoints import read_config
from .convert import folder_state, source_hash


def apply_draft_decoder(model: Path, source: Path, dtype: str) -> dict[str, Any]:
    """Add `source` (a diffusers AutoencoderTiny folder, e.g. TAESD for SD-1.x) as `model`/vae_tiny.

    Not listed in model_index.json, so diffusers never loads it as part of the pipeline; the
    engine loads it only for jobs that ask for ``decoder: draft``.
    """
    import torch
    from safetensors.torch import save_file

    source = Path(source)
    if not (source / "config.json").is_file():
        raise ModelError(f"--draft-decoder {source}: expected a diffusers AutoencoderTiny folder (config.json + safetensors)")
    config = read_config(source / "config.json")
    if config.get("_class_name") != "AutoencoderTiny":
        raise ModelError(f"--draft-decoder {source}: a {config.get('_class_name')}, not an AutoencoderTiny")
    vae_config = json.loads((Path(model) / "vae" / "config.json").read_text(encoding="utf-8"))
    if int(config.get("latent_channels", 4)) != int(vae_config.get("latent_channels", 4)):
        raise ModelError(f"--draft-decoder {source}: {config.get('latent_channels')} latent channels, the model's VAE "
                         f"{vae_config.get('latent_channels', 4)}")
    state = folder_state(source, allow_pickle=False)
    expected = {k: tuple(v.shape) for k, v in _tiny_meta(config).state_dict().items()}
    if set(state) != set(expected) or any(tuple(state[k].shape) != s for k, s in expected.items()):
        raise ModelError(f"--draft-decoder {source}: its weights do not match its config.json")
    target = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype]
    folder = Path(model) / DRAFT_DECODER
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file({k: (v.to(target) if v.is_floating_point() else v).contiguous() for k, v in state.items()},
              str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    return {"source": str(source.resolve()), "format": "diffusers-folder", "sha256": source_hash(source),
            "quality": "draft: TAESD-class decoder, lower fidelity than the model's VAE"}


def _tiny_meta(config: dict[str, Any]) -> Any:
    import torch
    from diffusers import AutoencoderTiny

    with torch.device("meta"):
        return AutoencoderTiny.from_config(config)
