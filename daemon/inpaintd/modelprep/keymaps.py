"""Tensor names: diffusers' layout <-> the original CompVis/A1111 ("LDM") layout of SD-1/SD-2.

Pure string functions, no torch. A name map is derived from the model's config (number of
blocks, layers per block, which blocks have attention), so the same rules cover the real
SD-1.5/SD-2 shapes and the tiny test models. diffusers' own conversion
(loaders/single_file_utils.py) and its scripts/convert_diffusers_to_original_stable_diffusion.py
hard-code the SD shapes; tests check that these rules give exactly diffusers' names at the
real shapes.

Where a tensor also changes *shape* between the layouts (VAE attention: 1x1 convolutions in
LDM, linear layers in diffusers; OpenCLIP's fused q/k/v projection) checkpoints.py does it.
"""

from __future__ import annotations

from typing import Any, Mapping

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."

_RESNET_UNET = (
    ("norm1", "in_layers.0"),
    ("conv1", "in_layers.2"),
    ("norm2", "out_layers.0"),
    ("conv2", "out_layers.3"),
    ("time_emb_proj", "emb_layers.1"),
    ("conv_shortcut", "skip_connection"),
)
_VAE_ATTENTION = (
    ("group_norm", "norm"),
    ("to_q", "q"),
    ("to_k", "k"),
    ("to_v", "v"),
    ("to_out.0", "proj_out"),
)


def _split(key: str, depth: int) -> tuple[list[str], str]:
    parts = key.split(".")
    return parts[:depth], ".".join(parts[depth:])


def _rename(rest: str, table: tuple[tuple[str, str], ...]) -> str:
    for new, old in table:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new) :]
    return rest


def unet_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without the ``model.diffusion_model.`` prefix) of a diffusers UNet tensor."""
    per = int(config["layers_per_block"]) + 1  # LDM input blocks per level: the layers + a downsampler
    up_types = list(config["up_block_types"])
    head, rest = _split(key, 1)
    top = head[0]
    simple = {
        "time_embedding": {"linear_1": "time_embed.0", "linear_2": "time_embed.2"},
    }
    if top in simple:
        sub, tail = rest.split(".", 1)
        return f"{simple[top][sub]}.{tail}"
    if top == "conv_in":
        return f"input_blocks.0.0.{rest}"
    if top == "conv_norm_out":
        return f"out.0.{rest}"
    if top == "conv_out":
        return f"out.2.{rest}"
    if top == "mid_block":
        kind, index, tail = rest.split(".", 2)
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * int(index)}.{_rename(tail, _RESNET_UNET)}"
    if top in ("down_blocks", "up_blocks"):
        block, kind, index, tail = rest.split(".", 3)
        i, j = int(block), int(index)
        if top == "down_blocks":
            if kind == "downsamplers":  # downsamplers.0.conv.weight -> input_blocks.N.0.op.weight
                return f"input_blocks.{(i + 1) * per}.0.op.{tail.split('.', 1)[1]}"
            number = 1 + i * per + j
            if kind == "attentions":
                return f"input_blocks.{number}.1.{tail}"
            return f"input_blocks.{number}.0.{_rename(tail, _RESNET_UNET)}"
        if kind == "upsamplers":  # after the resnet (.0) and, in a cross-attention block, the attention (.1)
            position = 2 if "CrossAttn" in up_types[i] else 1
            return f"output_blocks.{i * per + per - 1}.{position}.{tail}"
        number = i * per + j
        if kind == "attentions":
            return f"output_blocks.{number}.1.{tail}"
        return f"output_blocks.{number}.0.{_rename(tail, _RESNET_UNET)}"
    raise KeyError(f"no LDM name for UNet tensor {key}")


def vae_to_ldm(key: str, config: Mapping[str, Any]) -> str:
    """The LDM name (without the ``first_stage_model.`` prefix) of a diffusers VAE tensor."""
    blocks = len(config["block_out_channels"])
    head, rest = _split(key, 1)
    top = head[0]
    if top in ("quant_conv", "post_quant_conv"):
        return key
    side, rest = top, rest  # encoder | decoder
    part, _, tail = rest.partition(".")
    if part == "conv_norm_out":
        return f"{side}.norm_out.{tail}"
    if part in ("conv_in", "conv_out"):
        return f"{side}.{rest}"
    if part == "mid_block":
        kind, index, tail = tail.split(".", 2)
        if kind == "attentions":
            return f"{side}.mid.attn_1.{_rename(tail, _VAE_ATTENTION)}"
        return f"{side}.mid.block_{int(index) + 1}.{_rename(tail, (('conv_shortcut', 'nin_shortcut'),))}"
    if part in ("down_blocks", "up_blocks"):
        block, kind, index, tail = tail.split(".", 3)
        level = int(block) if part == "down_blocks" else blocks - 1 - int(block)
        stage = "down" if part == "down_blocks" else "up"
        if kind in ("downsamplers", "upsamplers"):
            return f"{side}.{stage}.{level}.{stage}sample.{tail}"
        return f"{side}.{stage}.{level}.block.{index}.{_rename(tail, (('conv_shortcut', 'nin_shortcut'),))}"
    raise KeyError(f"no LDM name for VAE tensor {key}")


def ema_name(ldm_unet_key: str) -> str:
    """Where LDM training code keeps the EMA copy of a UNet tensor: dots dropped after "model."."""
    return "model_ema." + ("diffusion_model." + ldm_unet_key).replace(".", "")


def text_canonical(key: str) -> str:
    """A CLIPTextModel tensor name with its ``text_model.`` level, which transformers 5 leaves out."""
    return key if key.startswith("text_model.") else "text_model." + key


def open_clip_layer(key: str) -> tuple[str, str | None]:
    """(OpenCLIP name, q|k|v part or None) of a diffusers CLIPTextModel tensor (SD-2's text encoder).

    OpenCLIP fuses q, k and v into one ``in_proj`` tensor; the part says which third it is.
    """
    fixed = {
        "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
        "text_model.embeddings.position_embedding.weight": "positional_embedding",
        "text_model.final_layer_norm.weight": "ln_final.weight",
        "text_model.final_layer_norm.bias": "ln_final.bias",
    }
    key = text_canonical(key)
    if key in fixed:
        return fixed[key], None
    prefix = "text_model.encoder.layers."
    if not key.startswith(prefix):
        raise KeyError(f"no OpenCLIP name for text encoder tensor {key}")
    index, tail = key[len(prefix) :].split(".", 1)
    base = f"transformer.resblocks.{index}."
    for part in ("q", "k", "v"):
        for kind in ("weight", "bias"):
            if tail == f"self_attn.{part}_proj.{kind}":
                return f"{base}attn.in_proj_{kind}", part
    table = (
        ("layer_norm1", "ln_1"),
        ("layer_norm2", "ln_2"),
        ("self_attn.out_proj", "attn.out_proj"),
        ("mlp.fc1", "mlp.c_fc"),
        ("mlp.fc2", "mlp.c_proj"),
    )
    return base + _rename(tail, table), None
