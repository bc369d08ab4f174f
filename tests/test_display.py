"""quoting.for_display: what a person sees of a user's string holds no control, format or bidi character."""

from __future__ import annotations

import json
import os
import unicodedata

from hypothesis import given, settings
from hypothesis import strategies as st
from inpaintd.core.quoting import MESSAGE_CHARS, for_display, quote, record_json

HIDDEN = {"Cc", "Cf", "Zl", "Zp", "Cs"}

# Text biased towards the characters that matter, on top of arbitrary code points (surrogates included).
_dangerous = st.sampled_from(
    ["\x1b", "\x07", "\r", "\n", "\t", "\x7f", "\x9b", "\x85", "\u202e", "\u2066", "\u2069", "\u200e",
     "\u200f", "\u061c", "\u2028", "\u2029", "\ufeff", "\u200b", "\udcff", "\U000e0001", "\\", "é", "\u0301"]
)
texts = st.lists(st.one_of(_dangerous, st.characters(codec=None)), max_size=300).map("".join)
safe_texts = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cf", "Zl", "Zp", "Cs")), max_size=MESSAGE_CHARS
)


def hidden(text: str) -> list[str]:
    return [c for c in text if unicodedata.category(c) in HIDDEN]


@settings(max_examples=300)
@given(texts, st.integers(min_value=40, max_value=700))
def test_no_hidden_character_survives_and_length_is_bounded(text: str, limit: int) -> None:
    shown = for_display(text, limit)
    assert hidden(shown) == []
    assert len(shown) <= limit
    shown.encode("utf-8")  # no lone surrogate left: printable anywhere


@settings(max_examples=200)
@given(texts, st.integers(min_value=40, max_value=700))
def test_idempotent(text: str, limit: int) -> None:
    once = for_display(text, limit)
    assert for_display(once, limit) == once


@settings(max_examples=200)
@given(safe_texts)
def test_safe_text_is_kept_exactly(text: str) -> None:
    assert for_display(text) == text


@settings(max_examples=200)
@given(texts)
def test_what_fits_is_escaped_not_lost(text: str) -> None:
    """Every hidden character becomes its repr spelling, so the exact name can be read off the screen."""
    shown = for_display(text, 10_000)
    expected = "".join(repr(c)[1:-1] if unicodedata.category(c) in HIDDEN else c for c in text)
    assert shown == expected


@settings(max_examples=200)
@given(texts)
def test_quote_is_display_safe_too(text: str) -> None:
    assert hidden(quote(text)) == []


def test_the_reported_names() -> None:
    osc52 = "\x1b]52;c;ZXZpbA==\x07x.png"
    assert for_display(osc52) == "\\x1b]52;c;ZXZpbA==\\x07x.png"
    assert for_display("\x1b[2J") == "\\x1b[2J"
    assert for_display("a\x9b31mb") == "a\\x9b31mb"
    assert for_display("photo\u202egnp.exe") == "photo\\u202egnp.exe"
    undecodable = os.fsdecode(b"caf\xff.png")
    assert for_display(undecodable) == "caf\\udcff.png"
    assert for_display("line\r\nnext\ttab") == "line\\r\\nnext\\ttab"


def test_a_cut_never_splits_an_escape() -> None:
    shown = for_display("\x1b" * 500, 60)
    body, _, marker = shown.partition("...")
    assert body == "\\x1b" * (len(body) // 4)
    assert marker == f" [{500 - len(body) // 4:,} more characters]"


@settings(max_examples=200)
@given(st.dictionaries(texts, st.one_of(texts, st.lists(texts, max_size=3)), max_size=4), st.sampled_from([None, 2]))
def test_a_record_keeps_every_value_exactly_and_shows_nothing_hidden(record: dict, indent: int | None) -> None:
    encoded = record_json(record, indent)
    assert json.loads(encoded) == record
    assert hidden(encoded.replace("\n", "")) == []
    encoded.encode("utf-8")  # writable as UTF-8 without surrogateescape


def test_a_record_of_the_reported_names() -> None:
    name = "a\x9b31m\u202egnp.png\udcff"
    encoded = record_json({"job": name, "message": "x"})
    assert '"job": "a\\u009b31m\\u202egnp.png\\udcff"' in encoded and json.loads(encoded)["job"] == name
    assert record_json({"job": "café"}, None) == '{"job": "café"}'  # readable where safe
