"""keymaps: the name rules, for any block layout, agree with diffusers' own converter."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.modelprep.checkpoints import build_meta
from inpaintd.modelprep.keymaps import UNET_PREFIX, VAE_PREFIX, unet_to_ldm
from inpaintd.testing.single_file import vae_to_original


@st.composite
def unet_configs(draw) -> dict:
    blocks = draw(st.integers(1, 4))
    attention = draw(st.lists(st.booleans(), min_size=blocks, max_size=blocks))
    widths = [16 * draw(st.integers(1, 3)) for _ in range(blocks)]
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    return dict(
        sample_size=16,
        in_channels=draw(st.sampled_from([4, 9])),
        out_channels=4,
        block_out_channels=widths,
        layers_per_block=draw(st.integers(1, 3)),
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=8,
        use_linear_projection=draw(st.booleans()),
    )


@settings(max_examples=30, deadline=None)
@given(config=unet_configs())
def test_unet_names_for_any_layout_are_the_ones_diffusers_converts(config: dict) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = build_meta("unet", config).state_dict()
    original = {UNET_PREFIX + unet_to_ldm(k, config): v for k, v in state.items()}
    assert len(original) == len(state)  # the map is one-to-one
    converted = convert_ldm_unet_checkpoint(original, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}


@settings(max_examples=20, deadline=None)
@given(blocks=st.integers(1, 4), layers=st.integers(1, 3))
def test_vae_names_for_any_layout_are_the_ones_diffusers_converts(blocks: int, layers: int) -> None:
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(
        in_channels=3,
        out_channels=3,
        block_out_channels=[8] * blocks,
        down_block_types=["DownEncoderBlock2D"] * blocks,
        up_block_types=["UpDecoderBlock2D"] * blocks,
        layers_per_block=layers,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
    )
    state = build_meta("vae", config).state_dict()
    original = vae_to_original(state, config, prefix=VAE_PREFIX)
    assert len(original) == len(state)
    converted = convert_ldm_vae_checkpoint(original, config)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}
