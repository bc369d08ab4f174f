"""Several devices on one shared folder (issue 13): three daemons on three sshfs mounts of one
folder served by a private sshd on 127.0.0.1, a fourth mount for the client (tests/fleet_harness.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_harness import drop_job
from fleet_harness import LEASE, Fleet, unavailable

pytestmark = pytest.mark.slow

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
    failed = {n: found[n][0] for n in names if found[n][0][0] != "done"}
    assert not failed, f"{failed}; logs:\n" + "\n".join(d.log_tail(15) for d in fleet.daemons.values())
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

    from chaos import plan_drop, write_drop

    rng = random.Random(3)
    drops = []
    for index in range(30):
        drop, files = plan_drop(rng, index, can_chmod=False)
        write_drop(fleet.client / "inbox", drop, files)
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
    from inpaintd.store.fleet import device_id

    machine = tmp_path / "machine-id"
    machine.write_text("3d1219c7c4c5aa00bb\n")
    assert device_id("", machine) == "3d1219c7c4c5"
    assert device_id(" shelf/2 ", machine) == "shelf-2"
    assert device_id("", tmp_path / "missing") not in ("", ".", "..")


def test_the_dead_are_judged_by_server_mtimes_only() -> None:
    from inpaintd.store.fleet import stale_devices

    beats = {"a": 1000.0, "b": 1055.0, "c": None}
    assert stale_devices(1061.0, beats, lease=60) == ["a"]
    assert stale_devices(1059.0, beats, lease=60) == []


def test_each_claim_of_a_dead_device_is_taken_exactly_once(tmp_path: Path) -> None:
    from inpaintd.store.fleet import Fleet

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
    from inpaintd.store.fleet import Fleet

    me = Fleet(tmp_path, "shelf", 6, 1)
    me.beat()
    other = Fleet(tmp_path, "shelf", 6, 1)
    other.host = "another-host"
    with pytest.raises(RuntimeError, match="in use by"):
        other.check_unique()
    Fleet(tmp_path, "shelf", 6, 1).check_unique()  # the same host restarting is fine


def test_a_heartbeat_slower_than_a_third_of_the_lease_is_a_config_error() -> None:
    from inpaintd.core.config import config_from_dict
    from inpaintd.core.errors import ConfigError

    with pytest.raises(ConfigError, match="fleet.heartbeat_seconds"):
        config_from_dict({"fleet": {"enabled": True, "lease_seconds": 10, "heartbeat_seconds": 5}})
