"""Prometheus metrics as a node_exporter textfile (`metrics.textfile`), for monitoring to read.

The unit has no network (PrivateNetwork=yes), so there is no /metrics port: node_exporter's
textfile collector reads the file instead (`--collector.textfile.directory`). It is rewritten
by prometheus_client's `write_to_textfile` (a temp file in the same folder, then a rename: the
collector never reads half a file) at most every `metrics.interval_seconds`, between jobs and
between denoising steps.

Outcomes are counted from the log events themselves (logs.add_listener: job.done, job.failed,
retention.removed, disk.low/disk.ok), so the metrics and the journal never disagree; the
gauges (queue, held, free space, fleet) are read when the file is written.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    write_to_textfile,
)

from ..store import space

log = structlog.get_logger("inpaintd.metrics")

JOB_SECONDS_BUCKETS = (1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800, float("inf"))
STEP_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 5, 10, float("inf"))


class Metrics:
    """The registry, fed by events and by `write`'s snapshot of the daemon's gauges."""

    def __init__(self, path: Path, interval: float, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.interval = interval
        self.clock = clock
        self._lock = threading.Lock()
        self._next_write = 0.0
        self._write_failed = False
        r = self.registry = CollectorRegistry()
        self.finished = Counter("inpaintd_jobs_finished", "Jobs finished, by outcome (done, failed) and error code.",
                                ["outcome", "code"], registry=r)
        self.job_seconds = Histogram("inpaintd_job_seconds", "Seconds from reading a job's inputs to its encoded "
                                     "result (painted jobs).", buckets=JOB_SECONDS_BUCKETS, registry=r)
        self.step_seconds = Histogram("inpaintd_denoise_step_seconds", "Seconds per denoising step.",
                                      buckets=STEP_SECONDS_BUCKETS, registry=r)
        self.queue = Gauge("inpaintd_queue_length", "Claimed jobs waiting for the engine, by owner.", ["owner"],
                           registry=r)
        self.waiting = Gauge("inpaintd_inbox_waiting_jobs", "Jobs in the inbox not yet claimed.", registry=r)
        self.held = Gauge("inpaintd_held_jobs", "Claimed jobs held by a transient error (disk full, a folder "
                          "unwritable), retried beside the queue.", registry=r)
        self.free = Gauge("inpaintd_free_bytes", "Free bytes on the filesystem of each folder the daemon writes.",
                          ["folder"], registry=r)
        self.guard = Gauge("inpaintd_disk_guard_active", "1 while the low-disk guard stops claiming new jobs.",
                           registry=r)
        self.removed = Counter("inpaintd_retention_removed", "Records removed by retention, by folder and reason.",
                               ["folder", "reason"], registry=r)
        self.removed_bytes = Counter("inpaintd_retention_removed_bytes", "Bytes removed by retention, by folder.",
                                     ["folder"], registry=r)
        self.model = Gauge("inpaintd_model_info", "The loaded model (always 1): its id and whether its weights "
                           "are random (the demo model paints noise).", ["model_id", "random_weights"], registry=r)
        self.started = Gauge("inpaintd_start_time_seconds", "When the daemon started (Unix time).", registry=r)
        self.last_success = Gauge("inpaintd_last_success_time_seconds", "When the last job was published "
                                  "(Unix time; 0: none since start).", registry=r)
        self.devices = Gauge("inpaintd_fleet_devices", "Devices beating on the share (fleet mode).", registry=r)
        self.heartbeat_age = Gauge("inpaintd_fleet_heartbeat_age_seconds", "Age of each device's heartbeat "
                                   "(fleet mode).", ["device"], registry=r)
        self.started.set(self.clock())

    # -- events (any thread) --------------------------------------------------------------

    def on_event(self, event: Mapping[str, Any]) -> None:
        name = event.get("event")
        with self._lock:
            if name == "job.done":
                self.finished.labels("done", "").inc()
                seconds = event.get("seconds")
                if isinstance(seconds, (int, float)):
                    self.job_seconds.observe(seconds)
                self.last_success.set(self.clock())
            elif name == "job.failed":
                self.finished.labels("failed", str(event.get("code") or "internal_error")).inc()
            elif name == "retention.removed":
                self.removed.labels(str(event.get("folder")), str(event.get("reason"))).inc()
                self.removed_bytes.labels(str(event.get("folder"))).inc(float(event.get("bytes") or 0))
            elif name == "disk.low":
                self.guard.set(1)
            elif name == "disk.ok":
                self.guard.set(0)

    def step(self, seconds: float) -> None:
        with self._lock:
            self.step_seconds.observe(seconds)

    def set_model(self, model_id: str, random_weights: bool) -> None:
        self.model.clear()
        self.model.labels(model_id, "true" if random_weights else "false").set(1)

    # -- the file -------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        return now >= self._next_write

    def write(self, now: float, snapshot: Callable[[], Mapping[str, Any]]) -> None:
        """Refresh the gauges from `snapshot()` and rewrite the file; a failure is logged once
        per run of failures and never reaches the caller (monitoring must not stop the work)."""
        self._next_write = now + self.interval
        try:
            values = snapshot()
            with self._lock:
                self._gauges(values)
                write_to_textfile(str(self.path), self.registry)
        except Exception as exc:  # noqa: BLE001
            if not self._write_failed:
                log.warning("metrics.write_failed", path=str(self.path), error=str(exc))
            self._write_failed = True
            return
        if self._write_failed:
            log.info("metrics.written_again", path=str(self.path))
        self._write_failed = False

    def _gauges(self, values: Mapping[str, Any]) -> None:
        self.queue.clear()
        for owner, count in (values.get("queue_by_owner") or {}).items():
            self.queue.labels(str(owner)).set(count)
        self.waiting.set(values.get("waiting", 0) or 0)
        self.held.set(values.get("held", 0))
        self.free.clear()
        for folder, s in (values.get("space") or {}).items():
            self.free.labels(folder).set(s.free)
        if "disk_guard" in values:
            self.guard.set(1 if values["disk_guard"] else 0)
        peers = values.get("peers")
        if peers is not None:
            self.devices.set(len(peers))
            self.heartbeat_age.clear()
            for device, age in peers.items():
                if age is not None:
                    self.heartbeat_age.labels(device).set(age)


def free_space(folders: Mapping[str, Path]) -> dict[str, space.Space]:
    return space.free_space({k: v for k, v in folders.items() if k in space.WRITTEN})
