"""sd_notify: tell systemd we are ready, what we are doing, and that we are alive.

`Notifier.from_env()` looks at $NOTIFY_SOCKET (a path, or "@name" for the abstract
namespace) and picks a backend:

- "systemd-python": `systemd.daemon.notify` when the optional extra is installed;
- "socket": a pure-Python AF_UNIX datagram sender (the protocol is one datagram of
  newline-separated KEY=VALUE lines, see sd_notify(3));
- "none": not started by systemd (or an address we cannot speak to); every call is a no-op.

Nothing here ever raises into the daemon: a vanished socket is logged once and then
ignored, so a notification problem can never stop a job. Nothing is rate-limited either;
the service decides when to ping.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Callable, Mapping

import structlog

from ..core.quoting import for_display

log = structlog.get_logger("inpaintd.notify")

BACKENDS = ("systemd-python", "socket", "none")
STATUS_CHARS = 1000  # the STATUS= line (`systemctl status`): names in it come from drops, escaped


def _systemd_python_notify() -> Callable[..., bool] | None:
    try:
        from systemd import daemon  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a broken build of the extension
        return None
    return getattr(daemon, "notify", None)


def socket_address(value: str) -> str | None:
    """The sendto() address for a $NOTIFY_SOCKET value, or None if we cannot use it."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]  # Linux abstract namespace
    return None  # e.g. "vsock:..." (VMs) is not something a CPU edge box needs


class Notifier:
    """Sends sd_notify messages through one backend; thread-safe, never raises."""

    backend: str
    address: str | None

    def __init__(
        self,
        backend: str = "none",
        address: str | None = None,
        *,
        sender: Callable[..., bool] | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown notify backend {backend!r} (known: {', '.join(BACKENDS)})")
        self.backend = backend
        self.address = address  # $NOTIFY_SOCKET as given, for the start-up log line
        self._sender = sender
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._failed = False  # said once that notifications do not get through
        # systemd reads its socket at once; if it does not (PID 1 stuck, queue full), a ping
        # must not hang the daemon: give up on that message after this long.
        self.send_timeout = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, prefer: str = "auto") -> "Notifier":
        """Build from $NOTIFY_SOCKET; prefer="socket" skips systemd-python (tests, debugging).

        $INPAINTD_NOTIFY_BACKEND=socket does the same for a daemon started from outside.
        """
        env = os.environ if env is None else env
        if prefer == "auto":
            prefer = env.get("INPAINTD_NOTIFY_BACKEND", "auto") or "auto"
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls("none")
        if socket_address(value) is None:
            log.warning("notify_socket_unsupported", notify_socket=value)
            return cls("none", value)
        if prefer in ("auto", "systemd-python") and env is os.environ:
            # systemd.daemon.notify reads the real environment; only use it when we do too.
            sender = _systemd_python_notify()
            if sender is not None:
                return cls("systemd-python", value, sender=sender)
        return cls("socket", value)

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    def describe(self) -> str:
        if self.backend == "none":
            return "none (NOTIFY_SOCKET not set)" if not self.address else f"none ({self.address} unsupported)"
        return f"{self.backend} ({self.address})"

    # --- the messages -------------------------------------------------------------------
    def ready(self) -> None:
        self.send("READY=1")

    def status(self, text: str) -> None:
        # One line only: a newline would start a new KEY=VALUE assignment.
        self.send("STATUS=" + for_display(" ".join(str(text).splitlines()), STATUS_CHARS))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        # systemd >= 253 wants MONOTONIC_USEC with RELOADING=1 (Type=notify-reload); older ignores it.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def extend_timeout(self, usec: int) -> None:
        """Ask for usec more of the current start/stop timeout (EXTEND_TIMEOUT_USEC)."""
        self.send(f"EXTEND_TIMEOUT_USEC={max(0, int(usec))}")

    def send(self, *assignments: str) -> bool:
        """Send KEY=VALUE lines as one datagram; True when it went out."""
        if self.backend == "none" or not assignments:
            return False
        message = "\n".join(assignments)
        try:
            with self._lock:
                if self.backend == "systemd-python":
                    assert self._sender is not None
                    ok = bool(self._sender(message))
                    if not ok:
                        raise OSError("systemd.daemon.notify returned false (NOTIFY_SOCKET unusable)")
                else:
                    self._send_socket(message.encode("utf-8", "replace"))
        except Exception as exc:  # noqa: BLE001 - notification must never take the daemon down
            self._close()
            if not self._failed:
                self._failed = True
                log.warning(
                    "notify_failed",
                    backend=self.backend,
                    notify_socket=self.address,
                    error=f"{type(exc).__name__}: {exc}",
                    note="systemd notifications are not getting through; the daemon carries on",
                )
            return False
        if self._failed:
            self._failed = False
            log.info("notify_recovered", backend=self.backend, notify_socket=self.address)
        return True

    def close(self) -> None:
        with self._lock:
            self._close()

    def _send_socket(self, data: bytes) -> None:
        address = socket_address(self.address or "")
        if address is None:
            raise OSError(f"unsupported NOTIFY_SOCKET {self.address!r}")
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self._sock.settimeout(self.send_timeout)
        # sendmsg with our credentials is implicit on AF_UNIX: systemd checks SO_PEERCRED/SCM_CREDENTIALS
        # of the sender, which is this process (NotifyAccess=main).
        sent = self._sock.sendto(data, address)
        if sent != len(data):
            raise OSError(f"short write to NOTIFY_SOCKET ({sent} of {len(data)} bytes)")

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def __repr__(self) -> str:
        return f"Notifier(backend={self.backend!r}, address={self.address!r})"


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog interval systemd expects pings within, in seconds; None when not watched.

    Reads $WATCHDOG_USEC; when $WATCHDOG_PID is set and is not this process (a child that
    inherited the environment), the watchdog is not ours. Ping at about half this interval.
    """
    env = os.environ if env is None else env
    raw = env.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = env.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 1_000_000
