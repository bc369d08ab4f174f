"""--vae and --embedding: files built the way users get them, baked into the prepared folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from inpaintd import cli
from inpaintd.core.config import ModelConfig
from inpaintd.core.digest import sha256_file
from inpaintd.core.errors import JobError, ModelError
from inpaintd.core.jobs import InpaintParams
from inpaintd.engine.engine import Engine
from inpaintd.modelprep.check import check_model
from inpaintd.modelprep.embeddings import EmbeddingSpec
from inpaintd.modelprep.keymaps import UNET_PREFIX, VAE_PREFIX
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.testing.single_file import vae_to_original
from PIL import Image
from safetensors.torch import load_file, save_file

PARAMS = InpaintParams(prompt="a door", negative_prompt="", scheduler="ddim", steps=3, guidance=7.5, strength=1.0, seed=11)


@pytest.fixture(scope="module")
def other_vae(tiny_model_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE of the tiny model's architecture with other random weights, as a diffusers folder."""
    from diffusers import AutoencoderKL

    config = json.loads((tiny_model_raw / "vae" / "config.json").read_text())
    torch.manual_seed(77)
    vae = AutoencoderKL.from_config(config)
    folder = tmp_path_factory.mktemp("vae") / "vae"
    vae.save_pretrained(str(folder), safe_serialization=True)
    return folder


def vae_file(folder: Path, path: Path, layout: str) -> Path:
    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    if layout == "original":
        state = vae_to_original(state, config)
    elif layout == "prefixed":
        state = vae_to_original(state, config, prefix=VAE_PREFIX)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def text_rows(folder: Path) -> torch.Tensor:
    state = load_file(str(next((folder / "text_encoder").glob("*.safetensors"))))
    return next(v for k, v in state.items() if k.endswith("token_embedding.weight"))


def engine(folder: Path, tmp_path: Path) -> Engine:
    return Engine.load(ModelConfig(path=folder, dtype="fp32", threads=1, cache_dir=tmp_path, channels_last=False))


def inputs() -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(4)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    return image, Image.fromarray(np.pad(np.full((32, 32), 255, dtype=np.uint8), 16), "L")


# ----------------------------------------------------------------------------- VAE


@pytest.mark.parametrize("layout", ["original", "prefixed", "diffusers-file", "folder", "model-folder"])
def test_a_vae_comes_back_tensor_for_tensor(layout: str, tiny_model_raw: Path, other_vae: Path, tmp_path: Path) -> None:
    if layout == "model-folder":  # a whole diffusers model given as --vae: its vae/ is taken
        source = tmp_path / "donor"
        shutil.copytree(tiny_model_raw, source)
        shutil.rmtree(source / "vae")
        shutil.copytree(other_vae, source / "vae")
    else:
        source = other_vae if layout == "folder" else vae_file(other_vae, tmp_path / "vae.safetensors", layout)
    manifest = prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", vae=source))
    expected = load_file(str(other_vae / "diffusion_pytorch_model.safetensors"))
    got = load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert manifest["extras"]["vae"]["source"] == str((source / "vae" if layout == "model-folder" else source).resolve())
    expected_format = {"prefixed": "original", "folder": "diffusers-folder", "model-folder": "diffusers-folder"}
    assert manifest["extras"]["vae"]["format"] == expected_format.get(layout, layout)
    assert check_model(tmp_path / "out") == []


def test_a_vae_file_converts_like_diffusers_from_single_file(other_vae: Path, tiny_model_raw: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    f = vae_file(other_vae, tmp_path / "vae.safetensors", "original")
    reference = AutoencoderKL.from_single_file(str(f), config=str(other_vae), local_files_only=True).state_dict()
    prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", vae=f))
    ours = load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))
    assert reference.keys() == ours.keys()
    assert all(torch.equal(reference[k], ours[k]) for k in ours)


def test_a_swapped_vae_paints_what_diffusers_paints_with_that_vae(
    tiny_model: Path, tiny_model_raw: Path, other_vae: Path, tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline

    prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", vae=vae_file(other_vae, tmp_path / "v.safetensors", "original")))
    image, mask = inputs()
    ours = np.asarray(engine(tmp_path / "out", tmp_path).inpaint(image, mask, PARAMS).image)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(tiny_model), vae=AutoencoderKL.from_pretrained(str(other_vae)), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False, local_files_only=True,
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt=PARAMS.prompt, negative_prompt=PARAMS.negative_prompt, image=image, mask_image=mask, height=64, width=64,
        num_inference_steps=PARAMS.steps, guidance_scale=PARAMS.guidance, strength=PARAMS.strength,
        generator=torch.Generator("cpu").manual_seed(PARAMS.seed),
    ).images[0]
    assert np.array_equal(ours, np.asarray(reference))


def test_vae_refusals_leave_nothing(tiny_model_raw: Path, other_vae: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    config = json.loads((other_vae / "config.json").read_text())
    config["block_out_channels"] = [16, 16, 32, 32]
    AutoencoderKL.from_config(config).save_pretrained(str(tmp_path / "wide"), safe_serialization=True)
    cases = [
        (tmp_path / "wide", "drop-in replacement"),
        (_file(tmp_path / "unet.safetensors", {UNET_PREFIX + "input_blocks.0.0.weight": (8, 9, 3, 3)}), "not a VAE file"),
        (tmp_path / "missing.safetensors", "does not exist"),
    ]
    pickled = tmp_path / "vae.pt"
    torch.save(load_file(str(other_vae / "diffusion_pytorch_model.safetensors")), str(pickled))
    cases.append((pickled, "pickle"))
    partial = load_file(str(vae_file(other_vae, tmp_path / "full.safetensors", "original")))
    partial.pop("decoder.conv_out.weight")
    save_file(partial, str(tmp_path / "partial.safetensors"))
    cases.append((tmp_path / "partial.safetensors", "not a complete VAE"))
    for source, message in cases:
        with pytest.raises(ModelError, match=message):
            prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(vae=source))
        assert not (tmp_path / "out").exists()
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _file(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, str(path))
    return path


# ----------------------------------------------------------------------------- embeddings


def a1111_embedding(path: Path, vectors: torch.Tensor) -> Path:
    save_file({"emb_params": vectors}, str(path))
    return path


def diffusers_embedding(path: Path, token: str, vector: torch.Tensor) -> Path:
    save_file({token: vector}, str(path))
    return path


def test_embeddings_are_baked_into_tokenizer_and_text_encoder(tiny_model_raw: Path, tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    two = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    one = torch.randn(32, generator=torch.Generator().manual_seed(2))
    bad = a1111_embedding(tmp_path / "badhands.safetensors", two)
    star = diffusers_embedding(tmp_path / "star.safetensors", "<star>", one)
    manifest = prepare_model(
        tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", embeddings=[str(bad), EmbeddingSpec(star, "<sky>")])
    )
    records = manifest["extras"]["embeddings"]
    assert [(r["token"], r["tokens"], r["vectors"], r["format"]) for r in records] == [
        ("badhands", ["badhands", "badhands_1"], 2, "a1111"),
        ("<sky>", ["<sky>"], 1, "diffusers"),
    ]
    assert records[0]["sha256"] == sha256_file(bad).sha256
    tokenizer = CLIPTokenizer.from_pretrained(str(tmp_path / "out" / "tokenizer"))
    rows = text_rows(tmp_path / "out")
    original = text_rows(tiny_model_raw)
    assert rows.shape[0] == len(tokenizer) == original.shape[0] + 3
    assert torch.equal(rows[: original.shape[0]], original)
    ids = tokenizer.convert_tokens_to_ids(["badhands", "badhands_1", "<sky>"])
    assert torch.equal(rows[ids[0]], two[0]) and torch.equal(rows[ids[1]], two[1]) and torch.equal(rows[ids[2]], one)
    assert json.loads((tmp_path / "out" / "text_encoder" / "config.json").read_text())["vocab_size"] == rows.shape[0]
    assert check_model(tmp_path / "out") == []


def test_prompts_with_the_tokens_encode_like_diffusers_load_textual_inversion(
    tiny_model: Path, tiny_model_raw: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionInpaintPipeline

    vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(5))
    f = a1111_embedding(tmp_path / "style.safetensors", vectors)
    prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", embeddings=[f"{f}:mystyle"]))
    ours = engine(tmp_path / "out", tmp_path)
    reference = StableDiffusionInpaintPipeline.from_pretrained(
        str(tiny_model), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    reference.load_textual_inversion(str(f), token="mystyle")
    prompt = "a wall in mystyle, mystyle"
    with torch.inference_mode():
        expected, expected_negative = reference.encode_prompt(prompt, torch.device("cpu"), 1, True, negative_prompt="mystyle")
    got, got_negative = ours.encode(prompt, "mystyle")
    assert torch.equal(got, expected) and torch.equal(got_negative, expected_negative)
    plain, _ = ours.encode("a wall in , ", "")
    assert not torch.equal(plain, got)  # the tokens mean something
    # Naming a 3-vector token 155 times expands the prompt by 310 tokens (CLIP reads 77): refused
    # before diffusers' conversion loop, which runs outside any denoising step.
    with pytest.raises(JobError) as caught:
        ours.encode("mystyle " * 155, "")
    assert caught.value.code == "prompt_invalid" and "expand" in caught.value.message
    image, mask = inputs()
    assert ours.inpaint(image, mask, PARAMS.__class__(**{**PARAMS.__dict__, "prompt": prompt})).image.size == (64, 64)


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda d: _embed(d / "xl.safetensors", {"clip_l": (1, 768), "clip_g": (1, 1280)}), "SDXL embedding"),
        (lambda d: _embed(d / "wide.safetensors", {"emb_params": (2, 768)}), r"768 wide \(SD-1.x\), this model's text encoder 32"),
        (lambda d: _embed(d / "a.safetensors", {"emb_params": (1, 32)}), "'a' already exists"),
        (lambda d: _embed(d / "many.safetensors", {"w1": (2, 32), "w2": (2, 32)}), "not a textual-inversion embedding"),
        (lambda d: _embed(d / "int.safetensors", {"emb_params": (2, 2, 32)}), "1-D or 2-D float"),
        (lambda d: _pickled(d / "emb.pt"), "pickle"),
        (lambda d: _embed(d / "huge.safetensors", {"emb_params": (76, 32)}), "76 vectors; a prompt holds at most 75"),
        (lambda d: _nan(d / "nan.safetensors"), "NaN or infinite"),
        (lambda d: d / "missing.safetensors", "does not exist"),
    ],
)
def test_embedding_refusals_leave_nothing(make, message: str, tiny_model_raw: Path, tmp_path: Path) -> None:
    source = make(tmp_path)
    with pytest.raises(ModelError, match=message):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(embeddings=[str(source)]))
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _embed(path: Path, tensors: dict[str, tuple[int, ...]]) -> Path:
    save_file({k: torch.randn(shape) for k, shape in tensors.items()}, str(path))
    return path


def _nan(path: Path) -> Path:
    vectors = torch.randn(2, 32)
    vectors[1, 3] = float("nan")
    save_file({"emb_params": vectors}, str(path))
    return path


def _pickled(path: Path) -> Path:
    torch.save({"string_to_param": {"*": torch.randn(2, 32)}, "name": "emb"}, str(path))
    return path


def test_a_pickled_a1111_embedding_loads_when_allowed(tiny_model_raw: Path, tmp_path: Path) -> None:
    f = _pickled(tmp_path / "emb.pt")
    manifest = prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", embeddings=[str(f)], allow_pickle=True))
    assert manifest["extras"]["embeddings"][0]["tokens"] == ["emb", "emb_1"]


@pytest.mark.parametrize("suffix,message", [(":", "empty token"), (":two words", "one word without spaces")])
def test_bad_tokens_are_refused(suffix: str, message: str, tiny_model_raw: Path, tmp_path: Path) -> None:
    f = _embed(tmp_path / "x.safetensors", {"emb_params": (1, 32)})
    with pytest.raises(ModelError, match=message):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(embeddings=[f"{f}{suffix}"]))
    assert not (tmp_path / "out").exists()


def test_a_vae_folder_of_another_class_is_refused(tiny_model_raw: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_model_raw / "unet", tmp_path / "unet")
    with pytest.raises(ModelError, match="UNet2DConditionModel, not an AutoencoderKL"):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(vae=tmp_path / "unet"))
    assert not (tmp_path / "out").exists()


def test_the_same_token_twice_is_refused(tiny_model_raw: Path, tmp_path: Path) -> None:
    f = _embed(tmp_path / "x.safetensors", {"emb_params": (1, 32)})
    g = _embed(tmp_path / "y.safetensors", {"emb_params": (1, 32)})
    with pytest.raises(ModelError, match="'tok' already exists"):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(embeddings=[f"{f}:tok", f"{g}:tok"]))


def test_the_cli_bakes_vae_and_embeddings_into_a_single_file_conversion(
    tiny_model_raw: Path, other_vae: Path, tmp_path: Path, capsys
) -> None:
    from inpaintd.modelprep.check import check_model
    from inpaintd.testing.single_file import write_single_file

    model = write_single_file(tiny_model_raw, tmp_path / "model.safetensors")
    emb = _embed(tmp_path / "neg.safetensors", {"emb_params": (2, 32)})
    code = cli.main(
        ["prepare-model", str(model), str(tmp_path / "out"), "--dtype", "bf16", "--config-dir", str(tiny_model_raw),
         "--vae", str(other_vae), "--embedding", str(emb)]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "embedding neg (2 vector(s))" in out and "VAE from" in out
    assert check_model(tmp_path / "out") == []
    assert load_file(str(tmp_path / "out" / "vae" / "diffusion_pytorch_model.safetensors"))["encoder.conv_in.weight"].dtype == torch.bfloat16
    assert text_rows(tmp_path / "out").dtype == torch.bfloat16
    shutil.rmtree(tmp_path / "out")
