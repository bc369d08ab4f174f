"""watchdog glue: filesystem events in, "something changed at PATH" out.

The watcher knows nothing about jobs. It turns watchdog events below the inbox into
`Change(path, hint)` values (path relative to the inbox) and calls `on_change`; when events
may have been lost (inotify queue overflow, an observer thread that died) it calls
`on_rescan` so the intake re-reads the whole inbox. Only inotify reports writes and closes;
the polling observer reports that something changed, and settling does the rest.

"Created" means a writer has the file open (WRITE: wait for its close), but only for a real
IN_CREATE. A file renamed in from outside the inbox (a bare IN_MOVED_TO) arrives complete and no
close follows: the observer runs with watchdog's full events so that this is a move with no
source, reported as CHANGE (complete once settled), and the files of a folder moved in, which
watchdog reports as synthetic "created" events, are CHANGE too.

Observer choice: "inotify", "polling", or "auto" (inotify unless the inbox is on a network
or FUSE filesystem, where inotify does not see writes made by other machines). The choice is
made again whenever the filesystem under the inbox changes (a share mounted over the folder
after start, or unmounted): `healthy` then says False and the intake starts a new watcher.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog
from watchdog.events import (
    EVENT_TYPE_ATTRIB,
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_DELETED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    FileSystemEvent,
    FileSystemEventHandler,
)

from .grouping import Hint

log = structlog.get_logger("inpaintd.watcher")

# Filesystems where inotify misses changes made by other hosts: poll them.
NETWORK_FS_TYPES = frozenset(
    {
        "nfs", "nfs4", "cifs", "smb", "smb2", "smb3", "smbfs", "9p", "afs", "ceph", "glusterfs",
        "lustre", "gpfs", "ncpfs", "davfs", "virtiofs", "vboxsf", "vmhgfs",
    }
)
_INOTIFY_LOGGER = "watchdog.observers.inotify_c"


@dataclass(frozen=True)
class Change:
    path: str  # relative to the inbox, "/"-separated
    hint: Hint


def filesystem_type(path: Path, mounts_file: str = "/proc/mounts") -> str | None:
    """The type of the filesystem holding path (longest matching mount point), or None."""
    try:
        target = os.path.realpath(path)
        with open(mounts_file, encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    best, best_type = "", None
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        mount = fields[1].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
        if (target == mount or target.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, best_type = mount, fields[2]
    return best_type


def is_network_fs(fs_type: str | None) -> bool:
    if fs_type is None:
        return False
    return fs_type in NETWORK_FS_TYPES or fs_type.startswith("fuse.") or fs_type == "fuse"


def _filesystem_of(path: Path) -> tuple[int, str | None] | None:
    """(device number, filesystem type) of the folder: changes when a mount comes or goes."""
    try:
        return os.stat(path).st_dev, filesystem_type(path)
    except OSError:
        return None


def choose_observer(setting: str, inbox: Path, mounts_file: str = "/proc/mounts") -> str:
    """"inotify" or "polling" for a watch.observer setting."""
    if setting in ("inotify", "polling"):
        return setting
    fs_type = filesystem_type(inbox, mounts_file)
    if is_network_fs(fs_type):
        log.info("watch.network_fs", inbox=str(inbox), fs_type=fs_type, observer="polling")
        return "polling"
    return "inotify"


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: "Watcher") -> None:
        self.watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.watcher._dispatch(event)


class _OverflowLog(logging.Handler):
    """watchdog reports a kernel queue overflow only as a log warning; turn it into a rescan."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(logging.WARNING)
        self.on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self.on_overflow()


class Watcher:
    """One watchdog observer on the inbox (recursive: job folders are watched too)."""

    def __init__(
        self,
        inbox: Path,
        on_change: Callable[[Change], None],
        on_rescan: Callable[[str], None],
        *,
        observer: str = "auto",
        poll_interval: float = 1.0,
    ) -> None:
        self.inbox = Path(inbox)
        self._root = os.path.abspath(self.inbox)
        self.on_change = on_change
        self.on_rescan = on_rescan
        self.setting = observer
        self.kind = choose_observer(observer, self.inbox)
        self._where = _filesystem_of(self.inbox)
        self.poll_interval = poll_interval
        self._observer = None
        self._overflow = _OverflowLog(lambda: self.on_rescan("inotify queue overflow"))
        self._lock = threading.Lock()

    @property
    def reports_writes(self) -> bool:
        return self.kind == "inotify"

    def start(self) -> None:
        with self._lock:
            self._observer = self._make_observer()
            self._observer.schedule(_Handler(self), self._root, recursive=True)
            if self.kind == "inotify":
                logging.getLogger(_INOTIFY_LOGGER).addHandler(self._overflow)
            self._observer.start()
        log.info("watch.started", inbox=self._root, observer=self.kind)

    def stop(self) -> None:
        with self._lock:
            observer, self._observer = self._observer, None
        logging.getLogger(_INOTIFY_LOGGER).removeHandler(self._overflow)
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join(timeout=5)

    def healthy(self) -> bool:
        """False when the observer or one of its emitter threads died (e.g. the inbox vanished)."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = observer.emitters
        if not (bool(emitters) and all(emitter.is_alive() for emitter in emitters)):
            return False
        where = _filesystem_of(self.inbox)
        if where != self._where:
            # A share mounted over the inbox (or gone): inotify on the old one sees nothing of
            # it, and a network filesystem needs polling. A new watcher chooses again.
            log.warning("watch.filesystem_changed", inbox=self._root, before=str(self._where), now=str(where),
                        observer=self.kind, next_observer=choose_observer(self.setting, self.inbox))
            return False
        return True

    def restart(self, reason: str) -> None:
        """Replace a dead observer and ask for a rescan; raises OSError while the inbox is missing."""
        log.warning("watch.restart", reason=reason, inbox=self._root)
        self.stop()
        self.start()
        self.on_rescan(reason)

    def _make_observer(self):  # type: ignore[no-untyped-def]
        if self.kind == "polling":
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll_interval)
        from watchdog.observers.inotify import InotifyObserver

        # Full events: an IN_MOVED_TO whose source is outside the inbox comes as a move (no
        # source), not as "created", which would be taken for a writer holding the file open.
        return InotifyObserver(generate_full_events=True)

    def _dispatch(self, event: FileSystemEvent) -> None:
        try:
            for change in self.translate(event):
                self.on_change(change)
        except Exception:  # noqa: BLE001 - the observer thread must survive a bad callback
            log.exception("watch.callback_failed")
            self.on_rescan("watch callback failed")

    def translate(self, event: FileSystemEvent) -> list[Change]:
        """Changes for one watchdog event (empty for events that change nothing we track)."""
        kind = event.event_type
        paths: list[tuple[str, Hint]] = []
        src = self._relative(event.src_path)
        if kind == EVENT_TYPE_MOVED:
            dest = self._relative(event.dest_path)
            if src is not None:
                paths.append((src, Hint.CHANGE))
            if dest is not None:
                # The files of a folder renamed into place come as synthetic moves. Writes made
                # before the rename can be reported after it under the new name (watchdog maps a
                # watch to its folder's current path), so these moves count as closes: a writer
                # still writing there afterwards reports new writes.
                moved_in_file = event.is_synthetic and not event.is_directory
                paths.append((dest, Hint.CLOSE if moved_in_file and self.reports_writes else Hint.CHANGE))
        elif kind in (EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED):
            if src is not None:
                # Synthetic "created" events list what a folder renamed into the inbox holds:
                # complete files, no writer.
                write = self.reports_writes and not event.is_directory and not event.is_synthetic
                paths.append((src, Hint.WRITE if write else Hint.CHANGE))
        elif kind == EVENT_TYPE_CLOSED:
            if src is not None:
                paths.append((src, Hint.CLOSE))
        elif kind in (EVENT_TYPE_DELETED, EVENT_TYPE_ATTRIB):
            if src is not None:
                paths.append((src, Hint.CHANGE))
        return [Change(p, h) for p, h in paths if p]

    def _relative(self, path: bytes | str) -> str | None:
        text = os.fsdecode(path) if path else ""
        if not text:
            return None
        rel = os.path.relpath(text, self._root)
        if rel == "." or rel.startswith(".." + os.sep) or rel == ".." or os.path.isabs(rel):
            return None
        return rel.replace(os.sep, "/")
