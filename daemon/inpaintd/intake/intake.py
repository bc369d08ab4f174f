"""The intake thread: inbox -> claims, each job inside its own boundary.

It watches the inbox (watcher), folds what it sees into jobs (grouping: pure), probes
images for alpha (images.probe_alpha: bounded, never raises), claims ready jobs into
state/claimed/ (spool) and puts them in the worker's arrival queue, and claims rejected ones
straight into failed/ (records.fail_claim). Each rejection and each claim runs inside
`_guarded`: whatever it raises backs off that job alone and the look goes on, so no file in
the inbox can keep other jobs from being claimed.
"""

from __future__ import annotations

import errno
import os
import queue
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import structlog

from ..core import boundary
from ..core.boundary import retry_delay
from ..core.config import Config
from ..core.errors import JobError
from ..core.ordering import fair_order
from ..core.quoting import bounded, for_display, shorten
from ..paint import images
from ..store import fsutil, records, space
from ..store.spool import Claim, Spool
from ..store.status import StatusFile, error_summary
from . import grouping
from .grouping import Rules
from .scan import scan_inbox
from .watcher import Change, Watcher

log = structlog.get_logger("inpaintd.intake")

UNMOVABLE_AFTER = 4  # failed tries in a row (about 30 s) before an entry is called unmovable


def rules_for(config: Config, name_max: int = 255) -> Rules:
    return Rules(
        settle_seconds=config.watch.settle_seconds,
        incomplete_timeout=config.watch.incomplete_timeout,
        abandoned_timeout=config.watch.abandoned_timeout,
        require_prompt=not config.inference.prompt.strip(),
        max_input_bytes=config.limits.max_input_bytes,
        name_max=name_max,
    )


def name_max(config: Config) -> int:
    """The longest file name (bytes) every folder a job's names land in accepts."""
    limits = []
    for folder in config.folders().values():
        try:
            limits.append(os.pathconf(folder, "PC_NAME_MAX"))
        except (OSError, ValueError):
            continue
    return min(limits, default=255)


class Intake(threading.Thread):
    """Inbox -> claims. Owns the watcher and what is known about each inbox entry."""

    def __init__(self, config: Config, spool: Spool, jobs: "queue.Queue[Claim]", status: StatusFile) -> None:
        super().__init__(name="inpaintd-intake", daemon=True)
        self.config = config
        self.spool = spool
        self.jobs = jobs
        self.status = status
        self.stop_event = threading.Event()
        self.wakeup = threading.Event()
        self.heartbeat = time.monotonic()
        self._lock = threading.Lock()
        self._hints: dict[str, grouping.Hint] = {}
        self._rescan = True
        self._seen: dict[str, grouping.Seen] = {}
        self._detected: set[str] = set()
        self._skipped: set[str] = set()
        self._backoff: dict[str, tuple[float, int]] = {}  # job name -> (retry at, failures in a row)
        self._waiting_count: int | None = None
        self._recorded_unmovable: set[str] = set()
        self._folders_left = False  # a job folder left the inbox since the watch was (re)started
        self.watcher: Watcher | None = None
        self._restart_watcher = True
        self._wall_offset: float | None = None
        self.disk_guard: str | None = None  # why the low-disk guard stops claiming; None: it does not

    # watcher callbacks (observer thread)
    def on_change(self, change: Change) -> None:
        with self._lock:
            self._hints[change.path] = grouping.merge_hint(self._hints.get(change.path), change.hint)
        self.wakeup.set()

    def on_rescan(self, reason: str) -> None:
        log.warning("watch.rescan", reason=reason)
        with self._lock:
            self._rescan = True
        self.wakeup.set()

    def reconfigure(self, config: Config) -> None:
        """Called by the worker between jobs; the watcher restarts when the inbox or observer changed."""
        old, self.config = self.config, config
        if (old.paths.inbox, old.watch.observer, old.watch.poll_interval) != (
            config.paths.inbox, config.watch.observer, config.watch.poll_interval
        ):
            with self._lock:
                self._seen = {}
                self._rescan = True
                self._restart_watcher = True
        self.wakeup.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wakeup.set()

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.heartbeat = time.monotonic()
                delay = self.config.watch.rescan_interval
                try:
                    # The watcher first: starting it can take a while on a busy machine, and
                    # `now` must not predate the scan (settling would be cut short).
                    self._ensure_watcher()
                    delay = self.tick(time.monotonic())
                except Exception:  # noqa: BLE001 - one bad scan must not end the intake
                    log.exception("intake.error")
                    delay = min(5.0, self.config.watch.rescan_interval)
                self.wakeup.wait(delay)
                self.wakeup.clear()
        finally:
            if self.watcher is not None:
                self.watcher.stop()

    def watch(self) -> None:
        """Start watching the inbox now, before the service says READY: a writer that opens a
        file after READY must be seen opening it (else only settling holds the file back, and a
        slow writer pausing longer than settle_seconds would be taken mid-write)."""
        try:
            self._ensure_watcher()
        except OSError as exc:
            log.warning("watch.start_failed", inbox=str(self.config.paths.inbox), error=str(exc),
                        note="retried at every look")

    def _ensure_watcher(self) -> None:
        if self._restart_watcher or self.watcher is None or not self.watcher.healthy():
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher = None
            watch = self.config.watch
            watcher = Watcher(
                self.config.paths.inbox, self.on_change, self.on_rescan,
                observer=watch.observer, poll_interval=watch.poll_interval,
            )
            watcher.start()  # OSError while the inbox is missing: retried next tick
            self.watcher = watcher
            self._restart_watcher = False

    def tick(self, now: float) -> float:
        """One look at the inbox; returns how long to wait before the next one at most."""
        config = self.config
        inbox = config.paths.inbox
        self._ensure_watcher()
        with self._lock:
            hints, self._hints = self._hints, {}
            rescan, self._rescan = self._rescan, False
        seen = grouping.forget_writes(self._seen) if rescan else self._seen
        seen = grouping.observe(seen, scan_inbox(inbox), hints, now)
        rules = rules_for(config, name_max(config))
        plan = grouping.plan(seen, now, rules)
        for path in plan.probe:
            seen = grouping.with_alpha(seen, path, images.probe_alpha(inbox / path))  # never raises
        if plan.probe:
            plan = grouping.plan(seen, now, rules)
        self._seen = seen
        self._log_plan(plan)

        # Each rejection and each claim runs inside its own boundary: whatever one job's files
        # raise, the job waits (with back-off) and every other job flows on.
        disk_low = self._disk_low()
        for rejected in plan.rejected if not disk_low else ():
            self._guarded(rejected.name, rejected.entries, now, self._reject, inbox, rejected)
        offset = self._wall_clock_offset()
        left_ready = False
        queued = self._queued_per_owner()
        cap = config.limits.max_queued_per_owner
        for group, owner in self._fair_order(plan.ready, inbox, queued) if not disk_low else ():
            if self.stop_event.is_set():
                break
            if config.fleet.enabled and self.jobs.qsize() >= config.fleet.prefetch:
                # On a shared inbox a device takes only what it will paint soon, and leaves the
                # rest to the devices that are free: the load spreads instead of going to the
                # fastest poller.
                left_ready = True
                break
            if cap and queued.get(owner, 0) >= cap:
                left_ready = True  # waits in the inbox until this owner's queue shrinks
                continue
            self._guarded(group.name, group.entries, now, self._claim, inbox, group, group.arrived + offset)
            queued[owner] = queued.get(owner, 0) + 1
        if self.disk_guard is not None and plan.ready:
            left_ready = True  # look again soon: claiming resumes as soon as space is back
        if len(plan.waiting) != self._waiting_count:
            self._waiting_count = len(plan.waiting)
            self.status.update(waiting_in_inbox=len(plan.waiting))
        pending = plan.waiting or plan.probe or left_ready
        if self._folders_left and not pending and not plan.ready and not plan.rejected and self.watcher is not None:
            # The recursive inotify watch keeps watches on the subfolders of job folders that
            # left the inbox (they follow the inode); a drop of thousands of them would exhaust
            # max_user_watches for everyone. A fresh watch holds only what the inbox holds; done
            # while nothing is waiting, so no writer's open/close state is lost.
            self._folders_left = False
            log.info("watch.renewed", reason="release the watches of job folders that left the inbox")
            self.watcher.stop()
            self.watcher.start()
            with self._lock:
                self._rescan = True  # a file that came during the gap is found by the next look
        if pending:
            return max(0.05, min(0.25, config.watch.settle_seconds / 4))
        return config.watch.rescan_interval

    def _queued_per_owner(self) -> dict[int, int]:
        per_owner = getattr(self.jobs, "per_owner", None)
        return dict(per_owner()) if per_owner is not None else {}

    def _fair_order(self, ready: tuple[grouping.JobGroup, ...], inbox: Path,
                    queued: dict[int, int]) -> list[tuple[grouping.JobGroup, int]]:
        """Ready jobs with their owners, in the order to claim them: owners in turn (the fewest
        queued first), so that claiming a flood never makes another owner's job wait for it."""
        owned = [(group, _owner(inbox, group.folder or group.image)) for group in ready]
        if not self.config.limits.fair_share:
            return owned
        order = fair_order([(owner, index) for index, (_, owner) in enumerate(owned)], queued)
        return [owned[i] for i in order]

    def _disk_low(self) -> bool:
        """The low-disk guard (store/space.py), looked at once per look at the inbox."""
        limits = self.config.limits
        folders = {name: path for name, path in self.config.folders().items() if name in space.WRITTEN}
        low = space.low_space(space.free_space(folders), limits.min_free_bytes, limits.min_free_fraction)
        guard = "; ".join(low.values()) if low else None
        if guard != self.disk_guard:
            if guard is not None:
                log.warning("disk.low", reason=guard, note="no new job is claimed; they wait in the inbox")
                self.status.update(disk_guard=shorten(f"{guard}: not claiming new jobs", 300))
            else:
                log.info("disk.ok", note="space is back; claiming resumes")
                self.status.update(disk_guard=None)
            self.disk_guard = guard
        return guard is not None

    def _wall_clock_offset(self) -> float:
        """Wall time minus monotonic time, to date arrivals (first seen, monotonic) for claims.

        Held fixed: reading the wall clock per claim gave jobs first seen together arrivals
        seconds apart (claiming 500 jobs takes that long), so the queue and the sidecars
        disagreed with the real order. Taken again only when the wall clock jumped (an NTP
        step), so timestamps follow the jump.
        """
        offset = time.time() - time.monotonic()
        if self._wall_offset is None or abs(offset - self._wall_offset) > 1.0:
            self._wall_offset = offset
        return self._wall_offset

    def _log_plan(self, plan: grouping.Plan) -> None:
        names = {w.name for w in plan.waiting} | {j.name for j in plan.ready} | {r.name for r in plan.rejected}
        for name in sorted(names - self._detected):
            log.info("job.detected", job=name)
        self._detected = names
        ignored = {path for path, _ in plan.ignored}
        for path, why in plan.ignored:
            if path not in self._skipped:
                log.info("file.skipped", file=path, reason=why, job=None)
        self._skipped = ignored

    def _guarded(self, name: str, entries: tuple[str, ...], now: float, operation: Callable[..., None],
                 *args: Any) -> None:
        """Run one job's intake operation; anything it raises backs that job off, and only it."""
        retry_at, failures = self._backoff.get(name, (0.0, 0))
        if retry_at > now:
            return
        try:
            operation(*args)
        except Exception as exc:  # noqa: BLE001 - fault isolation: one job's files, not the intake
            failures += 1
            delay = retry_delay(failures, base=2.0)
            verdict = boundary.classify(exc, self.config.folders())
            if failures >= UNMOVABLE_AFTER and self._unmovable(exc):
                # The inbox takes writes, but this entry cannot be moved out of it (a read-only
                # folder: renaming a folder to another parent needs write permission on it).
                # Say so in failed/ once; look again only after incomplete_timeout.
                delay = self.config.watch.incomplete_timeout
                if name not in self._recorded_unmovable:
                    self._record_unmovable(name, entries, exc)
            self._backoff[name] = (now + delay, failures)
            log.error("job.intake_failed", job=name, code=verdict.code, error=verdict.message,
                      retry_in_seconds=delay, exc_info=verdict.unexpected)
            self.status.update(health=for_display(f"cannot take {name}: {verdict.message}, retrying", 300))
            return
        self._recorded_unmovable.discard(name)
        if failures:
            self._backoff.pop(name, None)
            self.status.update(health=None)

    def _unmovable(self, exc: Exception) -> bool:
        """A permission error on the entry itself while the inbox is writable."""
        if not isinstance(exc, OSError) or exc.errno not in (errno.EACCES, errno.EPERM):
            return False
        inbox = self.config.paths.inbox
        try:
            fd, probe = tempfile.mkstemp(prefix=fsutil.own_temp_prefix(), dir=inbox)
            os.close(fd)
            os.unlink(probe)
        except OSError:
            return False  # the inbox itself refuses writes: ours to fix, keep retrying
        return True

    def _record_unmovable(self, name: str, entries: tuple[str, ...], exc: Exception) -> None:
        error = JobError(
            "input_unmovable",
            shorten(f"inpaintd may not move {name} out of the inbox ({getattr(exc, 'strerror', exc)}); it stays "
                    "there, untouched. A folder must be writable by the inpaintd-drop group (a read-only folder "
                    "copied with scp -rp or rsync -a is not): fix its permissions and it is taken then"),
            {"left_in_inbox": list(entries)},
        )
        try:
            path = records.record_without_inputs(self.config.paths.failed, name, error, time.time())
        except Exception as again:  # noqa: BLE001 - the next look tries again
            log.warning("job.unmovable_unrecorded", job=name, error=shorten(str(again)))
            return
        self._recorded_unmovable.add(name)
        log.warning("job.failed", job=name, code=error.code, error=error.message, failed=str(path))
        self.status.increment("jobs_failed")
        self.status.update(last_error=error_summary(name, error.code, error.message))

    def _forget(self, entries: tuple[str, ...]) -> None:
        for path in list(self._seen):
            if path in entries or path.split("/", 1)[0] in entries:
                del self._seen[path]

    def _claim(self, inbox: Path, group: grouping.JobGroup, arrived: float) -> None:
        claim = self.spool.claim(inbox, group, arrived, seen=group.arrived)
        if claim is None:
            return
        self._forget(group.entries)
        self._folders_left = self._folders_left or group.folder is not None
        log.info("job.ready", job=group.name, job_id=claim.job_id, files=list(group.entries))
        self.jobs.put(claim)

    def _reject(self, inbox: Path, rejected: grouping.Rejected) -> None:
        """Claim the rejected entries (so one daemon records them), then file them in failed/.

        What cannot be filed now (failed/ full or unwritable) goes to the worker as a claim in
        state failing, which holds and retries it beside the queue.
        """
        folder = None
        if len(rejected.entries) == 1 and stat.S_ISDIR(os.lstat(inbox / rejected.entries[0]).st_mode):
            folder = rejected.entries[0]
        rejection = {"code": rejected.code, "message": shorten(rejected.message), "details": bounded(dict(rejected.details))}
        claim = self.spool.claim_rejected(inbox, rejected.name, rejected.entries, folder, time.time(), rejection)
        if claim is None:
            return
        self._forget(rejected.entries)
        self._folders_left = self._folders_left or folder is not None
        error = JobError(rejected.code, rejection["message"], rejection["details"])
        try:
            path = records.fail_claim(self.spool, claim, error, self.config.paths.failed, time.time())
        except Exception as exc:  # noqa: BLE001 - the worker holds and retries it
            log.warning("job.failed_later", job=rejected.name, job_id=claim.job_id, code=rejected.code,
                        error=shorten(str(exc)), note="claimed; recorded in failed/ once it can be written")
            self.jobs.put(claim)
            return
        log.warning("job.failed", job=rejected.name, job_id=claim.job_id, code=rejected.code,
                    error=rejection["message"], failed=str(path) if path else None)
        self.status.increment("jobs_failed")
        self.status.update(last_error=error_summary(rejected.name, rejected.code, rejected.message))


def _owner(inbox: Path, entry: str) -> int:
    """Who dropped a job: the owner of its folder, else of its image (-1 when it is gone)."""
    try:
        return os.lstat(inbox / entry).st_uid
    except OSError:
        return -1
