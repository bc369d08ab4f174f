"""A chaos run against live daemons, and the invariants that must hold after it (issue 10).

One or two real `inpaintd run` processes share one inbox. A seeded generator drops random
interleavings of good jobs and hostile material (random bytes under image names, truncated and
odd-format images, unreadable files, huge and aliased YAML, names of every length and charset,
folders and loose files for one name, parts arriving late, files rewritten after settling, a
second write handle an uploader keeps on a file and uses once the daemon claimed it, one name
dropped again and again with NAME ... NAME-9999 taken in the outbox, failed/ and archive/) while
daemons are killed with SIGKILL at random moments and transient faults are injected: the main
filesystem (inbox, state, outbox, failed) filled up, the archive's filesystem (another tmpfs)
filled up, the outbox bound read-only. Then everything drains and `check` states the invariants:

- no daemon ever exited except when killed, and each stops cleanly on SIGTERM at the end;
- every good job has exactly one result and no failure record;
- every other dropped name has exactly one outcome, and no outcome is internal_error;
- every dropped file is in archive/ or failed/, in exactly one record, next to its record;
- a job whose file was written through a kept handle after its claim ends in one record, made
  from bytes the daemon checked (the sidecar's hash is of a version within the size limit) or
  failed input_too_large; the daemons' peak RSS stays under RSS_BOUND;
- a name whose numbered names are all taken gets NAME-<job token> everywhere, nothing else;
- no temp file, staging folder, orphan image or leftover claim anywhere; the inbox holds only junk;
- no record (sidecar, error.json, status.json, log line) over 1 MiB;
- everything drained within a bound after the chaos ended.

Where root and mount namespaces are available the whole tree lives on tmpfs mounts in a private
mount namespace held by a `sleep` process (the faults need them; the host's mounts are never
touched); the daemons run there without CAP_DAC_OVERRIDE, as the service does, so a mode-000
file is really unreadable to them. Elsewhere the run has the same drops and kills, no
filesystem faults, and says so.

Shared by tests/test_chaos.py (fast profile) and scripts/soak.py (long profile).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from daemon_harness import FAST_SETTINGS, Daemon, Dirs, image_bytes, mask_bytes, merged
from hostile_corpus import (
    animated,
    billion_laughs_yaml,
    deep_json,
    jpeg_huge_sof,
    ztxt_bomb,
)
from inpaintd.core.jobs import NUMBERED_NAMES, job_token
from inpaintd.intake.names import DERIVED_SUFFIX_BYTES
from PIL import Image

RECORD_LIMIT = 1 << 20
FAULT_NAMES = {"fs": "inbox/state/outbox disk full", "afs": "archive disk (another filesystem) full",
               "ro": "outbox read-only", "low": "inbox/state/outbox disk low (low-disk guard)"}
LOW_FREE = 4 << 20  # what the "low" fault leaves free: below the guard's limit, room for any write
TEMP_MARK = ".inpaintd-tmp-"
JUNK = (".DS_Store", "._junk", "Thumbs.db", "upload.part")
# Every input is far below this; a file grown through a kept handle is cut at it, and an archive
# copy onto the 32 MiB archive tmpfs must fit even when every daemon copies one at once.
MAX_INPUT_BYTES = 4 << 20
RSS_BOUND = 2 << 30  # the tiny model's daemon peaks near 0.6 GiB; a whole grown input read would show


@dataclass(frozen=True)
class Profile:
    seed: int = 1
    drops: int = 40
    daemons: int = 2
    kills: int = 3
    faults: int = 4
    chaos_seconds: float = 45.0  # drops, kills and faults are spread over this long
    drain_bound: float = 90.0  # after the chaos, everything has an outcome within this
    exhausted: int = 3  # drops of the one name whose NAME ... NAME-9999 are taken everywhere (0: none)


FAST = Profile()
LONG = Profile(seed=7, drops=400, kills=30, faults=24, chaos_seconds=420.0, drain_bound=240.0, exhausted=12)

SETTINGS = merged(FAST_SETTINGS, {
    # Late parts come at most 2.5 s after the first, held up by a full disk (<= 3 s) and a restart
    # blocking the dropper (a few s) at worst: well inside the timeout, so a good job stays good.
    "watch": {"settle_seconds": 0.3, "rescan_interval": 2, "incomplete_timeout": 12},
    "limits": {"max_regions": 8, "max_region_steps": 40, "max_job_seconds": 60, "hold_timeout": 3600,
               # The low-disk guard, scaled to the 96 MiB tmpfs: a "low" or "fs" fault stops claiming.
               "min_free_bytes": 8 << 20, "min_free_fraction": 0.0, "max_input_bytes": MAX_INPUT_BYTES},
    "logging": {"format": "json", "level": "info"},
})


# ---------------------------------------------------------------------------- the sandbox


def namespace_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "filesystem faults need root (tmpfs mounts in a private mount namespace)"
    for tool in ("unshare", "nsenter", "mount", "umount", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True)
    if probe.returncode != 0:
        return f"unshare -m does not work here: {probe.stderr.decode(errors='replace').strip()}"
    return None


class World:
    """The folders of one run, the daemons on them, and the faults that can be done to them."""

    def __init__(self, root: Path, model: Path, daemons: int, settings: dict | None = None) -> None:
        self.root = root
        self.reason = namespace_unavailable()
        self.holder: subprocess.Popen[bytes] | None = None
        self.fs = root / "fs"  # inbox, outbox, failed, state-N: one filesystem (claims are renames)
        self.afs = root / "afs"  # the archive, on another filesystem
        self.fs.mkdir(parents=True)
        self.afs.mkdir(parents=True)
        if self.reason is None:
            self.holder = subprocess.Popen(
                ["unshare", "-m", "--propagation", "private", "sleep", "infinity"],
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
            time.sleep(0.2)
            self.ns("mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(self.fs))
            self.ns("mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(self.afs))
        elif os.stat("/dev/shm").st_dev != os.stat(root).st_dev:
            self.afs.rmdir()
            self.afs = Path(os.path.realpath("/dev/shm")) / f"inpaintd-chaos-{os.getpid()}-{root.name}"
            self.afs.mkdir()
        for name in ("inbox", "outbox", "failed"):
            self.view(self.fs / name).mkdir()
        self.view(self.afs / "archive").mkdir()
        self.inbox = self.fs / "inbox"
        self.outbox = self.fs / "outbox"
        self.failed = self.fs / "failed"
        self.archive = self.afs / "archive"
        self.daemons: list[Daemon] = []
        wrapper: list[str] = []
        if self.holder is not None:
            wrapper = ["nsenter", "-t", str(self.holder.pid), "-m", "--",
                       "setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
        for index in range(daemons):
            state = self.fs / f"state-{index}"
            self.view(state).mkdir()
            data = merged(SETTINGS, settings)
            data["model"] = {**data.get("model", {}), "path": str(model), "cache_dir": str(root / "cache")}
            data["paths"] = {"inbox": str(self.inbox), "outbox": str(self.outbox), "failed": str(self.failed),
                             "archive": str(self.archive), "state": str(state)}
            config = root / f"config-{index}.yaml"
            config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
            dirs = Dirs(root=root, inbox=self.view(self.inbox), outbox=self.view(self.outbox),
                        failed=self.view(self.failed), archive=self.view(self.archive), state=self.view(state),
                        config=config, log=root / f"daemon-{index}.log")
            self.daemons.append(Daemon(dirs, wrapper=wrapper))
        self.filled: set[str] = set()
        self.read_only = False
        # Entries the run made to take every numbered name (take_every_name): not records, and
        # left out of every scan by a set lookup, so 30,000 of them cost the checks nothing.
        self.placeholders: set[str] = set()
        self.taken = 0  # placeholders made (one name in three folders)

    def take_every_name(self, name: str) -> None:
        """NAME, NAME-1 ... NAME-9999 taken in the outbox (an image each, which is what the
        publication tries) and in failed/ and archive/ (a folder each: records are folders)."""
        stems = [name] + [f"{name}-{index}" for index in range(1, NUMBERED_NAMES)]
        outbox, failed, archive = (self.view(p) for p in (self.outbox, self.failed, self.archive))
        for stem in stems:
            os.close(os.open(outbox / f"{stem}.png", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            os.mkdir(failed / stem)
            os.mkdir(archive / stem)
        self.placeholders.update(stems)
        self.placeholders.update(f"{stem}.png" for stem in stems)
        self.taken += 3 * len(stems)

    def placeholders_left(self) -> int:
        """How many placeholders are still where take_every_name put them (none may go)."""
        outbox, failed, archive = (self.view(p) for p in (self.outbox, self.failed, self.archive))
        stems = {p for p in self.placeholders if not p.endswith(".png")}
        have = sum(1 for n in os.listdir(outbox) if n in self.placeholders and n.endswith(".png"))
        for base in (failed, archive):
            have += sum(1 for e in os.scandir(base) if e.name in stems and not os.listdir(e.path))
        return have

    def ns(self, *cmd: str) -> None:
        assert self.holder is not None
        subprocess.run(["nsenter", "-t", str(self.holder.pid), "-m", "--", *cmd], check=True, capture_output=True)

    def view(self, path: Path) -> Path:
        """Where this process sees a path of the daemons' namespace."""
        if self.holder is None:
            return path
        return Path(f"/proc/{self.holder.pid}/root") / str(path).lstrip("/")

    # -- faults ------------------------------------------------------------------------
    def can_fault(self) -> bool:
        return self.holder is not None

    def fill(self, which: str) -> None:
        """Fill a filesystem ("fs" or "afs") to the last byte with a filler file; "low": the
        main filesystem to LOW_FREE bytes free (the low-disk guard's case: writes still fit)."""
        target = self.view((self.afs if which == "afs" else self.fs) / ".filler")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            if which == "low":
                st = os.statvfs(target)
                os.write(fd, b"\0" * max(0, st.f_bavail * st.f_frsize - LOW_FREE))
                self.filled.add(which)
                return
            for block in (1 << 20, 4096, 1):
                data = b"\0" * block
                try:
                    while os.write(fd, data):
                        pass
                except OSError:
                    continue
        finally:
            os.close(fd)
        self.filled.add(which)

    def unfill(self, which: str) -> None:
        (self.view((self.afs if which == "afs" else self.fs) / ".filler")).unlink(missing_ok=True)
        self.filled.discard(which)

    def outbox_read_only(self, on: bool) -> None:
        if on and not self.read_only:
            self.ns("mount", "--bind", str(self.outbox), str(self.outbox))
            self.ns("mount", "-o", "remount,ro,bind", str(self.outbox))
        elif not on and self.read_only:
            # A daemon may hold the folder open at this instant (fsync of the directory): EBUSY.
            # Detached lazily, its open descriptor keeps the old view and every new path the rw one.
            self.ns("umount", "-l", str(self.outbox))
        self.read_only = on

    def clear_faults(self) -> None:
        for which in list(self.filled):
            self.unfill(which)
        self.outbox_read_only(False)

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.alive():
                daemon.kill9()
        if self.holder is not None:
            self.holder.kill()
            self.holder.wait(timeout=10)
        elif self.afs.parent != self.root:
            shutil.rmtree(self.afs, ignore_errors=True)


# ---------------------------------------------------------------------------- what is dropped


class Reach(str, Enum):
    """What an uploader does through a write handle it kept on a file the daemon claimed."""

    SPARSE = "sparse"  # grown past the size limit without writing (truncate up): 8 TiB costs nothing
    GROW = "grow"  # bytes appended
    OVERWRITE = "overwrite"  # bytes replaced in place


@dataclass(frozen=True)
class HeldOpen:
    """A second write handle on a drop's image (two sftp or SMB opens), used once it was claimed."""

    reach: Reach
    delay: float  # seconds after the claim (the file left the inbox): before, during or after the read
    size: int  # SPARSE: the new length
    offset: int  # GROW/OVERWRITE: where the bytes go
    data: bytes
    allowed: frozenset[str]  # sha256 of each version of the image a result may be made from


@dataclass
class Drop:
    """One name dropped into the inbox, and what must become of it."""

    name: str
    kind: str
    good: bool  # must end as exactly one result
    may_succeed: bool = False  # odd but valid input: a result or a failure are both right
    files: list[str] = field(default_factory=list)  # top-level inbox entries it wrote (for the ledger)
    dropped_at: float = 0.0
    late: list[tuple[float, str, bytes]] = field(default_factory=list)  # (when, entry, bytes) written later
    held: HeldOpen | None = None
    exhausted: bool = False  # its name's numbered names are all taken: its records are NAME-<token>


def _png(size: tuple[int, int] = (64, 64), seed: int = 0, mode: str = "RGB") -> bytes:
    return image_bytes(size, "PNG", mode=mode, seed=seed)


def _mask(size: tuple[int, int] = (64, 64)) -> bytes:
    w, h = size
    return mask_bytes(size, (w // 3, h // 3, 2 * w // 3, 2 * h // 3))


def _alpha_png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    pixels[20:40, 20:40, 3] = 0
    out = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(out, format="PNG")
    return out.getvalue()


def _dots_mask(size: int, spacing: int) -> bytes:
    pixels = np.zeros((size, size), dtype=np.uint8)
    for y in range(spacing // 2, size, spacing):
        for x in range(spacing // 2, size, spacing):
            pixels[y : y + 3, x : x + 3] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, "L").save(out, format="PNG")
    return out.getvalue()


def _flat_png(size: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), (90, 120, 150)).save(out, format="PNG")
    return out.getvalue()


DDS_HEADER = b"DDS " + (124).to_bytes(4, "little") + b"\x07\x10\x08\x00" + b"\x40\x00\x00\x00" * 2 + b"\0" * 112
PSD_HEADER = b"8BPS\x00\x01" + b"\0" * 6 + b"\x00\x03\x00\x00\x00\x40\x00\x00\x00\x40\x00\x08\x00\x03" + b"\0" * 64


def _name(rng: random.Random, index: int, kind: str) -> str:
    """A fresh job name: mostly plain, sometimes of another charset or near the length limit."""
    base = f"c{index:04d}-{kind}"
    roll = rng.random()
    if roll < 0.15:
        alphabet = "äöüßéñçøåžšłđ中文日本語한국어Ωλπ🙂🎨 -_+.,()[]'"
        return base + "-" + "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
    if roll < 0.22:
        # Near NAME_MAX in bytes: up to 241 fits beside its longest derived name (NAME-<8 hex>.webp,
        # core.jobs.distinct_names), 242 does not; NAME.mask.png itself must still fit in 255 bytes.
        target = rng.choice([200, 236, 241, 242])
        fill = rng.choice(["x", "é", "中"])
        name = base + "-"
        while len((name + fill).encode()) <= target:
            name += fill
        return name
    return base


GOOD_KINDS = ("good", "good-jpg", "good-yaml", "good-folder", "good-folder-renamed", "good-alpha", "good-late",
              "good-rewritten", "good-spellings", "good-bidi")
HOSTILE_KINDS = ("random-bytes", "truncated", "odd-format", "dds-no-mask", "unreadable", "unreadable-no-mask",
                 "billion-laughs", "deep-json", "huge-key", "control-name", "escape-name", "ambiguous", "symlink",
                 "size-mismatch", "fragmented", "costly", "animated", "ztxt", "huge-sof", "incomplete")
HELD_OPEN_SHARE = 0.12  # drops whose image the uploader keeps a second write handle on (about 5 a fast run)


def _held_open(rng: random.Random, image: bytes) -> HeldOpen:
    """What the uploader's kept handle will do, and the versions a result may be made from:
    the bytes as claimed, and as changed when the change stays within the size limit (the daemon
    may read before or after it; it must never read past the limit, nor hash other bytes)."""
    reach = rng.choice(list(Reach))
    delay = rng.choice([0.0, rng.uniform(0.0, 1.5)])
    size, offset, data, changed = 0, 0, b"", None
    if reach is Reach.SPARSE:
        size = rng.choice([MAX_INPUT_BYTES + 1, 8 << 40])
    elif reach is Reach.GROW:
        offset = len(image)
        data = rng.randbytes(rng.choice([16, 4096, MAX_INPUT_BYTES]))
        changed = image + data
    else:
        offset = rng.randrange(len(image))
        data = rng.randbytes(rng.randint(1, 64))
        changed = image[:offset] + data + image[offset + len(data):]
    versions = [image] + ([changed] if changed is not None and len(changed) <= MAX_INPUT_BYTES else [])
    return HeldOpen(reach, delay, size, offset, data, frozenset(hashlib.sha256(v).hexdigest() for v in versions))


def plan_drop(rng: random.Random, index: int, can_chmod: bool) -> tuple[Drop, dict[str, bytes | None]]:
    """A drop and its inbox entries ({relative path: bytes}; None = a folder, "->" symlinks handled by kind)."""
    kind = rng.choice(GOOD_KINDS) if rng.random() < 0.5 else rng.choice(HOSTILE_KINDS)
    if rng.random() < HELD_OPEN_SHARE:
        kind = "held-open"
    if kind.startswith("unreadable") and not can_chmod:
        kind = "random-bytes"
    name = _name(rng, index, kind)
    if kind == "control-name":
        name = f"c{index:04d}-ctl\x07name"
    elif kind == "escape-name":  # a terminal escape (OSC 52 clipboard write, ESC[2J) or a C1 CSI
        name = f"c{index:04d}-" + rng.choice(["\x1b]52;c;aGk=\x07", "\x1b[2J\x1b[H", "\u009b31m"]) + "esc"
    elif kind == "good-bidi":  # printable to a filesystem: painted, and shown escaped to a person
        name = f"c{index:04d}-invoice\u202egnp"
    elif kind == "good-spellings":  # one job, its parts spelled by different clients
        name = f"C{index:04d}-Café"
    seed = rng.randrange(1 << 16)
    files: dict[str, bytes | None] = {}
    drop = Drop(name=name, kind=kind, good=kind.startswith("good") and len(name.encode()) <= 255 - DERIVED_SUFFIX_BYTES,
                may_succeed=kind in ("ztxt", "held-open"))
    prompt = b"a small red house"
    if kind in ("good", "good-late", "good-rewritten") or not kind.startswith("good") and kind in (
            "random-bytes", "truncated", "odd-format", "unreadable", "size-mismatch", "animated", "ztxt",
            "huge-sof", "control-name", "escape-name", "symlink", "held-open") or kind == "good-bidi":
        image = {
            "good": _png(seed=seed), "good-late": _png(seed=seed), "good-rewritten": _png(seed=seed),
            "good-bidi": _png(seed=seed), "random-bytes": os.urandom(rng.randint(1, 4096)),
            "truncated": _png(seed=seed)[: rng.randint(20, 400)],
            "odd-format": rng.choice([DDS_HEADER, PSD_HEADER, b"%!PS-Adobe-3.0 EPSF-3.0\n" + b"0" * 64,
                                      b"\x00\x00\x01\x00\x01\x00" + b"\0" * 64]),
            "unreadable": _png(seed=seed), "size-mismatch": _png((80, 48), seed=seed), "animated": animated("GIF"),
            "ztxt": ztxt_bomb(), "huge-sof": jpeg_huge_sof(), "control-name": _png(seed=seed),
            "escape-name": _png(seed=seed), "held-open": _png(seed=seed),
            "symlink": b"",
        }[kind]
        if kind == "held-open":
            drop.held = _held_open(rng, image)
        files[f"{name}.png"] = image
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.txt"] = prompt
    elif kind == "good-spellings":
        # NFD and mixed case from macOS scp, NFC lower case from Windows SMB: grouped as one job
        # (NFC, case-folded stems), named after the image's own spelling.
        nfd = unicodedata.normalize("NFD", name)
        files[f"{nfd}.png"] = _png(seed=seed)
        files[f"{unicodedata.normalize('NFC', name).lower()}.mask.png"] = _mask()
        files[f"{name.upper()}.TXT"] = prompt
        drop.name = nfd
    elif kind == "good-jpg":
        files[f"{name}.jpg"] = image_bytes((64, 64), "JPEG", seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.txt"] = prompt
    elif kind == "good-yaml":
        files[f"{name}.png"] = _png(seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.yaml"] = yaml.safe_dump({"prompt": "a door", "seed": seed, "steps": 2}).encode()
    elif kind in ("good-folder", "good-folder-renamed"):
        files[name] = None
        files[f"{name}/image.png"] = _png(seed=seed)
        files[f"{name}/mask.png"] = _mask()
        files[f"{name}/prompt.txt"] = prompt
    elif kind == "good-alpha":
        files[f"{name}.png"] = _alpha_png(seed)
        files[f"{name}.txt"] = prompt
    elif kind in ("dds-no-mask", "unreadable-no-mask"):
        files[f"{name}.png"] = DDS_HEADER if kind == "dds-no-mask" else _alpha_png(seed)
        files[f"{name}.txt"] = prompt
    elif kind == "billion-laughs":
        files[f"{name}.png"] = _png(seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.yaml"] = billion_laughs_yaml()
    elif kind == "deep-json":
        files[f"{name}.png"] = _png(seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.json"] = deep_json(rng.choice([50, 5000]))
    elif kind == "huge-key":
        files[f"{name}.png"] = _png(seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.yaml"] = yaml.safe_dump({"prompt": "x", "k" * 3000: [1] * 1000}).encode()
    elif kind == "ambiguous":
        files[name] = None
        files[f"{name}/image.png"] = _png(seed=seed)
        files[f"{name}/mask.png"] = _mask()
        files[f"{name}.png"] = _png(seed=seed + 1)
        files[f"{name}.txt"] = prompt
    elif kind == "fragmented":
        files[f"{name}.png"] = _flat_png(1280)
        files[f"{name}.mask.png"] = _dots_mask(1280, 160)
        files[f"{name}.txt"] = prompt
    elif kind == "costly":
        files[f"{name}.png"] = _png(seed=seed)
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.yaml"] = yaml.safe_dump({"prompt": "x", "steps": 150}).encode()
    elif kind == "incomplete":
        files[f"{name}.mask.png"] = _mask()
        files[f"{name}.txt"] = prompt
    return drop, files


def exhausted_name(seed: int) -> str:
    return f"x{seed}-scan"


def plan_exhausted(rng: random.Random, name: str, good: bool) -> tuple[Drop, dict[str, bytes | None]]:
    """Another job under the name whose numbered names are all taken (a client that always
    uploads scan.png): a good one (outbox and archive/) or one that fails (failed/)."""
    seed = rng.randrange(1 << 16)
    image = _png(seed=seed) if good else os.urandom(rng.randint(16, 2048))
    kind = "exhausted-good" if good else "exhausted-bad"
    drop = Drop(name=name, kind=kind, good=good, exhausted=True)
    return drop, {f"{name}.png": image, f"{name}.mask.png": _mask(), f"{name}.txt": b"a scanned page"}


# ---------------------------------------------------------------------------- the run


@dataclass
class Handle:
    """A kept write handle (HeldOpen) on a dropped image, waiting for the claim."""

    drop: Drop
    fd: int
    inbox_path: Path
    act_at: float | None = None  # once claimed: when to write through it


@dataclass
class Run:
    profile: Profile
    world: World
    drops: list[Drop] = field(default_factory=list)
    kills: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    unexpected_exits: list[str] = field(default_factory=list)
    chaos_ended: float = 0.0
    drained_after: float | None = None
    namespace: str = "yes"
    report: "Report | None" = None
    handles: list[Handle] = field(default_factory=list)
    reached: dict[str, int] = field(default_factory=dict)  # Reach -> how often a kept handle wrote after a claim
    peak_rss: int = 0

    @property
    def root(self) -> Path:
        return self.world.root


def _write(path: Path, data: bytes) -> None:
    """As a careful client does: a temp name, then a rename into place."""
    tmp = path.with_name(f".upload-{os.urandom(6).hex()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _materialise(world: World, drop: Drop, files: dict[str, bytes | None], rng: random.Random, now: float) -> None:
    inbox = world.view(world.inbox)
    name = drop.name
    if drop.kind == "good-folder-renamed":
        staging = inbox / f".up-{os.urandom(4).hex()}"
        staging.mkdir()
        for rel, data in files.items():
            if data is not None:
                (staging / rel.split("/", 1)[1]).write_bytes(data)
        os.rename(staging, inbox / name)
        drop.files = [name]
        return
    now_files = dict(files)
    if drop.kind == "good-late":
        mask = now_files.pop(f"{name}.mask.png")
        drop.late.append((now + rng.uniform(0.5, 2.5), f"{name}.mask.png", mask))
    if drop.kind == "good-rewritten":
        # The image first; it settles, is rewritten, then the other parts come.
        drop.late.append((now + 0.8, f"{name}.png", _png(seed=rng.randrange(1 << 16))))
        for rel in [r for r in now_files if r != f"{name}.png"]:
            drop.late.append((now + 1.2, rel, now_files.pop(rel)))  # type: ignore[arg-type]
    write_drop(inbox, drop, now_files)
    if drop.kind.startswith("unreadable"):
        os.chmod(inbox / f"{name}.png", 0)
    drop.files = sorted({rel.split("/", 1)[0] for rel in files})


def _keep_handle(run: Run, drop: Drop) -> None:
    """Open the second write handle right after the upload, before the daemon can claim it."""
    path = run.world.view(run.world.inbox) / f"{drop.name}.png"
    try:
        fd = os.open(path, os.O_WRONLY)
    except FileNotFoundError:
        return  # claimed within the instant: the uploader had no second handle this time
    run.handles.append(Handle(drop, fd, path))


def _use_handles(run: Run, now: float) -> None:
    """Write through each kept handle once its file left the inbox (on Linux the open fd still
    writes the claimed inode, as a second sftp or SMB handle does) and its delay passed."""
    for handle in list(run.handles):
        held = handle.drop.held
        assert held is not None
        if handle.act_at is None:
            if os.path.lexists(handle.inbox_path):
                continue
            handle.act_at = now + held.delay
        if now < handle.act_at:
            continue
        run.handles.remove(handle)
        try:
            if held.reach is Reach.SPARSE:
                os.ftruncate(handle.fd, held.size)
            else:
                os.pwrite(handle.fd, held.data, held.offset)
            run.reached[held.reach.value] = run.reached.get(held.reach.value, 0) + 1
        except OSError:
            pass  # a full disk refused the uploader's write: nothing changed
        finally:
            os.close(handle.fd)


def _sample_rss(run: Run) -> None:
    """The daemons' peak resident set (VmHWM: the kernel's own high-water mark, so a spike
    between two samples is not missed)."""
    for daemon in run.world.daemons:
        if not daemon.alive():
            continue
        try:
            for line in Path(f"/proc/{daemon.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    run.peak_rss = max(run.peak_rss, int(line.split()[1]) * 1024)
        except OSError:
            continue


def write_drop(inbox: Path, drop: Drop, files: dict[str, bytes | None]) -> None:
    """Every entry of a drop at once, as a careful client writes it (no late parts, no chmod)."""
    for rel, data in files.items():
        if data is None:
            (inbox / rel).mkdir()
    for rel, data in files.items():
        if data is None:
            continue
        if drop.kind == "symlink" and rel == f"{drop.name}.png":
            os.symlink("/etc/hostname", inbox / rel)
        else:
            _write(inbox / rel, data)
    drop.files = sorted({rel.split("/", 1)[0] for rel in files})


def run_chaos(root: Path, model: Path, profile: Profile = FAST, log: Callable[[str], None] = lambda s: None,
              settings: dict | None = None) -> Run:
    rng = random.Random(profile.seed)
    world = World(root, model, profile.daemons, settings)
    run = Run(profile, world, namespace="yes" if world.can_fault() else f"no ({world.reason})")
    try:
        for daemon in world.daemons:
            daemon.start(timeout=180)
        _chaos(run, rng, log)
        _drain(run, log)
        for index, daemon in enumerate(world.daemons):
            if not daemon.alive():
                run.unexpected_exits.append(f"daemon {index} not alive before the final SIGTERM:\n{daemon.log_tail()}")
                continue
            code = daemon.stop(timeout=60)
            if code != 0:
                run.unexpected_exits.append(f"daemon {index} exited {code} on SIGTERM:\n{daemon.log_tail()}")
        run.report = check(run)  # while the namespace (and the files in it) still exist
    finally:
        world.close()
    return run


def _chaos(run: Run, rng: random.Random, log: Callable[[str], None]) -> None:
    profile, world = run.profile, run.world
    can_chmod = world.can_fault()  # daemons without CAP_DAC_OVERRIDE only in the namespace
    start = time.monotonic()
    span = profile.chaos_seconds
    events: list[tuple[float, str]] = [(rng.uniform(0, span), "drop") for _ in range(profile.drops)]
    events += [(rng.uniform(0.1 * span, 0.9 * span), "kill") for _ in range(profile.kills)]
    if world.can_fault():
        events += [(rng.uniform(0.05 * span, 0.85 * span), "fault") for _ in range(profile.faults)]
    # One name dropped again and again once NAME ... NAME-9999 are taken everywhere: at least one
    # job that is published and archived and one that fails, so each folder's fallback is used.
    exhausted = exhausted_name(profile.seed)
    outcomes_wanted = [True, False][: profile.exhausted] + [rng.random() < 0.5 for _ in range(profile.exhausted - 2)]
    rng.shuffle(outcomes_wanted)
    if outcomes_wanted:
        world.take_every_name(exhausted)
    events += [(rng.uniform(0.05 * span, 0.8 * span), "exhaust") for _ in outcomes_wanted]
    events.sort()
    pending_ends: list[tuple[float, str]] = []
    restarts: list[tuple[float, int]] = []
    late: list[tuple[float, Drop, str, bytes]] = []
    waiting: list[tuple[Drop, dict[str, bytes | None]]] = []  # a drop of a name whose last drop is still in the inbox
    index = 0
    last_rss = 0.0

    def tick(now: float) -> None:
        nonlocal last_rss
        for when, what in list(pending_ends):
            if when <= now:
                pending_ends.remove((when, what))
                if what == "ro":
                    world.outbox_read_only(False)
                else:
                    world.unfill(what)
        for when, which in list(restarts):
            if when <= now:
                restarts.remove((when, which))
                world.daemons[which].start(timeout=180)
        for item in sorted(late, key=lambda item: item[0]):  # a later part never overtakes an earlier one
            when, drop, rel, data = item
            if when <= now and "fs" not in world.filled:
                late.remove(item)
                _write(world.view(world.inbox) / rel, data)
        for drop, files in list(waiting):
            inbox = world.view(world.inbox)
            if "fs" not in world.filled and not any(os.path.lexists(inbox / rel) for rel in files):
                waiting.remove((drop, files))
                drop.dropped_at = time.monotonic()
                _materialise(world, drop, files, rng, now)
                run.drops.append(drop)
        _use_handles(run, now)
        if now - last_rss >= 1.0:
            last_rss = now
            _sample_rss(run)
        for i, daemon in enumerate(world.daemons):
            if daemon.proc is not None and not daemon.alive() and all(r[1] != i for r in restarts):
                run.unexpected_exits.append(f"daemon {i} exited {daemon.proc.returncode}:\n{daemon.log_tail()}")
                daemon.start(timeout=180)

    for at, what in events:
        while True:
            now = time.monotonic() - start
            tick(now)
            if now >= at:
                break
            time.sleep(min(0.05, at - now))
        now = time.monotonic() - start
        if what == "drop":
            if "fs" in world.filled:
                continue  # nobody can upload to a full disk; the drop is not made
            drop, files = plan_drop(rng, index, can_chmod)
            index += 1
            drop.dropped_at = time.monotonic()
            _materialise(world, drop, files, rng, now)
            late += [(when, drop, rel, data) for when, rel, data in drop.late]
            run.drops.append(drop)
            if drop.held is not None:
                _keep_handle(run, drop)
        elif what == "exhaust":
            waiting.append(plan_exhausted(rng, exhausted, outcomes_wanted.pop()))
        elif what == "kill":
            alive = [i for i, d in enumerate(world.daemons) if d.alive()]
            if alive:
                _sample_rss(run)  # its high-water mark goes with it
                victim = rng.choice(alive)
                world.daemons[victim].kill9()
                run.kills += 1
                restarts.append((now + rng.uniform(0.2, 2.0), victim))
        elif what == "fault":
            fault = rng.choice(["fs", "afs", "ro", "low"])
            if fault == "ro":
                world.outbox_read_only(True)
            elif fault == "low" and "fs" in world.filled:
                continue  # the main filesystem is full already
            else:
                world.fill(fault)
            run.faults[fault] = run.faults.get(fault, 0) + 1
            pending_ends.append((now + rng.uniform(0.5, 3.0), fault))
    give_up = time.monotonic() - start + 60.0
    while pending_ends or restarts or late or waiting or run.handles:
        now = time.monotonic() - start
        tick(now)
        if now > give_up and not (pending_ends or restarts or late):
            for handle in run.handles:
                os.close(handle.fd)
                run.unexpected_exits.append(f"{handle.drop.name!r} (held-open) never left the inbox")
            for drop, _files in waiting:
                run.unexpected_exits.append(f"the inbox never let go of {drop.name!r} for its next drop")
            run.handles.clear()
            waiting.clear()
        time.sleep(0.05)
    world.clear_faults()
    run.chaos_ended = time.monotonic()
    log(f"chaos: {len(run.drops)} drops, {run.kills} kills, faults {run.faults}")


def _drain(run: Run, log: Callable[[str], None]) -> None:
    world = run.world
    deadline = run.chaos_ended + run.profile.drain_bound
    wanted = {d.name for d in run.drops}
    while time.monotonic() < deadline:
        for i, daemon in enumerate(world.daemons):
            if not daemon.alive():
                run.unexpected_exits.append(f"daemon {i} exited {daemon.proc.returncode if daemon.proc else None} "
                                            f"while draining:\n{daemon.log_tail()}")
                daemon.start(timeout=180)
        found = outcomes(world)
        claimed = [p for d in world.daemons for p in (d.dirs.state / "claimed").glob("*")]
        inbox_left = [n for n in os.listdir(world.view(world.inbox)) if n not in JUNK]
        if wanted <= set(found) and not claimed and not inbox_left:
            run.drained_after = time.monotonic() - run.chaos_ended
            log(f"drained {run.drained_after:.1f} s after the chaos")
            return
        time.sleep(0.25)


# ---------------------------------------------------------------------------- invariants


def outcomes(world: World) -> dict[str, list[tuple[str, Path, dict[str, Any]]]]:
    """name -> [(kind, record path, record)] for every sidecar and error.json."""
    found: dict[str, list[tuple[str, Path, dict[str, Any]]]] = {}
    outbox = world.view(world.outbox)
    for entry in os.scandir(outbox):
        if entry.name.endswith(".json") and not entry.name.startswith(".") and entry.name not in world.placeholders:
            data = _load(Path(entry.path))
            found.setdefault(str(data.get("name")), []).append(("done", Path(entry.path), data))
    failed = world.view(world.failed)
    for entry in os.scandir(failed):
        if entry.name in world.placeholders:
            continue
        if entry.is_dir(follow_symlinks=False) and not entry.name.startswith("."):
            path = Path(entry.path) / "error.json"
            data = _load(path)
            found.setdefault(str(data.get("job")), []).append(("failed", path, data))
    return found


def _load(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:
        return {"_unreadable": str(exc)}
    return data if isinstance(data, dict) else {"_value": data}


def _held_open_problems(drop: Drop, kind: str, data: dict[str, Any]) -> list[str]:
    """A result from a file written through a kept handle must be made from a version the
    daemon could check (its hash is of the claimed bytes, or of the changed ones when they stay
    within the limit). A failure is its own code (input_too_large for a file grown past the
    limit before the read, image_unreadable for bytes overwritten, name_too_long for its name);
    internal_error is refused for every drop."""
    if drop.held is None or kind == "failed":
        return []
    image = (data.get("inputs") or {}).get("image") or {}
    if image.get("sha256") not in drop.held.allowed or int(image.get("bytes") or 0) > MAX_INPUT_BYTES:
        return [(f"{drop.name!r} (held-open, {drop.held.reach.value}) was painted from bytes nobody checked: "
                 f"sha256 {image.get('sha256')}, {image.get('bytes')} bytes")]
    return []


def _token_name(stem: str, name: str) -> bool:
    """Whether stem is NAME-<8 hex digits> (core.jobs.distinct_names' fallback)."""
    token = stem[len(name) + 1:]
    return stem.startswith(f"{name}-") and len(token) == 8 and all(c in "0123456789abcdef" for c in token)


def _exhausted_problems(drop: Drop, kind: str, path: Path, data: dict[str, Any]) -> list[str]:
    """A job of the exhausted name gets NAME-<its job token> (core.jobs.distinct_names)."""
    if not drop.exhausted:
        return []
    token = job_token(str(data.get("job_id", "")))
    stem = path.stem if kind == "done" else path.parent.name
    if stem != f"{drop.name}-{token}":
        return [f"{drop.name!r} (exhausted) was recorded as {stem!r}, not {drop.name}-{token}"]
    return []


@dataclass
class Report:
    violations: list[str]
    figures: dict[str, Any]


def check(run: Run) -> Report:
    world = run.world
    v: list[str] = []
    v += run.unexpected_exits
    found = outcomes(world)
    good = [d for d in run.drops if d.good]
    lost = duplicated = 0
    codes: dict[str, int] = {}
    by_kind: dict[str, dict[str, int]] = {}
    by_name: dict[str, list[Drop]] = {}
    for drop in run.drops:
        by_name.setdefault(drop.name, []).append(drop)
    for name, drops in by_name.items():
        got = found.get(name, [])
        if len(got) < len(drops):
            lost += len(drops) - len(got)
            v.append(f"{len(drops) - len(got)} of {len(drops)} drops of {name!r} ({drops[0].kind}) have no outcome")
        if len(got) > len(drops):
            duplicated += len(got) - len(drops)
            v.append(f"{len(got)} outcomes for {len(drops)} drops of {name!r} ({drops[0].kind}): "
                     f"{[str(p) for _, p, _ in got]}")
        # A name dropped more than once (the exhausted name) is one outcome per drop: results
        # go with the drops that must succeed, failures with the others.
        pairs = zip(sorted(drops, key=lambda d: not d.good), sorted(got, key=lambda o: o[0] != "done"))
        for drop, (kind, path, data) in pairs:
            v += _held_open_problems(drop, kind, data)
            v += _exhausted_problems(drop, kind, path, data)
            label = "done" if kind == "done" else str(data.get("code"))
            by_kind.setdefault(drop.kind, {}).setdefault(label, 0)
            by_kind[drop.kind][label] += 1
            if kind == "failed":
                code = str(data.get("code"))
                codes[code] = codes.get(code, 0) + 1
                if code == "internal_error":
                    v.append(f"{drop.name!r} ({drop.kind}) failed as internal_error: {data.get('message')}")
                if drop.good:
                    v.append(f"good job {drop.name!r} ({drop.kind}) failed: {code}: {data.get('message')}")
            elif not drop.good and not drop.may_succeed:
                v.append(f"{drop.name!r} ({drop.kind}) was published; it must fail")
    dropped_names = {d.name for d in run.drops}
    for name in set(found) - dropped_names:
        v.append(f"an outcome for {name!r}, which nobody dropped")

    # Every dropped entry is in exactly one record folder, beside its error.json (failed) or as
    # an archived input of a published job.
    archive = world.view(world.archive)
    failed = world.view(world.failed)
    records: dict[str, list[Path]] = {}
    for base in (archive, failed):
        for folder in os.scandir(base):
            if folder.name in world.placeholders:
                continue
            if folder.name.startswith("."):
                v.append(f"staging or temp entry left in {base.name}/: {folder.name}")
                continue
            if not folder.is_dir(follow_symlinks=False):
                v.append(f"a loose file in {base.name}/: {folder.name}")
                continue
            children = os.listdir(folder.path)
            inputs = [c for c in children if c != "error.json"]
            if not inputs:
                v.append(f"record without inputs: {base.name}/{folder.name}")
            if base == failed and "error.json" not in children:
                v.append(f"failed/{folder.name} has no error.json")
            for child in inputs:
                records.setdefault(child, []).append(Path(folder.path))
    expected = Counter(entry for drop in run.drops if drop.kind not in ("good-folder", "good-folder-renamed")
                       for entry in drop.files)  # a folder's contents (image.png ...) are counted by outcome
    for entry, times in expected.items():
        where = records.get(entry, [])
        if len(where) != times:
            v.append(f"input {entry!r} is in {len(where)} records, dropped {times} times: {[str(p) for p in where]}")
        exhausted = [d for d in run.drops if d.exhausted and entry in d.files]
        for path in where if exhausted else []:
            if not _token_name(path.name, exhausted[0].name):
                v.append(f"a record of the exhausted name {exhausted[0].name!r} is {path.name!r}, not NAME-<job token>")
    left = world.placeholders_left() if world.taken else 0
    if left != world.taken:
        v.append(f"only {left} of {world.taken} taken names are still as they were made")
    if run.peak_rss > RSS_BOUND:
        v.append(f"a daemon's peak RSS was {run.peak_rss / 2**30:.2f} GiB (bound {RSS_BOUND / 2**30:.0f} GiB)")

    # No temp file, orphan image or claim anywhere; the inbox holds only junk.
    outbox = world.view(world.outbox)
    names = os.listdir(outbox)
    for n in names:
        if n in world.placeholders:
            continue
        if n.startswith("."):
            v.append(f"temp file in the outbox: {n}")
        elif not n.endswith(".json") and f"{n.rsplit('.', 1)[0]}.json" not in names:
            v.append(f"image without its sidecar in the outbox: {n}")
    for i, daemon in enumerate(world.daemons):
        left = list((daemon.dirs.state / "claimed").glob("*"))
        if left:
            v.append(f"daemon {i} left claims: {[p.name for p in left]}")
    inbox_left = [n for n in os.listdir(world.view(world.inbox)) if n not in JUNK]
    if inbox_left:
        v.append(f"inbox not drained: {inbox_left[:10]}")

    # No record over 1 MiB: sidecars, error.json, status files, log lines.
    biggest = 0
    for kind_list in found.values():
        for _, path, _ in kind_list:
            size = path.stat().st_size
            biggest = max(biggest, size)
            if size > RECORD_LIMIT:
                v.append(f"record over 1 MiB: {path} ({size} bytes)")
    for daemon in world.daemons:
        status = daemon.dirs.state / "status.json"
        if status.exists() and status.stat().st_size > RECORD_LIMIT:
            v.append(f"status.json over 1 MiB: {status.stat().st_size}")
        if daemon.dirs.log.exists():
            with open(daemon.dirs.log, "rb") as handle:
                for line in handle:
                    if len(line) > RECORD_LIMIT:
                        v.append(f"log line over 1 MiB in {daemon.dirs.log.name}: {len(line)} bytes")
                        break
    # No hidden character (terminal escape, C1, bidi) raw in a log line or a status file: names
    # from drops are escaped wherever a person may read them (records keep them JSON-escaped).
    for daemon in world.daemons:
        texts = [daemon.dirs.log] if daemon.dirs.log.exists() else []
        texts += [daemon.dirs.state / "status.json"] if (daemon.dirs.state / "status.json").exists() else []
        for path in texts:
            text = path.read_bytes().decode("utf-8", "surrogateescape")
            raw = sorted({repr(c) for c in text if c not in "\n\t" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")})
            if raw:
                v.append(f"hidden characters raw in {path.name}: {raw[:5]}")
    if run.drained_after is None:
        v.append(f"not drained within {run.profile.drain_bound:g} s after the chaos")

    figures = {
        "seed": run.profile.seed,
        "daemons": len(world.daemons),
        "namespace_faults": run.namespace,
        "drops": len(run.drops),
        "good": len(good),
        "hostile": len(run.drops) - len(good),
        "done": sum(1 for d in good if any(k == "done" for k, _, _ in found.get(d.name, []))),
        "failed_codes": dict(sorted(codes.items())),
        "outcomes_by_kind": {k: dict(sorted(c.items())) for k, c in sorted(by_kind.items())},
        "kills": run.kills,
        "faults": dict(run.faults),
        "lost": lost,
        "duplicated": duplicated,
        "largest_record_bytes": biggest,
        "held_open_writes_after_claim": dict(sorted(run.reached.items())),
        "exhausted_name_drops": sum(1 for d in run.drops if d.exhausted),
        "taken_names_made": world.taken,
        "peak_rss_mib": run.peak_rss >> 20,
        "drained_after_seconds": None if run.drained_after is None else round(run.drained_after, 1),
        "violations": len(v),
    }
    return Report(v, figures)


def main() -> int:  # pragma: no cover - for running one profile by hand
    import argparse
    import tempfile

    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("--long", action="store_true")
    parser.add_argument("--seed", type=int)
    args = parser.parse_args()
    profile = LONG if args.long else FAST
    if args.seed is not None:
        from dataclasses import replace

        profile = replace(profile, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        run = run_chaos(Path(tmp), Path(args.model), profile, log=print)
        report = run.report
        assert report is not None
    print(json.dumps(report.figures, indent=2))
    for line in report.violations:
        print("VIOLATION:", line)
    return 1 if report.violations else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
