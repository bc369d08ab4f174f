"""The embedded default model: a tiny random-weight inpainting pipeline, built on first use.

An unconfigured daemon (`model.path: null`) and `inpaintd demo` paint with it: the whole
pipeline runs, the pictures are noise. Nothing is downloaded: the UNet, VAE and CLIP text
encoder are constructed from configs with seeded random weights from the real diffusers and
transformers classes, the tokenizer is the byte-level one (modelprep/tokenizer.py), and the
folder is written with `save_pretrained(safe_serialization=True)`, then prepared like any
model. Builds are deterministic: the same configs and seed give byte-identical files.

Every folder carries ``RANDOM_WEIGHTS.txt`` and ``inpaintd_source.json`` with
``"random_weights": true`` so outputs made with it are labelled downstream. The larger
presets for tests and benchmarks (inpaintd.testing.models) are built by `build_model` too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core.config import ModelConfig
from ..engine.host import resolve_dtype
from ..modelprep.check import check_model
from ..modelprep.prepare import PrepareOptions, prepare_model
from ..modelprep.tokenizer import BOS, EOS, tokenizer_vocab, write_byte_tokenizer
from ..weights.folder import RANDOM_MARKER, SOURCE_FILE, read_manifest

EMBEDDED_NAME = "tiny-random"
SEED = 20240607


# The scheduler config published with SD 1.5 inpainting.
_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}


def build_model(out: Path, preset: str, configs: dict[str, dict[str, Any]], *, seed: int = SEED,
                overwrite: bool = False) -> Path:
    """Build a random-weight inpainting pipeline folder at `out` from component configs; return it.

    The folder appears atomically (built in a temp dir beside it, then renamed). Components
    are built and saved one at a time so an SD-1.5-sized model never holds two of them in
    memory. `sd15-inpaint` is saved in fp16 (like the published fp16 download), the rest in fp32.
    """
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.building-", dir=out.parent))
    try:
        _build_into(tmp, preset, configs, seed)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def tiny_configs() -> dict[str, dict[str, Any]]:
    """The embedded model's component configs: a 9-channel UNet with a few thousand parameters
    per block, a VAE that downsamples by 8 like SD's, a 2-layer CLIP text encoder."""
    vocab, _ = tokenizer_vocab()
    unet = dict(
        sample_size=32,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    # Four blocks so the VAE downsamples by 8 like SD's: a 512 working size is a 64 latent.
    vae = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=256,
    )
    text = dict(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    return {"unet": unet, "vae": vae, "text_encoder": with_special_tokens(text)}


def with_special_tokens(text: dict[str, Any]) -> dict[str, Any]:
    """A CLIP text config with the byte-level tokenizer's special token ids."""
    vocab, _ = tokenizer_vocab()
    return {**text, "bos_token_id": vocab[BOS], "eos_token_id": vocab[EOS], "pad_token_id": vocab[EOS],
            "layer_norm_eps": 1e-05}


def _build_into(folder: Path, preset: str, configs: dict[str, dict[str, Any]], seed: int) -> None:
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    dtype = torch.float16 if preset == "sd15-inpaint" else torch.float32
    dtype_name = "fp16" if dtype == torch.float16 else "fp32"

    def save(module: torch.nn.Module, name: str) -> None:
        if dtype != torch.float32:
            # nn.Module.to, not ModelMixin.to: the latter only warns about keep-in-fp32 lists these
            # models do not have.
            torch.nn.Module.to(module, dtype)
        module.eval()
        module.save_pretrained(folder / name, safe_serialization=True)

    # Construct directly in the saved dtype (halves the sd15 preset's peak memory).
    previous_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**configs["unet"])
        unet_params = sum(p.numel() for p in unet.parameters())
        if preset == "sd15-inpaint":
            _tame_random_init(unet)
        save(unet, "unet")
        del unet

        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(**configs["vae"])
        save(vae, "vae")
        del vae

        torch.manual_seed(seed + 2)
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
        save(text_encoder, "text_encoder")
        del text_encoder
    finally:
        torch.set_default_dtype(previous_default)

    write_byte_tokenizer(folder / "tokenizer")
    scheduler = PNDMScheduler(**_SCHEDULER_CONFIG)
    scheduler.save_pretrained(folder / "scheduler")
    _write_model_index(folder)

    source = {
        "random_weights": True,
        "preset": preset,
        "seed": seed,
        "dtype": dtype_name,
        "unet_params": unet_params,
        "generator": "inpaintd.demo.model",
    }
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / RANDOM_MARKER).write_text(
        "This model has RANDOM weights (inpaintd.demo.model, preset "
        f"{preset!r}, seed {seed}).\nIt has the right architecture but paints noise; it is for tests, "
        "demos and speed measurements only.\n",
        encoding="utf-8",
    )


def _tame_random_init(unet: Any) -> None:
    """Scale the big UNet's random output layer down so fp16 activations stay finite.

    Default initialisation of an 860M UNet makes the noise prediction large; after a few
    scheduler steps latents overflow fp16/bf16 and the VAE sees inf. Timing is unaffected,
    but NaN pictures and numpy cast warnings would confuse a benchmark reader.
    """
    import torch

    with torch.no_grad():
        unet.conv_out.weight.mul_(0.01)
        unet.conv_out.bias.zero_()


def _write_model_index(folder: Path) -> None:
    import diffusers

    index = {
        "_class_name": "StableDiffusionInpaintPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def ensure_embedded_model(cache_dir: Path, dtype: str = "fp32") -> Path:
    """The demo's default model: the tiny random model, built and prepared on first use.

    Lives in ``cache_dir/models/tiny-random``, prepared in `dtype` (bf16|fp32, the runtime
    dtype, so it loads by mmap) with a manifest. A folder prepared in another dtype, or one
    that fails its check, is rebuilt. Both steps publish by rename, so a crash leaves no
    half model behind.
    """
    cache_dir = Path(cache_dir)
    models_dir = cache_dir / "models"
    target = models_dir / EMBEDDED_NAME
    manifest = read_manifest(target)
    if manifest is not None and manifest.get("dtype") == dtype and not check_model(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    raw_parent = Path(tempfile.mkdtemp(prefix=".tiny-random-raw-", dir=models_dir))
    try:
        raw = build_model(raw_parent / "raw", "tiny", tiny_configs())
        prepare_model(raw, target, PrepareOptions(dtype=dtype, overwrite=True))
    finally:
        shutil.rmtree(raw_parent, ignore_errors=True)
    return target


def model_folder(model: ModelConfig) -> Path:
    """The folder to load: model.path, else the embedded model prepared in the runtime dtype."""
    if model.path is not None:
        return Path(model.path)
    return ensure_embedded_model(model.cache_dir, dtype=resolve_dtype(model.dtype, cpu_bf16=model.cpu_bf16))
