"""Working sizes: the aspect-bucket shapes the model runs at, and the crop window along one axis.

Pure: integers in, integers out. The service warms every bucket shape before READY=1
(`bucket_shapes`); regions.py picks, for each crop, the bucket shape it can reach.
"""

from __future__ import annotations

import math
from fractions import Fraction

from .config import RoiConfig

LATENT_MULTIPLE = 8  # the VAE downsamples by 8: crop sides are multiples of this where possible


# The most a working size may stretch its crop (a stretched scene paints stretched objects): 2%.
ASPECT_TOLERANCE = Fraction(1, 50)


ASPECT_STEPS = 8  # aspect buckets: short side = k/8 of the long side


def reach_shape(
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
        nx0, nw = axis_window(*x_axis, max(w, round8(h * sw / sh)))
        grown, scale = (nx0, nw, y0, h), sh / h
        shrunk = shrink_window(*y_axis, round8(w * sh / sw))
        cut = None if shrunk is None else (x0, w, *shrunk)
    else:
        ny0, nh = axis_window(*y_axis, max(h, round8(w * sh / sw)))
        grown, scale = (x0, w, ny0, nh), sw / w
        shrunk = shrink_window(*x_axis, round8(h * sw / sh))
        cut = None if shrunk is None else (*shrunk, y0, h)
    if aspect_close(shape, (grown[1], grown[3])):
        out.append(((0, -scale, grown[1] * grown[3]), grown))
    if cut is not None and aspect_close(shape, (cut[1], cut[3])):
        out.append(((1, -(cut[1] * cut[3])), cut))
    return out


def shrink_window(
    length: int, req0: int, req1: int, ctx0: int, ctx1: int, centre2: int, side: int
) -> tuple[int, int] | None:
    """(start, side) of a window holding [req0, req1), centred where it can be; None if too short.

    Takes the same axis tuple as axis_window; the context span is not kept (that is the cost).
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
    shorts = sorted({max(LATENT_MULTIPLE, round8(long_side * k / ASPECT_STEPS)) for k in range(1, ASPECT_STEPS + 1)})
    shorts = [s for s in shorts if s <= long_side][::-1]
    return [(long_side, s) for s in shorts] + [(s, long_side) for s in shorts if s != long_side]


def bucket_shapes(roi: RoiConfig) -> list[tuple[int, int]]:
    """Every aspect-bucket shape a job can run at: aspect_shapes of each bucket side up to the cap.

    The only other shapes are the off-bucket ones of crops that can neither grow nor shrink
    to a bucket aspect (see find_regions), which a compiled UNet compiles on first use.
    """
    cap = work_cap(roi)
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
        for cand in ((min(cap, round8(side * w / h)), side), (side, min(cap, round8(side * h / w)))):
            error = abs((cand[0] * h) / (cand[1] * w) - 1.0)
            ok = aspect_close(cand, (w, h))
            key = (0.0 if ok else error, abs(max(cand) - long_side) if ok else 0.0, max(cand))
            if best is None or key < best[0]:
                best = (key, cand)
    assert best is not None
    return best[1]


def axis_window(length: int, req0: int, req1: int, ctx0: int, ctx1: int, centre2: int, target: int) -> tuple[int, int]:
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


def work_cap(roi: RoiConfig) -> int:
    sides = sorted(roi.bucket_sides)
    fitting = [s for s in sides if s <= roi.max_size]
    return fitting[-1] if fitting else sides[0]


def bucket_long_side(w: int, h: int, buckets: tuple[int, ...], cap: int) -> int:
    """The smallest bucket side holding the crop's long side once scaled down to fit the cap."""
    need = min(cap, max(1, math.ceil(max(w, h) * min(1.0, cap / max(w, h)) - 1e-9)))
    return next(s for s in sorted(buckets) if s >= need)


def round8(value: float) -> int:
    """The nearest positive multiple of the latent grid."""
    return max(LATENT_MULTIPLE, int(math.floor(value / LATENT_MULTIPLE + 0.5)) * LATENT_MULTIPLE)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
