"""Inbox names: which names are junk, what role a file plays in its job, and which stems are one job.

Pure string rules, shared by the scan (junk folders are not looked into) and grouping.
"""

from __future__ import annotations

import unicodedata

from ..core.jobs import DISTINCT_SUFFIX_CHARS

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "tif", "tiff", "bmp")
PROMPT_EXTENSIONS = ("txt", "yaml", "json")
FOLDER_PROMPT_NAMES = ("prompt.txt", "prompt.yaml", "prompt.json", "job.txt", "job.yaml", "job.json")
JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db"})
JUNK_SUFFIXES = (".part", ".partial", ".tmp", ".filepart", ".crdownload")


# The longest name derived from a job's NAME: a distinct output NAME<suffix>.webp (outbox) or a
# record NAME<suffix> (failed/, archive/), the suffix from core.jobs.distinct_names.
DERIVED_SUFFIX_BYTES = DISTINCT_SUFFIX_CHARS + len(".webp")


def junk_reason(name: str) -> str | None:
    """Why a file name is client debris to ignore, or None for a real name."""
    lower = name.lower()
    if name.startswith("._"):
        return "AppleDouble file"
    if name.startswith("."):
        return "hidden or temporary file (dotfile, rsync temp)"
    if name.startswith("~$"):
        return "Office lock file"
    if lower in JUNK_NAMES:
        return "system file"
    for suffix in JUNK_SUFFIXES:
        if lower.endswith(suffix):
            return f"partial upload ({suffix})"
    return None


def job_key(stem: str) -> str:
    """What two stems must share to be one job: canonically equivalent ignoring case.

    Unicode's canonical caseless match, NFD(casefold(NFD(x))), up to the normal form: NFC is
    used because it is what most clients write. Casefold (not lower) so "STRASSE" and "straße"
    meet, as a case-insensitive SMB share would have them.
    """
    return unicodedata.normalize("NFC", unicodedata.normalize("NFD", stem).casefold())


def parse_name(name: str) -> tuple[str, str] | None:
    """(stem, role) for a loose inbox file name; role is image, mask or prompt."""
    base, dot, ext = name.rpartition(".")
    if not dot or not base:
        return None
    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
        if base.lower().endswith(".mask") and len(base) > len(".mask"):
            return base[: -len(".mask")], "mask"
        return base, "image"
    if ext in PROMPT_EXTENSIONS:
        return base, "prompt"
    return None


def parse_folder_member(name: str) -> str | None:
    """Role of a file inside a job folder: image.*, mask.*, prompt.txt|job.yaml|job.json."""
    lower = name.lower()
    base, dot, ext = lower.rpartition(".")
    if dot and ext in IMAGE_EXTENSIONS and base in ("image", "mask"):
        return base
    if lower in FOLDER_PROMPT_NAMES:
        return "prompt"
    return None
