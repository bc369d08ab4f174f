"""Several devices on one shared folder: who is alive (a beat counter, by our own clock), and take-over.

With `fleet.enabled`, `paths.state` is a folder on the share and each device keeps its own state
in `paths.state/<device id>/` (claims are renames, and a rename cannot cross filesystems, so the
state must be on the share with the inbox). The file server is the only arbiter:

- **Claims.** A job is a device's when its rename into `<id>/claimed/` succeeded (spool); the
  server lets exactly one rename of a file win.
- **The share.** `inpaintd init-share` writes `.inpaintd-share` in the share's root; a device
  works only while it is there (checked at start, where the daemon waits for it, and before every
  heartbeat), so an empty mount point is never mistaken for the share, and nothing (no folder,
  no heartbeat) is ever created on the local disk under it.
- **Heartbeats.** Every `fleet.heartbeat_seconds` a device rewrites `<id>/heartbeat`: a file of
  fixed length with a counter that changes at every beat. The others read the counter through a
  fresh open and presume a device dead once they have watched it not change for
  `fleet.lease_seconds` by their own monotonic clock (`watch_beats`): no device's clock and no
  attribute a client may cache (sshfs ~20 s, NFS actimeo) is trusted. The server-set mtimes are
  only shown by `inpaintd status`.
- **Take-over.** A live device renames each claim folder of a dead one into its own `claimed/`
  (one rename wins, so each job is taken once) and queues it, in whatever state it was left: a
  half-published job goes on from what its claim records (store/outbox.py), never painted twice.
- **Fencing.** Every step that changes the shared outbox, failed/ or archive/ starts from inside
  the claim folder by its path (outbox.py, records.py); once a take-over renamed the folder away,
  the old owner's next step fails and it drops the job (`job.taken_over`). The lease check (a
  heartbeat written less than half a lease ago) comes on top, to stop early; correctness does
  not rest on it, nor on any clock.

What a user must not do: give two devices one id (their heartbeats would look alive for each
other: `beat` refuses to start a device whose id is beating from another host), or put one
device's state off the share.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import stat as stat_mod
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

from ..core.quoting import for_display
from .fsutil import atomic_write_bytes, read_bounded

log = structlog.get_logger("inpaintd.fleet")

HEARTBEAT = "heartbeat"
BEAT_BYTES = 512  # the heartbeat's fixed length
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


SHARE_MARKER = ".inpaintd-share"
SHARE_SCHEMA = "inpaintd.share/1"
SHARE_FOLDERS = ("inbox", "outbox", "failed", "archive", "state")


class ShareMissing(OSError):
    """The share's marker is not there: the share is not mounted (an empty mount point)."""


def share_root(configured: str, paths: list[Path]) -> Path:
    """The share's root: fleet.share, else the deepest folder holding every configured path."""
    if configured.strip():
        return Path(configured)
    return Path(os.path.commonpath([os.path.abspath(p) for p in paths]))


def share_present(root: Path) -> bool:
    """Whether root is the share (its marker is there), not an empty mount point under it."""
    record = _read_json(root / SHARE_MARKER)
    return record.get("schema") == SHARE_SCHEMA


def _check_share(root: Path) -> None:
    """Raise ShareMissing when the marker is not there (an empty mount point), the OSError
    itself when it cannot be read (the share is mounted but does not answer)."""
    marker = root / SHARE_MARKER
    try:
        record = json.loads(read_bounded(marker, 100_000))
    except FileNotFoundError:
        record = None
    except (ValueError, RecursionError):
        record = None
    if not isinstance(record, dict) or record.get("schema") != SHARE_SCHEMA:
        raise ShareMissing(2, f"{marker} is missing: the share is not mounted "
                              "(or was never set up with `inpaintd init-share`)", str(root))


def init_share(root: Path) -> tuple[Path, bool]:
    """`inpaintd init-share`: the five folders and the marker in an existing, mounted root;
    (marker path, whether it was made now). Run again, it keeps the marker and adds what is missing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(2, "no such folder (is the share mounted?)", str(root))
    for name in SHARE_FOLDERS:
        (root / name).mkdir(exist_ok=True)
    marker = root / SHARE_MARKER
    if share_present(root):
        return marker, False
    record = {"schema": SHARE_SCHEMA, "share_id": secrets.token_hex(8), "created_by": socket.gethostname(),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "note": "inpaintd devices in fleet mode work here only while this file is there"}
    atomic_write_bytes(marker, (json.dumps(record, indent=2) + "\n").encode())
    return marker, True


def device_id(configured: str, machine_id_file: Path = Path("/etc/machine-id")) -> str:
    """The configured id, else the first 12 characters of the machine id, else the host name."""
    if configured.strip():
        return _clean(configured)
    try:
        machine = machine_id_file.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        machine = ""
    return _clean(machine[:12] or socket.gethostname())


def _clean(text: str) -> str:
    cleaned = _ID_CHARS.sub("-", text.strip())[:64].strip(".-")
    return cleaned or "device"


@dataclass(frozen=True)
class Peer:
    """Another device as the share shows it."""

    device: str
    age: float | None  # seconds since its last heartbeat, by the server's clock; None: never beat
    status: dict[str, Any]

    def dead(self, lease: float) -> bool:
        return self.age is not None and self.age > lease


def watch_beats(seen: dict[str, tuple[str, float]], values: dict[str, str | None], now: float,
                last_look: float | None, lease: float) -> dict[str, tuple[str, float]]:
    """Each device's (beat value, when we saw it change), after one look at their heartbeats.

    A device whose value changed (or that we see for the first time) starts a new watch now;
    an unreadable heartbeat keeps the old watch. When our own last look is more than half a
    lease ago (we were frozen or starved ourselves), every watch starts again: silence we did
    not watch proves nothing.
    """
    if last_look is not None and now - last_look > lease / 2:
        seen = {}
    out: dict[str, tuple[str, float]] = {}
    for device, value in values.items():
        old = seen.get(device)
        if value is None:
            if old is not None:
                out[device] = old
        elif old is None or old[0] != value:
            out[device] = (value, now)
        else:
            out[device] = old
    return out


def _beat_value(path: Path) -> str | None:
    """The token and counter inside a heartbeat, read through a fresh open; None if unreadable.

    A forged device folder (issue 22) may hold a FIFO there: a plain open would block the
    keeper for ever, and with it this device's own heartbeat (every job then held as
    share_unreachable); a link would be read through. Neither is a heartbeat."""
    try:
        record = json.loads(read_bounded(path, BEAT_BYTES).rstrip(b" \0") or b"{}")
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(record, dict) or "beat" not in record:
        return None
    return f"{record.get('token')}:{record.get('beat')}"


def stale_devices(my_beat_mtime: float, beats: dict[str, float | None], lease: float) -> list[str]:
    """Devices whose last heartbeat is more than `lease` older than ours (all times the server's)."""
    return sorted(d for d, mtime in beats.items() if mtime is not None and my_beat_mtime - mtime > lease)


class Fleet:
    """This device's heartbeat and its view of the others, under the shared state root."""

    def __init__(self, root: Path, me: str, lease_seconds: float, heartbeat_seconds: float,
                 clock: Any = time.monotonic, share: Path | None = None) -> None:
        self.root = Path(root)
        self.share = share  # the share's root, whose marker must be there at every beat
        self.me = me
        self.lease = lease_seconds
        self.every = heartbeat_seconds
        self.token = secrets.token_hex(8)
        self.host = socket.gethostname()
        self._clock = clock
        self.fresh_at: float | None = None  # our clock when our last heartbeat was written
        self.last_mtime: float | None = None  # its mtime as the server set it
        self.count = 0  # our beat counter (in the file)
        self._seen: dict[str, tuple[str, float]] = {}  # device -> (its beat value, our clock when it changed)
        self._last_look: float | None = None
        self._refused: set[tuple[str, str]] = set()  # (device, claim) refused already: logged once

    @property
    def my_dir(self) -> Path:
        return self.root / self.me

    def check_unique(self) -> None:
        """Refuse to start while another host beats under this id (two devices, one id)."""
        record = _read_json(self.my_dir / HEARTBEAT)
        if not record or record.get("host") == self.host:
            return
        beats = self._mtimes()
        mine = beats.get(self.me)
        newest = max((m for m in beats.values() if m is not None), default=None)
        if mine is not None and newest is not None and newest - mine <= self.lease:
            raise RuntimeError(
                f"device id {self.me!r} is in use by {record.get('host')!r} (its heartbeat is fresh); "
                "give each device its own fleet.device_id"
            )

    def beat(self) -> float:
        """Write our heartbeat; the server's mtime of it (raises OSError when the share is away).

        The file has a fixed length and carries a counter that changes at every beat: readers
        judge liveness by seeing the counter change (`observe`), which needs no clock and no
        attribute the client may cache; the length never changes, so a client that caches
        the size cannot cut the read short.
        """
        if self.share is not None:
            _check_share(self.share)
        path = self.my_dir / HEARTBEAT
        if not self.my_dir.is_dir():
            self.my_dir.mkdir()  # never with parents: a share that is not mounted is not created
        self.count += 1
        payload = json.dumps({"device": self.me, "host": self.host, "pid": os.getpid(), "token": self.token,
                              "beat": self.count}).encode()
        tmp = self.my_dir / f".{HEARTBEAT}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload.ljust(BEAT_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        mtime = os.stat(path).st_mtime
        was_fresh = self.lease_fresh()
        self.fresh_at, self.last_mtime = self._clock(), mtime
        if not was_fresh and self.fresh_at is not None:
            log.info("fleet.heartbeat", device=self.me, note="beating")
        return mtime

    def lease_fresh(self) -> bool:
        """Whether our last heartbeat is recent enough that nobody may have taken our claims."""
        return self.fresh_at is not None and self._clock() - self.fresh_at < self.lease / 2

    def _mtimes(self) -> dict[str, float | None]:
        beats: dict[str, float | None] = {}
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return beats
        for entry in entries:
            if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                beats[entry.name] = os.lstat(Path(entry.path) / HEARTBEAT).st_mtime
            except OSError:
                beats[entry.name] = None
        return beats

    def peers(self) -> list[Peer]:
        """Every device under the root (this one too), with its heartbeat age and its status."""
        beats = self._mtimes()
        now = self.last_mtime if self.last_mtime is not None else max((m for m in beats.values() if m), default=None)
        out = []
        for device, mtime in sorted(beats.items()):
            age = None if mtime is None or now is None else max(0.0, now - mtime)
            out.append(Peer(device, age, _read_json(self.root / device / "status.json")))
        return out

    def observe(self) -> dict[str, float]:
        """Each other device's silence: seconds, by our own clock, since we last saw its beat
        counter change. The counter is read from inside the file through a fresh open, so a
        client's attribute cache (sshfs ~20 s by default, NFS actimeo) cannot make a live
        device look dead. A device is only judged after we watched it for a lease ourselves."""
        now = self._clock()
        values = {d: _beat_value(self.root / d / HEARTBEAT) for d in self._devices() if d != self.me}
        self._seen = watch_beats(self._seen, values, now, self._last_look, self.lease)
        self._last_look = now
        return {d: now - since for d, (_value, since) in self._seen.items()}

    def dead_peers(self) -> list[str]:
        if not self.lease_fresh():
            return []  # we may be the one cut off or frozen: judge nobody
        return sorted(d for d, silence in self.observe().items() if silence > self.lease)

    def _devices(self) -> list[str]:
        try:
            return sorted(e.name for e in os.scandir(self.root)
                          if not e.name.startswith(".") and e.is_dir(follow_symlinks=False))
        except OSError:
            return []

    def take_claims(self, dead: str, problem: Callable[[Path], str | None] = lambda path: None) -> list[Path]:
        """Rename each claim folder of a dead device into ours; the folders we won.

        The share's state/ is as untrusted as the inbox (issue 22: a forged device folder). The
        device's folder and its claimed/ are opened without following links and the renames
        start from that open folder, so a claimed/ linked outside the share is never listed nor
        emptied; only real folders are taken, and only those `problem` (the spool's check of
        the record, which changes nothing) finds sound. A refused claim is logged once
        (fleet.claim_refused) and left where it is: it was never this fleet's.
        """
        source = self.root / dead / "claimed"
        target = self.my_dir / "claimed"
        won: list[Path] = []
        try:
            folder = _open_folder(self.root, (dead, "claimed"))
        except FileNotFoundError:
            return won
        except OSError as exc:
            self._refuse(dead, "claimed", f"not a folder ({exc.strerror or exc})")
            return won
        try:
            names = sorted(os.listdir(folder))
            for name in names:
                if name.startswith(".") or (dead, name) in self._refused:
                    continue
                try:
                    mode = os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode
                except FileNotFoundError:
                    continue
                why = "not a folder (a link or a file)" if not stat_mod.S_ISDIR(mode) else problem(source / name)
                if why is not None:
                    self._refuse(dead, name, why)
                    continue
                try:
                    os.rename(name, target / name, src_dir_fd=folder)
                except FileNotFoundError:
                    continue  # another device took it first
                except OSError as exc:
                    if (target / name).is_dir() and not (source / name).exists():
                        won.append(target / name)  # the rename happened; the reply was lost
                    else:
                        log.warning("fleet.take_failed", device=dead, claim=name, error=str(exc))
                    continue
                won.append(target / name)
        finally:
            os.close(folder)
        return won

    def _refuse(self, device: str, claim: str, why: str) -> None:
        if (device, claim) in self._refused:
            return
        self._refused.add((device, claim))
        log.warning("fleet.claim_refused", device=for_display(device), claim=for_display(claim), reason=for_display(why),
                    note="not a claim this fleet made (forged, or broken); left where it is, never taken over")


def _read_json(path: Path) -> dict[str, Any]:
    """A small JSON record another device wrote (its status.json, a heartbeat): {} when it is
    unreadable, not a regular file (a FIFO would block `inpaintd status` and the metrics),
    a link, or over 1 MB."""
    try:
        data = json.loads(read_bounded(path, 1_000_000))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) else {}


def _open_folder(root: Path, parts: tuple[str, ...]) -> int:
    """A descriptor of root/parts[0]/parts[1]..., each part opened without following a link
    (ELOOP or ENOTDIR when one is a link or not a folder)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for part in parts:
        try:
            fd_next = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        finally:
            os.close(fd)
        fd = fd_next
    return fd


class Keeper(threading.Thread):
    """Beats this device's heartbeat and takes over the claims of devices presumed dead.

    A thread of its own, so a long job never makes a live device look dead. `put` hands a taken
    or recovered claim to the worker's queue.
    """

    def __init__(self, fleet: Fleet, spool: Any, inbox: Path, put: Callable[[Any], None]) -> None:
        super().__init__(name="inpaintd-fleet", daemon=True)
        self.fleet = fleet
        self.spool = spool
        self.inbox = inbox
        self.put = put
        self.stop_event = threading.Event()
        self.clean_due = False
        self.away: str | None = None  # why the share is away now (for the status), None while it answers

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        away = False
        while not self.stop_event.wait(self.fleet.every):
            try:
                self.fleet.beat()
            except OSError as exc:
                if not away:
                    event = "fleet.share_missing" if isinstance(exc, ShareMissing) else "fleet.share_unreachable"
                    log.warning(event, device=self.fleet.me, error=str(exc),
                                note="nothing is published, archived or failed until the share answers")
                away = True
                self.away = str(exc)
                continue
            try:
                if away:
                    away = False
                    self.away = None
                    self.clean_due = True  # temp files a write cut off left: the worker removes them
                    log.info("fleet.share_back", device=self.fleet.me)
                    for claim in self.spool.recover_claiming(self.inbox):
                        self.put(claim)
                for dead in self.fleet.dead_peers():
                    for path in self.fleet.take_claims(dead, self.spool.claim_problem):
                        claim = self.spool.adopt(path, self.inbox)
                        if claim is not None:
                            log.warning("fleet.took_over", from_device=dead, job=claim.name, job_id=claim.job_id,
                                        state=claim.state)
                            self.put(claim)
            except Exception:  # noqa: BLE001 - the next beat tries again
                log.exception("fleet.take_over_failed")
