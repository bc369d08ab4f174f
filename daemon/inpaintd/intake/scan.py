"""The inbox scan: lstat only; links are reported as links, never followed.

Every entry of the inbox, and the entries one level inside real (non-junk) folders, as the
plain `Stat` records grouping.py plans from.
"""

from __future__ import annotations

import os
import stat as stat_mod
from pathlib import Path

from .grouping import Kind, Stat
from .names import junk_reason


def _kind(mode: int) -> Kind:
    if stat_mod.S_ISREG(mode):
        return Kind.FILE
    if stat_mod.S_ISDIR(mode):
        return Kind.DIR
    if stat_mod.S_ISLNK(mode):
        return Kind.SYMLINK
    return Kind.SPECIAL


def _stat(path: str, st: os.stat_result) -> Stat:
    return Stat(path, _kind(st.st_mode), st.st_size, st.st_mtime_ns, st.st_nlink, st.st_ino, st.st_ctime_ns)


def scan_inbox(inbox: Path) -> list[Stat]:
    """Every entry of the inbox, and the entries one level inside real (non-junk) folders."""
    out: list[Stat] = []
    with os.scandir(inbox) as entries:
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            item = _stat(entry.name, st)
            out.append(item)
            if item.kind is Kind.DIR and junk_reason(entry.name) is None:
                out.extend(_scan_folder(Path(entry.path), entry.name))
    return out


def _scan_folder(folder: Path, name: str) -> list[Stat]:
    out: list[Stat] = []
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return out  # replaced or removed meanwhile; the next scan sees what it is
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out.append(_stat(f"{name}/{entry.name}", st))
    finally:
        os.close(fd)
    return out
