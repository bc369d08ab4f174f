"""Random model generation, prepare-model and check-model, on the tiny random model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from inpaintd.core.digest import sha256_file
from inpaintd.core.errors import ModelError
from inpaintd.demo.model import ensure_embedded_model
from inpaintd.modelprep.check import check_model
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.modelprep.tokenizer import tokenizer_vocab
from inpaintd.testing import models as testmodels
from inpaintd.testing.models import build_random_model
from inpaintd.weights.folder import (
    MANIFEST_NAME,
    MANIFEST_SCHEMA,
    RANDOM_MARKER,
    SOURCE_FILE,
    inspect_model,
    read_manifest,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _tree_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): sha256_file(p).sha256 for p in sorted(root.rglob("*")) if p.is_file()}


def _tensor_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for f in folder.rglob("*.safetensors"):
        with safe_open(str(f), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point():
                    dtypes.add(tensor.dtype)
    return dtypes


def test_generated_folder_loads_with_from_pretrained_offline(tiny_model_raw: Path) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(tiny_model_raw), safety_checker=None, feature_extractor=None, local_files_only=True
    )
    assert pipe.unet.config.in_channels == 9
    ids = pipe.tokenizer("a red cat, über").input_ids
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_generated_folder_is_labelled_random(tiny_model_raw: Path) -> None:
    assert (tiny_model_raw / RANDOM_MARKER).is_file()
    source = json.loads((tiny_model_raw / SOURCE_FILE).read_text())
    assert source["random_weights"] is True and source["preset"] == "tiny"
    index = json.loads((tiny_model_raw / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_tiny_build_is_deterministic(tiny_model_raw: Path, tmp_path: Path) -> None:
    again = build_random_model("tiny", tmp_path / "again")
    assert _tree_hashes(again) == _tree_hashes(tiny_model_raw)


def test_build_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "m"
    out.mkdir()
    with pytest.raises(FileExistsError):
        build_random_model("tiny", out)
    assert list(tmp_path.iterdir()) == [out]  # no temp dir left behind


def test_unknown_preset_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        build_random_model("sdxl", tmp_path / "m")


def test_sd15_preset_configs_match_the_published_architecture() -> None:
    configs = testmodels.preset_configs("sd15-inpaint")
    unet, text = configs["unet"], configs["text_encoder"]
    assert unet["in_channels"] == 9 and unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert unet["cross_attention_dim"] == 768 and unet["attention_head_dim"] == 8
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    assert (text["intermediate_size"], text["max_position_embeddings"], text["vocab_size"]) == (3072, 77, 49408)
    vocab, _ = tokenizer_vocab()
    assert len(vocab) < text["vocab_size"]


def test_sd15_unet_has_860m_parameters_on_meta_device() -> None:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**testmodels.preset_configs("sd15-inpaint")["unet"])
    params = sum(p.numel() for p in unet.parameters())
    assert 859_000_000 < params < 860_000_000  # SD-1.5-inpainting: 859,535,364


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_prepare_round_trip_from_fp32(tiny_model_raw: Path, tmp_path: Path, dtype: str, torch_dtype) -> None:
    dst = tmp_path / f"prepared-{dtype}"
    manifest = prepare_model(tiny_model_raw, dst, PrepareOptions(dtype=dtype))
    assert check_model(dst) == []
    assert manifest["dtype"] == dtype and manifest["random_weights"] is True
    assert manifest["architecture"]["unet_in_channels"] == 9
    assert manifest["architecture"]["unet_params"] > 0
    assert len(manifest["id"]) == 12
    assert manifest["schema"] == MANIFEST_SCHEMA
    assert json.loads((dst / MANIFEST_NAME).read_text()) == manifest
    assert _tensor_dtypes(dst) == {torch_dtype}
    original = load_file(str(tiny_model_raw / "unet" / "diffusion_pytorch_model.safetensors"))
    converted = load_file(str(dst / "unet" / "diffusion_pytorch_model.safetensors"))
    assert original.keys() == converted.keys()
    for key, tensor in original.items():
        assert torch.equal(tensor.to(torch_dtype), converted[key])
    assert not list(tmp_path.glob(".*"))  # the temp build dir was renamed away


def test_prepare_from_fp16_variant_files(tiny_model_raw: Path, tmp_path: Path) -> None:
    src = tmp_path / "fp16-variant"
    shutil.copytree(tiny_model_raw, src)
    for f in list(src.rglob("*.safetensors")):
        tensors = {k: (v.half() if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors"))))
        f.unlink()
    layout = inspect_model(src)
    assert layout.variant == "fp16" and layout.files_dtype == "fp16"
    dst = tmp_path / "prepared"
    prepare_model(src, dst, PrepareOptions(dtype="bf16"))
    assert check_model(dst) == []
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(dst.rglob("*.fp16.*"))
    assert _tensor_dtypes(dst) == {torch.bfloat16}
    assert inspect_model(dst).variant is None


def test_prepare_refuses_existing_destination_unless_overwrite(tiny_model_raw: Path, tmp_path: Path) -> None:
    dst = tmp_path / "prepared"
    first = prepare_model(tiny_model_raw, dst, PrepareOptions(dtype="fp32"))
    with pytest.raises(FileExistsError):
        prepare_model(tiny_model_raw, dst, PrepareOptions(dtype="fp32"))
    second = prepare_model(tiny_model_raw, dst, PrepareOptions(dtype="bf16", overwrite=True))
    assert second["dtype"] == "bf16" and second["id"] != first["id"]
    assert check_model(dst) == []
    assert [p.name for p in tmp_path.iterdir()] == ["prepared"]


def test_check_detects_a_tampered_weight_file(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    weights = copy / "vae" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    problems = check_model(copy)
    assert len(problems) == 1 and problems[0].startswith("vae/diffusion_pytorch_model.safetensors: sha256")


def test_check_detects_missing_file_extra_weights_and_wrong_dtype(tiny_model: Path, tmp_path: Path) -> None:
    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    (copy / "tokenizer" / "vocab.json").unlink()
    save_file({"x": torch.zeros(2)}, str(copy / "unet" / "extra.safetensors"))
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["dtype"] = "bf16"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    problems = "\n".join(check_model(copy))
    assert "tokenizer/vocab.json: missing" in problems
    assert "unet/extra.safetensors: weight file not listed" in problems
    assert "manifest says bf16" in problems


def test_check_without_manifest_says_to_prepare(tiny_model_raw: Path) -> None:
    problems = check_model(tiny_model_raw)
    assert len(problems) == 1 and "prepare-model" in problems[0]


def test_missing_folder_and_missing_model_index_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no model_index.json"):
        inspect_model(tmp_path / "empty")


def _with_in_channels(src: Path, dst: Path, channels: int) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["in_channels"] = channels
    config_path.write_text(json.dumps(config))
    return dst


def test_a_four_channel_folder_is_prepared_and_passes_check(tiny_sd15_raw: Path, tmp_path: Path) -> None:
    assert inspect_model(tiny_sd15_raw).unet_in_channels == 4
    manifest = prepare_model(tiny_sd15_raw, tmp_path / "out", PrepareOptions(dtype="fp32"))
    assert manifest["architecture"]["unet_in_channels"] == 4
    assert check_model(tmp_path / "out") == []


def test_a_unet_with_other_input_channels_is_refused(tiny_model_raw: Path, tmp_path: Path) -> None:
    src = _with_in_channels(tiny_model_raw, tmp_path / "pix2pix", 8)
    with pytest.raises(ModelError, match="8 input channels; inpaintd runs inpainting UNets"):
        inspect_model(src)
    with pytest.raises(ModelError, match="8 input channels"):
        prepare_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _make_pickle_only(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in list(dst.rglob("*.safetensors")):
        name = "pytorch_model.bin" if f.parent.name == "text_encoder" else "diffusion_pytorch_model.bin"
        torch.save(load_file(str(f)), f.with_name(name))
        f.unlink()
    return dst


def test_pickle_weights_are_refused_unless_allowed(tiny_model_raw: Path, tmp_path: Path) -> None:
    src = _make_pickle_only(tiny_model_raw, tmp_path / "pickled")
    with pytest.raises(ModelError, match="pickle"):
        inspect_model(src)
    with pytest.raises(ModelError, match="allow_pickle"):
        prepare_model(src, tmp_path / "out")
    layout = inspect_model(src, allow_pickle=True)
    assert layout.weight_format == "pickle"
    manifest = prepare_model(src, tmp_path / "out", PrepareOptions(dtype="fp32", allow_pickle=True))
    assert check_model(tmp_path / "out") == []
    assert not list((tmp_path / "out").rglob("*.bin"))
    assert manifest["files"]["unet/diffusion_pytorch_model.safetensors"]


def test_a_pickle_file_beside_safetensors_is_not_a_problem(tiny_model_raw: Path, tmp_path: Path) -> None:
    src = tmp_path / "both"
    shutil.copytree(tiny_model_raw, src)
    torch.save({"x": torch.zeros(1)}, src / "unet" / "diffusion_pytorch_model.bin")
    assert inspect_model(src).weight_format == "safetensors"


def test_a_single_file_is_recognised_and_refused_when_it_is_no_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(1)}, str(ckpt))
    with pytest.raises(ModelError, match="not a Stable Diffusion checkpoint"):
        prepare_model(ckpt, tmp_path / "out")
    with pytest.raises(ModelError, match="single-file"):
        inspect_model(ckpt)
    pickled = tmp_path / "model.ckpt"
    pickled.write_bytes(b"not really")
    with pytest.raises(ModelError, match="pickle"):
        prepare_model(pickled, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt", "model.safetensors"]


def test_offline_environment_is_set_on_import() -> None:
    import os

    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "DIFFUSERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        assert os.environ[key] == "1"


def test_embedded_model_is_built_once_and_prepared(tmp_path: Path) -> None:
    path = ensure_embedded_model(tmp_path, dtype="fp32")
    assert path == tmp_path / "models" / "tiny-random"
    assert check_model(path) == []
    manifest = read_manifest(path)
    assert manifest is not None and manifest["random_weights"] is True and manifest["dtype"] == "fp32"
    mtime = (path / MANIFEST_NAME).stat().st_mtime_ns
    assert ensure_embedded_model(tmp_path, dtype="fp32") == path
    assert (path / MANIFEST_NAME).stat().st_mtime_ns == mtime
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-random"]
    ensure_embedded_model(tmp_path, dtype="bf16")
    assert read_manifest(path)["dtype"] == "bf16"


def test_make_random_model_script(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "scripts" / "make_random_model.py"
    out = tmp_path / "m"
    result = subprocess.run(
        [sys.executable, str(script), "--preset", "tiny", str(out), "--prepare", "bf16"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "model_index.json").is_file()
    assert check_model(tmp_path / "m-bf16") == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_by_prepare_and_reported_by_check_and_a_job_fails_clearly(
        tiny_model_raw: Path, tmp_path: Path, bad: float) -> None:
    from inpaintd.core.config import ModelConfig
    from inpaintd.core.errors import JobError, ModelError
    from inpaintd.core.jobs import InpaintParams
    from inpaintd.engine.engine import Engine
    from inpaintd.modelprep.check import check_model
    from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
    from PIL import Image
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_raw, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    state["conv_out.weight"][0, 0, 0, 0] = bad
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(ModelError, match="NaN or infinite"):
        prepare_model(broken, tmp_path / "out", PrepareOptions(dtype="fp32"))
    assert not (tmp_path / "out").exists()

    # A folder prepared before this check existed (or changed after): check says so, a job fails.
    good = tmp_path / "good"
    prepare_model(tiny_model_raw, good, PrepareOptions(dtype="fp32"))
    target = next((good / "unet").glob("*.safetensors"))
    state = load_file(str(target))
    state["conv_out.weight"][0, 0, 0, 0] = bad
    save_file(state, str(target), metadata={"format": "pt"})
    assert any("NaN or infinite" in p for p in check_model(good))
    engine = Engine.load(ModelConfig(path=good, dtype="fp32", threads=1, cache_dir=tmp_path / "cache"))
    image = Image.new("RGB", (64, 64), (120, 120, 120))
    mask = Image.new("L", (64, 64), 255)
    params = InpaintParams(prompt="x", negative_prompt="", scheduler="euler", steps=2, guidance=7.5, strength=1.0, seed=1)
    with pytest.raises(JobError) as caught:
        engine.inpaint(image, mask, params)
    assert caught.value.code == "output_not_finite"
