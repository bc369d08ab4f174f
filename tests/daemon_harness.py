"""Run the real daemon (`python -m inpaintd run --config FILE`) as a child process and watch it.

Shared by tests/test_hostile_inputs.py, tests/test_faults.py, tests/test_transfers.py and
scripts/soak.py. Nothing here fakes the daemon: it writes a config file, starts the process
exactly as the systemd unit does, drops files into the inbox the way clients do, and reads
what the daemon publishes (outbox sidecars, failed/NAME/error.json, JSON log lines).
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings for the tiny random model: one 64x64 working shape, two steps.
FAST_SETTINGS: dict[str, dict[str, Any]] = {
    "model": {"dtype": "fp32", "threads": 1},
    "inference": {"steps": 2, "scheduler": "euler"},
    "roi": {"min_size": 64, "max_size": 64, "bucket_sides": [64], "padding": 8, "dilate": 2, "feather": 2},
    "watch": {
        "observer": "inotify",
        "settle_seconds": 0.3,
        "poll_interval": 0.2,
        "incomplete_timeout": 600,
        "rescan_interval": 5,
    },
    "limits": {"max_pixels": 4_000_000, "max_prompt_bytes": 4096, "poison_after": 3},
    "output": {"format": "same", "after_success": "archive"},
    "service": {"shutdown_timeout": 10},
    "logging": {"format": "json", "level": "info"},
}


def merged(base: dict[str, dict[str, Any]], overrides: dict[str, dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    out = {section: dict(values) for section, values in base.items()}
    for section, values in (overrides or {}).items():
        out.setdefault(section, {}).update(values)
    return out


@dataclass
class Dirs:
    root: Path
    inbox: Path
    outbox: Path
    failed: Path
    archive: Path
    state: Path
    config: Path
    log: Path

    @classmethod
    def make(cls, root: Path, model: Path, settings: dict[str, dict[str, Any]] | None = None) -> "Dirs":
        root.mkdir(parents=True, exist_ok=True)
        paths = {name: root / name for name in ("inbox", "outbox", "failed", "archive", "state")}
        for path in paths.values():
            path.mkdir(exist_ok=True)
        data = merged(FAST_SETTINGS, settings)
        data["model"] = {**data.get("model", {}), "path": str(model), "cache_dir": str(root / "cache")}
        data["paths"] = {name: str(path) for name, path in paths.items()}
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        return cls(root=root, config=config, log=root / "daemon.log", **paths)

    def rewrite_config(self, settings: dict[str, dict[str, Any]]) -> None:
        data = yaml.safe_load(self.config.read_text(encoding="utf-8"))
        for section, values in settings.items():
            data.setdefault(section, {}).update(values)
        self.config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


class Daemon:
    """One `inpaintd run` child process; its stderr (JSON log lines) goes to dirs.log."""

    def __init__(self, dirs: Dirs, wrapper: Sequence[str] = (), env: dict[str, str] | None = None) -> None:
        self.dirs = dirs
        self.wrapper = list(wrapper)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._log_offset = 0

    # -- lifecycle -------------------------------------------------------------------
    def start(self, wait_ready: bool = True, timeout: float = 120.0) -> "Daemon":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._log_offset = self.dirs.log.stat().st_size if self.dirs.log.exists() else 0
        log = open(self.dirs.log, "ab")
        cmd = [*self.wrapper, sys.executable, "-m", "inpaintd", "run", "--config", str(self.dirs.config)]
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
            cwd=self.dirs.root, start_new_session=True, preexec_fn=_die_with_parent,
        )
        log.close()
        self.starts += 1
        if wait_ready:
            self.wait_ready(timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until the daemon says it accepts work (status file or a log event), or fail with its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"daemon exited with {self.proc.returncode if self.proc else None}:\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.log_tail()}")

    def is_ready(self) -> bool:
        for event in self.events(since_start=True):
            if event.get("event") in READY_EVENTS:
                return True
        status = read_status(self.dirs.state)
        return bool(status) and status.get("pid") == self.pid and str(status.get("state", "")).lower() in READY_STATES

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait; SIGKILL if it does not exit in time (and say so)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
                raise AssertionError(f"daemon ignored SIGTERM for {timeout} s:\n{self.log_tail()}")
        return self.proc.returncode

    # -- observing -------------------------------------------------------------------
    def events(self, since_start: bool = False) -> list[dict[str, Any]]:
        if not self.dirs.log.exists():
            return []
        with open(self.dirs.log, "rb") as handle:
            if since_start:
                handle.seek(self._log_offset)
            data = handle.read()
        out = []
        for line in data.splitlines():
            line = line.strip()
            if line.startswith(b"{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def log_tail(self, lines: int = 40) -> str:
        if not self.dirs.log.exists():
            return "(no log)"
        text = self.dirs.log.read_text(encoding="utf-8", errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def rss_bytes(self) -> int:
        """Resident set of the daemon process now (VmRSS)."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0


READY_EVENTS = {"service.ready"}


def _die_with_parent() -> None:
    """In the child before exec: SIGKILL it if the test process dies first (no orphan daemons)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 - best effort
        pass
READY_STATES = {"ready", "idle", "running", "processing", "working", "busy"}


def read_status(state: Path) -> dict[str, Any]:
    for name in ("status.json", "state.json"):
        path = state / name
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
    return {}


# ---------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    kind: str  # "done" | "failed"
    path: Path  # the sidecar or error.json
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> str | None:
        return self.data.get("code") if self.kind == "failed" else None


def outcomes(dirs: Dirs) -> dict[str, list[Outcome]]:
    """Every published result and failure, keyed by the job name they report."""
    found: dict[str, list[Outcome]] = {}
    for sidecar in sorted(dirs.outbox.glob("*.json")):
        if sidecar.name.startswith("."):
            continue
        data = _load_json(sidecar)
        name = str(data.get("name") or sidecar.stem)
        found.setdefault(name, []).append(Outcome("done", sidecar, data))
    for error in sorted(dirs.failed.glob("*/error.json")):
        data = _load_json(error)
        name = str(data.get("name") or data.get("job") or error.parent.name)
        found.setdefault(name, []).append(Outcome("failed", error, data))
    return found


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return {"_unreadable": str(exc)}
    return data if isinstance(data, dict) else {"_value": data}


def wait_for(
    dirs: Dirs,
    names: Iterable[str],
    timeout: float,
    daemon: Daemon | None = None,
    poll: float = 0.1,
) -> dict[str, list[Outcome]]:
    """Until every name has at least one outcome (or the timeout); returns all outcomes."""
    wanted = set(names)
    deadline = time.monotonic() + timeout
    while True:
        found = outcomes(dirs)
        if wanted <= set(found) or time.monotonic() >= deadline:
            return found
        if daemon is not None and not daemon.alive():
            return found
        time.sleep(poll)


def missing_report(dirs: Dirs, wanted: Iterable[str], found: dict[str, list[Outcome]], daemon: Daemon | None) -> str:
    missing = sorted(set(wanted) - set(found))
    lines = [f"no outcome for {len(missing)} job(s): {missing[:20]}"]
    lines.append(f"inbox: {sorted(p.name for p in dirs.inbox.iterdir())[:40]}" if dirs.inbox.exists() else "inbox: gone")
    lines.append(f"state: {sorted(str(p.relative_to(dirs.state)) for p in dirs.state.rglob('*'))[:40]}")
    if daemon is not None:
        lines.append(f"daemon alive: {daemon.alive()}\n{daemon.log_tail()}")
    return "\n".join(lines)


def stray_files(dirs: Dirs) -> list[str]:
    """Temp or partial files visible in the outbox (a consumer must never see one)."""
    return sorted(p.name for p in dirs.outbox.iterdir() if p.name.startswith(".") or p.suffix in (".tmp", ".part"))


# ---------------------------------------------------------------------------- inputs
def image_bytes(size: tuple[int, int] = (64, 64), fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save: Any) -> bytes:
    rng = np.random.default_rng(seed)
    w, h = size
    if mode in ("RGB", "RGBA", "CMYK"):
        channels = len(mode)
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        img = Image.fromarray(pixels, mode=mode) if mode != "CMYK" else Image.fromarray(pixels[..., :3]).convert("CMYK")
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L")
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    elif mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))
    else:
        raise ValueError(mode)
    out = io.BytesIO()
    img.save(out, format=fmt, **save)
    return out.getvalue()


def mask_bytes(size: tuple[int, int] = (64, 64), box: tuple[int, int, int, int] | None = (20, 20, 40, 40), fill: int | None = None, fmt: str = "PNG") -> bytes:
    w, h = size
    pixels = np.zeros((h, w), dtype=np.uint8)
    if fill is not None:
        pixels[:] = fill
    elif box is not None:
        x0, y0, x1, y1 = box
        pixels[y0:y1, x0:x1] = 255
    out = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(out, format=fmt)
    return out.getvalue()


def put(path: Path, data: bytes, atomic: bool = True) -> Path:
    """Write a file the way a careful client does: temp name, then rename into place."""
    if atomic:
        tmp = path.with_name(f".upload-{os.urandom(6).hex()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        path.write_bytes(data)
    return path


def drop_job(
    inbox: Path,
    name: str,
    *,
    size: tuple[int, int] = (64, 64),
    prompt: str | None = "a small red house",
    fmt: str = "png",
    seed: int = 0,
) -> list[Path]:
    """A good job: image, mask and prompt, each renamed into place."""
    pil_fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}[fmt]
    w, h = size
    box = (w // 3, h // 3, 2 * w // 3, 2 * h // 3)
    files = [
        put(inbox / f"{name}.{fmt}", image_bytes(size, pil_fmt, seed=seed)),
        put(inbox / f"{name}.mask.png", mask_bytes(size, box)),
    ]
    if prompt is not None:
        files.append(put(inbox / f"{name}.txt", prompt.encode()))
    return files


def job_bytes(name: str, size: tuple[int, int] = (64, 64), seed: int = 0) -> dict[str, bytes]:
    """The three files of a good job as {filename: bytes}, for uploading by other clients."""
    w, h = size
    box = (w // 3, h // 3, 2 * w // 3, 2 * h // 3)
    return {
        f"{name}.png": image_bytes(size, "PNG", seed=seed),
        f"{name}.mask.png": mask_bytes(size, box),
        f"{name}.txt": b"a small red house",
    }


def tree_snapshot(root: Path, skip: Iterable[Path] = ()) -> set[str]:
    """Every path under root (not following links), to show nothing was written outside."""
    skip_set = {str(p) for p in skip}
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if any(dirpath == s or dirpath.startswith(s + os.sep) for s in skip_set):
            dirnames[:] = []
            continue
        for name in dirnames + filenames:
            out.add(os.path.join(dirpath, name))
    return out


# ---------------------------------------------------------------------------- inotify probe
class AccessWatch:
    """Records whether anyone opens or reads given paths (inotify IN_OPEN / IN_ACCESS on the inode).

    Watches follow the inode, so a hard link's other name and a symlink's target are covered
    whichever name the daemon would use.
    """

    IN_ACCESS = 0x00000001
    IN_OPEN = 0x00000020

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.paths: dict[int, str] = {}
        self.hits: dict[str, set[str]] = {}

    def add(self, path: Path) -> None:
        import ctypes

        # IN_DONT_FOLLOW (0x02000000): watch the link itself when path is one.
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN | self.IN_ACCESS | 0x02000000)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")
        self.paths[wd] = str(path)

    def poll(self) -> dict[str, set[str]]:
        import struct

        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                what = self.hits.setdefault(self.paths.get(wd, f"wd{wd}"), set())
                if mask & self.IN_OPEN:
                    what.add("open")
                if mask & self.IN_ACCESS:
                    what.add("read")
        return self.hits

    def close(self) -> None:
        os.close(self.fd)


class DirWatch:
    """Names created in (or renamed into) a directory, as inotify reports them: for killing the
    daemon at an exact moment, e.g. right after it published an image and before its sidecar."""

    IN_MOVED_TO = 0x00000080
    IN_CREATE = 0x00000100

    def __init__(self, directory: Path) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(directory), self.IN_CREATE | self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), f"inotify on {directory}")

    def wait_for(self, predicate, timeout: float) -> str | None:
        """Block until a created name satisfies predicate; returns it, or None at the timeout."""
        import select
        import struct

        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if not ready:
                return None
            data = os.read(self.fd, 65536)
            offset = 0
            while offset < len(data):
                _wd, _mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                name = data[offset + 16 : offset + 16 + length].rstrip(b"\0").decode("utf-8", "surrogateescape")
                offset += 16 + length
                if predicate(name):
                    return name

    def close(self) -> None:
        os.close(self.fd)
