"""Properties of the ROI geometry: regions cover the mask, crops fit, blend leaves the rest alone."""

from __future__ import annotations

import math
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inpaintd.core.buckets import aspect_shapes, bucket_shapes, own_aspect_size
from inpaintd.core.config import RoiConfig
from inpaintd.core.masks import (
    Box,
    blend,
    dilate,
    feather_alpha,
    latent_mask,
    threshold_mask,
)
from inpaintd.core.regions import find_regions

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def masks(draw, max_side: int = 300):
    """A bool mask of random size (1x1 upwards) with a few random rectangles and dots."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(draw(st.integers(1, 5))):
        x0 = draw(st.integers(0, width - 1))
        y0 = draw(st.integers(0, height - 1))
        x1 = draw(st.integers(x0 + 1, min(width, x0 + 40)))
        y1 = draw(st.integers(y0 + 1, min(height, y0 + 40)))
        mask[y0:y1, x0:x1] = True
    return mask


@st.composite
def roi_configs(draw):
    buckets = tuple(sorted(set(draw(st.lists(st.sampled_from([64, 128, 192, 256, 384, 512]), min_size=1, max_size=4)))))
    max_size = draw(st.sampled_from([64, 128, 256, 384, 512, 768]))
    min_size = draw(st.sampled_from([64, 128, 256, 512]).filter(lambda v: v <= max_size))
    return RoiConfig(
        dilate=0,
        feather=draw(st.integers(0, 12)),
        padding=draw(st.integers(0, 40)),
        merge_gap=draw(st.integers(0, 40)),
        min_size=min_size,
        max_size=max_size,
        bucket_sides=buckets,
    )


def reference_dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    out = np.zeros_like(mask)
    ys, xs = np.nonzero(mask)
    yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
    for y, x in zip(ys, xs):
        out |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius
    return out


def check_regions(mask: np.ndarray, roi: RoiConfig) -> list:
    height, width = mask.shape
    regions = find_regions(mask, roi)
    assert regions, "a non-empty mask gives at least one region"
    covered = np.zeros_like(mask)
    for region in regions:
        crop, box = region.crop, region.mask_box
        assert 0 <= crop.x0 < crop.x1 <= width and 0 <= crop.y0 < crop.y1 <= height
        assert crop.contains(box.grow(roi.feather, width, height)), "crop holds the mask box and its feather"
        need = box.grow(roi.feather, width, height)
        for side, image_side, needed in ((crop.width, width, need.width), (crop.height, height, need.height)):
            # a multiple of 8 wherever one fits in the image and holds the mask box + feather
            assert side % 8 == 0 or (side == image_side and image_side // 8 * 8 < needed)
        cap = max([s for s in roi.bucket_sides if s <= roi.max_size] or [min(roi.bucket_sides)])
        for side in region.work_size:
            assert side % 8 == 0 and 8 <= side <= cap
        if region.work_size not in bucket_shapes(roi):
            # off-bucket only where the image leaves no room to grow the crop to a bucket's aspect
            assert own_aspect_size(crop.width, crop.height, max(region.work_size), cap) == region.work_size
        covered[box.slices()] = True
    assert covered[mask].all(), "every mask pixel lies in some region's mask box"
    # mask boxes are tight: each edge row/column of a mask box holds a mask pixel
    for region in regions:
        sub = mask[region.mask_box.slices()]
        assert sub[0].any() and sub[-1].any() and sub[:, 0].any() and sub[:, -1].any()
    return regions


@SETTINGS
@given(masks(), roi_configs())
def test_regions_cover_mask_and_respect_limits(mask, roi):
    check_regions(mask, roi)


def test_empty_mask_has_no_region():
    assert find_regions(np.zeros((50, 40), dtype=bool), RoiConfig()) == []


def test_far_apart_scratches_on_a_big_image_stay_two_regions_of_native_size():
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[10:14, 10:60] = True
    mask[2980:2990, 3900:3990] = True
    regions = check_regions(mask, RoiConfig())
    assert len(regions) == 2
    for region in regions:
        assert (region.crop.width, region.crop.height) == (512, 512)
        assert region.work_size == (512, 512)
    # shifted inward at the image edges, not clipped smaller
    assert regions[0].crop.as_tuple() == (0, 0, 512, 512)
    assert regions[1].crop.as_tuple() == (3488, 2488, 4000, 3000)


@SETTINGS
@given(gap=st.integers(0, 64), padding=st.integers(0, 32), feather=st.integers(0, 16), distance=st.integers(1, 400))
def test_merge_rule_follows_context_gap(gap, padding, feather, distance):
    """Two dots merge exactly when their context boxes are closer than merge_gap (or touch)."""
    roi = RoiConfig(dilate=0, padding=padding, feather=feather, merge_gap=gap, min_size=64, max_size=512)
    mask = np.zeros((200, 2000), dtype=bool)
    mask[100, 800] = True
    mask[100, 800 + distance] = True
    regions = check_regions(mask, roi)
    margin = padding + feather
    context_gap = (distance - 1) - 2 * margin  # px between the two context boxes
    fits_together = distance + 1 + 2 * margin <= roi.min_size
    close = context_gap < max(gap, 1) or fits_together
    assert len(regions) == (1 if close else 2)


def test_eight_connected_pixels_form_one_region_even_with_zero_margins():
    roi = RoiConfig(dilate=0, padding=0, feather=0, merge_gap=0, min_size=64, max_size=512)
    mask = np.zeros((400, 400), dtype=bool)
    idx = np.arange(300)
    mask[idx, idx] = True  # a diagonal line: connected only through corners
    regions = check_regions(mask, roi)
    assert len(regions) == 1
    assert regions[0].mask_box.as_tuple() == (0, 0, 300, 300)


def test_merging_repeats_until_stable():
    """A merged box can reach a third blob that neither part reached alone."""
    roi = RoiConfig(dilate=0, padding=0, feather=0, merge_gap=50, min_size=64, max_size=512)
    mask = np.zeros((400, 400), dtype=bool)
    mask[0:300, 0:20] = True  # A: a tall bar
    mask[0:20, 60:80] = True  # B: 40 px right of A, merges with it
    mask[250:270, 120:140] = True  # C: 40 px right of B's column but far below B; 100 px from A
    mask[380:382, 380:382] = True  # far away: its own region
    regions = check_regions(mask, roi)
    assert [r.mask_box.as_tuple() for r in regions] == [(0, 0, 140, 300), (380, 380, 382, 382)]


def aspect_error(region) -> Fraction:
    """|aspect(work) / aspect(crop) - 1|, exactly."""
    (ww, wh), crop = region.work_size, region.crop
    return abs(Fraction(ww * crop.height, wh * crop.width) - 1)


# Image aspect limits per working cap: with 8-px sides up to a 256 px cap every crop aspect
# below 8:1 has a working size within 2% (below 24:1 at 384, below 40:1 at 512). A crop can be
# up to 15/8 longer than its image where a side is under 16 px, hence these image limits.
_IMAGE_ASPECT = {256: 4, 320: 4, 384: 10, 448: 10, 512: 16, 640: 16, 768: 16}


@st.composite
def images_masks_and_rois(draw):
    """Any image from 1 px to 2400 px a side with a few boxes masked, and an roi config with
    a working cap of 256 px or more (below that, 8-px sides cannot express every aspect within 2%)."""
    buckets = tuple(sorted(set(draw(st.lists(st.sampled_from([256, 320, 384, 448, 512, 640, 768]), min_size=1, max_size=3)))))
    max_size = draw(st.sampled_from([256, 384, 512, 768]).filter(lambda v: v >= buckets[0]))
    roi = RoiConfig(
        dilate=0,
        feather=draw(st.integers(0, 16)),
        padding=draw(st.integers(0, 64)),
        merge_gap=draw(st.integers(0, 64)),
        min_size=draw(st.sampled_from([64, 256, 512]).filter(lambda v: v <= max_size)),
        max_size=max_size,
        bucket_sides=buckets,
    )
    limit = _IMAGE_ASPECT[max(s for s in buckets if s <= max_size)]
    height = draw(st.integers(1, 2400))
    width = draw(st.integers(max(1, -(-height // limit)), min(2400, height * limit)))
    mask = np.zeros((height, width), dtype=bool)
    for _ in range(draw(st.integers(1, 3))):
        x0 = draw(st.integers(0, width - 1))
        y0 = draw(st.integers(0, height - 1))
        x1 = draw(st.integers(x0 + 1, width))
        y1 = draw(st.integers(y0 + 1, height))
        mask[y0:y1, x0:x1] = True
    return mask, roi


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(images_masks_and_rois())
def test_the_working_size_keeps_the_crops_aspect_within_two_percent(case):
    mask, roi = case
    for region in check_regions(mask, roi):
        assert aspect_error(region) <= Fraction(1, 50), (region, mask.shape)


@pytest.mark.parametrize(
    "size, box",
    [((640, 480), (100, 100, 600, 400)), ((1000, 350), (100, 20, 900, 330)), ((1024, 400), (50, 50, 1000, 350)),
     ((1024, 300), (20, 20, 1000, 280)), ((1024, 300), (500, 100, 520, 120))],
)
def test_the_images_the_issue_measured_are_no_longer_stretched(size, box):
    width, height = size
    mask = np.zeros((height, width), dtype=bool)
    mask[box[1] : box[3], box[0] : box[2]] = True
    (region,) = check_regions(mask, RoiConfig())
    assert aspect_error(region) <= Fraction(1, 50)
    assert 480 <= max(region.work_size) <= 512  # an off-bucket shape may give up a few px for the aspect


def test_a_crop_with_room_is_grown_to_a_bucket_shape_and_gains_context():
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[500:2500, 500:3500] = True  # context 3080x2080: aspect 1.48, between 4:3 and 8:5
    (region,) = check_regions(mask, RoiConfig())
    assert region.work_size == (512, 384)  # 4:3 is painted at a higher resolution than 8:5
    assert (region.crop.width, region.crop.height) == (3080, 2312)
    assert aspect_error(region) <= Fraction(1, 50)


def test_aspect_buckets_are_eight_aspects_both_ways_round():
    assert aspect_shapes(512) == [(512, 512), (512, 448), (512, 384), (512, 320), (512, 256), (512, 192),
                                  (512, 128), (512, 64), (448, 512), (384, 512), (320, 512), (256, 512),
                                  (192, 512), (128, 512), (64, 512)]
    assert bucket_shapes(RoiConfig(min_size=256, max_size=384, bucket_sides=(256, 384, 512))) == (
        aspect_shapes(256) + aspect_shapes(384))


def test_tiny_images_use_the_whole_side_and_a_work_size_of_their_own_aspect():
    for height, width in ((1, 1), (7, 13), (13, 7)):
        mask = np.zeros((height, width), dtype=bool)
        mask[height // 2, width // 2] = True
        (region,) = check_regions(mask, RoiConfig())
        assert region.crop.as_tuple() == (0, 0, width, height)
        assert max(region.work_size) == 256
        assert aspect_error(region) <= Fraction(1, 50)


@pytest.mark.cost_bound
def test_speckle_mask_gives_few_regions_quickly():
    rng = np.random.default_rng(0)
    mask = rng.random((3000, 4000)) < 0.001
    roi = RoiConfig(dilate=0, padding=0, feather=0, merge_gap=0, min_size=64, max_size=512)
    start = time.perf_counter()
    regions = check_regions(mask, roi)
    assert time.perf_counter() - start < 3.0
    assert len(regions) <= 1024


@pytest.mark.cost_bound
def test_region_finding_on_a_big_sparse_mask_is_fast():
    mask = np.zeros((3000, 4000), dtype=bool)
    for k in range(20):
        mask[100 * k + 50 : 100 * k + 60, 150 * k : 150 * k + 40] = True
    # CPU time of this process, not wall time: other work on a shared 2-core machine must not
    # fail it. The bound says "cost follows the mask": a whole-image pass would take ~10x longer.
    start = time.process_time()
    dilated = dilate(mask, 8)
    find_regions(dilated, RoiConfig())
    feather_alpha(dilated, 8)
    assert time.process_time() - start < 1.5  # ~0.1 s on a laptop core


def test_threshold_mask_is_strictly_above():
    raw = np.array([[0, 127, 128, 255]], dtype=np.uint8)
    assert threshold_mask(raw, 127).tolist() == [[False, False, True, True]]
    with pytest.raises(ValueError):
        threshold_mask(np.zeros((2, 2, 3), dtype=np.uint8), 127)


@SETTINGS
@given(masks(max_side=60), st.integers(0, 9))
def test_dilate_is_a_euclidean_disc(mask, radius):
    got = dilate(mask, radius)
    assert got.dtype == bool and got is not mask
    np.testing.assert_array_equal(got, reference_dilate(mask, radius) if radius else mask)


def test_dilate_and_feather_reach_across_window_blocks():
    mask = np.zeros((300, 300), dtype=bool)
    mask[63, 63] = True  # at a block corner: its disc spans four 64 px blocks
    mask[64, 200] = True
    np.testing.assert_array_equal(dilate(mask, 20), reference_dilate(mask, 20))


@SETTINGS
@given(masks(max_side=80), st.integers(0, 12))
def test_feather_alpha_is_one_on_mask_and_zero_beyond_radius(mask, radius):
    alpha = feather_alpha(mask, radius)
    assert alpha.dtype == np.float32 and alpha.shape == mask.shape
    assert (alpha >= 0).all() and (alpha <= 1).all()
    assert (alpha[mask] == 1.0).all()
    reach = reference_dilate(mask, radius) if radius else mask
    assert (alpha[~reach] == 0.0).all(), "exactly 0 beyond the feather radius"
    if radius:
        assert (alpha[reach] > 0).all(), "positive everywhere within the radius"


def test_feather_falls_off_monotonically_with_distance():
    mask = np.zeros((1, 40), dtype=bool)
    mask[0, :10] = True
    alpha = feather_alpha(mask, 8)[0]
    assert alpha[9] == 1.0
    assert all(alpha[i] > alpha[i + 1] for i in range(9, 18))
    assert (alpha[18:] == 0).all()


@SETTINGS
@given(
    height=st.integers(1, 64),
    width=st.integers(1, 64),
    channels=st.sampled_from([1, 3, 4]),
    seed=st.integers(0, 2**32 - 1),
    radius=st.integers(0, 6),
    data=st.data(),
)
def test_blend_is_byte_identical_where_alpha_is_zero(height, width, channels, seed, radius, data):
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
    x0 = data.draw(st.integers(0, width - 1))
    y0 = data.draw(st.integers(0, height - 1))
    crop = Box(x0, y0, data.draw(st.integers(x0 + 1, width)), data.draw(st.integers(y0 + 1, height)))
    painted = rng.integers(0, 256, (crop.height, crop.width, channels), dtype=np.uint8)
    mask = rng.random((height, width)) < 0.05
    alpha = feather_alpha(mask, radius)
    out = blend(original, painted, crop, alpha)
    assert out.dtype == np.uint8 and out.shape == original.shape
    assert out is not original
    untouched = alpha == 0
    untouched_outside = np.ones_like(untouched)
    untouched_outside[crop.slices()] = False
    np.testing.assert_array_equal(out[untouched], original[untouched])
    np.testing.assert_array_equal(out[untouched_outside], original[untouched_outside])
    window = out[crop.slices()]
    full = alpha[crop.slices()] == 1.0
    np.testing.assert_array_equal(window[full], painted[full])


def test_blend_on_a_big_sparse_image_changes_only_the_feathered_mask():
    rng = np.random.default_rng(1)
    original = rng.integers(0, 256, (3000, 4000, 3), dtype=np.uint8)
    mask = np.zeros((3000, 4000), dtype=bool)
    mask[1500:1510, 2000:2030] = True
    roi = RoiConfig()
    (region,) = find_regions(mask, roi)
    alpha = feather_alpha(mask, roi.feather)
    painted = np.full((region.crop.height, region.crop.width, 3), 7, dtype=np.uint8)
    out = blend(original, painted, region.crop, alpha)
    changed = (out != original).any(axis=2)
    assert not changed[alpha == 0].any()
    assert changed[mask].all() or (original[mask] == 7).any()


def test_blend_rejects_mismatched_shapes():
    original = np.zeros((10, 10, 3), dtype=np.uint8)
    alpha = np.zeros((10, 10), dtype=np.float32)
    with pytest.raises(ValueError, match="painted shape"):
        blend(original, np.zeros((4, 4, 3), dtype=np.uint8), Box(0, 0, 5, 5), alpha)
    with pytest.raises(ValueError, match="not inside"):
        blend(original, np.zeros((5, 5, 3), dtype=np.uint8), Box(8, 8, 13, 13), alpha)


@SETTINGS
@given(
    crop_w=st.integers(1, 96),
    crop_h=st.integers(1, 96),
    work_w=st.integers(1, 16).map(lambda k: 8 * k),
    work_h=st.integers(1, 16).map(lambda k: 8 * k),
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 0.05),
)
def test_the_model_mask_is_whole_latent_cells_covering_every_pixel_the_blend_reads(
    crop_w, crop_h, work_w, work_h, seed, density
):
    """Brute force: each support pixel, resized back with a 3-tap filter, reads only masked work pixels."""
    support = np.random.default_rng(seed).random((crop_h, crop_w)) < density
    model = latent_mask(support, (work_w, work_h))
    assert model.shape == (work_h, work_w)
    cells = model.reshape(work_h // 8, 8, work_w // 8, 8)
    assert np.array_equal(cells.all(axis=(1, 3)), cells.any(axis=(1, 3))), "whole 8x8 latent cells only"
    sx, sy = Fraction(work_w, crop_w), Fraction(work_h, crop_h)  # exact: boundaries matter
    hx, hy = 3 * max(1, sx), 3 * max(1, sy)
    for y, x in zip(*np.nonzero(support)):
        # work pixel j is read when [j, j+1) meets (x*s - h, (x+1)*s + h)
        x0, x1 = max(0, math.floor(x * sx - hx)), min(work_w, math.ceil((x + 1) * sx + hx))
        y0, y1 = max(0, math.floor(y * sy - hy)), min(work_h, math.ceil((y + 1) * sy + hy))
        assert model[y0:y1, x0:x1].all(), (x, y)
    if not support.any():
        assert not model.any()


def test_a_mask_in_one_corner_marks_only_the_latent_cells_it_reaches():
    support = np.zeros((64, 64), dtype=bool)
    support[0:2, 0:2] = True
    model = latent_mask(support, (64, 64))  # no resize: reach is 3 px around the pixels
    assert model[:8, :8].all() and model.sum() == 64


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    height=st.integers(64, 2400),
    data=st.data(),
    roi=st.sampled_from([RoiConfig(), RoiConfig(bucket_sides=(512,)), RoiConfig(min_size=256, max_size=384, bucket_sides=(256, 384))]),
)
def test_a_mask_that_leaves_room_runs_at_a_bucket_shape(height, data, roi):
    """Off-bucket shapes (compiled on first use) only when mask and feather fill most of the image
    (or the image is a strip longer than the longest bucket aspect, 8:1)."""
    width = data.draw(st.integers(max(64, height // 4), min(2400, height * 4)))
    feather = roi.feather + roi.dilate
    w = data.draw(st.integers(1, max(1, width // 2 - 2 * feather)))
    h = data.draw(st.integers(1, max(1, height // 2 - 2 * feather)))
    x0 = data.draw(st.integers(0, width - w))
    y0 = data.draw(st.integers(0, height - h))
    mask = np.zeros((height, width), dtype=bool)
    mask[y0 : y0 + h, x0 : x0 + w] = True
    for region in check_regions(mask, roi):
        assert region.work_size in bucket_shapes(roi)
        assert aspect_error(region) <= Fraction(1, 50)
