"""Regions: which parts of an image the model paints (pure numpy: no torch, no files, no PIL).

The pipeline of one job (paint/job.py):

    mask  = masks.threshold_mask(raw_mask, roi.mask_threshold)
    mask  = masks.dilate(mask, roi.dilate)
    for region in find_regions(mask, roi):                  # small crops around the mask only
        alpha   = masks.feather_alpha(mask, roi.feather)     # 1 on the mask, 0 beyond the feather
        model   = masks.latent_mask(alpha > 0, region.work_size)   # whole 8x8 latent cells
        painted = painter(image[region.crop] resized to region.work_size, model), back to the crop size
        image   = masks.blend(image, painted, region.crop, alpha)

Cost follows the mask, not the image: region finding labels a grid of blocks whose size comes
from the padding/merge settings, so a 12-megapixel photo with two scratches stays cheap. The
working size of each region comes from the aspect buckets (buckets.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .buckets import (
    LATENT_MULTIPLE,
    aspect_shapes,
    axis_window,
    bucket_long_side,
    own_aspect_size,
    reach_shape,
    work_cap,
)
from .config import RoiConfig
from .masks import Box, as_bool_mask, label_runs, union_find

MAX_COMPONENTS = 1024  # above this many separate specks, components are grouped on a coarser grid
MAX_RUNS = 200_000  # a block grid with more runs than this (speckle) is labelled coarser


@dataclass(frozen=True)
class Region:
    """One model run: the mask pixels it repaints, the crop it sees, the size it runs at."""

    mask_box: Box  # bbox of the (dilated) mask pixels of this region (merged components)
    crop: Box  # context crop taken from the image; contains mask_box grown by the feather
    work_size: tuple[int, int]  # (width, height) the model runs at; the crop's aspect within 2%


def find_regions(mask: np.ndarray, roi: RoiConfig) -> list[Region]:
    """The regions a (dilated) bool mask needs painted; [] when the mask is empty.

    Rules:
    - Components are 8-connected groups of mask pixels. A component's context box is its
      bbox grown by ``padding + feather`` on every side (clipped to the image): the feather
      ring is blended, the padding beyond it is pure context for the model.
    - Two groups merge when their context boxes overlap, touch, or lie less than
      ``merge_gap`` px apart (Chebyshev gap), and also when both context boxes together fit
      in one ``min_size`` x ``min_size`` window: their crops would be that window anyway, so
      one model run replaces two. Merging repeats until stable. Blobs farther apart than
      that stay separate regions however large the image is.
    - A speckle mask (more than MAX_COMPONENTS separate groups, or more than MAX_RUNS
      runs of mask blocks) is grouped on a coarser grid first, as if merge_gap were
      larger, to bound the number of model runs and the labelling time.
    - The crop is the context box grown towards ``min_size`` per side, centred on the mask
      and shifted inward at the image edge (IOPaint's ``_crop_box``), clipped to the image.
      Sides are multiples of 8 (the latent grid); where the image side is too short for
      that, the crop takes the whole image side. The crop always contains the mask box
      grown by the feather (clipped to the image).
    - work_size keeps the crop's aspect within ASPECT_TOLERANCE (2%), so the model never sees
      a stretched scene. Its long side is the smallest bucket side that holds the crop's long
      side scaled to fit the cap (the largest bucket side <= max_size). The crop is first grown
      (within the image, more context) to the aspect of one of the aspect-bucket shapes at
      that long side (`aspect_shapes`); of those it can reach, the one painted at the highest
      resolution wins. Where the image leaves no room to grow (a small image the crop already
      spans), the other side is shrunk to a bucket aspect instead, never below the mask box
      and its feather. Where neither works (the mask and feather fill a small image), the
      work size takes the crop's own aspect (sides multiples of 8, long side as close to the
      bucket side as the 2% allow): an off-bucket shape, compiled on first use. Only when no
      multiple-of-8 shape up to the cap comes within 2% is the closest aspect taken: caps
      under 256 px, or crops the image keeps at 8:1 or longer with a 256 px cap (24:1 at
      384, 40:1 at 512).

    Regions are returned in reading order (top to bottom, then left to right) of their
    mask boxes. Crops of separate regions may overlap; apply them one after another.
    """
    mask = as_bool_mask(mask)
    height, width = mask.shape
    if not mask.any():
        return []
    margin = roi.padding + roi.feather
    gap = max(roi.merge_gap, 1)  # boxes that touch (gap 0) always merge
    # Pixels in 8-adjacent blocks of this side are always merged by the gap rule, so
    # labelling blocks instead of pixels gives the same regions at a fraction of the cost.
    block = margin + max(1, (roi.merge_gap + 1) // 2)
    boxes = _component_boxes(mask, block)
    while boxes is None:
        block *= 2
        boxes = _component_boxes(mask, block)
    groups = _merge(boxes, margin, gap, roi.min_size, width, height)
    cap = work_cap(roi)
    regions = [_make_region(box, roi, cap, width, height) for box in groups]
    regions.sort(key=lambda r: (r.mask_box.y0, r.mask_box.x0))
    return regions


def _make_region(mask_box: Box, roi: RoiConfig, cap: int, width: int, height: int) -> Region:
    required = mask_box.grow(roi.feather, width, height)
    context = mask_box.grow(roi.padding + roi.feather, width, height)
    cx2 = mask_box.x0 + mask_box.x1  # twice the mask centre, to stay in integers
    cy2 = mask_box.y0 + mask_box.y1
    x_axis = (width, required.x0, required.x1, context.x0, context.x1, cx2)
    y_axis = (height, required.y0, required.y1, context.y0, context.y1, cy2)
    x0, w = axis_window(*x_axis, roi.min_size)
    y0, h = axis_window(*y_axis, roi.min_size)
    long_side = bucket_long_side(w, h, roi.bucket_sides, cap)
    best: tuple[tuple[float, ...], tuple[int, int, int, int], tuple[int, int]] | None = None
    for shape in aspect_shapes(long_side):
        for key, window in reach_shape(shape, (x0, w, y0, h), x_axis, y_axis):
            if best is None or key < best[0]:
                best = (key, window, shape)
    if best is not None:
        (x0, w, y0, h), work = best[1], best[2]
    else:
        work = own_aspect_size(w, h, long_side, cap)
    crop = Box(x0, y0, x0 + w, y0 + h)
    return Region(mask_box=mask_box, crop=crop, work_size=work)


def _merge(boxes: list[Box], margin: int, gap: int, min_size: int, width: int, height: int) -> list[Box]:
    """Merge mask boxes by the rules in find_regions until stable; returns mask boxes."""
    if len(boxes) <= 1:
        return boxes
    m = np.array([b.as_tuple() for b in boxes], dtype=np.int64)  # mask boxes x0 y0 x1 y1
    while True:
        m = _merge_by_gap(m, margin, gap, width, height)
        if len(m) == 1:
            break
        ctx = _context(m, margin, width, height)
        ux = np.maximum(ctx[:, None, 2], ctx[None, :, 2]) - np.minimum(ctx[:, None, 0], ctx[None, :, 0])
        uy = np.maximum(ctx[:, None, 3], ctx[None, :, 3]) - np.minimum(ctx[:, None, 1], ctx[None, :, 1])
        fits = (ux <= min_size) & (uy <= min_size)
        np.fill_diagonal(fits, False)
        if not fits.any():
            break
        # Greedy: smallest unions first, each group merged at most once per round.
        i, j = np.nonzero(np.triu(fits))
        order = np.argsort(ux[i, j] * uy[i, j], kind="stable")
        used = np.zeros(len(m), dtype=bool)
        keep = np.ones(len(m), dtype=bool)
        for a, b in zip(i[order].tolist(), j[order].tolist()):
            if used[a] or used[b]:
                continue
            used[a] = used[b] = True
            m[a] = (min(m[a, 0], m[b, 0]), min(m[a, 1], m[b, 1]), max(m[a, 2], m[b, 2]), max(m[a, 3], m[b, 3]))
            keep[b] = False
        m = m[keep]
    return [Box(*map(int, row)) for row in m]


def _context(m: np.ndarray, margin: int, width: int, height: int) -> np.ndarray:
    ctx = m.copy()
    ctx[:, :2] = np.maximum(ctx[:, :2] - margin, 0)
    ctx[:, 2] = np.minimum(ctx[:, 2] + margin, width)
    ctx[:, 3] = np.minimum(ctx[:, 3] + margin, height)
    return ctx


def _merge_by_gap(m: np.ndarray, margin: int, gap: int, width: int, height: int) -> np.ndarray:
    """Union boxes whose context boxes lie less than gap apart, repeated until stable."""
    while len(m) > 1:
        ctx = _context(m, margin, width, height)
        gx = np.maximum(ctx[None, :, 0] - ctx[:, None, 2], ctx[:, None, 0] - ctx[None, :, 2])
        gy = np.maximum(ctx[None, :, 1] - ctx[:, None, 3], ctx[:, None, 1] - ctx[None, :, 3])
        close = np.maximum(gx, gy) < gap
        np.fill_diagonal(close, False)
        if not close.any():
            break
        i, j = np.nonzero(close)
        labels = union_find(len(m), i, j)
        _, inverse = np.unique(labels, return_inverse=True)
        k = inverse.max() + 1
        merged = np.empty((k, 4), dtype=np.int64)
        merged[:, :2] = np.iinfo(np.int64).max
        merged[:, 2:] = np.iinfo(np.int64).min
        np.minimum.at(merged[:, 0], inverse, m[:, 0])
        np.minimum.at(merged[:, 1], inverse, m[:, 1])
        np.maximum.at(merged[:, 2], inverse, m[:, 2])
        np.maximum.at(merged[:, 3], inverse, m[:, 3])
        m = merged
    return m


def _component_boxes(mask: np.ndarray, block: int) -> list[Box] | None:
    """Exact pixel bboxes of the 8-connected components of the grid of blocks with mask pixels.

    None when the block grid has more than MAX_RUNS runs or MAX_COMPONENTS components
    (a speckle mask): the caller retries with bigger blocks.
    """
    height, width = mask.shape
    if block <= 1:
        labelled = label_runs(mask, MAX_RUNS)
        if labelled is None or (len(labelled[0]) and labelled[0].max() >= MAX_COMPONENTS):
            return None
        run_labels, (starts, ends) = labelled
        x0 = starts % width
        y = starts // width
        x1 = (ends - 1) % width + 1
        values = (x0, y, x1, y + 1)
    else:
        row_starts = np.arange(0, height, block)
        col_starts = np.arange(0, width, block)
        per_col = np.logical_or.reduceat(mask, col_starts, axis=1)  # H x Wb
        grid = np.logical_or.reduceat(per_col, row_starts, axis=0)  # Hb x Wb
        labelled = label_runs(grid, MAX_RUNS)
        if labelled is None or (len(labelled[0]) and labelled[0].max() >= MAX_COMPONENTS):
            return None
        run_labels, (starts, _) = labelled
        per_row = np.logical_or.reduceat(mask, row_starts, axis=0)  # Hb x W
        ys = np.arange(height, dtype=np.int32)[:, None]
        xs = np.arange(width, dtype=np.int32)[None, :]
        # Per block: the extreme mask pixel coordinates; neutral values where a block is empty.
        per_block = (
            np.minimum.reduceat(np.where(per_row, xs, width), col_starts, axis=1),
            np.minimum.reduceat(np.where(per_col, ys, height), row_starts, axis=0),
            np.maximum.reduceat(np.where(per_row, xs, -1), col_starts, axis=1) + 1,
            np.maximum.reduceat(np.where(per_col, ys, -1), row_starts, axis=0) + 1,
        )
        # Per run: reduceat over [start_i, start_i+1) only meets neutral cells outside runs.
        values = (
            np.minimum.reduceat(per_block[0].reshape(-1), starts),
            np.minimum.reduceat(per_block[1].reshape(-1), starts),
            np.maximum.reduceat(per_block[2].reshape(-1), starts),
            np.maximum.reduceat(per_block[3].reshape(-1), starts),
        )
    if not len(run_labels):
        return []
    n = int(run_labels.max()) + 1
    big = np.iinfo(np.int64).max
    out = []
    for value, ufunc, fill in zip(values, (np.minimum, np.minimum, np.maximum, np.maximum), (big, big, -1, -1)):
        acc = np.full(n, fill, dtype=np.int64)
        ufunc.at(acc, run_labels, value.astype(np.int64))
        out.append(acc)
    return [Box(int(a), int(b), int(c), int(d)) for a, b, c, d in zip(*out)]


# --------------------------------------------------------------------------- windows


def find_regions_within(mask: np.ndarray, roi: RoiConfig, max_regions: int) -> list[Region] | None:
    """find_regions with at most max_regions regions, or None when that cannot be had.

    A mask of many far-apart specks would cost one model pass each. Merging is coarsened
    (merge_gap doubled) until the count fits, so nearby specks share a crop; it stops at twice
    the working cap, because areas farther apart than that would be painted as one crop
    downscaled far below the model's size. Past that, the job is refused (the caller's
    mask_too_fragmented) rather than painted for hours or as mush.
    """
    regions = find_regions(mask, roi)
    gap = max(roi.merge_gap, LATENT_MULTIPLE)
    widest = max(roi.merge_gap, 2 * roi.max_size)
    while len(regions) > max_regions and gap < widest:
        gap = min(2 * gap, widest)
        regions = find_regions(mask, replace(roi, merge_gap=gap))
    return regions if len(regions) <= max_regions else None
