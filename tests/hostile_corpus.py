"""The hostile and broken inputs of issue 5, each a small recipe that plants one job in an inbox.

A `Case` knows how to build itself (`build(inbox, outside)`: `outside` is a folder beside the
inbox that the daemon must never read or write) and which outcomes are acceptable: a failure
code, or "done" where the input is odd but valid (all-white mask, unicode names). Cases that
must never be opened or read name the outside paths to watch with inotify.

Used by tests/test_hostile_inputs.py (one real daemon, every case) and scripts/soak.py.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from daemon_harness import image_bytes, mask_bytes
from PIL import Image

DONE = "done"
IGNORED = "ignored"  # left alone in the inbox, never opened (e.g. a symlinked folder)


@dataclass
class Case:
    key: str  # test id
    name: str  # the job name the daemon should report (NAME)
    build: Callable[[Path, Path], None]
    expect: frozenset[str]  # acceptable: DONE, IGNORED and/or failure codes
    never_opened: list[str] = field(default_factory=list)  # paths under `outside` nobody may open
    never_read: list[str] = field(default_factory=list)  # paths (inbox or outside) nobody may read()
    root_only: bool = False
    note: str = ""
    # Records of entries no job uses, besides NAME's own outcome (each must be not_a_job).
    also_not_a_job: tuple[str, ...] = ()


# ---------------------------------------------------------------------------- raw files
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def raw_png(width: int, height: int, bit_depth: int = 8, color_type: int = 0, idat: bytes | None = None, extra: bytes = b"") -> bytes:
    """A PNG written byte by byte; idat=None means one small zlib stream of zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def zero_png(width: int, height: int) -> bytes:
    """A real, fully decodable grayscale PNG of zeros: tiny on disk, huge when decoded."""
    row = b"\0" + b"\0" * width
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    parts.append(comp.flush())
    return raw_png(width, height, 8, 0, b"".join(parts))


def png16_rgb(width: int = 64, height: int = 64) -> bytes:
    """A 48-bit (16 bits per channel) RGB PNG, which Pillow cannot write itself."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 65536, (height, width, 3), dtype=np.uint16).astype(">u2").tobytes()
    stride = width * 6
    raw = b"".join(b"\0" + pixels[y * stride : (y + 1) * stride] for y in range(height))
    return raw_png(width, height, 16, 2, zlib.compress(raw))


def ztxt_bomb() -> bytes:
    """A valid 64x64 PNG carrying a zTXt chunk that inflates to 64 MiB."""
    text = zlib.compress(b"\0" * (64 << 20), 9)
    chunk = png_chunk(b"zTXt", b"Comment\0\0" + text)
    img = image_bytes((64, 64))
    return img[:33] + chunk + img[33:]


def jpeg_huge_sof() -> bytes:
    """A JPEG whose frame header claims 65500x65500 pixels."""
    data = bytearray(image_bytes((64, 64), "JPEG"))
    i = 2
    while i < len(data):
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            data[i + 5 : i + 9] = struct.pack(">HH", 65500, 65500)
            break
        i += 2 + length
    return bytes(data)


def animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((64, 64, 3), v, dtype=np.uint8)) for v in (0, 128, 255)]
    out = io.BytesIO()
    frames[0].save(out, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return out.getvalue()


def multipage_tiff() -> bytes:
    return animated("TIFF")


def cmyk(fmt: str) -> bytes:
    return image_bytes((64, 64), fmt, mode="CMYK")


def billion_laughs_yaml() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    prev = "a"
    for letter in "bcdefghi":
        lines.append(f"{letter}: &{letter} [" + ",".join([f"*{prev}"] * 9) + "]")
        prev = letter
    # The mapping holds unknown keys a..i and a prompt that is a 9**9-element list when expanded.
    lines.append(f"prompt: *{prev}")
    return ("\n".join(lines) + "\n").encode()


def deep_yaml(depth: int = 20000) -> bytes:
    return ("prompt: " + "[" * depth + "]" * depth + "\n").encode()


def deep_json(depth: int = 100000) -> bytes:
    return ('{"prompt": ' + "[" * depth + "]" * depth + "}").encode()


# ---------------------------------------------------------------------------- builders
GOOD_MASK = mask_bytes((64, 64), (20, 20, 44, 44))
PROMPT = b"a small red house"


def write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".upload-{os.urandom(6).hex()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def loose(image: bytes | None = None, ext: str = "png", mask: bytes | None = GOOD_MASK, prompt: bytes | None = PROMPT, prompt_ext: str = "txt"):
    """Builder for a loose-file job NAME.<ext>, NAME.mask.png, NAME.<prompt_ext>."""

    def make(name: str) -> Callable[[Path, Path], None]:
        def build(inbox: Path, outside: Path) -> None:
            if image is not None:
                write(inbox / f"{name}.{ext}", image)
            if mask is not None:
                write(inbox / f"{name}.mask.png", mask)
            if prompt is not None:
                write(inbox / f"{name}.{prompt_ext}", prompt)

        return build

    return make


def good_image(fmt: str = "PNG") -> bytes:
    return image_bytes((64, 64), fmt, seed=3)


def cases(is_root: bool) -> list[Case]:
    out: list[Case] = []

    def add(key: str, builder, expect, name: str | None = None, **kw) -> None:
        name = name or f"h-{key}"
        out.append(Case(key=key, name=name, build=builder(name), expect=frozenset(expect), **kw))

    png = good_image()
    # -- corrupt, truncated, empty, wrong extension
    add("corrupt-png", loose(b"\x89PNG\r\n\x1a\n" + os.urandom(4000)), {"image_unreadable"})
    add("random-bytes", loose(os.urandom(5000)), {"image_unreadable"})
    add("truncated-png", loose(png[: len(png) // 2]), {"image_unreadable"})
    jpg = good_image("JPEG")
    add("truncated-jpeg", loose(jpg[: len(jpg) // 3], ext="jpg"), {"image_unreadable"})
    add("zero-byte-image", loose(b""), {"image_unreadable"})
    add("zero-byte-mask", loose(png, mask=b""), {"mask_unreadable"})
    add("corrupt-mask", loose(png, mask=os.urandom(300)), {"mask_unreadable"})
    add("truncated-mask", loose(png, mask=GOOD_MASK[: len(GOOD_MASK) // 2]), {"mask_unreadable"})
    add("zero-byte-prompt", loose(png, prompt=b""), {DONE, "prompt_invalid"}, note="an empty prompt is a valid (unconditional) prompt")
    add("text-as-png", loose(b"this is not an image\n" * 20), {"image_unreadable"})
    add("elf-as-png", loose(Path("/bin/true").read_bytes()[:20000]), {"image_unreadable"})
    add("png-named-jpg", loose(png, ext="jpg"), {DONE, "image_unreadable", "image_unsupported"}, note="content, not extension, decides")
    add("gif-extension", loose(image_bytes((64, 64), "GIF"), ext="gif"), {"job_incomplete"}, note=".gif is not an image extension: the job lacks its image",
        also_not_a_job=("h-gif-extension.gif",))
    add("pdf-as-tiff", loose(b"%PDF-1.4\n" + os.urandom(2000), ext="tiff"), {"image_unreadable"})
    # -- bombs and gigantic dimensions (limits.max_pixels is 4,000,000 in the test daemon)
    add("bomb-png-zeros", loose(zero_png(3000, 3000)), {"image_too_large"}, note="9 Mpx of zeros, 9 KB on disk")
    add("huge-ihdr", loose(raw_png(100_000, 100_000)), {"image_too_large"})
    add("huge-width", loose(raw_png(2**31 - 1, 1)), {"image_too_large", "image_unreadable"})
    add("zero-dims", loose(raw_png(0, 0)), {"image_unreadable"})
    add("huge-jpeg-sof", loose(jpeg_huge_sof(), ext="jpg"), {"image_too_large"})
    add(
        "oversized-file",
        loose(image_bytes((1800, 1700), "BMP", seed=9), ext="bmp", mask=mask_bytes((1800, 1700), (800, 800, 900, 900))),
        {"image_too_large", "input_too_large"},
        note="9.2 MB, over limits.max_input_bytes (8 MiB in the test daemon) though under max_pixels",
    )
    add("mask-bomb", loose(png, mask=zero_png(3000, 3000)), {"image_too_large", "mask_size_mismatch", "mask_unreadable"})
    add("ztxt-bomb", loose(ztxt_bomb()), {DONE, "image_unreadable", "image_too_large"}, note="Pillow caps text chunks")
    # -- modes
    add("png-16bit-gray", loose(image_bytes((64, 64), "PNG", mode="I;16")), {DONE, "image_unsupported"})
    add("png-16bit-rgb", loose(png16_rgb()), {DONE, "image_unsupported"})
    add("cmyk-jpeg", loose(cmyk("JPEG"), ext="jpg"), {DONE, "image_unsupported"})
    add("cmyk-tiff", loose(cmyk("TIFF"), ext="tif"), {DONE, "image_unsupported"})
    add("palette-png", loose(image_bytes((64, 64), "PNG", mode="P")), {DONE, "image_unsupported"})
    add("animated-gif-as-png", loose(animated("GIF"), ext="png"), {"image_unsupported"})
    add("animated-png", loose(animated("PNG")), {"image_unsupported"})
    add("animated-webp", loose(animated("WEBP"), ext="webp"), {"image_unsupported"})
    add("multipage-tiff", loose(multipage_tiff(), ext="tiff"), {"image_unsupported", DONE})
    # -- masks
    add("mask-wrong-size", loose(png, mask=mask_bytes((32, 48))), {"mask_size_mismatch"})
    add("mask-all-black", loose(png, mask=mask_bytes((64, 64), fill=0)), {"mask_empty"})
    add("mask-all-white", loose(png, mask=mask_bytes((64, 64), fill=255)), {DONE})
    add("no-mask-no-alpha", loose(png, mask=None), {"job_incomplete", "mask_missing"})
    # -- prompts and options
    add("prompt-latin1", loose(png, prompt="caf\xe9 cr\xe8me".encode("latin-1") + b"\xff"), {"prompt_invalid"})
    add("prompt-huge", loose(png, prompt=b"house " * 200_000), {"prompt_invalid"})
    add("prompt-nul", loose(png, prompt=b"house\0\0\0"), {DONE, "prompt_invalid"})
    add("yaml-bad-type", loose(png, prompt=b"prompt: a house\nsteps: many\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-bool-steps", loose(png, prompt=b"prompt: a house\nsteps: true\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-out-of-range", loose(png, prompt=b"prompt: a house\nsteps: 100000\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-negative-guidance", loose(png, prompt=b"prompt: a house\nguidance: -5\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-unknown-key", loose(png, prompt=b"prompt: a house\nstepz: 3\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-list", loose(png, prompt=b"- a\n- b\n", prompt_ext="yaml"), {"options_invalid"})
    add("yaml-syntax", loose(png, prompt=b"prompt: [unclosed\n  : :\n", prompt_ext="yaml"), {"prompt_invalid"})
    add("yaml-output-escape", loose(png, prompt=b"prompt: x\noutput_format: ../../../tmp/evil\n", prompt_ext="yaml"), {"options_invalid"})
    add("json-bad", loose(png, prompt=b'{"prompt": "x", ', prompt_ext="json"), {"prompt_invalid"})
    add("json-bad-type", loose(png, prompt=json.dumps({"prompt": "x", "seed": "abc"}).encode(), prompt_ext="json"), {"options_invalid"})
    add("json-nan", loose(png, prompt=b'{"prompt": "x", "guidance": NaN}', prompt_ext="json"), {"options_invalid", "prompt_invalid"})
    add("yaml-billion-laughs", loose(png, prompt=billion_laughs_yaml(), prompt_ext="yaml"), {"options_invalid", "prompt_invalid"})
    add("yaml-deep-nesting", loose(png, prompt=deep_yaml(), prompt_ext="yaml"), {"options_invalid", "prompt_invalid"})
    add("json-deep-nesting", loose(png, prompt=deep_json(), prompt_ext="json"), {"options_invalid", "prompt_invalid"})

    # The python tag would run `touch OUTSIDE/pwned` if the YAML loader were unsafe.
    def python_tag(name: str):
        def build(inbox: Path, outside: Path) -> None:
            target = outside / "pwned"
            text = f'prompt: !!python/object/apply:os.system ["touch {target}"]\nsteps: 2\n'
            loose(png, prompt=text.encode(), prompt_ext="yaml")(name)(inbox, outside)

        return build

    add("yaml-python-tag", python_tag, {"prompt_invalid", "options_invalid"})

    # -- names (valid but awkward): must be processed under exactly that name
    for key, weird in (
        ("name-spaces", "my holiday photo 1"),
        ("name-unicode", "ünïcödé 画像 🎨"),
        ("name-shell", "$(touch pwned);x`id`&|<>"),
        ("name-quotes", "it's a \"test\""),
        ("name-dash", "-rf --help"),
        ("name-percent", "100% %s %n {0}"),
    ):
        add(key, loose(png), {DONE}, name=weird)
    add("name-long", loose(png), {DONE, "job_unsafe", "internal_error"}, name="L" * 240, note="NAME.json must still fit in 255 bytes")
    add("name-backslash-escape", loose(png), {"job_unsafe"}, name="a\\..\\..\\evil")
    add("name-dotdot-backslash", loose(png), {IGNORED}, name="..\\..\\evil", note="starts with a dot: ignored like any dotfile")
    add("name-newline", loose(png), {"job_unsafe"}, name="new\nline")

    # -- entries no job uses (issue 22): recorded in failed/ after incomplete_timeout, not left for ever
    def lone(file_name: str, data: bytes):
        def make(_name: str) -> Callable[[Path, Path], None]:
            return lambda inbox, outside: write(inbox / file_name, data)
        return make

    add("unknown-type", lone("h-notes.docx", b"PK\x03\x04 not a job"), {"not_a_job"}, name="h-notes.docx")
    add("heic-photo", lone("h-photo.heic", b"\0\0\0\x18ftypheic"), {"not_a_job"}, name="h-photo.heic")
    add("name-control", loose(png), {"job_unsafe"}, name="bell\x07\x1b[31m")

    # -- links and special files: never followed, never opened for blocking reads
    def symlinked(role: str):
        def make(name: str):
            def build(inbox: Path, outside: Path) -> None:
                target = outside / f"{name}-secret-{role}"
                target.write_bytes({"image": png, "mask": GOOD_MASK, "prompt": b"secret prompt"}[role])
                files = {"image": f"{name}.png", "mask": f"{name}.mask.png", "prompt": f"{name}.txt"}
                data = {"image": png, "mask": GOOD_MASK, "prompt": PROMPT}
                for r, filename in files.items():
                    if r == role:
                        os.symlink(target, inbox / filename)
                    else:
                        write(inbox / filename, data[r])

            return build

        return make

    for role in ("image", "mask", "prompt"):
        key = f"symlink-{role}"
        add(key, symlinked(role), {"job_unsafe"}, never_opened=[f"h-{key}-secret-{role}"])

    def symlink_relative(name: str):
        def build(inbox: Path, outside: Path) -> None:
            target = outside / f"{name}-rel.png"
            target.write_bytes(png)
            os.symlink(os.path.relpath(target, inbox), inbox / f"{name}.png")
            write(inbox / f"{name}.mask.png", GOOD_MASK)
            write(inbox / f"{name}.txt", PROMPT)

        return build

    add("symlink-relative-dotdot", symlink_relative, {"job_unsafe"}, never_opened=["h-symlink-relative-dotdot-rel.png"])

    def symlink_dangling(name: str):
        def build(inbox: Path, outside: Path) -> None:
            os.symlink("/nonexistent/inpaintd/x.png", inbox / f"{name}.png")
            write(inbox / f"{name}.mask.png", GOOD_MASK)
            write(inbox / f"{name}.txt", PROMPT)

        return build

    add("symlink-dangling", symlink_dangling, {"job_unsafe"})

    def symlink_folder(name: str):
        def build(inbox: Path, outside: Path) -> None:
            folder = outside / f"{name}-folder"
            folder.mkdir()
            (folder / "image.png").write_bytes(png)
            (folder / "mask.png").write_bytes(GOOD_MASK)
            (folder / "prompt.txt").write_bytes(PROMPT)
            os.symlink(folder, inbox / name)

        return build

    add(
        "symlink-job-folder",
        symlink_folder,
        {"job_unsafe", IGNORED},
        never_opened=["h-symlink-job-folder-folder/image.png", "h-symlink-job-folder-folder/prompt.txt"],
        note="a symlink to a folder outside: rejected or left alone, never entered",
    )

    def symlink_in_folder(name: str):
        def build(inbox: Path, outside: Path) -> None:
            target = outside / f"{name}-inner.png"
            target.write_bytes(png)
            staging = inbox / f".{name}.staging"
            staging.mkdir()
            os.symlink(target, staging / "image.png")
            (staging / "mask.png").write_bytes(GOOD_MASK)
            (staging / "prompt.txt").write_bytes(PROMPT)
            os.rename(staging, inbox / name)

        return build

    add("symlink-in-job-folder", symlink_in_folder, {"job_unsafe"}, never_opened=["h-symlink-in-job-folder-inner.png"])

    def hardlinked(name: str):
        def build(inbox: Path, outside: Path) -> None:
            target = outside / f"{name}-hard.png"
            target.write_bytes(png)
            os.link(target, inbox / f"{name}.png")
            write(inbox / f"{name}.mask.png", GOOD_MASK)
            write(inbox / f"{name}.txt", PROMPT)

        return build

    add("hardlink-image", hardlinked, {"job_unsafe"}, never_read=["h-hardlink-image-hard.png"])

    def special(kind: str, ext: str):
        def make(name: str):
            def build(inbox: Path, outside: Path) -> None:
                path = inbox / f"{name}.{ext}"
                if kind == "fifo":
                    os.mkfifo(path)
                elif kind == "socket":
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    sock.bind(str(path))
                    sock.close()
                elif kind == "chardev":
                    os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))  # like /dev/zero
                elif kind == "blockdev":
                    os.mknod(path, 0o644 | stat.S_IFBLK, os.makedev(7, 200))  # a loop device number
                for other, data in ((f"{name}.png", png), (f"{name}.mask.png", GOOD_MASK), (f"{name}.txt", PROMPT)):
                    if other != path.name:
                        write(inbox / other, data)

            return build

        return make

    add("fifo-image", special("fifo", "png"), {"job_unsafe"}, never_read=["INBOX:h-fifo-image.png"])
    add("fifo-prompt", special("fifo", "txt"), {"job_unsafe"}, never_read=["INBOX:h-fifo-prompt.txt"])
    add("fifo-mask", special("fifo", "mask.png"), {"job_unsafe"})
    add("socket-image", special("socket", "png"), {"job_unsafe"})
    if is_root:
        add("chardev-image", special("chardev", "png"), {"job_unsafe"}, root_only=True, never_read=["INBOX:h-chardev-image.png"])
        add("blockdev-mask", special("blockdev", "mask.png"), {"job_unsafe"}, root_only=True)

    # -- ambiguous and incomplete jobs
    def two_masks(name: str):
        def build(inbox: Path, outside: Path) -> None:
            loose(png)(name)(inbox, outside)
            write(inbox / f"{name}.mask.jpg", mask_bytes((64, 64), fmt="JPEG"))

        return build

    add("two-masks", two_masks, {"job_ambiguous"})

    def empty_folder(name: str):
        def build(inbox: Path, outside: Path) -> None:
            (inbox / name).mkdir()

        return build

    add("empty-job-folder", empty_folder, {"job_incomplete"})
    return out
