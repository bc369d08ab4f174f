"""--make-inpainting: the add-difference merge on random tiny models of the SD-1.5 structure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd import cli
from inpaintd.core.errors import ModelError
from inpaintd.modelprep.check import check_model
from inpaintd.modelprep.merge import merge_state
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.testing.models import build_random_model
from inpaintd.testing.single_file import write_single_file
from inpaintd.weights.folder import WEIGHT_COMPONENTS, read_manifest
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def base_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same 4-channel architecture as tiny_sd15_raw (the "custom" model), other random weights.
    return build_random_model("tiny-sd15", tmp_path_factory.mktemp("base") / "raw", seed=99)


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def test_the_merge_is_inpainting_plus_custom_minus_base(
    tiny_sd15_raw: Path, tiny_model_raw: Path, base_raw: Path, tmp_path: Path
) -> None:
    manifest = prepare_model(
        tiny_sd15_raw, tmp_path / "out", PrepareOptions(dtype="fp32", make_inpainting=(tiny_model_raw, base_raw))
    )
    assert manifest["architecture"]["unet_in_channels"] == 9
    assert manifest["origin"]["format"] == "add-difference" and manifest["random_weights"] is True
    assert check_model(tmp_path / "out") == []
    for component in WEIGHT_COMPONENTS:
        custom, inpainting, base = (weights(f, component) for f in (tiny_sd15_raw, tiny_model_raw, base_raw))
        merged = weights(tmp_path / "out", component)
        assert merged.keys() == inpainting.keys()
        for key, tensor in merged.items():
            expected = inpainting[key].clone()
            if component == "unet" and key == "conv_in.weight":
                expected[:, :4] += custom[key] - base[key]
                assert torch.equal(tensor[:, 4:], inpainting[key][:, 4:])  # mask + masked-image channels
            else:
                expected += custom[key] - base[key]
            assert torch.equal(tensor, expected), f"{component}/{key}"


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(4,), (3, 5), (2, 4, 3, 3)]),
    seed=st.integers(0, 2**31 - 1),
)
def test_merging_a_model_with_itself_as_base_gives_the_inpainting_model(shape: tuple[int, ...], seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    custom = {"w": torch.randn(shape, generator=generator)}
    inpainting = {"w": torch.randn(shape, generator=generator)}
    merged = merge_state(custom, inpainting, dict(custom), "vae")
    assert torch.equal(merged["w"], inpainting["w"])  # custom - custom is exactly 0


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), extra=st.integers(1, 5))
def test_conv_in_keeps_the_inpainting_models_extra_channels(seed: int, extra: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    custom = {"conv_in.weight": torch.randn(8, 4, 3, 3, generator=generator)}
    base = {"conv_in.weight": torch.randn(8, 4, 3, 3, generator=generator)}
    inpainting = {"conv_in.weight": torch.randn(8, 4 + extra, 3, 3, generator=generator)}
    merged = merge_state(custom, inpainting, base, "unet")["conv_in.weight"]
    assert torch.equal(merged[:, 4:], inpainting["conv_in.weight"][:, 4:])
    assert torch.equal(merged[:, :4], inpainting["conv_in.weight"][:, :4] + (custom["conv_in.weight"] - base["conv_in.weight"]))


def test_a_single_file_custom_model_merges_like_its_folder(
    tiny_sd15_raw: Path, tiny_model_raw: Path, base_raw: Path, tmp_path: Path
) -> None:
    f = write_single_file(tiny_sd15_raw, tmp_path / "custom.safetensors", dtype=torch.float16)
    prepare_model(
        f, tmp_path / "from-file", PrepareOptions(dtype="fp32", config_dir=tiny_sd15_raw, make_inpainting=(tiny_model_raw, base_raw))
    )
    half = tmp_path / "half"
    prepare_model(tiny_sd15_raw, half, PrepareOptions(dtype="fp32"))
    # The file holds fp16 values: merging it equals merging the folder rounded to fp16.
    for component in WEIGHT_COMPONENTS:
        custom = {k: v.half().float() for k, v in weights(tiny_sd15_raw, component).items()}
        expected = merge_state(custom, weights(tiny_model_raw, component), weights(base_raw, component), component)
        merged = weights(tmp_path / "from-file", component)
        assert expected.keys() == merged.keys()
        assert all(torch.equal(expected[k], merged[k]) for k in expected), component


def test_the_merged_model_paints(tiny_sd15_raw: Path, tiny_model_raw: Path, base_raw: Path, tmp_path: Path) -> None:
    from inpaintd.core.config import ModelConfig
    from inpaintd.core.jobs import InpaintParams
    from inpaintd.engine.engine import Engine
    from PIL import Image

    prepare_model(tiny_sd15_raw, tmp_path / "out", PrepareOptions(dtype="fp32", make_inpainting=(tiny_model_raw, base_raw)))
    engine = Engine.load(ModelConfig(path=tmp_path / "out", dtype="fp32", threads=1, cache_dir=tmp_path))
    assert engine.info.unet_in_channels == 9 and engine.info.random_weights is True
    image = Image.fromarray(np.full((64, 64, 3), 90, dtype=np.uint8))
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), 16))
    params = InpaintParams(prompt="x", negative_prompt="", scheduler="ddim", steps=2, guidance=7.5, strength=1.0, seed=1)
    assert engine.inpaint(image, mask, params).image.size == (64, 64)


@pytest.mark.parametrize(
    "roles,message",
    [
        (("inpainting", "inpainting", "base"), "custom model .* is an inpainting model"),
        (("custom", "custom", "base"), "inpainting model .* is a text-to-image model"),
        (("custom", "inpainting", "inpainting"), "base model .* is an inpainting model"),
        (("custom", "inpainting", "sd2"), "different tensors|share one architecture"),
    ],
)
def test_wrong_roles_are_refused_and_leave_nothing(
    roles, message: str, tiny_sd15_raw: Path, tiny_model_raw: Path, base_raw: Path, tiny_sd2_raw: Path, tmp_path: Path
) -> None:
    folders = {"custom": tiny_sd15_raw, "inpainting": tiny_model_raw, "base": base_raw, "sd2": tiny_sd2_raw}
    if roles[2] == "sd2":
        # A 4-channel model of another structure as the base.
        sd2_t2i = tmp_path / "sd2-t2i"
        import json
        import shutil

        shutil.copytree(tiny_sd2_raw, sd2_t2i)
        config = json.loads((sd2_t2i / "unet" / "config.json").read_text())
        config["in_channels"] = 4
        (sd2_t2i / "unet" / "config.json").write_text(json.dumps(config))
        state = load_file(str(sd2_t2i / "unet" / "diffusion_pytorch_model.safetensors"))
        state["conv_in.weight"] = state["conv_in.weight"][:, :4].contiguous()
        from safetensors.torch import save_file

        save_file(state, str(sd2_t2i / "unet" / "diffusion_pytorch_model.safetensors"))
        folders["sd2"] = sd2_t2i
    custom, inpainting, base = (folders[r] for r in roles)
    with pytest.raises(ModelError, match=message):
        prepare_model(custom, tmp_path / "out", PrepareOptions(make_inpainting=(inpainting, base)))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_the_cli_flags(tiny_sd15_raw: Path, tiny_model_raw: Path, base_raw: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["prepare-model", str(tiny_sd15_raw), str(out), "--dtype", "fp32", "--make-inpainting"]
    assert cli.main(argv + ["--inpainting-base", str(tiny_model_raw)]) == cli.EXIT_USAGE
    assert "needs --inpainting-base and --base" in capsys.readouterr().err
    assert cli.main(["prepare-model", str(tiny_sd15_raw), str(out), "--base", str(base_raw)]) == cli.EXIT_USAGE
    assert cli.main(argv + ["--inpainting-base", str(tiny_model_raw), "--base", str(base_raw)]) == 0
    assert read_manifest(out)["architecture"]["unet_in_channels"] == 9


def test_the_merge_at_the_real_sd15_shapes_gives_the_inpainting_models_tensors() -> None:
    # Meta tensors: SD-1.5 (4-channel) and SD-1.5-inpainting's exact shapes, no memory.
    import json

    from inpaintd.modelprep.checkpoints import CONFIGS_DIR, build_meta
    from inpaintd.modelprep.merge import merge_state
    from inpaintd.weights.folder import WEIGHT_COMPONENTS

    for component in WEIGHT_COMPONENTS:
        configs = {
            kind: json.loads((CONFIGS_DIR / kind / component / "config.json").read_text())
            for kind in ("sd15", "sd15-inpaint")
        }
        custom = build_meta(component, configs["sd15"]).state_dict()
        inpainting = build_meta(component, configs["sd15-inpaint"]).state_dict()
        merged = merge_state(custom, inpainting, dict(custom), component)
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in inpainting.items()}
