"""Several devices on one shared folder (issue 13), on a real network filesystem on loopback.

A private sshd on 127.0.0.1 serves one "NAS" folder; `sshfs` mounts it once per simulated device
and once for the client that drops files, so each daemon is a separate client of a real network
filesystem (its own caches, its own connection; no inotify across clients: the daemons poll).
Three daemons run with `fleet.enabled`, each with its own device id and a short lease.
Outcomes are read on the server side, in the NAS folder itself.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import Daemon, Dirs, drop_job, merged, FAST_SETTINGS
from transfer_servers import SshServer

pytestmark = pytest.mark.slow

LEASE = 4.0
FLEET_SETTINGS = {
    "watch": {"observer": "polling", "settle_seconds": 0.5, "poll_interval": 0.3, "rescan_interval": 2,
              "incomplete_timeout": 30},
    "fleet": {"enabled": True, "lease_seconds": LEASE, "heartbeat_seconds": 1.0},
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


class Nas:
    """One shared folder served over SFTP, mounted once per client with sshfs."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.server = SshServer(root / "sshd").start()
        self.share = root / "nas"
        self.share.mkdir()
        for name in ("inbox", "outbox", "failed", "archive", "state"):
            (self.share / name).mkdir()
        self.mounts: dict[str, tuple[Path, subprocess.Popen[bytes]]] = {}

    def mount(self, name: str) -> Path:
        point = self.root / f"mnt-{name}"
        point.mkdir(exist_ok=True)
        options = ",".join([
            f"IdentityFile={self.server.key}", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null",
            "BatchMode=yes", f"port={self.server.port}", "dir_cache=no", "ServerAliveInterval=2",
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
    def __init__(self, root: Path, model: Path, devices: int) -> None:
        self.nas = Nas(root)
        self.client = self.nas.mount("client")
        self.daemons: dict[str, Daemon] = {}
        for index in range(devices):
            device = f"dev{index}"
            point = self.nas.mount(device)
            data = merged(FAST_SETTINGS, FLEET_SETTINGS)
            data["fleet"] = {**data["fleet"], "device_id": device}
            dirs = Dirs.make(root / f"local-{device}", model, data)
            dirs.rewrite_config({"paths": {k: str(point / k) for k in ("inbox", "outbox", "failed", "archive",
                                                                         "state")},
                                 "fleet": data["fleet"]})
            self.daemons[device] = Daemon(dirs)
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


@pytest.fixture
def fleet(tiny_model: Path, tmp_path: Path):
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    f = Fleet(tmp_path, tiny_model, 3)
    yield f
    f.close()


def assert_exactly_once(found: dict, names: list[str], fleet: Fleet) -> None:
    missing = sorted(set(names) - set(found))
    assert not missing, f"no outcome for {missing[:10]}; logs:\n" + "\n".join(
        d.log_tail(15) for d in fleet.daemons.values())
    twice = {n: [k for k, _ in found[n]] for n in names if len(found[n]) != 1}
    assert not twice, f"more than one outcome: {twice}"
    failed = {n: found[n][0][0] for n in names if found[n][0][0] != "done"}
    assert not failed, failed
    temps = [p.name for p in (fleet.nas.share / "outbox").iterdir() if p.name.startswith(".")]
    assert not temps, temps


def test_jobs_dropped_by_another_client_are_each_done_once_and_spread_over_every_device(fleet: Fleet) -> None:
    names = [f"j{i:03d}" for i in range(300)]
    for name in names:
        drop_job(fleet.client / "inbox", name)
    found = fleet.wait(names, 600)
    assert_exactly_once(found, names, fleet)
    per_device: dict[str, int] = {}
    for name in names:
        device = found[name][0][1].get("device")
        per_device[device] = per_device.get(device, 0) + 1
    print("jobs per device:", per_device)
    assert set(per_device) == set(fleet.daemons) and min(per_device.values()) >= 10, per_device
    assert all(d.alive() for d in fleet.daemons.values())
    # inpaintd status on one device lists all three, alive.
    out = subprocess.run([sys.executable, "-m", "inpaintd", "status", "--json", "--config",
                          str(fleet.daemons["dev0"].dirs.config)], capture_output=True, text=True, check=True)
    status = json.loads(out.stdout)
    assert {d["device"] for d in status["devices"]} == set(fleet.daemons)
    assert not any(d["presumed_dead"] for d in status["devices"])


def wait_for_claims(fleet: Fleet, device: str, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        claims = fleet.claims(device)
        if claims:
            return claims
        time.sleep(0.02)
    raise AssertionError(f"{device} claimed nothing")


def slow_jobs(fleet: Fleet, prefix: str, count: int) -> list[str]:
    names = [f"{prefix}{i:02d}" for i in range(count)]
    for name in names:
        drop_job(fleet.client / "inbox", name, size=(128, 128))
    return names


def test_a_dead_devices_claims_are_finished_by_the_others_and_it_publishes_nothing_stale(fleet: Fleet) -> None:
    names = slow_jobs(fleet, "k", 40)
    victim = fleet.daemons["dev1"]
    while True:  # freeze it holding a claim (a job can finish between a look and a kill)
        wait_for_claims(fleet, "dev1")
        os.kill(victim.pid, signal.SIGSTOP)
        taken = [c for c in fleet.claims("dev1") if fleet.claim_state("dev1", c) not in (None, "claiming")]
        if taken:
            break
        os.kill(victim.pid, signal.SIGCONT)
    victim.kill9()
    found = fleet.wait(names, 300)
    assert_exactly_once(found, names, fleet)
    deadline = time.monotonic() + 5 * LEASE
    while fleet.claims("dev1") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert fleet.claims("dev1") == [], "the dead device's claims were not taken over"
    took = [e for d in ("dev0", "dev2") for e in fleet.daemons[d].events() if e.get("event") == "fleet.took_over"]
    assert took, f"no take-over logged (dev1 held {taken})"
    before = {n: len(v) for n, v in fleet.outcomes().items()}
    victim.start(timeout=180)
    time.sleep(LEASE)
    assert {n: len(v) for n, v in fleet.outcomes().items()} == before  # nothing stale published
    assert victim.alive()


def test_a_device_cut_off_the_share_mid_job_comes_back_without_duplicates(fleet: Fleet) -> None:
    names = slow_jobs(fleet, "c", 40)
    wait_for_claims(fleet, "dev2")
    fleet.nas.cut("dev2")
    found = fleet.wait(names, 300)
    time.sleep(LEASE)
    fleet.nas.reconnect("dev2")
    more = slow_jobs(fleet, "d", 10)
    found = fleet.wait(names + more, 300)
    time.sleep(2 * LEASE)
    found = fleet.outcomes()
    assert_exactly_once(found, names + more, fleet)
    assert fleet.daemons["dev2"].alive(), fleet.daemons["dev2"].log_tail()
    events = [e.get("event") for e in fleet.daemons["dev2"].events()]
    assert "fleet.share_unreachable" in events and "fleet.share_back" in events


def test_hostile_drops_on_a_shared_inbox_are_recorded_once(fleet: Fleet) -> None:
    import random

    from chaos import plan_drop

    rng = random.Random(3)
    drops = []
    for index in range(30):
        drop, files = plan_drop(rng, index, can_chmod=False)
        inbox = fleet.client / "inbox"
        for rel, data in files.items():
            if data is None:
                (inbox / rel).mkdir()
        for rel, data in files.items():
            if data is None:
                continue
            if drop.kind == "symlink" and rel == f"{drop.name}.png":
                os.symlink("/etc/hostname", inbox / rel)
                continue
            tmp = inbox / f".up-{index}-{os.urandom(3).hex()}"
            tmp.write_bytes(data)
            os.rename(tmp, inbox / rel)
        drops.append(drop)
    names = [d.name for d in drops]
    found = fleet.wait(names, 300)
    missing = sorted(set(names) - set(found))
    assert not missing, missing
    twice = {n: [k for k, _ in found[n]] for n in names if len(found[n]) != 1}
    assert not twice, twice
    assert "internal_error" not in {k for n in names for k, _ in found[n]}


# ---------------------------------------------------------------------------- the pure parts, on local folders


def test_device_ids_are_configured_or_from_the_machine_id_and_always_safe_names(tmp_path: Path) -> None:
    from inpaintd.fleet import device_id

    machine = tmp_path / "machine-id"
    machine.write_text("3d1219c7c4c5aa00bb\n")
    assert device_id("", machine) == "3d1219c7c4c5"
    assert device_id(" shelf/2 ", machine) == "shelf-2"
    assert device_id("", tmp_path / "missing") not in ("", ".", "..")


def test_the_dead_are_judged_by_server_mtimes_only() -> None:
    from inpaintd.fleet import stale_devices

    beats = {"a": 1000.0, "b": 1055.0, "c": None}
    assert stale_devices(1061.0, beats, lease=60) == ["a"]
    assert stale_devices(1059.0, beats, lease=60) == []


def test_each_claim_of_a_dead_device_is_taken_exactly_once(tmp_path: Path) -> None:
    from inpaintd.fleet import Fleet

    for device in ("dead", "x", "y"):
        (tmp_path / device / "claimed").mkdir(parents=True)
    for index in range(20):
        (tmp_path / "dead" / "claimed" / f"job{index}").mkdir()
    from concurrent.futures import ThreadPoolExecutor

    fleets = [Fleet(tmp_path, "x", 6, 1), Fleet(tmp_path, "y", 6, 1)]
    with ThreadPoolExecutor(2) as pool:  # both race for the same claims
        results = list(pool.map(lambda f: f.take_claims("dead"), fleets))
    won = [p.name for r in results for p in r]
    assert sorted(won) == sorted(f"job{i}" for i in range(20))  # each once, none lost
    assert os.listdir(tmp_path / "dead" / "claimed") == []


def test_a_device_id_beating_from_another_host_is_refused(tmp_path: Path) -> None:
    from inpaintd.fleet import Fleet

    me = Fleet(tmp_path, "shelf", 6, 1)
    me.beat()
    other = Fleet(tmp_path, "shelf", 6, 1)
    other.host = "another-host"
    with pytest.raises(RuntimeError, match="in use by"):
        other.check_unique()
    Fleet(tmp_path, "shelf", 6, 1).check_unique()  # the same host restarting is fine


def test_a_heartbeat_slower_than_a_third_of_the_lease_is_a_config_error() -> None:
    from inpaintd.config import config_from_dict
    from inpaintd.errors import ConfigError

    with pytest.raises(ConfigError, match="fleet.heartbeat_seconds"):
        config_from_dict({"fleet": {"enabled": True, "lease_seconds": 10, "heartbeat_seconds": 5}})
