"""One job, start to finish, without writing anything: inputs -> regions -> painter -> blend -> result.

The path of a job: read the image (display orientation) and its mask (a separate file or the
alpha channel) -> threshold and dilate (core.masks) -> split into regions (core.regions) -> for
each region crop with context, resize to its working size, let the painter (the engine, handed
in as a core.jobs.Painter) paint it, resize back and paste it with a feathered edge -> encode in
the input's format, mode, ICC and EXIF -> the sidecar (sidecar.py).
Pixels outside the dilated+feathered mask are never touched, so they stay byte-identical; a
JPEG from a JPEG is the input file with only the painted MCUs replaced (jpeg_lossless).
"""

from __future__ import annotations

import time
from typing import Any, Mapping

import numpy as np
from PIL import Image

from ..core import color, masks
from ..core.config import Config
from ..core.errors import JobError
from ..core.jobs import (
    InpaintParams,
    JobRequest,
    JobResult,
    Painter,
    RegionReport,
    StepCallback,
)
from ..core.masks import Box
from ..core.regions import Region, find_regions_within
from . import images, jpeg_lossless
from .jobspec import effective_roi
from .overlay import render_overlay
from .sidecar import build_sidecar


def run_job(
    engine: Painter,
    request: JobRequest,
    config: Config,
    on_step: StepCallback | None = None,
    debug_overlay: bool = False,
) -> JobResult:
    """Paint one job; raises JobError for bad input and lets Interrupted from on_step through."""
    clock = time.monotonic
    started = clock()
    if request.params.decoder == "draft" and not engine.has_draft_decoder:
        raise JobError("options_invalid", "decoder: draft needs a model prepared with --draft-decoder; this one has none",
                       {"decoder": "draft"})
    roi = effective_roi(config.roi, request.roi_overrides)
    limits = config.limits

    # Each input is read once, bounded: what is decoded is what the sidecar hashes.
    image_input = images.read_input(request.image, "image", limits.max_input_bytes)
    source = images.decode_image(image_input, limits.max_pixels)
    mask_input = None
    if request.mask is not None:
        mask_input = images.read_input(request.mask, "mask", limits.max_input_bytes)
        mask_values = images.decode_mask(mask_input, source.size, limits.max_pixels)
        mask_source = "file"
    elif source.alpha is not None:
        mask_values = images.mask_from_alpha(source.alpha)
        mask_source = "alpha"
    else:
        raise JobError(
            "mask_missing",
            f"{request.image.name} has no mask file and no alpha channel to use as the mask",
        )
    mask = masks.dilate(masks.threshold_mask(mask_values, roi.mask_threshold), roi.dilate)
    regions = find_regions_within(mask, roi, limits.max_regions)
    if regions is None:
        raise JobError(
            "mask_too_fragmented",
            f"the mask has more than {limits.max_regions} separate areas (limits.max_regions) even after "
            "merging those less than two working tiles apart; send fewer areas per job",
            {"max_regions": limits.max_regions},
        )
    if not regions:
        raise JobError(
            "mask_empty",
            f"the mask selects no pixel above threshold {roi.mask_threshold}; nothing to repaint",
        )
    check_cost(len(regions), request.params, limits.max_region_steps)
    read_done = clock()

    pixels = source.pixels.copy()
    alpha_out = None if source.alpha is None else source.alpha.copy()
    reports: list[RegionReport] = []
    ran: Mapping[str, Any] = {}  # how the painter ran (the last region's call)
    for index, region in enumerate(regions):
        region_started = clock()
        progress = _region_progress(on_step, index, len(regions))
        ran = _paint_region(
            engine, pixels, alpha_out, mask, region, roi.feather, request.params, progress, mask_source, roi.color_match
        )
        reports.append(
            RegionReport(
                mask_box=region.mask_box.as_tuple(),
                crop_box=region.crop.as_tuple(),
                work_size=tuple(region.work_size),
                seconds=round(clock() - region_started, 3),
            )
        )
    paint_done = clock()

    allowed = [r.mask_box.grow(roi.feather, *source.size) for r in regions]
    painted = [box.as_tuple() for box in masks.changed_boxes(source.pixels, pixels, allowed)]
    image_bytes, extension, jpeg_report = encode_output(
        pixels, alpha_out, source, request.output_format, config.output.jpeg_quality, painted
    )
    finished = clock()

    sidecar = build_sidecar(
        request=request,
        image_input=image_input,
        mask_input=mask_input,
        engine=engine,
        ran=ran,
        source=source,
        mask_source=mask_source,
        roi=roi,
        reports=reports,
        image_bytes=image_bytes,
        extension=extension,
        jpeg_report=jpeg_report,
        timings={
            "read_seconds": round(read_done - started, 3),
            "paint_seconds": round(paint_done - read_done, 3),
            "encode_seconds": round(finished - paint_done, 3),
            "total_seconds": round(finished - started, 3),
        },
    )
    result = JobResult(
        name=request.name, image_bytes=image_bytes, extension=extension, sidecar=sidecar, regions=reports
    )
    if debug_overlay:
        result.debug_overlay = render_overlay(source.pixels, mask, regions, roi.feather)
    return result


def denoising_steps(params: InpaintParams) -> int:
    """Steps the pipeline runs: img2img-style strength skips the first part of the schedule."""
    return max(1, min(int(params.steps * params.strength), params.steps))


def check_cost(regions: int, params: InpaintParams, max_region_steps: int) -> None:
    """job_too_costly when regions x steps exceed the budget: refused before any model pass."""
    steps = denoising_steps(params)
    if regions * steps > max_region_steps:
        raise JobError(
            "job_too_costly",
            f"{regions} regions x {steps} steps = {regions * steps} model passes, more than "
            f"limits.max_region_steps ({max_region_steps}); use fewer steps or fewer mask areas",
            {"regions": regions, "steps": steps, "max_region_steps": max_region_steps},
        )


def encode_output(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    source: images.LoadedImage,
    fmt: str,
    jpeg_quality: int,
    painted: list[tuple[int, int, int, int]],
) -> tuple[bytes, str, dict[str, Any] | None]:
    """(bytes, extension, JPEG report for the sidecar or None) of the finished image.

    A JPEG written from a JPEG keeps the input's coefficients outside the MCUs under the
    painted boxes (display-orientation boxes holding every changed pixel; none: the input's
    bytes, jpeg_mode "unchanged"); where that cannot
    be done it is re-encoded whole at jpeg_quality with the input's metadata segments, and
    the report says why.
    """
    extension = images.output_extension(source, fmt)
    if extension != "jpg":
        return (*images.encode_image(pixels, alpha, source, fmt, jpeg_quality), None)
    if source.jpeg_data is None:
        reason = f"the input is {source.format.upper()}, not JPEG"
    elif not painted:
        # Not one pixel differs from the input: its own bytes are the result, and the report
        # says so rather than claiming a splice of nothing.
        return source.jpeg_data, extension, {"jpeg_mode": "unchanged", "jpeg_painted_mcu_boxes": []}
    else:
        try:
            layout = jpeg_lossless.inspect(source.jpeg_data)
            boxes = jpeg_lossless.mcu_boxes(painted, source.orientation, layout)
            final = images.stored_image(pixels, None, source, "jpg")
            data = jpeg_lossless.splice(source.jpeg_data, final, boxes, layout)
            report = {"jpeg_mode": "lossless-outside", "jpeg_mcu": list(layout.mcu), "jpeg_painted_mcu_boxes": [list(b) for b in boxes]}
            return data, extension, report
        except jpeg_lossless.Unsupported as exc:
            reason = str(exc)
    data, extension = images.encode_image(pixels, alpha, source, fmt, jpeg_quality)
    if source.jpeg_data is not None:
        try:
            data = jpeg_lossless.carry_markers(source.jpeg_data, data, keep_icc=source.icc_profile is not None)
        except jpeg_lossless.Unsupported as exc:  # the input's marker structure is broken: metadata as Pillow kept it
            reason = f"{reason}; metadata segments not carried over ({exc})"
    return data, extension, {"jpeg_mode": "reencoded", "jpeg_reason": reason}


def _paint_region(
    engine: Painter,
    pixels: np.ndarray,
    alpha_out: np.ndarray | None,
    mask: np.ndarray,
    region: Region,
    feather: int,
    params: InpaintParams,
    on_step: StepCallback | None,
    mask_source: str,
    color_match: bool = False,
) -> Mapping[str, Any]:
    """Paint one region in place into pixels (and alpha when the mask came from it); how it ran."""
    crop = region.crop
    window = (slice(crop.y0, crop.y1), slice(crop.x0, crop.x1))
    # Only this region's own mask pixels: another region's pixels inside this crop belong to
    # that region's pass, which sees them with their full feather.
    own_mask = np.zeros((crop.height, crop.width), dtype=bool)
    mb = region.mask_box
    own_mask[mb.y0 - crop.y0 : mb.y1 - crop.y0, mb.x0 - crop.x0 : mb.x1 - crop.x0] = mask[
        mb.y0 : mb.y1, mb.x0 : mb.x1
    ]

    weight = masks.feather_alpha(own_mask, feather)
    support = weight > 0  # every pixel the blend takes (partly) from the painting
    work_w, work_h = region.work_size
    crop_image = Image.fromarray(pixels[window])
    if (work_w, work_h) != (crop.width, crop.height):
        crop_image = crop_image.resize((work_w, work_h), Image.Resampling.LANCZOS)
    # The model repaints whole latent cells covering the feather band too, so the band blends
    # painted content into the original instead of crossing the model's own mask boundary.
    crop_mask = Image.fromarray(masks.latent_mask(support, (work_w, work_h)).astype(np.uint8) * 255)

    result = engine.inpaint(crop_image, crop_mask, params, on_step=on_step)
    painted = result.image
    if painted.size != (crop.width, crop.height):
        painted = painted.resize((crop.width, crop.height), Image.Resampling.LANCZOS)
    painted_pixels = np.asarray(painted.convert("RGB"), dtype=np.uint8)
    if color_match:
        ring = color.ring_around(support, max(color.RING_MIN, feather))
        painted_pixels = color.match_color(painted_pixels, pixels[window], ring)

    local = Box(0, 0, crop.width, crop.height)
    pixels[window] = masks.blend(pixels[window], painted_pixels, local, weight)
    if alpha_out is not None and mask_source == "alpha":
        # Repainted pixels were transparent; make them as opaque as the paint that covers them.
        opaque = np.full((crop.height, crop.width, 1), 255, dtype=np.uint8)
        alpha_out[window] = masks.blend(alpha_out[window][..., None], opaque, local, weight)[..., 0]
    return result.report


def _region_progress(on_step: StepCallback | None, index: int, count: int) -> StepCallback | None:
    """Report steps across all regions of a job as one count."""
    if on_step is None:
        return None

    def report(done: int, total: int) -> None:
        on_step(index * total + done, count * total)

    return report


