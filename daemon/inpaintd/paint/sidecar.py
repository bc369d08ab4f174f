"""The sidecar: NAME.json beside each result, the one machine-readable account of a job.

The whole schema ("inpaintd.sidecar/1"): every key, and who writes it. A consumer waits for
NAME.json (it appears after the image) and reads it; keys are only ever added.

Written by `build_sidecar` (paint time):
  schema            "inpaintd.sidecar/1"
  name              the job's name (the inbox name without extension)
  inputs            image: {name, sha256, bytes, width, height, mode, format, exif_orientation};
                    mask: {name, sha256, bytes} for a mask file, {source: "alpha"} otherwise
  parameters        the resolved InpaintParams (prompt, negative_prompt, scheduler, steps, guidance,
                    strength, seed, cfg_cutoff, step_cache, decoder)
  parameter_sources each parameter -> job | config | model | builtin
  seed              the seed used (drawn when none was given)
  roi               the effective RoiConfig of this job
  regions           [{mask_box, crop_box, work_size, seconds}], boxes as [x0, y0, x1, y1]
  model             {path, id, dtype, architecture, random_weights, loras?}
  runtime           the painter's policies in effect (engine.runtime_report: what changed the
                    computation, not what was asked: vae_tiling only where it tiled) and how the
                    last region's call ran (guidance batch, cfg_cutoff, negative_prompt_used,
                    step_cache, decoder, eta)
  output            {format, sha256, bytes} and, for JPEG: jpeg_mode (lossless-outside |
                    reencoded | unchanged), jpeg_mcu, jpeg_painted_mcu_boxes or jpeg_reason
  timings           {read_seconds, paint_seconds, encode_seconds, total_seconds}
  peak_rss_bytes    the daemon's peak resident set so far
  versions          {python, torch, diffusers, transformers, inpaintd}
  warning           only for random-weight models (RANDOM_WEIGHTS_WARNING)
Added by `claim_fields` (the worker, from the claim): job_id, host, device, daemon_version,
  queue_wait_seconds, arrived, started, finished (ISO 8601 UTC), attempts, inputs_received_as.
Added by store.outbox.publish: status ("done"), output_file, sidecar_file, and renamed_from
  when NAME was taken and the result went to NAME-1 ...
"""

from __future__ import annotations

import hashlib
import resource
from dataclasses import asdict
from typing import Any, Mapping

from .. import __version__
from ..core.jobs import JobRequest, Painter, RegionReport, timestamp
from . import images

SIDECAR_SCHEMA = "inpaintd.sidecar/1"
# Every top-level key, by who writes it (the docstring above says what each holds).
PAINT_KEYS = ("schema", "name", "inputs", "parameters", "parameter_sources", "seed", "roi", "regions", "model",
              "runtime", "output", "timings", "peak_rss_bytes", "versions", "warning")
CLAIM_KEYS = ("job_id", "host", "device", "daemon_version", "queue_wait_seconds", "arrived", "started", "finished",
              "attempts", "inputs_received_as")
PUBLICATION_KEYS = ("status", "output_file", "sidecar_file", "renamed_from")
OPTIONAL_KEYS = ("warning", "renamed_from")  # random-weight models only; a taken NAME only

RANDOM_WEIGHTS_WARNING = (
    "random weights: this model exercises the whole pipeline but paints noise; "
    "install a real model for real results (see README)"
)


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build_sidecar(
    *,
    request: JobRequest,
    image_input: images.Input,
    mask_input: images.Input | None,
    engine: Painter,
    ran: Mapping[str, Any],
    source: images.LoadedImage,
    mask_source: str,
    roi: Any,
    reports: list[RegionReport],
    image_bytes: bytes,
    extension: str,
    jpeg_report: dict[str, Any] | None,
    timings: dict[str, float],
) -> dict[str, Any]:
    image_sha, image_size = image_input.digest
    inputs: dict[str, Any] = {
        "image": {
            "name": request.image.name,
            "sha256": image_sha,
            "bytes": image_size,
            "width": source.size[0],
            "height": source.size[1],
            "mode": source.mode,
            "format": source.format,
            "exif_orientation": source.orientation,
        }
    }
    if request.mask is not None and mask_input is not None:
        mask_sha, mask_size = mask_input.digest
        inputs["mask"] = {"name": request.mask.name, "sha256": mask_sha, "bytes": mask_size}
    else:
        inputs["mask"] = {"source": mask_source}

    info = engine.info
    model = {
        "path": info.path,
        "id": info.model_id,
        "dtype": info.dtype,
        "architecture": info.architecture,
        "random_weights": info.random_weights,
    }
    manifest = info.manifest or {}
    if manifest.get("loras"):
        model["loras"] = [
            {k: r.get(k) for k in ("file", "sha256", "scale", "layout", "ranks", "layers")} for r in manifest["loras"]
        ]
    sidecar: dict[str, Any] = {
        "schema": SIDECAR_SCHEMA,
        "name": request.name,
        "inputs": inputs,
        "parameters": asdict(request.params),
        "parameter_sources": dict(request.sources),
        "seed": request.params.seed,
        "roi": asdict(roi),
        "regions": [
            {
                "mask_box": list(r.mask_box),
                "crop_box": list(r.crop_box),
                "work_size": list(r.work_size),
                "seconds": r.seconds,
            }
            for r in reports
        ],
        "model": model,
        "runtime": {**engine.runtime_report(reports[0].work_size), **ran} if reports else {},
        "output": {
            "format": extension,
            "sha256": hashlib.sha256(image_bytes).hexdigest(),
            "bytes": len(image_bytes),
            **(jpeg_report or {}),
        },
        "timings": timings,
        "peak_rss_bytes": peak_rss_bytes(),
        "versions": {**engine.versions, "inpaintd": __version__},
    }
    if info.random_weights:
        sidecar["warning"] = RANDOM_WEIGHTS_WARNING
    return sidecar


def claim_fields(*, job_id: str, host: str, device: str, arrived: float, queue_wait: float, started: float,
                 finished: float, attempts: int, entries: list[str]) -> dict[str, Any]:
    """The sidecar keys the worker knows from the claim (times are epoch seconds; queue_wait is
    measured on a clock that does not step, so a wall clock stepped back cannot make it negative)."""
    return {
        "job_id": job_id,
        "host": host,
        "device": device,
        "daemon_version": __version__,
        "queue_wait_seconds": round(queue_wait, 3),
        "arrived": timestamp(arrived),
        "started": timestamp(started),
        "finished": timestamp(finished),
        "attempts": attempts,
        "inputs_received_as": entries,
    }
