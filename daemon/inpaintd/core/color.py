"""Colour matching of a painted patch to its surroundings (opt-in: ``roi.color_match``).

Pure numpy. A crop-and-paste inpainter's most visible fault besides a seam is a patch whose
colour is slightly off against the photo around it (the model's own tint, a VAE colour shift).
The ring of unmasked pixels just outside the blend shows both versions of the same content:
the original, and what the model made of it. Matching the painted patch's per-channel mean
and spread on that ring to the original's (Reinhard-style transfer, an affine map per channel)
moves the whole patch by the same correction before it is blended in. An affine map keeps the
painted structure as it is; only level and contrast per channel change.

This is checked with invariants, not looks: after matching, the ring's per-channel mean and
standard deviation equal the original ring's (to rounding). Nothing here claims the colours are
better with the test models' random weights.
"""

from __future__ import annotations

import numpy as np

from .masks import dilate

RING_MIN = 8  # px: the ring is at least this wide (a thin ring is too few pixels to measure)
_ROUNDS = 6  # re-fits after clipping to 0..255 moved the statistics


def ring_around(support: np.ndarray, width: int) -> np.ndarray:
    """bool: pixels within `width` px of the support (Euclidean) that are not in it."""
    return dilate(support, width) & ~support


def match_color(painted: np.ndarray, original: np.ndarray, ring: np.ndarray) -> np.ndarray:
    """painted (uint8 HxWxC) mapped per channel so that on `ring` its mean and spread are the original's.

    out = clip(round(gain * painted + offset)) per channel, gain = std_orig / std_painted on
    the ring (1 where the painted ring is flat), offset setting the mean; refitted on the
    clipped result a few times so clipping at 0/255 does not leave the statistics off. An
    empty ring returns painted unchanged (nothing to match against).
    """
    painted = np.asarray(painted)
    original = np.asarray(original)
    if painted.dtype != np.uint8 or original.dtype != np.uint8 or painted.shape != original.shape or painted.ndim != 3:
        raise ValueError("painted and original must be uint8 HxWxC arrays of one shape")
    if ring.shape != painted.shape[:2] or ring.dtype != np.bool_:
        raise ValueError(f"ring must be bool {painted.shape[:2]}, got {ring.dtype} {ring.shape}")
    if not ring.any():
        return painted.copy()
    out = np.empty_like(painted)
    for c in range(painted.shape[2]):
        out[..., c] = _match_channel(painted[..., c], original[..., c][ring].astype(np.float64), ring)
    return out


def ring_stats(image: np.ndarray, ring: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, standard deviation) of an HxWxC image over the ring pixels."""
    values = np.asarray(image)[ring].astype(np.float64)
    return values.mean(axis=0), values.std(axis=0)


def _match_channel(channel: np.ndarray, target: np.ndarray, ring: np.ndarray) -> np.ndarray:
    want_mean, want_std = float(target.mean()), float(target.std())
    source = channel.astype(np.float64)
    ring_values = source[ring]
    mean, std = float(ring_values.mean()), float(ring_values.std())
    # Fixed point on the statistics the unclipped map aims at: where clipping at 0/255 pulled
    # the result's mean or spread off, aim that much further next round.
    aim_mean, aim_std = want_mean, want_std
    best, best_error = (1.0, want_mean - mean), np.inf
    for _ in range(_ROUNDS):
        gain = aim_std / std if std > 1e-9 else 1.0
        offset = aim_mean - gain * mean
        mapped = np.clip(np.rint(gain * ring_values + offset), 0, 255)
        got_mean, got_std = float(mapped.mean()), float(mapped.std())
        error = abs(got_mean - want_mean) + abs(got_std - want_std)
        if error < best_error:
            best, best_error = (gain, offset), error
        if error < 0.05:
            break
        aim_mean += want_mean - got_mean
        if got_std > 1e-9:
            aim_std *= want_std / got_std
    gain, offset = best
    return np.clip(np.rint(gain * source + offset), 0, 255).astype(np.uint8)
