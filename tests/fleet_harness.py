"""Several devices on one real network filesystem on loopback, for tests/test_fleet.py and scripts/soak.py.

A private sshd on 127.0.0.1 serves one "NAS" folder; `sshfs` mounts it once per simulated device
and once for the client that drops files, so each daemon is a separate client of a real network
filesystem (its own caches, its own connection; no inotify across clients: the daemons poll).
Each daemon runs with `fleet.enabled`, its own device id and a short lease. Outcomes are read on
the server side, in the NAS folder itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

from daemon_harness import FAST_SETTINGS, Daemon, Dirs, merged
from inpaintd.store.pausepoints import PAUSE_FILE_VARIABLE, PausePoint
from transfer_servers import SshServer

LEASE = 4.0
# A device frozen for p seconds is silent for up to p + one heartbeat interval (its last beat may
# have been just before the freeze): the heartbeat is an eighth of the lease, so a pause of 0.8
# leases (3.2 s + 0.5 s) still leaves a live device inside its lease.
HEARTBEAT = 0.5
FLEET_SETTINGS = {
    "watch": {"observer": "polling", "settle_seconds": 0.5, "poll_interval": 0.3, "rescan_interval": 2,
              "incomplete_timeout": 30},
    "fleet": {"enabled": True, "lease_seconds": LEASE, "heartbeat_seconds": HEARTBEAT},
}


def unavailable() -> str | None:
    reason = SshServer.unavailable()
    if reason:
        return reason
    if shutil.which("sshfs") is None or shutil.which("fusermount3") is None:
        return "sshfs is not installed (scripts/setup-transfer-test-deps.sh installs it as root)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if os.geteuid() != 0:
        return "sshfs mounts here need root"
    return None


# The sshfs options the README recommends for a share (attribute and directory caches off), and
# sshfs's defaults (attributes and listings cached ~20 s) as a new user would mount it.
RECOMMENDED = ["cache=no", "ServerAliveInterval=2"]
DEFAULTS: list[str] = []


class Nas:
    """One shared folder served over SFTP, mounted once per client with sshfs."""

    def __init__(self, root: Path, options: list[str] | None = None) -> None:
        from inpaintd.store.fleet import init_share

        self.root = root
        self.options = RECOMMENDED if options is None else options
        self.server = SshServer(root / "sshd").start()
        self.share = root / "nas"
        self.share.mkdir()
        init_share(self.share)  # the five folders and the marker, as `inpaintd init-share` makes them
        self.mounts: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}

    def mount(self, name: str) -> Path:
        point = self.root / f"mnt-{name}"
        point.mkdir(exist_ok=True)
        options = ",".join([
            f"IdentityFile={self.server.key}", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
            "BatchMode=yes", f"port={self.server.port}", *self.options,
        ])
        proc = subprocess.Popen(["sshfs", "-f", "-o", options, f"{self.server.user}@127.0.0.1:{self.share}", str(point)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not _mounted(point):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sshfs mount of {point} failed")
            time.sleep(0.1)
        self.mounts[name] = (point, proc)
        return point

    def cut(self, name: str) -> None:
        """Kill the client's sshfs process: its mount stops answering (ENOTCONN), like a lost link."""
        point, proc = self.mounts[name]
        proc.kill()
        proc.wait(timeout=10)

    def reconnect(self, name: str) -> Path:
        point, _ = self.mounts[name]
        subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)
        return self.mount(name)

    def close(self) -> None:
        for point, proc in self.mounts.values():
            subprocess.run(["fusermount3", "-u", "-z", str(point)], capture_output=True)
            if proc.poll() is None:
                proc.kill()
        self.server.stop()


def _mounted(point: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(point) for line in mounts)


class Fleet:
    def __init__(self, root: Path, model: Path, devices: int, options: list[str] | None = None,
                 settings: dict | None = None, start: bool = True) -> None:
        self.nas = Nas(root, options)
        self.client = self.nas.mount("client")
        self.daemons: dict[str, Daemon] = {}
        for index in range(devices):
            device = f"dev{index}"
            point = self.nas.mount(device)
            data = merged(merged(FAST_SETTINGS, FLEET_SETTINGS), settings or {})
            data["fleet"] = {**data["fleet"], "device_id": device}
            dirs = Dirs.make(root / f"local-{device}", model, data)
            dirs.rewrite_config({"paths": {k: str(point / k) for k in ("inbox", "outbox", "failed", "archive",
                                                                         "state")},
                                 "fleet": data["fleet"]})
            # The device freezes itself at a named point of a job when this file names it
            # (store/pausepoints.py): a pause lands exactly where it was asked.
            self.daemons[device] = Daemon(dirs, env={PAUSE_FILE_VARIABLE: str(dirs.root / "pause-at")})
        if start:
            for daemon in self.daemons.values():
                daemon.start(timeout=180)

    def outcomes(self) -> dict[str, list[tuple[str, dict]]]:
        found: dict[str, list[tuple[str, dict]]] = {}
        for path in (self.nas.share / "outbox").glob("*.json"):
            data = json.loads(path.read_text())
            found.setdefault(data["name"], []).append(("done", data))
        for path in (self.nas.share / "failed").glob("*/error.json"):
            data = json.loads(path.read_text())
            found.setdefault(data["job"], []).append((data["code"], data))
        return found

    def wait(self, names: list[str], timeout: float) -> dict[str, list[tuple[str, dict]]]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.outcomes()
            if set(names) <= set(found) or time.monotonic() > deadline:
                return found
            time.sleep(0.5)

    def claims(self, device: str) -> list[str]:
        folder = self.nas.share / "state" / device / "claimed"
        return sorted(os.listdir(folder)) if folder.exists() else []

    def claim_state(self, device: str, job_id: str) -> str | None:
        try:
            return json.loads((self.nas.share / "state" / device / "claimed" / job_id / "job.json").read_text())["state"]
        except (OSError, ValueError, KeyError):
            return None

    def close(self) -> None:
        for daemon in self.daemons.values():
            if daemon.alive():
                daemon.kill9()
        self.nas.close()


def mount_alive(fleet: Fleet, name: str) -> bool:
    """Whether a client's sshfs process still runs (False after Nas.cut until reconnect)."""
    _, proc = fleet.nas.mounts[name]
    return proc.poll() is None


# ---------------------------------------------------------------------------- pausing devices (issue 19)

POINTS = tuple(point.value for point in PausePoint)


def claim_point(share: Path, device: str) -> str:
    """Where a (stopped) device is in its jobs, from its claims on the server (for a pause that
    could not land at its point)."""
    folder = share / "state" / device / "claimed"
    best = "between jobs"
    for job in sorted(os.listdir(folder)) if folder.exists() else []:
        try:
            record = json.loads((folder / job / "job.json").read_text())
        except (OSError, ValueError):
            continue
        state, publishing = record.get("state"), record.get("publishing") or {}
        if state == "published":
            return "published (archiving or after the sidecar)"
        if state == "publishing":
            return "between image and sidecar" if publishing.get("linked") else "publishing, before the image"
        if state == "claimed" and record.get("attempts", 0) >= 1:
            best = "painting"
    return best


def _stopped(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def stop_at(fleet: "Fleet", device: str, want: str, timeout: float = 20.0) -> str:
    """Freeze a device at the point `want` of its next job: it stops itself there (SIGSTOP,
    store/pausepoints.py). When no job reaches the point in time, SIGSTOP from outside wherever it
    is. The point where it actually stopped."""
    daemon = fleet.daemons[device]
    request = daemon.dirs.root / "pause-at"
    temp = request.with_name(".pause-at.tmp")
    temp.write_text(want)
    temp.rename(request)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _stopped(daemon.pid):
            return want
        time.sleep(0.005)
    request.unlink(missing_ok=True)
    if _stopped(daemon.pid):
        return want  # it got there as the request was withdrawn
    os.kill(daemon.pid, 19)  # SIGSTOP
    return f"{claim_point(fleet.nas.share, device)} (wanted {want}: no job reached it in {timeout:g} s)"


def pause_run(fleet: "Fleet", plan: list[tuple[str, str, float]], prefix: str, lease: float,
              timeout: float = 300.0, every: float = 0.25) -> dict:
    """Pause devices as planned ((device, point wanted, pause in leases) each) while a client
    drops a job every `every` seconds (so that every device always has work); then the figures
    and every violation of the invariants."""
    import signal as _signal
    import threading

    from daemon_harness import drop_job

    names: list[str] = []
    done = threading.Event()

    def feed() -> None:
        while not done.is_set():
            name = f"{prefix}{len(names):04d}"
            drop_job(fleet.client / "inbox", name, size=(128, 128))
            names.append(name)
            done.wait(every)

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    landed: list[tuple[str, str, float]] = []
    try:
        time.sleep(2.0)
        for device, want, leases in plan:
            point = stop_at(fleet, device, want, timeout=30.0)  # sshfs defaults list the inbox ~20 s late
            time.sleep(leases * lease)
            os.kill(fleet.daemons[device].pid, _signal.SIGCONT)
            landed.append((device, point, leases))
            time.sleep(0.3)
    finally:
        done.set()
        feeder.join()
    found = fleet.wait(names, timeout)
    deadline = time.monotonic() + 3 * lease  # let every claim settle (archives, take-overs)
    while time.monotonic() < deadline and any(fleet.claims(d) for d in fleet.daemons):
        time.sleep(0.3)
    found = fleet.outcomes()
    return {"landed": landed, **verdict(fleet, found, names, plan, lease)}


def verdict(fleet: "Fleet", found: dict, names: list[str], plan: list[tuple[str, str, float]], lease: float) -> dict:
    outbox = fleet.nas.share / "outbox"
    lost = sorted(set(names) - set(found))
    duplicated = sorted(n for n in names if len(found.get(n, [])) > 1)
    failed = sorted(n for n in names if found.get(n) and found[n][0][0] != "done")
    referenced = set()
    without_image = []
    for path in outbox.glob("*.json"):
        data = json.loads(path.read_text())
        referenced.add(data["output_file"])
        if not (outbox / data["output_file"]).is_file():
            without_image.append(path.name)
    orphans = sorted(p.name for p in outbox.iterdir() if not p.name.startswith(".") and p.suffix != ".json"
                     and p.name not in referenced)
    # A device was live through its pause when its longest possible silence stayed inside the
    # lease; a take-over of any other device is the lease doing its job, not a defect.
    long_paused = {d for d, _w, leases in plan if leases * lease + HEARTBEAT >= lease}
    took = [(d, e.get("from_device")) for d, daemon in fleet.daemons.items() for e in daemon.events()
            if e.get("event") == "fleet.took_over"]
    live_taken = [t for t in took if t[1] not in long_paused]
    foreign_removed = [e for daemon in fleet.daemons.values() for e in daemon.events()
                       if e.get("event") == "outbox.foreign_image_kept"]
    return {"jobs": len(names), "lost": lost, "duplicated": duplicated, "failed": failed,
            "sidecars_without_image": without_image, "orphan_images": orphans, "take_overs": len(took),
            "take_overs_of_live_devices": live_taken, "foreign_files_taken": foreign_removed}
