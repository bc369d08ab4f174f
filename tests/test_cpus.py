"""The CPUs people have (issue 21): bf16 decided from a given cpuinfo text and overridable; one
prepared folder for every CPU, shaped at load (bf16 derived into the cache, or 16-bit weights
upcast per layer), file-backed and painting what the machine's own fixed-dtype folder paints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inpaintd.core.config import ModelConfig
from inpaintd.core.jobs import InpaintParams
from inpaintd.engine import host
from inpaintd.engine.engine import Engine
from inpaintd.engine.host import bf16_in_use, cpu_facts, detect_dtype
from inpaintd.engine.memory import _file_mappings
from inpaintd.engine.weightpolicy import WeightForm, choose_weight_policy
from inpaintd.modelprep.check import check_model
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.weights.folder import inspect_model, prepared_dtype

CPUINFO = Path(__file__).parent / "fixtures" / "cpuinfo"
PI5 = (CPUINFO / "raspberry-pi5-cortex-a76.txt").read_text()
N100 = (CPUINFO / "intel-n100.txt").read_text()
XEON_AMX = (CPUINFO / "xeon-amx-kvm.txt").read_text()
EPYC = (CPUINFO / "amd-epyc-zen4-avx512bf16.txt").read_text()
PARAMS = InpaintParams(prompt="a red bicycle", negative_prompt="blurry", scheduler="euler", steps=3, guidance=7.5,
                       strength=1.0, seed=1234)


@pytest.fixture(autouse=True)
def _no_outside_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (host.BF16_ENV, "ONEDNN_MAX_CPU_ISA"):
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- host facts


@pytest.mark.parametrize(("text", "arch", "bf16", "isa", "vnni", "fp16"), [
    (PI5, "aarch64", False, "neon", True, True),
    (N100, "x86_64", False, "avx2", True, False),
    (XEON_AMX, "x86_64", True, "amx", True, True),
    (EPYC, "x86_64", True, "avx512", True, False),
    ("", "unknown", False, "none", False, False),
])
def test_cpu_facts_from_real_cpuinfo_texts(text: str, arch: str, bf16: bool, isa: str, vnni: bool, fp16: bool) -> None:
    facts = cpu_facts(text)
    assert (facts.arch, facts.bf16, facts.isa, facts.vnni, facts.fp16) == (arch, bf16, isa, vnni, fp16)
    assert detect_dtype(text) == ("bf16" if bf16 else "fp32")
    assert host.physical_cores(text) >= 1


def test_bf16_override_setting_env_and_onednn_cap() -> None:
    amx = cpu_facts(XEON_AMX)
    assert bf16_in_use("auto", amx, {}) is True
    assert bf16_in_use("ignore", amx, {}) is False
    assert bf16_in_use("use", cpu_facts(N100), {}) is True  # the operator's word wins
    assert bf16_in_use("auto", amx, {host.BF16_ENV: "0"}) is False
    assert bf16_in_use("auto", cpu_facts(PI5), {host.BF16_ENV: "1"}) is True
    assert bf16_in_use("use", amx, {host.BF16_ENV: "0"}) is True  # an explicit setting beats the environment
    assert bf16_in_use("auto", amx, {"ONEDNN_MAX_CPU_ISA": "avx2"}) is False  # oneDNN would emulate bf16
    assert bf16_in_use("auto", amx, {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_AMX"}) is True
    assert detect_dtype(XEON_AMX, setting="ignore") == "fp32"
    with pytest.raises(Exception, match="cpu_bf16"):
        bf16_in_use("no", amx, {})


@pytest.mark.parametrize(("bf16", "dtype", "weights", "folder", "compute", "load", "form"), [
    (True, "auto", "auto", "bf16", "bf16", "bf16", WeightForm.FILES),
    (True, "auto", "auto", "fp16", "bf16", "fp16", WeightForm.CACHE),
    (True, "auto", "auto", "fp32", "bf16", "fp32", WeightForm.CACHE),
    (False, "auto", "auto", "fp16", "fp32", "fp16", WeightForm.UPCAST),
    (False, "auto", "auto", "bf16", "fp32", "bf16", WeightForm.UPCAST),  # the folder a bf16 workstation wrote
    (False, "auto", "auto", "fp32", "fp32", "fp32", WeightForm.FILES),
    (False, "auto", "cache", "fp16", "fp32", "fp16", WeightForm.CACHE),
    (False, "auto", "files", "fp16", "fp32", "fp32", WeightForm.FILES),
    (True, "fp32", "auto", "fp16", "fp32", "fp16", WeightForm.UPCAST),
    (True, "auto", "upcast", "fp16", "bf16", "fp16", WeightForm.CACHE),  # upcast only means fp32 compute
])
def test_weight_policy(bf16: bool, dtype: str, weights: str, folder: str, compute: str, load: str,
                       form: WeightForm) -> None:
    policy = choose_weight_policy(bf16=bf16, dtype_setting=dtype, weights_setting=weights, folder_dtype=folder)
    assert (policy.compute, policy.load, policy.form) == (compute, load, form)
    assert policy.reason
    pickled = choose_weight_policy(bf16=bf16, dtype_setting=dtype, weights_setting=weights, folder_dtype=folder,
                                   mappable=False)
    assert pickled.form is WeightForm.FILES and pickled.load == compute


def test_prepared_dtype_keeps_the_published_precision() -> None:
    assert prepared_dtype("auto", "fp16") == "fp16"
    assert prepared_dtype("auto", "bf16") == "bf16"
    assert prepared_dtype("auto", "fp32") == "fp16"
    assert prepared_dtype("fp32", "fp16") == "fp32"
    with pytest.raises(ValueError):
        prepared_dtype("int4", "fp16")


# ----------------------------------------------------------------------------- one folder, any CPU


@pytest.fixture(scope="module")
def folders(tiny_model_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A published-fp16 source, its `--dtype auto` folder and the fixed forms a machine used to write."""
    root = tmp_path_factory.mktemp("cpus")
    src = root / "published-fp16"
    prepare_model(tiny_model_raw, src, PrepareOptions(dtype="fp16"))
    out = {"src": src}
    for name in ("auto", "bf16", "fp32"):
        out[name] = root / name
        prepare_model(src, out[name], PrepareOptions(dtype=name))
    return out


def _on_cpu(monkeypatch: pytest.MonkeyPatch, cpuinfo: str) -> None:
    monkeypatch.setattr(host, "_read_cpuinfo", lambda: cpuinfo)


def _paint(engine: Engine) -> np.ndarray:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return np.asarray(engine.inpaint(image, Image.fromarray(mask, "L"), PARAMS).image).astype(int)


def _load(folder: Path, cache: Path, **changes) -> Engine:
    return Engine.load(ModelConfig(path=folder, threads=1, cache_dir=cache, **changes))


def _unmapped(engine: Engine, form: WeightForm) -> list[str]:
    """Weights of the engine that are not views of a file mapping (an anonymous copy)."""
    mappings = _file_mappings()
    wanted = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    missing = []
    for component in ("unet", "vae", "text_encoder"):
        for prefix, module in getattr(engine.pipeline, component).named_modules():
            for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
                if tensor is None or not tensor.is_floating_point():
                    continue
                if form is WeightForm.UPCAST and not (name == "weight" and isinstance(module, wanted)):
                    continue  # norms and biases are converted in memory: small
                start = tensor.data_ptr()
                end = start + tensor.untyped_storage().nbytes()
                if not any(lo <= start and end <= hi for lo, hi, _ in mappings):
                    missing.append(f"{component}.{prefix}.{name}")
    return missing


def test_prepare_auto_writes_the_same_fp16_folder_on_every_cpu(folders: dict[str, Path], tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    manifests = []
    for cpuinfo in (XEON_AMX, N100):
        _on_cpu(monkeypatch, cpuinfo)
        manifests.append(prepare_model(folders["src"], tmp_path / str(len(manifests)), PrepareOptions(dtype="auto")))
    assert manifests[0]["dtype"] == manifests[1]["dtype"] == "fp16"
    assert manifests[0]["files"] == manifests[1]["files"]
    assert check_model(folders["auto"]) == [] and inspect_model(folders["auto"]).files_dtype == "fp16"


@pytest.mark.parametrize(("cpu", "own"), [(N100, "fp32"), (XEON_AMX, "bf16"), (PI5, "fp32"), (EPYC, "bf16")])
def test_an_auto_folder_paints_what_the_machines_own_folder_paints_from_mapped_weights(
        folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpu: str, own: str) -> None:
    _on_cpu(monkeypatch, cpu)
    portable = _load(folders["auto"], tmp_path / "a")
    fixed = _load(folders[own], tmp_path / "b")
    assert portable.info.dtype == fixed.info.dtype == own
    expected = WeightForm.CACHE if own == "bf16" else WeightForm.UPCAST
    assert portable.weight_policy.form is expected and fixed.weight_policy.form is WeightForm.FILES
    assert _unmapped(portable, expected) == []
    assert np.abs(_paint(portable) - _paint(fixed)).max() <= 1
    again = _load(folders["auto"], tmp_path / "a")  # the derived cache is reused, not rebuilt
    assert again.runtime_report()["derived_weights"] == portable.runtime_report()["derived_weights"]


def test_a_bf16_folder_copied_to_a_cpu_without_bf16_is_upcast_not_copied(
        folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _on_cpu(monkeypatch, N100)
    upcast = _load(folders["bf16"], tmp_path)
    converted = _load(folders["bf16"], tmp_path, weights="files")  # what diffusers' cast at load gives
    assert upcast.weight_policy.form is WeightForm.UPCAST and upcast.info.dtype == "fp32"
    assert _unmapped(upcast, WeightForm.UPCAST) == []
    assert _unmapped(converted, WeightForm.UPCAST), "diffusers' cast should have made anonymous copies"
    assert np.abs(_paint(upcast) - _paint(converted)).max() <= 1


def test_fp16_weights_computed_in_fp32_paint_what_fp32_weights_and_diffusers_fp32_paint(
        folders: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import EulerDiscreteScheduler, StableDiffusionInpaintPipeline

    _on_cpu(monkeypatch, N100)
    ours = _paint(_load(folders["auto"], tmp_path, channels_last=False))
    fp32 = _paint(_load(folders["fp32"], tmp_path, channels_last=False))
    assert np.abs(ours - fp32).max() <= 1
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(folders["src"]), torch_dtype=torch.float32, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    torch.set_num_threads(1)
    reference = pipe(prompt=PARAMS.prompt, negative_prompt=PARAMS.negative_prompt, image=image,
                     mask_image=Image.fromarray(mask, "L"), height=64, width=64, num_inference_steps=PARAMS.steps,
                     guidance_scale=PARAMS.guidance, strength=PARAMS.strength,
                     generator=torch.Generator("cpu").manual_seed(PARAMS.seed)).images[0]
    assert np.abs(ours - np.asarray(reference).astype(int)).max() <= 1


# ----------------------------------------------------------------------------- anonymous memory, measured

_MEASURE = r"""
import json, sys
from pathlib import Path
import numpy as np
from PIL import Image

def anon():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024

from inpaintd.core.config import ModelConfig
from inpaintd.core.jobs import InpaintParams
from inpaintd.engine.engine import Engine
import torch, diffusers, transformers  # noqa: F401  (their import cost is not the model's)
before = anon()
engine = Engine.load(ModelConfig(path=Path(sys.argv[1]), threads=1, cache_dir=Path(sys.argv[2]), weights=sys.argv[3]))
loaded = anon()
image = Image.new("RGB", (64, 64), (120, 130, 140))
mask = Image.new("L", (64, 64), 255)
engine.inpaint(image, mask, InpaintParams(prompt="x", negative_prompt="", scheduler="euler", steps=1, guidance=7.5,
                                          strength=1.0, seed=1))
unet = sum(p.numel() for p in engine._eager_unet.parameters()) + sum(b.numel() for b in engine._eager_unet.buffers())
print(json.dumps({"load": loaded - before, "job": anon() - before, "unet_fp32": unet * 4,
                  "form": engine.weight_policy.form.value}))
"""


@pytest.fixture(scope="module")
def medium_fp16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model whose UNet (96M parameters, 366 MiB in fp32) dwarfs a job's noise in anonymous memory."""
    from inpaintd.testing.models import build_model, preset_configs

    root = tmp_path_factory.mktemp("medium")
    configs = preset_configs("tiny")
    configs["unet"].update(block_out_channels=(320, 640), layers_per_block=1)
    raw = build_model(root / "raw", "medium", configs)
    out = root / "auto"
    prepare_model(raw, out, PrepareOptions(dtype="auto"))
    return out


@pytest.mark.parametrize("weights", ["auto", "files"])
def test_no_anonymous_copy_of_the_unet_measured(medium_fp16: Path, tmp_path: Path, weights: str) -> None:
    env = {"PATH": "/usr/bin:/bin", host.BF16_ENV: "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _MEASURE, str(medium_fp16), str(tmp_path), weights],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    if weights == "auto":
        assert got["form"] == "upcast"
        # The UNet's weights stay mapped 16-bit pages: what grows is norms, biases, one layer's
        # fp32 weight at a time and the job's activations, far below one copy of the UNet.
        assert got["load"] < 0.25 * got["unet_fp32"], got
        assert got["job"] < 0.5 * got["unet_fp32"], got
    else:  # the measurement sees a copy when there is one: diffusers' cast at load
        assert got["form"] == "files"
        assert got["load"] > 0.9 * got["unet_fp32"], got
