"""Logging set-up: structlog events to the console, to JSON lines, or to journald as fields.

THIS MODULE HOLDS GLOBAL STATE: structlog's configuration, the stdlib root logger's handler
and the journald sender are process-wide. `configure_logging()` is called once at start-up
(calling it again replaces the previous set-up, which is what tests do).

Backends ("auto" picks):
- "journald" when stderr is the journal stream systemd set up ($JOURNAL_STREAM matches
  stderr's device:inode, see systemd.exec(5)) and the journal socket is usable. Each event
  becomes one entry: MESSAGE is a readable sentence, PRIORITY comes from the level, and the
  keys become upper-case fields: INPAINTD_EVENT, INPAINTD_JOB (from job=), INPAINTD_CODE
  (from code=), INPAINTD_<KEY> for the rest, so `journalctl -u inpaintd INPAINTD_JOB=cat`
  works. Exceptions carry their traceback in MESSAGE and in TRACEBACK. How an event becomes
  an entry and how it is sent is journal.py. A send that fails (e.g. ConnectionRefusedError
  from a stale socket file with no journald behind it) never reaches the caller: that event
  goes to stderr and the fallback is said once.
- "console": coloured when stderr is a terminal, plain otherwise.
- "json": one JSON object per line on stderr.

Records from the stdlib `logging` module (diffusers, transformers, warnings) are routed
through the same pipeline.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, TextIO

import structlog

from ..core.quoting import (
    LOG_VALUE_CHARS,
    TRACEBACK_CHARS,
    for_display,
    record_json,
    shorten,
)
from .journal import (
    JournaldLogger,
    journal_processor,
    journal_socket_present,
    journal_transport,
    stderr_is_journal,
    systemd_python_journal,
)

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

_state: dict[str, Any] = {"backend": None, "transport": None, "sender": None}


# --- stdlib logging bridge --------------------------------------------------------------
class _StructlogHandler(logging.Handler):
    """Forwards stdlib records (third-party libraries) into the structlog pipeline."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            logger = structlog.get_logger()
            kw: dict[str, Any] = {"logger_name": record.name}
            if record.exc_info and record.exc_info[0] is not None:
                kw["exc_info"] = record.exc_info
            logger.log(record.levelno, record.getMessage(), **kw)
        except Exception:  # noqa: BLE001
            self.handleError(record)


# --- configuration ----------------------------------------------------------------------
def choose_backend(fmt: str = "auto") -> str:
    fmt = (fmt or "auto").lower()
    if fmt in ("console", "json", "journald"):
        return fmt
    if fmt != "auto":
        raise ValueError(f"unknown log format {fmt!r} (auto, console, json, journald)")
    if stderr_is_journal() and (systemd_python_journal() is not None or journal_socket_present()):
        return "journald"
    return "console"


def bound_fields(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """Cut every field to a bounded size: values can quote what a user dropped (names, options)."""
    for key, value in list(event_dict.items()):
        if key == "exc_info":
            continue
        limit = TRACEBACK_CHARS if key == "exception" else LOG_VALUE_CHARS
        if isinstance(value, str):
            if len(value) > limit:
                event_dict[key] = shorten(value, limit)
        elif isinstance(value, (list, tuple, dict, set)):
            text = repr(value) if len(value) <= 10_000 else ""
            if not text or len(text) > limit:
                event_dict[key] = shorten(text, limit) if text else f"<{type(value).__name__} of {len(value)} items>"
    return event_dict


def display_safe(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    """For the console (a person's terminal): every string value with its hidden characters
    escaped, so a file name holding ESC sequences or a bidi override cannot reach the terminal."""
    for key, value in list(event_dict.items()):
        if key == "exc_info":
            continue
        if isinstance(value, str):
            event_dict[key] = for_display(value, TRACEBACK_CHARS if key == "exception" else LOG_VALUE_CHARS)
        elif isinstance(value, (list, tuple)):
            event_dict[key] = [for_display(v, LOG_VALUE_CHARS) if isinstance(v, str) else v for v in value]
    return event_dict


_listeners: list[Callable[[dict[str, Any]], None]] = []


def add_listener(listener: Callable[[dict[str, Any]], None]) -> None:
    """Have `listener` see every event (a copy of its fields) as it is logged: the metrics count
    outcomes from the same events the journal gets, so the two never disagree."""
    _listeners.append(listener)


def remove_listener(listener: Callable[[dict[str, Any]], None]) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


def _tell_listeners(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    for listener in list(_listeners):
        try:
            listener(dict(event_dict))
        except Exception:  # noqa: BLE001 - a listener never costs an event its line
            pass
    return event_dict


def _below(numeric: int) -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    def drop(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        if LEVELS.get(str(event_dict.get("level", "")), numeric) < numeric:
            raise structlog.DropEvent
        return event_dict

    return drop


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    *,
    stream: TextIO | None = None,
    journal_prefer: str = "auto",
) -> str:
    """Set up structlog (and the stdlib root logger) once; returns "console" | "json" | "journald".

    stream: where console/json lines (and journald's fallback) go; stderr by default.
    journal_prefer: "auto" | "systemd-python" | "native" transport for journald.
    """
    level_name = (level or "info").lower()
    if level_name not in LEVELS:
        raise ValueError(f"unknown log level {level!r} ({', '.join(LEVELS)})")
    numeric = LEVELS[level_name]
    backend = choose_backend(fmt)
    out = stream or sys.stderr

    old = _state.get("sender")
    if old is not None:
        try:
            old.close()
        except Exception:  # noqa: BLE001
            pass

    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        bound_fields,
        _tell_listeners,
        _below(numeric),
    ]
    transport: str | None = None
    sender: Any = None
    if backend == "journald":
        transport, sender = journal_transport(journal_prefer)
        processors = shared + [
            structlog.processors.StackInfoRenderer(),
            structlog.processors.CallsiteParameterAdder(
                {
                    structlog.processors.CallsiteParameter.PATHNAME,
                    structlog.processors.CallsiteParameter.LINENO,
                    structlog.processors.CallsiteParameter.FUNC_NAME,
                },
                additional_ignores=["inpaintd.service.logs", "inpaintd.service.journal", "logging"],
            ),
            journal_processor,
        ]
        journal_logger = JournaldLogger(sender, transport, fallback=stream)
        factory: Callable[..., Any] = lambda *_args: journal_logger  # noqa: E731
    elif backend == "json":
        processors = shared + [
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            bound_fields,
            structlog.processors.JSONRenderer(serializer=lambda data, **_kw: record_json(data, None)),
        ]
        factory = structlog.WriteLoggerFactory(file=out)
    else:
        colors = bool(getattr(out, "isatty", lambda: False)()) and not os.environ.get("NO_COLOR")
        processors = shared + [
            structlog.processors.TimeStamper(fmt="%Y-%m-%d %H:%M:%S", utc=False),
            structlog.processors.StackInfoRenderer(),
            display_safe,
            structlog.dev.ConsoleRenderer(colors=colors, exception_formatter=structlog.dev.plain_traceback),
        ]
        factory = structlog.WriteLoggerFactory(file=out)

    structlog.configure(
        processors=processors,
        # Info events reach the listeners (metrics) whatever the level; _below drops them after.
        wrapper_class=structlog.make_filtering_bound_logger(min(numeric, logging.INFO)),
        logger_factory=factory,
        # Not cached: module-level loggers must follow a later configure_logging() (tests).
        cache_logger_on_first_use=False,
    )

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, _StructlogHandler):
            root.removeHandler(handler)
    root.addHandler(_StructlogHandler())
    # Third-party libraries are chatty at INFO; keep them at WARNING unless debugging.
    root.setLevel(numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING))
    logging.captureWarnings(True)

    adopt_library_loggers()
    _state.update(backend=backend, transport=transport, sender=sender)
    return backend


# Libraries that give their logger its own stderr handler and stop propagation once imported.
_SELF_HANDLING_LIBRARIES = ("transformers", "diffusers", "huggingface_hub")


def adopt_library_loggers() -> list[str]:
    """Route the already-imported HF libraries' logs through our pipeline (journald fields).

    transformers/diffusers attach their own stderr handler and set propagate=False on first
    use, which would bypass the root handler configure_logging installs. Call this after the
    model is loaded (the engine imports them); configure_logging calls it too. Returns the
    libraries adopted.
    """
    adopted = []
    for name in _SELF_HANDLING_LIBRARIES:
        module = sys.modules.get(f"{name}.utils.logging")
        if module is None:
            continue
        try:
            module.disable_default_handler()
            module.enable_propagation()
        except Exception:  # noqa: BLE001 - an API change must not break logging
            continue
        adopted.append(name)
    return adopted


def describe_backends(notifier: Any = None) -> dict[str, str]:
    """What start-up should log: which log and notify backends are in use."""
    backend = _state.get("backend") or "unconfigured"
    transport = _state.get("transport")
    info = {"log_backend": f"{backend} ({transport})" if transport else backend}
    if notifier is not None:
        describe = getattr(notifier, "describe", None)
        info["notify_backend"] = describe() if callable(describe) else str(getattr(notifier, "backend", notifier))
    return info
