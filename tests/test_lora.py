"""LoRA fused at prepare time (issue 14): the same pixels as diffusers' load_lora_weights + fuse_lora,
recorded in the manifest, the sidecar and `inpaintd check`; a LoRA that does not fit is refused
with the keys that do not, and no destination is ever left half-written."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from inpaintd.core.digest import sha256_file
from inpaintd.core.errors import ModelError
from inpaintd.modelprep.lora import LoraSpec, plan
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.testing.lora import TEXT_ENCODER_LORA_TARGETS, build_random_lora


def _inputs():
    from PIL import Image

    rng = np.random.default_rng(8)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = Image.fromarray(np.pad(np.full((24, 40), 255, dtype=np.uint8), ((20, 20), (12, 12))), "L")
    return image, mask


def _ours(model: Path, tmp_path: Path, params) -> np.ndarray:  # type: ignore[no-untyped-def]
    from inpaintd.core.config import ModelConfig
    from inpaintd.engine.engine import Engine

    engine = Engine.load(ModelConfig(path=model, dtype="fp32", threads=1, cache_dir=tmp_path / "cache", channels_last=False))
    image, mask = _inputs()
    return np.asarray(engine.inpaint(image, mask, params).image).astype(int)


def _diffusers(raw: Path, params, lora_file: Path | None, scale: float) -> np.ndarray:  # type: ignore[no-untyped-def]
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(raw), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True
    )
    if lora_file is not None:
        pipe.load_lora_weights(str(lora_file))
        pipe.fuse_lora(lora_scale=scale)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = _inputs()
    out = pipe(
        prompt=params.prompt, negative_prompt=params.negative_prompt, image=image, mask_image=mask, height=64, width=64,
        num_inference_steps=params.steps, guidance_scale=params.guidance, strength=params.strength,
        generator=torch.Generator("cpu").manual_seed(params.seed),
    ).images[0]
    return np.asarray(out).astype(int)


@pytest.mark.parametrize("layout", ["kohya", "peft", "kohya-mixed-alphas"])
def test_a_model_prepared_with_a_lora_paints_what_diffusers_fuse_lora_paints(
    tiny_model_raw: Path, tmp_path: Path, layout: str
) -> None:
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the test extra installs it)")
    from inpaintd.core.jobs import InpaintParams
    from safetensors.torch import load_file, save_file

    # alpha != rank and a scale != 1, on UNet and text encoder layers (linear, 1x1 and 3x3 convs).
    lora_file = build_random_lora(
        tiny_model_raw, tmp_path / f"{layout}.safetensors", rank=4, alpha=2.0, layout=layout.split("-")[0],
        text_encoder_targets=TEXT_ENCODER_LORA_TARGETS, strength=1.0, dtype="fp32",
    )
    if layout == "kohya-mixed-alphas":
        # Some layers with another alpha, some with none: diffusers gives those the most common
        # one. (Not on the text encoder's attention projections: diffusers' alpha_pattern names
        # for them drop the projection's name, so it applies the common alpha there; inpaintd
        # follows the file.)
        tensors = load_file(str(lora_file))
        alphas = sorted(k for k in tensors if k.endswith(".alpha"))
        other = [k for k in alphas if k.startswith("lora_unet_down")][:3] + [k for k in alphas if "mlp_fc1" in k][:1]
        for k in other:
            tensors[k] = torch.tensor(8.0)
        for k in [k for k in alphas if k.startswith("lora_unet_up")][-4:]:
            del tensors[k]
        save_file(tensors, str(lora_file))
    scale = 0.7
    manifest = prepare_model(tiny_model_raw, tmp_path / "fused", PrepareOptions(dtype="fp32", loras=[f"{lora_file}:{scale}"]))
    params = InpaintParams(prompt="a window", negative_prompt="dark", scheduler="ddim", steps=3, guidance=6.0, strength=1.0, seed=9)
    ours = _ours(tmp_path / "fused", tmp_path, params)
    reference = _diffusers(tiny_model_raw, params, lora_file, scale)
    plain = _diffusers(tiny_model_raw, params, None, scale)
    assert np.abs(ours - plain).max() > 20, "the LoRA must change the picture, or equality proves nothing"
    assert np.abs(ours - reference).max() <= 1
    [record] = manifest["loras"]
    assert record["file"] == lora_file.name and record["scale"] == scale and record["layout"] == layout.split("-")[0]
    assert record["sha256"] == sha256_file(lora_file).sha256
    assert record["layers"]["unet"] > 0 and record["layers"]["text_encoder"] > 0
    assert "down_blocks.0.resnets.0.conv1.weight" in record["keys"]["unet"]
    assert any(k.endswith("self_attn.q_proj.weight") for k in record["keys"]["text_encoder"])


def test_fused_weights_are_the_base_plus_the_scaled_update_and_untouched_tensors_are_bit_identical(
    tiny_model_raw: Path, tmp_path: Path
) -> None:
    # Two LoRAs on overlapping layers add up; every tensor no LoRA names is copied exactly.
    from safetensors.torch import load_file

    a = build_random_lora(tiny_model_raw, tmp_path / "a.safetensors", rank=3, alpha=6.0, dtype="fp32", seed=1)
    b = build_random_lora(tiny_model_raw, tmp_path / "b.safetensors", rank=2, alpha=None, layout="peft",
                                     unet_targets=("to_q", "conv1"), dtype="fp32", seed=2)
    prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", loras=[f"{a}:0.5", f"{b}:-1.5"]))
    base = load_file(str(tiny_model_raw / "unet" / "diffusion_pytorch_model.safetensors"))
    fused = load_file(str(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors"))
    la, lb = load_file(str(a)), load_file(str(b))
    expected = {name: tensor.clone() for name, tensor in base.items()}
    for key in la:
        if key.endswith(".lora_down.weight"):
            stem = key[: -len(".lora_down.weight")]
            module = next(n for n in base if n.endswith(".weight") and n[:-7].replace(".", "_") == stem[len("lora_unet_"):])
            down, up = la[key], la[stem + ".lora_up.weight"]
            expected[module] += 0.5 * (6.0 / 3) * (up.flatten(1) @ down.flatten(1)).reshape(base[module].shape)
    for key in lb:
        if key.endswith(".lora_A.weight"):
            module = key[len("unet."): -len(".lora_A.weight")] + ".weight"
            down, up = lb[key], lb[key.replace("lora_A", "lora_B")]
            expected[module] += -1.5 * (up.flatten(1) @ down.flatten(1)).reshape(base[module].shape)
    changed = 0
    for name, tensor in fused.items():
        if torch.equal(expected[name], base[name]):
            assert torch.equal(tensor, base[name]), name
        else:
            changed += 1
            torch.testing.assert_close(tensor, expected[name], rtol=1e-5, atol=1e-6)
    assert changed > 10


def test_check_and_the_sidecar_report_the_fused_lora(tiny_model_raw: Path, tmp_path: Path) -> None:
    lora_file = build_random_lora(tiny_model_raw, tmp_path / "lcm.safetensors", rank=4, dtype="fp16")
    out = subprocess.run(
        [sys.executable, "-m", "inpaintd", "prepare-model", str(tiny_model_raw), str(tmp_path / "m"), "--dtype", "fp32",
         "--lora", f"{lora_file}:0.9"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "LoRA fused: lcm.safetensors x0.9 (kohya" in out.stdout
    check = subprocess.run([sys.executable, "-m", "inpaintd", "check", str(tmp_path / "m")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "LoRAs fused   lcm.safetensors x0.9 (kohya, rank" in check.stdout

    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "in.mask.png")
    run = subprocess.run(
        [sys.executable, "-m", "inpaintd", "process", str(tmp_path / "in.png"), "--mask", str(tmp_path / "in.mask.png"),
         "--model", str(tmp_path / "m"), "--steps", "1", "-o", str(tmp_path / "out.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    sidecar = json.loads((tmp_path / "out.json").read_text())
    [record] = sidecar["model"]["loras"]
    assert record["file"] == "lcm.safetensors" and record["scale"] == 0.9 and record["sha256"] == sha256_file(lora_file).sha256


def _mutations(header_keys: list[str], rng: random.Random):  # type: ignore[no-untyped-def]
    """One random way to break a LoRA file: (description, function over the tensor dict)."""
    key = rng.choice([k for k in header_keys if not k.endswith(".alpha")])
    choice = rng.randrange(6)
    if choice == 0:
        return f"drop {key}", lambda t: {k: v for k, v in t.items() if k != key}
    if choice == 1:
        return f"rename {key}", lambda t: {(k.replace("blocks", "blocks_x", 1) if k == key else k): v for k, v in t.items()}
    if choice == 2:
        return f"reshape {key}", lambda t: {k: (v[: max(1, v.shape[0] - 1)] if k == key else v) for k, v in t.items()}
    if choice == 3:
        return "add a LyCORIS key", lambda t: {**t, key.replace("lora_down", "hada_w1_a"): t[key]}
    if choice == 4:
        return "add an unknown tensor", lambda t: {**t, "something_else.weight": torch.zeros(2)}
    return "transpose", lambda t: {k: (v.transpose(0, 1).contiguous() if k == key else v) for k, v in t.items()}


def test_a_lora_that_does_not_fit_is_refused_with_its_keys_and_leaves_no_destination(tiny_model_raw: Path, tmp_path: Path) -> None:
    # Invariant over seeded random breakages of a good LoRA: prepare-model either fuses
    # (a breakage that still makes a valid LoRA) or raises ModelError naming what is wrong;
    # never another exception, never a destination or temp folder left behind.
    from safetensors.torch import load_file, save_file

    good = build_random_lora(tiny_model_raw, tmp_path / "good.safetensors", rank=4, dtype="fp32")
    tensors = load_file(str(good))
    rng = random.Random(14)
    refused = 0
    for i in range(24):
        what, mutate = _mutations(sorted(tensors), rng)
        bad = tmp_path / f"bad{i}.safetensors"
        save_file(mutate(tensors), str(bad))
        dst = tmp_path / f"out{i}"
        try:
            prepare_model(tiny_model_raw, dst, PrepareOptions(dtype="fp32", loras=[str(bad)]))
        except ModelError as exc:
            refused += 1
            assert bad.name in str(exc), (what, str(exc))
            assert not dst.exists(), what
        else:
            assert dst.is_dir()
    assert refused >= 18
    assert not [p.name for p in tmp_path.iterdir() if ".preparing-" in p.name]
    # A LoRA whose module names are another layout's (kohya's LDM names, as SDXL LoRAs have)
    # is refused naming them.
    ldm = {k.replace("lora_unet_down_blocks_", "lora_unet_input_blocks_"): v for k, v in tensors.items()}
    save_file(ldm, str(tmp_path / "ldm.safetensors"))
    with pytest.raises(ModelError, match=r"ldm.safetensors does not match this model.*lora_unet_input_blocks_"):
        prepare_model(tiny_model_raw, tmp_path / "x", PrepareOptions(dtype="fp32", loras=[str(tmp_path / "ldm.safetensors")]))
    assert not (tmp_path / "x").exists()


def test_only_safetensors_loras_are_read_and_the_scale_is_a_number(tmp_path: Path) -> None:
    pickle = tmp_path / "lora.pt"
    torch.save({"a": torch.zeros(1)}, pickle)
    with pytest.raises(ModelError, match="only .safetensors"):
        plan(LoraSpec(pickle), {})
    assert LoraSpec.parse("x.safetensors:0.25") == LoraSpec(Path("x.safetensors"), 0.25)
    assert LoraSpec.parse("x.safetensors") == LoraSpec(Path("x.safetensors"), 1.0)
    with pytest.raises(ModelError, match="must be a number"):
        LoraSpec.parse("x.safetensors:strong")


def _lora_with(tmp_path: Path, model: Path, name: str, change, metadata: dict | None = None) -> Path:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file, save_file

    good = build_random_lora(model, tmp_path / f"{name}-good.safetensors", rank=2, dtype="fp32",
                                        unet_targets=("to_q", "conv1"))
    tensors = change(load_file(str(good)))
    out = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(out), metadata=metadata)
    return out


def _first(tensors: dict, suffix: str) -> str:
    return sorted(k for k in tensors if k.endswith(suffix))[0]


@pytest.mark.parametrize("case", ["nan-alpha", "alpha-vector", "empty-alpha", "rank-0", "metadata-list",
                                  "metadata-alpha-text"])
def test_malformed_loras_are_refused_with_a_model_error(tiny_model_raw: Path, tmp_path: Path, case: str) -> None:
    def nan_alpha(t):  # type: ignore[no-untyped-def]
        t[_first(t, ".alpha")] = torch.tensor(float("nan"))
        return t

    def alpha_vector(t):  # type: ignore[no-untyped-def]
        t[_first(t, ".alpha")] = torch.ones(3)
        return t

    def empty_alpha(t):  # type: ignore[no-untyped-def]
        t[_first(t, ".alpha")] = torch.ones(0)
        return t

    def rank_0(t):  # type: ignore[no-untyped-def]
        down = _first(t, ".lora_down.weight")
        up = down.replace("lora_down", "lora_up")
        t[down] = t[down][:0].contiguous()
        t[up] = t[up][:, :0].contiguous()
        return t

    changes = {"nan-alpha": (nan_alpha, None), "alpha-vector": (alpha_vector, None), "empty-alpha": (empty_alpha, None),
               "rank-0": (rank_0, None),
               "metadata-list": (lambda t: t, {"lora_adapter_metadata": "[1, 2]"}),
               "metadata-alpha-text": (lambda t: t, {"lora_adapter_metadata": json.dumps({"unet.lora_alpha": "strong"})})}
    change, metadata = changes[case]
    bad = _lora_with(tmp_path, tiny_model_raw, case, change, metadata)
    with pytest.raises(ModelError, match=bad.name):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", loras=[str(bad)]))
    assert not (tmp_path / "out").exists()


def test_a_model_cannot_default_to_a_draft_decoder_it_does_not_have(tiny_model_raw: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="draft decoder"):
        prepare_model(tiny_model_raw, tmp_path / "out", PrepareOptions(dtype="fp32", defaults={"decoder": "draft"}))
    assert not (tmp_path / "out").exists()
