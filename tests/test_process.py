"""One job through run_job with the real tiny model: regions, byte identity, modes, EXIF."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from inpaintd.core.buckets import bucket_shapes
from inpaintd.core.config import Config, config_from_dict
from inpaintd.core.errors import Interrupted, JobError
from inpaintd.core.masks import dilate, feather_alpha, threshold_mask
from inpaintd.paint.job import run_job
from inpaintd.paint.jobspec import build_request
from PIL import Image

# Small working sizes keep the tiny model fast; the geometry rules are the same at 512.
SMALL = {"roi": {"min_size": 64, "max_size": 128, "bucket_sides": [64, 128], "dilate": 2, "feather": 4, "padding": 8}}


def config(**sections: dict) -> Config:
    data = {key: dict(value) for key, value in SMALL.items()}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    data.setdefault("inference", {}).setdefault("steps", 2)
    return config_from_dict(data)


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    Image.fromarray(array).save(path, **kwargs)
    return path


def mask_with(width: int, height: int, *boxes: tuple[int, int, int, int]) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        mask[y0:y1, x0:x1] = 255
    return mask


def run(engine, tmp_path: Path, image: np.ndarray, mask: np.ndarray | None, cfg: Config, **save_kwargs):
    image_path = save(tmp_path / "in.png", image, **save_kwargs)
    mask_path = save(tmp_path / "in.mask.png", mask) if mask is not None else None
    request = build_request("in", image_path, mask_path, {"seed": 7}, cfg)
    return run_job(engine, request, cfg)


def decoded(result) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(result.image_bytes)))


def affected_area(mask: np.ndarray, cfg: Config) -> np.ndarray:
    grown = dilate(threshold_mask(mask, cfg.roi.mask_threshold), cfg.roi.dilate)
    return feather_alpha(grown, cfg.roi.feather) > 0


@pytest.mark.parametrize("size", [(64, 64), (97, 61), (300, 200)])
def test_pixels_outside_the_mask_are_byte_identical(tiny_engine, tmp_path: Path, size: tuple[int, int]) -> None:
    width, height = size
    cfg = config()
    image = photo(width, height)
    mask = mask_with(width, height, (width // 3, height // 3, width // 3 + 9, height // 3 + 7))
    result = run(tiny_engine, tmp_path, image, mask, cfg)
    out = decoded(result)
    assert out.shape == image.shape
    outside = ~affected_area(mask, cfg)
    assert np.array_equal(out[outside], image[outside])
    assert not np.array_equal(out[~outside], image[~outside]), "the masked area was not painted"


def test_two_far_apart_scratches_are_two_small_regions(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    image = photo(600, 400)
    mask = mask_with(600, 400, (10, 10, 20, 20), (570, 370, 590, 390))
    result = run(tiny_engine, tmp_path, image, mask, cfg)
    assert len(result.regions) == 2
    for region in result.regions:
        x0, y0, x1, y1 = region.crop_box
        assert (x1 - x0) * (y1 - y0) < 600 * 400 / 10
    assert len(result.sidecar["regions"]) == 2
    assert {tuple(r["work_size"]) for r in result.sidecar["regions"]} <= set(bucket_shapes(cfg.roi))


def test_a_big_region_is_downscaled_to_the_working_size_and_pasted_back(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    image = photo(400, 300)
    mask = mask_with(400, 300, (50, 50, 350, 250))
    result = run(tiny_engine, tmp_path, image, mask, cfg)
    (region,) = result.regions
    assert max(region.work_size) <= cfg.roi.max_size
    x0, y0, x1, y1 = region.crop_box
    assert x1 - x0 > region.work_size[0]
    outside = ~affected_area(mask, cfg)
    assert np.array_equal(decoded(result)[outside], image[outside])


def test_the_alpha_channel_is_the_mask_and_the_mode_is_kept(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    rgba = np.dstack([photo(80, 80), np.full((80, 80), 255, dtype=np.uint8)])
    rgba[30:40, 30:40, 3] = 0  # transparent = repaint
    result = run(tiny_engine, tmp_path, rgba, None, cfg)
    out = Image.open(io.BytesIO(result.image_bytes))
    assert out.mode == "RGBA"
    pixels = np.asarray(out)
    assert pixels[35, 35, 3] == 255, "repainted pixels become opaque"
    hole = np.zeros((80, 80), dtype=np.uint8)
    hole[30:40, 30:40] = 255
    outside = ~affected_area(hole, cfg)
    assert np.array_equal(pixels[outside], rgba[outside])
    assert result.sidecar["inputs"]["mask"] == {"source": "alpha"}


def test_greyscale_input_stays_greyscale(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    grey = photo(64, 64)[..., 0]
    result = run(tiny_engine, tmp_path, grey, mask_with(64, 64, (20, 20, 30, 30)), cfg)
    assert Image.open(io.BytesIO(result.image_bytes)).mode == "L"


def test_exif_orientation_is_kept_and_the_mask_is_in_display_orientation(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    stored = photo(96, 64)  # stored landscape; orientation 6 displays it as portrait 64x96
    exif = Image.Exif()
    exif[0x0112] = 6
    display_mask = mask_with(64, 96, (5, 5, 15, 15))
    result = run(tiny_engine, tmp_path, stored, display_mask, cfg, exif=exif.tobytes())
    out = Image.open(io.BytesIO(result.image_bytes))
    assert out.size == (96, 64), "pixel layout is the input's"
    assert out.getexif().get(0x0112) == 6
    assert result.sidecar["inputs"]["image"]["exif_orientation"] == 6


def test_a_mask_of_another_size_is_an_error_not_a_resize(tiny_engine, tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        run(tiny_engine, tmp_path, photo(64, 64), mask_with(65, 64, (1, 1, 9, 9)), config())
    assert caught.value.code == "mask_size_mismatch"
    assert "65" in caught.value.message


def test_an_all_black_mask_fails_the_job(tiny_engine, tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        run(tiny_engine, tmp_path, photo(64, 64), mask_with(64, 64), config())
    assert caught.value.code == "mask_empty"


def test_no_mask_and_no_alpha_fails_the_job(tiny_engine, tmp_path: Path) -> None:
    with pytest.raises(JobError) as caught:
        run(tiny_engine, tmp_path, photo(64, 64), None, config())
    assert caught.value.code == "mask_missing"


def test_the_sidecar_reports_what_reproduces_the_result(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    result = run(tiny_engine, tmp_path, photo(64, 64), mask_with(64, 64, (20, 20, 30, 30)), cfg)
    sidecar = result.sidecar
    assert sidecar["seed"] == 7 == sidecar["parameters"]["seed"]
    assert sidecar["model"]["random_weights"] is True
    assert "random weights" in sidecar["warning"]
    assert len(sidecar["inputs"]["image"]["sha256"]) == 64
    assert sidecar["peak_rss_bytes"] > 0
    assert set(sidecar["timings"]) == {"read_seconds", "paint_seconds", "encode_seconds", "total_seconds"}
    assert {"torch", "diffusers", "inpaintd"} <= set(sidecar["versions"])
    again = run(tiny_engine, tmp_path, photo(64, 64), mask_with(64, 64, (20, 20, 30, 30)), cfg)
    assert again.image_bytes == result.image_bytes, "same inputs and seed give the same bytes"


def test_an_interrupt_from_the_step_callback_propagates(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    image_path = save(tmp_path / "in.png", photo(64, 64))
    mask_path = save(tmp_path / "in.mask.png", mask_with(64, 64, (20, 20, 30, 30)))
    request = build_request("in", image_path, mask_path, {"seed": 1, "steps": 3}, cfg)
    seen: list[tuple[int, int]] = []

    def stop_after_first(done: int, total: int) -> None:
        seen.append((done, total))
        raise Interrupted("shutdown")

    with pytest.raises(Interrupted):
        run_job(tiny_engine, request, cfg, on_step=stop_after_first)
    assert seen == [(1, 3)]


def test_progress_counts_steps_across_regions(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    image_path = save(tmp_path / "in.png", photo(600, 400))
    mask_path = save(tmp_path / "in.mask.png", mask_with(600, 400, (10, 10, 20, 20), (570, 370, 590, 390)))
    request = build_request("in", image_path, mask_path, {"seed": 1, "steps": 2}, cfg)
    seen: list[tuple[int, int]] = []
    run_job(tiny_engine, request, cfg, on_step=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_the_debug_overlay_draws_the_boxes(tiny_engine, tmp_path: Path) -> None:
    cfg = config()
    image_path = save(tmp_path / "in.png", np.full((100, 100, 3), 128, dtype=np.uint8))
    mask_path = save(tmp_path / "in.mask.png", mask_with(100, 100, (40, 40, 50, 50)))
    request = build_request("in", image_path, mask_path, {"seed": 1}, cfg)
    result = run_job(tiny_engine, request, cfg, debug_overlay=True)
    overlay = np.asarray(Image.open(io.BytesIO(result.debug_overlay)).convert("RGB"))
    x0, y0, x1, y1 = result.regions[0].crop_box
    assert tuple(overlay[y0, (x0 + x1) // 2]) == (0, 255, 0), "crop box outline"
    assert (overlay == (255, 0, 0)).all(axis=-1).any(), "mask outline"
    # The feather band: exactly the pixels blended part painting, part original, tinted yellow.
    grown = dilate(threshold_mask(mask_with(100, 100, (40, 40, 50, 50)), 127), cfg.roi.dilate)
    alpha = feather_alpha(grown, cfg.roi.feather)
    band = (alpha > 0) & (alpha < 1)
    assert band.any()
    assert (overlay[band] == (191, 191, 64)).all(axis=-1).all()
    untouched = ~band & ~grown
    untouched[y0, :] = untouched[y1 - 1, :] = untouched[:, x0] = untouched[:, x1 - 1] = False
    untouched[y0 : y0 + 16, x0 : x0 + 64] = False  # the label
    assert (overlay[untouched] == 128).all()


class RecordingEngine:
    """The real tiny engine, recording the mask each region was painted with."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.masks: list[np.ndarray] = []

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def inpaint(self, image, mask, params, on_step=None):
        self.masks.append(np.asarray(mask) > 0)
        return self.engine.inpaint(image, mask, params, on_step=on_step)


@pytest.mark.parametrize("size", [(100, 90), (400, 300)])  # painted at crop size, and downscaled
def test_the_model_mask_is_whole_latent_cells_holding_the_mask_and_its_feather(tiny_engine, tmp_path, size) -> None:
    width, height = size
    cfg = config()
    engine = RecordingEngine(tiny_engine)
    mask = mask_with(width, height, (width // 3, height // 3, width // 3 + 13, height // 3 + 5))
    image_path = save(tmp_path / "in.png", photo(width, height))
    mask_path = save(tmp_path / "in.mask.png", mask)
    result = run_job(engine, build_request("in", image_path, mask_path, {"seed": 1}, cfg), cfg)
    (model_mask,) = engine.masks
    (region,) = result.regions
    work_w, work_h = region.work_size
    assert model_mask.shape == (work_h, work_w)
    cells = model_mask.reshape(work_h // 8, 8, work_w // 8, 8)
    assert np.array_equal(cells.all(axis=(1, 3)), cells.any(axis=(1, 3))), "whole latent cells"
    # Every pixel the blend takes from the painting maps into a masked latent cell.
    x0, y0, x1, y1 = region.crop_box
    blended = affected_area(mask, cfg)[y0:y1, x0:x1]
    ys, xs = np.nonzero(blended)
    wx = ((xs + 0.5) * work_w / (x1 - x0)).astype(int)
    wy = ((ys + 0.5) * work_h / (y1 - y0)).astype(int)
    assert model_mask[wy, wx].all()
    assert not model_mask.all(), "the model repaints cells around the mask, not the whole crop"


def test_color_match_makes_a_patch_in_a_flat_surrounding_that_colour(tiny_engine, tmp_path) -> None:
    """The random-weight model paints noise; matched to a flat ring, the noise becomes the ring's colour."""
    flat = np.empty((96, 96, 3), dtype=np.uint8)
    flat[...] = (90, 160, 210)
    mask = mask_with(96, 96, (40, 40, 52, 52))
    plain = run(tiny_engine, tmp_path, flat, mask, config())
    assert not np.array_equal(decoded(plain), flat)
    matched = run(tiny_engine, tmp_path, flat, mask, config(roi={"color_match": True}))
    assert np.array_equal(decoded(matched), flat)
    assert matched.sidecar["roi"]["color_match"] is True


def test_color_match_is_a_per_job_option(tiny_engine, tmp_path) -> None:
    cfg = config()
    image_path = save(tmp_path / "in.png", np.full((64, 64, 3), 77, dtype=np.uint8))
    mask_path = save(tmp_path / "in.mask.png", mask_with(64, 64, (20, 20, 30, 30)))
    result = run_job(tiny_engine, build_request("in", image_path, mask_path, {"seed": 1, "color_match": True}, cfg), cfg)
    assert np.array_equal(decoded(result), np.full((64, 64, 3), 77, dtype=np.uint8))
    with pytest.raises(JobError, match="color_match"):
        build_request("in", image_path, mask_path, {"color_match": "yes"}, cfg)


def test_a_thin_strip_runs_at_an_elongated_working_size_and_stays_byte_identical_outside(tiny_engine, tmp_path) -> None:
    """The most elongated shapes (one latent cell high) go through the real pipeline."""
    cfg = config()
    image = photo(400, 24)
    mask = mask_with(400, 24, (20, 10, 380, 14))
    result = run(tiny_engine, tmp_path, image, mask, cfg)
    for region in result.regions:
        assert min(region.work_size) == 8 and max(region.work_size) <= cfg.roi.max_size
    outside = ~affected_area(mask, cfg)
    assert np.array_equal(decoded(result)[outside], image[outside])


@pytest.mark.parametrize("renamed", [False, True])
def test_a_published_sidecar_holds_exactly_the_documented_keys(tiny_engine, tmp_path: Path, renamed: bool) -> None:
    import json
    import re
    import time

    from inpaintd.paint import sidecar as schema
    from inpaintd.paint.sidecar import claim_fields
    from inpaintd.store.outbox import publish

    cfg = config()
    result = run(tiny_engine, tmp_path, photo(64, 64), mask_with(64, 64, (20, 20, 30, 30)), cfg)
    outbox = tmp_path / "outbox"
    outbox.mkdir()
    if renamed:
        (outbox / "in.png").write_bytes(b"taken")
    now = time.time()
    extra = claim_fields(job_id="j", host="h", device="d", arrived=now - 2, queue_wait=1.0, started=now - 1, finished=now, attempts=1,
                         entries=["in.png", "in.mask.png"])
    _image, sidecar_path = publish(outbox, result, extra)
    published = set(json.loads(sidecar_path.read_text()))
    documented = set(schema.PAINT_KEYS + schema.CLAIM_KEYS + schema.PUBLICATION_KEYS)
    absent = {"renamed_from"} if not renamed else set()  # "warning" is there: the tiny model is random
    assert published == documented - absent, (sorted(published - documented), sorted(documented - published))
    for key in documented:  # and the module's docstring says what each holds
        assert re.search(rf"(?<![\w.]){key}(?![\w(])", schema.__doc__ or ""), key


def _bytes_read() -> int:
    """rchar of this process: every byte its read() calls returned."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


@pytest.mark.parametrize("which", ["image", "mask"])
def test_a_claimed_input_that_grew_after_its_check_is_never_read_past_the_limit(tiny_engine, tmp_path: Path,
                                                                                which: str) -> None:
    # An uploader who keeps a second write handle open can grow a claimed file after the
    # daemon checked its size (to 8 TiB, sparse, at no cost to them). The job must fail
    # input_too_large having read at most the limit, never hash or decode the rest.
    limit = 4 * 2**20
    cfg = config(limits={"max_input_bytes": limit})
    image_path = save(tmp_path / "in.png", photo(64, 64))
    mask_path = save(tmp_path / "in.mask.png", mask_with(64, 64, (20, 20, 30, 30)))
    grown = image_path if which == "image" else mask_path
    with open(grown, "r+b") as writer:  # the second handle
        writer.truncate(8 * 2**40)
    request = build_request("in", image_path, mask_path, {"seed": 7}, cfg)
    before = _bytes_read()
    with pytest.raises(JobError) as caught:
        run_job(tiny_engine, request, cfg)
    assert caught.value.code == "input_too_large" and "grew" in caught.value.message
    assert _bytes_read() - before <= limit + 2 * 2**20 + (64 * 2**10 if which == "mask" else 0)


def test_the_sidecar_hashes_the_bytes_that_were_decoded(tiny_engine, tmp_path: Path) -> None:
    import hashlib

    cfg = config()
    result = run(tiny_engine, tmp_path, photo(64, 64), mask_with(64, 64, (20, 20, 30, 30)), cfg)
    for role, path in (("image", tmp_path / "in.png"), ("mask", tmp_path / "in.mask.png")):
        data = path.read_bytes()
        assert result.sidecar["inputs"][role]["sha256"] == hashlib.sha256(data).hexdigest()
        assert result.sidecar["inputs"][role]["bytes"] == len(data)
