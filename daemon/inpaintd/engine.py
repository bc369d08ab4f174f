"""The inference engine: the only module that imports torch and diffusers to paint.

`Engine.load(ModelConfig)` loads a diffusers inpainting folder once; `inpaint` paints one
working-size crop; `warm` runs one step at each shape it is given (the service picks them:
service.warm_shapes) so the first real job does not pay for compilation and page faults.

Runtime policy, each switch a ModelConfig field (the sidecar's "runtime" reports what applied):

- dtype ``auto|bf16|fp32``: auto picks bf16 when the CPU computes it natively (x86
  ``avx512_bf16``/``amx_bf16``, aarch64 ``bf16``), else fp32 (emulated bf16 is slower than
  fp32). The pipeline loads with that ``torch_dtype``; when the files already hold it (a folder
  from ``prepare-model``) safetensors maps them without a copy.
- threads: ``torch.set_num_threads(n)``; 0 means the physical core count (unique
  (physical id, core id) pairs in /proc/cpuinfo, capped by the CPUs this process may use;
  os.cpu_count() when /proc/cpuinfo has no topology). Hyper-threads only contend for the
  same vector units.
- attention_slicing ``auto|on|off``: auto is off. Measured at 512x512 with SDPA: slicing is
  no faster and saves no memory worth having; ``on`` calls enable_attention_slicing().
- vae_tiling ``auto|on|off``: auto tiles the VAE only for a working side >= vae_tiling_min_side.
- compile ``off|inductor``: torch.compile of the UNet, its artifacts cached under
  ``cache_dir/torchinductor`` so a restart re-traces but does not compile again. Compilation
  happens on the first run;
  if it fails there, the engine logs a warning and falls back to the eager UNet for good (the
  runtime report says ``"compile": "inductor-failed"``), so a missing compiler toolchain never
  fails a job.
- schedulers by name, built with ``from_config`` from the model's scheduler config, one per
  name, cached.
- text embeddings: cached per (prompt, negative prompt) in an LRU of text_embedding_cache
  entries; the pipeline gets ``prompt_embeds``/``negative_prompt_embeds``.
- determinism: ``torch.Generator("cpu").manual_seed(seed)``; the same seed and parameters give
  the same pixels on the same machine and thread count.

Per job (InpaintParams; the sidecar's runtime says what ran):

- guidance <= 1: no classifier-free guidance, the UNet at batch 1 (diffusers decides this).
- cfg_cutoff: guidance dropped after step int(steps x cfg_cutoff) (`_cut_guidance`).
- step_cache > 1: DeepCache around the eager UNet for this job (`deepcache_helper`).
- decoder "draft": the final latents through the model's AutoencoderTiny (vae_tiny/).

An Engine is used by one worker thread at a time; a lock makes concurrent calls queue.
"""

from __future__ import annotations

import hashlib
import os
import platform
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__, memory, models, presets  # models sets the HF offline environment first
from .config import SCHEDULERS, ModelConfig
from .errors import ModelError
from .jobs import InpaintParams

import structlog  # noqa: E402
import torch  # noqa: E402

log = structlog.get_logger("inpaintd.engine")

# Keep the libraries quiet: progress bars and advisory warnings are not for a daemon's log.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass(frozen=True)
class ModelInfo:
    """What the loaded model is, as the sidecar and status report it."""

    path: str
    model_id: str  # manifest id of a prepared model; "raw-" + a hash of configs and file sizes otherwise
    random_weights: bool
    dtype: str  # runtime dtype: "bf16" | "fp32"
    unet_in_channels: int  # 9: inpainting UNet; 4: text-to-image UNet, painted by latent blending
    architecture: str  # e.g. "sd15-inpaint", "sd15", "sd2-inpaint"
    manifest: dict[str, Any] | None


# ----------------------------------------------------------------------------- host facts


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (x86 AVX512-BF16/AMX, Arm BF16)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            words = set(value.split())
            if words & {"avx512_bf16", "amx_bf16", "bf16"}:
                return True
    return False


def detect_dtype(cpuinfo: str | None = None) -> str:
    """The dtype `auto` means on this machine: "bf16" with native bf16, else "fp32"."""
    return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may use: unique (physical id, core id), capped by affinity."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
    count = len(cores) or (os.cpu_count() or 1)
    try:
        count = min(count, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, count)


def versions() -> dict[str, str]:
    """Versions of the pieces that decide the pixels."""
    import diffusers
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "inpaintd": __version__,
    }


_TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _resolve_dtype(setting: str) -> str:
    if setting == "auto":
        return detect_dtype()
    if setting not in _TORCH_DTYPES:
        raise ModelError(f"model.dtype must be auto, bf16 or fp32, got {setting!r}")
    return setting


# ----------------------------------------------------------------------------- schedulers


def make_scheduler(name: str, base_config: Any) -> Any:
    """A diffusers scheduler for one of config.SCHEDULERS, built from the model's config."""
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        PNDMScheduler,
        TCDScheduler,
        UniPCMultistepScheduler,
    )

    builders: dict[str, Callable[[], Any]] = {
        "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True
        ),
        "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(
            base_config, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=False
        ),
        "euler_a": lambda: EulerAncestralDiscreteScheduler.from_config(base_config),
        "euler": lambda: EulerDiscreteScheduler.from_config(base_config),
        "ddim": lambda: DDIMScheduler.from_config(base_config),
        "unipc": lambda: UniPCMultistepScheduler.from_config(base_config),
        "lcm": lambda: LCMScheduler.from_config(base_config),
        "tcd": lambda: TCDScheduler.from_config(base_config),
        "pndm": lambda: PNDMScheduler.from_config(base_config, skip_prk_steps=True),
    }
    if name not in builders:
        raise ValueError(f"unknown scheduler {name!r} (known: {', '.join(SCHEDULERS)})")
    return builders[name]()


# ----------------------------------------------------------------------------- engine


class Engine:
    """A loaded inpainting pipeline plus the policies it runs under. Create with Engine.load."""

    def __init__(self, pipeline: Any, config: ModelConfig, info: ModelInfo, layout: models.ModelLayout, threads: int):
        self.pipeline = pipeline
        self.config = config
        self.info = info
        self.layout = layout
        self.threads = threads
        self._lock = threading.RLock()
        self._base_scheduler_config = dict(pipeline.scheduler.config)
        self._schedulers: dict[str, Any] = {}
        self._embeddings: OrderedDict[tuple[str, str], tuple[Any, Any]] = OrderedDict()
        self.embedding_hits = 0
        self.embedding_misses = 0
        self._eager_unet = pipeline.unet
        self._compile_state = "off"
        self._vae_tiled = False
        self.load_seconds = 0.0
        self.unet_weights = "native"  # "int8" once _apply_memory_policy swapped the UNet's layers
        self.text_encoder_released_bytes = 0
        self.memory_limit: int | None = None
        self.memory_tight = False  # memory_limit below model.unet_int8_below_gib
        self.channels_last_weights: dict[str, str] = {}  # component -> "mapped" | why not
        self.model_defaults: dict[str, Any] = {}  # the manifest's inference defaults (presets.py)
        self.has_draft_decoder = False  # the folder holds an AutoencoderTiny for decoder: draft
        self.last_run: dict[str, Any] = {}  # how the last inpaint ran: guidance batch, cut-off, caching
        self._draft_decoder: Any = None  # AutoencoderTiny, loaded on the first draft job
        if config.compile == "inductor":
            self._compile_unet()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, model: ModelConfig) -> "Engine":
        """Load the configured model (or the embedded tiny random model when model.path is None).

        Raises ModelError for a folder that is missing, not a diffusers inpainting model,
        holds pickle weights without allow_pickle, or fails to load.
        """
        start = time.monotonic()
        dtype = _resolve_dtype(model.dtype)
        threads = model.threads or physical_cores()
        torch.set_num_threads(threads)
        if model.path is None:
            from .testmodels import ensure_embedded_model

            path = ensure_embedded_model(model.cache_dir, dtype=dtype)
        else:
            path = Path(model.path)
        layout = models.inspect_model(path, allow_pickle=model.allow_pickle)
        if layout.manifest is not None and layout.manifest.get("dtype") not in (None, dtype):
            log.warning(
                "model_dtype_mismatch",
                path=str(path),
                files=layout.manifest.get("dtype"),
                runtime=dtype,
                hint="loading converts every tensor; prepare-model with the runtime dtype loads by mmap",
            )
        from .extras import DRAFT_DECODER

        has_draft_decoder = (path / DRAFT_DECODER / "config.json").is_file()  # what the folder held when loaded
        try:
            model_defaults = presets.check_defaults((layout.manifest or {}).get("defaults") or {},
                                                    has_draft_decoder=has_draft_decoder)
        except ModelError as exc:
            raise ModelError(f"{path}: the manifest's inference defaults are invalid: {exc}") from None
        pipeline = _load_pipeline(path, layout, dtype)
        unet_in = int(pipeline.unet.config.in_channels)
        if unet_in != layout.unet_in_channels:  # inspect_model read the config; the folder changed under us
            raise ModelError(f"{path}: loaded UNet has {unet_in} input channels, its config says {layout.unet_in_channels}")
        if model.attention_slicing == "on":
            pipeline.enable_attention_slicing()
        info = ModelInfo(
            path=str(path),
            model_id=str(layout.manifest["id"]) if layout.manifest and "id" in layout.manifest else _raw_id(path),
            random_weights=layout.random_weights,
            dtype=dtype,
            unet_in_channels=unet_in,
            architecture=models.architecture_name(layout.unet_config),
            manifest=layout.manifest,
        )
        engine = cls(pipeline, model, info, layout, threads)
        engine.model_defaults = model_defaults
        engine.has_draft_decoder = has_draft_decoder
        engine._apply_memory_policy()
        engine.load_seconds = time.monotonic() - start
        log.info(
            "model_loaded",
            path=info.path,
            model_id=info.model_id,
            architecture=info.architecture,
            dtype=dtype,
            files_dtype=layout.files_dtype,
            threads=threads,
            random_weights=info.random_weights,
            seconds=round(engine.load_seconds, 3),
        )
        return engine

    # -- public calls ----------------------------------------------------------------------

    def warm(
        self,
        work_sizes: Sequence[tuple[int, int]],
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Run a 1-step inference per working (width, height) so later jobs start hot."""
        from PIL import Image

        sizes = list(dict.fromkeys((int(w), int(h)) for w, h in work_sizes))
        # The model's own scheduler and guidance: a few-step model without CFG warms at batch 1.
        params = InpaintParams(
            prompt="",
            negative_prompt="",
            scheduler=str(self.model_defaults.get("scheduler", "dpmpp_2m_karras")),
            steps=1,
            guidance=float(self.model_defaults.get("guidance", 7.5)),
            strength=1.0,
            seed=0,
            decoder="draft" if self.model_defaults.get("decoder") == "draft" and self.has_draft_decoder else "full",
        )
        for done, (width, height) in enumerate(sizes, start=1):
            start = time.monotonic()
            image = Image.new("RGB", (width, height), (127, 127, 127))
            mask = Image.new("L", (width, height), 255)
            self.inpaint(image, mask, params)
            log.info("warmed", width=width, height=height, seconds=round(time.monotonic() - start, 3))
            if on_progress is not None:
                on_progress(done, len(sizes))

    def inpaint(
        self,
        image: Any,
        mask: Any,
        params: InpaintParams,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Any:
        """Paint one working-size crop; returns an RGB image of the same size.

        image is RGB, mask is L (255 = repaint), both the same size with sides that are
        multiples of 8. on_step(done, total) runs after every denoising step; whatever it
        raises (e.g. errors.Interrupted) propagates unchanged and ends the run.
        """
        width, height = image.size
        if mask.size != image.size:
            raise ValueError(f"mask size {mask.size} differs from image size {image.size}")
        if width % 8 or height % 8 or width < 8 or height < 8:
            raise ValueError(f"working size {width}x{height} must have sides that are multiples of 8")
        if image.mode != "RGB":
            image = image.convert("RGB")
        if mask.mode != "L":
            mask = mask.convert("L")
        with self._lock:
            return self._run(image, mask, params, on_step)

    def draft_decoder(self) -> Any:
        if self._draft_decoder is None:
            from diffusers import AutoencoderTiny

            from .extras import DRAFT_DECODER

            self._draft_decoder = AutoencoderTiny.from_pretrained(
                str(Path(self.info.path) / DRAFT_DECODER), torch_dtype=_TORCH_DTYPES[self.info.dtype],
                local_files_only=True, use_safetensors=True,
            ).eval().requires_grad_(False)
        return self._draft_decoder

    def runtime_report(self, work_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Which runtime policies apply (for the sidecar and `inpaintd status`)."""
        return {
            "dtype": self.info.dtype,
            "files_dtype": self.layout.files_dtype,
            "zero_copy_load": self.layout.files_dtype == self.info.dtype,
            "threads": self.threads,
            "attention": "sliced" if self.config.attention_slicing == "on" else "sdpa",
            "vae_tiling": self._want_vae_tiling(work_size) if work_size else self.config.vae_tiling == "on",
            "compile": self._compile_state,
            "channels_last": self.config.channels_last,
            "channels_last_weights": self.channels_last_weights or "off",
            "unet_weights": self.unet_weights,
            "memory_limit_bytes": self.memory_limit,
            "memory_tight": self.memory_tight,
            "malloc_trim": self.config.malloc_trim,
            "allocator": memory.allocator(),
            "text_encoder_released_mib": round(self.text_encoder_released_bytes / 2**20),
            "text_embedding_cache": {
                "size": self.config.text_embedding_cache,
                "entries": len(self._embeddings),
                "hits": self.embedding_hits,
                "misses": self.embedding_misses,
            },
            **self.last_run,
        }

    # -- internals -------------------------------------------------------------------------

    def scheduler(self, name: str) -> Any:
        sched = self._schedulers.get(name)
        if sched is None:
            sched = make_scheduler(name, self._base_scheduler_config)
            self._schedulers[name] = sched
        return sched

    def encode(self, prompt: str, negative_prompt: str) -> tuple[Any, Any]:
        """(prompt_embeds, negative_prompt_embeds), from the LRU cache when possible."""
        key = (prompt, negative_prompt)
        cached = self._embeddings.get(key)
        if cached is not None:
            self._embeddings.move_to_end(key)
            self.embedding_hits += 1
            return cached
        self.embedding_misses += 1
        with torch.inference_mode():
            embeds, negative = self.pipeline.encode_prompt(
                prompt,
                torch.device("cpu"),
                1,
                True,
                negative_prompt=negative_prompt,
            )
        value = (embeds, negative)
        if self.config.release_text_encoder:
            self._release_text_encoder()
        if self.config.text_embedding_cache > 0:
            self._embeddings[key] = value
            while len(self._embeddings) > self.config.text_embedding_cache:
                self._embeddings.popitem(last=False)
        return value

    def _release_text_encoder(self) -> None:
        """Drop the text encoder's mapped weight pages until the next new prompt needs them.

        Embeddings are cached, so the 0.23 GiB encoder (SD-1.5, bf16) sits idle through the
        denoising loop and the VAE passes. Only file-backed (mmapped) weights are released;
        see memory.release_file_pages. A new prompt faults them back in (~0.1-0.3 s).
        """
        storages = {}
        for tensor in list(self.pipeline.text_encoder.parameters()) + list(self.pipeline.text_encoder.buffers()):
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        released = memory.release_file_pages(list(storages.items()))
        self.text_encoder_released_bytes = released

    def _want_vae_tiling(self, work_size: tuple[int, int]) -> bool:
        if self.config.vae_tiling == "on":
            return True
        if self.config.vae_tiling == "off":
            return False
        return max(work_size) >= self.config.vae_tiling_min_side

    def _set_vae_tiling(self, on: bool) -> None:
        if on == self._vae_tiled:
            return
        vae = self.pipeline.vae
        if on:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        self._vae_tiled = on

    def _run(self, image: Any, mask: Any, params: InpaintParams, on_step: Callable[[int, int], None] | None) -> Any:
        pipe = self.pipeline
        pipe.scheduler = self.scheduler(params.scheduler)
        self._set_vae_tiling(self._want_vae_tiling(image.size))
        prompt_embeds, negative_embeds = self.encode(params.prompt, params.negative_prompt)
        step_error: list[BaseException] = []
        cache = self._step_cache(params.step_cache)
        counts = {"cfg": 0, "full": 0}
        draft = params.decoder == "draft"
        if draft and not self.has_draft_decoder:
            raise ValueError("decoder: draft needs a model prepared with --draft-decoder")

        def callback(pipeline: Any, index: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            total = int(getattr(pipeline, "_num_timesteps", 0) or params.steps)
            if cache is not None and cache.start_timestep is not None:
                counts["full"] += (cache.cur_timestep - cache.start_timestep) % params.step_cache == 0
            if pipeline.do_classifier_free_guidance:
                counts["cfg"] += 1
                if index == int(total * params.cfg_cutoff):
                    kwargs = _cut_guidance(pipeline, kwargs)
                    if cache is not None:
                        cache.start_timestep = None  # cached features are batch 2: the next step runs in full
            if on_step is not None:
                try:
                    on_step(index + 1, total)
                except BaseException as exc:
                    step_error.append(exc)  # marks it as the caller's: never retried, never wrapped
                    raise
            return kwargs

        def call() -> Any:
            generator = torch.Generator("cpu").manual_seed(int(params.seed))
            counts.update(cfg=0, full=0)
            with torch.inference_mode():
                return pipe(
                    prompt_embeds=prompt_embeds,
                    negative_prompt_embeds=negative_embeds,
                    image=image,
                    mask_image=mask,
                    height=image.size[1],
                    width=image.size[0],
                    num_inference_steps=int(params.steps),
                    guidance_scale=float(params.guidance),
                    strength=float(params.strength),
                    eta=TCD_ETA if params.scheduler == "tcd" else 0.0,
                    generator=generator,
                    output_type="latent" if draft else "pil",
                    callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=list(_CUT_TENSORS),
                ).images

        if cache is not None:
            cache.enable()
        try:
            try:
                result = call()
            except Exception as exc:
                if step_error or self._compile_state != "inductor-pending":
                    raise
                # The first compiled run failed inside torch.compile: fall back to eager for good.
                self._compile_failed(exc)
                result = call()
        finally:
            if cache is not None:
                cache.disable()
        if self._compile_state == "inductor-pending":
            self._compile_state = "inductor"
        result = self._decode_draft(result) if draft else result[0]
        ran = int(getattr(pipe, "_num_timesteps", 0) or params.steps)
        self.last_run = {
            "guidance": {
                "scale": float(params.guidance),
                "classifier_free": counts["cfg"] > 0,
                "unet_batch": 2 if counts["cfg"] else 1,
                "cfg_steps": counts["cfg"],
                "batch1_steps": ran - counts["cfg"],
                "cfg_cutoff": float(params.cfg_cutoff),
            },
            "step_cache": (
                {"method": "deepcache", "interval": params.step_cache, "full_steps": counts["full"],
                 "cached_steps": ran - counts["full"]}
                if cache is not None else {"method": "off" if params.step_cache <= 1 else "off (compiled UNet)"}
            ),
            "decoder": "draft (AutoencoderTiny, lower quality)" if draft else "full (the model's VAE)",
            "eta": TCD_ETA if params.scheduler == "tcd" else 0.0,
        }
        if self.config.malloc_trim:
            memory.malloc_trim()
        return result

    def _decode_draft(self, latents: Any) -> Any:
        """The pipeline's final latents through the tiny decoder, post-processed as diffusers does."""
        tiny = self.draft_decoder()
        with torch.inference_mode():
            pixels = tiny.decode(latents.to(tiny.dtype) / tiny.config.scaling_factor, return_dict=False)[0]
            return self.pipeline.image_processor.postprocess(pixels, output_type="pil")[0]

    def _step_cache(self, interval: int) -> Any:
        """A DeepCache helper on the eager UNet for `interval` > 1 (None: off, or the UNet is compiled)."""
        if interval <= 1 or self.pipeline.unet is not self._eager_unet:
            return None
        return deepcache_helper(self, interval)

    def _apply_memory_policy(self) -> None:
        """channels_last hooks, int8 UNet and malloc_trim hooks, as configured (see config.ModelConfig)."""
        pipe = self.pipeline
        self.memory_limit = memory.memory_limit_bytes()
        if self.config.channels_last:
            for module in (self._eager_unet, pipe.vae.encoder, pipe.vae.decoder):
                module.register_forward_pre_hook(_to_channels_last)
        if self.config.malloc_trim:
            # Before each VAE pass (the UNet loop's freed blocks go back first) and after it.
            for module in (pipe.vae.encoder, pipe.vae.decoder):
                module.register_forward_pre_hook(_trim_before)
                module.register_forward_hook(_trim_after)
        setting = self.config.unet_int8
        below = self.config.unet_int8_below_gib * 2**30
        self.memory_tight = self.memory_limit is not None and self.memory_limit < below
        if setting == "on" or (setting == "auto" and self.memory_tight):
            self._quantize_unet()
        if self.config.channels_last and self.config.channels_last_weights != "off":
            self._channels_last_weights()

    def _channels_last_weights(self) -> None:
        """Conv weights as channels-last views of a cache file (layout.py): oneDNN then takes them
        as they are instead of re-laying each one out at every call, and they stay file-backed.
        Without a writable cache the weights stay as loaded; the job runs either way."""
        from . import layout

        start = time.monotonic()
        report: dict[str, Any] = {}
        for component, module in (("unet", self._eager_unet), ("vae", self.pipeline.vae)):
            convs = layout.conv_weights(module)
            # The file pages of the old order, unused from here on: dropped, or the weights the
            # cache was built from would go on counting in RSS beside the mapped cache.
            old = [(c.weight.data_ptr(), c.weight.untyped_storage().nbytes()) for c in convs.values()]
            cache = layout.cache_path(Path(self.config.cache_dir), self.info.model_id, component)
            try:
                stats = layout.apply_channels_last(module, cache, model_id=self.info.model_id, component=component,
                                                   source=layout.folder_identity(Path(self.info.path) / component))
            except OSError as exc:
                log.warning("channels_last_weights_unavailable", component=component, cache=str(cache), error=str(exc))
                report[component] = "as loaded (cache unwritable)"
                continue
            memory.release_file_pages(old)
            report[component] = "mapped"
            log.info("channels_last_weights", component=component, layers=stats.layers,
                     mib=round(stats.bytes / 2**20), built_cache=stats.built, cache=stats.cache)
        self.channels_last_weights = report
        log.info("channels_last_weights_ready", seconds=round(time.monotonic() - start, 3))

    def _quantize_unet(self) -> None:
        from . import quant

        unet = self._eager_unet
        start = time.monotonic()
        cache = quant.cache_path(self.config.cache_dir, self.info.model_id)
        try:
            stats = quant.load_or_build(unet, cache, unet.dtype, model_id=self.info.model_id)
        except OSError as exc:
            # An unwritable cache costs memory (the int8 weights become anonymous), not the job.
            log.warning("int8_cache_unwritable", cache=str(cache), error=str(exc))
            stats = quant.quantize_module(unet, unet.dtype)
        self.unet_weights = "int8"
        log.info(
            "unet_int8",
            layers=stats["layers"],
            mib=round(stats["weight_bytes_after"] / 2**20),
            built_cache=stats.get("built"),
            memory_limit_mib=None if self.memory_limit is None else self.memory_limit // 2**20,
            seconds=round(time.monotonic() - start, 3),
        )
        memory.malloc_trim()

    def _compile_unet(self) -> None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir(
            os.environ.get("TORCHINDUCTOR_CACHE_DIR"), Path(self.config.cache_dir)
        )
        try:
            self.pipeline.unet = torch.compile(self._eager_unet, backend="inductor")
            self._compile_state = "inductor-pending"  # compiles on the first run; confirmed there
        except Exception as exc:  # torch.compile itself refused (unsupported platform/python)
            self._compile_failed(exc)

    def _compile_failed(self, exc: BaseException) -> None:
        log.warning("compile_failed_fallback_to_eager", error=f"{type(exc).__name__}: {exc}"[:500])
        self.pipeline.unet = self._eager_unet
        self._compile_state = "inductor-failed"


def deepcache_helper(engine: Engine, interval: int) -> Any:
    """DeepCache on `engine`'s eager UNet: the UNet's and its blocks' forward methods wrapped while
    enabled, the shallowest branch (cache_branch_id 0) recomputed every step, the rest every
    `interval` steps. It reads the scheduler only for the current timestep's index."""
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=engine._eager_unet, scheduler=engine.pipeline.scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    return helper


# TCD's stochasticity ("gamma" in the paper). TCDScheduler.step defaults to it and the TCD
# authors' examples pass it, but the inpainting pipeline's own eta=0.0 overrides the scheduler's
# default; "a value of 0.3 often yields good results" (diffusers' TCD docs).
TCD_ETA = 0.3

# The pipeline's tensors that carry the CFG batch (negative half first) into the next step.
_CUT_TENSORS = ("prompt_embeds", "mask", "masked_image_latents")


def _cut_guidance(pipeline: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """From the next step on, no classifier-free guidance: the UNet runs at batch 1.

    diffusers' SDCFGCutoffCallback trims only prompt_embeds, which breaks the inpainting UNet
    (its mask and masked-image latents are batched for CFG too and are concatenated to the
    latents): all three keep their conditional half.
    """
    pipeline._guidance_scale = 0.0
    return {key: value[-1:] for key, value in kwargs.items() if key in _CUT_TENSORS}


def inductor_cache_dir(current: str | None, cache_dir: Path) -> str:
    """Where torch.compile keeps its artifacts: the operator's TORCHINDUCTOR_CACHE_DIR, else cache_dir.

    Inductor's default is /tmp/torchinductor_<user>, which the unit's PrivateTmp=yes empties at
    every restart; under cache_dir the compiled graphs and kernels survive, so a restart
    re-traces but does not generate and compile C++ again (BENCHMARKS.md, Levers). Importing
    torch._inductor writes that default into the environment, so a value equal to it is
    torch's, not the operator's.
    """
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        torch_default: str | None = os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - a private helper; without it any value counts as chosen
        torch_default = None
    if current and os.path.abspath(current) != torch_default:
        return current
    return str(cache_dir / "torchinductor")


def _to_channels_last(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """Forward pre-hook: the first (image/latent) argument in channels-last layout.

    oneDNN runs convolutions natively in NHWC; with NCHW tensors every convolution pays a
    reorder in and out (measured: 40% of the VAE decoder's time). The layout propagates
    through the network, so converting the input is enough and the weights are not copied.
    """
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


def _trim_before(module: Any, args: Any) -> None:
    memory.malloc_trim()


def _trim_after(module: Any, args: Any, output: Any) -> None:
    memory.malloc_trim()


def _load_pipeline(path: Path, layout: models.ModelLayout, dtype: str) -> Any:
    import diffusers
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    dlogging.disable_progress_bar()
    tlogging.disable_progress_bar()
    kwargs: dict[str, Any] = {
        "low_cpu_mem_usage": True,
        "use_safetensors": layout.weight_format == "safetensors",
        "local_files_only": True,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
    # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns).
    dtype_key = "dtype" if hasattr(diffusers.utils.deprecation_utils, "_resolve_dtype") else "torch_dtype"
    kwargs[dtype_key] = _TORCH_DTYPES[dtype]
    if layout.variant:
        kwargs["variant"] = layout.variant
    try:
        pipeline = StableDiffusionInpaintPipeline.from_pretrained(str(path), **kwargs)
    except ModelError:
        raise
    except Exception as exc:  # diffusers/transformers raise many kinds for a broken folder
        raise ModelError(f"cannot load model {path}: {type(exc).__name__}: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    for module in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        module.eval()
        module.requires_grad_(False)
    return pipeline


def _raw_id(path: Path) -> str:
    """A short id for an unprepared folder: configs' contents and weight files' names and sizes."""
    digest = hashlib.sha256()
    for f in sorted(path.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(path).as_posix()
        if f.suffix == ".json":
            digest.update(f"{rel}\0".encode() + f.read_bytes())
        else:
            digest.update(f"{rel}\0{f.stat().st_size}\n".encode())
    return "raw-" + digest.hexdigest()[:12]


def describe(engine: Engine) -> dict[str, Any]:
    """Model info and runtime report as one JSON-able dict (for `inpaintd status`)."""
    info = engine.info
    return {
        "path": info.path,
        "id": info.model_id,
        "architecture": info.architecture,
        "dtype": info.dtype,
        "random_weights": info.random_weights,
        "load_seconds": round(engine.load_seconds, 3),
        "runtime": engine.runtime_report(),
    }


__all__ = ["Engine", "ModelInfo", "detect_dtype", "physical_cores", "versions", "make_scheduler", "describe"]
