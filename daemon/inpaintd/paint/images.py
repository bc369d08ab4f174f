"""Image and mask files: safe reading into numpy, and writing a drop-in replacement back.

No torch here. Reading:
- only regular files are opened (a FIFO or device in the inbox would block or never end:
  refused with ``job_unsafe``); symlinks are refused the same way;
- only PNG, JPEG (incl. MPO), WebP, TIFF, BMP and GIF are parsed: Pillow's other plugins
  (EPS runs Ghostscript, for one) never see inbox bytes;
- the pixel count is checked from the header before anything is decoded
  (``image_too_large``), then the whole file is decoded at once so a truncated file
  fails here (``image_unreadable``) and not halfway through a job; a JPEG cut short that still
  ends in EOI decodes without an error, so its scans are checked too
  (`jpeg_lossless.entropy_problem`);
- pixels come back in display orientation (EXIF orientation applied) as uint8 RGB.

Mode decisions: palette and CMYK/YCbCr/LAB images become RGB (RGBA when the palette has
transparency; a CMYK file's ICC profile describes CMYK, so it is dropped). 16-bit
greyscale ("I;16", "I") is scaled to 8-bit L (value / 257, rounded): the output is an
8-bit greyscale image. Floating-point ("F") images and images with more than one frame
(animated GIF/PNG/WebP, multi-page TIFF) are ``image_unsupported``. A phone JPEG that
carries extra MPO frames (depth map, preview) is read as its first frame.

Writing (`encode_image`) undoes the EXIF transpose and keeps the EXIF bytes, ICC profile
and mode (L, RGB, RGBA), so the output has the same pixel layout and tags as the input.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import (  # noqa: F401  imported to register exactly the plugins READ_FORMATS names
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)

from ..core.digest import FileDigest
from ..core.errors import JobError
from ..core.quoting import QUOTE_CHARS, for_display, quote, shorten
from . import jpeg_lossless

READ_FORMATS = ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "GIF")  # JPEG's opener also yields MPO
MAX_JPEG_SCANS = 200  # a progressive JPEG has about 10; see _open
# PNG text chunks are never used: cap what Pillow inflates for them (defaults: 1 MiB per chunk,
# 64 MiB per file) so a small file of compressed text costs little to open.
PngImagePlugin.MAX_TEXT_CHUNK = 256 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024
_FORMAT_NAMES = {"PNG": "png", "JPEG": "jpg", "MPO": "jpg", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp", "GIF": "gif"}
# Output format per source format for output.format "same": GIF (single frame) becomes PNG.
_SAME = {"png": "png", "jpg": "jpg", "webp": "webp", "tiff": "tiff", "bmp": "bmp"}
ALPHA_MASK_THRESHOLD = 128  # alpha below this (mostly transparent) means "repaint"
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that turns stored pixels into display pixels.
_TO_DISPLAY = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# ... and back: all are their own inverse except the two quarter turns.
_TO_STORED = {
    **_TO_DISPLAY,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}


@dataclass(frozen=True)
class LoadedImage:
    """A decoded input image and what is needed to write a drop-in replacement."""

    pixels: np.ndarray  # uint8 HxWx3 RGB in display orientation (EXIF transpose applied)
    alpha: np.ndarray | None  # uint8 HxW in display orientation if the source has alpha
    mode: str  # mode written back: "RGB", "RGBA" or "L"
    format: str  # "png", "jpg", "webp", "tiff", "bmp" or "gif" (lower-case, jpg for JPEG)
    orientation: int  # EXIF orientation tag (1 if none)
    icc_profile: bytes | None
    exif: bytes | None  # raw EXIF to write back unchanged
    size: tuple[int, int]  # display (width, height)
    jpeg_data: bytes | None = None  # the file itself when it is a JPEG: the lossless splice starts from it


@dataclass(frozen=True)
class Input:
    """One input file's bytes, read once: what is decoded is what is hashed for the sidecar.

    A claimed file may still have a writer (a second sftp or SMB handle kept open): reading it
    once, bounded, and working only on these bytes means the daemon never decodes or hashes
    more than it checked, nor something else than what it decoded.
    """

    path: Path
    data: bytes
    digest: FileDigest


def read_input(path: Path, what: str, max_bytes: int | None = None) -> Input:
    """The bytes of an input file (what: "image" | "mask"), at most max_bytes of them."""
    path = Path(path)
    data = _read_regular(path, f"{what}_unreadable", what, max_bytes)
    return Input(path, data, FileDigest(hashlib.sha256(data).hexdigest(), len(data)))


def load_image(path: Path, max_pixels: int) -> LoadedImage:
    """Read and decode an image file (read_input, then decode_image)."""
    return decode_image(read_input(path, "image"), max_pixels)


def load_mask(path: Path, expected_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """Read and decode a mask file (read_input, then decode_mask)."""
    return decode_mask(read_input(path, "mask"), expected_size, max_pixels)


def decode_image(source: Input, max_pixels: int) -> LoadedImage:
    """Decode an image's bytes; JobError image_unreadable/image_too_large/image_unsupported/job_unsafe."""
    data, path = source.data, source.path
    im = _open(data, "image_unreadable", "image", path)
    width, height = im.size
    if width * height > max_pixels:
        raise JobError(
            "image_too_large",
            f"image is {width}x{height} = {width * height} pixels, more than limits.max_pixels ({max_pixels})",
            {"width": width, "height": height, "max_pixels": max_pixels},
        )
    if _animated(im, "image_unreadable", "image"):
        raise JobError("image_unsupported", "image has more than one frame; animated or multi-page images are not supported")
    fmt = _FORMAT_NAMES[im.format]
    # Pillow's TIFF loader applies the orientation itself and drops the tag, so a TIFF's
    # tags are read before decoding; other formats may keep EXIF after the pixel data.
    already_upright = im.format == "TIFF"
    if already_upright:
        orientation, exif = _exif_of(im)
    _decode(im, "image_unreadable", "image")
    _check_jpeg_data(data, im, "image_unreadable", "image")
    if not already_upright:
        orientation, exif = _exif_of(im)
    icc = im.info.get("icc_profile") or None

    mode, rgb, alpha = _normalise(im)
    if im.mode == "CMYK":
        icc = None  # a CMYK profile would mislabel the RGB output
    if orientation in _TO_DISPLAY and not already_upright:
        rgb = rgb.transpose(_TO_DISPLAY[orientation])
        alpha = alpha.transpose(_TO_DISPLAY[orientation]) if alpha is not None else None
    pixels = np.asarray(rgb, dtype=np.uint8).copy()
    return LoadedImage(
        pixels=pixels,
        alpha=np.asarray(alpha, dtype=np.uint8).copy() if alpha is not None else None,
        mode=mode,
        format=fmt,
        orientation=orientation,
        icc_profile=icc,
        exif=exif,
        size=(pixels.shape[1], pixels.shape[0]),
        jpeg_data=data if im.format in ("JPEG", "MPO") else None,
    )


def decode_mask(source: Input, expected_size: tuple[int, int], max_pixels: int) -> np.ndarray:
    """A mask's bytes as uint8 HxW in display orientation (white = repaint).

    Any mode is accepted and converted to 8-bit luminance; a mask with an alpha channel
    is composited over black first (value * alpha / 255), so transparent areas are kept
    whatever colour they hold. 16-bit masks are scaled to 8 bits. The mask's own EXIF
    orientation is applied, and its display size must equal the image's display size
    (``mask_size_mismatch``; never resized silently). Checked from the header, before
    decoding; a mask of the right size is within max_pixels as the image was.
    """
    data, path = source.data, source.path
    im = _open(data, "mask_unreadable", "mask", path)
    width, height = im.size
    if (width, height) != tuple(expected_size) and (height, width) != tuple(expected_size):
        _size_mismatch((width, height), expected_size)  # from the header, before decoding
    if width * height > max_pixels:  # only reachable if the caller's sizes disagree with its limit
        raise JobError("mask_unreadable", f"mask is {width}x{height}, more than limits.max_pixels ({max_pixels})")
    if _animated(im, "mask_unreadable", "mask"):
        raise JobError("mask_unreadable", "mask has more than one frame; an animated mask cannot be used")
    _decode(im, "mask_unreadable", "mask")
    _check_jpeg_data(data, im, "mask_unreadable", "mask")
    # Pillow reports and decodes a TIFF already rotated, and drops its orientation tag.
    try:
        orientation = _orientation(im.getexif())
    except Exception:  # noqa: BLE001 - broken EXIF: read the mask as stored
        orientation = 1
    display = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    if display != tuple(expected_size):
        _size_mismatch(display, expected_size)
    try:
        grey = _mask_values(im)
    except Exception as exc:  # noqa: BLE001 - modes Pillow cannot convert (LAB TIFF, ...)
        raise JobError("mask_unreadable", f"mask mode {im.mode} cannot be read as grey values: "
                                          f"{shorten(str(exc), 200)}") from exc
    if orientation in _TO_DISPLAY:
        grey = np.asarray(Image.fromarray(grey).transpose(_TO_DISPLAY[orientation]))
    return np.ascontiguousarray(grey, dtype=np.uint8)


def _size_mismatch(mask_size: tuple[int, int], image_size: tuple[int, int]) -> None:
    raise JobError(
        "mask_size_mismatch",
        f"mask is {mask_size[0]}x{mask_size[1]} but the image is {image_size[0]}x{image_size[1]} "
        "(both in display orientation, after EXIF rotation); masks are never resized",
        {"mask_size": list(mask_size), "image_size": list(image_size)},
    )


def mask_from_alpha(alpha: np.ndarray) -> np.ndarray:
    """Transparent means repaint: 255 where alpha < ALPHA_MASK_THRESHOLD (128), else 0."""
    alpha = np.asarray(alpha)
    if alpha.ndim != 2:
        raise ValueError(f"alpha must be 2-D (HxW), got shape {alpha.shape}")
    return np.where(alpha < ALPHA_MASK_THRESHOLD, np.uint8(255), np.uint8(0))


def encode_image(
    pixels: np.ndarray,
    alpha: np.ndarray | None,
    source: LoadedImage,
    fmt: str,
    jpeg_quality: int,
) -> tuple[bytes, str]:
    """Encode display-orientation pixels as a drop-in replacement of source; (bytes, extension).

    fmt is "same" (the source's format; a GIF source is written as PNG) or one of png, jpg,
    webp, tiff, bmp. The EXIF transpose is undone so the stored pixel layout and the EXIF
    bytes (orientation tag included) match the input. Mode follows the source: L is
    written as greyscale, RGBA with `alpha` (the source's alpha when None). JPEG cannot hold
    alpha, so an RGBA source written as jpg loses it; BMP carries no ICC/EXIF. PNG, TIFF
    (LZW) are lossless; JPEG and WebP use jpeg_quality.
    """
    ext = output_extension(source, fmt)
    im = stored_image(pixels, alpha, source, ext)
    options: dict[str, object] = {}
    if ext != "bmp":
        if source.icc_profile:
            options["icc_profile"] = source.icc_profile
        if source.exif:
            options["exif"] = source.exif
    if ext == "jpg":
        options.update(quality=jpeg_quality)
    elif ext == "webp":
        options.update(quality=jpeg_quality, method=4)
    elif ext == "png":
        options.update(compress_level=6)
    elif ext == "tiff":
        options.update(compression="tiff_lzw")
    pil_format = {"jpg": "JPEG", "tiff": "TIFF"}.get(ext, ext.upper())
    try:
        return _save(im, pil_format, options), ext
    except Exception:  # noqa: BLE001 - e.g. EXIF over JPEG's 64 KiB segment: try without metadata
        pass
    bare = {k: v for k, v in options.items() if k not in ("exif", "icc_profile")}
    try:
        return _save(im, pil_format, bare), ext
    except Exception as exc:  # noqa: BLE001 - sizes a format cannot hold (WebP 16383 px, JPEG 65500 px)
        raise JobError(
            "image_unsupported",
            f"the result ({im.size[0]}x{im.size[1]}) cannot be written as {ext}: {shorten(str(exc) or type(exc).__name__, 200)}; "
            "choose another output_format",
            {"output_format": ext},
        ) from exc


def _save(im: Image.Image, pil_format: str, options: dict[str, object]) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, format=pil_format, **options)
    return buffer.getvalue()


PROBE_BYTES = 4 * 1024 * 1024  # how much of a file the alpha probe reads at most


def probe_alpha(path: Path) -> bool:
    """Whether an image file has an alpha channel, from its header; False for anything unreadable.

    Runs in the intake for every settled image without a mask, so it must never raise and
    never cost more than a bounded read: at most PROBE_BYTES of the file (a header that does
    not fit is treated as no alpha: the job then waits for a mask file), only the formats
    load_image reads, never a link, never a blocking open. An image it cannot read is failed
    properly, with its code, once claimed.
    """
    try:
        data = _read_head(path, PROBE_BYTES)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data), formats=READ_FORMATS) as image:
                return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    except Exception:  # noqa: BLE001 - a probe decides nothing: any failure means "no alpha"
        return False


def _read_head(path: Path, limit: int) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError("not a regular file")
        chunks, left = [], limit
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def output_extension(source: LoadedImage, fmt: str) -> str:
    """The extension an output of format fmt ("same" or an extension) gets for this source."""
    ext = _SAME.get(source.format, "png") if fmt == "same" else fmt
    if ext == "jpeg":
        ext = "jpg"
    if ext not in ("png", "jpg", "webp", "tiff", "bmp"):
        raise ValueError(f"unknown output format {fmt!r}")
    return ext


def stored_image(pixels: np.ndarray, alpha: np.ndarray | None, source: LoadedImage, ext: str) -> Image.Image:
    """Display-orientation pixels as the image to write: source's mode, stored orientation."""
    pixels = np.asarray(pixels)
    width, height = source.size
    if pixels.shape != (height, width, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"pixels must be uint8 {height}x{width}x3, got {pixels.dtype} {pixels.shape}")
    im = Image.fromarray(pixels, "RGB")
    if source.mode == "L":
        im = im.convert("L")
    elif source.mode == "RGBA" and ext != "jpg":
        alpha = source.alpha if alpha is None else alpha
        if alpha is not None:
            im = im.convert("RGBA")
            im.putalpha(Image.fromarray(np.ascontiguousarray(alpha, dtype=np.uint8), "L"))
    if source.orientation in _TO_STORED:
        im = im.transpose(_TO_STORED[source.orientation])
    return im


# --------------------------------------------------------------------------- helpers


def _shown(path: Path) -> str:
    """A file name inside a message a person reads: no control or bidi character raw."""
    return for_display(path.name, QUOTE_CHARS)


def _read_regular(path: Path, code: str, what: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file; never blocks on a FIFO, never follows a symlink, never
    reads more than max_bytes (a file that grew past it fails input_too_large)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as exc:
        raise JobError(code, f"{what} file {_shown(path)} does not exist") from exc
    except OSError as exc:
        if path.is_symlink():
            raise JobError("job_unsafe", f"{what} file {_shown(path)} is a symlink") from exc
        raise JobError(code, f"cannot open {what} file {_shown(path)}: {exc.strerror or exc}") from exc
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise JobError("job_unsafe", f"{what} file {_shown(path)} is not a regular file (FIFO, device or directory)")
        chunks = []
        left = None if max_bytes is None else max_bytes + 1
        while left is None or left > 0:
            chunk = os.read(fd, 1 << 20 if left is None else min(1 << 20, left))
            if not chunk:
                break
            chunks.append(chunk)
            if left is not None:
                left -= len(chunk)
        if left is not None and left <= 0:
            raise JobError("input_too_large", f"{what} file {_shown(path)} grew past limits.max_input_bytes "
                           f"({max_bytes}) after it was checked (a writer still has it open); not read further",
                           {"max_input_bytes": max_bytes})
    except OSError as exc:
        raise JobError(code, f"cannot read {what} file {_shown(path)}: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if not data:
        raise JobError(code, f"{what} file {_shown(path)} is empty")
    return data


def _animated(im: Image.Image, code: str, what: str) -> bool:
    """More than one frame, found without walking them all (n_frames reads every TIFF IFD)."""
    try:
        return im.format != "MPO" and bool(getattr(im, "is_animated", False))
    except Exception as exc:  # noqa: BLE001 - Pillow raises IndexError, struct.error ... for broken frames
        raise JobError(code, f"{what} frames cannot be read: {shorten(str(exc) or type(exc).__name__, 200)}") from exc


def _open(data: bytes, code: str, what: str, path: Path) -> Image.Image:
    """Parse the header only (nothing decoded yet), after the cost checks that need no parsing."""
    if data[:2] == b"\xff\xd8":
        # Each progressive scan re-walks every coefficient: a small file of thousands of tiny
        # scans takes minutes to decode. Markers cannot hide in entropy-coded data (0xFF is
        # stuffed there), so counting SOS markers counts scans (plus any in an EXIF thumbnail).
        scans = data.count(b"\xff\xda")
        if scans > MAX_JPEG_SCANS:
            raise JobError(code, f"{what} file {quote(path.name)} is a JPEG with {scans} scans; "
                                 f"at most {MAX_JPEG_SCANS} are decoded", {"scans": scans})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=READ_FORMATS)
    except Image.DecompressionBombError as exc:
        too_large = "image_too_large" if what == "image" else "mask_size_mismatch"
        raise JobError(too_large, f"{what} file {_shown(path)} declares far too many pixels: {shorten(str(exc), 200)}") from exc
    except Exception as exc:  # Pillow raises many types for garbage input
        raise JobError(
            code,
            f"{what} file {_shown(path)} is not a readable image ({', '.join(f.lower() for f in READ_FORMATS)}): {shorten(str(exc), 200)}",
        ) from exc


def _decode(im: Image.Image, code: str, what: str) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()
    except Exception as exc:  # truncated data, bad compression stream, ...
        raise JobError(code, f"{what} data is corrupt or truncated: {shorten(str(exc), 200)}") from exc


def _check_jpeg_data(data: bytes, im: Image.Image, code: str, what: str) -> None:
    """A JPEG cut short but still ending in EOI decodes without an error, its missing MCUs grey:
    libjpeg only warns, and Pillow drops the warning, so libjpeg is asked again (jpegtran)."""
    if im.format not in ("JPEG", "MPO"):
        return
    problem = jpeg_lossless.entropy_problem(data)
    if problem is not None:
        raise JobError(code, f"{what} data is corrupt or truncated: {problem}", {"libjpeg": problem})


# TIFF tags that describe the file's own layout; never copied into an output's EXIF.
_TIFF_STRUCTURE = frozenset(
    {254, 255, 256, 257, 258, 259, 262, 263, 266, 273, 277, 278, 279, 280, 281, 284, 317, 320, 322, 323, 324, 325, 338, 339, 340, 341, 530, 531, 532}
)


def _exif_of(im: Image.Image) -> tuple[int, bytes | None]:
    """(orientation, raw EXIF bytes to write back) of an opened image.

    EXIF that cannot be parsed counts as none (orientation 1): metadata never fails a job.
    """
    try:
        exif_obj = im.getexif()
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for broken EXIF
        return 1, None
    orientation = _orientation(exif_obj)
    exif = im.info.get("exif")
    if exif is None and orientation != 1:
        exif = _descriptive_exif(exif_obj)  # TIFF: orientation is a plain tag
    return orientation, exif


def _descriptive_exif(exif: Image.Exif) -> bytes:
    """EXIF bytes from a TIFF's tags, without the ones that describe the TIFF's layout."""
    clean = Image.Exif()
    for tag, value in exif.items():
        if tag not in _TIFF_STRUCTURE:
            clean[tag] = value
    return clean.tobytes()


def _orientation(exif: Image.Exif) -> int:
    value = exif.get(_ORIENTATION_TAG, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _normalise(im: Image.Image) -> tuple[str, Image.Image, Image.Image | None]:
    """(mode to write back, RGB image, alpha or None) for any decoded mode."""
    mode = im.mode
    if mode in ("1", "L"):
        return "L", im.convert("RGB"), None
    if mode == "LA" or mode == "La":
        return "RGBA", im.convert("RGBA").convert("RGB"), im.getchannel("A")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return "L", _sixteen_to_l(im).convert("RGB"), None
    if mode == "F":
        raise JobError("image_unsupported", "floating-point images (mode F) are not supported")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        im = im.convert("RGBA" if has_alpha else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBa"):
        im = im.convert("RGBA")
        return "RGBA", im.convert("RGB"), im.getchannel("A")
    if mode == "RGB":
        return "RGB", im, None
    try:
        return "RGB", im.convert("RGB"), None  # CMYK, YCbCr, LAB, HSV
    except Exception as exc:
        raise JobError("image_unsupported", f"image mode {mode} cannot be converted to RGB") from exc


def _sixteen_to_l(im: Image.Image) -> Image.Image:
    values = np.asarray(im, dtype=np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), "L")


def _mask_values(im: Image.Image) -> np.ndarray:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return np.asarray(_sixteen_to_l(im))
    if mode == "F":
        return np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        grey = np.asarray(im.convert("L"), dtype=np.uint16)
        alpha = np.asarray(im.getchannel("A"), dtype=np.uint16)
        return ((grey * alpha + 127) // 255).astype(np.uint8)
    return np.asarray(im.convert("L"))
