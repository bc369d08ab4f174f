r"""Bounded quoting: a user's value never makes a record, a log line or status.json large.

A 329-byte YAML file can expand to hundreds of megabytes through aliases, and a file name,
an option key or a prompt is whatever the sender chose. Every message that quotes such a
value goes through `quote` (a repr cut to a few hundred characters) or `shorten`, and every
record's `details` through `bounded`, so records stay small whatever was dropped.

Two audiences, two functions:
- for a person (a terminal, the journal, `inpaintd status`, the systemd STATUS= line, the
  `message` sentence of a record): `for_display`. A file name may hold ESC sequences (OSC 52
  writes the clipboard, ESC[2J clears the screen), C1 controls (U+009B is a one-byte CSI) or
  a bidi override (U+202E shows `gpj.exe` as `exe.jpg`); each is shown as a visible escape
  (`\x1b`, `\u202e`), and so are lone surrogates from undecodable bytes (`\udcff`).
  `quote` is display-safe too (repr escapes the same characters); `shorten` is not: it only
  bounds length, for text already safe or bound for a machine record.
- for a machine record (error.json, the sidecar, the JSON log's fields): the exact name, so a
  consumer can find the file, JSON-encoded by `record_json`, which writes every hidden
  character as a JSON escape (json.loads gives the exact name back, and `cat` shows no raw
  control); `json.dumps(ensure_ascii=False)` alone leaves C1 controls and bidi raw.
"""

from __future__ import annotations

import json
import unicodedata
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


# Categories never shown raw to a person: controls, format characters (bidi controls, zero-width
# joiners, tag characters), line and paragraph separators, and surrogates.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})


def _visible(char: str) -> str:
    """char itself, or the escape repr spells it with (\\n, \\x1b, \\u202e, \\udcff, \\U000e0001)."""
    if unicodedata.category(char) not in _HIDDEN_CATEGORIES:
        return char
    return repr(char)[1:-1]  # every hidden character is non-printable, so repr escapes it


def for_display(text: str, limit: int = MESSAGE_CHARS) -> str:
    """text as it may be shown to a person: hidden characters escaped, at most `limit` characters.

    Output holds no character of category Cc, Cf, Zl, Zp or Cs and is returned unchanged by a
    second call. A cut never splits an escape; the marker counts the original's characters.
    """
    pieces: list[str] = []
    used = 0
    for char in text:
        piece = _visible(char)
        used += len(piece)
        if used > limit:
            break
        pieces.append(piece)
    else:
        return "".join(pieces)
    # Too long: make room for the marker, whose length depends on how much is left out.
    marker_room = len(f"... [{len(text):,} more characters]")
    kept: list[str] = []
    used = 0
    for piece in pieces:
        if used + len(piece) > limit - marker_room:
            break
        kept.append(piece)
        used += len(piece)
    return "".join(kept) + f"... [{len(text) - len(kept):,} more characters]"


def record_json(data: Any, indent: int | None = 2) -> str:
    """JSON for a machine record: exact values, no hidden character raw (escaped as \\uXXXX).

    Other non-ASCII text stays readable (ensure_ascii=False); a lone surrogate (an undecodable
    byte of a file name) is written as its escape, which json.loads turns back into it.
    """
    text = json.dumps(data, indent=indent, ensure_ascii=False, default=str)
    # json.dumps escapes U+0000-U+001F inside strings, so a raw one is the indentation's newline.
    # Every other hidden character is inside a string, where its escape means the same character.
    return "".join(
        _json_escape(c) if c >= " " and unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in text
    )


def _json_escape(char: str) -> str:
    code = ord(char)
    if code > 0xFFFF:
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


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
