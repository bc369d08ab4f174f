#!/usr/bin/env python3
"""Long reliability runs against the real daemon with the tiny random model (issue 5).

    .venv/bin/python scripts/soak.py                 # all phases, defaults below
    .venv/bin/python scripts/soak.py --kills 50 --load 500 --burst 50 --markdown RELIABILITY-run.md

Phases:
  kill     jobs keep arriving while the daemon is killed with SIGKILL at chosen moments - while
           files settle, during denoising, right after the image is published and before its
           sidecar, and at random times - and restarted each time. Afterwards every job has
           exactly one result or one failure record, every input is in archive/ or failed/,
           nothing is left claimed, and no temp file or image without its sidecar is in the outbox.
  load     LOAD jobs dropped at once while the daemon is stopped (SIGSTOP) and thousands of junk
           file events pile up so the kernel's inotify queue overflows, then a burst of BURST more
           jobs during processing: all complete, in FIFO order, resident memory stays bounded.
  hostile  every case of tests/hostile_corpus.py, ROUNDS times into one daemon, interleaved with
           good jobs: each ends as expected, the daemon never stops.
  fleet    issue 13: three daemons on three sshfs mounts of one share (tests/fleet_harness.py);
           FLEET_JOBS dropped by a fourth client while one device is killed for good and another
           is cut off the share and remounted: each job once, throughput per device.
  pauses   issue 19: three devices on sshfs, frozen with SIGSTOP at every point of a job (painting,
           before the image, between image and sidecar, archiving) for 0.5, 0.8, 1.3 and 3
           leases, PAUSE_REPEATS times each, with the recommended mount options and with sshfs
           defaults: 0 lost, 0 duplicated, 0 sidecars without their image, 0 take-overs of a
           live device, 0 files of another job taken (the fast profile is in tests/test_fleet.py).
  chaos    the long profile of tests/chaos.py (issue 10): two daemons on one inbox, random
           interleavings of good jobs and hostile material, SIGKILLs at random moments, the disk
           filled, the archive's disk filled, the outbox made read-only; then every invariant of
           tests/chaos.py is checked (exactly one result per good job, one record per input, no
           temp file or orphan, no record over 1 MiB, drained within a bound); with issue 22's
           classes: a second write handle used after the claim, one name with NAME ... NAME-9999
           taken in the outbox, failed/ and archive/.
  forgery  issue 22: FORGERY_ROUNDS rounds of ghost devices planted in a fleet share's state/
           (tests/fleet_forgery.py: hostile job.json, links out of the share, FIFOs) while real
           jobs arrive: nothing outside the share changes or reaches a record, the daemon never
           blocks, every forged claim is refused and left in place, every real job done once.

Prints a summary table and writes it (Markdown) with --markdown. Exit status 0 only when nothing
was lost and every check held.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from daemon_harness import (  # noqa: E402
    Daemon,
    DirWatch,
    Dirs,
    drop_job,
    outcomes,
    put,
    read_status,
    stray_files,
)

SETTINGS = {"watch": {"settle_seconds": 0.3, "rescan_interval": 5, "incomplete_timeout": 120}}


@dataclass
class PhaseResult:
    phase: str
    jobs: int = 0
    done: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicated: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    figures: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and all(self.checks.values()) and not self.problems


def say(text: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {text}", flush=True)


def tiny_model(cache: Path) -> Path:
    from inpaintd.modelprep.prepare import PrepareOptions, prepare_model
    from inpaintd.testing.models import build_random_model

    prepared = cache / "tiny-prepared"
    if not (prepared / "inpaintd-manifest.json").exists():
        raw = build_random_model("tiny", cache / "tiny-raw")
        prepare_model(raw, prepared, PrepareOptions(dtype="fp32"))
    return prepared


def verify(dirs: Dirs, names: list[str], result: PhaseResult, allowed_failures: set[str]) -> dict[str, list]:
    """Exactly one outcome per job, inputs kept, nothing half-done left behind."""
    found = outcomes(dirs)
    for name in names:
        outs = found.get(name, [])
        if not outs:
            result.lost += 1
            result.problems.append(f"{name}: no outcome")
            continue
        if len(outs) > 1:
            result.duplicated += 1
            result.problems.append(f"{name}: {len(outs)} outcomes {[o.path.name for o in outs]}")
        first = outs[0]
        if first.kind == "done":
            result.done += 1
            kept = dirs.archive / name
        else:
            result.failed[first.code or "?"] = result.failed.get(first.code or "?", 0) + 1
            if first.code not in allowed_failures:
                result.problems.append(f"{name}: unexpected failure {first.code}: {first.data.get('message')}")
            kept = first.path.parent
        have = {p.name for p in kept.iterdir()} if kept.is_dir() else set()
        if not {f"{name}.png", f"{name}.mask.png"} <= have:
            result.lost += 1
            result.problems.append(f"{name}: inputs not all kept in {kept}: {sorted(have)}")
    unexpected = sorted(set(found) - set(names))
    if unexpected:
        result.problems.append(f"outcomes for names never sent: {unexpected[:5]}")
    strays = stray_files(dirs)
    sidecars = {p.stem for p in dirs.outbox.glob("*.json")}
    orphans = sorted(
        p.name for p in dirs.outbox.iterdir() if p.suffix != ".json" and p.stem not in sidecars and not p.name.startswith(".")
    )
    claimed = sorted(p.name for p in (dirs.state / "claimed").iterdir()) if (dirs.state / "claimed").exists() else []
    leftover = sorted(p.name for p in dirs.inbox.iterdir() if not p.name.startswith("."))
    result.checks["no temp file in outbox"] = not strays
    result.checks["no image without sidecar"] = not orphans
    result.checks["nothing left claimed"] = not claimed
    result.checks["inbox drained"] = not leftover
    for label, items in (("temp files", strays), ("orphan images", orphans), ("claimed", claimed), ("inbox", leftover)):
        if items:
            result.problems.append(f"{label} left: {items[:8]}{' ...' if len(items) > 8 else ''}")
    return found


def wait_all(dirs: Dirs, names: list[str], daemon: Daemon, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    wanted = set(names)
    while time.monotonic() < deadline:
        if wanted <= set(outcomes(dirs)) and not list((dirs.state / "claimed").iterdir()):
            return True
        if not daemon.alive():
            return False
        time.sleep(0.5)
    return False


# ---------------------------------------------------------------------------- kill -9


def phase_kill(model: Path, work: Path, kills: int, rng: random.Random) -> PhaseResult:
    result = PhaseResult("kill -9 and restart")
    started = time.monotonic()
    dirs = Dirs.make(work / "kill", model, SETTINGS)
    daemon = Daemon(dirs)
    names: list[str] = []
    moments = ["settle", "denoise", "publish", "random"]
    counter = 0

    def new_job(slow: bool = False, size: tuple[int, int] = (64, 64)) -> str:
        nonlocal counter
        counter += 1
        name = f"kill-{counter:04d}"
        drop_job(dirs.inbox, name, size=size, prompt=None, seed=counter)
        steps = rng.choice([30, 60, 100]) if slow else 2
        put(dirs.inbox / f"{name}.yaml", f"prompt: soak {counter}\nsteps: {steps}\n".encode())
        names.append(name)
        return name

    daemon.start()
    for index in range(kills):
        moment = moments[index % len(moments)]
        hit = False
        if moment == "settle":
            new_job()
            time.sleep(rng.uniform(0.0, 0.25))
            hit = not (dirs.state / "claimed").exists() or not any((dirs.state / "claimed").iterdir())
        elif moment == "denoise":
            name = new_job(slow=True)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                current = read_status(dirs.state).get("current") or {}
                if current.get("name") and (current.get("step") or 0) >= 1:
                    hit = True
                    break
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        elif moment == "publish":
            watch = DirWatch(dirs.outbox)
            try:
                name = new_job(size=(rng.choice([256, 400, 512]),) * 2)
                got = watch.wait_for(lambda n, name=name: n == f"{name}.png", timeout=60)
            finally:
                watch.close()
            hit = bool(got) and not (dirs.outbox / f"{name}.json").exists()
        else:
            for _ in range(rng.randint(1, 3)):
                new_job(slow=rng.random() < 0.3)
            time.sleep(rng.uniform(0.0, 3.0))
            hit = True
        daemon.kill9()
        labels = {
            "settle": ("while its files settle", "just after the claim"),
            "denoise": ("during denoising", "before denoising"),
            "publish": ("between image and sidecar", "just after the sidecar"),
            "random": ("at a random time", "at a random time"),
        }
        key = "SIGKILL " + labels[moment][0 if hit else 1]
        result.faults[key] = result.faults.get(key, 0) + 1
        daemon.start()
        if (index + 1) % 10 == 0:
            say(f"kill phase: {index + 1}/{kills} kills, {len(names)} jobs")
    # A few plain jobs at the end, then let everything finish.
    for _ in range(5):
        new_job()
    finished = wait_all(dirs, names, daemon, timeout=300)
    result.checks["all jobs finished after the last restart"] = finished
    code = daemon.stop()
    result.checks["clean exit on SIGTERM"] = code == 0
    result.jobs = len(names)
    verify(dirs, names, result, allowed_failures={"poison_job"})
    result.figures["daemon starts"] = str(daemon.starts)
    result.seconds = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------- load


def phase_load(model: Path, work: Path, load: int, burst: int) -> PhaseResult:
    result = PhaseResult("load: flood, inotify overflow, burst")
    started = time.monotonic()
    dirs = Dirs.make(work / "load", model, {**SETTINGS, "watch": {**SETTINGS["watch"], "rescan_interval": 30}})
    daemon = Daemon(dirs).start()
    baseline = daemon.rss_bytes()
    rss: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = daemon.rss_bytes()
            if value:
                rss.append(value)
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    names = [f"load-{i:05d}" for i in range(load)]
    burst_names = [f"load-{load + i:05d}" for i in range(burst)]

    # Freeze the daemon so the kernel queues every event, drop the flood, and churn junk files
    # until the inotify queue (fs.inotify.max_queued_events) overflows.
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        for index, name in enumerate(names):
            drop_job(dirs.inbox, name, seed=index)
        try:
            limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
        except OSError:
            limit = 16384
        for i in range(limit + 1000):
            (dirs.inbox / f".churn-{i % 2}").write_bytes(b"x")  # alternating names defeat event merging
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    result.faults["inotify queue overflow provoked (daemon SIGSTOPped)"] = 1
    for churn in dirs.inbox.glob(".churn-*"):
        churn.unlink()

    # A burst during processing: once some of the flood is done.
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(dirs.outbox.glob("*.json"))) < min(50, load // 2):
        time.sleep(0.2)
    for index, name in enumerate(burst_names):
        drop_job(dirs.inbox, name, seed=10_000 + index)
    result.faults["burst during processing"] = burst

    finished = wait_all(dirs, names + burst_names, daemon, timeout=max(600, load * 2.0))
    stop.set()
    sampler.join()
    result.checks["all jobs finished"] = finished
    overflow = [e for e in daemon.events() if e.get("event") == "watch.rescan"]
    result.figures["rescans logged (overflow)"] = str(len(overflow))
    result.checks["overflow detected and rescanned"] = bool(overflow)

    # FIFO by arrival, as the daemon itself records it in each sidecar ("arrived": first seen in
    # the inbox): sorted by start time, arrivals must never go backwards (equal is fine).
    sidecars = [json.loads(p.read_text()) for p in dirs.outbox.glob("*.json")]
    by_start = sorted(sidecars, key=lambda d: d["started"])
    inversions, worst = 0, 0.0
    latest_arrival = ""
    from datetime import datetime

    for data in by_start:
        if data["arrived"] < latest_arrival:
            inversions += 1
            late = datetime.fromisoformat(latest_arrival) - datetime.fromisoformat(data["arrived"])
            worst = max(worst, late.total_seconds())
        latest_arrival = max(latest_arrival, data["arrived"])
    result.figures["FIFO: jobs started after a later arrival"] = f"{inversions} (largest arrival gap {worst:.2f} s)"
    result.checks["FIFO order by arrival"] = inversions == 0
    burst_first = min((d["started"] for d in sidecars if d["name"] in set(burst_names)), default="")
    flood_last = max((d["started"] for d in sidecars if d["name"] in set(names)), default="")
    result.checks["the burst ran after the whole flood"] = bool(burst_first) and flood_last < burst_first

    peak = max(rss) if rss else 0
    result.figures["RSS at idle / peak / end (MiB)"] = (
        f"{baseline / 2**20:.0f} / {peak / 2**20:.0f} / {(rss[-1] if rss else 0) / 2**20:.0f}"
    )
    result.checks["RSS bounded (peak < idle + 256 MiB)"] = peak < baseline + 256 * 2**20
    code = daemon.stop()
    result.checks["clean exit on SIGTERM"] = code == 0
    result.jobs = len(names) + len(burst_names)
    verify(dirs, names + burst_names, result, allowed_failures=set())
    took = time.monotonic() - started
    result.figures["throughput (jobs/s, tiny model, 2 steps)"] = f"{result.jobs / took:.1f}"
    result.seconds = took
    return result


# ---------------------------------------------------------------------------- hostile


def phase_hostile(model: Path, work: Path, rounds: int) -> PhaseResult:
    import hostile_corpus as hc

    result = PhaseResult("hostile inputs")
    started = time.monotonic()
    settings = {
        "watch": {"settle_seconds": 0.3, "incomplete_timeout": 4, "rescan_interval": 2},
        "limits": {"max_pixels": 4_000_000, "max_prompt_bytes": 4096, "max_input_bytes": 8 * 1024 * 1024},
    }
    good: list[str] = []
    tried = 0
    for round_ in range(rounds):
        dirs = Dirs.make(work / f"hostile-{round_}", model, settings)
        outside = work / f"hostile-{round_}-outside"
        outside.mkdir()
        daemon = Daemon(dirs).start()
        cases = hc.cases(os.geteuid() == 0)
        for case in cases:
            case.build(dirs.inbox, outside)
            tried += 1
        names = [f"good-{round_}-{i}" for i in range(3)]
        for name in names:
            drop_job(dirs.inbox, name)
        good += names
        expected = [c.name for c in cases if hc.IGNORED not in c.expect] + names
        wait_all(dirs, expected, daemon, timeout=120)
        time.sleep(5)
        found = outcomes(dirs)
        for case in cases:
            outs = found.get(case.name, [])
            got = (hc.DONE if outs[0].kind == "done" else outs[0].code) if outs else hc.IGNORED
            if len(outs) > 1:
                result.duplicated += 1
            if got not in case.expect:
                result.problems.append(f"round {round_}: {case.key}: got {got}, expected {sorted(case.expect)}")
            if got == hc.DONE:
                result.done += 1
            elif got != hc.IGNORED:
                result.failed[got] = result.failed.get(got, 0) + 1
        for name in names:
            outs = found.get(name, [])
            if [o.kind for o in outs] != ["done"]:
                result.lost += 1
                result.problems.append(f"good job {name}: {[o.kind for o in outs]}")
        result.checks[f"daemon alive after round {round_}"] = daemon.alive()
        result.checks[f"clean exit round {round_}"] = daemon.stop() == 0
    result.jobs = tried + len(good)
    result.figures["hostile inputs tried"] = str(tried)
    result.figures["distinct hostile cases"] = str(len(hc.cases(os.geteuid() == 0)))
    result.seconds = time.monotonic() - started
    return result


def phase_chaos(model: Path, work: Path, seed: int, drops: int, kills: int, faults: int, seconds: float) -> PhaseResult:
    """tests/chaos.py's long profile: two daemons, random drops, kills and filesystem faults."""
    from dataclasses import replace

    import chaos

    profile = replace(chaos.LONG, seed=seed, drops=drops, kills=kills, faults=faults, chaos_seconds=seconds)
    result = PhaseResult("chaos: hostile drops, kills, faults, 2 daemons")
    started = time.monotonic()
    run = chaos.run_chaos(work / "chaos", model, profile, log=say)
    report = run.report
    assert report is not None
    figures = report.figures
    result.jobs = figures["drops"]
    result.done = figures["done"]
    result.failed = dict(figures["failed_codes"])
    result.lost = figures["lost"]
    result.duplicated = figures["duplicated"]
    result.faults = {"SIGKILL at a random moment": figures["kills"],
                     **{chaos.FAULT_NAMES[k]: n for k, n in figures["faults"].items()}}
    result.figures = {
        "good jobs / hostile drops": f"{figures['good']} / {figures['hostile']}",
        "daemons on one inbox": str(figures["daemons"]),
        "filesystem faults (namespace)": str(figures["namespace_faults"]),
        "largest record (bytes)": str(figures["largest_record_bytes"]),
        "drained after the chaos (s)": str(figures["drained_after_seconds"]),
        "writes through a kept handle after the claim": ", ".join(
            f"{k} {n}" for k, n in figures["held_open_writes_after_claim"].items()),
        "drops of the name with NAME ... NAME-9999 taken": f"{figures['exhausted_name_drops']} "
                                                          f"({figures['taken_names_made']} names taken)",
        "peak daemon RSS (MiB)": str(figures["peak_rss_mib"]),
        "outcomes by kind": "; ".join(f"{k}: {', '.join(f'{c} {n}' for c, n in v.items())}"
                                      for k, v in figures["outcomes_by_kind"].items()),
    }
    result.checks["every invariant held (see tests/chaos.py)"] = not report.violations
    result.problems = report.violations[:20]
    result.seconds = time.monotonic() - started
    return result


def phase_forgery(model: Path, work: Path, seed: int, rounds: int) -> PhaseResult:
    """tests/fleet_forgery.py's long profile: ghost devices in a shared state/, real jobs flowing."""
    from dataclasses import replace

    import fleet_forgery

    profile = replace(fleet_forgery.LONG, seed=seed, rounds=rounds)
    result = PhaseResult("forgery: ghost devices in a shared state/ (fleet mode)")
    started = time.monotonic()
    run = fleet_forgery.run_forgery(work / "forgery", model, profile, log=say)
    figures = run.figures
    result.jobs = figures["real_jobs"]
    result.done = figures["real_done"]
    result.lost = figures["real_jobs"] - figures["real_done"]
    result.faults = {"ghost devices planted": figures["ghosts"]}
    result.figures = {
        "kinds of forgery": str(figures["kinds"]),
        "ghosts by fate": ", ".join(f"{k} {n}" for k, n in figures["fates"].items()),
        "fleet.claim_refused events": str(figures["refused_events"]),
        "own heartbeats during the run": str(figures["own_beats"]),
        "inpaintd status answered in (s)": str(figures["status_seconds"]),
    }
    result.checks["every invariant held (see tests/fleet_forgery.py)"] = not run.violations
    result.problems = run.violations[:20]
    result.seconds = time.monotonic() - started
    return result


def phase_pauses(model: Path, work: Path, repeats: int, rng: random.Random) -> PhaseResult:
    """Issue 19: devices frozen (SIGSTOP) at every point of a job for 0.5, 0.8, 1.3 and 3 leases,
    `repeats` times each, with the recommended sshfs options and with sshfs defaults."""
    import fleet_harness

    result = PhaseResult("fleet pauses: SIGSTOP at every point of a job, 0.5-3 leases")
    reason = fleet_harness.unavailable()
    if reason:
        result.problems.append(f"skipped: {reason}")
        return result
    started = time.monotonic()
    lease = fleet_harness.LEASE
    wanted = [p for p in fleet_harness.POINTS if p != "between jobs"]
    landed: dict[str, int] = {}
    for profile, options in (("recommended", fleet_harness.RECOMMENDED), ("sshfs defaults", fleet_harness.DEFAULTS)):
        # Only dev2 is paused past the lease: a take-over from dev0/dev1 is one of a live device.
        plan = [("dev2" if leases > 1 else rng.choice(["dev0", "dev1"]), point, leases)
                for point in wanted for leases in (0.5, 0.8, 1.3, 3.0) for _ in range(repeats)]
        rng.shuffle(plan)
        fleet = fleet_harness.Fleet(work / f"pauses-{profile.replace(' ', '-')}", model, 3, options=options)
        try:
            run = fleet_harness.pause_run(fleet, plan, "p", lease, timeout=1800)
        finally:
            fleet.close()
        for device, point, leases in run["landed"]:
            key = f"{point}, {leases:g} lease"
            landed[key] = landed.get(key, 0) + 1
        result.jobs += run["jobs"]
        result.lost += len(run["lost"])
        result.duplicated += len(run["duplicated"])
        result.done += run["jobs"] - len(run["lost"]) - len(run["failed"])
        for name in run["failed"]:
            result.failed["failed"] = result.failed.get("failed", 0) + 1
        result.faults[f"SIGSTOP ({profile})"] = len(run["landed"])
        result.checks[f"{profile}: 0 sidecars without their image"] = not run["sidecars_without_image"]
        result.checks[f"{profile}: 0 take-overs of a live device"] = not run["take_overs_of_live_devices"]
        result.checks[f"{profile}: 0 files of another job taken"] = not run["foreign_files_taken"]
        if profile == "recommended":
            result.checks["recommended: 0 images left without a sidecar"] = not run["orphan_images"]
        result.figures[f"{profile}: take-overs, orphan images"] = f"{run['take_overs']}, {len(run['orphan_images'])}"
    result.figures["pauses by point and length"] = "; ".join(f"{k}: {v}" for k, v in sorted(landed.items()))
    result.seconds = time.monotonic() - started
    return result


def phase_fleet(model: Path, work: Path, jobs: int) -> PhaseResult:
    """Issue 13: three devices on three sshfs mounts of one share, one killed for good, one cut off."""
    import fleet_harness

    result = PhaseResult("fleet: 3 devices on one sshfs share")
    reason = fleet_harness.unavailable()
    if reason:
        result.problems.append(f"skipped: {reason}")
        return result
    started = time.monotonic()
    fleet = fleet_harness.Fleet(work / "fleet", model, 3)
    try:
        names = [f"f{i:04d}" for i in range(jobs)]
        begun = time.monotonic()
        for index, name in enumerate(names):
            drop_job(fleet.client / "inbox", name, size=(96, 96))
            if index == jobs // 4:
                victim = fleet.daemons["dev1"]
                while not [c for c in fleet.claims("dev1") if fleet.claim_state("dev1", c) not in (None, "claiming")]:
                    time.sleep(0.02)
                victim.kill9()
                result.faults["SIGKILL of a device mid-job, not restarted until the end"] = 1
            if index == jobs // 2:
                while not fleet.claims("dev2"):
                    time.sleep(0.02)
                fleet.nas.cut("dev2")
                cut_at = time.monotonic()
                result.faults["device cut off the share (its sshfs killed) mid-job, remounted"] = 1
            if index > jobs // 2 and "cut_at" in locals() and time.monotonic() - cut_at > 3 * fleet_harness.LEASE \
                    and not fleet_harness.mount_alive(fleet, "dev2"):
                fleet.nas.reconnect("dev2")
        if not fleet_harness.mount_alive(fleet, "dev2"):
            time.sleep(max(0.0, 3 * fleet_harness.LEASE - (time.monotonic() - cut_at)))
            fleet.nas.reconnect("dev2")
        found = fleet.wait(names, 900)
        elapsed = time.monotonic() - begun
        result.checks["the dead device's claims were all taken over"] = not fleet.claims("dev1")
        before = {n: len(v) for n, v in fleet.outcomes().items()}
        fleet.daemons["dev1"].start(timeout=180)
        time.sleep(2 * fleet_harness.LEASE)
        after = {n: len(v) for n, v in fleet.outcomes().items()}
        per_device: dict[str, int] = {}
        for name in names:
            outs = found.get(name, [])
            if not outs:
                result.lost += 1
                continue
            if len(outs) > 1:
                result.duplicated += 1
            kind, data = outs[0]
            if kind == "done":
                result.done += 1
                per_device[str(data.get("device"))] = per_device.get(str(data.get("device")), 0) + 1
            else:
                result.failed[kind] = result.failed.get(kind, 0) + 1
        result.jobs = jobs
        took = sum(1 for d in fleet.daemons.values() for e in d.events() if e.get("event") == "fleet.took_over")
        dropped = sum(1 for e in fleet.daemons["dev2"].events() if e.get("event") == "job.taken_over")
        result.figures["jobs per device"] = ", ".join(f"{k}: {v}" for k, v in sorted(per_device.items()))
        result.figures["throughput per device (jobs/s, tiny model, over the whole run)"] = ", ".join(
            f"{k}: {v / elapsed:.2f}" for k, v in sorted(per_device.items()))
        result.figures["claims taken over from the dead or cut-off device"] = str(took)
        result.figures["jobs the cut-off device dropped on return (taken over meanwhile)"] = str(dropped)
        result.figures["seconds for all jobs"] = f"{elapsed:.0f}"
        result.checks["the restarted dead device published nothing stale"] = before == after
        result.checks["all devices alive at the end"] = all(d.alive() for d in fleet.daemons.values())
        result.checks["no temp file left in the shared outbox"] = not [
            p for p in (fleet.nas.share / "outbox").iterdir() if p.name.startswith(".")]
    finally:
        fleet.close()
    result.seconds = time.monotonic() - started
    return result


# ---------------------------------------------------------------------------- report


def table(results: list[PhaseResult], command: str) -> str:
    lines = [
        "| phase | jobs | done | failed (code: n) | lost | duplicated | faults injected | result |",
        "|---|---:|---:|---|---:|---:|---|---|",
    ]
    for r in results:
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(r.failed.items())) or "-"
        faults = "; ".join(f"{k}: {v}" for k, v in sorted(r.faults.items())) or "-"
        lines.append(
            f"| {r.phase} | {r.jobs} | {r.done} | {failed} | {r.lost} | {r.duplicated} | {faults} | {'PASS' if r.ok else 'FAIL'} |"
        )
    total_jobs = sum(r.jobs for r in results)
    total_lost = sum(r.lost for r in results)
    total_faults = sum(sum(r.faults.values()) for r in results)
    lines.append(f"| **total** | {total_jobs} | {sum(r.done for r in results)} | | **{total_lost}** | "
                 f"{sum(r.duplicated for r in results)} | {total_faults} | {'PASS' if all(r.ok for r in results) else 'FAIL'} |")
    out = ["\n".join(lines), ""]
    for r in results:
        out.append(f"**{r.phase}** ({r.seconds:.0f} s)")
        for key, value in r.figures.items():
            out.append(f"- {key}: {value}")
        for key, ok in r.checks.items():
            out.append(f"- {'ok' if ok else 'FAILED'}: {key}")
        for problem in r.problems[:20]:
            out.append(f"- problem: {problem}")
        out.append("")
    out.append(f"Command: `{command}`")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phases", default="kill,load,hostile,chaos,forgery,fleet,pauses",
                        help="comma list of kill, load, hostile, chaos, forgery, fleet, pauses")
    parser.add_argument("--fleet-jobs", type=int, default=600, help="jobs in the fleet phase (default 600)")
    parser.add_argument("--pause-repeats", type=int, default=5,
                        help="pauses per point and length in the pauses phase (default 5)")
    parser.add_argument("--chaos-drops", type=int, default=400, help="drops in the chaos phase (default 400)")
    parser.add_argument("--chaos-kills", type=int, default=30, help="SIGKILLs in the chaos phase (default 30)")
    parser.add_argument("--chaos-faults", type=int, default=24, help="filesystem faults in the chaos phase (default 24)")
    parser.add_argument("--chaos-seconds", type=float, default=420.0, help="length of the chaos (default 420)")
    parser.add_argument("--forgery-rounds", type=int, default=12,
                        help="rounds of ghost devices in the forgery phase (default 12)")
    parser.add_argument("--kills", type=int, default=52, help="SIGKILLs in the kill phase (default 52)")
    parser.add_argument("--load", type=int, default=500, help="jobs dropped at once (default 500)")
    parser.add_argument("--burst", type=int, default=50, help="jobs dropped during processing (default 50)")
    parser.add_argument("--rounds", type=int, default=2, help="hostile corpus rounds (default 2)")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--work", type=Path, help="work folder (default: a temp folder, removed on success)")
    parser.add_argument("--markdown", type=Path, help="also write the summary table to this file")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="inpaintd-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    say(f"work folder {work}")
    model = tiny_model(work / "model")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    results: list[PhaseResult] = []
    for phase in phases:
        say(f"phase {phase} ...")
        if phase == "kill":
            results.append(phase_kill(model, work, args.kills, rng))
        elif phase == "load":
            results.append(phase_load(model, work, args.load, args.burst))
        elif phase == "hostile":
            results.append(phase_hostile(model, work, args.rounds))
        elif phase == "fleet":
            results.append(phase_fleet(model, work, args.fleet_jobs))
        elif phase == "pauses":
            results.append(phase_pauses(model, work, args.pause_repeats, rng))
        elif phase == "chaos":
            results.append(phase_chaos(model, work, args.seed, args.chaos_drops, args.chaos_kills, args.chaos_faults,
                                       args.chaos_seconds))
        elif phase == "forgery":
            results.append(phase_forgery(model, work, args.seed, args.forgery_rounds))
        else:
            parser.error(f"unknown phase {phase}")
        say(f"phase {phase}: {'PASS' if results[-1].ok else 'FAIL'}")
    command = "scripts/soak.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = table(results, command.strip())
    print(text)
    if args.markdown:
        args.markdown.write_text(text, encoding="utf-8")
    (work / "summary.json").write_text(
        json.dumps([r.__dict__ | {"ok": r.ok} for r in results], indent=2, default=str), encoding="utf-8"
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
