"""Several devices on one shared folder: who is alive, by the file server's clock, and take-over.

With `fleet.enabled`, `paths.state` is a folder on the share and each device keeps its own state
in `paths.state/<device id>/` (claims are renames, and a rename cannot cross filesystems, so the
state must be on the share with the inbox). The file server is the only arbiter:

- **Claims.** A job is a device's when its rename into `<id>/claimed/` succeeded (spool); the
  server lets exactly one rename of a file win.
- **Heartbeats.** Every `fleet.heartbeat_seconds` a device rewrites `<id>/heartbeat`; the server
  sets its mtime. Ages are differences of server-set mtimes (our own fresh heartbeat's mtime
  stands for the server's "now"), so no device's clock matters.
- **Take-over.** A device whose heartbeat is older than `fleet.lease_seconds` is presumed dead;
  a live device renames each of its claim folders into its own `claimed/` (one rename wins, so
  each job is taken once) and queues it, in whatever state it was left: a half-published job
  is settled from its recorded names (spool/outbox), never painted twice.
- **Coming back.** A device only publishes, archives or fails a job while its own lease is fresh
  (a heartbeat written less than half a lease ago) and the job's claim folder is still where it
  put it. A device cut off or frozen past its lease finds its claims gone and drops its work on
  them without writing anything.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import structlog

log = structlog.get_logger("inpaintd.fleet")

HEARTBEAT = "heartbeat"
_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]")


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


def stale_devices(my_beat_mtime: float, beats: dict[str, float | None], lease: float) -> list[str]:
    """Devices whose last heartbeat is more than `lease` older than ours (all times the server's)."""
    return sorted(d for d, mtime in beats.items() if mtime is not None and my_beat_mtime - mtime > lease)


class Fleet:
    """This device's heartbeat and its view of the others, under the shared state root."""

    def __init__(self, root: Path, me: str, lease_seconds: float, heartbeat_seconds: float,
                 clock: Any = time.monotonic) -> None:
        self.root = Path(root)
        self.me = me
        self.lease = lease_seconds
        self.every = heartbeat_seconds
        self.token = secrets.token_hex(8)
        self.host = socket.gethostname()
        self._clock = clock
        self.fresh_at: float | None = None  # our clock when our last heartbeat was written
        self.last_mtime: float | None = None  # its mtime as the server set it

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
        """Write our heartbeat; the server's mtime of it (raises OSError when the share is away)."""
        self.my_dir.mkdir(parents=True, exist_ok=True)
        path = self.my_dir / HEARTBEAT
        payload = json.dumps({"device": self.me, "host": self.host, "pid": os.getpid(), "token": self.token}).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
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
                beats[entry.name] = os.stat(Path(entry.path) / HEARTBEAT).st_mtime
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

    def dead_peers(self) -> list[str]:
        if self.last_mtime is None:
            return []
        beats = {d: m for d, m in self._mtimes().items() if d != self.me}
        return stale_devices(self.last_mtime, beats, self.lease)

    def take_claims(self, dead: str) -> list[Path]:
        """Rename each claim folder of a dead device into ours; the folders we won."""
        source = self.root / dead / "claimed"
        target = self.my_dir / "claimed"
        won: list[Path] = []
        try:
            names = sorted(os.listdir(source))
        except OSError:
            return won
        for name in names:
            if name.startswith("."):
                continue
            try:
                os.rename(source / name, target / name)
            except FileNotFoundError:
                continue  # another device took it first
            except OSError as exc:
                if (target / name).is_dir() and not (source / name).exists():
                    won.append(target / name)  # the rename happened; the reply was lost
                else:
                    log.warning("fleet.take_failed", device=dead, claim=name, error=str(exc))
                continue
            won.append(target / name)
        return won


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes()[:1_000_000])
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


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

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        away = False
        while not self.stop_event.wait(self.fleet.every):
            try:
                self.fleet.beat()
            except OSError as exc:
                if not away:
                    log.warning("fleet.share_unreachable", device=self.fleet.me, error=str(exc),
                                note="nothing is published, archived or failed until the share answers")
                away = True
                continue
            try:
                if away:
                    away = False
                    self.clean_due = True  # temp files a write cut off left: the worker removes them
                    log.info("fleet.share_back", device=self.fleet.me)
                    for claim in self.spool.recover_claiming(self.inbox):
                        self.put(claim)
                for dead in self.fleet.dead_peers():
                    for path in self.fleet.take_claims(dead):
                        claim = self.spool.adopt(path, self.inbox)
                        if claim is not None:
                            log.warning("fleet.took_over", from_device=dead, job=claim.name, job_id=claim.job_id,
                                        state=claim.state)
                            self.put(claim)
            except Exception:  # noqa: BLE001 - the next beat tries again
                log.exception("fleet.take_over_failed")
