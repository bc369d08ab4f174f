"""What a prepared model is, in a few lines (`inpaintd check DIR`), read from its files only.

No torch: the manifest, the configs and the safetensors headers say everything. The memory
figure is an estimate, not a measurement: the process itself (~0.3 GiB), the UNet and VAE
weights (mapped from disk, resident while a job runs; the text encoder's pages are dropped
after encoding) and the activations of a 512x512 job, 0.7 GiB as measured for SD-1.5 in bf16
(BENCHMARKS.md, "Where the memory goes"), scaled by the UNet's width and the dtype's size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..weights.folder import WEIGHT_COMPONENTS, architecture_name, inspect_model

GIB = 2**30
_PROCESS_BYTES = int(0.3 * GIB)
_SD15_ACTIVATION_BYTES_BF16 = int(0.7 * GIB)
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelSummary:
    """The facts `inpaintd check` prints about one prepared model folder."""

    path: Path
    architecture: str
    unet_in_channels: int
    cross_attention_dim: int | None
    dtype: str
    origin: dict[str, Any]
    vae: dict[str, Any] | None
    embeddings: list[dict[str, Any]] = field(default_factory=list)
    random_weights: bool = False
    disk_bytes: int = 0
    component_bytes: dict[str, int] = field(default_factory=dict)
    job_512_bytes: int = 0
    prediction_type: str = "epsilon"
    loras: list[dict[str, Any]] = field(default_factory=list)
    defaults: dict[str, Any] = field(default_factory=dict)


def summarize(path: Path) -> ModelSummary:
    """Summary of a prepared (or plain diffusers) model folder; raises ModelError if it is not one."""
    path = Path(path)
    layout = inspect_model(path, allow_pickle=True)
    manifest = layout.manifest or {}
    unet = layout.unet_config
    components = {
        c: sum(f.stat().st_size for f in (path / c).glob("*.safetensors")) for c in WEIGHT_COMPONENTS
    }
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    dtype = str(manifest.get("dtype") or layout.files_dtype)
    width = (unet.get("block_out_channels") or [320])[0]
    activations = _SD15_ACTIVATION_BYTES_BF16 * width / 320 * _ITEMSIZE.get(dtype, 4) / 2
    extras = manifest.get("extras") or {}
    try:
        scheduler = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        scheduler = {}
    return ModelSummary(
        path=path,
        architecture=architecture_name(unet),
        unet_in_channels=layout.unet_in_channels,
        cross_attention_dim=unet.get("cross_attention_dim"),
        dtype=dtype,
        origin=manifest.get("origin") or {"format": "diffusers-folder" if manifest else "diffusers-folder (not prepared)"},
        vae=extras.get("vae"),
        embeddings=list(extras.get("embeddings") or []),
        random_weights=layout.random_weights,
        disk_bytes=disk,
        component_bytes=components,
        job_512_bytes=int(_PROCESS_BYTES + components["unet"] + components["vae"] + activations),
        prediction_type=str(scheduler.get("prediction_type", "epsilon")),
        loras=[r for r in manifest.get("loras") or [] if isinstance(r, dict)],
        defaults=dict(manifest.get("defaults") or {}),
    )


def format_summary(s: ModelSummary) -> list[str]:
    """The summary as aligned lines for a terminal."""
    if s.unet_in_channels == 9:
        kind = "inpainting UNet, 9 input channels (latent + mask + masked image)"
    else:
        kind = "text-to-image UNet, 4 input channels: painted by latent blending (see README)"
    parts = ", ".join(f"{name.replace('_', ' ')} {_gib(size)}" for name, size in s.component_bytes.items())
    vectors = [f"{e['token']} ({e['vectors']} vector{'s' if e['vectors'] != 1 else ''})" for e in s.embeddings]
    lines = [
        f"architecture  {s.architecture}: {kind}; cross-attention {s.cross_attention_dim}; {s.prediction_type}",
        f"weights       {s.dtype}, {_gib(s.disk_bytes)} on disk ({parts})",
        f"made from     {_origin(s.origin)}",
        f"VAE           {'swapped in from ' + s.vae['source'] if s.vae else 'the model' + chr(39) + 's own'}",
        "embeddings    " + (", ".join(vectors) or "none"),
        "LoRAs fused   " + ("; ".join(lora_line(r) for r in s.loras) or "none"),
        "defaults      " + (", ".join(f"{k}={v}" for k, v in sorted(s.defaults.items())) or "none (the config's)"),
        "weights are   " + ("RANDOM: for tests and benchmarks, paints noise" if s.random_weights else "not marked random"),
        f"512x512 job   about {_gib(s.job_512_bytes)} of memory (estimate: process + UNet and VAE weights + activations)",
    ]
    return lines


def lora_line(record: dict[str, Any]) -> str:
    """One fused LoRA as `check` and prepare-model print it."""
    layers = record.get("layers") or {}
    where = ", ".join(f"{n} {c.replace('_', ' ')}" for c, n in layers.items() if n)
    return (f"{record.get('file')} x{record.get('scale')} ({record.get('layout')}, rank "
            f"{'/'.join(str(r) for r in record.get('ranks') or [])}, {where} layers; sha256 {str(record.get('sha256'))[:12]})")


def _origin(origin: dict[str, Any]) -> str:
    fmt = origin.get("format", "?")
    if fmt == "single-file":
        ema = ", EMA weights" if origin.get("ema") else ""
        what = f"{origin.get('kind')}, {origin.get('files_dtype')}{ema}; configs {origin.get('configs')}"
        return f"a single-file checkpoint ({what})"
    if fmt == "add-difference":
        return (
            f"add-difference merge: {origin.get('inpainting_base')} + (custom - {origin.get('base')}); "
            f"custom from {_origin(origin.get('custom') or {})}"
        )
    return str(fmt).replace("-", " ")


def _gib(size: float) -> str:
    if size >= 0.1 * GIB:
        return f"{size / GIB:.2f} GiB"
    return f"{size / 2**20:.1f} MiB"
