"""journald: one structlog event -> one journal entry with fields, and the two ways to send it.

An event becomes MESSAGE (a readable sentence: the event, then its keys), PRIORITY (from the
level), SYSLOG_IDENTIFIER=inpaintd, INPAINTD_EVENT, INPAINTD_<KEY> for each key (so
`journalctl -u inpaintd INPAINTD_JOB=cat` works), CODE_FILE/LINE/FUNC and, for an exception,
TRACEBACK.

Transports, in order:
- systemd-python's `journal.sendv` (libsystemd's sd_journal_sendv) when it is installed: the
  maintained client, used wherever it builds (the `systemd` extra; it needs libsystemd-dev
  and pkg-config at install time).
- `NativeJournal`, our own sender of journald's native protocol (about 60 lines) for hosts
  where systemd-python cannot be built (no compiler or headers on the device). Kept, not
  replaced by a library: the PyPI alternatives either wrap libsystemd too (cysystemd, needs
  the same headers) or are unmaintained, while the protocol is small, stable and documented
  (systemd's "Native Journal Protocol": KEY=value lines, a length-prefixed form for values
  with newlines, a sealed memfd for entries too big for one datagram). The systemd test
  checks both transports against a real journald.
"""

from __future__ import annotations

import array
import json
import os
import socket
import sys
import threading
import traceback
from typing import Any, Callable, TextIO

from ..core.quoting import TRACEBACK_CHARS, for_display

# syslog priorities (journald PRIORITY=)
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "notice": 5,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}


JOURNAL_SOCKET = "/run/systemd/journal/socket"


FIELD_PREFIX = "INPAINTD_"


SYSLOG_IDENTIFIER = "inpaintd"


# Keys that lead the human sentence, in this order, when present.
_LEADING_KEYS = ("job", "code")


# Keys structlog or this module add that are not worth a journal field of their own.
_SKIP_KEYS = {"event", "level", "timestamp", "exc_info", "exception", "stack", "stack_info", "logger_name"}


_CALLSITE_KEYS = {"pathname": "CODE_FILE", "lineno": "CODE_LINE", "func_name": "CODE_FUNC"}


class NativeJournal:
    """journald's native protocol over its datagram socket, for hosts without systemd-python.

    One datagram per entry: "KEY=value\\n" lines, or for values holding a newline
    "KEY\\n" + 64-bit little-endian length + value + "\\n". An entry too large for a
    datagram goes in a sealed memfd passed with SCM_RIGHTS (as sd_journal_sendv does).
    """

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self._sock: socket.socket | None = None

    @staticmethod
    def encode(fields: list[tuple[str, bytes]]) -> bytes:
        parts: list[bytes] = []
        for key, value in fields:
            name = key.encode("ascii")
            if b"\n" in value:
                parts.append(name + b"\n" + len(value).to_bytes(8, "little") + value + b"\n")
            else:
                parts.append(name + b"=" + value + b"\n")
        return b"".join(parts)

    def sendv(self, fields: list[tuple[str, bytes]]) -> None:
        data = self.encode(fields)
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (90, 105):  # EMSGSIZE, ENOBUFS: too big for one datagram
                self.close()
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | getattr(os, "MFD_ALLOW_SEALING", 2))
        try:
            os.write(fd, data)
            try:
                import fcntl

                seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
            except (AttributeError, OSError):
                pass  # journald accepts sealed memfds only; an old kernel would refuse either way
            assert self._sock is not None
            self._sock.sendmsg(
                [], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())], 0, self.path
            )
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SystemdPythonJournal:
    """systemd-python's journal.sendv (libsystemd's sd_journal_sendv)."""

    def __init__(self, sendv: Callable[..., Any]) -> None:
        self._sendv = sendv

    def sendv(self, fields: list[tuple[str, bytes]]) -> None:
        self._sendv(*[key.encode("ascii") + b"=" + value for key, value in fields])

    def close(self) -> None:
        pass


def systemd_python_journal() -> SystemdPythonJournal | None:
    try:
        from systemd import journal  # type: ignore[import-not-found]
    except Exception:
        return None
    sendv = getattr(journal, "sendv", None)
    return SystemdPythonJournal(sendv) if sendv is not None else None


def journal_transport(prefer: str = "auto") -> tuple[str, Any]:
    """("systemd-python" | "native", sender) for the journal."""
    if prefer in ("auto", "systemd-python"):
        sender = systemd_python_journal()
        if sender is not None:
            return "systemd-python", sender
        if prefer == "systemd-python":
            raise RuntimeError("systemd-python is not installed")
    return "native", NativeJournal()


def stderr_is_journal(env: dict[str, str] | None = None, stream: TextIO | None = None) -> bool:
    """True when $JOURNAL_STREAM names the file stderr is (systemd connected it to journald)."""
    env = dict(os.environ) if env is None else env
    value = env.get("JOURNAL_STREAM", "")
    if not value:
        return False
    try:
        dev, ino = (int(part) for part in value.split(":", 1))
        st = os.fstat((stream or sys.stderr).fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_socket_present(path: str = JOURNAL_SOCKET) -> bool:
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def field_name(key: str) -> str:
    """A journal field name for a structlog key: INPAINTD_ + upper-case [A-Z0-9_], max 64 chars."""
    cleaned = "".join(ch if ch.isascii() and ch.isalnum() else "_" for ch in str(key).upper())
    return (FIELD_PREFIX + cleaned)[:64]


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) < 1e15 else repr(value)
    if isinstance(value, (dict, list, tuple)):
        try:
            return json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            return str(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def sentence(event_dict: dict[str, Any]) -> str:
    """"job_done job=cat seconds=12.4 regions=2": the event, then its keys, leading ones first."""
    words = [str(event_dict.get("event", ""))]
    keys = [k for k in _LEADING_KEYS if k in event_dict]
    keys += [
        k
        for k in event_dict
        if k not in _SKIP_KEYS and k not in _LEADING_KEYS and k not in _CALLSITE_KEYS and not k.startswith("_")
    ]
    for key in keys:
        text = _value_text(event_dict[key])
        if " " in text or not text:
            text = json.dumps(text, ensure_ascii=False)
        words.append(f"{key}={text}")
    return " ".join(w for w in words if w)


def _traceback_text(event_dict: dict[str, Any]) -> str | None:
    exc = event_dict.get("exception")
    if isinstance(exc, str) and exc:
        return exc  # already formatted by format_exc_info
    exc_info = event_dict.get("exc_info")
    if not exc_info:
        return None
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return None
    return "".join(traceback.format_exception(*exc_info)).rstrip("\n")


def journal_fields(event_dict: dict[str, Any]) -> list[tuple[str, bytes]]:
    """The journal entry for one structlog event."""
    level = str(event_dict.get("level", "info")).lower()
    # MESSAGE is for a person (journalctl prints it raw): names from drops are escaped there;
    # the INPAINTD_* fields keep the exact values for machines.
    message = for_display(sentence(event_dict), TRACEBACK_CHARS)
    tb = _traceback_text(event_dict)
    if tb:
        message = f"{message}\n{tb}"
    fields: list[tuple[str, str]] = [
        ("MESSAGE", message),
        ("PRIORITY", str(PRIORITIES.get(level, 6))),
        ("SYSLOG_IDENTIFIER", SYSLOG_IDENTIFIER),
        (FIELD_PREFIX + "EVENT", str(event_dict.get("event", ""))),
    ]
    if tb:
        fields.append(("TRACEBACK", tb))
    for key, target in _CALLSITE_KEYS.items():
        if key in event_dict:
            fields.append((target, str(event_dict[key])))
    if "logger_name" in event_dict:
        fields.append((FIELD_PREFIX + "LOGGER", str(event_dict["logger_name"])))
    for key, value in event_dict.items():
        if key in _SKIP_KEYS or key in _CALLSITE_KEYS or key.startswith("_"):
            continue
        if value is None:
            continue
        fields.append((field_name(key), _value_text(value)))
    return [(k, v.encode("utf-8", "replace")) for k, v in fields]


class JournaldLogger:
    """structlog's final 'logger': sends prepared fields; falls back to stderr, never raises."""

    def __init__(self, sender: Any, transport: str, fallback: TextIO | None = None) -> None:
        self._sender = sender
        self.transport = transport
        self._fallback = fallback
        self._lock = threading.Lock()
        self._failing = False

    def _stream(self) -> TextIO:
        return self._fallback or sys.stderr

    def msg(self, event_dict: dict[str, Any]) -> None:
        try:
            fields = journal_fields(event_dict)
            with self._lock:
                self._sender.sendv(fields)
        except Exception as exc:  # noqa: BLE001 - logging must never take the daemon down
            self._fall_back(event_dict, exc)
            return
        if self._failing:
            self._failing = False
            self._write("inpaintd: journald reachable again, logging there")

    def _fall_back(self, event_dict: dict[str, Any], exc: Exception) -> None:
        if not self._failing:
            self._failing = True
            self._write(
                f"inpaintd: cannot log to journald ({type(exc).__name__}: {exc}); "
                "logging to stderr until it comes back"
            )
        line = sentence(event_dict)
        tb = _traceback_text(event_dict)
        level = str(event_dict.get("level", "info")).upper()
        self._write(f"{level} {line}" + (f"\n{tb}" if tb else ""))

    def _write(self, text: str) -> None:
        try:
            stream = self._stream()
            stream.write(text + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - nowhere left to report to
            pass

    log = debug = info = warning = warn = error = err = critical = exception = fatal = failure = msg


def journal_processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> Any:
    return ((event_dict,), {})
