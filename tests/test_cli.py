"""The `inpaintd` entry point as a user runs it: real subprocesses, real files, documented exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

SAMPLES = Path(__file__).resolve().parents[1] / "daemon" / "inpaintd" / "demo" / "samples"
INPAINTD = [sys.executable, "-m", "inpaintd"]


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*INPAINTD, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def small_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("roi: {min_size: 64, max_size: 128, bucket_sides: [64, 128]}\ninference: {steps: 2}\nmodel: {threads: 1}\n")
    return path


def test_every_subcommand_has_help() -> None:
    for command in ("process", "prepare-model", "check", "run", "status", "demo"):
        result = cli(command, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: inpaintd " + command in result.stdout


def test_process_writes_the_image_the_sidecar_and_the_overlay(tiny_model: Path, tmp_path: Path) -> None:
    for name in ("sample.png", "sample.mask.png"):
        shutil.copy(SAMPLES / name, tmp_path / name)
    out = tmp_path / "result.png"
    result = cli(
        "process", str(tmp_path / "sample.png"), "--mask", str(tmp_path / "sample.mask.png"),
        "--prompt", "sky", "--model", str(tiny_model), "--seed", "5", "-o", str(out),
        "--config", str(small_config(tmp_path)), "--debug-overlay",
    )
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS" in result.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["seed"] == 5
    assert sidecar["parameters"]["prompt"] == "sky"
    assert sidecar["model"]["random_weights"] is True
    assert sidecar["regions"] and all(len(r["crop_box"]) == 4 for r in sidecar["regions"])
    assert Image.open(out).size == Image.open(SAMPLES / "sample.png").size
    assert Image.open(out.with_suffix(".overlay.png")).size == Image.open(out).size
    assert not list(tmp_path.glob(".inpaintd-tmp-*")), "no temp file left behind"


def test_a_bad_mask_exits_1_with_the_code(tiny_model: Path, tmp_path: Path) -> None:
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.zeros((16, 32), np.uint8)).save(tmp_path / "a.mask.png")
    result = cli("process", str(tmp_path / "a.png"), "--mask", str(tmp_path / "a.mask.png"), "--model", str(tiny_model))
    assert result.returncode == 1
    assert "mask_size_mismatch" in result.stderr
    assert not (tmp_path / "a.inpainted.png").exists()


def test_a_config_error_exits_2_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("inference: {steps: 0}\n")
    result = cli("process", str(SAMPLES / "sample.png"), "--config", str(bad))
    assert result.returncode == 2
    assert "inference.steps" in result.stderr


def test_a_missing_model_exits_3(tmp_path: Path) -> None:
    result = cli("process", str(SAMPLES / "sample.png"), "--mask", str(SAMPLES / "sample.mask.png"), "--model", str(tmp_path / "nope"))
    assert result.returncode == 3
    assert "model" in result.stderr


def test_an_unwritable_output_exits_4(tiny_model: Path, tmp_path: Path) -> None:
    result = cli(
        "process", str(SAMPLES / "sample.png"), "--mask", str(SAMPLES / "sample.mask.png"),
        "--model", str(tiny_model), "--config", str(small_config(tmp_path)),
        "-o", str(tmp_path / "missing-dir" / "out.png"),
    )
    assert result.returncode == 4, result.stderr
    assert "output_unwritable" in result.stderr


def test_prepare_model_and_check_round_trip(tiny_model_raw: Path, tmp_path: Path) -> None:
    dst = tmp_path / "prepared"
    result = cli("prepare-model", str(tiny_model_raw), str(dst), "--dtype", "bf16")
    assert result.returncode == 0, result.stderr
    assert "RANDOM WEIGHTS" in result.stdout
    assert cli("check", str(dst)).returncode == 0
    weights = next(dst.glob("unet/*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    tampered = cli("check", str(dst))
    assert tampered.returncode == 3
    assert "sha256" in tampered.stderr or "hash" in tampered.stderr


# ------------------------------------------------------------- issue 22 through the real CLI


def _mask_file(path: Path, size: tuple[int, int], box: tuple[int, int, int, int]) -> Path:
    mask = np.zeros((size[1], size[0]), np.uint8)
    mask[box[1]:box[3], box[0]:box[2]] = 255
    Image.fromarray(mask).save(path)
    return path


def test_hostile_jobs_through_process_exit_with_their_code(tiny_model: Path, tmp_path: Path) -> None:
    """Issue 22 items 5, 6 and 8 as a user meets them: an RGB-coded JPEG is painted and re-encoded
    (never spliced as YCbCr), a JPEG with a third of its scans cut out before EOI fails
    image_unreadable, `--scheduler lcm --steps 60` fails options_invalid (not internal_error)."""
    from test_images import JPEG_VARIANTS, entropy_coded, photo_jpeg
    from test_jpeg_lossless import photo, rgb_coded

    config = str(small_config(tmp_path))
    rgb = tmp_path / "rgb.jpg"
    rgb.write_bytes(rgb_coded(photo(96, 80)))
    mask = _mask_file(tmp_path / "m96.png", (96, 80), (40, 30, 50, 40))
    out = tmp_path / "rgb.out.jpg"
    result = cli("process", str(rgb), "--mask", str(mask), "--model", str(tiny_model), "--config", config, "-o", str(out))
    assert result.returncode == 0, result.stderr
    output = json.loads(out.with_suffix(".json").read_text())["output"]
    assert output["jpeg_mode"] == "reencoded" and "component ids R, G, B" in output["jpeg_reason"], output

    data = photo_jpeg(*JPEG_VARIANTS["baseline 4:2:0"])
    start, end = entropy_coded(data)
    third = (end - start) // 3
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: start + third] + data[start + 2 * third :])
    mask = _mask_file(tmp_path / "m152.png", (152, 120), (40, 30, 60, 50))
    result = cli("process", str(cut), "--mask", str(mask), "--model", str(tiny_model), "--config", config)
    assert result.returncode == 1 and "image_unreadable" in result.stderr, result.stderr
    assert not list(tmp_path.glob("cut.inpainted*"))

    result = cli("process", str(cut), "--mask", str(mask), "--model", str(tiny_model), "--config", config,
                 "--scheduler", "lcm", "--steps", "60")
    assert result.returncode == 1 and "options_invalid" in result.stderr and "50" in result.stderr, result.stderr


def test_hostile_models_are_model_errors_with_exit_3(tiny_model_raw: Path, tiny_model: Path, tmp_path: Path) -> None:
    """Issue 22 items 9 and 10 as an operator meets them: NaN weights and an embedding of more
    vectors than CLIP reads are refused by `prepare-model` with exit 3 and a sentence, and
    `check` fails a prepared folder whose weights went non-finite."""
    import torch
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_raw, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    state = load_file(str(weights))
    state["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    result = cli("prepare-model", str(broken), str(tmp_path / "out"))
    assert result.returncode == 3 and "NaN or infinite" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()

    hidden = json.loads((tiny_model_raw / "text_encoder" / "config.json").read_text())["hidden_size"]
    many = tmp_path / "many.safetensors"
    save_file({"emb_params": torch.randn(76, hidden)}, str(many))
    result = cli("prepare-model", str(tiny_model_raw), str(tmp_path / "out2"), "--embedding", str(many))
    assert result.returncode == 3 and "76" in result.stderr and "Traceback" not in result.stderr, result.stderr

    copy = tmp_path / "prepared"
    shutil.copytree(tiny_model, copy)
    target = next((copy / "unet").glob("*.safetensors"))
    state = load_file(str(target))
    state["conv_out.weight"][0, 0, 0, 0] = float("inf")
    save_file(state, str(target), metadata={"format": "pt"})
    result = cli("check", str(copy))
    assert result.returncode != 0 and "NaN or infinite" in (result.stdout + result.stderr), result.stdout
