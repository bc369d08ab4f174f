"""`inpaintd check DIR`: what a prepared model is, in a few lines, from its files."""

from __future__ import annotations

from pathlib import Path

import torch
from inpaintd import cli
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.modelprep.summary import summarize
from inpaintd.testing.models import build_random_model
from inpaintd.testing.single_file import write_single_file
from inpaintd.weights.folder import WEIGHT_COMPONENTS
from safetensors.torch import save_file


def test_the_summary_of_the_tiny_model(tiny_model: Path) -> None:
    s = summarize(tiny_model)
    assert s.architecture == "unet9-32-64-x32" and s.unet_in_channels == 9 and s.cross_attention_dim == 32
    assert s.dtype == "fp32" and s.random_weights is True and s.vae is None and s.embeddings == []
    sizes = {c: sum(f.stat().st_size for f in (tiny_model / c).glob("*.safetensors")) for c in WEIGHT_COMPONENTS}
    assert s.component_bytes == sizes
    assert s.disk_bytes == sum(f.stat().st_size for f in tiny_model.rglob("*") if f.is_file())
    activations = 0.7 * 2**30 * 32 / 320 * 4 / 2
    assert s.job_512_bytes == int(0.3 * 2**30 + sizes["unet"] + sizes["vae"] + activations)


def test_bf16_needs_less_memory_than_fp32(tiny_model_raw: Path, tmp_path: Path) -> None:
    prepare_model(tiny_model_raw, tmp_path / "bf16", PrepareOptions(dtype="bf16"))
    prepare_model(tiny_model_raw, tmp_path / "fp32", PrepareOptions(dtype="fp32"))
    bf16, fp32 = (summarize(tmp_path / d) for d in ("bf16", "fp32"))
    assert bf16.dtype == "bf16" and bf16.job_512_bytes < fp32.job_512_bytes
    assert bf16.component_bytes["unet"] < fp32.component_bytes["unet"]


def test_check_prints_what_the_model_is(tiny_sd15_raw: Path, tiny_model_raw: Path, tmp_path: Path, capsys) -> None:
    emb = tmp_path / "neg.safetensors"
    save_file({"emb_params": torch.randn(2, 32)}, str(emb))
    single = write_single_file(tiny_sd15_raw, tmp_path / "t2i.safetensors")
    prepare_model(
        single, tmp_path / "out", PrepareOptions(dtype="fp32", config_dir=tiny_sd15_raw, embeddings=[str(emb)], vae=tiny_model_raw / "vae")
    )
    assert cli.main(["check", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"model {tmp_path / 'out'}: ok" in out
    assert "4 input channels: painted by latent blending" in out
    assert "a single-file checkpoint (sd15, fp32" in out
    assert f"swapped in from {(tiny_model_raw / 'vae').resolve()}" in out
    assert "embeddings    neg (2 vectors)" in out
    assert "RANDOM" in out and "512x512 job   about" in out


def test_check_names_a_merge(tiny_sd15_raw: Path, tiny_model_raw: Path, tmp_path: Path, capsys) -> None:
    base = build_random_model("tiny-sd15", tmp_path / "base", seed=5)
    prepare_model(tiny_sd15_raw, tmp_path / "out", PrepareOptions(dtype="fp32", make_inpainting=(tiny_model_raw, base)))
    assert cli.main(["check", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "add-difference merge" in out and "inpainting UNet, 9 input channels" in out


def test_a_tampered_model_is_not_summarised(tiny_model: Path, tmp_path: Path, capsys) -> None:
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(tiny_model, copy)
    (copy / "vae" / "config.json").write_text("{}")
    assert cli.main(["check", str(copy)]) == cli.EXIT_MODEL
    captured = capsys.readouterr()
    assert "vae/config.json: sha256" in captured.err and "architecture" not in captured.out
