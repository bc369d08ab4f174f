"""Bounded quoting: a user's value never makes a record, a log line or status.json large.

A 329-byte YAML file can expand to hundreds of megabytes through aliases, and a file name,
an option key or a prompt is whatever the sender chose. Every message that quotes such a
value goes through `quote` (a repr cut to a few hundred characters) or `shorten`, and every
record's `details` through `bounded`, so records stay small whatever was dropped.
"""

from __future__ import annotations

import json
from typing import Any

QUOTE_CHARS = 120  # a quoted value inside a sentence
MESSAGE_CHARS = 600  # one human sentence in error.json, status.json or a log line
DETAILS_BYTES = 16_384  # the machine-readable details of one failure, JSON-encoded
LOG_VALUE_CHARS = 4_000  # any one string field of a log event (tracebacks: TRACEBACK_CHARS)
TRACEBACK_CHARS = 32_000


def shorten(text: str, limit: int = MESSAGE_CHARS) -> str:
    """text cut to at most `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    marker = f"... [{len(text) - limit:,} more characters]"
    keep = max(0, limit - len(marker))
    return text[:keep] + marker


def quote(value: Any, limit: int = QUOTE_CHARS) -> str:
    """repr(value) for a message, never longer than `limit` characters.

    Containers are described, not expanded: repr of an aliased YAML structure is itself the
    amplification this guards against, so it is never built.
    """
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return f"<{type(value).__name__} of {len(value)} items>"
    if isinstance(value, (str, bytes)) and len(value) > limit * 4:
        value = value[: limit * 4]
    return shorten(repr(value), limit)


def bounded(details: Any, limit: int = DETAILS_BYTES) -> Any:
    """details as they may be recorded: unchanged when small, else a note with a short excerpt."""
    try:
        encoded = json.dumps(details, ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        return {"note": "details could not be encoded"}
    if len(encoded) <= limit:
        return details
    return {"note": f"details were {len(encoded):,} characters; shortened", "excerpt": shorten(encoded, limit // 2)}
