"""Random-weight Stable Diffusion pipelines for tests and benchmarks (nothing in inpaintd imports this).

Presets, all built by demo.model.build_model from the real diffusers/transformers classes:
- ``tiny``: the embedded demo model; builds in seconds, paints 64x64 in well under a second.
- ``tiny-sd15``: the same with a 4-channel (text-to-image) UNet, like an ordinary SD-1.5 model.
- ``tiny-sd2-inpaint``: tiny, with SD-2's structure (linear transformer projections, per-block
  head counts, GELU text encoder written in OpenCLIP's layout by single_file.write_single_file).
- ``sd15-inpaint``: the exact SD-1.5-inpainting architecture (UNet ~860M parameters, SD1.5 VAE,
  CLIP ViT-L/14 text encoder), saved in fp16 like the fp16 folder a user downloads. Its
  pictures are noise; it exists to measure speed and memory without fetching 2 GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..demo.model import SEED, build_model, tiny_configs, with_special_tokens

PRESETS = ("tiny", "tiny-sd15", "tiny-sd2-inpaint", "sd15-inpaint")


def build_random_model(preset: str, out: Path, *, seed: int = SEED, overwrite: bool = False) -> Path:
    """Build the random-weight pipeline `preset` at `out` (atomically) and return it."""
    return build_model(out, preset, preset_configs(preset), seed=seed, overwrite=overwrite)


def preset_configs(preset: str) -> dict[str, dict[str, Any]]:
    if preset in ("tiny", "tiny-sd15", "tiny-sd2-inpaint"):
        configs = tiny_configs()
        unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
        if preset == "tiny-sd15":
            unet["in_channels"] = 4
        elif preset == "tiny-sd2-inpaint":
            unet.update(attention_head_dim=(2, 4), use_linear_projection=True)
            text["hidden_act"] = "gelu"
        return configs
    if preset == "sd15-inpaint":
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
    return {"unet": unet, "vae": vae, "text_encoder": with_special_tokens(text)}
