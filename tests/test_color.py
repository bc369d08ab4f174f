"""Colour matching (color.py): after matching, the ring looks like the original ring, statistically."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inpaintd.core.color import match_color, ring_around, ring_stats

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def patches(draw):
    """An original crop and a painting of it with another level, contrast and noise per channel,
    and a ring of at least 64 pixels around a box in the middle."""
    height = draw(st.integers(24, 80))
    width = draw(st.integers(24, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    original = np.empty((height, width, 3), dtype=np.uint8)
    painted = np.empty_like(original)
    for c in range(3):
        lo = draw(st.integers(0, 200))
        hi = draw(st.integers(lo + 8, 255))
        original[..., c] = rng.integers(lo, hi + 1, (height, width))
        plo = draw(st.integers(0, 200))
        phi = draw(st.integers(plo + 8, 255))
        painted[..., c] = rng.integers(plo, phi + 1, (height, width))
    support = np.zeros((height, width), dtype=bool)
    support[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3] = True
    ring = ring_around(support, draw(st.integers(4, 12)))
    return original, painted, ring


@SETTINGS
@given(patches())
def test_after_matching_the_rings_mean_and_spread_are_the_originals(case):
    original, painted, ring = case
    matched = match_color(painted, original, ring)
    want_mean, want_std = ring_stats(original, ring)
    got_mean, got_std = ring_stats(matched, ring)
    # Rounding to whole levels is the only error left: half a level at most, less on average.
    assert np.all(np.abs(got_mean - want_mean) <= 0.5), (got_mean, want_mean)
    assert np.all(np.abs(got_std - want_std) <= 0.5), (got_std, want_std)


@SETTINGS
@given(patches())
def test_matching_is_one_increasing_affine_map_per_channel(case):
    """Structure is kept: brighter painted pixels stay at least as bright, per channel."""
    original, painted, ring = case
    matched = match_color(painted, original, ring)
    for c in range(3):
        order = np.argsort(painted[..., c], axis=None, kind="stable")
        assert np.all(np.diff(matched[..., c].reshape(-1)[order].astype(int)) >= 0)


def test_a_flat_surrounding_makes_a_flat_patch_of_its_colour():
    original = np.full((32, 32, 3), (100, 150, 200), dtype=np.uint8)
    painted = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    support = np.zeros((32, 32), dtype=bool)
    support[10:20, 10:20] = True
    matched = match_color(painted, original, ring_around(support, 8))
    assert (matched == (100, 150, 200)).all()


def test_clipping_at_the_ends_of_the_range_is_refitted():
    """A painting much flatter than a near-black original: the plain affine map would clip at 0."""
    rng = np.random.default_rng(1)
    original = np.clip(rng.exponential(6.0, (48, 48, 3)), 0, 255).astype(np.uint8)
    painted = rng.integers(120, 136, (48, 48, 3), dtype=np.uint8)
    support = np.zeros((48, 48), dtype=bool)
    support[16:32, 16:32] = True
    ring = ring_around(support, 10)
    matched = match_color(painted, original, ring)
    want_mean, want_std = ring_stats(original, ring)
    got_mean, got_std = ring_stats(matched, ring)
    assert np.all(np.abs(got_mean - want_mean) <= 0.75) and np.all(np.abs(got_std - want_std) <= 0.75)


def test_an_empty_ring_leaves_the_painting_alone_and_bad_shapes_are_refused():
    painted = np.zeros((4, 4, 3), dtype=np.uint8)
    assert np.array_equal(match_color(painted, painted + 9, np.zeros((4, 4), dtype=bool)), painted)
    with pytest.raises(ValueError):
        match_color(painted, painted[:3], np.ones((4, 4), dtype=bool))
