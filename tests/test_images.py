"""Reading and writing real image files: orientation, profiles, modes, and every refusal."""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from inpaintd.core.errors import JOB_ERROR_CODES, JobError
from inpaintd.paint.images import encode_image, load_image, load_mask, mask_from_alpha
from inpaintd.paint.jpeg_lossless import entropy_problem, segments
from PIL import Image, ImageCms

MAX = 50_000_000


def gradient(width: int, height: int) -> np.ndarray:
    """An RGB image where every pixel differs, so any transpose shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 7 % 256, y * 11 % 256, (x + 3 * y) % 256], axis=2).astype(np.uint8)


def exif_with_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    exif[0x010F] = "inpaintd-test-camera"  # Make: must survive untouched
    return exif.tobytes()


def srgb_icc() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def raises(code: str, func, *args):
    assert code in JOB_ERROR_CODES
    with pytest.raises(JobError) as info:
        func(*args)
    assert info.value.code == code, info.value.message
    return info.value


@pytest.mark.parametrize("fmt,ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp"), ("TIFF", "tiff")])
def test_exif_orientation_6_is_displayed_upright_and_written_back_in_the_stored_layout(tmp_path, fmt, ext):
    stored = gradient(40, 24)  # stored 40 wide, 24 high; orientation 6 displays it 24x40
    path = tmp_path / f"photo.{ext}"
    options = {"quality": 100} if fmt in ("JPEG", "WEBP") else {}
    Image.fromarray(stored).save(path, format=fmt, exif=exif_with_orientation(6), **options)

    loaded = load_image(path, MAX)
    assert loaded.orientation == 6
    assert loaded.size == (24, 40) and loaded.pixels.shape == (40, 24, 3)
    assert loaded.format == ext
    expected_display = np.asarray(Image.fromarray(stored).transpose(Image.Transpose.ROTATE_270))
    if fmt in ("PNG", "TIFF"):
        np.testing.assert_array_equal(loaded.pixels, expected_display)
    else:
        assert np.abs(loaded.pixels.astype(int) - expected_display).mean() < 4

    data, out_ext = encode_image(loaded.pixels, None, loaded, "same", 95)
    assert out_ext == ext
    again = Image.open(io.BytesIO(data))
    # Pillow reports (and decodes) a TIFF already rotated; its header holds the stored layout.
    stored_size = (again.tag_v2[256], again.tag_v2[257]) if fmt == "TIFF" else again.size
    assert stored_size == (40, 24), "the output keeps the stored pixel layout"
    assert again.getexif()[0x0112] == 6, "and the orientation tag"
    assert again.getexif()[0x010F] == "inpaintd-test-camera"
    if fmt == "PNG":
        np.testing.assert_array_equal(np.asarray(again.convert("RGB")), stored)
    reloaded = load_image(_write(tmp_path / f"again.{ext}", data), MAX)
    assert reloaded.size == loaded.size


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_round_trips_losslessly_through_png(tmp_path, orientation):
    stored = gradient(9, 5)
    path = tmp_path / "o.png"
    Image.fromarray(stored).save(path, exif=exif_with_orientation(orientation))
    loaded = load_image(path, MAX)
    assert loaded.size == ((5, 9) if orientation >= 5 else (9, 5))
    data, _ = encode_image(loaded.pixels, None, loaded, "png", 95)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), stored)


def test_icc_profile_is_kept(tmp_path):
    icc = srgb_icc()
    path = tmp_path / "icc.jpg"
    Image.fromarray(gradient(16, 16)).save(path, icc_profile=icc)
    loaded = load_image(path, MAX)
    assert loaded.icc_profile == icc and loaded.exif is None and loaded.orientation == 1
    for fmt in ("same", "png", "webp", "tiff"):
        data, _ = encode_image(loaded.pixels, None, loaded, fmt, 90)
        assert Image.open(io.BytesIO(data)).info.get("icc_profile") == icc, fmt


def test_rgba_keeps_mode_and_alpha_and_alpha_becomes_a_mask(tmp_path):
    rgba = np.dstack([gradient(10, 6), np.full((6, 10), 255, np.uint8)])
    rgba[2:4, 3:7, 3] = 0  # a transparent hole = repaint
    rgba[0, 0, 3] = 127
    rgba[0, 1, 3] = 128
    path = tmp_path / "hole.png"
    Image.fromarray(rgba, "RGBA").save(path)
    loaded = load_image(path, MAX)
    assert loaded.mode == "RGBA"
    np.testing.assert_array_equal(loaded.pixels, rgba[..., :3])
    np.testing.assert_array_equal(loaded.alpha, rgba[..., 3])
    mask = mask_from_alpha(loaded.alpha)
    assert mask.dtype == np.uint8
    assert (mask[2:4, 3:7] == 255).all() and mask[0, 0] == 255 and mask[0, 1] == 0 and mask[5, 9] == 0
    data, ext = encode_image(loaded.pixels, loaded.alpha, loaded, "same", 95)
    out = Image.open(io.BytesIO(data))
    assert ext == "png" and out.mode == "RGBA"
    np.testing.assert_array_equal(np.asarray(out), rgba)
    data, ext = encode_image(loaded.pixels, None, loaded, "jpg", 95)
    assert ext == "jpg" and Image.open(io.BytesIO(data)).mode == "RGB"  # JPEG cannot hold alpha


def test_greyscale_stays_greyscale(tmp_path):
    grey = gradient(12, 8)[..., 0]
    path = tmp_path / "grey.png"
    Image.fromarray(grey, "L").save(path)
    loaded = load_image(path, MAX)
    assert loaded.mode == "L" and loaded.alpha is None and loaded.pixels.shape == (8, 12, 3)
    data, _ = encode_image(loaded.pixels, None, loaded, "same", 95)
    out = Image.open(io.BytesIO(data))
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), grey)


def test_sixteen_bit_greyscale_is_scaled_to_eight_bit_l(tmp_path):
    values = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # written as a 16-bit greyscale PNG
    loaded = load_image(path, MAX)
    assert loaded.mode == "L"
    assert loaded.pixels[0, :, 0].tolist() == [0, 1, 255, 128]


def test_cmyk_becomes_rgb_without_the_cmyk_profile(tmp_path):
    path = tmp_path / "print.jpg"
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(path)  # pure red in CMYK
    loaded = load_image(path, MAX)
    assert loaded.mode == "RGB" and loaded.icc_profile is None
    r, g, b = loaded.pixels[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60


def test_palette_becomes_rgb_or_rgba_with_transparency(tmp_path):
    pal = Image.fromarray(gradient(8, 8)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    plain = tmp_path / "pal.png"
    pal.save(plain)
    loaded = load_image(plain, MAX)
    assert loaded.mode == "RGB" and loaded.alpha is None
    np.testing.assert_array_equal(loaded.pixels, np.asarray(pal.convert("RGB")))

    see_through = tmp_path / "palt.png"
    pal.save(see_through, transparency=int(np.asarray(pal)[0, 0]))
    loaded = load_image(see_through, MAX)
    assert loaded.mode == "RGBA" and loaded.alpha[0, 0] == 0
    assert mask_from_alpha(loaded.alpha)[0, 0] == 255


def test_animated_gif_is_unsupported(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    raises("image_unsupported", load_image, path, MAX)


def test_single_frame_gif_is_read_and_written_as_png(tmp_path):
    path = tmp_path / "still.gif"
    Image.new("RGB", (8, 8), "red").save(path)
    loaded = load_image(path, MAX)
    assert loaded.format == "gif"
    _, ext = encode_image(loaded.pixels, None, loaded, "same", 95)
    assert ext == "png"


@pytest.mark.parametrize("content", [b"", b"this is not an image", b"\x89PNG\r\n\x1a\n garbage"])
def test_empty_and_garbage_files_are_unreadable(tmp_path, content):
    path = _write(tmp_path / "bad.png", content)
    raises("image_unreadable", load_image, path, MAX)
    raises("mask_unreadable", load_mask, path, (8, 8), MAX)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_unreadable(tmp_path, fmt):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, format=fmt)
    path = _write(tmp_path / "cut.img", buffer.getvalue()[: len(buffer.getvalue()) // 2])
    raises("image_unreadable", load_image, path, MAX)


def test_missing_file_is_unreadable(tmp_path):
    raises("image_unreadable", load_image, tmp_path / "nope.png", MAX)


def test_eps_is_never_parsed(tmp_path):
    path = _write(tmp_path / "x.png", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    raises("image_unreadable", load_image, path, MAX)


def test_too_many_pixels_is_refused_from_the_header(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (100, 50)).save(path)
    error = raises("image_too_large", load_image, path, 4999)
    assert "100x50" in error.message
    assert load_image(path, 5000).size == (100, 50)


def test_a_decompression_bomb_header_is_refused_without_decoding(tmp_path):
    """A 100000x100000 PNG header with no real pixel data: refused before any decoding."""
    path = _write(tmp_path / "bomb.png", _png_header_only(100_000, 100_000))
    raises("image_too_large", load_image, path, MAX)
    path = _write(tmp_path / "bomb2.png", _png_header_only(20_000, 20_000))  # below Pillow's own guard
    raises("image_too_large", load_image, path, MAX)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "evil.png"
    os.mkfifo(fifo)
    outcome: list[object] = []
    worker = threading.Thread(target=lambda: outcome.append(_code_of(load_image, fifo, MAX)), daemon=True)
    worker.start()
    worker.join(5)
    assert not worker.is_alive(), "load_image blocked on a FIFO"
    assert outcome == ["job_unsafe"]
    assert _code_of(load_mask, fifo, (8, 8), MAX) == "job_unsafe"


def test_symlink_and_directory_are_refused(tmp_path):
    real = tmp_path / "real.png"
    Image.new("RGB", (4, 4)).save(real)
    link = tmp_path / "link.png"
    link.symlink_to(real)
    raises("job_unsafe", load_image, link, MAX)
    raises("job_unsafe", load_image, tmp_path, MAX)


def test_mask_any_mode_becomes_l_in_display_orientation(tmp_path):
    values = np.zeros((6, 10), np.uint8)
    values[1:3, 2:5] = 255
    for mode in ("L", "RGB", "1", "P"):
        path = tmp_path / f"m-{mode}.png"
        Image.fromarray(values, "L").convert(mode).save(path)
        np.testing.assert_array_equal(load_mask(path, (10, 6), MAX), values)
    rotated = tmp_path / "rot.png"
    Image.fromarray(values, "L").save(rotated, exif=exif_with_orientation(6))
    expected = np.asarray(Image.fromarray(values).transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(load_mask(rotated, (6, 10), MAX), expected)


def test_mask_with_alpha_is_composited_over_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere ...
    rgba[0, :, 3] = 255  # ... but only the first row is opaque
    path = tmp_path / "strokes.png"
    Image.fromarray(rgba, "RGBA").save(path)
    mask = load_mask(path, (4, 4), MAX)
    assert (mask[0] == 255).all() and (mask[1:] == 0).all()


def test_sixteen_bit_mask_is_scaled(tmp_path):
    path = tmp_path / "m16.png"
    Image.fromarray(np.array([[0, 65535]], dtype=np.uint16)).save(path)
    assert load_mask(path, (2, 1), MAX).tolist() == [[0, 255]]


def test_mask_size_mismatch_names_both_sizes(tmp_path):
    path = tmp_path / "m.png"
    Image.new("L", (30, 20)).save(path)
    error = raises("mask_size_mismatch", load_mask, path, (40, 20), MAX)
    assert "30x20" in error.message and "40x20" in error.message
    bomb = _write(tmp_path / "bomb.png", _png_header_only(100_000, 100_000))
    raises("mask_size_mismatch", load_mask, bomb, (40, 20), MAX)


def test_output_formats_and_lossless_png(tmp_path):
    path = tmp_path / "in.jpg"
    Image.fromarray(gradient(16, 16)).save(path, quality=90)
    loaded = load_image(path, MAX)
    painted = loaded.pixels.copy()
    painted[4:8, 4:8] = 0
    data, ext = encode_image(painted, None, loaded, "png", 95)
    assert ext == "png"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data))), painted)
    for fmt in ("jpg", "webp", "bmp", "tiff", "same"):
        data, ext = encode_image(painted, None, loaded, fmt, 80)
        assert Image.open(io.BytesIO(data)).format == {"jpg": "JPEG", "same": "JPEG"}.get(fmt, fmt.upper())
    with pytest.raises(ValueError):
        encode_image(painted[:, :8], None, loaded, "png", 95)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _code_of(func, *args) -> str | None:
    try:
        func(*args)
    except JobError as exc:
        return exc.code
    return None


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------- JPEGs cut short before an EOI


# Every JPEG layout the reader must keep taking; each is also cut up below.
JPEG_VARIANTS = {
    "baseline 4:2:0": ("RGB", {}),
    "baseline 4:2:2": ("RGB", {"subsampling": 1}),
    "baseline 4:4:4": ("RGB", {"subsampling": 0}),
    "optimised tables": ("RGB", {"optimize": True}),
    "progressive": ("RGB", {"progressive": True}),
    "restart markers": ("RGB", {"restart_marker_blocks": 2}),
    "restart rows": ("RGB", {"restart_marker_rows": 1, "subsampling": 0}),
    "progressive + restarts": ("RGB", {"progressive": True, "restart_marker_rows": 1}),
    "greyscale": ("L", {}),
    "greyscale progressive": ("L", {"progressive": True}),
    "CMYK": ("CMYK", {}),
}


def photo_jpeg(mode: str, options: dict, size: tuple[int, int] = (152, 120)) -> bytes:
    """Gradients and noise, odd sizes (partial MCUs at the edges): compresses like a photo."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    noise = np.random.default_rng(3).integers(-12, 13, (height, width, 3))
    rgb = np.clip(np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1) + noise, 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).convert(mode).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def entropy_coded(data: bytes) -> tuple[int, int]:
    """(start, end) of everything from the first scan's data up to the final EOI."""
    start = 2 + sum(len(seg) for _, seg in segments(data))
    assert data.endswith(b"\xff\xd9")
    return start, len(data) - 2


@pytest.mark.parametrize("variant", list(JPEG_VARIANTS))
def test_every_valid_jpeg_layout_still_decodes(tmp_path, variant):
    mode, options = JPEG_VARIANTS[variant]
    data = photo_jpeg(mode, options)
    assert entropy_problem(data) is None
    image = load_image(_write(tmp_path / "ok.jpg", data), MAX)
    assert image.size == (152, 120)
    # A few bytes of padding before EOI, as some cameras write: still whole, still taken.
    padded = data[:-2] + b"\x00\x00\x00" + data[-2:]
    assert load_image(_write(tmp_path / "padded.jpg", padded), MAX).size == (152, 120)


@pytest.mark.parametrize("variant", list(JPEG_VARIANTS))
def test_the_middle_third_cut_out_before_eoi_is_unreadable(tmp_path, variant):
    """The reported file: libjpeg decodes it without an error, a third of it flat grey."""
    data = photo_jpeg(*JPEG_VARIANTS[variant])
    start, end = entropy_coded(data)
    third = (end - start) // 3
    cut = data[: start + third] + data[start + 2 * third :]
    error = raises("image_unreadable", load_image, _write(tmp_path / "cut.jpg", cut), MAX)
    assert "corrupt or truncated" in error.message
    raises("mask_unreadable", load_mask, _write(tmp_path / "cut.mask.jpg", cut), (152, 120), MAX)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(variant=st.sampled_from(list(JPEG_VARIANTS)), data=st.data())
def test_any_cut_of_a_tenth_or_more_before_eoi_is_unreadable(tmp_path, variant, data):
    """Wherever a slice of the scans goes missing (the EOI kept), the file is refused, never painted."""
    jpeg = photo_jpeg(*JPEG_VARIANTS[variant])
    start, end = entropy_coded(jpeg)
    length = end - start
    size = data.draw(st.integers(max(1, length // 10), length - 1), label="bytes cut")
    at = data.draw(st.integers(start, end - size), label="cut at")
    cut = jpeg[:at] + jpeg[at + size :]
    raises("image_unreadable", load_image, _write(tmp_path / "cut.jpg", cut), MAX)


def test_a_file_name_in_a_message_shows_no_bidi_or_control_character(tmp_path):
    import unicodedata

    path = _write(tmp_path / "photo\u202egpj.exe\u2066.png", b"not an image")
    error = raises("image_unreadable", load_image, path, MAX)
    assert "photo\\u202egpj.exe\\u2066.png" in error.message
    assert not [c for c in error.message if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")]
