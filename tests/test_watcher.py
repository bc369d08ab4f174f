"""watcher: real watchdog observers (inotify and polling) on real directories."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import pytest
from inpaintd.intake.grouping import Hint
from inpaintd.intake.watcher import (
    Change,
    Watcher,
    choose_observer,
    filesystem_type,
    is_network_fs,
)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.rescans: list[str] = []
        self.lock = threading.Lock()

    def change(self, c: Change) -> None:
        with self.lock:
            self.changes.append(c)

    def rescan(self, why: str) -> None:
        with self.lock:
            self.rescans.append(why)

    def wait_for(self, predicate, timeout: float = 5.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if predicate(self):
                    return True
            time.sleep(0.02)
        return False

    def hints(self, path: str) -> list[Hint]:
        return [c.hint for c in self.changes if c.path == path]


@pytest.fixture(params=["inotify", "polling"])
def watched(request, tmp_path: Path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    rec = Recorder()
    before = set(threading.enumerate())
    w = Watcher(inbox, rec.change, rec.rescan, observer=request.param, poll_interval=0.1)
    w.start()
    yield inbox, rec, w
    w.stop()
    leaked = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leaked, f"threads left running: {leaked}"


def test_a_new_file_is_reported_and_inotify_reports_its_close(watched):
    inbox, rec, w = watched
    with open(inbox / "a.png", "wb") as f:
        f.write(b"x" * 100)
        f.flush()
        assert rec.wait_for(lambda r: "a.png" in {c.path for c in r.changes})
        if w.kind == "inotify":
            assert Hint.CLOSE not in rec.hints("a.png")
            assert Hint.WRITE in rec.hints("a.png")
    if w.kind == "inotify":
        assert rec.wait_for(lambda r: Hint.CLOSE in r.hints("a.png"))
        assert rec.hints("a.png")[-1] is Hint.CLOSE
    else:
        assert set(rec.hints("a.png")) <= {Hint.CHANGE}
    assert w.healthy()


def test_a_file_renamed_into_its_final_name_is_reported_under_that_name(watched):
    inbox, rec, w = watched
    (inbox / "b.png.part").write_bytes(b"data")
    os.rename(inbox / "b.png.part", inbox / "b.png")
    assert rec.wait_for(lambda r: Hint.CHANGE in r.hints("b.png"))


def test_a_complete_file_moved_in_from_outside_is_never_taken_for_an_open_writer(watched, tmp_path: Path):
    inbox, rec, w = watched
    outside = tmp_path / "staging"
    outside.mkdir()
    (outside / "m.png").write_bytes(b"complete")
    (outside / "job").mkdir()
    (outside / "job" / "image.png").write_bytes(b"complete too")
    time.sleep(0.2)
    os.rename(outside / "m.png", inbox / "m.png")  # a bare IN_MOVED_TO: no close will follow
    os.rename(outside / "job", inbox / "job")  # a folder: its files are listed as synthetic events
    assert rec.wait_for(lambda r: r.hints("m.png") and r.hints("job/image.png"))
    time.sleep(0.3)
    with rec.lock:
        assert Hint.WRITE not in rec.hints("m.png") and Hint.CHANGE in rec.hints("m.png")
        assert Hint.WRITE not in rec.hints("job/image.png")


def test_files_inside_a_job_folder_are_reported_with_their_folder(watched):
    inbox, rec, w = watched
    (inbox / "job").mkdir()
    time.sleep(0.3)  # let inotify add the new folder's watch (and polling see it)
    (inbox / "job" / "image.png").write_bytes(b"x")
    assert rec.wait_for(lambda r: "job/image.png" in {c.path for c in r.changes})


def test_an_inotify_queue_overflow_asks_for_a_rescan(tmp_path: Path):
    rec = Recorder()
    w = Watcher(tmp_path, rec.change, rec.rescan, observer="inotify")
    w.start()
    try:
        # watchdog reports the kernel's IN_Q_OVERFLOW only through this logger warning.
        logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
        assert rec.rescans == ["inotify queue overflow"]
    finally:
        w.stop()
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed")
    assert len(rec.rescans) == 1  # a stopped watcher no longer listens


def test_a_dead_observer_is_noticed_and_restarted_with_a_rescan(tmp_path: Path):
    rec = Recorder()
    w = Watcher(tmp_path, rec.change, rec.rescan, observer="polling", poll_interval=0.1)
    w.start()
    try:
        w._observer.stop()  # as if its thread had died
        w._observer.join()
        assert not w.healthy()
        w.restart("observer died")
        assert w.healthy() and rec.rescans == ["observer died"]
        (tmp_path / "c.png").write_bytes(b"x")
        assert rec.wait_for(lambda r: "c.png" in {c.path for c in r.changes})
    finally:
        w.stop()


def test_auto_polls_network_and_fuse_filesystems(tmp_path: Path):
    mounts = tmp_path / "mounts"
    share = tmp_path / "share"
    share.mkdir()
    for fs_type, expected in (("cifs", "polling"), ("nfs4", "polling"), ("fuse.sshfs", "polling"),
                              ("ext4", "inotify"), ("tmpfs", "inotify")):
        mounts.write_text(f"/dev/sda1 / ext4 rw 0 0\nserver:/x {share} {fs_type} rw 0 0\n")
        assert filesystem_type(share / "inbox", str(mounts)) == fs_type
        assert choose_observer("auto", share / "inbox", str(mounts)) == expected
    assert choose_observer("inotify", share, str(mounts)) == "inotify"
    assert choose_observer("polling", tmp_path, str(mounts)) == "polling"
    assert not is_network_fs(None) and is_network_fs("smb3")


def test_a_folder_assembled_under_a_dot_name_in_the_inbox_and_renamed_ends_closed(tmp_path: Path) -> None:
    """Writes made before the rename can be reported under the new name afterwards; the moved-in
    files must not stay "being written" (the job would wait incomplete_timeout)."""
    from inpaintd.intake.grouping import merge_hint

    rec = Recorder()
    watcher = Watcher(tmp_path, rec.change, rec.rescan, observer="inotify")
    watcher.start()
    try:
        for index in range(4):
            staging = tmp_path / f".tmp-{index}"
            staging.mkdir()
            for name in ("image.png", "mask.png", "prompt.txt"):
                (staging / name).write_bytes(b"x" * 1000)
            os.rename(staging, tmp_path / f"job{index}")
        wanted = [f"job{i}/{n}" for i in range(4) for n in ("image.png", "mask.png", "prompt.txt")]
        assert rec.wait_for(lambda r: all(r.hints(p) for p in wanted))
        time.sleep(0.5)  # let late events for the old writes arrive too
        for path in wanted:
            final = None
            for hint in rec.hints(path):
                final = merge_hint(final, hint)
            assert final is not Hint.WRITE, (path, rec.hints(path))
    finally:
        watcher.stop()


def test_a_share_mounted_over_the_inbox_after_start_makes_the_watcher_choose_again(tmp_path: Path, monkeypatch):
    """The intake replaces a watcher that says it is unhealthy; after a mount (another
    filesystem under the inbox) it must say so, and the new one polls."""
    from inpaintd.intake import watcher as watcher_mod

    under = {"type": "ext4"}
    monkeypatch.setattr(watcher_mod, "filesystem_type", lambda path, mounts_file="/proc/mounts": under["type"])
    w = Watcher(tmp_path, lambda c: None, lambda r: None, observer="auto")
    assert w.kind == "inotify"
    w.start()
    try:
        assert w.healthy()
        under["type"] = "fuse.sshfs"  # a share mounted over the inbox
        assert not w.healthy()
        assert Watcher(tmp_path, lambda c: None, lambda r: None, observer="auto").kind == "polling"
    finally:
        w.stop()
