"""A model folder into a diffusers pipeline, offline, and the id of a folder without a manifest."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from ..core.errors import ModelError
from ..weights.folder import ModelFolder

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def load_pipeline(path: Path, layout: ModelFolder, dtype: str) -> Any:
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    kwargs: dict[str, Any] = {
        "low_cpu_mem_usage": True,
        "use_safetensors": layout.weight_format == "safetensors",
        "local_files_only": True,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns).
    dtype_key = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = TORCH_DTYPES[dtype]
    if layout.variant:
        kwargs["variant"] = layout.variant
    try:
        pipeline = StableDiffusionInpaintPipeline.from_pretrained(str(path), **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # diffusers/transformers raise many kinds for a broken folder
        raise ModelError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.eval()
        module.requires_grad_(False)
    return pipeline


def raw_id(path: Path) -> str:
    """A short id for an unprepared folder: configs' contents and weight files' names and sizes."""
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".json":
            digest.update(f"{rel}\0".encode() + f.read_bytes())
        else:
            digest.update(f"{rel}\0{f.stat().st_size}\n".encode())
    return "raw-" + digest.hexdigest()[:12]
