"""The daemon's state file (state/status.json) and `inpaintd status`.

The running daemon keeps the file current: pid, start time, state, queue, the job being
painted and its step, the last error and a health sentence ("outbox not writable,
retrying"). Writes are atomic renames (a reader never sees half a file) but not fsynced:
the file describes the present, and a stale one after a crash is recognised by its pid.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..core.quoting import for_display, record_json

STATUS_FILE = "status.json"
MIN_INTERVAL = 0.2  # seconds between two writes of the file
_MISSING = object()


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class StatusFile:
    """What the daemon is doing, shared by its threads; every update is written out."""

    def __init__(self, state_dir: Path, clock=time.time) -> None:  # type: ignore[no-untyped-def]
        self.path = Path(state_dir) / STATUS_FILE
        self._clock = clock
        self._lock = threading.Lock()
        self._last_write = float("-inf")
        self._dirty = True
        now = clock()
        self.data: dict[str, Any] = {
            "pid": os.getpid(),
            "started": _iso(now),
            "started_epoch": now,
            "state": "starting",
            "queue_length": 0,
            "queued": [],
            "waiting_in_inbox": 0,
            "current": None,
            "last_error": None,
            "health": None,
            "jobs_done": 0,
            "jobs_failed": 0,
        }

    def update(self, *, throttle: float = 0.0, **fields: Any) -> None:
        """Merge fields and write, at most once per max(throttle, MIN_INTERVAL) seconds.

        Nothing is written when nothing changed. A change that comes too soon after the last
        write is written by the next update or `flush` (the worker flushes a few times a
        second), so the file trails the truth by a fraction of a second and never churns.
        """
        with self._lock:
            changed = any(self.data.get(key, _MISSING) != value for key, value in fields.items())
            self.data.update(fields)
            self._dirty = self._dirty or changed
            if not self._dirty:
                return
            now = self._clock()
            if now - self._last_write < max(throttle, MIN_INTERVAL):
                return
            payload = self._payload(now)
        self._write(payload)

    def flush(self) -> None:
        """Write a change that update() held back."""
        with self._lock:
            if not self._dirty:
                return
            payload = self._payload(self._clock())
        self._write(payload)

    def _payload(self, now: float) -> bytes:
        self._last_write = now
        self._dirty = False
        self.data["updated"] = _iso(now)
        self.data["updated_epoch"] = now
        return record_json(self.data).encode("utf-8")

    def _write(self, payload: bytes) -> None:
        tmp = self.path.with_name(f".{STATUS_FILE}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(payload)
            os.replace(tmp, self.path)
        except OSError:
            try:
                tmp.unlink(missing_ok=True)  # a status file must never stop the daemon
            except OSError:
                pass  # the folder is away (a network share): nothing to clean up there now

    def increment(self, key: str) -> None:
        with self._lock:
            self.data[key] = int(self.data.get(key, 0)) + 1
            self._dirty = True
        self.update()


# A line of `inpaintd status`: names and messages in it come from drops (escaped, bounded).
DISPLAY_LINE_CHARS = 1000


def error_summary(name: str, code: str, message: str) -> dict[str, Any]:
    """The `last_error` of status.json: bounded whatever the job's name or message held."""
    return {"job": for_display(name, 200), "code": code, "message": for_display(message, 300), "at": _iso(time.time())}


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError, TypeError):
        return False
    return True


def read_status(state_dir: Path, now: float | None = None) -> dict[str, Any]:
    """The daemon's status as last written, with `running` and `uptime_seconds` worked out."""
    now = time.time() if now is None else now
    path = Path(state_dir) / STATUS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"running": False, "state": "not running", "reason": f"no status file at {path}"}
    except (OSError, ValueError) as exc:
        return {"running": False, "state": "unknown", "reason": f"cannot read {path}: {exc}"}
    running = data.get("state") != "stopped" and _pid_alive(data.get("pid"))
    data["running"] = running
    if running and isinstance(data.get("started_epoch"), (int, float)):
        data["uptime_seconds"] = round(now - data["started_epoch"], 1)
    elif data.get("state") != "stopped":
        data["state"] = "not running"
        data["reason"] = f"pid {data.get('pid')} is gone (the daemon stopped without saying so)"
    return data


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s"


def format_status(data: dict[str, Any]) -> str:
    """A few lines for a person at a terminal."""
    if not data.get("running"):
        line = f"inpaintd: {data.get('state', 'not running')}"
        if data.get("reason"):
            line += f" ({data['reason']})"
        lines = [line]
    else:
        lines = [f"inpaintd: running (pid {data.get('pid')}), up {_duration(data.get('uptime_seconds', 0))}"]
        state = data.get("state", "?")
        current = data.get("current")
        if current:
            step = f": step {current.get('step', 0)}/{current.get('total', '?')}" if current.get("total") else ""
            state = f"{state}, {current.get('name')}{step}"
        lines.append(f"state:      {state}")
        queued = data.get("queued") or []
        shown = f" ({', '.join(queued[:5])}{', ...' if len(queued) > 5 else ''})" if queued else ""
        lines.append(f"queue:      {data.get('queue_length', 0)} claimed{shown}, "
                     f"{data.get('waiting_in_inbox', 0)} waiting in the inbox")
        owners = data.get("queue_by_owner") or []
        if owners:
            lines.append("by owner:   " + ", ".join(
                f"{_owner_label(o)} {o.get('queued')}" for o in owners[:8])
                + (", ..." if len(owners) > 8 else ""))
        if data.get("disk_guard"):
            lines.append(f"disk guard: {data['disk_guard']}")
    held = data.get("held") or []
    if held:
        lines.append(f"held:       {len(held)} waiting out an error, retried beside the queue "
                     f"({', '.join(held[:5])}{', ...' if len(held) > 5 else ''})")
    if data.get("health"):
        lines.append(f"health:     {data['health']}")
    error = data.get("last_error")
    if error:
        lines.append(f"last error: {error.get('job')}: [{error.get('code')}] {error.get('message')} ({error.get('at')})")
    if "jobs_done" in data:
        lines.append(f"jobs:       {data.get('jobs_done', 0)} done, {data.get('jobs_failed', 0)} failed since start")
    return "\n".join(for_display(line, DISPLAY_LINE_CHARS) for line in lines)


def _owner_label(row: dict[str, Any]) -> str:
    uid = row.get("uid")
    if row.get("user"):
        return str(row["user"])
    return "unknown owner" if not isinstance(uid, int) or uid < 0 else f"uid {uid}"


def format_devices(me: str, devices: list[dict[str, Any]]) -> str:
    """The devices sharing the folder, as `inpaintd status` lists them (fleet mode)."""
    lines = [f"devices:    {len(devices)} on the share (this one: {me})"]
    for d in devices:
        age = d.get("heartbeat_age_seconds")
        beat = "never beat" if age is None else f"heartbeat {age:g} s ago"
        if d.get("presumed_dead"):
            beat += ", presumed dead (its claims are taken over)"
        current = f", painting {d['current']}" if d.get("current") else ""
        queued = d.get("queue_length")
        lines.append(f"  {d['device']}{' (this device)' if d['device'] == me else ''}: {beat}; "
                     f"{d.get('state') or 'unknown'}{current}, {queued if queued is not None else '?'} queued")
    return "\n".join(for_display(line, DISPLAY_LINE_CHARS) for line in lines)
