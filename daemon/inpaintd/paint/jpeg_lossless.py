"""JPEG in, JPEG out: only the painted MCUs are encoded anew, the rest keeps its DCT coefficients.

A JPEG is a grid of MCUs (8x8 px, or 16x16 / 16x8 with chroma subsampling), each a few
blocks of quantized DCT coefficients. Decoding, painting and re-encoding the whole photo
changes almost every pixel a little (generation loss) even where nothing was painted. Here
the output is the input file with only the MCUs under the painted boxes replaced:

1. `inspect` reads the input's markers: frame type, sampling, quantization tables, MPF.
   What the route cannot keep exact (arithmetic coding, 12-bit or lossless JPEG, CMYK/YCCK,
   RGB-coded files, sampling Pillow cannot write, multi-picture files) raises Unsupported with
   the reason, and the caller re-encodes the whole image as before and says so.
2. `mcu_boxes` maps each painted box from display orientation (EXIF applied, where the
   model painted) to the stored orientation the coefficients live in, and snaps it outward
   to the MCU grid, because a drop must start on an iMCU boundary.
3. `splice` encodes each box's final pixels with Pillow using the input's own quantization
   tables and subsampling, and lets libjpeg-turbo's `jpegtran -drop +X+Y` put those MCUs in
   place of the input's (`-copy all` keeps every APPn/COM segment byte for byte;
   `-progressive` keeps a progressive input progressive, `-optimize` gives a baseline one
   optimal Huffman tables). Each drop re-writes the entropy coding but copies the
   coefficients of all other MCUs unchanged. The result is checked before it is used: same
   size, same components, same quantization tables as the input.

Why jpegtran and not a binding or our own coefficient code: Pillow exposes no coefficient
API; the Python bindings that do (jpegio, jpeglib) are not in Debian, build against their own
libjpeg copies and would be a second, unaudited JPEG parser reading inbox bytes. jpegtran is
libjpeg-turbo's own lossless transformer (Debian `libjpeg-turbo-progs`, the same library
Pillow decodes with), `-drop` is its documented feature for exactly this, and it runs as a
separate process, so a crafted file that upsets it cannot corrupt the daemon's memory. The
cost is a subprocess and a temporary file per painted box (the drop image has to be a file).
Under the systemd unit the temporary files go to the service's PrivateTmp /tmp.

`entropy_problem` says whether a JPEG's scans are whole: libjpeg decodes a file cut short but
still ending in EOI without an error (the missing MCUs come out flat grey), and Pillow never
shows its warnings. Counted from the markers (restart markers per scan, progressive scans
that complete every coefficient), then asked of libjpeg itself (jpegtran, its first warning).

`carry_markers` copies the input's metadata segments into a re-encoded JPEG (the fallback),
so EXIF, ICC, XMP and comments survive byte for byte there too.
"""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
from dataclasses import dataclass

from PIL import Image

JPEGTRAN = "jpegtran"
MAX_DROPS = 16  # more painted boxes than this are dropped as their bounding box (one jpegtran run each)
_TIMEOUT = 60.0  # seconds for one jpegtran run (a 24 MP drop takes well under one): a hung child must not hold the job until the 2-min watchdog

# SOF markers by what they mean for us.
_SOF_OK = {0xC0: "baseline", 0xC1: "extended sequential", 0xC2: "progressive"}
_SOF_NAMES = {
    0xC3: "lossless", 0xC5: "differential sequential", 0xC6: "differential progressive",
    0xC7: "differential lossless", 0xC9: "arithmetic-coded sequential", 0xCA: "arithmetic-coded progressive",
    0xCB: "arithmetic-coded lossless", 0xCD: "arithmetic-coded differential sequential",
    0xCE: "arithmetic-coded differential progressive", 0xCF: "arithmetic-coded differential lossless",
}
# Pillow's subsampling argument for the (h, v) factors of Y when Cb and Cr are 1x1.
_SUBSAMPLING = {(1, 1): 0, (2, 1): 1, (2, 2): 2}


class Unsupported(Exception):
    """The input cannot be spliced losslessly; str() is the reason for the sidecar."""


@dataclass(frozen=True)
class JpegLayout:
    """What the splice needs to know about an input JPEG (stored orientation)."""

    width: int
    height: int
    frame: str  # "baseline", "extended sequential" or "progressive"
    sampling: tuple[tuple[int, int], ...]  # (h, v) per component
    subsampling: int  # Pillow's code: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0; grey: 0

    @property
    def mcu(self) -> tuple[int, int]:
        """The MCU (iMCU) size in px: 8 times the largest sampling factors."""
        return 8 * max(h for h, _ in self.sampling), 8 * max(v for _, v in self.sampling)


def segments(data: bytes) -> list[tuple[int, bytes]]:
    """The marker segments before the first scan: (marker, whole segment bytes incl. FFxx + length)."""
    if data[:2] != b"\xff\xd8":
        raise Unsupported("not a JPEG file (no SOI marker)")
    out: list[tuple[int, bytes]] = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise Unsupported(f"corrupt marker structure at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # no length
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise Unsupported(f"corrupt segment length at byte {pos}")
        out.append((marker, data[pos : pos + 2 + length]))
        if marker == 0xDA:  # SOS: entropy-coded data follows
            break
        pos += 2 + length
    return out


def inspect(data: bytes) -> JpegLayout:
    """The layout of an input JPEG, or Unsupported with the reason the splice cannot keep it exact."""
    frame = None
    transform = None  # Adobe APP14 colour transform: 0 = none (RGB/CMYK), 1 = YCbCr, 2 = YCCK
    jfif = False
    ids: tuple[int, ...] = ()
    for marker, seg in segments(data):
        body = seg[4:]
        if marker == 0xE0 and body.startswith(b"JFIF\x00"):
            jfif = True
        if marker == 0xE2 and body.startswith(b"MPF\x00"):
            raise Unsupported("multi-picture (MPO) file: its extra frames and their offsets would not survive")
        if marker == 0xEE and body.startswith(b"Adobe") and len(body) >= 12:
            transform = body[11]
        if marker in _SOF_NAMES:
            raise Unsupported(f"{_SOF_NAMES[marker]} JPEG (SOF{marker - 0xC0})")
        if marker in _SOF_OK:
            precision, count = body[0], body[5]
            if precision != 8:
                raise Unsupported(f"{precision}-bit JPEG")
            comps = tuple((body[7 + 3 * i] >> 4, body[7 + 3 * i] & 15) for i in range(count))
            ids = tuple(body[6 + 3 * i] for i in range(count))
            frame = (_SOF_OK[marker], comps, int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"))
    if frame is None:
        raise Unsupported("no frame header before the first scan")
    kind, comps, width, height = frame
    if len(comps) == 4:
        raise Unsupported("CMYK JPEG" if transform != 2 else "YCCK JPEG")
    if len(comps) == 1:
        return JpegLayout(width, height, kind, ((1, 1),), 0)
    if len(comps) == 3:
        rgb = _rgb_coded(jfif, transform, ids)
        if rgb:
            raise Unsupported(f"RGB-coded JPEG ({rgb}): its painted MCUs would be written as YCbCr; "
                              "only YCbCr and greyscale are spliced")
    if len(comps) != 3 or comps[1] != (1, 1) or comps[2] != (1, 1) or comps[0] not in _SUBSAMPLING:
        raise Unsupported(f"sampling factors {list(comps)} (only 4:4:4, 4:2:2 and 4:2:0 are written with the input's layout)")
    return JpegLayout(width, height, kind, comps, _SUBSAMPLING[comps[0]])


def _rgb_coded(jfif: bool, transform: int | None, ids: tuple[int, ...]) -> str | None:
    """Why libjpeg decodes a 3-component frame as RGB, or None when it decodes it as YCbCr.

    The same precedence as libjpeg-turbo's default_decompress_parms, since that is how the
    input will be read: a JFIF marker means YCbCr; else an Adobe marker's transform decides
    (0 = RGB); else component ids 'R', 'G', 'B' mean RGB.
    """
    if jfif:
        return None
    if transform is not None:
        return "Adobe transform 0" if transform == 0 else None
    if ids == (ord("R"), ord("G"), ord("B")):
        return "component ids R, G, B and no JFIF or Adobe marker"
    return None


# libjpeg's warnings that mean the entropy-coded data is not what the frame promises (jerror.h:
# JWRN_HIT_MARKER, JWRN_HUFF_BAD_CODE, JWRN_ARITH_BAD_CODE, JWRN_MUST_RESYNC, JWRN_JPEG_EOF,
# JWRN_EXTRANEOUS_DATA, JWRN_BOGUS_PROGRESSION). The others (an unknown JFIF revision or Adobe
# transform, a bogus ICC chunk, odd SOS parameters) are about metadata; the pixels are whole.
_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file", "Inconsistent progression sequence")
# A few bytes between the last scan and EOI are a known encoder quirk (cameras, webcams) and
# decode whole. Only before EOI: anywhere else they mean a scan lost its end. Since EOI is the
# last marker, tolerating that warning hides no later one (only the first warning is printed).
_TRAILING_OK = re.compile(r"Corrupt JPEG data: (\d+) extraneous bytes before marker 0xd9$")
_TRAILING_OK_BYTES = 16


def entropy_problem(data: bytes) -> str | None:
    """libjpeg's own complaint about a JPEG's entropy-coded data (cut short, corrupt), or None.

    None too when jpegtran is not installed: then a file truncated before an EOI is decoded
    as libjpeg fills it (flat grey MCUs), as before. jpegtran reads every scan's coefficients
    in a separate process (no IDCT, no colour conversion): a fraction of a full decode.
    """
    try:
        missing = _missing_scans(data)
    except (IndexError, ValueError):  # a header too broken to count against: Pillow judged it
        missing = None
    if missing:
        return missing
    tool = available()
    if tool is None:
        return None
    try:
        done = subprocess.run(
            [tool, "-copy", "none", "-outfile", os.devnull], input=data, capture_output=True,
            timeout=_TIMEOUT, check=False, close_fds=True,
        )
    except subprocess.TimeoutExpired:
        return f"libjpeg took over {_TIMEOUT:g} s to read its scans"
    except OSError:
        return None  # could not start the checker: not a verdict on the file
    # Only the first warning is printed (libjpeg's emit_message): the first is what decides.
    message = done.stderr.decode("utf-8", "replace").strip()
    message = message.removeprefix("jpegtran: ").splitlines()[0] if message else ""
    if not message.startswith(_CORRUPT):
        return None
    trailing = _TRAILING_OK.match(message)
    if trailing and int(trailing.group(1)) <= _TRAILING_OK_BYTES:
        return None
    return message[:200]


@dataclass(frozen=True)
class _Scan:
    header: bytes  # the SOS body: components, Ss, Se, Ah/Al
    restart_interval: int  # DRI in effect (0: none)
    restarts: int  # RSTn markers in its entropy-coded data


def _scans(data: bytes) -> tuple[bytes | None, list[_Scan]]:
    """(the frame header body, every scan) of the whole file, stepping over entropy-coded data."""
    frame: bytes | None = None
    scans: list[_Scan] = []
    interval = 0
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 3 >= len(data):
            return frame, scans
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD7:  # stuffed byte, TEM, RSTn
            if 0xD0 <= marker <= 0xD7 and scans:
                last = scans[-1]
                scans[-1] = _Scan(last.header, last.restart_interval, last.restarts + 1)
            pos += 2
            continue
        if marker == 0xD9:
            return frame, scans
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = data[pos + 4 : pos + 2 + length]
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and frame is None:
            frame = bytes([marker]) + body
        elif marker == 0xDD and len(body) >= 2:
            interval = int.from_bytes(body[:2], "big")
        elif marker == 0xDA:
            scans.append(_Scan(body, interval, 0))
        pos += 2 + max(length, 2)


def _missing_scans(data: bytes) -> str | None:
    """How a JPEG's scans fall short of its frame, from marker structure alone, or None.

    Two losses libjpeg decodes without a word: a progressive file that lost its last scans
    (a complete one codes each coefficient of each component down to bit 0, Al = 0), and
    restart intervals cut out whole (each scan holds exactly ceil(units / interval) - 1
    RST markers).
    """
    frame, scans = _scans(data)
    if frame is None or len(frame) < 7:
        return None
    width, height = int.from_bytes(frame[4:6], "big"), int.from_bytes(frame[2:4], "big")
    comps = {frame[7 + 3 * i]: (frame[8 + 3 * i] >> 4, frame[8 + 3 * i] & 15)
             for i in range(frame[6]) if 8 + 3 * i < len(frame)}
    if not comps or min(min(f) for f in comps.values()) < 1 or width == 0 or height == 0:
        return None  # Pillow judges such a frame; nothing to count against
    hmax, vmax = max(h for h, _ in comps.values()), max(v for _, v in comps.values())
    done: set[tuple[int, int]] = set()
    for scan in scans:
        body = scan.header
        count = body[0] if body else 0
        if len(body) < 1 + 2 * count + 3:
            return "a scan header is cut short"
        members = [body[1 + 2 * i] for i in range(count)]
        ss, se, al = body[1 + 2 * count], body[2 + 2 * count], body[3 + 2 * count] & 15
        if al == 0 or frame[0] not in (0xC2, 0xCA):
            done.update((c, k) for c in members for k in range(ss, min(se, 63) + 1))
        if scan.restart_interval and count >= 1 and members[0] in comps:
            if count == 1:  # non-interleaved: one block is one unit
                h, v = comps[members[0]]
                units = _ceil_div(_ceil_div(width * h, hmax), 8) * _ceil_div(_ceil_div(height * v, vmax), 8)
            else:
                units = _ceil_div(width, 8 * hmax) * _ceil_div(height, 8 * vmax)
            expected = _ceil_div(units, scan.restart_interval) - 1
            if scan.restarts != expected:
                return f"a scan holds {scan.restarts} restart markers where its frame needs {expected}"
    if frame[0] in (0xC2, 0xCA):
        missing = sum(1 for c in comps for k in range(64) if (c, k) not in done)
        if missing:
            return (f"progressive JPEG whose scans end before every coefficient is complete "
                    f"({missing} of {64 * len(comps)} missing)")
    return None


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def stored_box(box: tuple[int, int, int, int], orientation: int, stored_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """A half-open display-orientation box in stored-orientation coordinates (EXIF orientation 1..8)."""
    x0, y0, x1, y1 = box
    sw, sh = stored_size
    if orientation == 2:
        return sw - x1, y0, sw - x0, y1
    if orientation == 3:
        return sw - x1, sh - y1, sw - x0, sh - y0
    if orientation == 4:
        return x0, sh - y1, x1, sh - y0
    if orientation == 5:
        return y0, x0, y1, x1
    if orientation == 6:
        return y0, sh - x1, y1, sh - x0
    if orientation == 7:
        return sw - y1, sh - x1, sw - y0, sh - x0
    if orientation == 8:
        return sw - y1, x0, sw - y0, x1
    return x0, y0, x1, y1


def mcu_boxes(
    boxes: list[tuple[int, int, int, int]], orientation: int, layout: JpegLayout
) -> list[tuple[int, int, int, int]]:
    """Display boxes -> stored boxes snapped outward to the MCU grid, clipped to the image.

    More than MAX_DROPS boxes become their common bounding box (each box is one jpegtran run).
    """
    mx, my = layout.mcu
    out = []
    for box in boxes:
        x0, y0, x1, y1 = stored_box(box, orientation, (layout.width, layout.height))
        out.append((x0 // mx * mx, y0 // my * my, min(layout.width, -(-x1 // mx) * mx), min(layout.height, -(-y1 // my) * my)))
    if len(out) > MAX_DROPS:
        out = [(min(b[0] for b in out), min(b[1] for b in out), max(b[2] for b in out), max(b[3] for b in out))]
    return out


def available() -> str | None:
    """Path of jpegtran, or None when it is not installed."""
    return shutil.which(JPEGTRAN)


def splice(original: bytes, final: Image.Image, boxes: list[tuple[int, int, int, int]], layout: JpegLayout) -> bytes:
    """The original JPEG with the MCUs under each stored, MCU-aligned box taken from `final`.

    final: the whole output image in stored orientation, mode L for a greyscale input, RGB
    otherwise. Raises Unsupported when jpegtran is missing, fails, or its result does not
    keep the input's size, components and quantization tables.
    """
    tool = available()
    if tool is None:
        raise Unsupported("jpegtran not installed (Debian: libjpeg-turbo-progs)")
    source = Image.open(io.BytesIO(original))
    qtables = source.quantization
    if final.size != (layout.width, layout.height):
        raise ValueError(f"final image is {final.size}, the JPEG {layout.width}x{layout.height}")
    options = ["-copy", "all"]
    if layout.frame == "progressive":
        options.append("-progressive")
    elif not _standard_huffman(original):
        options.append("-optimize")  # the input had optimised tables: keep its size, not the defaults'

    current = original
    for x0, y0, x1, y1 in boxes:
        patch = io.BytesIO()
        # Same tables and sampling as the input: jpegtran would otherwise requantize.
        final.crop((x0, y0, x1, y1)).save(patch, format="JPEG", qtables=qtables, subsampling=layout.subsampling)
        _check_same_quantization(patch.getvalue(), source)
        # The drop image goes to jpegtran as a memory file, not a temp file: a kill mid-splice
        # leaves nothing behind on disk.
        fd = os.memfd_create("inpaintd-jpeg-drop", os.MFD_CLOEXEC)
        try:
            os.write(fd, patch.getvalue())
            current = _run(tool, [*options, "-drop", f"+{x0}+{y0}", f"/dev/fd/{fd}"], current, pass_fds=(fd,))
        finally:
            os.close(fd)
    result = Image.open(io.BytesIO(current))
    if result.size != (layout.width, layout.height) or len(result.getbands()) != len(layout.sampling):
        raise Unsupported(f"jpegtran produced a {result.size} {result.mode} image")
    if result.quantization != qtables:
        raise Unsupported("jpegtran changed the quantization tables")
    return current


def carry_markers(original: bytes, encoded: bytes, keep_icc: bool = True) -> bytes:
    """`encoded` with its leading metadata segments replaced by the original's, in their order.

    Metadata: APP1..APP15 except APP14 (EXIF, XMP, ICC, IPTC, ...) and COM. APP0 (JFIF) and
    APP14 (Adobe) describe the new encoding and stay the encoder's own. keep_icc False leaves
    out the original's ICC profile (a CMYK profile would mislabel an RGB output).
    """
    keep = [seg for seg in _metadata(segments(original)) if keep_icc or not seg[4:].startswith(b"ICC_PROFILE\x00")]
    own = []
    end = 2
    for marker, seg in segments(encoded):
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE):
            break  # the encoder's tables and frame: metadata only ever leads (Pillow writes it so)
        if not _is_metadata(marker):
            own.append(seg)
        end += len(seg)
    return b"\xff\xd8" + b"".join(own) + b"".join(keep) + encoded[end:]


def metadata_segments(data: bytes) -> list[bytes]:
    """The EXIF/XMP (APP1), ICC (APP2), other APPn except JFIF/Adobe, and COM segments, in order."""
    return _metadata(segments(data))


def _metadata(segs: list[tuple[int, bytes]]) -> list[bytes]:
    return [seg for marker, seg in segs if _is_metadata(marker)]


def _is_metadata(marker: int) -> bool:
    return marker == 0xFE or (0xE1 <= marker <= 0xEF and marker != 0xEE)


@functools.lru_cache(maxsize=1)
def _default_tables() -> frozenset[bytes]:
    """The bodies of the Huffman tables libjpeg writes when not optimising (JPEG Annex K.3)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="JPEG", optimize=False)
    return frozenset(_huffman_tables(buffer.getvalue()))


def _huffman_tables(data: bytes) -> list[bytes]:
    """Each Huffman table (class/id byte, 16 counts, values) defined before the first scan."""
    tables = []
    for marker, seg in segments(data):
        if marker != 0xC4:
            continue
        body, pos = seg[4:], 0
        while pos + 17 <= len(body):
            size = 17 + sum(body[pos + 1 : pos + 17])
            tables.append(body[pos : pos + size])
            pos += size
    return tables


def _standard_huffman(data: bytes) -> bool:
    """Whether a sequential JPEG uses the default tables (most cameras) rather than optimised ones."""
    return set(_huffman_tables(data)) <= _default_tables()


def _check_same_quantization(data: bytes, source: Image.Image) -> None:
    """The drop image must quantize each component with the input's table, or jpegtran requantizes."""
    with Image.open(io.BytesIO(data)) as im:
        same_layout = [layer[1:] for layer in im.layer] == [layer[1:] for layer in source.layer]
        if im.quantization != source.quantization or not same_layout:
            raise Unsupported("Pillow could not write the input's quantization tables and sampling for the painted MCUs")


def _run(tool: str, args: list[str], data: bytes, pass_fds: tuple[int, ...] = ()) -> bytes:
    try:
        done = subprocess.run(
            [tool, *args], input=data, capture_output=True, timeout=_TIMEOUT, check=False, close_fds=True,
            pass_fds=pass_fds,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unsupported(f"jpegtran could not run: {exc}") from exc
    if done.returncode != 0 or not done.stdout:
        message = done.stderr.decode("utf-8", "replace").strip().splitlines()
        raise Unsupported(f"jpegtran failed ({done.returncode}): {message[-1] if message else 'no output'}")
    return done.stdout
