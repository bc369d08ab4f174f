"""Random-weight Stable Diffusion inpainting pipelines built from the real diffusers classes.

Nothing is downloaded: the UNet, VAE and CLIP text encoder are constructed from configs with
seeded random weights, the CLIP tokenizer gets a self-made byte-level vocabulary, and the
whole pipeline is written with `save_pretrained(safe_serialization=True)` so that
`StableDiffusionInpaintPipeline.from_pretrained(folder)` loads it offline.

Two presets:
- ``tiny``: a 9-input-channel UNet with a few thousand parameters per block; builds in
  seconds and paints 64x64 in well under a second. The demo's embedded model and the tests'
  fixture. Builds are deterministic: the same preset gives byte-identical files.
- ``tiny-sd15``: the same with a 4-channel (text-to-image) UNet, like an ordinary SD-1.5 model.
- ``tiny-sd2-inpaint``: tiny, with SD-2's structure (linear transformer projections, per-block
  head counts, GELU text encoder written in OpenCLIP's layout by `write_single_file`).
- ``sd15-inpaint``: the exact SD-1.5-inpainting architecture (UNet ~860M parameters, SD1.5 VAE,
  CLIP ViT-L/14 text encoder), saved in fp16 like the fp16 folder a user downloads. Its
  pictures are noise; it exists to measure speed and memory without fetching 2 GB.

Every folder carries ``RANDOM_WEIGHTS.txt`` and ``inpaintd_source.json`` with
``"random_weights": true`` so outputs made with it are labelled downstream.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import models as _models  # sets the offline environment before diffusers is imported

PRESETS = ("tiny", "tiny-sd15", "tiny-sd2-inpaint", "sd15-inpaint")
SOURCE_FILE = "inpaintd_source.json"
RANDOM_MARKER = "RANDOM_WEIGHTS.txt"
EMBEDDED_NAME = "tiny-random"

_SEED = 20240607

# CLIP's special tokens; like the real vocabulary they come last.
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"

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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable unicode characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def tokenizer_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP vocabulary: every byte alone and as a word end, then BOS/EOS. No merges.

    Any text tokenizes (one token per byte), so prompts of any language work; the ids are
    always below len(vocab) == 514.
    """
    symbols = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for sym in symbols:
        vocab[sym] = len(vocab)
    for sym in symbols:
        vocab[sym + "</w>"] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, []


def write_tokenizer(folder: Path) -> None:
    """Write vocab.json, merges.txt and the tokenizer configs CLIPTokenizer loads from."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = tokenizer_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, sort_keys=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
        "add_prefix_space": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")


def _preset_configs(preset: str) -> dict[str, dict[str, Any]]:
    vocab, _ = tokenizer_vocab()
    if preset in ("tiny", "tiny-sd15", "tiny-sd2-inpaint"):
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
        if preset == "tiny-sd15":
            unet["in_channels"] = 4
        elif preset == "tiny-sd2-inpaint":
            unet.update(attention_head_dim=(2, 4), use_linear_projection=True)
            text["hidden_act"] = "gelu"
    elif preset == "sd15-inpaint":
        unet = dict(
            sample_size=64,
            in_channels=9,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
            act_fn="silu",
            center_input_sample=False,
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            mid_block_scale_factor=1,
            norm_eps=1e-05,
        )
        vae = dict(
            in_channels=3,
            out_channels=3,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=512,
            act_fn="silu",
        )
        text = dict(
            vocab_size=49408,  # the real size; our tokenizer's ids (< 514) are a subset
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=768,
            hidden_act="quick_gelu",
        )
    else:
        raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")
    text.update(
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
        layer_norm_eps=1e-05,
    )
    return {"unet": unet, "vae": vae, "text_encoder": text}


def build_random_model(preset: str, out: Path, *, seed: int = _SEED, overwrite: bool = False) -> Path:
    """Build a random-weight inpainting pipeline folder at `out` and return it.

    The folder appears atomically (built in a temp dir beside it, then renamed). Components
    are built and saved one at a time so the sd15 preset never holds two of them in memory.
    `tiny` is saved in fp32, `sd15-inpaint` in fp16 (like the published fp16 download).
    """
    import torch  # noqa: F401  (imported here so `import inpaintd.testmodels` stays cheap)

    out = Path(out)
    configs = _preset_configs(preset)
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

    write_tokenizer(folder / "tokenizer")
    scheduler = PNDMScheduler(**_SCHEDULER_CONFIG)
    scheduler.save_pretrained(folder / "scheduler")
    _write_model_index(folder)

    source = {
        "random_weights": True,
        "preset": preset,
        "seed": seed,
        "dtype": dtype_name,
        "unet_params": unet_params,
        "generator": "inpaintd.testmodels",
    }
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (folder / RANDOM_MARKER).write_text(
        "This model has RANDOM weights (inpaintd.testmodels, preset "
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
    manifest = _models.read_manifest(target)
    if manifest is not None and manifest.get("dtype") == dtype and not _models.check_model(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    raw_parent = Path(tempfile.mkdtemp(prefix=".tiny-random-raw-", dir=models_dir))
    try:
        raw = build_random_model("tiny", raw_parent / "raw")
        _models.prepare_model(raw, target, dtype=dtype, overwrite=True)
    finally:
        shutil.rmtree(raw_parent, ignore_errors=True)
    return target


def write_single_file(folder: Path, path: Path, *, ema: bool = False, dtype: Any = None, seed: int = _SEED) -> Path:
    """Write a diffusers folder's weights as one original-layout (CompVis/A1111) .safetensors file.

    This is how users get models: SD-2-style folders (linear transformer projections) get
    OpenCLIP's text encoder layout with the extra, unused last resblock (seeded random);
    `ema` adds the EMA copy of the UNet; `dtype` casts floating tensors (e.g. torch.float16).
    """
    import torch
    from safetensors.torch import load_file, save_file

    from . import checkpoints

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
    state = checkpoints.to_original(
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
    if _models.is_random_weights(folder):
        metadata[checkpoints.RANDOM_METADATA] = "true"
    save_file(state, str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------- random LoRAs

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

    from . import lora

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


def build_random_tiny_vae(out: Path, *, seed: int = _SEED) -> Path:
    """A random-weight AutoencoderTiny with TAESD's default architecture (for --draft-decoder)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    out = Path(out)
    AutoencoderTiny().save_pretrained(str(out), safe_serialization=True)
    (out / RANDOM_MARKER).write_text("random weights: for tests and benchmarks only\n", encoding="utf-8")
    return out
