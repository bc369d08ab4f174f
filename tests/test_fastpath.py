"""The fast path (issue 14): model defaults in the manifest, guidance <= 1 at batch 1, CFG cut-off
and step caching (DeepCache), on the real tiny engine."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from inpaintd.core.config import (
    BUILTIN_INFERENCE,
    InferenceConfig,
    ModelConfig,
    config_from_dict,
)
from inpaintd.core.errors import ModelError
from inpaintd.core.jobs import InpaintParams
from inpaintd.core.presets import parse_defaults, resolve
from inpaintd.engine.engine import Engine
from inpaintd.engine.schedulers import TCD_ETA
from inpaintd.engine.speedups import deepcache_helper
from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
from inpaintd.paint.jobspec import build_request
from inpaintd.testing.lora import build_random_lora
from inpaintd.testing.vae import build_random_tiny_vae
from inpaintd.weights.folder import MANIFEST_NAME, read_manifest


def _inputs(size: int = 64):
    from PIL import Image

    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: 3 * size // 4, size // 3: 2 * size // 3] = 255
    return image, Image.fromarray(mask, "L")


PARAMS = InpaintParams(prompt="a door", negative_prompt="blurry", scheduler="euler", steps=6, guidance=6.0,
                       strength=1.0, seed=11)


class UnetBatches:
    """The batch size of every UNet pass (a forward pre-hook on the engine's eager UNet)."""

    def __init__(self, engine: Engine) -> None:
        self.sizes: list[int] = []
        self.handle = engine._eager_unet.register_forward_pre_hook(lambda m, args: self.sizes.append(int(args[0].shape[0])))

    def __enter__(self) -> "UnetBatches":
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


_RAN: list[Any] = [{}]  # how the last _paint call ran (Painted.report)


def _paint(engine: Engine, params: InpaintParams) -> np.ndarray:
    image, mask = _inputs()
    painted = engine.inpaint(image, mask, params)
    _RAN[0] = painted.report
    return np.asarray(painted.image).astype(int)


def _ran() -> Any:
    """How the last painted crop ran: guidance batch, cut-off, step cache, decoder, eta."""
    return {**_RAN[0]}


def test_guidance_at_most_one_runs_the_unet_at_batch_one_and_the_report_says_so(tiny_engine: Engine) -> None:
    for guidance in (0.0, 1.0):
        with UnetBatches(tiny_engine) as batches:
            _paint(tiny_engine, replace(PARAMS, guidance=guidance))
        assert batches.sizes == [1] * PARAMS.steps
        report = _ran()["guidance"]
        assert report["unet_batch"] == 1 and report["classifier_free"] is False and report["cfg_steps"] == 0
    with UnetBatches(tiny_engine) as batches:
        _paint(tiny_engine, PARAMS)
    assert batches.sizes == [2] * PARAMS.steps
    assert _ran()["guidance"]["unet_batch"] == 2


def test_a_negative_prompt_is_reported_used_only_where_it_changes_the_picture(tiny_engine: Engine) -> None:
    """Issue 22 (an option reported as applied without effect): at guidance <= 1 diffusers never
    reads the negative prompt; the report says so, and the pixels show it."""
    for guidance, used in ((1.0, False), (PARAMS.guidance, True)):
        plain = _paint(tiny_engine, replace(PARAMS, guidance=guidance, negative_prompt=""))
        assert _ran()["guidance"]["negative_prompt_used"] is False
        negative = _paint(tiny_engine, replace(PARAMS, guidance=guidance, negative_prompt="blurry, dark"))
        assert _ran()["guidance"]["negative_prompt_used"] is used
        assert np.array_equal(plain, negative) is not used, guidance


def test_cfg_cutoff_guides_exactly_the_steps_diffusers_cutoff_callback_would(tiny_engine: Engine) -> None:
    # diffusers' SDCFGCutoffCallback drops guidance at the end of step int(steps * ratio); the
    # steps up to and including it run at batch 2, the rest at batch 1. Seeded random cases.
    rng = random.Random(14)
    full = _paint(tiny_engine, PARAMS)
    for _ in range(6):
        steps = rng.randint(2, 8)
        ratio = rng.choice([0.0, 0.25, 0.4, 0.5, 0.75, 0.99, 1.0])
        params = replace(PARAMS, steps=steps, cfg_cutoff=ratio)
        with UnetBatches(tiny_engine) as batches:
            _paint(tiny_engine, params)
        guided = min(steps, int(steps * ratio) + 1)
        assert batches.sizes == [2] * guided + [1] * (steps - guided), (steps, ratio)
        report = _ran()["guidance"]
        assert (report["cfg_steps"], report["batch1_steps"]) == (guided, steps - guided)
    # No cut-off (1.0) paints exactly what the plain run paints; a real cut-off changes the picture.
    assert np.array_equal(_paint(tiny_engine, replace(PARAMS, cfg_cutoff=1.0)), full)
    assert not np.array_equal(_paint(tiny_engine, replace(PARAMS, cfg_cutoff=0.5)), full)


def test_cfg_cutoff_also_works_for_a_4_channel_model(tiny_sd15_raw: Path, tmp_path: Path) -> None:
    # The 4-channel path keeps a CFG-batched mask for latent blending: trimmed with the embeddings.
    engine = Engine.load(ModelConfig(path=tiny_sd15_raw, dtype="fp32", threads=1, cache_dir=tmp_path, channels_last=False))
    with UnetBatches(engine) as batches:
        out = _paint(engine, replace(PARAMS, steps=4, cfg_cutoff=0.5))
    assert batches.sizes == [2, 2, 2, 1] and out.shape == (64, 64, 3)


def test_step_cache_interval_one_paints_exactly_the_uncached_pixels(tiny_engine: Engine) -> None:
    uncached = _paint(tiny_engine, PARAMS)
    helper = deepcache_helper(tiny_engine, 1)
    helper.enable()
    try:
        cached = _paint(tiny_engine, PARAMS)
    finally:
        helper.disable()
    assert np.array_equal(cached, uncached)
    assert np.array_equal(_paint(tiny_engine, PARAMS), uncached)  # disabling restored the plain UNet


def test_step_cache_skips_the_deep_blocks_between_full_steps(tiny_engine: Engine) -> None:
    deep: list[int] = []
    handle = tiny_engine._eager_unet.mid_block.resnets[0].register_forward_hook(lambda *a: deep.append(1))
    try:
        plain = _paint(tiny_engine, PARAMS)
        assert len(deep) == PARAMS.steps
        deep.clear()
        cached = _paint(tiny_engine, replace(PARAMS, step_cache=3))
    finally:
        handle.remove()
    assert len(deep) == 2  # steps 0 and 3 of 6 in full
    report = _ran()["step_cache"]
    assert report == {"method": "deepcache", "interval": 3, "full_steps": 2, "cached_steps": 4}
    assert not np.array_equal(cached, plain)
    assert np.array_equal(_paint(tiny_engine, PARAMS), plain)  # the next job runs uncached again


def test_step_cache_with_a_cfg_cutoff_recomputes_in_full_after_the_cut(tiny_engine: Engine) -> None:
    deep: list[int] = []
    handle = tiny_engine._eager_unet.mid_block.resnets[0].register_forward_hook(lambda m, a, out: deep.append(out.shape[0]))
    try:
        with UnetBatches(tiny_engine) as batches:
            _paint(tiny_engine, replace(PARAMS, steps=8, step_cache=3, cfg_cutoff=0.25))
    finally:
        handle.remove()
    assert batches.sizes == [2, 2, 2, 1, 1, 1, 1, 1]
    # full at step 0 (batch 2), then re-anchored at step 3 after the cut (batch 1), then step 6
    assert deep == [2, 1, 1]


# ----------------------------------------------------------------------------- model defaults


def test_settings_come_from_the_job_then_the_config_then_the_model_then_the_builtin_defaults() -> None:
    # Invariant over seeded random combinations of who sets what.
    rng = random.Random(7)
    candidates = {"scheduler": ["lcm", "euler", "ddim"], "steps": [2, 4, 30], "guidance": [0.0, 1.5, 8.0],
                  "strength": [0.5, 1.0], "negative_prompt": ["", "dark"], "cfg_cutoff": [0.3, 1.0], "step_cache": [1, 3]}
    for _ in range(200):
        job = {k: rng.choice(v) for k, v in candidates.items() if rng.random() < 0.3}
        conf = {k: rng.choice(v) for k, v in candidates.items() if rng.random() < 0.3}
        model = {k: rng.choice(v) for k, v in candidates.items() if rng.random() < 0.5}
        values, sources = resolve(job, InferenceConfig(**conf), model)
        for key, builtin in BUILTIN_INFERENCE.items():
            expected = next(((s, d[key]) for s, d in (("job", job), ("config", conf), ("model", model)) if key in d),
                            ("builtin", builtin))
            assert (sources[key], values[key]) == expected


def test_a_prepared_lcm_model_paints_with_its_defaults_unless_the_config_or_job_says_otherwise(
    tiny_model_raw: Path, tmp_path: Path
) -> None:
    lcm = build_random_lora(tiny_model_raw, tmp_path / "lcm.safetensors", rank=4)
    out = subprocess.run(
        [sys.executable, "-m", "inpaintd", "prepare-model", str(tiny_model_raw), str(tmp_path / "m"), "--dtype", "fp32",
         "--lora", str(lcm), "--preset", "lcm", "--defaults", "steps=6", "negative_prompt=blurry"],
        capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    manifest = read_manifest(tmp_path / "m")
    assert manifest is not None
    assert manifest["defaults"] == {"scheduler": "lcm", "steps": 6, "guidance": 1.0, "negative_prompt": "blurry"}
    image, mask = _inputs()
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "in.mask.png")
    base = [sys.executable, "-m", "inpaintd", "process", str(tmp_path / "in.png"), "--mask", str(tmp_path / "in.mask.png"),
            "--model", str(tmp_path / "m"), "--prompt", "a door"]
    run = subprocess.run(base + ["-o", str(tmp_path / "a.png")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    sidecar = json.loads((tmp_path / "a.json").read_text())
    p = sidecar["parameters"]
    assert (p["scheduler"], p["steps"], p["guidance"], p["negative_prompt"]) == ("lcm", 6, 1.0, "blurry")
    assert sidecar["parameter_sources"]["steps"] == "model" and sidecar["parameter_sources"]["strength"] == "builtin"
    assert sidecar["runtime"]["guidance"]["unet_batch"] == 1 and sidecar["runtime"]["guidance"]["cfg_steps"] == 0
    # A config that sets steps and a job option that sets guidance win over the model.
    (tmp_path / "c.yaml").write_text("inference:\n  steps: 3\n")
    run = subprocess.run(base + ["--config", str(tmp_path / "c.yaml"), "--guidance", "2.5", "-o", str(tmp_path / "b.png")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    sidecar = json.loads((tmp_path / "b.json").read_text())
    assert (sidecar["parameters"]["steps"], sidecar["parameters"]["guidance"], sidecar["parameters"]["scheduler"]) == (3, 2.5, "lcm")
    assert sidecar["parameter_sources"]["steps"] == "config" and sidecar["parameter_sources"]["guidance"] == "job"
    assert sidecar["runtime"]["guidance"]["unet_batch"] == 2
    check = subprocess.run([sys.executable, "-m", "inpaintd", "check", str(tmp_path / "m")], capture_output=True, text=True)
    assert "defaults      guidance=1.0, negative_prompt=blurry, scheduler=lcm, steps=6" in check.stdout


def test_bad_defaults_are_refused_when_preparing_and_when_loading(tiny_model: Path, tmp_path: Path) -> None:
    for pairs in (["steps=0"], ["scheduler=fast"], ["colour=red"], ["guidance=much"], ["steps"]):
        with pytest.raises(ModelError):
            parse_defaults(None, pairs)
    with pytest.raises(ModelError, match="unknown"):
        parse_defaults("turbo", [])
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    manifest = json.loads((broken / MANIFEST_NAME).read_text())
    manifest["defaults"] = {"steps": "many"}
    (broken / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="inference defaults are invalid"):
        Engine.load(ModelConfig(path=broken, dtype="fp32", threads=1, cache_dir=tmp_path))


def test_job_files_may_ask_for_a_cutoff_and_caching_and_bad_values_fail_the_job(tmp_path: Path) -> None:
    from inpaintd.core.errors import JobError

    config = config_from_dict({"inference": {"cfg_cutoff": 0.5}})
    request = build_request("a", tmp_path / "a.png", None, {"step_cache": 3}, config,
                                    model_defaults={"steps": 4})
    assert (request.params.cfg_cutoff, request.params.step_cache, request.params.steps) == (0.5, 3, 4)
    assert request.sources["cfg_cutoff"] == "config" and request.sources["step_cache"] == "job"
    for bad in ({"cfg_cutoff": 1.5}, {"step_cache": 0}, {"step_cache": "often"}):
        with pytest.raises(JobError):
            build_request("a", tmp_path / "a.png", None, bad, config)


# ----------------------------------------------------------------------------- draft decoder


def test_the_draft_decoder_paints_what_diffusers_latents_through_autoencoder_tiny_give(
    tiny_model_raw: Path, tmp_path: Path
) -> None:
    import torch
    from diffusers import (
        AutoencoderTiny,
        EulerDiscreteScheduler,
        StableDiffusionInpaintPipeline,
    )

    tiny_vae = build_random_tiny_vae(tmp_path / "taesd")
    manifest = prepare_model(tiny_model_raw, tmp_path / "m", PrepareOptions(dtype="fp32", draft_decoder=tiny_vae))
    assert manifest["extras"]["draft_decoder"]["quality"].startswith("draft")
    engine = Engine.load(ModelConfig(path=tmp_path / "m", dtype="fp32", threads=1, cache_dir=tmp_path, channels_last=False))
    assert engine.has_draft_decoder
    params = replace(PARAMS, decoder="draft", steps=3)
    ours = _paint(engine, params)
    assert _ran()["decoder"].startswith("draft")
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(tiny_model_raw), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = _inputs()
    latents = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, image=image, mask_image=mask, height=64,
                   width=64, num_inference_steps=params.steps, guidance_scale=params.guidance, output_type="latent",
                   generator=torch.Generator("cpu").manual_seed(params.seed)).images
    decoder = AutoencoderTiny.from_pretrained(str(tiny_vae))
    with torch.inference_mode():
        reference = pipe.image_processor.postprocess(decoder.decode(latents).sample, output_type="pil")[0]
    assert np.abs(ours - np.asarray(reference).astype(int)).max() <= 1
    assert not np.array_equal(ours, _paint(engine, replace(params, decoder="full")))


def test_a_draft_job_on_a_model_without_a_draft_decoder_fails_with_a_reason(tiny_engine: Engine, tmp_path: Path) -> None:
    from inpaintd.core.errors import JobError
    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request

    image, mask = _inputs()
    image.save(tmp_path / "a.png")
    mask.save(tmp_path / "a.mask.png")
    config = config_from_dict({})
    request = build_request("a", tmp_path / "a.png", tmp_path / "a.mask.png", {"decoder": "draft"}, config)
    with pytest.raises(JobError) as caught:
        run_job(tiny_engine, request, config)
    assert caught.value.code == "options_invalid" and "--draft-decoder" in str(caught.value)


@pytest.mark.parametrize("scheduler", ["dpmpp_2m_karras", "dpmpp_2m", "euler_a", "euler", "ddim", "unipc", "lcm", "tcd", "pndm"])
def test_every_scheduler_runs_with_a_cutoff_and_step_caching(tiny_engine: Engine, scheduler: str) -> None:
    params = replace(PARAMS, scheduler=scheduler, steps=5, cfg_cutoff=0.5, step_cache=2, strength=0.8)
    with UnetBatches(tiny_engine) as batches:
        out = _paint(tiny_engine, params)
    assert out.shape == (64, 64, 3)
    report = _ran()
    assert report["step_cache"]["method"] == "deepcache"
    guided = report["guidance"]["cfg_steps"]
    assert batches.sizes == [2] * guided + [1] * report["guidance"]["batch1_steps"] and 0 < guided < len(batches.sizes)


def test_tcd_paints_what_diffusers_paints_with_the_tcd_authors_eta(tiny_model_raw: Path, tmp_path: Path) -> None:
    """The inpainting pipeline passes its own eta=0.0 to the scheduler; TCD is meant to run at 0.3."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, TCDScheduler

    engine = Engine.load(ModelConfig(path=tiny_model_raw, dtype="fp32", threads=1, cache_dir=tmp_path, channels_last=False))
    params = replace(PARAMS, scheduler="tcd", steps=4, guidance=1.5, strength=1.0)
    ours = _paint(engine, params)
    pipe = StableDiffusionInpaintPipeline.from_pretrained(
        str(tiny_model_raw), safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    image, mask = _inputs()

    def reference(eta: float) -> np.ndarray:
        out = pipe(prompt=params.prompt, negative_prompt=params.negative_prompt, image=image, mask_image=mask, height=64,
                   width=64, num_inference_steps=params.steps, guidance_scale=params.guidance, strength=params.strength,
                   eta=eta, generator=torch.Generator("cpu").manual_seed(params.seed)).images[0]
        return np.asarray(out).astype(int)

    assert _ran()["eta"] == TCD_ETA == 0.3
    assert np.abs(ours - reference(TCD_ETA)).max() <= 1
    assert np.abs(ours - reference(0.0)).max() > 1, "eta makes no difference here: the test proves nothing"
