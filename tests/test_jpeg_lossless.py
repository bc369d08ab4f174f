"""JPEG in, JPEG out: real jobs with the tiny model on real JPEG files, checked with real jpegtran.

What is proven, on the stored (not EXIF-rotated) pixels and coefficients:
- no decoded pixel changes outside the painted MCU boxes grown by one MCU (a decoder's chroma
  upsampling reads the neighbouring MCU), and the painted area did change;
- the coefficients outside are the input's: jpegtran losslessly crops the strips around the
  painted MCU box out of input and output, and the crops are byte-identical (same
  coefficients and tables give the same bytes; any changed coefficient changes them);
- the file size stays within 3% of the input's for a small mask; EXIF, ICC, XMP and COM
  segments are byte-identical;
- inputs the splice cannot keep exact are re-encoded and the sidecar says why.
The painted-box geometry here is computed independently of jpeg_lossless (Pillow's own
transpose of a display-orientation mask), so a wrong orientation mapping would fail.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.core.config import config_from_dict
from inpaintd.paint import job as paint_job
from inpaintd.paint import jpeg_lossless
from inpaintd.paint.jobspec import build_request
from inpaintd.paint.jpeg_lossless import carry_markers, metadata_segments, stored_box
from PIL import Image, ImageCms

JPEGTRAN = shutil.which("jpegtran")
needs_jpegtran = pytest.mark.skipif(
    JPEGTRAN is None, reason="jpegtran not installed (apt-get install libjpeg-turbo-progs; scripts/setup-image-deps.sh)"
)
CONFIG = config_from_dict(
    {
        "roi": {"min_size": 64, "max_size": 128, "bucket_sides": [64, 128], "dilate": 2, "feather": 4, "padding": 8},
        "inference": {"steps": 2},
    }
)
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
XMP = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
# Pillow's transpose from display to stored orientation, per EXIF orientation.
TO_STORED = {
    1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT, 4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    7: Image.Transpose.TRANSVERSE,
}


def photo(width: int, height: int, grey: bool = False) -> Image.Image:
    """Smooth gradients with mild noise: compresses like a photo, not like random bytes."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(3)
    rgb = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 255 // (width + height)], axis=-1)
    rgb = np.clip(rgb + rng.integers(-12, 13, rgb.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(rgb)
    return image.convert("L") if grey else image


def write_jpeg(path: Path, image: Image.Image, orientation: int = 1, **options) -> Path:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "inpaintd test camera"
    metadata = {"exif": exif.tobytes(), "xmp": XMP, "comment": b"shot for the splice test"}
    if image.mode == "RGB":
        metadata["icc_profile"] = ICC
    image.save(path, format="JPEG", **{**metadata, **options})
    return path


def run_job(engine, tmp_path: Path, image_path: Path, display_size: tuple[int, int], box, output_format="same"):
    width, height = display_size
    mask = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    mask_path = tmp_path / "in.mask.png"
    Image.fromarray(mask).save(mask_path)
    request = build_request("in", image_path, mask_path, {"seed": 5, "output_format": output_format}, CONFIG)
    return paint_job.run_job(engine, request, CONFIG)


def painted_blocks(result, orientation: int, stored_size: tuple[int, int], mcu: tuple[int, int]) -> np.ndarray:
    """bool grid of the MCUs the painted boxes touch, stored orientation, from Pillow's transpose."""
    sw, sh = stored_size
    display = (sh, sw) if orientation in (5, 6, 7, 8) else (sw, sh)
    marked = np.zeros((display[1], display[0]), dtype=np.uint8)
    feather = CONFIG.roi.feather
    for region in result.sidecar["regions"]:
        x0, y0, x1, y1 = region["mask_box"]
        marked[max(0, y0 - feather) : y1 + feather, max(0, x0 - feather) : x1 + feather] = 1
    image = Image.fromarray(marked)
    if TO_STORED[orientation] is not None:
        image = image.transpose(TO_STORED[orientation])
    stored = np.asarray(image).astype(bool)
    mx, my = mcu
    rows, cols = -(-sh // my), -(-sw // mx)
    padded = np.zeros((rows * my, cols * mx), dtype=bool)
    padded[:sh, :sw] = stored
    return padded.reshape(rows, my, cols, mx).any(axis=(1, 3))


def grow_blocks(blocks: np.ndarray) -> np.ndarray:
    grown = blocks.copy()
    grown[1:] |= blocks[:-1]
    grown[:-1] |= blocks[1:]
    out = grown.copy()
    out[:, 1:] |= grown[:, :-1]
    out[:, :-1] |= grown[:, 1:]
    return out


def jpegtran_crop(data: bytes, x: int, y: int, w: int, h: int) -> bytes:
    done = subprocess.run([JPEGTRAN, "-copy", "none", "-crop", f"{w}x{h}+{x}+{y}"], input=data, capture_output=True, check=True)
    return done.stdout


def stored_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:  # no exif_transpose: the stored layout
        return np.asarray(im).astype(np.int16)


CASES = {
    "baseline 4:2:0": dict(options={"quality": 90}),
    "baseline 4:2:2": dict(options={"quality": 85, "subsampling": 1}),
    "baseline 4:4:4": dict(options={"quality": 80, "subsampling": 0}),
    "optimised tables": dict(options={"quality": 90, "optimize": True}),
    "progressive": dict(options={"quality": 88, "progressive": True}),
    "greyscale": dict(options={"quality": 90}, grey=True),
    "orientation 6": dict(options={"quality": 90}, orientation=6),
    "orientation 7": dict(options={"quality": 90}, orientation=7),
}


@needs_jpegtran
@pytest.mark.parametrize("case", list(CASES))
def test_outside_the_painted_mcus_the_jpeg_keeps_its_pixels_coefficients_size_and_metadata(tiny_engine, tmp_path, case):
    spec = CASES[case]
    orientation = spec.get("orientation", 1)
    stored_size = (328, 248)  # not a multiple of 16: partial MCUs at the right and bottom edges
    image_path = write_jpeg(tmp_path / "in.jpg", photo(*stored_size, grey=spec.get("grey", False)), orientation, **spec["options"])
    original = image_path.read_bytes()
    display = stored_size[::-1] if orientation in (5, 6, 7, 8) else stored_size
    result = run_job(tiny_engine, tmp_path, image_path, display, (150, 100, 168, 114))

    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "lossless-outside", output
    assert result.extension == "jpg"
    mcu = tuple(output["jpeg_mcu"])
    assert mcu == ((8, 8) if case in ("greyscale", "baseline 4:4:4") else (16, 8) if case == "baseline 4:2:2" else (16, 16))

    before, after = stored_pixels(original), stored_pixels(result.image_bytes)
    assert before.shape == after.shape
    blocks = painted_blocks(result, orientation, stored_size, mcu)
    allowed = np.kron(grow_blocks(blocks), np.ones((mcu[1], mcu[0]), dtype=bool))[: stored_size[1], : stored_size[0]]
    changed = before != after
    if changed.ndim == 3:
        changed = changed.any(axis=-1)
    assert not changed[~allowed].any(), "a pixel changed outside the painted MCU boxes grown by one MCU"
    assert changed.any(), "the painted area was not written"

    # The coefficients of every MCU outside the painted ones: lossless crops of the four strips.
    rows, cols = np.nonzero(blocks)
    x0, x1 = cols.min() * mcu[0], min(stored_size[0], (cols.max() + 1) * mcu[0])
    y0, y1 = rows.min() * mcu[1], min(stored_size[1], (rows.max() + 1) * mcu[1])
    width, height = stored_size
    strips = [(0, 0, width, y0), (0, y1, width, height - y1), (0, y0, x0, y1 - y0), (x1, y0, width - x1, y1 - y0)]
    for x, y, w, h in strips:
        if w > 0 and h > 0:
            assert jpegtran_crop(original, x, y, w, h) == jpegtran_crop(result.image_bytes, x, y, w, h), (x, y, w, h)

    assert abs(len(result.image_bytes) / len(original) - 1) <= 0.03
    assert metadata_segments(result.image_bytes) == metadata_segments(original)
    with Image.open(io.BytesIO(result.image_bytes)) as out, Image.open(io.BytesIO(original)) as src:
        assert out.getexif()[0x0112] == orientation
        assert out.quantization == src.quantization
        assert out.info.get("progressive", 0) == src.info.get("progressive", 0)


def _metadata_kinds(data: bytes) -> set[str]:
    kinds = set()
    for seg in metadata_segments(data):
        body = seg[4:]
        kinds.add("exif" if body.startswith(b"Exif") else "icc" if body.startswith(b"ICC_PROFILE") else
                  "xmp" if body.startswith(b"http://ns.adobe.com/xap") else "com" if seg[1] == 0xFE else "other")
    return kinds


def _arithmetic(path: Path) -> None:
    coded = subprocess.run([JPEGTRAN, "-copy", "all", "-arithmetic", str(path)], capture_output=True, check=True).stdout
    path.write_bytes(coded)


def _sampled_1x2(path: Path) -> None:
    """4:4:0 (vertical-only subsampling), which Pillow cannot write for the painted MCUs."""
    ppm = path.with_suffix(".ppm")
    photo(328, 248).save(ppm)
    cjpeg = shutil.which("cjpeg")
    coded = subprocess.run([cjpeg, "-quality", "90", "-sample", "1x2,1x1,1x1", str(ppm)], capture_output=True, check=True).stdout
    # Metadata goes in with Pillow's marker writer so the reencode can be checked for it.
    path.write_bytes(carry_markers(_with_metadata(), coded))


def _with_metadata() -> bytes:
    buffer = io.BytesIO()
    write_jpeg(buffer, photo(16, 16), 1, quality=90)  # type: ignore[arg-type]
    return buffer.getvalue()


FALLBACKS = {
    "arithmetic": ("arithmetic-coded", _arithmetic),
    "sampling 4:4:0": ("sampling factors", _sampled_1x2),
}


@needs_jpegtran
@pytest.mark.parametrize("case", list(FALLBACKS))
def test_a_jpeg_the_splice_cannot_keep_exact_is_reencoded_with_its_metadata_and_the_reason(tiny_engine, tmp_path, case):
    reason, make = FALLBACKS[case]
    image_path = write_jpeg(tmp_path / "in.jpg", photo(328, 248), 1, quality=90)
    make(image_path)
    original = image_path.read_bytes()
    result = run_job(tiny_engine, tmp_path, image_path, (328, 248), (150, 100, 168, 114))
    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "reencoded" and reason in output["jpeg_reason"], output
    assert metadata_segments(result.image_bytes) == metadata_segments(original)
    assert {"exif", "xmp", "com"} <= _metadata_kinds(result.image_bytes)


def test_a_multi_picture_jpeg_is_reencoded_with_the_reason(tiny_engine, tmp_path):
    """A phone MPO: jpegtran would keep only the first frame and break the MP index offsets."""
    image_path = tmp_path / "in.jpg"
    photo(96, 80).save(image_path, format="MPO", save_all=True, append_images=[photo(48, 40)], quality=90)
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40))
    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "reencoded" and "multi-picture" in output["jpeg_reason"], output


def test_a_cmyk_jpeg_is_reencoded_as_rgb_without_its_cmyk_profile(tiny_engine, tmp_path):
    image_path = tmp_path / "in.jpg"
    photo(96, 80).convert("CMYK").save(image_path, format="JPEG", quality=90, icc_profile=b"not really a CMYK profile", comment=b"c")
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40))
    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "reencoded" and "CMYK" in output["jpeg_reason"]
    assert "icc" not in _metadata_kinds(result.image_bytes) and "com" in _metadata_kinds(result.image_bytes)
    assert Image.open(io.BytesIO(result.image_bytes)).mode == "RGB"


def test_without_jpegtran_the_jpeg_is_reencoded_and_the_sidecar_says_so(tiny_engine, tmp_path, monkeypatch):
    image_path = write_jpeg(tmp_path / "in.jpg", photo(96, 80), 1, quality=90)
    original = image_path.read_bytes()
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40))
    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "reencoded" and "jpegtran not installed" in output["jpeg_reason"]
    assert metadata_segments(result.image_bytes) == metadata_segments(original)


def test_a_png_written_as_jpeg_is_reencoded_with_the_reason(tiny_engine, tmp_path):
    image_path = tmp_path / "in.png"
    photo(96, 80).save(image_path)
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40), output_format="jpg")
    assert result.sidecar["output"]["jpeg_mode"] == "reencoded"
    assert "PNG" in result.sidecar["output"]["jpeg_reason"]


def test_a_png_output_has_no_jpeg_report(tiny_engine, tmp_path):
    image_path = tmp_path / "in.png"
    photo(96, 80).save(image_path)
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40))
    assert "jpeg_mode" not in result.sidecar["output"]


@settings(max_examples=60, deadline=None)
@given(
    orientation=st.integers(1, 8),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    data=st.data(),
)
def test_a_display_box_maps_to_the_stored_pixels_pillows_transpose_puts_it_on(orientation, width, height, data):
    """stored_box against Pillow: the box marked on the display image lands on exactly the stored box."""
    x0 = data.draw(st.integers(0, width - 1))
    y0 = data.draw(st.integers(0, height - 1))
    x1 = data.draw(st.integers(x0 + 1, width))
    y1 = data.draw(st.integers(y0 + 1, height))
    marked = np.zeros((height, width), dtype=np.uint8)
    marked[y0:y1, x0:x1] = 1
    image = Image.fromarray(marked)
    if TO_STORED[orientation] is not None:
        image = image.transpose(TO_STORED[orientation])
    stored = np.asarray(image)
    sx0, sy0, sx1, sy1 = stored_box((x0, y0, x1, y1), orientation, image.size)
    expected = np.zeros_like(stored)
    expected[sy0:sy1, sx0:sx1] = 1
    assert np.array_equal(stored, expected)


# --------------------------------------------------------------------------- RGB-coded JPEGs

_JFIF = b"\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"


def rgb_coded(image: Image.Image, ids: bytes = b"RGB", adobe: int | None = None, jfif: bool = False) -> bytes:
    """A JPEG whose three components hold R, G and B (no colour transform), with the given
    component ids and markers: Pillow writes one with keep_rgb (ids R, G, B, Adobe transform 0),
    and its segments are rewritten here into the other variants decoders meet."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", keep_rgb=True, subsampling=0, quality=95)
    data = buffer.getvalue()
    out = [b"\xff\xd8"]
    if jfif:
        out.append(_JFIF)
    body_start = 2
    for marker, seg in jpeg_lossless.segments(data):
        body_start += len(seg)
        if marker == 0xEE:
            if adobe is not None:
                out.append(seg[:15] + bytes([adobe]))
            continue
        seg = bytearray(seg)
        if marker == 0xC0:  # SOF0: id, sampling, table per component from byte 10
            for i in range(3):
                seg[10 + 3 * i] = ids[i]
        if marker == 0xDA:  # SOS: id, tables per component from byte 5
            for i in range(3):
                seg[5 + 2 * i] = ids[i]
        out.append(bytes(seg))
    return b"".join(out) + data[body_start:]


@pytest.mark.parametrize("jfif", [False, True])
@pytest.mark.parametrize("adobe", [None, 0, 1])
@pytest.mark.parametrize("ids", [b"RGB", b"\x01\x02\x03", b"\x00\x01\x02"])
def test_the_rgb_rule_is_how_the_decoder_reads_the_file(jfif, adobe, ids):
    """inspect calls a file RGB-coded exactly when Pillow's libjpeg decodes it as RGB (no transform)."""
    colour = (200, 0, 40)
    data = rgb_coded(Image.new("RGB", (16, 16), colour), ids, adobe, jfif)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))[8, 8]
    read_as_rgb = bool(np.abs(decoded.astype(int) - colour).max() <= 3)
    try:
        jpeg_lossless.inspect(data)
        refused = False
    except jpeg_lossless.Unsupported as exc:
        assert "RGB-coded" in str(exc)
        refused = True
    assert refused == read_as_rgb, (decoded, jfif, adobe, ids)


@needs_jpegtran
@pytest.mark.parametrize("adobe", [None, 0])
def test_an_rgb_coded_jpeg_is_reencoded_and_keeps_its_colours(tmp_path, adobe):
    """The splice would write the painted MCUs as YCbCr into a file read as RGB: wrong colours."""
    from inpaintd.paint.images import load_image

    path = tmp_path / "in.jpg"
    path.write_bytes(rgb_coded(photo(96, 80), b"RGB", adobe))
    source = load_image(path, 10**7)
    pixels = source.pixels.copy()
    box = (40, 24, 72, 56)
    pixels[box[1] : box[3], box[0] : box[2]] = (230, 30, 60)  # what the model "painted"
    data, extension, report = paint_job.encode_output(pixels, None, source, "same", 95, [box])
    assert extension == "jpg" and report is not None
    assert report["jpeg_mode"] == "reencoded" and "RGB-coded" in report["jpeg_reason"], report
    written = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    painted = written[box[1] + 4 : box[3] - 4, box[0] + 4 : box[2] - 4]
    assert np.abs(painted - (230, 30, 60)).max() <= 12
    assert np.abs(written - pixels).mean() <= 8  # photo noise through a q95 re-encode; swapped colours are ~100


@needs_jpegtran
def test_an_rgb_coded_jpeg_job_says_why_it_was_reencoded(tiny_engine, tmp_path):
    image_path = tmp_path / "in.jpg"
    image_path.write_bytes(rgb_coded(photo(96, 80)))
    result = run_job(tiny_engine, tmp_path, image_path, (96, 80), (40, 30, 50, 40))
    output = result.sidecar["output"]
    assert output["jpeg_mode"] == "reencoded" and "component ids R, G, B" in output["jpeg_reason"], output


def test_a_splice_leaves_no_file_on_disk_even_if_killed(tiny_engine, tmp_path, monkeypatch) -> None:
    # The painted MCUs reach jpegtran as a memory file: nothing is created in the temp folder,
    # so a kill -9 in the middle of a splice cannot leave a file behind for good.
    import tempfile

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    image_path = write_jpeg(tmp_path / "in.jpg", photo(328, 248), 1)
    result = run_job(tiny_engine, tmp_path, image_path, (328, 248), (150, 100, 168, 114))
    assert result.sidecar["output"]["jpeg_mode"] == "lossless-outside"
    assert list(scratch.iterdir()) == []



@needs_jpegtran
def test_a_result_that_changed_nothing_is_the_input_file_and_says_unchanged(tmp_path):
    """Issue 22: `lossless-outside` with painted MCU boxes is claimed only for pixels that
    changed. Where none did (here: the output pixels are the input's), the result is the
    input file itself and the report says `unchanged`, not a splice of nothing."""
    from inpaintd.paint import images

    image_path = write_jpeg(tmp_path / "in.jpg", photo(328, 248), 6)
    source = images.load_image(image_path, CONFIG.limits.max_pixels)
    data, extension, report = paint_job.encode_output(source.pixels.copy(), None, source, "same", 95, [])
    assert (extension, report) == ("jpg", {"jpeg_mode": "unchanged", "jpeg_painted_mcu_boxes": []})
    assert data == image_path.read_bytes()


def test_changed_boxes_hold_every_changed_pixel_and_nothing_more():
    from inpaintd.core.masks import Box, changed_boxes

    rng = np.random.default_rng(22)
    for _ in range(200):
        h, w = rng.integers(1, 40, size=2)
        before = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        after = before.copy()
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, h), rng.integers(0, w)
            after[y, x, rng.integers(0, 3)] ^= 1 + rng.integers(0, 255)
        allowed = Box(0, 0, int(w), int(h))
        boxes = changed_boxes(before, after, [allowed])
        changed = np.argwhere((before != after).any(axis=2))
        if not changed.size:
            assert boxes == []
            continue
        (box,) = boxes
        assert (box.y0, box.x0) == tuple(changed.min(axis=0)) and (box.y1 - 1, box.x1 - 1) == tuple(changed.max(axis=0))
