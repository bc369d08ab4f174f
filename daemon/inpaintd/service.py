"""The daemon: inbox -> claimed queue -> engine, one job at a time -> outbox.

Two threads. The intake thread watches the inbox, groups files into jobs (grouping), fails
what cannot become a job, and claims ready jobs into state/claimed/ (spool), putting them in
a queue of claims ordered by arrival (ArrivalQueue: FIFO by when a job's first file was seen,
not by when it became ready): paths, never decoded images. The main thread is the worker:

    while not stopping:
        ping the watchdog; reload the config if SIGHUP asked
        claim = queue.get(timeout)  ->  process(claim)

SIGTERM (or SIGINT) stops taking jobs and makes the running job raise Interrupted at its
next denoising step; the job stays claimed and is queued again at the next start. A timer
bounds the whole stop at service.shutdown_timeout; a second SIGTERM stops at once. Both
leave the claim untouched. SIGHUP reloads paths/watch/inference/output/limits/roi between
jobs; a changed model section is logged as needing a restart.
"""

from __future__ import annotations

import heapq
import itertools
import os
import queue
import signal
import socket
import stat
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from . import __version__, grouping, outbox, spool as spool_mod
from .config import Config, RoiConfig, load_config
from .errors import ConfigError, Interrupted, JobError, TransientError
from .grouping import Rules
from .spool import Claim, Spool
from .status import StatusFile
from .watcher import Change, Watcher

log = structlog.get_logger("inpaintd.service")


def work_shapes(roi: RoiConfig) -> list[tuple[int, int]]:
    """Every aspect-bucket (width, height) a job can run at (geometry.bucket_shapes)."""
    from .geometry import bucket_shapes

    return bucket_shapes(roi)


def warm_shapes(roi: RoiConfig, compile_mode: str) -> list[tuple[int, int]]:
    """The shapes start-up runs one step at before READY=1.

    A compiled UNet is specialised per input shape, so each working shape is compiled before
    READY rather than inside the first job of that shape. Eager kernels are not: one pass at
    the smallest shape already pages every weight in and touches every module, while 45
    passes (the default aspect buckets) at SD-1.5 size would keep READY waiting for minutes.
    """
    shapes = work_shapes(roi)
    return shapes if compile_mode != "off" else shapes[:1]


def retry_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Back-off before retrying a job after its n-th transient failure in a row."""
    return min(cap, base * 2 ** max(0, failures - 1))


def rules_for(config: Config) -> Rules:
    return Rules(
        settle_seconds=config.watch.settle_seconds,
        incomplete_timeout=config.watch.incomplete_timeout,
        require_prompt=not config.inference.prompt.strip(),
        max_input_bytes=config.limits.max_input_bytes,
    )


class _NullNotifier:
    backend = "none"

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _ping_period() -> float | None:
    """How often to send WATCHDOG=1: a quarter of systemd's interval; None when not watched."""
    try:
        from .notify import watchdog_interval

        interval = watchdog_interval()
    except Exception:  # noqa: BLE001
        return None
    return None if interval is None else interval / 4


def _notifier() -> Any:
    try:
        from .notify import Notifier

        return Notifier.from_env()
    except Exception:  # noqa: BLE001 - notifications are optional
        log.exception("notify.unavailable")
        return _NullNotifier()


# --------------------------------------------------------------------------- queue


class ArrivalQueue(queue.Queue):  # type: ignore[type-arg]
    """Claims waiting for the engine, oldest arrival first: FIFO by arrival, not by readiness.

    A job whose files took longer to be confirmed complete (a close lost in an inotify overflow,
    a slower upload of one part) goes ahead of queued jobs that arrived after it. Equal
    arrivals keep the order they were put in (the intake puts them oldest first).
    """

    def _init(self, maxsize: int) -> None:
        self.queue: list[tuple[float, int, Claim]] = []  # type: ignore[assignment]
        self._order = itertools.count()

    def _qsize(self) -> int:
        return len(self.queue)

    def _put(self, claim: Claim) -> None:
        heapq.heappush(self.queue, (claim.arrived, next(self._order), claim))

    def _get(self) -> Claim:
        return heapq.heappop(self.queue)[2]

    def names(self) -> list[str]:
        """Job names in the order they will run."""
        with self.mutex:
            return [claim.name for _, _, claim in sorted(self.queue)]


# --------------------------------------------------------------------------- intake


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
        self._retry_reject: dict[str, float] = {}
        self.watcher: Watcher | None = None
        self._restart_watcher = True
        self._wall_offset: float | None = None

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
        seen = grouping.observe(seen, spool_mod.scan_inbox(inbox), hints, now)
        rules = rules_for(config)
        plan = grouping.plan(seen, now, rules)
        for path in plan.probe:
            seen = grouping.with_alpha(seen, path, spool_mod.probe_alpha(inbox / path))
        if plan.probe:
            plan = grouping.plan(seen, now, rules)
        self._seen = seen
        self._log_plan(plan)

        for rejected in plan.rejected:
            self._reject(inbox, rejected, now)
        offset = self._wall_clock_offset()
        for group in plan.ready:
            if self.stop_event.is_set():
                break
            arrived = group.arrived + offset
            try:
                claim = self.spool.claim(inbox, group, arrived)
            except OSError as exc:
                # The files stay where they are and the next tick tries again; one job that
                # cannot be moved must not hold up the others behind it.
                log.warning("job.claim_failed", job=group.name, error=str(exc))
                self.status.update(health=f"cannot claim {group.name}: {exc.strerror or exc}, retrying")
                continue
            if claim is None:
                continue
            for path in list(self._seen):
                if path in group.entries or path.split("/", 1)[0] in group.entries:
                    del self._seen[path]
            log.info("job.ready", job=group.name, job_id=claim.job_id, files=list(group.entries))
            self.jobs.put(claim)
        self.status.update(waiting_in_inbox=len(plan.waiting))
        pending = plan.waiting or plan.probe
        if pending:
            return max(0.05, min(0.25, config.watch.settle_seconds / 4))
        return config.watch.rescan_interval

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

    def _reject(self, inbox: Path, rejected: grouping.Rejected, now: float) -> None:
        if self._retry_reject.get(rejected.name, 0.0) > now:
            return
        folder = None
        if len(rejected.entries) == 1 and stat.S_ISDIR(os.lstat(inbox / rejected.entries[0]).st_mode):
            folder = rejected.entries[0]
        error = JobError(rejected.code, rejected.message, dict(rejected.details))
        try:
            path = outbox.fail_entries(
                inbox, rejected.name, list(rejected.entries), folder, error, self.config.paths.failed, time.time()
            )
        except TransientError as exc:
            self._retry_reject[rejected.name] = now + 30.0
            log.error("job.failed_unmovable", job=rejected.name, code=exc.code, error=exc.message)
            self.status.update(health=exc.message)
            return
        self._retry_reject.pop(rejected.name, None)
        for path_ in list(self._seen):
            if path_.split("/", 1)[0] in rejected.entries:
                del self._seen[path_]
        log.warning("job.failed", job=rejected.name, code=rejected.code, error=rejected.message, failed=str(path.parent))
        self.status.increment("jobs_failed")
        self.status.update(last_error=_error_summary(rejected.name, rejected.code, rejected.message))


def _error_summary(name: str, code: str, message: str) -> dict[str, Any]:
    return {"job": name, "code": code, "message": message, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# --------------------------------------------------------------------------- worker


class Service:
    def __init__(self, config: Config, config_path: Path | None, notifier: Any = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier if notifier is not None else _notifier()
        self.jobs = ArrivalQueue()
        self.spool = Spool(config.paths.state)
        self.status: StatusFile | None = None
        self.engine: Any = None
        self.intake: Intake | None = None
        self.stopping = threading.Event()
        self.reload_requested = False
        self.current: Claim | None = None
        self.held: Claim | None = None  # a job waiting out a transient error (head of the line)
        self.held_until = 0.0
        self.transient_failures = 0
        self.host = socket.gethostname()
        self._stop_timer: threading.Timer | None = None
        self._ping_every = _ping_period()
        self._last_ping = 0.0
        self._last_step_status = 0.0

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self.start()
        self.notifier.ready()
        log.info("service.ready", inbox=str(self.config.paths.inbox), queued=self.jobs.qsize())
        self._idle()
        while not self.stopping.is_set():
            self._ping()
            if self.reload_requested:
                self.reload()
            claim = self._next()
            if claim is not None:
                self.process(claim)
                self._idle()
        return self.shutdown()

    def start(self) -> None:
        config = self.config
        paths = config.paths
        for key in ("inbox", "outbox", "failed", "archive", "state"):
            path = getattr(paths, key)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"paths.{key}", f"cannot create {path}: {exc.strerror or exc}") from exc
        self.spool.open(paths.inbox)
        self.status = StatusFile(paths.state)
        self.status.update(state="starting", daemon_version=__version__, inbox=str(paths.inbox),
                           outbox=str(paths.outbox))
        self._clean_outbox()
        for claim in self.spool.recover(paths.inbox):
            log.info("job.requeued", job=claim.name, job_id=claim.job_id, attempts=claim.attempts)
            if claim.state == "publishing":
                # Now, not when its turn comes: an orphan image must not sit in the outbox
                # while the queue drains. A failure here is retried when the job is processed.
                self._settle_publication(claim, log.bind(job=claim.name, job_id=claim.job_id), hold=False)
            self.jobs.put(claim)

        from .engine import Engine

        self.notifier.status("loading the model")
        self.notifier.extend_timeout(300_000_000)
        self.status.update(state="loading model")
        self.engine = Engine.load(config.model)
        _adopt_library_loggers()
        shapes = warm_shapes(config.roi, config.model.compile)
        began = time.monotonic()

        def warmed(done: int, total: int) -> None:
            self._ping()
            per_shape = (time.monotonic() - began) / max(done, 1)
            self.notifier.status(f"warming up {done}/{total}")
            self.notifier.extend_timeout(int(max(60.0, 3 * per_shape) * 1_000_000))
            self.status.update(state=f"warming up {done}/{total}")
            log.info("service.warming", done=done, total=total)

        self.notifier.status(f"warming up 0/{len(shapes)}")
        self.status.update(state=f"warming up 0/{len(shapes)}")
        self.engine.warm(shapes, warmed)

        self.intake = Intake(config, self.spool, self.jobs, self.status)
        self.intake.watch()
        self.intake.start()

    def _clean_outbox(self) -> None:
        """Temp files of atomic writes a kill -9 interrupted; nothing of ours is being written yet."""
        try:
            outbox.remove_temp_files(self.config.paths.outbox)
        except OSError as exc:
            log.warning("outbox.cleanup_failed", outbox=str(self.config.paths.outbox), error=str(exc))

    def shutdown(self) -> int:
        log.info("service.stopping", queued=self.jobs.qsize())
        self.notifier.stopping()
        if self.intake is not None:
            self.intake.stop()
            self.intake.join(timeout=5)
        if self.status is not None:
            self.status.update(state="stopped", current=None)
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        self.spool.close()
        log.info("service.stopped")
        return 0

    # -- signals ----------------------------------------------------------------------------

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop_signal(self, signum: int, _frame: Any) -> None:
        if self.stopping.is_set():
            self._force_exit(f"second {signal.Signals(signum).name}")
            return
        log.info("service.stop_requested", signal=signal.Signals(signum).name)
        self.stopping.set()
        if self.intake is not None:
            self.intake.stop()
        self._stop_timer = threading.Timer(self.config.service.shutdown_timeout, self._force_exit, ("shutdown timeout",))
        self._stop_timer.daemon = True
        self._stop_timer.start()

    def _on_hup(self, _signum: int, _frame: Any) -> None:
        self.reload_requested = True

    def _force_exit(self, why: str) -> None:
        """Stop now; the running job stays claimed, and this attempt is not counted as a crash."""
        claim = self.current
        try:
            if claim is not None:
                self.spool.undo_attempt(claim)
            log.warning("service.forced_stop", reason=why, job=claim.name if claim else None)
            self.notifier.stopping()
            if self.status is not None:
                self.status.update(state="stopped", current=None)
        finally:
            os._exit(0)

    def reload(self) -> None:
        self.reload_requested = False
        if self.config_path is None:
            log.info("config.reload_skipped", reason="started without a config file")
            return
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config.reload_failed", key=exc.key, error=exc.message, note="keeping the running config")
            self.notifier.ready()
            return
        if new.model != self.config.model:
            log.warning("config.reload_needs_restart", section="model", note="model changes apply after a restart")
        if new.paths.state != self.config.paths.state:
            log.warning("config.reload_needs_restart", section="paths.state", note="applies after a restart")
        if new.logging != self.config.logging:
            log.warning("config.reload_needs_restart", section="logging", note="applies after a restart")
        applied = replace(
            new, model=self.config.model, logging=self.config.logging,
            paths=replace(new.paths, state=self.config.paths.state),
        )
        for key in ("inbox", "outbox", "failed", "archive"):
            getattr(applied.paths, key).mkdir(parents=True, exist_ok=True)
        self.config = applied
        if self.intake is not None:
            self.intake.reconfigure(applied)
        log.info("config.reloaded", path=str(self.config_path))
        self.notifier.ready()
        self._idle()

    # -- the loop's parts ---------------------------------------------------------------------

    def _next(self) -> Claim | None:
        """The next claim to work on: a held job once its back-off ends, else the queue head."""
        if self.held is not None:
            wait = self.held_until - time.monotonic()
            if wait <= 0:
                claim, self.held = self.held, None
                return claim
            self.stopping.wait(min(wait, 0.5))
            return None
        try:
            return self.jobs.get(timeout=0.5)
        except queue.Empty:
            return None

    def _ping(self) -> None:
        """WATCHDOG=1 (a few times per watchdog interval) only while the intake thread ticks too."""
        if self._ping_every is None:
            return
        now = time.monotonic()
        if now - self._last_ping < self._ping_every:
            return
        intake = self.intake
        if intake is not None:
            limit = self.config.watch.rescan_interval + 30.0
            if not intake.is_alive() or time.monotonic() - intake.heartbeat > limit:
                return
        self._last_ping = now
        self.notifier.watchdog()

    def _queue_names(self) -> list[str]:
        return self.jobs.names()

    def _idle(self) -> None:
        assert self.status is not None
        names = self._queue_names()
        health = self.status.data.get("health")
        if self.held is not None:
            text = f"{health or 'retrying'}; {self.held.name} waits, {len(names)} queued"
        else:
            text = f"idle, {len(names)} queued"
        self.notifier.status(text)
        self.status.update(state="idle" if self.held is None else "retrying", current=None,
                           queue_length=len(names), queued=names)

    def _on_step(self, done: int, total: int) -> None:
        if self.config.service.watchdog_from_steps:
            self._ping()
        claim = self.current
        assert claim is not None and self.status is not None
        names = self._queue_names()
        now = time.monotonic()
        if now - self._last_step_status >= 0.5 or done in (1, total):
            self._last_step_status = now
            self.notifier.status(f"{claim.name}: step {done}/{total}, {len(names)} queued")
        current = dict(self.status.data.get("current") or {}, step=done, total=total)
        self.status.update(throttle=0.25, current=current, queue_length=len(names), queued=names)
        if self.stopping.is_set():
            raise Interrupted(f"stopping: {claim.name} interrupted at step {done}/{total}")

    # -- one job --------------------------------------------------------------------------------

    def process(self, claim: Claim) -> None:
        bound = log.bind(job=claim.name, job_id=claim.job_id)
        self.current = claim
        try:
            if claim.state == "publishing" and not self._settle_publication(claim, bound):
                return  # the outbox cannot be looked at: held, retried later
            if claim.state == "published":
                self._archive(claim, bound)
            elif claim.state == "failing":
                record = claim.record.get("error") or {}
                error = JobError(record.get("code", "internal_error"), record.get("message", ""), record.get("details"))
                self._fail(claim, error, bound)
            else:
                self._paint(claim, bound)
        finally:
            self.current = None

    def _paint(self, claim: Claim, bound: Any) -> None:
        from . import jobspec
        from .process import run_job

        config = self.config
        assert self.status is not None
        started = time.time()
        try:
            problems = self.spool.unsafe_inputs(claim)
            if problems:
                detail = "; ".join(f"{p} {why}" for p, why in sorted(problems.items()))
                raise JobError("job_unsafe", f"unsafe input: {detail}", {"entries": problems})
            limit = config.limits.max_input_bytes
            too_big = self.spool.oversized_inputs(claim, limit)
            if too_big:
                raise JobError(grouping.TOO_LARGE, grouping.oversize_message(too_big, limit),
                               {"entries": too_big, "max_input_bytes": limit})
            self.spool.begin_attempt(claim, config.limits.poison_after)
            self.status.update(state="busy", current={"name": claim.name, "job_id": claim.job_id, "step": 0,
                                                      "total": None, "started": outbox.timestamp(started)})
            options = jobspec.load_job_options(claim.input_path("prompt"), config.limits)
            image = claim.input_path("image")
            assert image is not None
            request = jobspec.build_request(claim.name, image, claim.input_path("mask"), options, config)
            bound.info("job.started", attempt=claim.attempts, queue_wait_seconds=round(started - claim.arrived, 3),
                       steps=request.params.steps, seed=request.params.seed)
            result = run_job(self.engine, request, config, on_step=self._on_step)
            finished = time.time()
            extra = {
                "job_id": claim.job_id,
                "host": self.host,
                "daemon_version": __version__,
                "queue_wait_seconds": round(started - claim.arrived, 3),
                "arrived": outbox.timestamp(claim.arrived),
                "started": outbox.timestamp(started),
                "finished": outbox.timestamp(finished),
                "attempts": claim.attempts,
                "inputs_received_as": claim.entries(),
            }
            # The names are recorded (fsynced) in the claim before anything is written, so
            # that a kill -9 anywhere in publication is settled at the next start.
            image_path, sidecar_path = outbox.publish(
                config.paths.outbox, result, extra,
                record=lambda names: self.spool.mark(claim, "publishing", publishing=names),
            )
            self.spool.mark(claim, "published", published={"image": image_path.name, "sidecar": sidecar_path.name})
        except Interrupted:
            self.spool.undo_attempt(claim)
            bound.info("job.interrupted", note="left claimed; it runs again at the next start")
            return
        except TransientError as exc:
            self.spool.undo_attempt(claim)
            self._hold(claim, exc, bound)
            return
        except JobError as exc:
            self._fail(claim, exc, bound)
            return
        except Exception as exc:  # noqa: BLE001 - one job's bug must not end the daemon
            bound.exception("job.crashed")
            self._fail(claim, JobError("internal_error", f"{type(exc).__name__}: {exc}"), bound)
            return
        self.transient_failures = 0
        self.status.update(health=None)
        self.status.increment("jobs_done")
        bound.info(
            "job.done", output=image_path.name, sidecar=sidecar_path.name,
            seconds=round(finished - started, 3), timings=result.sidecar.get("timings"),
            regions=len(result.regions),
        )
        self._archive(claim, bound)

    def _settle_publication(self, claim: Claim, bound: Any, hold: bool = True) -> bool:
        """A claim stopped while publishing: published if its sidecar is out, else painted again.

        False when the outbox cannot be looked at (the job is held when `hold`).
        """
        names = claim.record.get("publishing") or {}
        where = self.config.paths.outbox
        try:
            published = bool(names) and outbox.settle_publication(where, claim.job_id, names)
            if published:
                self.spool.mark(claim, "published", published={"image": names["image"], "sidecar": names["sidecar"]})
            else:
                claim.record.pop("publishing", None)
                self.spool.mark(claim, "claimed")
        except OSError as exc:
            error = outbox.transient(exc, where, "outbox") or TransientError(
                "outbox_unwritable", f"cannot settle the publication of {claim.name}: {exc}"
            )
            if hold:
                self._hold(claim, error, bound)
            else:
                bound.warning("job.publication_unsettled", error=error.message)
            return False
        if published:
            bound.info("job.published_before_stop", output=names["image"], sidecar=names["sidecar"])
        return True

    def _archive(self, claim: Claim, bound: Any) -> None:
        try:
            target = outbox.archive_inputs(self.spool, claim, self.config.paths.archive, self.config.output.after_success)
        except TransientError as exc:
            self._hold(claim, exc, bound)
            return
        bound.info("job.archived", archive=str(target) if target else "deleted")

    def _hold(self, claim: Claim, exc: TransientError, bound: Any) -> None:
        assert self.status is not None
        self.transient_failures += 1
        delay = retry_delay(self.transient_failures)
        self.held, self.held_until = claim, time.monotonic() + delay
        health = f"{exc.message}, retrying"
        bound.error("job.retry_later", code=exc.code, error=exc.message, retry_in_seconds=delay)
        self.status.update(health=health, last_error=_error_summary(claim.name, exc.code, exc.message))

    def _fail(self, claim: Claim, error: JobError, bound: Any) -> None:
        assert self.status is not None
        try:
            path = outbox.fail_claim(self.spool, claim, error, self.config.paths.failed, time.time())
        except TransientError as exc:
            self._hold(claim, exc, bound)
            return
        bound.warning("job.failed", code=error.code, error=error.message, failed=str(path.parent))
        self.status.increment("jobs_failed")
        self.status.update(last_error=_error_summary(claim.name, error.code, error.message))


def run_service(config: Config, config_path: str | os.PathLike[str] | None) -> int:
    """`inpaintd run`: configure logging, run until SIGTERM; the exit code."""
    try:
        from .logs import configure_logging

        configure_logging(config.logging.format, config.logging.level)
    except Exception:  # noqa: BLE001 - logging setup must not keep the daemon from starting
        log.exception("logging.setup_failed")
    service = Service(config, Path(config_path) if config_path else None)
    _log_backends(service.notifier)
    try:
        return service.run()
    except BaseException:
        service.spool.close()
        raise


def _adopt_library_loggers() -> None:
    """transformers/diffusers install their own stderr handler on import; route them through ours."""
    try:
        from .logs import adopt_library_loggers

        adopt_library_loggers()
    except Exception:  # noqa: BLE001 - logging must never keep the daemon from running
        log.exception("logging.adopt_failed")


def _log_backends(notifier: Any) -> None:
    try:
        from .logs import describe_backends

        log.info("service.backends", **describe_backends(notifier))
    except Exception:  # noqa: BLE001
        log.exception("logging.describe_failed")
