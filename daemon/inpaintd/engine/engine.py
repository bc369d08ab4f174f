"""The Engine: a loaded inpainting pipeline that paints one working-size crop (a core.jobs.Painter).

`Engine.load(ModelConfig)` loads a diffusers inpainting folder once; `inpaint` paints one
working-size crop; `warm` runs one step at each shape it is given (the service picks them:
service.daemon.warm_shapes) so the first real job does not pay for compilation and page faults.

Runtime policy, each switch a ModelConfig field (the sidecar's "runtime" reports what applied):

- dtype ``auto|bf16|fp32``, the compute dtype: auto picks bf16 when the CPU computes it
  natively (x86 ``avx512_bf16``/``amx_bf16``, aarch64 ``bf16``; ``model.cpu_bf16: ignore`` or
  INPAINTD_CPU_BF16=0 says it does not: host.bf16_in_use), else fp32 (emulated bf16 is slower
  than fp32).
- weights ``auto|files|cache|upcast``: how the folder's weights meet the compute dtype
  (weightpolicy.choose_weight_policy). The pipeline loads in the files' own dtype, so
  safetensors maps them without a copy; a folder in another dtype is then converted once into
  ``cache_dir/layout`` (bf16 compute) or kept 16-bit and upcast per layer (fp32 compute).
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
- cfg_cutoff: guidance dropped after step int(steps x cfg_cutoff) (speedups.cut_guidance).
- step_cache > 1: DeepCache around the eager UNet for this job (`deepcache_helper`).
- decoder "draft": the final latents through the model's AutoencoderTiny (vae_tiny/).

The CPU policies (memory, channels-last weights, int8, compile, step caching) are functions in
speedups.py; host facts (bf16, cores, versions) in host.py; schedulers in schedulers.py.
An Engine is used by one worker thread at a time; a lock makes concurrent calls queue.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import structlog
import torch

from ..core import presets
from ..core.config import ModelConfig
from ..core.errors import Code, JobError, ModelError
from ..core.jobs import InpaintParams, Painted, StepCallback
from ..weights.folder import (
    DRAFT_DECODER,
    ModelFolder,
    architecture_name,
    inspect_model,
)
from . import memory
from .host import bf16_in_use, physical_cores, resolve_dtype, versions
from .loading import TORCH_DTYPES, load_pipeline, raw_id
from .prompts import (
    MAX_EXPANDED_EXTRA_TOKENS,
    expanded_extra_tokens,
    multi_vector_tokens,
)
from .schedulers import TCD_ETA, make_scheduler
from .speedups import (
    CUT_TENSORS,
    apply_memory_policy,
    cut_guidance,
    deepcache_helper,
    inductor_cache_dir,
)
from .weightpolicy import WeightForm, WeightPolicy, choose_weight_policy

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


class Engine:
    """A loaded inpainting pipeline plus the policies it runs under. Create with Engine.load."""

    def __init__(self, pipeline: Any, config: ModelConfig, info: ModelInfo, folder: ModelFolder, threads: int):
        self.pipeline = pipeline
        self.config = config
        self.info = info
        self.folder = folder
        self.versions = versions()  # of the pieces that decide the pixels, for the sidecar
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
        self._draft_decoder: Any = None  # AutoencoderTiny, loaded on the first draft job
        self._multi_vector_tokens = multi_vector_tokens(getattr(pipeline.tokenizer, "added_tokens_encoder", {}))
        self.weight_policy = WeightPolicy(info.dtype, info.dtype, WeightForm.FILES, "as loaded")
        self.cpu_bf16 = False  # whether bf16 counted as native when the policy was chosen
        self.derived_weights: dict[str, str] = {}  # component -> "mapped" | why not (WeightForm.CACHE)
        self.upcast_layers = 0  # layers whose 16-bit weights are upcast per call (WeightForm.UPCAST)
        if config.compile == "inductor":
            self._compile_unet()

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def load(cls, model: ModelConfig) -> "Engine":
        """Load the model folder `model.path` (the caller resolves an unset path: demo.model).

        Raises ModelError for a folder that is missing, not a diffusers inpainting model,
        holds pickle weights without allow_pickle, or fails to load.
        """
        start = time.monotonic()
        if model.path is None:
            raise ModelError("model.path is not set (the embedded model is resolved by demo.model.model_folder)")
        resolve_dtype(model.dtype, cpu_bf16=model.cpu_bf16)  # refuses a bad setting before any work
        bf16 = bf16_in_use(model.cpu_bf16)
        threads = model.threads or physical_cores()
        torch.set_num_threads(threads)
        path = Path(model.path)
        layout = inspect_model(path, allow_pickle=model.allow_pickle)
        policy = choose_weight_policy(bf16=bf16, dtype_setting=model.dtype, weights_setting=model.weights,
                                      folder_dtype=layout.files_dtype, mappable=layout.weight_format == "safetensors")
        dtype = policy.compute
        if policy.form is WeightForm.FILES and layout.files_dtype != dtype:
            log.warning(
                "model_dtype_mismatch",
                path=str(path),
                files=layout.files_dtype,
                runtime=dtype,
                hint="loading converts every tensor into anonymous memory; model.weights: auto maps them",
            )
        has_draft_decoder = (path / DRAFT_DECODER / "config.json").is_file()  # what the folder held when loaded
        try:
            model_defaults = presets.check_defaults((layout.manifest or {}).get("defaults") or {},
                                                    has_draft_decoder=has_draft_decoder)
        except ModelError as exc:
            raise ModelError(f"{path}: the manifest's inference defaults are invalid: {exc}") from None
        pipeline = load_pipeline(path, layout, policy.load)
        unet_in = int(pipeline.unet.config.in_channels)
        if unet_in != layout.unet_in_channels:  # inspect_model read the config; the folder changed under us
            raise ModelError(f"{path}: loaded UNet has {unet_in} input channels, its config says {layout.unet_in_channels}")
        if model.attention_slicing == "on":
            pipeline.enable_attention_slicing()
        info = ModelInfo(
            path=str(path),
            model_id=str(layout.manifest["id"]) if layout.manifest and "id" in layout.manifest else raw_id(path),
            random_weights=layout.random_weights,
            dtype=dtype,
            unet_in_channels=unet_in,
            architecture=architecture_name(layout.unet_config),
            manifest=layout.manifest,
        )
        engine = cls(pipeline, model, info, layout, threads)
        engine.model_defaults = model_defaults
        engine.has_draft_decoder = has_draft_decoder
        engine.weight_policy, engine.cpu_bf16 = policy, bf16
        apply_memory_policy(engine)
        engine.load_seconds = time.monotonic() - start
        log.info(
            "model_loaded",
            path=info.path,
            model_id=info.model_id,
            architecture=info.architecture,
            dtype=dtype,
            files_dtype=layout.files_dtype,
            weights=policy.form.value,
            cpu_bf16=bf16,
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
        on_step: StepCallback | None = None,
    ) -> Painted:
        """Paint one working-size crop: an RGB image of the same size, and how the call ran.

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

            self._draft_decoder = AutoencoderTiny.from_pretrained(
                str(Path(self.info.path) / DRAFT_DECODER), torch_dtype=TORCH_DTYPES[self.info.dtype],
                local_files_only=True, use_safetensors=True,
            ).eval().requires_grad_(False)
        return self._draft_decoder

    def runtime_report(self, work_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Which runtime policies apply (for the sidecar and `inpaintd status`)."""
        return {
            "dtype": self.info.dtype,
            "files_dtype": self.folder.files_dtype,
            "zero_copy_load": self.weight_policy.load == self.folder.files_dtype,
            "cpu_bf16": self.cpu_bf16,
            "weights": self.weight_policy.form.value,
            "weights_reason": self.weight_policy.reason,
            "derived_weights": self.derived_weights or "off",
            "upcast_layers": self.upcast_layers,
            "threads": self.threads,
            "attention": "sliced" if self.config.attention_slicing == "on" else "sdpa",
            "vae_tiling": self._vae_tiles(work_size) if work_size else self.config.vae_tiling == "on",
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
        for text in (prompt, negative_prompt):
            extra = expanded_extra_tokens(text, self._multi_vector_tokens)
            if extra > MAX_EXPANDED_EXTRA_TOKENS:
                # diffusers expands each multi-vector token in a loop outside any denoising step
                # (no watchdog ping, quadratic in the count): refused before it starts.
                raise JobError(Code.PROMPT_INVALID, f"the prompt names multi-vector embedding tokens that expand to "
                               f"{extra} more tokens; CLIP reads 77 in all", {"expanded_extra_tokens": extra})
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

    def _vae_tiles(self, work_size: tuple[int, int]) -> bool:
        """Whether the VAE really works in tiles at this size: diffusers tiles only an input
        larger than one tile, so `vae_tiling: on` at a small working size changes nothing and
        is reported as off."""
        tile = int(getattr(self.pipeline.vae, "tile_sample_min_size", 0) or 0)
        return self._want_vae_tiling(work_size) and max(work_size) > tile

    def _set_vae_tiling(self, on: bool) -> None:
        if on == self._vae_tiled:
            return
        vae = self.pipeline.vae
        if on:
            vae.enable_tiling()
        else:
            vae.disable_tiling()
        self._vae_tiled = on

    def _run(self, image: Any, mask: Any, params: InpaintParams, on_step: StepCallback | None) -> Painted:
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
            latents = kwargs.pop("latents", None)
            if latents is not None and not bool(torch.isfinite(latents).all()):
                # NaN weights (or an overflow) paint pure black and would be published as done.
                error = JobError(Code.OUTPUT_NOT_FINITE, f"the model's latents are NaN or infinite after step "
                                 f"{index + 1}/{total}; check the model with `inpaintd check`",
                                 {"step": index + 1, "total": total})
                step_error.append(error)
                raise error
            if cache is not None and cache.start_timestep is not None:
                counts["full"] += (cache.cur_timestep - cache.start_timestep) % params.step_cache == 0
            if pipeline.do_classifier_free_guidance:
                counts["cfg"] += 1
                if index == int(total * params.cfg_cutoff):
                    kwargs = cut_guidance(pipeline, kwargs)
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
                    callback_on_step_end_tensor_inputs=[*CUT_TENSORS, "latents"],
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
        report = {
            "guidance": {
                "scale": float(params.guidance),
                "classifier_free": counts["cfg"] > 0,
                "unet_batch": 2 if counts["cfg"] else 1,
                "cfg_steps": counts["cfg"],
                "batch1_steps": ran - counts["cfg"],
                "cfg_cutoff": float(params.cfg_cutoff),
                # Without classifier-free guidance (guidance <= 1) diffusers never reads the
                # negative prompt: the parameters still list it, this says it had no effect.
                "negative_prompt_used": bool(counts["cfg"]) and bool(params.negative_prompt),
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
        return Painted(result, report)

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


