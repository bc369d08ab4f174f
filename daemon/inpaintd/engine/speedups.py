"""The CPU levers, each a function over a loaded pipeline: memory policy, the weights' form
(weightpolicy: derived cache or per-layer upcast), channels-last weights, the int8 UNet,
torch.compile's cache, DeepCache step caching and the CFG cut-off.

Each is switched by a ModelConfig field or a job parameter; the engine calls them at load
(`apply_memory_policy`) or per call (`deepcache_helper`, `cut_guidance`) and reports what
applied in the sidecar's "runtime".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import structlog
import torch

from . import channels_last, memory, quant
from .upcast import upcast_at_call
from .weightpolicy import WeightForm

log = structlog.get_logger("inpaintd.engine")

def deepcache_helper(engine: Any, interval: int) -> Any:
    """DeepCache on `engine`'s eager UNet: the UNet's and its blocks' forward methods wrapped while
    enabled, the shallowest branch (cache_branch_id 0) recomputed every step, the rest every
    `interval` steps. It reads the scheduler only for the current timestep's index."""
    from types import SimpleNamespace

    from DeepCache import DeepCacheSDHelper

    helper = DeepCacheSDHelper(pipe=SimpleNamespace(unet=engine._eager_unet, scheduler=engine.pipeline.scheduler))
    helper.set_params(cache_interval=interval, cache_branch_id=0)
    return helper


# The pipeline's tensors that carry the CFG batch (negative half first) into the next step.
CUT_TENSORS = ("prompt_embeds", "mask", "masked_image_latents")


def cut_guidance(pipeline: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """From the next step on, no classifier-free guidance: the UNet runs at batch 1.

    diffusers' SDCFGCutoffCallback trims only prompt_embeds, which breaks the inpainting UNet
    (its mask and masked-image latents are batched for CFG too and are concatenated to the
    latents): all three keep their conditional half.
    """
    pipeline._guidance_scale = 0.0
    return {key: value[-1:] for key, value in kwargs.items() if key in CUT_TENSORS}


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


_COMPUTE = {"bf16": torch.bfloat16, "fp32": torch.float32}


def apply_memory_policy(engine: Any) -> None:
    """channels_last hooks, the weights' form, int8 UNet and malloc_trim hooks, as configured
    (see config.ModelConfig and weightpolicy.py)."""
    pipe = engine.pipeline
    engine.memory_limit = memory.memory_limit_bytes()
    if engine.config.channels_last:
        for module in (engine._eager_unet, pipe.vae.encoder, pipe.vae.decoder):
            module.register_forward_pre_hook(_to_channels_last)
    if engine.config.malloc_trim:
        # Before each VAE pass (the UNet loop's freed blocks go back first) and after it.
        for module in (pipe.vae.encoder, pipe.vae.decoder):
            module.register_forward_pre_hook(_trim_before)
            module.register_forward_hook(_trim_after)
    compute = _COMPUTE[engine.info.dtype]
    form = engine.weight_policy.form
    nhwc = engine.config.channels_last and engine.config.channels_last_weights != "off"
    if form is WeightForm.CACHE:
        derive_weights(engine, compute, nhwc)
    setting = engine.config.unet_int8
    below = engine.config.unet_int8_below_gib * 2**30
    engine.memory_tight = engine.memory_limit is not None and engine.memory_limit < below
    if setting == "on" or (setting == "auto" and engine.memory_tight):
        quantize_unet(engine, compute)
    if nhwc and form is not WeightForm.CACHE:  # a derived cache holds its conv weights channels-last already
        map_channels_last_weights(engine)
    if form is WeightForm.UPCAST:
        engine.upcast_layers = sum(upcast_at_call(module, compute).layers for module in _components(engine).values())
        memory.malloc_trim()


def _components(engine: Any) -> dict[str, Any]:
    pipe = engine.pipeline
    return {"unet": engine._eager_unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}


def _mapped_ranges(module: Any) -> list[tuple[int, int]]:
    return [(t.data_ptr(), t.untyped_storage().nbytes())
            for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]


def derive_weights(engine: Any, compute: torch.dtype, nhwc: bool) -> None:
    """Every component's weights in the compute dtype, written once to cache_dir/layout and mapped from it
    (channels_last.apply_derived; conv weights channels-last when `nhwc`). Without a writable cache
    the component is converted in memory, as diffusers would have: the job runs either way."""
    start = time.monotonic()
    report: dict[str, str] = {}
    for component, module in _components(engine).items():
        old = _mapped_ranges(module)
        order = nhwc and component != "text_encoder"  # the text encoder has no convolutions
        cache = channels_last.derived_path(Path(engine.config.cache_dir), engine.info.model_id, component, compute, order)
        try:
            stats = channels_last.apply_derived(module, cache, dtype=compute, nhwc=order, model_id=engine.info.model_id,
                                                component=component,
                                                source=channels_last.folder_identity(Path(engine.info.path) / component))
        except OSError as exc:
            log.warning("derived_weights_unavailable", component=component, cache=str(cache), error=str(exc))
            module.to(compute)
            report[component] = "in memory (cache unwritable)"
            continue
        # The files' pages, unused from here on (the cache replaced every tensor).
        memory.release_file_pages(old)
        report[component] = "mapped"
        log.info("derived_weights", component=component, dtype=str(compute), tensors=stats.layers,
                 mib=round(stats.bytes / 2**20), built_cache=stats.built, cache=stats.cache)
    engine.derived_weights = report
    if nhwc:
        engine.channels_last_weights = {c: "mapped (derived)" for c in ("unet", "vae") if report.get(c) == "mapped"}
    log.info("derived_weights_ready", seconds=round(time.monotonic() - start, 3))


def map_channels_last_weights(engine: Any) -> None:
    """Conv weights as channels-last views of a cache file (channels_last.py): oneDNN then takes them
    as they are instead of re-laying each one out at every call, and they stay file-backed.
    Without a writable cache the weights stay as loaded; the job runs either way."""
    start = time.monotonic()
    report: dict[str, Any] = {}
    for component, module in (("unet", engine._eager_unet), ("vae", engine.pipeline.vae)):
        convs = channels_last.conv_weights(module)
        # The file pages of the old order, unused from here on: dropped, or the weights the
        # cache was built from would go on counting in RSS beside the mapped cache.
        old = [(c.weight.data_ptr(), c.weight.untyped_storage().nbytes()) for c in convs.values()]
        cache = channels_last.cache_path(Path(engine.config.cache_dir), engine.info.model_id, component)
        try:
            stats = channels_last.apply_channels_last(module, cache, model_id=engine.info.model_id, component=component,
                                               source=channels_last.folder_identity(Path(engine.info.path) / component))
        except OSError as exc:
            log.warning("channels_last_weights_unavailable", component=component, cache=str(cache), error=str(exc))
            report[component] = "as loaded (cache unwritable)"
            continue
        memory.release_file_pages(old)
        report[component] = "mapped"
        log.info("channels_last_weights", component=component, layers=stats.layers,
                 mib=round(stats.bytes / 2**20), built_cache=stats.built, cache=stats.cache)
    engine.channels_last_weights = report
    log.info("channels_last_weights_ready", seconds=round(time.monotonic() - start, 3))

def quantize_unet(engine: Any, compute: torch.dtype) -> None:
    unet = engine._eager_unet
    start = time.monotonic()
    cache = quant.cache_path(engine.config.cache_dir, engine.info.model_id)
    try:
        stats = quant.load_or_build(unet, cache, compute, model_id=engine.info.model_id)
    except OSError as exc:
        # An unwritable cache costs memory (the int8 weights become anonymous), not the job.
        log.warning("int8_cache_unwritable", cache=str(cache), error=str(exc))
        stats = quant.quantize_module(unet, compute)
    engine.unet_weights = "int8"
    log.info(
        "unet_int8",
        layers=stats["layers"],
        mib=round(stats["weight_bytes_after"] / 2**20),
        built_cache=stats.get("built"),
        memory_limit_mib=None if engine.memory_limit is None else engine.memory_limit // 2**20,
        seconds=round(time.monotonic() - start, 3),
    )
    memory.malloc_trim()
