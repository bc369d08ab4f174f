"""The daemon: inbox -> claimed queue -> engine, one job at a time -> outbox.

Two threads. The intake thread (intake/intake.py) watches the inbox, groups files into jobs, fails
what cannot become a job, and claims ready jobs into state/claimed/ (spool), putting them in
a queue of claims ordered by arrival (queues.ArrivalQueue): paths, never decoded images. The
main thread is the worker:

    while not stopping:
        ping the watchdog; reload the config if SIGHUP asked
        claim = a held job that is due, else the queue head  ->  process(claim)

`process` (worker.py) is the job boundary: it moves one claim through its states (publishing
-> claimed -> painted and published -> archived, or failing -> failed/) and hands anything
raised on the way to core.boundary.classify. A bad input fails the job; a transient error
(disk full, a folder unwritable) holds it beside the queue (queues.HeldJobs) with its own
back-off, so it never blocks the jobs behind it, and fails it with retries_exhausted
after limits.hold_timeout. Cost is bounded per job: regions and regions x steps before
painting (paint/job.py), limits.max_job_seconds at every step.

SIGTERM (or SIGINT) stops taking jobs and makes the running job raise Interrupted at its
next denoising step; the job stays claimed and is queued again at the next start. A timer
bounds the whole stop at service.shutdown_timeout; a second SIGTERM stops at once. Both
leave the claim untouched. SIGHUP reloads paths/watch/inference/output/limits/roi between
jobs; a changed model section is logged as needing a restart.
"""

from __future__ import annotations

import os
import pwd
import queue
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import structlog

from .. import __version__
from ..core.buckets import bucket_shapes
from ..core.config import Config, RoiConfig, load_config
from ..core.errors import ConfigError
from ..core.quoting import for_display, shorten
from ..demo.model import model_folder
from ..intake.intake import Intake
from ..store import fleet as fleet_mod
from ..store import fsutil, outbox
from ..store import retention as retention_mod
from ..store.spool import Claim, ClaimState, Spool
from ..store.status import StatusFile
from . import logs
from .metrics import Metrics, free_space
from .notify import Notifier, watchdog_interval
from .queues import ArrivalQueue, Held, HeldJobs
from .worker import JobContext, Worker

log = structlog.get_logger("inpaintd.service")


def work_shapes(roi: RoiConfig) -> list[tuple[int, int]]:
    """Every aspect-bucket (width, height) a job can run at (core.buckets.bucket_shapes)."""
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


class _NullNotifier:
    backend = "none"

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def _ping_period() -> float | None:
    """How often to send WATCHDOG=1: a quarter of systemd's interval; None when not watched."""
    try:
        interval = watchdog_interval()
    except Exception:  # noqa: BLE001
        return None
    return None if interval is None else interval / 4


def _notifier() -> Any:
    try:
        return Notifier.from_env()
    except Exception:  # noqa: BLE001 - notifications are optional
        log.exception("notify.unavailable")
        return _NullNotifier()


class Service(Worker):
    """The daemon: start-up, the loop, signals, reload and shutdown; the per-claim steps are Worker's."""

    def __init__(self, config: Config, config_path: Path | None, notifier: Any = None) -> None:
        self.config = config
        self.config_path = Path(config_path) if config_path else None
        self.notifier = notifier if notifier is not None else _notifier()
        self.jobs = ArrivalQueue(fair=config.limits.fair_share)
        self.held = HeldJobs(config.limits.hold_timeout)
        self.device = fleet_mod.device_id(config.fleet.device_id)
        self.fleet: fleet_mod.Fleet | None = None
        self.share = Path("/")
        self.state_dir = config.paths.state
        if config.fleet.enabled:
            # Our own folder under the share's state root (fleet.py): claims, status, heartbeat.
            self.state_dir = config.paths.state / self.device
            self.share = fleet_mod.share_root(config.fleet.share, [config.paths.inbox, config.paths.outbox,
                                               config.paths.failed, config.paths.archive, config.paths.state])
            self.fleet = fleet_mod.Fleet(config.paths.state, self.device, config.fleet.lease_seconds,
                                         config.fleet.heartbeat_seconds, share=self.share)
            fsutil.set_writer(self.device)
        self.keeper: fleet_mod.Keeper | None = None
        self._away: str | None = None
        self.spool = Spool(self.state_dir)
        self.status: StatusFile | None = None
        self.engine: Any = None
        self.intake: Intake | None = None
        self.stopping = threading.Event()
        self.reload_requested = False
        self.current: JobContext | None = None  # the job being worked on (signals read it)
        self.host = socket.gethostname()
        self._stop_timer: threading.Timer | None = None
        self._ping_every = _ping_period()
        self._last_ping = 0.0
        self._last_step_status = 0.0
        self._next_prune = 0.0  # monotonic; the first pass runs as soon as the loop does
        self._last_step_at: float | None = None
        self.metrics: Metrics | None = None
        if config.metrics.textfile is not None:
            self.metrics = Metrics(config.metrics.textfile, config.metrics.interval_seconds)

    # -- lifecycle ------------------------------------------------------------------------

    def run(self) -> int:
        self._install_signals()
        self.start()
        if self.status is None:  # stopped before the share was there
            return self.shutdown()
        self.notifier.ready()
        log.info("service.ready", inbox=str(self.config.paths.inbox), queued=self.jobs.qsize())
        self._idle()
        while not self.stopping.is_set():
            try:
                self._ping()
                if self.reload_requested:
                    self.reload()
                if self.keeper is not None and self.keeper.away != self._away:
                    self._away = self.keeper.away
                    self._idle()
                if self.keeper is not None and self.keeper.clean_due:
                    # Between jobs: no write of ours is in flight.
                    self.keeper.clean_due = False
                    self._clean_outbox()
                self._maintain()
                claim, held = self._next()
                if claim is not None:
                    self.process(claim, held)
                    self._idle()
            except Exception:  # noqa: BLE001 - the loop serves every job: it never ends on an error
                log.exception("service.loop_error", note="the loop goes on")
                self.stopping.wait(1.0)
        return self.shutdown()

    def start(self) -> None:
        config = self.config
        paths = config.paths
        if self.metrics is not None:
            logs.add_listener(self.metrics.on_event)
        if self.fleet is not None:
            # The model first, while the share may not be mounted yet: nothing of it is on the
            # share, and a device that boots before its file server takes jobs as soon as it is.
            self._load_engine()
            if not self._wait_for_share():
                return  # stopped while waiting
        for key in ("inbox", "outbox", "failed", "archive", "state"):
            path = getattr(paths, key)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"paths.{key}", f"cannot create {path}: {exc.strerror or exc}") from exc
        if self.fleet is not None:
            try:
                self.fleet.check_unique()
            except RuntimeError as exc:
                raise ConfigError("fleet.device_id", str(exc)) from exc
            self.fleet.beat()
        self.spool.open(paths.inbox)
        if self.fleet is not None:
            self._check_one_filesystem()
        self.status = StatusFile(self.state_dir)
        self.status.update(state="starting", daemon_version=__version__, inbox=str(paths.inbox),
                           outbox=str(paths.outbox), device=self.device)
        self._clean_outbox()
        for claim in self.spool.recover(paths.inbox):
            log.info("job.requeued", job=claim.name, job_id=claim.job_id, attempts=claim.attempts)
            if claim.state is ClaimState.PUBLISHING:
                # Now, not when its turn comes: an orphan image must not sit in the outbox
                # while the queue drains. A failure here is retried when the job is processed.
                try:
                    self._settle_publication(claim, log.bind(job=claim.name, job_id=claim.job_id))
                except Exception as exc:  # noqa: BLE001 - settled again when its turn comes
                    log.warning("job.publication_unsettled", job=claim.name, error=shorten(str(exc)))
            self.jobs.put(claim)
        if self.engine is None:
            self._load_engine()
        self.intake = Intake(config, self.spool, self.jobs, self.status)
        self.intake.watch()
        self.intake.start()
        if self.fleet is not None:
            self.keeper = fleet_mod.Keeper(self.fleet, self.spool, paths.inbox, self.jobs.put)
            self.keeper.start()

    def _status(self, **fields: Any) -> None:
        if self.status is not None:
            self.status.update(**fields)

    def _load_engine(self) -> None:
        config = self.config
        from ..engine.engine import Engine  # deferred: imports torch

        self.notifier.status("loading the model")
        self.notifier.extend_timeout(300_000_000)
        self._status(state="loading model")
        self.engine = Engine.load(replace(config.model, path=model_folder(config.model)))
        if self.metrics is not None:
            self.metrics.set_model(self.engine.info.model_id, self.engine.info.random_weights)
        _adopt_library_loggers()
        shapes = warm_shapes(config.roi, config.model.compile)
        began = time.monotonic()

        def warmed(done: int, total: int) -> None:
            self._ping()
            per_shape = (time.monotonic() - began) / max(done, 1)
            self.notifier.status(f"warming up {done}/{total}")
            self.notifier.extend_timeout(int(max(60.0, 3 * per_shape) * 1_000_000))
            self._status(state=f"warming up {done}/{total}")
            log.info("service.warming", done=done, total=total)

        self.notifier.status(f"warming up 0/{len(shapes)}")
        self._status(state=f"warming up 0/{len(shapes)}")
        self.engine.warm(shapes, warmed)

    def _wait_for_share(self) -> bool:
        """Fleet: wait until the share's marker is there (the share is mounted); nothing is
        created or written before, so a device booted before its file server never works on
        the empty mount point. False when asked to stop meanwhile."""
        marker = self.share / fleet_mod.SHARE_MARKER
        said = False
        while not fleet_mod.share_present(self.share):
            if not said:
                log.warning("fleet.share_missing", share=str(self.share), marker=str(marker),
                            note="waiting: the share is not mounted here, or `inpaintd init-share` was never run on it")
                said = True
            self.notifier.status(f"waiting for the share: {marker} is missing (not mounted?)")
            self.notifier.extend_timeout(30_000_000)
            self._ping()
            if self.stopping.wait(1.0):
                return False
        if said:
            log.info("fleet.share_found", share=str(self.share))
        return True

    def _check_one_filesystem(self) -> None:
        """Fleet: outbox, failed and archive on the state's filesystem: results are published by
        link(2) from the claim, and archived by rename from it (the fence, store/outbox.py)."""
        for key in ("outbox", "failed", "archive"):
            path = getattr(self.config.paths, key)
            if not fsutil.same_filesystem(path, self.spool.claimed):
                raise ConfigError(f"paths.{key}", f"{path} must be on the share with paths.state "
                                  "(fleet: results leave the claim by link and rename, which cannot cross filesystems)")

    def _clean_outbox(self) -> None:
        """Temp files of atomic writes a kill -9 interrupted; nothing of ours is being written yet."""
        try:
            # On a shared outbox only our own: another device's may be in flight.
            prefix = fsutil.own_temp_prefix() if self.fleet is not None else fsutil.TEMP_PREFIX
            outbox.remove_temp_files(self.config.paths.outbox, prefix)
        except OSError as exc:
            log.warning("outbox.cleanup_failed", outbox=str(self.config.paths.outbox), error=str(exc))

    def shutdown(self) -> int:
        log.info("service.stopping", queued=self.jobs.qsize())
        if self.metrics is not None:
            self.metrics.write(time.time(), self._metrics_snapshot)
            logs.remove_listener(self.metrics.on_event)
        self.notifier.stopping()
        if self.intake is not None:
            self.intake.stop()
            self.intake.join(timeout=5)
        if self.keeper is not None:
            self.keeper.stop()
        if self.status is not None:
            self.status.update(state="stopped", current=None)
            self.status.flush()
        if self._stop_timer is not None:
            self._stop_timer.cancel()
        try:
            self.spool.close()
        except OSError as exc:  # the lock file's folder is away (a network share): the lock goes with us
            log.warning("spool.close_failed", error=str(exc))
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
        claim = self.current.claim if self.current is not None else None
        try:
            if claim is not None:
                self.spool.undo_attempt(claim)
            log.warning("service.forced_stop", reason=why, job=claim.name if claim else None)
            self.notifier.stopping()
            if self.status is not None:
                self.status.update(state="stopped", current=None)
                self.status.flush()
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
        if new.fleet != self.config.fleet:
            log.warning("config.reload_needs_restart", section="fleet", note="applies after a restart")
        if new.metrics != self.config.metrics:
            log.warning("config.reload_needs_restart", section="metrics", note="applies after a restart")
        applied = replace(
            new, model=self.config.model, logging=self.config.logging, fleet=self.config.fleet,
            metrics=self.config.metrics,
            paths=replace(new.paths, state=self.config.paths.state),
        )
        for key in ("inbox", "outbox", "failed", "archive"):
            getattr(applied.paths, key).mkdir(parents=True, exist_ok=True)
        self.config = applied
        self.held.hold_timeout = applied.limits.hold_timeout
        self.jobs.set_fair(applied.limits.fair_share)
        if self.intake is not None:
            self.intake.reconfigure(applied)
        log.info("config.reloaded", path=str(self.config_path))
        self.notifier.ready()
        self._idle()

    # -- the loop's parts ---------------------------------------------------------------------

    def _next(self) -> tuple[Claim | None, Held | None]:
        """The next job to work on: a held job whose back-off ended, else the queue head."""
        if self.status is not None:
            self.status.flush()
        held = self.held.pop_due(time.monotonic())
        if held is not None:
            return held.claim, held
        wait = self.held.next_in(time.monotonic())
        try:
            return self.jobs.get(timeout=0.5 if wait is None else min(0.5, max(0.01, wait))), None
        except queue.Empty:
            return None, None

    def _maintain(self) -> None:
        """Between jobs: retention when its pass is due, the metrics file when it is due."""
        retention = self.config.retention
        if retention.enabled and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + retention.interval_seconds
            folders = {"outbox": self.config.paths.outbox, "archive": self.config.paths.archive,
                       "failed": self.config.paths.failed}
            retention_mod.prune(folders, retention_mod.budgets(retention), time.time(), self._ping)
        if self.metrics is not None and self.metrics.due(time.time()):
            self.metrics.write(time.time(), self._metrics_snapshot)

    def _on_step(self, done: int, total: int) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            # From the second step on: the first also holds the prompt's encoding.
            if done > 1 and self._last_step_at is not None:
                self.metrics.step(now - self._last_step_at)
            if self.metrics.due(time.time()):
                self.metrics.write(time.time(), self._metrics_snapshot)
        self._last_step_at = now
        super()._on_step(done, total)

    def _metrics_snapshot(self) -> dict[str, Any]:
        owners = {(row["user"] or str(row["uid"])): row["queued"] for row in self._queue_by_owner()}
        values: dict[str, Any] = {
            "queue_by_owner": owners, "held": len(self.held),
            "space": free_space(self.config.folders()),
            "disk_guard": self.intake is not None and self.intake.disk_guard is not None,
            "waiting": self.status.data.get("waiting_in_inbox", 0) if self.status is not None else 0,
        }
        if self.fleet is not None:
            values["peers"] = {p.device: p.age for p in self.fleet.peers()}
        return values

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
        first = self.held.first()
        if first is not None:
            text = f"{len(names)} queued; {len(self.held)} held, {first.claim.name}: {first.message}, retrying"
            health: str | None = for_display(f"{first.message}, retrying", 300)
        else:
            text, health = f"idle, {len(names)} queued", None
        if self._away is not None:
            text = health = shorten(f"share away, nothing is written: {self._away}", 300)
        self.notifier.status(text)
        self.status.update(state="idle" if first is None else "retrying", current=None, queue_length=len(names),
                           queued=names[:100], held=self.held.names()[:100], health=health,
                           queue_by_owner=self._queue_by_owner())

    def _queue_by_owner(self) -> list[dict[str, Any]]:
        """Queued claims per owner, the most first, with user names where the uid resolves."""
        return owner_rows(self.jobs.per_owner())


def owner_rows(counts: dict[int, int]) -> list[dict[str, Any]]:
    rows = []
    for uid, queued in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        rows.append({"uid": uid, "user": _user_name(uid), "queued": queued})
    return rows


def _user_name(uid: int) -> str | None:
    if uid < 0:
        return None
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):  # a uid with no passwd entry (an SMB-mapped id, a container's)
        return None

def run_service(config: Config, config_path: str | os.PathLike[str] | None) -> int:
    """`inpaintd run`: configure logging, run until SIGTERM; the exit code."""
    try:
        logs.configure_logging(config.logging.format, config.logging.level)
    except Exception:  # noqa: BLE001 - logging setup must not keep the daemon from starting
        log.exception("logging.setup_failed")
    service = Service(config, Path(config_path) if config_path else None)
    _log_backends(service.notifier)
    try:
        return service.run()
    except BaseException:
        try:
            service.spool.close()
        except OSError:
            pass
        raise


def _adopt_library_loggers() -> None:
    """transformers/diffusers install their own stderr handler on import; route them through ours."""
    try:
        logs.adopt_library_loggers()
    except Exception:  # noqa: BLE001 - logging must never keep the daemon from running
        log.exception("logging.adopt_failed")


def _log_backends(notifier: Any) -> None:
    try:
        log.info("service.backends", **logs.describe_backends(notifier))
    except Exception:  # noqa: BLE001
        log.exception("logging.describe_failed")
