"""Single-file checkpoints: files built the way users get them, converted back, refused when foreign.

The files are written from random tiny diffusers models in the original (CompVis/A1111)
layout (write_single_file), then `prepare-model` turns them back into folders:
the tensors must come back bit for bit, paint the same pixels, and match what diffusers'
own `from_single_file` makes of the same file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inpaintd import cli
from inpaintd.core.errors import ModelError
from inpaintd.modelprep.check import check_model
from inpaintd.modelprep.checkpoints import (
    CONFIGS_DIR,
    KINDS,
    build_meta,
    inspect_checkpoint,
)
from inpaintd.modelprep.keymaps import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
    text_canonical,
)
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.modelprep.tokenizer import find_cached_tokenizer
from inpaintd.testing import models as testmodels
from inpaintd.testing.single_file import to_original, write_single_file
from inpaintd.weights.folder import WEIGHT_COMPONENTS, architecture_name, read_manifest
from safetensors.torch import load_file, save_file

PRESETS = ("tiny", "tiny-sd15", "tiny-sd2-inpaint")
KIND = {"tiny": "sd15-inpaint", "tiny-sd15": "sd15", "tiny-sd2-inpaint": "sd2-inpaint"}


@pytest.fixture(scope="module")
def raws(tiny_model_raw: Path, tiny_sd15_raw: Path, tiny_sd2_raw: Path) -> dict[str, Path]:
    return {"tiny": tiny_model_raw, "tiny-sd15": tiny_sd15_raw, "tiny-sd2-inpaint": tiny_sd2_raw}


@pytest.fixture(scope="module")
def single_files(raws: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("single-files")
    return {name: write_single_file(raw, root / f"{name}.safetensors") for name, raw in raws.items()}


def weights(folder: Path, component: str) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for f in sorted((folder / component).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def assert_same_weights(a: Path, b: Path, cast=None) -> None:
    for component in WEIGHT_COMPONENTS:
        left, right = weights(a, component), weights(b, component)
        assert left.keys() == right.keys(), component
        for key, tensor in left.items():
            expected = tensor if cast is None else cast(tensor)
            assert torch.equal(expected, right[key]), f"{component}/{key}"


def assert_nothing_left(parent: Path, name: str = "out") -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.mark.parametrize("preset", PRESETS)
def test_a_single_file_converts_back_to_the_same_tensors(
    preset: str, raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path
) -> None:
    info = inspect_checkpoint(single_files[preset])
    assert info.kind == KIND[preset] and info.has_vae and not info.has_ema
    assert info.text_encoder == ("open_clip" if preset == "tiny-sd2-inpaint" else "clip")
    manifest = prepare_model(single_files[preset], tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws[preset]))
    assert_same_weights(raws[preset], tmp_path / "out")
    assert check_model(tmp_path / "out") == []
    assert manifest["origin"]["format"] == "single-file" and manifest["origin"]["kind"] == KIND[preset]
    assert manifest["architecture"]["unet_in_channels"] == (4 if preset == "tiny-sd15" else 9)
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("preset", PRESETS)
def test_our_conversion_equals_diffusers_from_single_file(
    preset: str, raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    reference = StableDiffusionInpaintPipeline.from_single_file(
        str(single_files[preset]),
        config=str(raws[preset]),
        local_files_only=True,
        safety_checker=None,
        requires_safety_checker=False,
    )
    prepare_model(single_files[preset], tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws[preset]))
    for component in WEIGHT_COMPONENTS:
        ref = getattr(reference, component).state_dict()
        ours = weights(tmp_path / "out", component)
        assert ref.keys() == ours.keys(), component
        for key in ref:
            assert torch.equal(ref[key], ours[key]), f"{component}/{key}"


def test_the_same_job_paints_the_same_pixels_from_the_folder_and_from_its_single_file(
    tiny_model: Path, single_files: dict[str, Path], raws: dict[str, Path], tmp_path: Path
) -> None:
    from inpaintd.core.config import ModelConfig
    from inpaintd.core.jobs import InpaintParams
    from inpaintd.engine.engine import Engine
    from PIL import Image

    prepare_model(single_files["tiny"], tmp_path / "from-file", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), 16), "L")
    params = InpaintParams(prompt="a door", negative_prompt="", scheduler="ddim", steps=3, guidance=7.5, strength=1.0, seed=5)
    outputs = []
    for folder in (tiny_model, tmp_path / "from-file"):
        engine = Engine.load(ModelConfig(path=folder, dtype="fp32", threads=1, cache_dir=tmp_path))
        outputs.append(np.asarray(engine.inpaint(image, mask, params).image))
    assert np.array_equal(outputs[0], outputs[1])


def test_a_model_index_without_a_diffusers_version_loads(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path
) -> None:
    # The configs shipped for single files carry no "_diffusers_version"; diffusers'
    # from_pretrained raises KeyError without it (found by scripts/verify_real_shapes.py).
    from inpaintd.core.config import ModelConfig
    from inpaintd.engine.engine import Engine

    assert all(
        "_diffusers_version" not in json.loads((CONFIGS_DIR / kind / "model_index.json").read_text())
        for kind in KINDS
    )
    configs = tmp_path / "configs"
    shutil.copytree(raws["tiny"], configs)
    index = json.loads((configs / "model_index.json").read_text())
    del index["_diffusers_version"]
    (configs / "model_index.json").write_text(json.dumps(index))
    prepare_model(single_files["tiny"], tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=configs))
    assert "_diffusers_version" in json.loads((tmp_path / "out" / "model_index.json").read_text())
    engine = Engine.load(ModelConfig(path=tmp_path / "out", dtype="fp32", threads=1, cache_dir=tmp_path))
    assert engine.info.unet_in_channels == 9


def test_an_fp16_file_converts_to_its_values_in_the_runtime_dtype(
    raws: dict[str, Path], tmp_path: Path
) -> None:
    f = write_single_file(raws["tiny"], tmp_path / "half.safetensors", dtype=torch.float16)
    assert inspect_checkpoint(f).files_dtype == "fp16"
    prepare_model(f, tmp_path / "out", PrepareOptions(dtype="bf16", config_dir=raws["tiny"]))
    assert_same_weights(raws["tiny"], tmp_path / "out", cast=lambda t: t.half().to(torch.bfloat16))


def test_ema_weights_are_used_only_when_asked(raws: dict[str, Path], tmp_path: Path) -> None:
    f = write_single_file(raws["tiny"], tmp_path / "ema.safetensors", ema=True)
    state = load_file(str(f))
    state = {k: (v + 1 if k.startswith("model_ema.") else v) for k, v in state.items()}
    save_file(state, str(f))
    assert inspect_checkpoint(f).has_ema
    prepare_model(f, tmp_path / "plain", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    prepare_model(f, tmp_path / "ema", PrepareOptions(dtype="fp32", config_dir=raws["tiny"], use_ema=True))
    source = weights(raws["tiny"], "unet")
    plain, ema = weights(tmp_path / "plain", "unet"), weights(tmp_path / "ema", "unet")
    for key, tensor in source.items():
        assert torch.equal(plain[key], tensor)
        assert torch.equal(ema[key], tensor + 1)
    assert read_manifest(tmp_path / "ema")["origin"]["ema"] is True
    with pytest.raises(ModelError, match="no EMA weights"):
        prepare_model(
            write_single_file(raws["tiny"], tmp_path / "no-ema.safetensors"),
            tmp_path / "out",
            PrepareOptions(config_dir=raws["tiny"], use_ema=True),
        )
    assert_nothing_left(tmp_path)


def test_a_v_prediction_marker_sets_the_scheduler(raws: dict[str, Path], tmp_path: Path) -> None:
    f = write_single_file(raws["tiny"], tmp_path / "v.safetensors")
    state = load_file(str(f))
    state["v_pred"] = torch.zeros(())
    save_file(state, str(f))
    prepare_model(f, tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    scheduler = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction"
    assert read_manifest(tmp_path / "out")["origin"]["prediction_type"] == "v_prediction"


def test_a_pickle_checkpoint_needs_allow_pickle(raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single_files["tiny"])), "global_step": 1}, str(ckpt))
    with pytest.raises(ModelError, match="pickle.*--allow-pickle"):
        prepare_model(ckpt, tmp_path / "out", PrepareOptions(config_dir=raws["tiny"]))
    assert_nothing_left(tmp_path)
    prepare_model(ckpt, tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws["tiny"], allow_pickle=True))
    assert_same_weights(raws["tiny"], tmp_path / "out")


def test_shipped_configs_name_the_published_architectures() -> None:
    sd15 = json.loads((CONFIGS_DIR / "sd15-inpaint" / "unet" / "config.json").read_text())
    preset = testmodels.preset_configs("sd15-inpaint")["unet"]
    for key, value in preset.items():
        assert sd15[key] == (list(value) if isinstance(value, tuple) else value), key
    for kind in KINDS:
        unet = json.loads((CONFIGS_DIR / kind / "unet" / "config.json").read_text())
        assert architecture_name(unet) == kind


@pytest.mark.parametrize("kind", KINDS)
def test_names_at_the_real_shapes_are_the_ones_diffusers_converts(kind: str) -> None:
    # Meta tensors: the real SD shapes without the memory. diffusers' converter is the reference.
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    folder = CONFIGS_DIR / kind
    unet_cfg = json.loads((folder / "unet" / "config.json").read_text())
    vae_cfg = json.loads((folder / "vae" / "config.json").read_text())
    text_cfg = json.loads((folder / "text_encoder" / "config.json").read_text())
    unet = build_meta("unet", unet_cfg).state_dict()
    vae = build_meta("vae", vae_cfg).state_dict()
    text_model = build_meta("text_encoder", text_cfg)
    text = text_model.state_dict()
    family = "open_clip" if kind.startswith("sd2") else "clip"
    original = to_original(unet, vae, text, unet_config=unet_cfg, vae_config=vae_cfg, text_encoder=family)
    converted_unet = convert_ldm_unet_checkpoint(original, unet_cfg)
    converted_vae = convert_ldm_vae_checkpoint(original, vae_cfg)
    assert {k: tuple(v.shape) for k, v in converted_unet.items()} == {k: tuple(v.shape) for k, v in unet.items()}
    assert {k: tuple(v.shape) for k, v in converted_vae.items()} == {k: tuple(v.shape) for k, v in vae.items()}
    if family == "open_clip":
        converted_text = convert_open_clip_checkpoint(text_model, original)
        converted_text.pop("text_projection.weight", None)
        ours = {text_canonical(k): tuple(v.shape) for k, v in text.items()}
        assert {text_canonical(k): tuple(v.shape) for k, v in converted_text.items()} == ours


# ----------------------------------------------------------------------------- refusals


def _file(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


CONV_IN = UNET_PREFIX + "input_blocks.0.0.weight"
FOREIGN = {
    "sdxl": ({"conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_proj.bias": (4,), CONV_IN: (8, 4, 3, 3)}, "SDXL"),
    "sd3": ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (4,)}, "Stable Diffusion 3"),
    "flux": ({"double_blocks.0.img_attn.norm.key_norm.scale": (4,)}, "Flux"),
    "lora": ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
    "embedding": ({"emb_params": (2, 32)}, "embedding; pass it with --embedding"),
    "vae": ({"encoder.down.0.block.0.conv1.weight": (4, 4, 3, 3)}, "VAE; pass it with --vae"),
    "other": ({"fc.weight": (4, 4), "fc.bias": (4,)}, "not a Stable Diffusion checkpoint"),
    "empty": ({}, "holds no tensors"),
    "pix2pix": ({CONV_IN: (8, 8, 3, 3)}, "InstructPix2Pix"),
    "sd2-t2i": ({CONV_IN: (8, 4, 3, 3), OPEN_CLIP_PREFIX + "token_embedding.weight": (8, 4)}, "SD-2 text-to-image"),
    "controlnet": ({"control_model.input_hint_block.0.weight": (4, 3, 3, 3)}, "ControlNet"),
    "upscaler": ({CONV_IN: (8, 7, 3, 3)}, "upscaler"),
}


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_files_are_refused_naming_what_they_are_and_what_is_supported(name: str, tmp_path: Path) -> None:
    tensors, what = FOREIGN[name]
    if tensors:
        f = _file(tmp_path / f"{name}.safetensors", tensors)
    else:
        f = tmp_path / "empty.safetensors"
        save_file({}, str(f))
    with pytest.raises(ModelError) as info:
        prepare_model(f, tmp_path / "out")
    assert what in str(info.value)
    assert "SD-1.5 inpainting" in str(info.value)
    assert_nothing_left(tmp_path)


def test_a_truncated_file_is_refused_before_reading_tensors(single_files: dict[str, Path], tmp_path: Path) -> None:
    f = tmp_path / "cut.safetensors"
    data = single_files["tiny"].read_bytes()
    f.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelError, match="truncated"):
        prepare_model(f, tmp_path / "out")
    assert_nothing_left(tmp_path)


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "only 0 bytes"),
        (b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all", "unreadable header"),
        (b"\xff" * 64, "header claims"),
        (b"PK\x03\x04 a zip file, not a checkpoint" * 4, "header claims"),
    ],
)
def test_corrupt_files_are_refused(content: bytes, message: str, tmp_path: Path) -> None:
    f = tmp_path / "bad.safetensors"
    f.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        prepare_model(f, tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_a_file_without_vae_or_text_encoder_is_refused(single_files: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(single_files["tiny"]))
    no_vae = {k: v for k, v in state.items() if not k.startswith(VAE_PREFIX)}
    save_file(no_vae, str(tmp_path / "no-vae.safetensors"))
    with pytest.raises(ModelError, match="no VAE"):
        prepare_model(tmp_path / "no-vae.safetensors", tmp_path / "out")
    no_text = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    save_file(no_text, str(tmp_path / "no-text.safetensors"))
    with pytest.raises(ModelError, match="no text encoder"):
        prepare_model(tmp_path / "no-text.safetensors", tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_a_file_of_another_shape_is_refused_against_the_shipped_configs(
    single_files: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=r"does not match the sd15-inpaint architecture.*expected \[320, 9, 3, 3\]"):
        prepare_model(single_files["tiny"], tmp_path / "out")
    assert_nothing_left(tmp_path)


def test_a_unet_with_extra_tensors_is_refused(raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path) -> None:
    state = load_file(str(single_files["tiny"]))
    state[UNET_PREFIX + "input_blocks.9.0.in_layers.0.weight"] = torch.zeros(4)
    save_file(state, str(tmp_path / "extra.safetensors"))
    with pytest.raises(ModelError, match="tensors .* does not have"):
        prepare_model(tmp_path / "extra.safetensors", tmp_path / "out", PrepareOptions(config_dir=raws["tiny"]))
    assert_nothing_left(tmp_path)


def test_a_real_vocabulary_size_needs_a_tokenizer_folder(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    state = load_file(str(single_files["tiny"]))
    key = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    state[key] = torch.randn(49408, state[key].shape[1])
    save_file(state, str(tmp_path / "big-vocab.safetensors"))
    with pytest.raises(ModelError, match="--tokenizer DIR"):
        prepare_model(tmp_path / "big-vocab.safetensors", tmp_path / "out", PrepareOptions(config_dir=raws["tiny"]))
    assert_nothing_left(tmp_path)
    prepare_model(
        tmp_path / "big-vocab.safetensors",
        tmp_path / "out",
        PrepareOptions(dtype="fp32", config_dir=raws["tiny"], tokenizer_dir=raws["tiny"] / "tokenizer"),
    )
    config = json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())
    assert config["vocab_size"] == 49408
    assert (tmp_path / "out" / "tokenizer" / "vocab.json").read_bytes() == (raws["tiny"] / "tokenizer" / "vocab.json").read_bytes()
    # Embedding ids come from the tokenizer: with fewer tokens than rows they would land on used rows.
    save_file({"emb_params": torch.randn(1, 32)}, str(tmp_path / "emb.safetensors"))
    with pytest.raises(ModelError, match="tokenizer has 514 tokens but the text encoder 49408 rows"):
        prepare_model(
            tmp_path / "big-vocab.safetensors",
            tmp_path / "out2",
            PrepareOptions(config_dir=raws["tiny"], tokenizer_dir=raws["tiny"] / "tokenizer", embeddings=[str(tmp_path / "emb.safetensors")]),
        )
    assert not (tmp_path / "out2").exists()


def test_the_cli_converts_a_single_file_and_refuses_with_exit_3(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path, capsys
) -> None:
    code = cli.main(
        ["prepare-model", str(single_files["tiny-sd15"]), str(tmp_path / "out"), "--dtype", "fp32", "--config-dir", str(raws["tiny-sd15"])]
    )
    assert code == 0
    assert check_model(tmp_path / "out") == []
    flux = _file(tmp_path / "flux.safetensors", FOREIGN["flux"][0])
    assert cli.main(["prepare-model", str(flux), str(tmp_path / "flux-out")]) == cli.EXIT_MODEL
    assert "is a Flux checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "flux-out").exists()


def test_sd2_inpainting_from_a_single_file_paints_what_diffusers_paints(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path
) -> None:
    # SD-2-inpainting end to end: OpenCLIP text encoder layout, linear transformer projections,
    # per-block head counts, epsilon prediction; the reference is diffusers' pipeline on the
    # source folder, same inputs and seed.
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline
    from inpaintd.core.config import ModelConfig
    from inpaintd.core.jobs import InpaintParams
    from inpaintd.engine.engine import Engine
    from PIL import Image

    prepare_model(single_files["tiny-sd2-inpaint"], tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws["tiny-sd2-inpaint"]))
    engine = Engine.load(ModelConfig(path=tmp_path / "out", dtype="fp32", threads=1, cache_dir=tmp_path, channels_last=False))
    assert engine.pipeline.unet.config.use_linear_projection is True
    assert engine.pipeline.scheduler.config.prediction_type == "epsilon"
    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray(np.pad(np.full((24, 40), 255, dtype=np.uint8), ((20, 20), (12, 12))), "L")
    params = InpaintParams(prompt="a window", negative_prompt="dark", scheduler="ddim", steps=3, guidance=6.0, strength=1.0, seed=9)
    ours = np.asarray(engine.inpaint(image, mask, params).image)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(raws["tiny-sd2-inpaint"]), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt=params.prompt, negative_prompt=params.negative_prompt, image=image, mask_image=mask, height=64, width=64,
        num_inference_steps=params.steps, guidance_scale=params.guidance, strength=params.strength,
        generator=torch.Generator("cpu").manual_seed(params.seed),
    ).images[0]
    assert np.array_equal(ours, np.asarray(reference))


@pytest.mark.skipif(
    os.environ.get("INPAINTD_REAL_SHAPES") != "1",
    reason="real SD shapes: ~11 min on 2 cores, 10.4 GiB peak, ~20 GB of disk; set INPAINTD_REAL_SHAPES=1",
)
def test_at_the_real_shapes_sd2_inpainting_paints_what_diffusers_paints_and_the_sd15_merge_is_exact(
    tmp_path: Path,
) -> None:
    # The two checks of scripts/verify_real_shapes.py (results in BENCHMARKS.md): a random
    # SD-2-inpainting of the exact architecture, single file -> prepare-model with the shipped
    # configs -> the same pixels as diffusers' pipeline; and the add-difference merge of three
    # random SD-1.5-shape models checked tensor by tensor, then one 512x512 job on it.
    script = Path(__file__).resolve().parent.parent / "scripts" / "verify_real_shapes.py"
    run = subprocess.run([sys.executable, str(script), "--work", str(tmp_path / "work")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]


def test_the_shipped_sd2_inpainting_config_is_the_512_epsilon_model() -> None:
    folder = CONFIGS_DIR / "sd2-inpaint"
    unet = json.loads((folder / "unet" / "config.json").read_text())
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    text = json.loads((folder / "text_encoder" / "config.json").read_text())
    assert unet["in_channels"] == 9 and unet["sample_size"] * 8 == 512 and unet["cross_attention_dim"] == 1024
    assert unet["use_linear_projection"] is True and unet["attention_head_dim"] == [5, 10, 20, 20]
    assert scheduler["prediction_type"] == "epsilon"
    assert (text["hidden_size"], text["num_hidden_layers"], text["hidden_act"]) == (1024, 23, "gelu")
    meta = build_meta("unet", unet)
    assert 865_000_000 < sum(p.numel() for p in meta.parameters()) < 867_000_000


def test_random_weight_labels_survive_the_single_file(single_files: dict[str, Path], raws: dict[str, Path], tmp_path: Path) -> None:
    manifest = prepare_model(single_files["tiny"], tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    assert manifest["random_weights"] is True
    state = load_file(str(single_files["tiny"]))
    save_file(state, str(tmp_path / "unlabelled.safetensors"))  # what a user's file looks like
    manifest = prepare_model(tmp_path / "unlabelled.safetensors", tmp_path / "out2", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    assert manifest["random_weights"] is False


@pytest.mark.slow
def test_a_real_size_sd15_inpainting_file_converts_with_the_shipped_configs(tmp_path: Path) -> None:
    # The one test at the real shapes: an fp16 single file of SD-1.5-inpainting's exact
    # architecture (random weights), converted without --config-dir.
    from inpaintd.modelprep.check import check_model
    from inpaintd.modelprep.checkpoints import inspect_checkpoint
    from inpaintd.modelprep.prepare import prepare_model
    from inpaintd.modelprep.summary import summarize
    from inpaintd.testing.models import build_random_model
    from inpaintd.testing.single_file import write_single_file
    from inpaintd.weights.folder import WEIGHT_COMPONENTS

    raw = build_random_model("sd15-inpaint", tmp_path / "raw")
    f = write_single_file(raw, tmp_path / "sd15-inpainting.safetensors")
    info = inspect_checkpoint(f)
    assert (info.kind, info.cross_attention_dim, info.files_dtype, info.vocab_size) == ("sd15-inpaint", 768, "fp16", 49408)
    manifest = prepare_model(f, tmp_path / "out", PrepareOptions(dtype="bf16", tokenizer_dir=raw / "tokenizer"))
    assert manifest["origin"]["configs"] == "inpaintd:sd15-inpaint" and manifest["random_weights"] is True
    assert check_model(tmp_path / "out") == []
    for component in WEIGHT_COMPONENTS:
        source = weights(raw, component)
        converted = weights(tmp_path / "out", component)
        assert source.keys() == converted.keys(), component
        for key, tensor in source.items():
            assert torch.equal(tensor.to(torch.bfloat16), converted[key]), f"{component}/{key}"
        del source, converted
    summary = summarize(tmp_path / "out")
    assert summary.architecture == "sd15-inpaint"
    # BENCHMARKS.md measured a 2.9 GiB peak (anonymous + file-backed) for this model in bf16.
    assert 2.5 * 2**30 < summary.job_512_bytes < 3.2 * 2**30


def test_inpaintd_process_writes_the_same_image_with_the_folder_and_with_its_single_file(
    tiny_model: Path, single_files: dict[str, Path], raws: dict[str, Path], tmp_path: Path
) -> None:
    # The whole job path (read, regions, engine, blend, encode), not only the engine.
    from PIL import Image

    prepare_model(single_files["tiny"], tmp_path / "from-file", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    rng = np.random.default_rng(12)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), "RGB").save(tmp_path / "photo.png")
    mask = np.zeros((96, 128), dtype=np.uint8)
    mask[30:60, 40:90] = 255
    Image.fromarray(mask, "L").save(tmp_path / "photo.mask.png")
    outputs = []
    for name, model in (("a", tiny_model), ("b", tmp_path / "from-file")):
        out = tmp_path / f"{name}.png"
        code = cli.main(
            ["process", str(tmp_path / "photo.png"), "--mask", str(tmp_path / "photo.mask.png"), "--prompt", "a door",
             "--model", str(model), "--steps", "2", "--seed", "3", "-o", str(out)]
        )
        assert code == 0
        outputs.append(np.asarray(Image.open(out)))
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], np.asarray(Image.open(tmp_path / "photo.png")))  # it did paint


def test_configs_and_tokenizer_folders_that_do_not_fit_are_refused(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path
) -> None:
    f = single_files["tiny"]
    (tmp_path / "not-configs").mkdir()
    with pytest.raises(ModelError, match="not a diffusers config folder"):
        prepare_model(f, tmp_path / "out", PrepareOptions(config_dir=tmp_path / "not-configs"))
    half = tmp_path / "half-tokenizer"
    half.mkdir()
    shutil.copy2(raws["tiny"] / "tokenizer" / "vocab.json", half / "vocab.json")
    with pytest.raises(ModelError, match="has no merges.txt"):
        prepare_model(f, tmp_path / "out", PrepareOptions(config_dir=raws["tiny"], tokenizer_dir=half))
    big = tmp_path / "big-tokenizer"
    big.mkdir()
    vocab = json.loads((raws["tiny"] / "tokenizer" / "vocab.json").read_text())
    vocab.update({f"extra{i}</w>": len(vocab) + i for i in range(10)})
    (big / "vocab.json").write_text(json.dumps(vocab))
    (big / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelError, match="524 tokens but the checkpoint's text encoder only 514"):
        prepare_model(f, tmp_path / "out", PrepareOptions(config_dir=raws["tiny"], tokenizer_dir=big))
    assert_nothing_left(tmp_path)


def test_a_clip_tokenizer_in_the_local_hugging_face_cache_is_found(
    raws: dict[str, Path], single_files: dict[str, Path], tmp_path: Path, monkeypatch
) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copy2(raws["tiny"] / "tokenizer" / name, snapshot / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    state = load_file(str(single_files["tiny"]))
    key = CLIP_PREFIX + "text_model.embeddings.token_embedding.weight"
    state[key] = torch.randn(49408, state[key].shape[1])
    save_file(state, str(tmp_path / "big-vocab.safetensors"))
    assert find_cached_tokenizer(49408) == snapshot
    prepare_model(tmp_path / "big-vocab.safetensors", tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=raws["tiny"]))
    assert (tmp_path / "out" / "tokenizer" / "merges.txt").read_bytes() == (snapshot / "merges.txt").read_bytes()


def _hostile_header_file(path: Path, header: bytes, data: bytes = b"") -> Path:
    import struct

    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header,data", [
    (b"[" * 100_000 + b"]" * 100_000, b""),  # nesting deep enough to exhaust the parser's recursion
    (b'["a", "list"]', b""),  # a header that is not an object
    (b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}', b"\0" * 8),  # reversed offsets
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}', b"\0" * 8),  # shape and bytes disagree
    (b'{"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}', b"\0" * 8),  # an unknown dtype
    (b'{"w": {"dtype": "F32", "shape": "x", "data_offsets": [0, 8]}}', b"\0" * 8),
    (b'{"w": 5}', b""),
])
def test_a_hostile_header_is_a_model_error_with_exit_3_never_a_traceback(tmp_path: Path, header: bytes,
                                                                         data: bytes) -> None:
    from inpaintd.weights.safetensors import read_header

    path = _hostile_header_file(tmp_path / "hostile.safetensors", header, data)
    with pytest.raises(ModelError):
        read_header(path)
    run = subprocess.run([sys.executable, "-m", "inpaintd", "prepare-model", str(path), str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 3, run.stderr
    assert "Traceback" not in run.stderr and "model error" in run.stderr
