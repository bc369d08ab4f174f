"""Pixel masks and compositing: threshold, dilate, feather, the model's latent-grid mask, blend.

Pure numpy: no torch, no files, no PIL. Dilation and feathering run only in windows around the
mask pixels, so their cost follows the mask's extent, not the image's. Boxes are half-open
pixel boxes ``[x0, x1) x [y0, y1)`` (`Box`), the unit every geometry module speaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .buckets import LATENT_MULTIPLE


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


_WINDOW_BLOCK = 64  # block side used to find the windows dilation and feathering work in


def changed_boxes(before: np.ndarray, after: np.ndarray, boxes: list[Box]) -> list[Box]:
    """Within each box, the bounding box of the pixels that differ between `before` and `after`
    (H x W or H x W x C); boxes with no change are left out. What a result reports as painted
    is what changed, not where the model was allowed to paint."""
    out = []
    for box in boxes:
        window = box.slices()
        diff = before[window] != after[window]
        if diff.ndim == 3:
            diff = diff.any(axis=2)
        rows, cols = np.flatnonzero(diff.any(axis=1)), np.flatnonzero(diff.any(axis=0))
        if rows.size:
            out.append(Box(box.x0 + int(cols[0]), box.y0 + int(rows[0]), box.x0 + int(cols[-1]) + 1,
                           box.y0 + int(rows[-1]) + 1))
    return out


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
    mask = as_bool_mask(mask)
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
    mask = as_bool_mask(mask)
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
    support = as_bool_mask(support)
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
    labelled = label_runs(grown)
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


def as_bool_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (HxW), got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    return mask


def label_runs(grid: np.ndarray, max_runs: int | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]] | None:
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
    labels = union_find(len(starts), a, b)
    _, inverse = np.unique(labels, return_inverse=True)
    return inverse.astype(np.int64), (starts - row, ends - row)  # positions in the unpadded grid


def union_find(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
