#!/usr/bin/env python3
"""Benchmark inpaintd against plain diffusers, side by side, each run in a fresh process.

    scripts/bench.py compare [--steps 5] [--configs diffusers,diffusers_crop,inpaintd] [--inputs square,photo1,photo2]
    scripts/bench.py levers  --steps 4 --variants 'bf16:inpaintd' 'fp32:inpaintd,model.dtype=fp32' ...
    scripts/bench.py memcap  [--caps 4,2,1.5,1.25] [--steps 20] [--variant 'inpaintd'] [--drop-caches]
    scripts/bench.py coldstart [--drop-caches]
    scripts/bench.py longrun [--jobs 200]
    scripts/bench.py report  bench-out/*.json         # markdown tables from raw results

Every measured run is a child process (`bench.py child ...`) started fresh, so nothing is
shared between configurations: not the page-table state of the weights, not the allocator's
free lists, not oneDNN's kernel caches. The parent records the child's peak RSS from wait4()
(ru_maxrss); the child samples /proc/self/status every 20 ms to split the peak into
anonymous and file-backed memory and writes its timings as one JSON line.

A *variant* is ``label:kind[,key=value...]``:

- kind: ``diffusers`` (StableDiffusionInpaintPipeline.from_pretrained on the fp16 folder, as a user
  calls it: default dtype, the whole image resized to 512x512 and the result resized back),
  ``diffusers_crop`` (the same, with ``padding_mask_crop``), ``inpaintd`` (Engine.load on the
  prepared model + run_job: ROI slicing and the engine's runtime policy),
  ``engine`` (Engine.inpaint on the input as is; isolates the engine for lever studies).
- ``model.FIELD=VALUE``: a ModelConfig field (dtype, threads, attention_slicing, vae_tiling, ...).
- ``roi.FIELD=VALUE``: a RoiConfig field.
- ``env.NAME=VALUE``: environment variable for the child (OMP, oneDNN, glibc malloc tunables).
- ``preload=jemalloc|tcmalloc|PATH``: LD_PRELOAD an allocator.
- ``job.KEY=VALUE``: a job option (steps, guidance, scheduler, cfg_cutoff, step_cache, decoder);
  the diffusers kinds take steps, guidance and scheduler. ``model.path=DIR`` picks another
  prepared model for inpaintd; ``model.dtype=bf16`` loads plain diffusers in bf16.
- ``patch.NAME=VALUE``: bench-side experiments on the loaded pipeline: channels_last=1 (module
  weights and inputs, for the diffusers kinds; inpaintd has model.channels_last), vae_tile=SIDE
  (VAE tiles of SIDE px even at 512), trim=1 (malloc_trim after each VAE/UNet call),
  sdpa=math|flash|efficient, tome=RATIO (tomesd.apply_patch, token merging).

Inputs are synthetic and deterministic (a smooth "photo" with texture; masks are blobs), so a
run is reproducible anywhere. Weights are random: these numbers say nothing about quality.
Raw results go to bench-out/ (git-ignored); BENCHMARKS.md holds the committed tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "daemon"))

MODELS = Path(os.environ.get("BENCH_MODELS", ROOT / "models"))
DEFAULT_FP16 = MODELS / "sd15-inpaint-fp16"
DEFAULT_PREPARED = MODELS / "sd15-inpaint-fp16-bf16"
OUT = Path(os.environ.get("BENCH_OUT", ROOT / "bench-out"))
PROMPT = "a red brick wall, photo"
SEED = 1234
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
ALLOCATORS = {
    "jemalloc": ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"),
    "tcmalloc": (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    ),
}

# ----------------------------------------------------------------------------- inputs

# name -> (size, list of mask blobs (cx, cy, rx, ry)), file format
INPUTS: dict[str, tuple[tuple[int, int], list[tuple[int, int, int, int]], str]] = {
    "square": ((512, 512), [(256, 256, 90, 70)], "png"),
    "photo1": ((4000, 3000), [(2000, 1500, 110, 80)], "jpg"),
    "photo2": ((4000, 3000), [(600, 500, 110, 80), (3400, 2500, 110, 80)], "jpg"),
}


def make_inputs(folder: Path) -> dict[str, tuple[Path, Path]]:
    """Write each input's image and mask once (deterministic); return name -> (image, mask)."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, tuple[Path, Path]] = {}
    for name, ((w, h), blobs, fmt) in INPUTS.items():
        image_path = folder / f"{name}.{fmt}"
        mask_path = folder / f"{name}.mask.png"
        out[name] = (image_path, mask_path)
        if image_path.exists() and mask_path.exists():
            continue
        rng = np.random.default_rng(7)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        r = 127 + 90 * np.sin(xx / (w / 5.3)) * np.cos(yy / (h / 3.1))
        g = 120 + 80 * np.cos((xx + yy) / (w / 4.7))
        b = 110 + 70 * np.sin(yy / (h / 6.9) + 1.0)
        pixels = np.stack([r, g, b], axis=-1)
        pixels += rng.normal(0, 6, size=pixels.shape).astype(np.float32)  # sensor-like texture
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(
            image_path, **({"quality": 92} if fmt == "jpg" else {})
        )
        mask = np.zeros((h, w), dtype=np.uint8)
        for cx, cy, rx, ry in blobs:
            inside = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0
            mask[inside] = 255
        Image.fromarray(mask).save(mask_path)
    return out


# ----------------------------------------------------------------------------- variants


@dataclass
class Variant:
    label: str
    kind: str
    model: dict[str, Any] = field(default_factory=dict)
    roi: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    patch: dict[str, str] = field(default_factory=dict)
    preload: str | None = None
    job: dict[str, Any] = field(default_factory=dict)

    def spec(self) -> str:
        parts = [f"{self.label}:{self.kind}"]
        parts += [f"job.{k}={v}" for k, v in self.job.items()]
        parts += [f"model.{k}={v}" for k, v in self.model.items()]
        parts += [f"roi.{k}={v}" for k, v in self.roi.items()]
        parts += [f"env.{k}={v}" for k, v in self.env.items()]
        parts += [f"patch.{k}={v}" for k, v in self.patch.items()]
        if self.preload:
            parts.append(f"preload={self.preload}")
        return ",".join(parts)


KINDS = ("diffusers", "diffusers_crop", "inpaintd", "engine")


def _coerce(value: str) -> Any:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(value)
    except ValueError:
        pass
    try:
        return float(value)
    except ValueError:
        return value


def parse_variant(text: str) -> Variant:
    head, *rest = [p for p in text.split(",") if p]
    label, _, kind = head.partition(":")
    kind = kind or label
    if kind not in KINDS:
        raise SystemExit(f"unknown kind {kind!r} in {text!r} (known: {', '.join(KINDS)})")
    v = Variant(label=label, kind=kind)
    for part in rest:
        key, eq, value = part.partition("=")
        if not eq:
            raise SystemExit(f"{part!r} in {text!r} is not key=value")
        if key.startswith("model."):
            v.model[key[6:]] = _coerce(value)
        elif key.startswith("roi."):
            v.roi[key[4:]] = _coerce(value)
        elif key.startswith("env."):
            v.env[key[4:]] = value
        elif key.startswith("patch."):
            v.patch[key[6:]] = value
        elif key.startswith("job."):
            v.job[key[4:]] = _coerce(value)
        elif key == "preload":
            v.preload = value
        else:
            raise SystemExit(f"unknown key {key!r} in {text!r}")
    return v


def allocator_path(name: str) -> str:
    for candidate in ALLOCATORS.get(name, (name,)):
        if Path(candidate).exists():
            return candidate
    raise SystemExit(f"allocator {name!r} not found (apt-get install libjemalloc2 libtcmalloc-minimal4)")


# ----------------------------------------------------------------------------- child side


class MemorySampler:
    """Samples /proc/self/status every `period` s; keeps the peak of each field per phase."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self, period: float = 0.02) -> None:
        self.period = period
        self.phase = "import"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        values: dict[str, int] = {}
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in MemorySampler.FIELDS or key == "VmHWM":
                    values[key] = int(rest.split()[0]) * 1024
        return values

    def sample(self) -> None:
        now = self.read()
        peaks = self.peaks.setdefault(self.phase, {})
        for key in self.FIELDS:
            if now.get(key, 0) > peaks.get(key, 0):
                peaks[key] = now[key]

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            self.sample()

    def start(self) -> "MemorySampler":
        self.sample()
        self._thread.start()
        return self

    def set_phase(self, phase: str) -> None:
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join()


class StepClock:
    """Wall and process-CPU time at every step callback (CPU time is less disturbed by other load)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.cpu: list[float] = []

    def tick(self, *_: Any) -> None:
        self.times.append(time.monotonic())
        self.cpu.append(time.process_time())


def _apply_patches(pipe: Any, patch: dict[str, str], report: dict[str, Any]) -> None:
    """Bench-side experiments on a loaded pipeline (candidates for engine options)."""
    import torch

    if patch.get("channels_last") in ("1", "true"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if patch.get("vae_tile"):
        side = int(patch["vae_tile"])
        pipe.vae.enable_tiling()
        pipe.vae.tile_sample_min_size = side
        pipe.vae.tile_latent_min_size = side // 8
    if patch.get("trim") in ("1", "true"):
        # malloc_trim(0) after each VAE pass and UNet call: hands glibc's free arena pages back.
        import ctypes

        libc = ctypes.CDLL("libc.so.6")

        def trim(*_: Any) -> None:
            libc.malloc_trim(0)

        for module in (pipe.vae.encoder, pipe.vae.decoder, pipe.unet):
            module.register_forward_hook(trim)
    if patch.get("sdpa"):
        backend = patch["sdpa"]
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[
            backend
        ]
        ctx = sdpa_kernel([chosen])
        ctx.__enter__()  # for the life of this child process
    if patch.get("vae_slicing") in ("1", "true"):
        pipe.vae.enable_slicing()
    if patch.get("tome"):
        import tomesd

        tomesd.apply_patch(pipe, ratio=float(patch["tome"]))
        report["tome_ratio"] = float(patch["tome"])


class PhaseTimer:
    """Wall seconds spent inside each model part (forward pre/post hooks), summed over the job."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._started: dict[str, float] = {}

    def attach(self, name: str, module: Any) -> None:
        def before(*_: Any) -> None:
            self._started[name] = time.monotonic()

        def after(*_: Any) -> None:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.monotonic() - self._started.pop(name)
            self.calls[name] = self.calls.get(name, 0) + 1

        module.register_forward_pre_hook(before)
        module.register_forward_hook(after)

    def attach_pipeline(self, pipe: Any) -> None:
        for name, module in (("text_encoder", pipe.text_encoder), ("vae_encode", pipe.vae.encoder),
                             ("vae_decode", pipe.vae.decoder), ("unet", pipe.unet)):
            self.attach(name, module)

    def report(self) -> dict[str, Any]:
        return {k: round(v, 3) for k, v in self.seconds.items()} | {f"{k}_calls": n for k, n in self.calls.items()}


def child_main(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    spawn_wall = float(os.environ.get("BENCH_SPAWN_WALL", time.time()))
    startup = time.time() - spawn_wall
    sampler = MemorySampler().start()
    variant = parse_variant(args.variant)
    image_path, mask_path = Path(args.image), Path(args.mask)
    report: dict[str, Any] = {"variant": variant.spec(), "label": variant.label, "kind": variant.kind}
    report["interpreter_start_s"] = round(startup, 3)

    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request

    import diffusers  # noqa: F401
    import torch  # noqa: F401
    from PIL import Image

    report["import_s"] = round(time.monotonic() - t_start, 3)
    # What torch's own kernels run on (ATEN_CPU_CAPABILITY=avx2 shows as AVX2: the N100 simulation).
    report["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    sampler.set_phase("load")
    clock = StepClock()
    t_load = time.monotonic()

    if variant.kind in ("diffusers", "diffusers_crop"):
        from diffusers import StableDiffusionInpaintPipeline
        from diffusers.utils import logging as dlogging

        from inpaintd.engine.schedulers import make_scheduler

        dlogging.disable_progress_bar()
        # Without a dtype, diffusers loads the UNet and VAE in fp32 but transformers keeps the
        # text encoder in the files' fp16, and the first VAE call fails ("Input type (c10::Half)
        # and bias type (float) should be the same"). What a CPU user then writes is fp32:
        import diffusers as _d

        dtype_key = "dtype" if hasattr(_d.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
        load_kwargs: dict[str, Any] = {"safety_checker": None}
        if variant.model.get("default_dtype") not in (True, "1", 1):
            load_kwargs[dtype_key] = torch.bfloat16 if variant.model.get("dtype") == "bf16" else torch.float32
        pipe = StableDiffusionInpaintPipeline.from_pretrained(str(args.fp16_model), **load_kwargs)
        pipe.set_progress_bar_config(disable=True)
        threads = variant.model.get("threads")
        if threads:
            torch.set_num_threads(int(threads))
        # Same scheduler as inpaintd's default so steps cost the same number of UNet calls
        # (diffusers' folder default, PNDM, adds one extra UNet call per job).
        pipe.scheduler = make_scheduler(str(variant.job.get("scheduler", args.scheduler)), pipe.scheduler.config)
        _apply_patches(pipe, variant.patch, report)
        phases = PhaseTimer()
        phases.attach_pipeline(pipe)
        report["dtypes"] = {
            "unet": str(pipe.unet.dtype),
            "vae": str(pipe.vae.dtype),
            "text_encoder": str(pipe.text_encoder.dtype),
        }
        report["load_s"] = round(time.monotonic() - t_load, 3)
        sampler.set_phase("job")
        t_job = time.monotonic()
        image = Image.open(image_path).convert("RGB")
        mask = Image.open(mask_path).convert("L")
        size = image.size
        kwargs: dict[str, Any] = {}
        if variant.kind == "diffusers":
            if size != (512, 512):
                image = image.resize((512, 512), Image.Resampling.LANCZOS)
                mask = mask.resize((512, 512), Image.Resampling.NEAREST)
        else:
            kwargs["padding_mask_crop"] = int(variant.model.get("padding_mask_crop", 32))

        def on_step_end(pipeline: Any, index: int, timestep: Any, kw: dict[str, Any]) -> dict[str, Any]:
            clock.tick()
            return kw

        generator = torch.Generator("cpu").manual_seed(SEED)
        with torch.inference_mode():
            out = pipe(
                prompt=PROMPT,
                image=image,
                mask_image=mask,
                height=512,
                width=512,
                num_inference_steps=int(variant.job.get("steps", args.steps)),
                guidance_scale=float(variant.job.get("guidance", 7.5)),
                strength=1.0,
                generator=generator,
                callback_on_step_end=on_step_end,
                **kwargs,
            ).images[0]
        if out.size != size:
            out = out.resize(size, Image.Resampling.LANCZOS)
        out_path = Path(args.out_dir) / f"{variant.label}-{image_path.stem}{image_path.suffix}"
        out.save(out_path, **({"quality": 95} if image_path.suffix == ".jpg" else {}))
        t_end = time.monotonic()
        report["regions"] = 1
        report["threads"] = torch.get_num_threads()
    else:
        from inpaintd.paint.job import run_job
        from inpaintd.paint.jobspec import build_request
        from inpaintd.core.config import Config, ModelConfig, RoiConfig
        from inpaintd.engine.engine import Engine

        model_fields = dict(variant.model)
        model_fields.pop("padding_mask_crop", None)
        model_fields.pop("default_dtype", None)
        model_fields.setdefault("cache_dir", OUT / "cache")  # int8 UNet cache stays in bench-out/
        model_path = Path(model_fields.pop("path", args.prepared_model))
        model_cfg = ModelConfig(path=model_path, **model_fields)
        config = Config(model=model_cfg, roi=RoiConfig(**variant.roi) if variant.roi else RoiConfig())
        engine = Engine.load(model_cfg)
        report["model_id"] = engine.info.model_id
        _apply_patches(engine.pipeline, variant.patch, report)
        phases = PhaseTimer()
        phases.attach_pipeline(engine.pipeline)
        if engine.has_draft_decoder:
            phases.attach("draft_decode", engine.draft_decoder().decoder)
        report["load_s"] = round(time.monotonic() - t_load, 3)
        report["threads"] = engine.threads
        if args.warm:
            sampler.set_phase("warm")
            t_warm = time.monotonic()
            engine.warm([(512, 512)])
            report["warm_s"] = round(time.monotonic() - t_warm, 3)
        sampler.set_phase("job")
        t_job = time.monotonic()
        options: dict[str, Any] = {"prompt": PROMPT, "seed": SEED}
        if "path" not in variant.model:  # another model (model.path=) paints with its manifest's defaults
            options.update(steps=args.steps, scheduler=args.scheduler)
        options.update(variant.job)
        if variant.kind == "inpaintd":
            from inpaintd.paint.job import run_job
            from inpaintd.paint.jobspec import build_request

            request = build_request(image_path.stem, image_path, mask_path, options, config,
                                            model_defaults=engine.model_defaults)
            result = run_job(engine, request, config, on_step=clock.tick)
            report["job_timings"] = result.sidecar.get("timings")
            report["parameters"] = result.sidecar.get("parameters")
            out_path = Path(args.out_dir) / f"{variant.label}-{image_path.stem}.{result.extension}"
            out_path.write_bytes(result.image_bytes)
            report["regions"] = len(result.regions)
            report["work_sizes"] = [list(r.work_size) for r in result.regions]
        else:  # engine: the input as is, no ROI logic
            from inpaintd.core.jobs import InpaintParams

            params = InpaintParams(
                prompt=PROMPT, negative_prompt="", scheduler=args.scheduler, steps=args.steps,
                guidance=7.5, strength=1.0, seed=SEED,
            )
            image = Image.open(image_path).convert("RGB")
            mask = Image.open(mask_path).convert("L")
            out = engine.inpaint(image, mask, params, on_step=clock.tick).image
            out_path = Path(args.out_dir) / f"{variant.label}-{image_path.stem}.png"
            out.save(out_path)
            report["regions"] = 1
        t_end = time.monotonic()
        report["runtime"] = engine.runtime_report((512, 512))

    report["phases"] = phases.report()
    sampler.stop()
    ticks = clock.times
    report["steps_seen"] = len(ticks)
    report["first_step_s"] = round(ticks[0] - t_job, 3) if ticks else None
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    report["step_gaps_s"] = [round(g, 3) for g in gaps]
    report["s_per_step"] = round(statistics.median(gaps), 3) if gaps else None
    report["s_per_step_min"] = round(min(gaps), 3) if gaps else None
    cpu_gaps = [b - a for a, b in zip(clock.cpu, clock.cpu[1:])]
    report["cpu_s_per_step"] = round(statistics.median(cpu_gaps), 3) if cpu_gaps else None
    report["cpu_s"] = round(time.process_time(), 1)
    report["job_s"] = round(t_end - t_job, 3)
    report["after_last_step_s"] = round(t_end - ticks[-1], 3) if ticks else None
    report["total_s"] = round(t_end - t_start + startup, 3)
    report["memory"] = sampler.peaks
    report["vmhwm"] = sampler.read().get("VmHWM")
    try:
        rollup = Path("/proc/self/smaps_rollup").read_text()
        report["smaps_rollup_end"] = {
            k: int(v.split()[0]) * 1024
            for k, _, v in (line.partition(":") for line in rollup.splitlines()[1:])
            if k in ("Rss", "Anonymous", "Private_Clean", "Private_Dirty", "Shared_Clean")
        }
    except OSError:
        pass
    report["output"] = str(out_path)
    print("BENCH_RESULT " + json.dumps(report), flush=True)
    return 0


# ----------------------------------------------------------------------------- parent side


def _cgroup_join(cgroup: Path | None):
    def join() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return join


def run_child(
    variant: Variant,
    image: Path,
    mask: Path,
    *,
    steps: int,
    scheduler: str,
    fp16_model: Path,
    prepared_model: Path,
    out_dir: Path,
    cgroup: Path | None = None,
    warm: bool = False,
    timeout: float = 3600.0,
) -> dict[str, Any]:
    """Run one measured child; return its report plus what the parent saw (rusage, exit)."""
    env = dict(os.environ)
    env.update(variant.env)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if variant.preload:
        env["LD_PRELOAD"] = allocator_path(variant.preload)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "child",
        "--variant", variant.spec(), "--image", str(image), "--mask", str(mask),
        "--steps", str(steps), "--scheduler", scheduler,
        "--fp16-model", str(fp16_model), "--prepared-model", str(prepared_model),
        "--out-dir", str(out_dir),
    ]
    if warm:
        cmd.append("--warm")
    env["BENCH_SPAWN_WALL"] = repr(time.time())
    started = time.monotonic()
    log_path = out_dir / f"{variant.label}-{image.stem}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, env=env, preexec_fn=_cgroup_join(cgroup))
        assert proc.stdout is not None
        stdout = b""
        deadline = started + timeout
        while True:
            chunk = proc.stdout.read()
            stdout += chunk
            if not chunk:
                break
            if time.monotonic() > deadline:
                proc.kill()
                break
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    report: dict[str, Any] = {}
    for line in stdout.decode(errors="replace").splitlines():
        if line.startswith("BENCH_RESULT "):
            report = json.loads(line[len("BENCH_RESULT "):])
    report.setdefault("label", variant.label)
    report.setdefault("variant", variant.spec())
    report["input"] = image.stem
    report["steps"] = steps
    report["wall_s"] = round(wall, 3)
    report["peak_rss"] = usage.ru_maxrss * 1024
    report["child_cpu_s"] = round(usage.ru_utime + usage.ru_stime, 1)
    report["majflt"] = usage.ru_majflt
    if os.WIFSIGNALED(status):
        report["exit"] = f"signal {os.WTERMSIG(status)}"
        report["status"] = "killed" if os.WTERMSIG(status) == signal.SIGKILL else "crashed"
    else:
        code = os.WEXITSTATUS(status)
        report["exit"] = code
        report["status"] = "ok" if code == 0 and "job_s" in report else "failed"
    if report["status"] != "ok":
        report["log_tail"] = log_path.read_text(errors="replace")[-2000:]
    return report


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in lscpu.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("Model name", "Model", "CPU family", "Hypervisor vendor", "CPU(s)", "Core(s) per socket", "Thread(s) per core", "L2 cache", "L3 cache"):
                info[key.strip()] = value.strip()
            if key.strip() == "Flags":
                flags = set(value.split())
                info["flags"] = sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512_fp16"})
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0]
        info["MemTotal"] = mem.split(":")[1].strip()
    except OSError:
        pass
    try:
        import diffusers
        import torch
        import transformers

        info["torch"] = torch.__version__
        info["diffusers"] = diffusers.__version__
        info["transformers"] = transformers.__version__
        import re

        found = re.search(r"MKL-DNN v([0-9.]+)", torch.__config__.show())
        info["onednn"] = found.group(1) if found else None
        info["glibc"] = platform.libc_ver()[1]
        info["torch_parallel"] = torch.__config__.parallel_info().splitlines()[:6]
    except Exception as exc:  # noqa: BLE001 - the report should still be written
        info["versions_error"] = repr(exc)
    return info


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().strip()


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _save(name: str, payload: dict[str, Any]) -> Path:
    # One file per invocation, rewritten after every row, so an interrupted run keeps what it
    # measured and `report bench-out/*.json` shows each run once.
    OUT.mkdir(exist_ok=True)
    stamp = payload.setdefault("stamp", time.strftime("%Y%m%d-%H%M%S"))
    path = OUT / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        steps=args.steps,
        scheduler=args.scheduler,
        fp16_model=args.fp16_model,
        prepared_model=args.prepared_model,
        out_dir=OUT / "outputs",
    )


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _run_matrix(args: argparse.Namespace, variants: list[Variant], inputs: list[str], name: str) -> Path:
    files = make_inputs(OUT / "inputs")
    (OUT / "outputs").mkdir(parents=True, exist_ok=True)
    results = []
    payload = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": results,
    }
    for repeat in range(args.repeat):
        for input_name in inputs:
            image, mask = files[input_name]
            for variant in variants:
                load_before = loadavg()
                _log(f"[{name}] {variant.label} on {input_name} (repeat {repeat + 1}/{args.repeat}); load {load_before}")
                report = run_child(variant, image, mask, warm=args.warm, **_common(args))
                report["loadavg_before"] = load_before
                report["loadavg_after"] = loadavg()
                report["repeat"] = repeat
                results.append(report)
                _log("    " + summary_line(report))
                path = _save(name, payload)  # rewritten after every run: a crash keeps what was measured
    _log(f"raw results: {path}")
    print(markdown_tables(payload))
    return path


def summary_line(r: dict[str, Any]) -> str:
    if r.get("status") != "ok":
        return f"{r['label']}: {r.get('status')} ({r.get('exit')})"
    mem = r.get("memory", {}).get("job", {})
    return (
        f"{r['label']}: load {r.get('load_s')}s, first step {r.get('first_step_s')}s, "
        f"{r.get('s_per_step')} s/step (min {r.get('s_per_step_min')}, cpu {r.get('cpu_s_per_step')}), "
        f"job {r.get('job_s')}s, peak RSS {r['peak_rss'] / 2**20:.0f} MiB "
        f"(job anon {mem.get('RssAnon', 0) / 2**20:.0f} / file {mem.get('RssFile', 0) / 2**20:.0f} MiB)"
    )


def _num(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def markdown_tables(payload: dict[str, Any]) -> str:
    """One table per input: every configuration with ratios to diffusers_bf16 (else the first row)."""
    results = [r for r in payload["results"]]
    lines: list[str] = []
    by_input: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_input.setdefault(r["input"], []).append(r)
    for input_name, rows in by_input.items():
        # Median over repeats per label.
        labels = list(dict.fromkeys(r["label"] for r in rows))
        merged = []
        for label in labels:
            group = [r for r in rows if r["label"] == label]
            ok = [r for r in group if r.get("status") == "ok"]
            if not ok:
                merged.append({"label": label, "status": group[0].get("status"), "n": len(group)})
                continue

            def med(key: str, sub: str | None = None) -> Any:
                vals = [(r.get(key) or {}).get(sub) if sub else r.get(key) for r in ok]
                vals = [v for v in vals if v is not None]
                return statistics.median(vals) if vals else None

            merged.append(
                {
                    "label": label,
                    "status": "ok",
                    "n": len(ok),
                    "load_s": med("load_s"),
                    "first_step_s": med("first_step_s"),
                    "s_per_step": med("s_per_step"),
                    "s_per_step_min": med("s_per_step_min"),
                    "cpu_s_per_step": med("cpu_s_per_step"),
                    "job_s": med("job_s"),
                    "total_s": med("total_s"),
                    "peak_rss": med("peak_rss"),
                    "anon": statistics.median([r["memory"].get("job", {}).get("RssAnon", 0) for r in ok]),
                    "file": statistics.median([r["memory"].get("job", {}).get("RssFile", 0) for r in ok]),
                    "regions": ok[0].get("regions"),
                    "steps": ok[0].get("steps"),
                    "load": ok[0].get("loadavg_before", "").split(" ")[0],
                }
            )
        # Ratios against plain diffusers in bf16 where the run has it (the fair baseline on a CPU
        # with native bf16), else against the first row.
        base = next((m for m in merged if m["status"] == "ok" and m["label"] == "diffusers_bf16"), None)
        base = base or next((m for m in merged if m["status"] == "ok"), None)
        lines.append(f"\n#### {input_name} ({rows[0].get('steps', '?')} steps; x = against {base['label'] if base else '-'})\n")
        lines.append(
            "| config | load s | first step s | s/step (min) | CPU s/step | job s | total s | peak RSS MiB "
            "| job peak anon / file MiB | regions | x s/step | x job | x RSS | loadavg |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for m in merged:
            if m["status"] != "ok":
                lines.append(f"| {m['label']} | {m['status']} |" + " |" * 13)
                continue
            cpu = "-" if m.get("cpu_s_per_step") is None else f"{m['cpu_s_per_step']:.1f}"
            smin = "-" if m.get("s_per_step_min") is None else f"{m['s_per_step_min']:.2f}"

            def ratio(key: str) -> str:
                if not base or not base.get(key) or m.get(key) is None:
                    return "-"
                return f"{m[key] / base[key]:.2f}"

            lines.append(
                f"| {m['label']} | {_num(m['load_s'], 1)} | {_num(m['first_step_s'], 1)} | {_num(m['s_per_step'], 2)} ({smin}) | {cpu} | "
                f"{_num(m['job_s'], 1)} | {_num(m['total_s'], 1)} | {_mib(m['peak_rss'])} | {_mib(m['anon'])} / {_mib(m['file'])} | "
                f"{m['regions']} | {ratio('s_per_step')} | {ratio('job_s')} | {ratio('peak_rss')} | {m['load']} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- subcommands

COMPARE_DEFAULT = ["diffusers:diffusers", "diffusers_crop:diffusers_crop", "inpaintd:inpaintd"]


def cmd_compare(args: argparse.Namespace) -> int:
    variants = [parse_variant(v) for v in (args.variants or COMPARE_DEFAULT)]
    _run_matrix(args, variants, args.inputs.split(","), "compare")
    return 0


def cmd_levers(args: argparse.Namespace) -> int:
    variants = [parse_variant(v) for v in args.variants]
    _run_matrix(args, variants, args.inputs.split(","), "levers")
    return 0


FASTPATH_FUSED = MODELS / "sd15-inpaint-lcm-bf16"
FASTPATH_DEFAULT = [
    "diffusers_fp32:diffusers",
    "diffusers_bf16:diffusers,model.dtype=bf16",
    "inpaintd_20:inpaintd",
    "inpaintd_20_nchw_weights:inpaintd,model.channels_last_weights=off",
    "cutoff_0.4:inpaintd,job.cfg_cutoff=0.4",
    "cache_3:inpaintd,job.step_cache=3",
    "cutoff_0.4+cache_3:inpaintd,job.cfg_cutoff=0.4,job.step_cache=3",
    "tome_0.5:inpaintd,patch.tome=0.5",
] + [
    f"lcm_{steps}_g{g}:inpaintd,model.path={FASTPATH_FUSED},job.steps={steps},job.guidance={g}"
    for steps in (4, 6, 8) for g in (1.0, 1.5)
] + [f"lcm_4_g1.0_draft:inpaintd,model.path={FASTPATH_FUSED},job.steps=4,job.guidance=1.0,job.decoder=draft"]


def cmd_fastpath(args: argparse.Namespace) -> int:
    """Issue 14's table: baselines, the 20-step options and the LCM-fused model, one process each."""
    variants = [parse_variant(v) for v in (args.variants or FASTPATH_DEFAULT)]
    path = _run_matrix(args, variants, args.inputs.split(","), "fastpath")
    print(fastpath_table(json.loads(path.read_text())))
    return 0


def fastpath_table(payload: dict[str, Any]) -> str:
    """Per input: end-to-end job, s/step, each phase, peak RSS; ratios against diffusers_bf16."""
    lines: list[str] = []
    by_input: dict[str, list[dict[str, Any]]] = {}
    for r in payload["results"]:
        by_input.setdefault(r["input"], []).append(r)
    for input_name, rows in by_input.items():
        base = next((r for r in rows if r["label"] == "diffusers_bf16" and r.get("status") == "ok"), None)
        lines.append(f"\n#### {input_name}\n")
        lines.append("| config | steps | guidance | job s | s/step | text enc s | VAE enc s | UNet s (calls) | VAE dec s "
                     "| rest s | peak RSS MiB | x job | x s/step | x RSS |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['label']} | {r.get('status')} ({r.get('exit')}) |" + " |" * 12)
                continue
            ph = r.get("phases", {})
            params = r.get("parameters") or {}
            steps = params.get("steps") or r.get("steps_seen")
            guidance = params.get("guidance", 7.5)
            decode = ph.get("vae_decode", 0.0) + ph.get("draft_decode", 0.0)
            inside = ph.get("text_encoder", 0.0) + ph.get("vae_encode", 0.0) + ph.get("unet", 0.0) + decode
            rest = r["job_s"] - inside

            def x(key: str) -> str:
                if base is None or not base.get(key) or r.get(key) is None:
                    return "-"
                return f"{r[key] / base[key]:.2f}"

            lines.append(
                f"| {r['label']} | {steps} | {guidance:g} | {r['job_s']:.1f} | {r.get('s_per_step') or 0:.2f} | "
                f"{ph.get('text_encoder', 0):.2f} | {ph.get('vae_encode', 0):.2f} | {ph.get('unet', 0):.1f} "
                f"({ph.get('unet_calls', 0)}) | {decode:.2f} | {rest:.2f} | {_mib(r['peak_rss'])} | "
                f"{x('job_s')} | {x('s_per_step')} | {x('peak_rss')} |"
            )
    return "\n".join(lines) + "\n"


class Cgroup:
    """A cgroup-v1 memory cgroup with a hard limit (memory + swap), removed on exit."""

    def __init__(self, name: str, limit: int) -> None:
        self.path = CGROUP_V1_MEMORY / name
        self.limit = limit

    def __enter__(self) -> "Cgroup":
        if not (CGROUP_V1_MEMORY / "memory.limit_in_bytes").exists():
            raise SystemExit("no cgroup-v1 memory controller at /sys/fs/cgroup/memory; see scripts/bench_memcap.sh for v2")
        if self.path.exists():
            self.path.rmdir()
        self.path.mkdir()
        (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
        memsw = self.path / "memory.memsw.limit_in_bytes"
        if memsw.exists():
            memsw.write_text(str(self.limit))  # no swap escape: memory+swap capped at the same value
        return self

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in ("memory.max_usage_in_bytes", "memory.failcnt", "memory.memsw.max_usage_in_bytes"):
            f = self.path / name
            if f.exists():
                out[name] = int(f.read_text())
        oom = self.path / "memory.oom_control"
        if oom.exists():
            out["oom_control"] = dict(line.split() for line in oom.read_text().splitlines())
        stat = self.path / "memory.stat"
        if stat.exists():
            keep = {"total_cache", "total_rss", "total_mapped_file", "total_pgmajfault"}
            out["stat"] = {k: int(v) for k, v in (line.split() for line in stat.read_text().splitlines()) if k in keep}
        return out

    def __exit__(self, *exc: Any) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _parse_caps(text: str) -> list[float]:
    return [float(c) for c in text.split(",") if c]


def cmd_memcap(args: argparse.Namespace) -> int:
    files = make_inputs(OUT / "inputs")
    (OUT / "outputs").mkdir(parents=True, exist_ok=True)
    image, mask = files[args.input]
    variants = [parse_variant(v) for v in args.variants]
    results: list[dict[str, Any]] = []
    payload = {
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine_info(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "drop_caches": args.drop_caches,
        "results": results,
    }
    for variant in variants:
        for cap in ([] if args.skip_uncapped else [0.0]) + _parse_caps(args.caps):
            label = f"{variant.label}@{cap:g}GiB" if cap else f"{variant.label}@uncapped"
            v = Variant(**{**variant.__dict__, "label": label.replace(".", "_")})
            dropped = drop_caches() if args.drop_caches else False
            load_before = loadavg()
            _log(f"[memcap] {label} on {args.input}; dropped caches: {dropped}; load {load_before}")
            if cap:
                with Cgroup(f"inpaintd-bench-{os.getpid()}", int(cap * 2**30)) as cg:
                    report = run_child(v, image, mask, cgroup=cg.path, warm=args.warm, **_common(args))
                    report["cgroup"] = cg.stats()
            else:
                report = run_child(v, image, mask, warm=args.warm, **_common(args))
            report["cap_gib"] = cap or None
            report["caches_dropped"] = dropped
            report["loadavg_before"] = load_before
            report["loadavg_after"] = loadavg()
            results.append(report)
            _log("    " + summary_line(report))
            path = _save("memcap", payload)
    print(memcap_table(payload))
    _log(f"raw results: {path}")
    return 0


def memcap_table(payload: dict[str, Any]) -> str:
    lines = [
        "| variant | cap | result | job s | x uncapped | s/step | peak RSS MiB | cgroup max usage MiB | failcnt "
        "| major faults | loadavg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for r in payload["results"]:
        family = r["label"].split("@")[0]
        if r.get("cap_gib") is None and r.get("status") == "ok":
            base[family] = r["job_s"]
        cg = r.get("cgroup", {})
        result = r.get("status")
        if result == "killed" and cg.get("oom_control", {}).get("oom_kill", "0") != "0":
            result = "OOM-killed"
        ratio = f"{r['job_s'] / base[family]:.2f}" if r.get("status") == "ok" and family in base else "-"
        lines.append(
            f"| {family} | {r['cap_gib'] or 'none'} | {result} | {r.get('job_s', '-')} | {ratio} | {r.get('s_per_step', '-')} | "
            f"{_mib(r.get('peak_rss'))} | {_mib(cg.get('memory.max_usage_in_bytes'))} | {cg.get('memory.failcnt', '-')} | "
            f"{r.get('majflt')} | {r.get('loadavg_before', '').split(' ')[0]} |"
        )
    return "\n".join(lines) + "\n"


def cmd_coldstart(args: argparse.Namespace) -> int:
    """Process start to READY=1 of `inpaintd run`, with the sd_notify datagram on a real socket."""
    import yaml

    results: list[dict[str, Any]] = []
    payload = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": machine_info(), "results": results}
    base = Path(tempfile.mkdtemp(prefix="inpaintd-coldstart-"))
    config = {
        "model": {"path": str(args.prepared_model)},
        "paths": {k: str(base / k) for k in ("inbox", "outbox", "failed", "archive", "state")},
        "logging": {"format": "json"},
    }
    for key in ("inbox", "outbox", "failed", "archive", "state"):
        (base / key).mkdir()
    if args.model_config:
        config["model"].update({k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.model_config)})
    if args.roi_config:
        config["roi"] = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.roi_config)}
    cfg_path = base / "config.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    for repeat in range(args.repeat):
        for cold in ([True, False] if args.drop_caches else [False]):
            dropped = drop_caches() if cold else False
            sock_path = base / f"notify-{repeat}-{int(cold)}.sock"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(sock_path))
            sock.settimeout(1.0)
            env = dict(os.environ, NOTIFY_SOCKET=str(sock_path), PYTHONUNBUFFERED="1")
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "daemon"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            if args.preload:
                env["LD_PRELOAD"] = allocator_path(args.preload)
            cmd = [sys.executable, "-m", "inpaintd", "run", "--config", str(cfg_path)]
            load_before = loadavg()
            started = time.monotonic()
            log = open(base / f"daemon-{repeat}-{int(cold)}.log", "wb")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
            messages: list[tuple[float, str]] = []
            ready_at = None
            while time.monotonic() - started < args.timeout and proc.poll() is None:
                try:
                    data = sock.recv(4096).decode(errors="replace")
                except socket.timeout:
                    continue
                messages.append((round(time.monotonic() - started, 3), data))
                if "READY=1" in data.split("\n"):
                    ready_at = time.monotonic() - started
                    break
            rss = None
            try:
                rss = _proc_status(proc.pid)
            except OSError:
                pass
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
            sock.close()
            report = {
                "cold_cache": cold,
                "caches_dropped": dropped,
                "ready_s": round(ready_at, 3) if ready_at else None,
                "messages": messages,
                "status_at_ready": rss,
                "exit": proc.returncode,
                "loadavg_before": load_before,
                "model_config": config["model"],
                "roi_config": config.get("roi"),
            }
            if ready_at is None:
                report["log_tail"] = (base / f"daemon-{repeat}-{int(cold)}.log").read_text(errors="replace")[-2000:]
            results.append(report)
            _log(f"[coldstart] cold={cold} dropped={dropped}: READY=1 after {report['ready_s']} s (load {load_before})")
            path = _save("coldstart", payload)
    # Each baseline after all of inpaintd's rows, its warm rows right after its own cold ones
    # (a warm row after another runner's cold row would find the page cache dropped).
    for dtype in [d for d in (args.diffusers or "").split(",") if d]:
        for repeat in range(args.repeat):
            for cold in ([True, False] if args.drop_caches else [False]):
                dropped = drop_caches() if cold else False
                report = _diffusers_ready(dtype, args.fp16_model, args.timeout)
                report.update(cold_cache=cold, caches_dropped=dropped, runner=f"diffusers {dtype}")
                results.append(report)
                _log(f"[coldstart] diffusers {dtype} cold={cold}: ready after {report['ready_s']} s")
                path = _save("coldstart", payload)
    _log(f"raw results: {path}")
    return 0


def _diffusers_ready(dtype: str, fp16_model: Path, timeout: float) -> dict[str, Any]:
    """The baseline of a cold start: plain diffusers from process start to the pipeline loaded,
    and to one 256x256 step done (what inpaintd's warm-up does before READY=1)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "daemon"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, str(Path(__file__).resolve()), "diffusers-ready", "--dtype", dtype,
           "--fp16-model", str(fp16_model)]
    started = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    marks: dict[str, float] = {}
    rss = None
    assert proc.stdout is not None and proc.stdin is not None
    while time.monotonic() - started < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        marks[line.strip()] = round(time.monotonic() - started, 3)
        if line.strip() == "READY":
            rss = _proc_status(proc.pid)
            break
    proc.stdin.close()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    return {"loaded_s": marks.get("LOADED"), "ready_s": marks.get("READY"), "status_at_ready": rss}


def diffusers_ready_child(args: argparse.Namespace) -> int:

    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as dlogging
    from PIL import Image

    from inpaintd.engine.schedulers import make_scheduler

    dlogging.disable_progress_bar()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(args.fp16_model), torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)
    print("LOADED", flush=True)
    image = Image.new("RGB", (256, 256), (120, 110, 100))
    mask = Image.new("L", (256, 256), 255)
    with torch.inference_mode():
        pipe(prompt=PROMPT, image=image, mask_image=mask, height=256, width=256, num_inference_steps=1, strength=1.0)
    print("READY", flush=True)
    sys.stdin.read()  # held until the parent has read the RSS
    return 0


def _proc_status(pid: int) -> dict[str, int]:
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def cmd_longrun(args: argparse.Namespace) -> int:
    """RSS over many jobs in one process (tiny model): is memory flat?"""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    for kv in args.env or []:
        k, _, v = kv.partition("=")
        env[k] = v
    if args.preload:
        env["LD_PRELOAD"] = allocator_path(args.preload)
    cmd = [sys.executable, str(Path(__file__).resolve()), "longrun-child", "--jobs", str(args.jobs)]
    if args.model:
        cmd += ["--model", str(args.model)]
    if args.diffusers:
        cmd += ["--diffusers", args.diffusers]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    report: dict[str, Any] = {}
    for line in out.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            report = json.loads(line[len("BENCH_RESULT "):])
    if not report:
        _log(out.stderr[-3000:])
        return 1
    payload = {"command": " ".join(shlex.quote(a) for a in sys.argv), "machine": machine_info(), "result": report,
               "runner": f"diffusers {args.diffusers}" if args.diffusers else "inpaintd",
               "preload": args.preload}
    path = _save("longrun", payload)
    rss = report["rss"]
    _log(
        f"[longrun] jobs {args.jobs}: RSS after 10 = {rss['10'] / 2**20:.1f} MiB, after {args.jobs} = "
        f"{rss[str(args.jobs)] / 2**20:.1f} MiB, delta {(rss[str(args.jobs)] - rss['10']) / 2**20:+.1f} MiB"
    )
    _log(f"raw results: {path}")
    return 0


def longrun_child(args: argparse.Namespace) -> int:
    """Many jobs through run_job with varied prompts, sizes, masks and seeds."""
    import numpy as np
    from PIL import Image

    from inpaintd.paint.job import run_job
    from inpaintd.paint.jobspec import build_request
    from inpaintd.core.config import Config, ModelConfig
    from inpaintd.engine.engine import Engine

    work = Path(tempfile.mkdtemp(prefix="inpaintd-longrun-"))
    model = ModelConfig(path=Path(args.model) if args.model else None, cache_dir=work / "cache")
    config = Config(model=model)
    if args.diffusers:
        paint = _diffusers_longrun_painter(args, work)
    else:
        engine = Engine.load(model)

        def paint(n: int, img: Path, mpath: Path, options: dict[str, Any]) -> None:
            request = build_request(f"job{n}", img, mpath, options, config)
            run_job(engine, request, config)

    rng = np.random.default_rng(3)
    sizes = [(640, 480), (1024, 768), (300, 900), (2000, 1500)]
    inputs = []
    for i, (w, h) in enumerate(sizes):
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        img = work / f"img{i}.png"
        Image.fromarray(pixels).save(img)
        for j in range(2):
            mask = np.zeros((h, w), dtype=np.uint8)
            x, y = int(rng.integers(0, w - 80)), int(rng.integers(0, h - 80))
            mask[y : y + 60 + 20 * j, x : x + 70] = 255
            if j:
                mask[h - 70 : h - 10, w - 70 : w - 10] = 255
            mpath = work / f"img{i}.mask{j}.png"
            Image.fromarray(mask).save(mpath)
            inputs.append((img, mpath))
    rss: dict[str, int] = {}
    anon: dict[str, int] = {}
    t0 = time.monotonic()
    for n in range(1, args.jobs + 1):
        img, mpath = inputs[n % len(inputs)]
        options = {"prompt": f"prompt {n % 23}", "steps": 2 + n % 3, "seed": n, "scheduler": ("dpmpp_2m_karras", "euler_a", "ddim")[n % 3]}
        paint(n, img, mpath, options)
        if n in (1, 10, 50, 100, 150, 200) or n == args.jobs or n % 50 == 0:
            status = MemorySampler.read()
            rss[str(n)] = status["VmRSS"]
            anon[str(n)] = status["RssAnon"]
    report = {"jobs": args.jobs, "rss": rss, "anon": anon, "seconds": round(time.monotonic() - t0, 1)}
    print("BENCH_RESULT " + json.dumps(report), flush=True)
    return 0


def _diffusers_longrun_painter(args: argparse.Namespace, work: Path) -> Callable[..., None]:
    """The same jobs as the diffusers baseline of section 1 runs them: image and mask resized to
    512x512, StableDiffusionInpaintPipeline, the result resized back; the same tiny model."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as dlogging
    from PIL import Image

    from inpaintd.engine.schedulers import make_scheduler
    from inpaintd.demo.model import ensure_embedded_model

    dlogging.disable_progress_bar()
    folder = Path(args.model) if args.model else ensure_embedded_model(work / "cache", dtype="fp32")
    dtype = torch.bfloat16 if args.diffusers == "bf16" else torch.float32
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(folder), torch_dtype=dtype, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    base_config = pipe.scheduler.config

    def paint(n: int, img: Path, mpath: Path, options: dict[str, Any]) -> None:
        image = Image.open(img).convert("RGB")
        size = image.size
        image = image.resize((512, 512), Image.Resampling.LANCZOS)
        mask = Image.open(mpath).convert("L").resize((512, 512), Image.Resampling.NEAREST)
        pipe.scheduler = make_scheduler(options["scheduler"], base_config)
        with torch.inference_mode():
            out = pipe(prompt=options["prompt"], image=image, mask_image=mask, height=512, width=512,
                       num_inference_steps=options["steps"], strength=1.0,
                       generator=torch.Generator("cpu").manual_seed(options["seed"])).images[0]
        out.resize(size, Image.Resampling.LANCZOS).save(work / "out.png")

    return paint


def cmd_report(args: argparse.Namespace) -> int:
    for path in args.files:
        payload = json.loads(Path(path).read_text())
        print(f"\n<!-- {path} -->")
        if "memcap" in Path(path).name:
            print(memcap_table(payload))
        elif "results" in payload and payload["results"] and "cold_cache" not in payload["results"][0]:
            print(markdown_tables(payload))
        else:
            print(json.dumps(payload.get("results", payload.get("result")), indent=2))
    return 0


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, steps: int) -> None:
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--scheduler", default="dpmpp_2m_karras")
        p.add_argument("--fp16-model", type=Path, default=DEFAULT_FP16)
        p.add_argument("--prepared-model", type=Path, default=DEFAULT_PREPARED)
        p.add_argument("--repeat", type=int, default=1)
        p.add_argument("--warm", action="store_true", help="inpaintd: engine.warm() before the job (as the daemon does)")

    p = sub.add_parser("compare", help="plain diffusers vs diffusers crop vs inpaintd on every input")
    common(p, 5)
    p.add_argument("--inputs", default="square,photo1,photo2")
    p.add_argument("--variants", nargs="*", help=f"default: {' '.join(COMPARE_DEFAULT)}")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser("levers", help="variants of one configuration side by side")
    common(p, 4)
    p.add_argument("--inputs", default="square")
    p.add_argument("--variants", nargs="+", required=True)
    p.set_defaults(handler=cmd_levers)

    p = sub.add_parser("fastpath", help="issue 14: baselines, CFG cut-off, step caching, ToMe, the LCM-fused model")
    common(p, 20)
    p.add_argument("--inputs", default="square,photo1")
    p.add_argument("--variants", nargs="*", help="default: FASTPATH_DEFAULT in this file")
    p.set_defaults(handler=cmd_fastpath)

    p = sub.add_parser("memcap", help="inpaintd under cgroup memory limits")
    common(p, 20)
    p.add_argument("--input", default="square")
    p.add_argument("--caps", default="4,2,1.5,1.25", help="GiB, comma-separated")
    p.add_argument("--variants", nargs="+", default=["inpaintd:inpaintd"])
    p.add_argument("--drop-caches", action="store_true", help="drop the page cache before each run (root)")
    p.add_argument("--skip-uncapped", action="store_true", help="only the capped rows (the uncapped ones ran elsewhere)")
    p.set_defaults(handler=cmd_memcap)

    p = sub.add_parser("coldstart", help="`inpaintd run` start to READY=1")
    p.add_argument("--prepared-model", type=Path, default=DEFAULT_PREPARED)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--drop-caches", action="store_true", help="also measure with the page cache dropped first")
    p.add_argument("--model-config", nargs="*", help="model.KEY=VALUE overrides (e.g. compile=inductor)")
    p.add_argument("--roi-config", nargs="*", help="roi.KEY=VALUE overrides (e.g. bucket_sides=[512])")
    p.add_argument("--preload", help="jemalloc|tcmalloc|PATH")
    p.add_argument("--diffusers", help="baselines after each inpaintd row: fp32,bf16 (plain diffusers to loaded and one 256x256 step)")
    p.add_argument("--fp16-model", type=Path, default=DEFAULT_FP16)
    p.set_defaults(handler=cmd_coldstart)

    p = sub.add_parser("diffusers-ready")
    p.add_argument("--dtype", choices=("fp32", "bf16"), required=True)
    p.add_argument("--fp16-model", type=Path, default=DEFAULT_FP16)
    p.set_defaults(handler=diffusers_ready_child)

    p = sub.add_parser("longrun", help="RSS over many jobs (tiny model by default)")
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--model", type=Path, help="prepared model (default: embedded tiny model)")
    p.add_argument("--env", nargs="*", help="NAME=VALUE for the child")
    p.add_argument("--diffusers", choices=("fp32", "bf16"), help="the baseline: the same jobs through plain diffusers")
    p.add_argument("--preload", help="jemalloc|tcmalloc|PATH")
    p.set_defaults(handler=cmd_longrun)

    p = sub.add_parser("longrun-child")
    p.add_argument("--jobs", type=int, default=200)
    p.add_argument("--model", type=Path)
    p.add_argument("--diffusers", choices=("fp32", "bf16"))
    p.set_defaults(handler=longrun_child)

    p = sub.add_parser("report", help="markdown from raw JSON results")
    p.add_argument("files", nargs="+")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("child")
    p.add_argument("--variant", required=True)
    p.add_argument("--image", required=True)
    p.add_argument("--mask", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--scheduler", default="dpmpp_2m_karras")
    p.add_argument("--fp16-model", type=Path, default=DEFAULT_FP16)
    p.add_argument("--prepared-model", type=Path, default=DEFAULT_PREPARED)
    p.add_argument("--out-dir", default=str(OUT / "outputs"))
    p.add_argument("--warm", action="store_true")
    p.set_defaults(handler=child_main)

    args = parser.parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
