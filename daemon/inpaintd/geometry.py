"""ROI geometry: which parts of an image the model paints, and how the result is pasted back.

Pure numpy: no torch, no files, no PIL. The pipeline of one job is

    mask  = threshold_mask(raw_mask, roi.mask_threshold)
    mask  = dilate(mask, roi.dilate)
    for region in find_regions(mask, roi):           # small crops around the mask only
        alpha   = feather_alpha(mask, roi.feather)    # 1 on the mask, 0 beyond the feather
        model   = latent_mask(alpha > 0, region.work_size)   # whole 8x8 latent cells
        painted = engine(image[region.crop] resized to region.work_size, model), back to the crop size
        image   = blend(image, painted, region.crop, alpha)

Cost follows the mask, not the image: dilation and feathering run only in windows around
the mask pixels, and region finding labels a grid of blocks whose size comes from the
padding/merge settings, so a 12-megapixel photo with two scratches stays cheap.

Boxes are half-open pixel boxes ``[x0, x1) x [y0, y1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from .config import RoiConfig

LATENT_MULTIPLE = 8  # the VAE downsamples by 8: crop sides are multiples of this where possible
MAX_COMPONENTS = 1024  # above this many separate specks, components are grouped on a coarser grid
MAX_RUNS = 200_000  # a block grid with more runs than this (speckle) is labelled coarser
_WINDOW_BLOCK = 64  # block side used to find the windows dilation and feathering work in
# The most a working size may stretch its crop (a stretched scene paints stretched objects): 2%.
ASPECT_TOLERANCE = Fraction(1, 50)
ASPECT_STEPS = 8  # aspect buckets: short side = k/8 of the long side


@dataclass(frozen=True)
class Box:
    """A half-open pixel box ``[x0, x1) x [y0, y1)``."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def width(self) -> int:
        return self.x1 - self.x0

    @property
    def height(self) -> int:
        return self.y1 - self.y0

    def as_tuple(self) -> tuple[int, int, int, int]:
        return (self.x0, self.y0, self.x1, self.y1)

    def slices(self) -> tuple[slice, slice]:
        """``array[box.slices()]`` is the box's window of an HxW(xC) array."""
        return slice(self.y0, self.y1), slice(self.x0, self.x1)

    def grow(self, margin: int, width: int, height: int) -> Box:
        """This box grown by margin on every side, clipped to a width x height image."""
        return Box(
            max(0, self.x0 - margin),
            max(0, self.y0 - margin),
            min(width, self.x1 + margin),
            min(height, self.y1 + margin),
        )

    def contains(self, other: Box) -> bool:
        return self.x0 <= other.x0 and self.y0 <= other.y0 and other.x1 <= self.x1 and other.y1 <= self.y1


@dataclass(frozen=True)
class Region:
    """One model run: the mask pixels it repaints, the crop it sees, the size it runs at."""

    mask_box: Box  # bbox of the (dilated) mask pixels of this region (merged components)
    crop: Box  # context crop taken from the image; contains mask_box grown by the feather
    work_size: tuple[int, int]  # (width, height) the model runs at; the crop's aspect within 2%


# --------------------------------------------------------------------------- masks


def threshold_mask(mask: np.ndarray, threshold: int) -> np.ndarray:
    """uint8 HxW -> bool HxW, True where the value is strictly above threshold (repaint)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    return mask > threshold


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """Grow a bool mask by a disc of radius px (Euclidean); radius 0 returns a copy.

    Works only in windows around the mask pixels, so the cost follows the mask's extent.
    """
    mask = _check_bool(mask)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    if radius == 0:
        return mask.copy()
    out = np.zeros_like(mask)
    limit = radius * radius
    for box in _windows(mask, radius):
        sub = mask[box.slices()]
        out[box.slices()] |= _sq_distance(sub, radius) <= limit
    return out


def feather_alpha(mask: np.ndarray, radius: int) -> np.ndarray:
    """bool HxW -> float32 HxW alpha: 1.0 on the mask, a smooth fall-off outside it.

    At Euclidean distance d (px) from the nearest mask pixel alpha is
    ``1 - smoothstep(d / (radius + 1))`` for d <= radius and exactly 0.0 beyond, so the
    painted pixels fade out within `radius` px and everything farther away keeps the
    original bytes. radius 0 gives the hard mask. Computed in windows around the mask.
    """
    mask = _check_bool(mask)
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    alpha = np.zeros(mask.shape, dtype=np.float32)
    if radius == 0:
        alpha[mask] = 1.0
        return alpha
    # alpha as a function of the squared distance, tabulated once: d^2 takes (r+1)^2 values.
    sq = np.arange((radius + 1) ** 2 + 1, dtype=np.float64)
    t = np.sqrt(sq) / (radius + 1)
    table = (1.0 - t * t * (3.0 - 2.0 * t)).astype(np.float32)
    table[sq > radius * radius] = 0.0
    table[0] = 1.0
    for box in _windows(mask, radius):
        window = alpha[box.slices()]
        np.maximum(window, table[_sq_distance(mask[box.slices()], radius)], out=window)
    return alpha


def blend(original: np.ndarray, painted: np.ndarray, crop: Box, alpha: np.ndarray) -> np.ndarray:
    """Paste a painted crop into a copy of the image through alpha.

    original: uint8 HxWxC; painted: uint8 crop.height x crop.width x C; alpha: float32 HxW
    for the whole image (only its crop window is read: pixels outside the crop are never
    touched). Returns a new uint8 HxWxC. Wherever alpha == 0 the result is exactly the
    original byte; where alpha == 1 it is exactly the painted byte; between, the rounded mix.
    """
    if original.dtype != np.uint8 or painted.dtype != np.uint8:
        raise ValueError("original and painted must be uint8")
    if original.ndim != 3 or painted.ndim != 3:
        raise ValueError("original and painted must be HxWxC")
    height, width = original.shape[:2]
    if alpha.shape != (height, width):
        raise ValueError(f"alpha shape {alpha.shape} differs from the image's {(height, width)}")
    if not (0 <= crop.x0 < crop.x1 <= width and 0 <= crop.y0 < crop.y1 <= height):
        raise ValueError(f"crop {crop.as_tuple()} is not inside the {width}x{height} image")
    expected = (crop.height, crop.width, original.shape[2])
    if painted.shape != expected:
        raise ValueError(f"painted shape {painted.shape} differs from the crop's {expected}")
    out = original.copy()
    a = alpha[crop.slices()]
    touched = a > 0
    if not touched.any():
        return out
    window = out[crop.slices()]
    a_t = np.clip(a[touched], 0.0, 1.0)[:, None]
    orig_t = window[touched].astype(np.float32)
    mixed = orig_t + a_t * (painted[touched].astype(np.float32) - orig_t)
    window[touched] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


RESAMPLE_TAPS = 3  # Lanczos-3: a resized pixel reads source pixels up to 3 source px away


def latent_mask(support: np.ndarray, work_size: tuple[int, int], grid: int = LATENT_MULTIPLE) -> np.ndarray:
    """The mask the model gets: whole grid x grid blocks of the working image (the latent grid).

    support: bool crop-sized, the pixels the blend will take from the painting (alpha > 0:
    the mask and its feather band). A block is marked when any support pixel, resized back
    from the working size with Lanczos, reads a working pixel in it. So the model repaints
    every latent cell the feather band draws on, its hard boundary lies on latent cell edges
    outside the band, and the feather fades from fully painted to original within painted
    cells rather than across the model's own boundary.
    Returns bool (work_h, work_w).
    """
    support = _check_bool(support)
    work_w, work_h = work_size
    crop_h, crop_w = support.shape
    if work_w % grid or work_h % grid:
        raise ValueError(f"working size {work_size} is not a multiple of {grid}")
    # Integral image: any support pixel in a rectangle, for every block at once.
    table = np.zeros((crop_h + 1, crop_w + 1), dtype=np.int64)
    table[1:, 1:] = np.cumsum(np.cumsum(support, axis=0, dtype=np.int64), axis=1)
    xs0, xs1 = _block_reach(work_w, crop_w, grid)
    ys0, ys1 = _block_reach(work_h, crop_h, grid)
    counts = (
        table[ys1[:, None], xs1[None, :]] - table[ys0[:, None], xs1[None, :]]
        - table[ys1[:, None], xs0[None, :]] + table[ys0[:, None], xs0[None, :]]
    )
    blocks = counts > 0
    return np.repeat(np.repeat(blocks, grid, axis=0), grid, axis=1)


def _block_reach(work: int, crop: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per block along one axis: the [start, end) crop pixels whose resized value reads it.

    Crop pixel x covers working span [x*work/crop, (x+1)*work/crop); resizing reads
    RESAMPLE_TAPS source px beyond it (scaled by work/crop when the working image is the
    larger, as a downscale's filter widens). Computed in exact integer arithmetic.
    """
    blocks = np.arange(work // grid, dtype=np.int64)
    halo_num = RESAMPLE_TAPS * max(work, crop)  # halo = RESAMPLE_TAPS * max(1, work/crop), times crop
    lo_num = blocks * grid * crop - halo_num  # (block start - halo) * crop
    hi_num = (blocks + 1) * grid * crop + halo_num
    # x reads the block iff (x+1)*work > lo and x*work < hi (in units of 1/crop px).
    start = np.maximum(0, np.floor_divide(lo_num, work))  # smallest x with (x+1)*work > lo
    end = np.minimum(crop, -np.floor_divide(-hi_num, work))  # largest x with x*work < hi, plus 1
    return start, np.maximum(start, end)


# --------------------------------------------------------------------------- regions


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
    mask = _check_bool(mask)
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
    cap = _work_cap(roi)
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
    x0, w = _axis_window(*x_axis, roi.min_size)
    y0, h = _axis_window(*y_axis, roi.min_size)
    long_side = _long_side(w, h, roi.bucket_sides, cap)
    best: tuple[tuple[float, ...], tuple[int, int, int, int], tuple[int, int]] | None = None
    for shape in aspect_shapes(long_side):
        for key, window in _reach_shape(shape, (x0, w, y0, h), x_axis, y_axis):
            if best is None or key < best[0]:
                best = (key, window, shape)
    if best is not None:
        (x0, w, y0, h), work = best[1], best[2]
    else:
        work = own_aspect_size(w, h, long_side, cap)
    crop = Box(x0, y0, x0 + w, y0 + h)
    return Region(mask_box=mask_box, crop=crop, work_size=work)


def _reach_shape(
    shape: tuple[int, int],
    window: tuple[int, int, int, int],
    x_axis: tuple[int, ...],
    y_axis: tuple[int, ...],
) -> list[tuple[tuple[float, ...], tuple[int, int, int, int]]]:
    """Ways to give the crop window (x0, w, y0, h) the shape's aspect, each with its rank key.

    Growing one side (more context) ranks first, highest resolution first: work px per crop
    px along the side that did not grow, so shapes reached by growing the same side tie, then
    the least added context. Only where the image leaves no room to grow either way is the
    other side shrunk instead (less context, never below the mask box and its feather), the
    least shrinking first: that keeps a small image on the bucket shapes.
    """
    sw, sh = shape
    x0, w, y0, h = window
    out: list[tuple[tuple[float, ...], tuple[int, int, int, int]]] = []
    wider = w * sh <= h * sw
    if wider:  # more context left and right, or less above and below
        nx0, nw = _axis_window(*x_axis, max(w, _round8(h * sw / sh)))
        grown, scale = (nx0, nw, y0, h), sh / h
        shrunk = _shrink_window(*y_axis, _round8(w * sh / sw))
        cut = None if shrunk is None else (x0, w, *shrunk)
    else:
        ny0, nh = _axis_window(*y_axis, max(h, _round8(w * sh / sw)))
        grown, scale = (x0, w, ny0, nh), sw / w
        shrunk = _shrink_window(*x_axis, _round8(h * sw / sh))
        cut = None if shrunk is None else (*shrunk, y0, h)
    if aspect_close(shape, (grown[1], grown[3])):
        out.append(((0, -scale, grown[1] * grown[3]), grown))
    if cut is not None and aspect_close(shape, (cut[1], cut[3])):
        out.append(((1, -(cut[1] * cut[3])), cut))
    return out


def _shrink_window(
    length: int, req0: int, req1: int, ctx0: int, ctx1: int, centre2: int, side: int
) -> tuple[int, int] | None:
    """(start, side) of a window holding [req0, req1), centred where it can be; None if too short.

    Takes the same axis tuple as _axis_window; the context span is not kept (that is the cost).
    """
    if side < req1 - req0 or side > length:
        return None
    start = min(max((centre2 - side) // 2, req1 - side), req0)
    return min(max(start, 0), length - side), side


def aspect_shapes(long_side: int) -> list[tuple[int, int]]:
    """The aspect-bucket working shapes whose long side is long_side, square first.

    Short sides are k/ASPECT_STEPS of the long side (k = 1..ASPECT_STEPS), rounded to the
    latent grid: aspects 1, 8/7, 4/3, 8/5, 2, 8/3, 4 and 8, both ways round. Neighbouring
    aspects differ by at most 8/7, so reaching one grows a crop by at most 14%.
    """
    shorts = sorted({max(LATENT_MULTIPLE, _round8(long_side * k / ASPECT_STEPS)) for k in range(1, ASPECT_STEPS + 1)})
    shorts = [s for s in shorts if s <= long_side][::-1]
    return [(long_side, s) for s in shorts] + [(s, long_side) for s in shorts if s != long_side]


def bucket_shapes(roi: RoiConfig) -> list[tuple[int, int]]:
    """Every aspect-bucket shape a job can run at: aspect_shapes of each bucket side up to the cap.

    The only other shapes are the off-bucket ones of crops that can neither grow nor shrink
    to a bucket aspect (see find_regions), which a compiled UNet compiles on first use.
    """
    cap = _work_cap(roi)
    sides = [s for s in sorted(roi.bucket_sides) if s <= cap] or [cap]
    return [shape for side in sides for shape in aspect_shapes(side)]


def aspect_close(work: tuple[int, int], crop: tuple[int, int]) -> bool:
    """|aspect(work) / aspect(crop) - 1| <= ASPECT_TOLERANCE, decided exactly in integers."""
    tol = ASPECT_TOLERANCE
    return tol.denominator * abs(work[0] * crop[1] - work[1] * crop[0]) <= tol.numerator * work[1] * crop[0]


def own_aspect_size(w: int, h: int, long_side: int, cap: int) -> tuple[int, int]:
    """A working size with the aspect of a w x h crop: sides multiples of 8, both <= cap.

    Of the sizes within ASPECT_TOLERANCE, the one whose long side is closest to long_side
    (the smaller on a tie); if none is that close, the closest aspect.
    """
    best: tuple[tuple[float, float, int], tuple[int, int]] | None = None
    for side in range(LATENT_MULTIPLE, cap + 1, LATENT_MULTIPLE):
        for cand in ((min(cap, _round8(side * w / h)), side), (side, min(cap, _round8(side * h / w)))):
            error = abs((cand[0] * h) / (cand[1] * w) - 1.0)
            ok = aspect_close(cand, (w, h))
            key = (0.0 if ok else error, abs(max(cand) - long_side) if ok else 0.0, max(cand))
            if best is None or key < best[0]:
                best = (key, cand)
    assert best is not None
    return best[1]


def _axis_window(length: int, req0: int, req1: int, ctx0: int, ctx1: int, centre2: int, target: int) -> tuple[int, int]:
    """(start, side) of the crop along one axis of an image side `length`."""
    want = max(target, ctx1 - ctx0)
    side = _ceil_to(want, LATENT_MULTIPLE)
    if side > length:
        floor = length // LATENT_MULTIPLE * LATENT_MULTIPLE
        side = floor if floor >= max(req1 - req0, 1) else length
    start = (centre2 - side) // 2
    lo, hi = (ctx1 - side, ctx0) if side >= ctx1 - ctx0 else (req1 - side, req0)
    start = min(max(start, lo), hi)
    start = min(max(start, 0), length - side)
    return start, side


def _work_cap(roi: RoiConfig) -> int:
    sides = sorted(roi.bucket_sides)
    fitting = [s for s in sides if s <= roi.max_size]
    return fitting[-1] if fitting else sides[0]


def _long_side(w: int, h: int, buckets: tuple[int, ...], cap: int) -> int:
    """The smallest bucket side holding the crop's long side once scaled down to fit the cap."""
    need = min(cap, max(1, math.ceil(max(w, h) * min(1.0, cap / max(w, h)) - 1e-9)))
    return next(s for s in sorted(buckets) if s >= need)


def _round8(value: float) -> int:
    """The nearest positive multiple of the latent grid."""
    return max(LATENT_MULTIPLE, int(math.floor(value / LATENT_MULTIPLE + 0.5)) * LATENT_MULTIPLE)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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
        labels = _union_find(len(m), i, j)
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
        labelled = _label_runs(mask, MAX_RUNS)
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
        labelled = _label_runs(grid, MAX_RUNS)
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


def _label_runs(grid: np.ndarray, max_runs: int | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None:
    """8-connected labelling by runs: (label per run, (flat start, flat end) per run).

    Flat positions index grid.reshape(-1); labels are 0..n-1. Runs are found with one
    diff, neighbouring runs in consecutive rows with searchsorted, and the equivalences
    resolved by a vectorised union-find, so no Python loop runs per pixel or per row.
    None when there are more than max_runs runs.
    """
    rows, cols = grid.shape
    stride = cols + 1  # a False column after each row keeps runs within their row
    padded = np.zeros((rows, stride), dtype=np.int8)
    padded[:, :cols] = grid
    edges = np.diff(padded.reshape(-1), prepend=np.int8(0))
    starts = np.flatnonzero(edges == 1)
    if max_runs is not None and len(starts) > max_runs:
        return None
    ends = np.flatnonzero(edges == -1)
    if not len(starts):
        empty = np.zeros(0, dtype=np.int64)
        return empty, (empty, empty)
    row = starts // stride
    # Runs of the previous row touching each run (8-connectivity): ends >= start-1, starts <= end.
    lo = np.searchsorted(ends, starts - stride, side="left")
    hi = np.searchsorted(starts, ends - stride, side="right")
    counts = np.maximum(hi - lo, 0)
    counts[row == 0] = 0
    total = int(counts.sum())
    b = np.repeat(np.arange(len(starts)), counts)
    offsets = np.repeat(np.cumsum(counts) - counts, counts)
    a = np.repeat(lo, counts) + (np.arange(total) - offsets)
    labels = _union_find(len(starts), a, b)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64), (starts - row, ends - row)  # positions in the unpadded grid


def _union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Root (smallest member) of each of n nodes joined by edges a[i]-b[i]; vectorised."""
    parent = np.arange(n)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping until every node points at its root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    return parent


# --------------------------------------------------------------------------- windows


def _windows(mask: np.ndarray, halo: int) -> list[Box]:
    """Boxes that together hold every mask pixel with its halo-px neighbourhood.

    Blocks of _WINDOW_BLOCK px holding mask pixels are grown by the halo (in blocks) and
    grouped into 8-connected components; each component's bbox, clipped, is one window.
    A pixel's whole neighbourhood lies in its own component's window, so per-window
    results combined with OR / max are exact.
    """
    height, width = mask.shape
    block = _WINDOW_BLOCK
    rows = np.arange(0, height, block)
    cols = np.arange(0, width, block)
    grid = np.logical_or.reduceat(np.logical_or.reduceat(mask, cols, axis=1), rows, axis=0)
    if not grid.any():
        return []
    k = -(-halo // block)
    grown = _grow_grid(grid, k)
    labelled = _label_runs(grown)
    assert labelled is not None
    run_labels, (starts, ends) = labelled
    gcols = grown.shape[1]
    n = run_labels.max() + 1
    r0 = np.full(n, np.iinfo(np.int64).max)
    c0 = np.full(n, np.iinfo(np.int64).max)
    r1 = np.full(n, -1)
    c1 = np.full(n, -1)
    np.minimum.at(r0, run_labels, starts // gcols)
    np.maximum.at(r1, run_labels, starts // gcols)
    np.minimum.at(c0, run_labels, starts % gcols)
    np.maximum.at(c1, run_labels, (ends - 1) % gcols)
    return [
        Box(int(a * block), int(b * block), int(min(width, (c + 1) * block)), int(min(height, (d + 1) * block)))
        for a, b, c, d in zip(c0, r0, c1, r1)
    ]


def _grow_grid(grid: np.ndarray, k: int) -> np.ndarray:
    """Square dilation of a small bool grid by k cells."""
    if k <= 0:
        return grid.copy()
    out = grid.copy()
    for _ in range(k):  # k is halo/64, a handful at most
        g = out.copy()
        g[1:, :] |= out[:-1, :]
        g[:-1, :] |= out[1:, :]
        h = g.copy()
        h[:, 1:] |= g[:, :-1]
        h[:, :-1] |= g[:, 1:]
        out = h
    return out


def _sq_distance(mask: np.ndarray, radius: int) -> np.ndarray:
    """Squared Euclidean distance to the nearest True pixel, capped at (radius+1)^2.

    uint16 when the values fit (radius < 180), else int32.

    Separable: the horizontal distance within each row (two running accumulations), then
    d^2 = min over |dy| <= radius of dy^2 + h(y+dy)^2. Cost O(radius * window area).
    """
    rows, cols = mask.shape
    cap = radius + 1
    idx = np.arange(cols, dtype=np.int32)
    left = np.maximum.accumulate(np.where(mask, idx, np.iinfo(np.int32).min // 2), axis=1)
    right = np.where(mask, idx, np.iinfo(np.int32).max // 2)
    right = np.minimum.accumulate(right[:, ::-1], axis=1)[:, ::-1]
    h = np.minimum(idx - left, right - idx)
    np.minimum(h, cap, out=h)
    dtype = np.uint16 if 2 * cap * cap <= np.iinfo(np.uint16).max else np.int32
    h = h.astype(dtype)
    h2 = h * h
    best = h2.copy()
    for dy in range(1, min(radius, rows - 1) + 1):
        add = dtype(dy * dy)
        np.minimum(best[dy:], h2[:-dy] + add, out=best[dy:])
        np.minimum(best[:-dy], h2[dy:] + add, out=best[:-dy])
    np.minimum(best, dtype(cap * cap), out=best)
    return best


def _check_bool(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return mask


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
