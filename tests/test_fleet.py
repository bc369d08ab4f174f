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
from fleet_harness import HEARTBEAT, LEASE, Fleet, unavailable

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


# ---------------------------------------------------------------------------- issue 19: pauses, caches, the share


# A device frozen (SIGSTOP: a VM or GC pause) exactly at a point of a job (it stops itself there,
# store/pausepoints.py), for fractions and multiples of the lease: only dev2 is ever paused past
# the lease, so a take-over from dev0 or dev1 would be a take-over of a live device. The long
# profile (every point x 0.5, 0.8, 1.3, 3 leases x 5) is scripts/soak.py --phases pauses.
FAST_PLAN = [
    ("dev0", "painting", 0.5), ("dev1", "between image and sidecar", 0.8),
    ("dev2", "after the ownership check", 1.3), ("dev2", "between image and sidecar", 3.0),
    ("dev2", "after the sidecar", 1.3), ("dev2", "archiving", 1.3),
]
DEFAULTS_PLAN = [("dev2", "between image and sidecar", 1.3), ("dev1", "archiving", 0.5)]


@pytest.mark.parametrize("profile", ["recommended", "sshfs-defaults"])
def test_devices_frozen_at_every_point_of_a_job_lose_and_duplicate_nothing(profile: str, tiny_model: Path,
                                                                            tmp_path: Path) -> None:
    from fleet_harness import DEFAULTS, RECOMMENDED, pause_run

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    options, plan = (RECOMMENDED, FAST_PLAN) if profile == "recommended" else (DEFAULTS, DEFAULTS_PLAN)
    fleet = Fleet(tmp_path, tiny_model, 3, options=options)
    try:
        result = pause_run(fleet, plan, "p", LEASE)
        print(profile, json.dumps(result))
        if profile == "recommended":
            # With sshfs defaults a device may see no job for 30 s (listings cached ~20 s, the
            # others take the jobs first): its pause then lands between jobs, still a liveness check.
            assert [point for _d, point, _l in result["landed"]] == [point for _d, point, _l in plan], result["landed"]
        for key in ("lost", "duplicated", "failed", "sidecars_without_image", "take_overs_of_live_devices",
                    "foreign_files_taken"):
            assert not result[key], f"{key}: {result[key]}\n" + "\n".join(d.log_tail(20) for d in fleet.daemons.values())
        if profile == "recommended":
            assert not result["orphan_images"], result  # identity is checkable: nothing left behind
        assert all(d.alive() for d in fleet.daemons.values())
    finally:
        fleet.close()


def test_a_device_started_before_the_share_is_mounted_writes_nothing_there_and_works_once_it_is(
        tiny_model: Path, tmp_path: Path) -> None:
    from daemon_harness import FAST_SETTINGS, Daemon, Dirs, merged
    from fleet_harness import FLEET_SETTINGS, Nas

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    nas = Nas(tmp_path)
    daemon = None
    try:
        client = nas.mount("client")
        point = tmp_path / "mnt-dev0"
        point.mkdir()  # the mount point, empty: the share is not mounted yet
        data = merged(merged(FAST_SETTINGS, FLEET_SETTINGS), {"watch": {"observer": "auto"}})
        data["fleet"] = {**data["fleet"], "device_id": "dev0"}
        dirs = Dirs.make(tmp_path / "local-dev0", tiny_model, data)
        dirs.rewrite_config({"paths": {k: str(point / k) for k in ("inbox", "outbox", "failed", "archive", "state")}})
        daemon = Daemon(dirs).start(wait_ready=False)
        deadline = time.monotonic() + 120
        while not any(e.get("event") == "fleet.share_missing" for e in daemon.events()):
            assert daemon.alive() and time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.2)
        time.sleep(2)
        assert os.listdir(point) == [], "written on the local disk under the mount point"
        names = [f"m{i}" for i in range(3)]
        for name in names:
            drop_job(client / "inbox", name)
        nas.mount("dev0")
        mounted = time.monotonic()
        found = {}
        while set(names) - set(found) and time.monotonic() - mounted < 60:
            found = {json.loads(p.read_text())["name"]: p for p in (nas.share / "outbox").glob("*.json")}
            time.sleep(0.2)
        took = time.monotonic() - mounted
        print(f"first results {took:.1f} s after the mount")
        assert set(names) <= set(found), daemon.log_tail()
        assert took < 30, took
        events = [e.get("event") for e in daemon.events()]
        assert "fleet.share_found" in events
    finally:
        if daemon is not None and daemon.alive():
            daemon.kill9()
        nas.close()
    assert os.listdir(point) == [], "written on the local disk under the mount point"


def test_a_device_whose_share_is_lazily_unmounted_writes_nothing_under_the_mount_point_and_resumes(
        tiny_model: Path, tmp_path: Path) -> None:
    """Issue 19 item 4: `fusermount -uz` under a running device leaves its paths on the local
    disk under the mount point. It must say the share is away, write no heartbeat, status or
    claim there, and take jobs again once the share is mounted back."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    fleet = Fleet(tmp_path, tiny_model, 1)
    daemon = fleet.daemons["dev0"]
    point, sshfs = fleet.nas.mounts["dev0"]
    try:
        drop_job(fleet.client / "inbox", "before")
        assert "before" in fleet.wait(["before"], 60), daemon.log_tail()
        subprocess.run(["fusermount3", "-u", "-z", str(point)], check=True, capture_output=True)
        sshfs.kill()
        deadline = time.monotonic() + 30
        while not any(e.get("event") in ("fleet.share_missing", "fleet.share_unreachable") for e in daemon.events()):
            assert daemon.alive() and time.monotonic() < deadline, daemon.log_tail()
            time.sleep(0.2)
        drop_job(fleet.client / "inbox", "while-away")  # on the share, which this device cannot see
        time.sleep(10 * HEARTBEAT + 2)
        assert os.listdir(point) == [], "written on the local disk under the mount point"
        assert daemon.alive()
        fleet.nas.mount("dev0")
        found = fleet.wait(["while-away"], 60)
        assert [kind for kind, _ in found.get("while-away", [])] == ["done"], daemon.log_tail()
        assert any(e.get("event") == "fleet.share_back" for e in daemon.events()), daemon.log_tail()
    finally:
        fleet.close()


def test_a_beat_counter_is_watched_by_the_observers_own_clock() -> None:
    from inpaintd.store.fleet import watch_beats

    seen = watch_beats({}, {"a": "t:1", "b": None}, now=100.0, last_look=None, lease=4)
    assert seen == {"a": ("t:1", 100.0)}  # b never beat: nothing to judge
    seen = watch_beats(seen, {"a": "t:1", "b": "u:1"}, now=101.0, last_look=100.0, lease=4)
    assert seen == {"a": ("t:1", 100.0), "b": ("u:1", 101.0)}
    seen = watch_beats(seen, {"a": "t:2", "b": None}, now=102.0, last_look=101.0, lease=4)
    assert seen["a"] == ("t:2", 102.0) and seen["b"] == ("u:1", 101.0)  # unreadable: the old watch holds
    # We were frozen ourselves for longer than half a lease: silence we did not watch proves nothing.
    assert watch_beats(seen, {"a": "t:2", "b": "u:1"}, now=110.0, last_look=102.0, lease=4) == {
        "a": ("t:2", 110.0), "b": ("u:1", 110.0)}


def test_without_the_shares_marker_a_device_writes_no_heartbeat_and_creates_nothing(tmp_path: Path) -> None:
    from inpaintd.store.fleet import Fleet as FleetView
    from inpaintd.store.fleet import ShareMissing, init_share, share_present

    point = tmp_path / "mnt"
    point.mkdir()
    view = FleetView(point / "state", "dev0", 6, 1, share=point)
    with pytest.raises(ShareMissing):
        view.beat()
    assert os.listdir(point) == []
    marker, made = init_share(point)
    assert made and share_present(point) and init_share(point) == (marker, False)
    view.beat()
    assert (point / "state" / "dev0" / "heartbeat").stat().st_size == 512  # a fixed length


# ---------------------------------------------------------------------------- forged state (issue 22)
# The share's state/ is as untrusted as the inbox: a drop user who can write it plants ghost
# devices (tests/fleet_forgery.py is the live run; these pin each defect it found).


def _ghost(state: Path, device: str, beat: int = 7) -> Path:
    folder = state / device
    (folder / "claimed").mkdir(parents=True)
    (folder / "heartbeat").write_bytes(json.dumps({"token": "t", "beat": beat}).encode().ljust(512))
    return folder


def _in_thread(call, timeout: float = 10.0):
    """call() in a thread; fails the test (instead of hanging it) when it blocks."""
    import threading

    out: list = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(timeout)
    assert not worker.is_alive(), f"{call} blocked for {timeout} s"
    return out[0]


def test_a_fifo_as_a_ghosts_heartbeat_or_status_never_blocks_the_keeper_or_inpaintd_status(tmp_path: Path) -> None:
    """Found by the forgery run: a FIFO planted as state/ghost/heartbeat blocked the keeper in
    open(2) for ever; this device stopped beating and every job was held as share_unreachable.
    A FIFO as status.json hung `inpaintd status` (and the metrics) the same way."""
    from inpaintd.store.fleet import Fleet as FleetView

    ghost = _ghost(tmp_path, "ghost")
    (ghost / "heartbeat").unlink()
    os.mkfifo(ghost / "heartbeat")
    os.mkfifo(ghost / "status.json")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "heartbeat").symlink_to(tmp_path / "ghost" / "heartbeat")
    me = FleetView(tmp_path, "dev0", 6, 1)
    me.beat()
    silence = _in_thread(me.observe)
    assert "ghost" not in silence and "linked" not in silence  # no readable heartbeat: never judged
    peers = _in_thread(me.peers)
    assert {p.device: p.status for p in peers}["ghost"] == {}


def test_a_ghosts_claimed_folder_linked_outside_the_share_is_never_listed_nor_emptied(tmp_path: Path) -> None:
    """Found by the forgery run: take_claims listed state/ghost/claimed through a link and renamed
    what it found there, so folders outside the share were moved into it. Links (the claimed/
    folder, a claim folder, the device folder) are refused and logged, never followed."""
    from inpaintd.store.fleet import Fleet as FleetView
    from structlog.testing import capture_logs

    state, outside = tmp_path / "state", tmp_path / "outside"
    (outside / "20261204T000000Z-deadbeef").mkdir(parents=True)
    (state / "dev0" / "claimed").mkdir(parents=True)
    ghost = _ghost(state, "ghost")
    (ghost / "claimed").rmdir()
    (ghost / "claimed").symlink_to(outside)
    other = _ghost(state, "other")
    (other / "claimed" / "20261204T000000Z-0badf00d").symlink_to(outside / "20261204T000000Z-deadbeef")
    me = FleetView(state, "dev0", 6, 1)
    with capture_logs() as logs:
        assert me.take_claims("ghost") == [] and me.take_claims("other") == []
        assert me.take_claims("other") == []  # logged once
    assert os.listdir(outside) == ["20261204T000000Z-deadbeef"] and os.listdir(state / "dev0" / "claimed") == []
    assert os.path.islink(other / "claimed" / "20261204T000000Z-0badf00d")
    refused = [(e["device"], e["claim"]) for e in logs if e["event"] == "fleet.claim_refused"]
    assert refused == [("ghost", "claimed"), ("other", "20261204T000000Z-0badf00d")]


def test_a_forged_claim_is_refused_in_the_dead_devices_folder_and_a_sound_one_still_taken(tmp_path: Path) -> None:
    """A claim whose record the spool would refuse is never renamed into ours (it used to be
    taken, then found unreadable in our own claims at every start); a sound one still is."""
    from inpaintd.store.fleet import Fleet as FleetView
    from inpaintd.store.spool import Spool

    state = tmp_path / "state"
    (state / "dev0" / "claimed").mkdir(parents=True)
    ghost = _ghost(state, "ghost")
    record = {"schema": "inpaintd.claim/1", "name": "cat", "folder": None, "entries": ["cat.png"],
              "files": {"image": "cat.png"}, "arrived": 1.0, "claimed": 1.0, "attempts": 0, "state": "claimed"}
    for job_id, changes in (("20261204T000000Z-00000001", {"name": "../../pwned"}),
                            ("20261204T000000Z-00000002", {}),
                            ("20261204T000000Z-00000003", {"files": {"image": "/etc/hostname"}})):
        (ghost / "claimed" / job_id / "inputs").mkdir(parents=True)
        (ghost / "claimed" / job_id / "inputs" / "cat.png").write_bytes(b"png")
        (ghost / "claimed" / job_id / "job.json").write_text(json.dumps({**record, "job_id": job_id, **changes}))
    won = FleetView(state, "dev0", 6, 1).take_claims("ghost", Spool.claim_problem)
    assert [p.name for p in won] == ["20261204T000000Z-00000002"]
    assert sorted(os.listdir(ghost / "claimed")) == ["20261204T000000Z-00000001", "20261204T000000Z-00000003"]


@pytest.mark.parametrize("current", ["pwned", ["x"], {"name": {"x": 1}}, 7])
def test_a_ghosts_status_of_the_wrong_types_is_listed_as_unknown_not_a_crash(current) -> None:
    """`inpaintd status` lists every device's status.json; a forged one whose `current` was a
    string crashed it (AttributeError)."""
    from inpaintd.cli import _device_row
    from inpaintd.store.fleet import Peer

    row = _device_row(Peer("ghost", 99.0, {"state": ["busy"], "current": current, "queue_length": "9"}), lease=6)
    assert row == {"device": "ghost", "heartbeat_age_seconds": 99.0, "presumed_dead": True, "state": None,
                   "current": None, "queue_length": None}
