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
