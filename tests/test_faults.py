"""Faults a device meets, on a real running daemon: full disk, outbox gone or read-only, inbox
deleted and recreated, clock jumps, and kill -9 at chosen moments. The long randomised runs are
in scripts/soak.py; these are the fast, deterministic parts.

The daemon runs in a private mount namespace (`unshare -m`) so the test can mount a 256 KiB
tmpfs or a read-only bind over its outbox without touching the host's mounts; the test looks
into that namespace through /proc/PID/root and acts in it with nsenter. Where that is not
possible (not root, no unshare), those tests skip with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
from chaos import namespace_unavailable
from daemon_harness import (
    Daemon,
    Dirs,
    DirWatch,
    drop_job,
    missing_report,
    outcomes,
    put,
    read_status,
    stray_files,
    wait_for,
)

pytestmark = pytest.mark.slow

SETTINGS = {"watch": {"settle_seconds": 0.3, "rescan_interval": 2, "incomplete_timeout": 60},
            # These faults are about jobs already claimed (held, retried); the low-disk guard, which
            # keeps new jobs in the inbox on a small or full disk, is tested in test_unattended.py.
            "limits": {"min_free_bytes": 0, "min_free_fraction": 0.0}}
LIBFAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


class NsDaemon(Daemon):
    """The daemon in its own mount namespace; `ns` runs a command inside it, `view` sees its files."""

    def __init__(self, dirs: Dirs) -> None:
        super().__init__(dirs, wrapper=["unshare", "-m", "--propagation", "private"])

    def ns(self, *cmd: str) -> None:
        subprocess.run(["nsenter", "-t", str(self.pid), "-m", *cmd], check=True, capture_output=True)

    def view(self, path: Path) -> Path:
        return Path(f"/proc/{self.pid}/root") / str(path).lstrip("/")

    def viewed_dirs(self) -> Dirs:
        return replace(self.dirs, outbox=self.view(self.dirs.outbox))


@pytest.fixture(scope="module")
def daemon(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory):
    reason = namespace_unavailable()
    dirs = Dirs.make(tmp_path_factory.mktemp("faults"), tiny_model, SETTINGS)
    d: Daemon = Daemon(dirs) if reason else NsDaemon(dirs)
    d.start()
    d.ns_reason = reason  # type: ignore[attr-defined]
    yield d
    d.stop()


def need_ns(daemon: Daemon) -> NsDaemon:
    if not isinstance(daemon, NsDaemon):
        pytest.skip(daemon.ns_reason)  # type: ignore[attr-defined]
    return daemon


def one_done(dirs: Dirs, name: str, daemon: Daemon, timeout: float = 40) -> dict:
    found = wait_for(dirs, [name], timeout, daemon)
    assert name in found, missing_report(dirs, [name], found, daemon)
    assert [o.kind for o in found[name]] == ["done"], [o.data for o in found[name]]
    return found[name][0].data


def events(daemon: Daemon, name: str) -> list[str]:
    return [e.get("event", "") for e in daemon.events() if e.get("job") == name]


def assert_held(daemon: Daemon, dirs: Dirs, name: str, code: str, seconds: float = 2.5) -> dict:
    """The job is neither published nor failed, its inputs are kept, and the daemon says why."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert name not in outcomes(dirs), f"{name} finished although it should be held"
        time.sleep(0.2)
    assert daemon.alive(), daemon.log_tail()
    retries = [e for e in daemon.events() if e.get("job") == name and e.get("event") == "job.retry_later"]
    assert retries and retries[-1].get("code") == code, events(daemon, name)
    status = read_status(daemon.dirs.state)
    assert status.get("health"), status
    assert (status.get("last_error") or {}).get("code") == code, status
    kept = [p for p in (daemon.dirs.state / "claimed").rglob(f"{name}*") if p.is_file()]
    assert len(kept) == 3, f"the claimed inputs of {name} are not all kept: {kept}"
    return status


# ---------------------------------------------------------------------------- disk and folders


def test_full_outbox_holds_the_job_without_partial_files_and_resumes_when_space_returns(daemon: Daemon):
    d = need_ns(daemon)
    outbox = d.dirs.outbox
    d.ns("mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "inpaintd-test-full", str(outbox))
    try:
        viewed = d.viewed_dirs()
        filler = viewed.outbox / "filler.bin"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass  # ENOSPC: the outbox is full
        finally:
            os.close(fd)
        drop_job(d.dirs.inbox, "full-1", size=(200, 200))
        status = assert_held(d, viewed, "full-1", "disk_full")
        assert "space" in status["health"], status["health"]
        assert stray_files(viewed) == [], "a temp or partial file stayed in the full outbox"
        assert sorted(p.name for p in viewed.outbox.iterdir()) == ["filler.bin"]

        filler.unlink()
        data = one_done(viewed, "full-1", d, timeout=40)
        assert data["output_file"] == "full-1.png"
        assert stray_files(viewed) == []
        # The daemon clears "health" once the job is through, which is after its sidecar
        # appears (the claim is recorded as published first): allow it that moment.
        deadline = time.monotonic() + 5
        while read_status(d.dirs.state).get("health") is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_status(d.dirs.state).get("health") is None
    finally:
        d.ns("umount", "-l", str(outbox))
    assert d.alive()


def test_missing_outbox_holds_the_job_and_resumes_once_it_is_back(daemon: Daemon):
    dirs = daemon.dirs
    shutil.rmtree(dirs.outbox)
    try:
        drop_job(dirs.inbox, "no-outbox")
        status = assert_held(daemon, dirs, "no-outbox", "outbox_unwritable")
        assert "outbox" in status["health"]
    finally:
        dirs.outbox.mkdir(exist_ok=True)
    one_done(dirs, "no-outbox", daemon, timeout=40)


def test_read_only_outbox_holds_the_job_and_resumes_when_writable(daemon: Daemon):
    d = need_ns(daemon)
    outbox = str(d.dirs.outbox)
    d.ns("mount", "--bind", outbox, outbox)
    d.ns("mount", "-o", "remount,bind,ro", outbox)
    try:
        drop_job(d.dirs.inbox, "ro-outbox")
        status = assert_held(d, d.dirs, "ro-outbox", "outbox_unwritable")
        assert "not writable" in status["health"] or "read-only" in status["health"].lower(), status["health"]
    finally:
        d.ns("umount", "-l", outbox)
    one_done(d.dirs, "ro-outbox", d, timeout=40)


def test_inbox_deleted_and_recreated_is_watched_again(daemon: Daemon, tmp_path: Path):
    dirs = daemon.dirs
    shutil.rmtree(dirs.inbox)
    time.sleep(1.5)
    assert daemon.alive(), daemon.log_tail()
    dirs.inbox.mkdir()
    drop_job(dirs.inbox, "inbox-recreated-1")
    one_done(dirs, "inbox-recreated-1", daemon, timeout=30)

    # Replaced whole by a rename, with a job already inside.
    staged = dirs.root / "inbox.new"
    staged.mkdir()
    drop_job(staged, "inbox-recreated-2")
    shutil.rmtree(dirs.inbox)
    staged.rename(dirs.inbox)
    one_done(dirs, "inbox-recreated-2", daemon, timeout=30)


def test_input_mtimes_far_in_the_future_or_past_do_not_block_jobs(daemon: Daemon):
    dirs = daemon.dirs
    future = time.time() + 365 * 86400
    for name, stamp in (("mtime-future", future), ("mtime-past", 0.0)):
        for path in drop_job(dirs.inbox, name):
            temp = path.with_name(f".{path.name}.tmp")
            os.rename(path, temp)
            os.utime(temp, (stamp, stamp))
            os.rename(temp, path)  # renamed into place inside the inbox, mtime already odd
    for name in ("mtime-future", "mtime-past"):
        one_done(dirs, name, daemon, timeout=30)


# ---------------------------------------------------------------------------- clock jumps


def test_wall_clock_jumps_back_and_forward_while_running(tiny_model: Path, tmp_path: Path):
    """libfaketime moves the daemon's wall clock (CLOCK_REALTIME) while CLOCK_MONOTONIC runs on,
    which is what an NTP step or an RTC-less board setting its clock late looks like."""
    if not os.path.exists(LIBFAKETIME):
        pytest.skip(f"{LIBFAKETIME} missing (apt-get install faketime); a real clock jump needs CAP_SYS_TIME")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    dirs = Dirs.make(tmp_path / "d", tiny_model, SETTINGS)
    env = {
        "LD_PRELOAD": LIBFAKETIME,
        "FAKETIME_TIMESTAMP_FILE": str(clock),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    d = Daemon(dirs, env=env).start()
    try:
        finished = {}
        for name, offset in (("clock-now", "+0"), ("clock-back", "-2d"), ("clock-forward", "+30d")):
            clock.write_text(f"{offset}\n")
            time.sleep(0.3)
            drop_job(dirs.inbox, name)
            finished[name] = one_done(dirs, name, d, timeout=30)["finished"]
        # The daemon saw the jumps (its timestamps moved with them) and kept working.
        assert finished["clock-back"][:10] < finished["clock-now"][:10] < finished["clock-forward"][:10], finished
        assert d.alive()
    finally:
        clock.write_text("+0\n")
        d.stop()


def test_wall_clock_stepped_back_reorders_nothing_and_no_wait_is_negative(tiny_model: Path, tmp_path: Path):
    """Issue 22: jobs queued behind long ones, the wall clock stepped back a day between two
    arrivals. The queue runs them in the order they arrived (not by the stepped wall stamps),
    and no sidecar reports a negative queue wait."""
    if not os.path.exists(LIBFAKETIME):
        pytest.skip(f"{LIBFAKETIME} missing (apt-get install faketime); a real clock jump needs CAP_SYS_TIME")
    clock = tmp_path / "faketime"
    clock.write_text("+0\n")
    dirs = Dirs.make(tmp_path / "d", tiny_model, SETTINGS)
    env = {"LD_PRELOAD": LIBFAKETIME, "FAKETIME_TIMESTAMP_FILE": str(clock), "FAKETIME_NO_CACHE": "1",
           "DONT_FAKE_MONOTONIC": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    d = Daemon(dirs, env=env).start()
    claimed = dirs.state / "claimed"

    def wait_claimed(name: str) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if not any(dirs.inbox.glob(f"{name}*")) and any(claimed.glob(f"*/inputs/{name}.png")):
                return
            time.sleep(0.05)
        pytest.fail(f"{name} was not claimed\n{d.log_tail()}")

    try:
        # Enough queued work that the three later jobs are all claimed before the first of them
        # starts (a busy job takes ~1.3 s on a fast runner; the order is checked from the log below).
        busy = [f"busy{i}" for i in range(12)]
        for name in busy:
            drop_job(dirs.inbox, name, prompt=None, size=(768, 768))
            put(dirs.inbox / f"{name}.yaml", b"prompt: slow\nsteps: 150\n")
        for name in busy:
            wait_claimed(name)
        order = ["early", "middle", "late"]
        for name, step in zip(order, ("-1d", "-2d", "-2d")):
            drop_job(dirs.inbox, name)
            wait_claimed(name)
            clock.write_text(f"{step}\n")  # stepped back after each claim, while the busy jobs run
            time.sleep(0.3)
        found = wait_for(dirs, [*busy, *order], 120, d)
        assert set(found) >= {*busy, *order}, missing_report(dirs, [*busy, *order], found, d)
        # The log's line order is the real order (its stamps are the stepped wall clock's): every
        # later job was ready before the first of them started, so the queue really chose.
        events = [(e.get("event"), e.get("job")) for e in d.events()]
        last_ready = max(i for i, (event, job) in enumerate(events) if event == "job.ready" and job in order)
        first_start = min(i for i, (event, job) in enumerate(events) if event == "job.started" and job in order)
        assert last_ready < first_start, "the busy jobs ended too soon\n" + d.log_tail(60)
        started = [job for event, job in events if event == "job.started"]
        assert [n for n in started if n in order] == order, started
        for name in [*busy, *order]:
            data = found[name][0].data
            assert found[name][0].kind == "done", data
            assert data["queue_wait_seconds"] >= 0, (name, data["queue_wait_seconds"])
        durations = [e["seconds"] for e in d.events() if e.get("event") == "job.done"]
        assert len(durations) == len(busy) + len(order) and min(durations) >= 0, durations  # measured, not wall differences
        # The stamps still follow the wall clock: the late jobs' arrivals are days before the first's.
        assert found["late"][0].data["arrived"][:10] < found["early"][0].data["arrived"][:10]
        assert d.alive()
    finally:
        clock.write_text("+0\n")
        d.stop()


# ---------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def killable(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Daemon:
    """One daemon for the kill -9 tests: each kills it at its moment and restarts it."""
    dirs = Dirs.make(tmp_path_factory.mktemp("killable"), tiny_model, SETTINGS)
    d = Daemon(dirs).start()
    yield d
    if d.alive():
        d.stop()


def after_restart_each_job_has_one_outcome(d: Daemon, names: list[str]) -> dict:
    d.start()
    found = wait_for(d.dirs, names, 40, d)
    claimed = d.dirs.state / "claimed"
    deadline = time.monotonic() + 10
    while any(claimed.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)  # the sidecar is out; archiving the inputs follows
    assert set(names) <= set(found), missing_report(d.dirs, names, found, d)
    for name in names:
        assert len(found[name]) == 1, f"{name}: {[o.path.name for o in found[name]]}"
    assert stray_files(d.dirs) == [], "temp files left visible in the outbox after kill -9"
    sidecars = {p.stem for p in d.dirs.outbox.glob("*.json")}
    orphans = sorted(p.name for p in d.dirs.outbox.iterdir() if p.suffix != ".json" and p.stem not in sidecars)
    assert orphans == [], f"images without a sidecar left in the outbox: {orphans}"
    assert not list((d.dirs.state / "claimed").iterdir())
    return found


def test_kill_9_while_files_settle_loses_nothing(killable: Daemon):
    d = killable
    drop_job(d.dirs.inbox, "k-settle")
    time.sleep(0.05)
    d.kill9()
    found = after_restart_each_job_has_one_outcome(d, ["k-settle"])
    assert found["k-settle"][0].kind == "done"


def test_kill_9_during_denoising_reruns_the_job_once(killable: Daemon):
    d = killable
    inbox = d.dirs.inbox
    drop_job(inbox, "k-denoise", prompt=None)
    put(inbox / "k-denoise.yaml", b"prompt: slow\nsteps: 150\n")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        current = read_status(d.dirs.state).get("current") or {}
        if current.get("name") == "k-denoise" and (current.get("step") or 0) >= 2:
            break
        time.sleep(0.02)
    else:
        pytest.fail("the job never reached step 2\n" + d.log_tail())
    d.kill9()
    found = after_restart_each_job_has_one_outcome(d, ["k-denoise"])
    result = found["k-denoise"][0]
    assert result.kind == "done"
    assert result.data["attempts"] == 2


def test_kill_9_between_image_and_sidecar_leaves_one_result_and_no_orphan(killable: Daemon):
    d = killable
    watch = DirWatch(d.dirs.outbox)
    try:
        drop_job(d.dirs.inbox, "k-publish", size=(400, 400))
        hit = watch.wait_for(lambda n: n == "k-publish.png", timeout=30)
        d.kill9()
    finally:
        watch.close()
    assert hit, "the image was never published\n" + d.log_tail()
    landed = (d.dirs.outbox / "k-publish.png").exists() and not (d.dirs.outbox / "k-publish.json").exists()
    found = after_restart_each_job_has_one_outcome(d, ["k-publish"])
    assert found["k-publish"][0].kind == "done"
    if not landed:
        pytest.skip("the kill landed after the sidecar this time (the invariants held anyway)")
