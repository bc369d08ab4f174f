"""Retention: outbox/, archive/ and failed/ kept under a maximum age and a maximum total size.

`select` is the rule, pure (the clock and the listing are parameters): oldest first, a record
older than its folder's maximum age goes, then the oldest go until the folder is under its
byte budget, and nothing younger than the minimum age goes, whatever a budget says.

A record goes whole: a failed/NAME or archive/NAME folder in one rename; an outbox result as
its sidecar, then its image (a consumer waits for NAME.json, so it never sees a sidecar
without its image; a kill between the two leaves an image without a sidecar, the state every
publication passes through, removed by a later prune once it is an hour old).

Each part is first renamed to a private trash name in the same folder and only then deleted.
The rename is the decision: when several devices prune one share at once, exactly one rename
of a part succeeds and the others find it gone, so nothing is removed twice. The trashed inode
is compared with the one listed: a record filed under a freed name since the listing is put
back, never removed. Every removal is logged with its reason.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat as stat_mod
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import structlog

from ..core.errors import StrEnum
from . import fsutil
from .fsutil import fsync_dir, rename_noreplace

log = structlog.get_logger("inpaintd.retention")

TRASH_PREFIX = ".inpaintd-trash-"
# An outbox image without its sidecar is a publication under way (seconds) or a removal a kill
# interrupted; only the second lasts an hour.
ORPHAN_GRACE = 3600.0
# Another device's trash older than this was left by a kill (its own prune finishes in seconds).
STALE_TRASH = 3600.0
DAY = 86400.0


class Reason(StrEnum):
    AGE = "age"  # older than the folder's maximum age
    SIZE = "size"  # the folder is over its byte budget and this is its oldest record
    ORPHAN = "orphan"  # an outbox image whose sidecar is gone


@dataclass(frozen=True)
class Record:
    """One removable unit of a folder, as listed."""

    name: str  # the folder's entry, or an outbox result's stem
    parts: tuple[str, ...]  # entries of the folder, removed in this order (a sidecar before its image)
    inodes: tuple[int, ...]  # the parts' inodes when listed
    mtime: float  # when it was written (the newest part)
    size: int  # bytes on disk, every file inside (disk_bytes)
    orphan: bool = False


@dataclass(frozen=True)
class Budget:
    max_age: float  # seconds; 0 = no limit
    max_bytes: int  # 0 = no limit
    min_age: float  # seconds; nothing younger is removed


@dataclass(frozen=True)
class Removal:
    folder: str  # outbox | archive | failed
    record: Record
    reason: Reason


def select(records: Iterable[Record], now: float, budget: Budget) -> list[tuple[Record, Reason]]:
    """What to remove to bring a folder within its budget, oldest first, each with its reason."""
    ordered = sorted(records, key=lambda r: (r.mtime, r.name))
    total = sum(r.size for r in ordered)
    out: list[tuple[Record, Reason]] = []
    for record in ordered:
        age = now - record.mtime
        if age < budget.min_age:
            continue
        if record.orphan:
            if age < ORPHAN_GRACE:
                continue
            reason = Reason.ORPHAN
        elif budget.max_age and age > budget.max_age:
            reason = Reason.AGE
        elif budget.max_bytes and total > budget.max_bytes:
            reason = Reason.SIZE
        else:
            continue
        out.append((record, reason))
        total -= record.size
    return out


def budgets(retention: Any) -> dict[str, Budget]:
    """core.config.RetentionConfig -> the three folders' budgets."""
    min_age = retention.min_age_days * DAY
    return {
        "outbox": Budget(retention.outbox_max_days * DAY, retention.outbox_max_bytes, min_age),
        "archive": Budget(retention.archive_max_days * DAY, retention.archive_max_bytes, min_age),
        "failed": Budget(retention.failed_max_days * DAY, retention.failed_max_bytes, min_age),
    }


# -- listing --------------------------------------------------------------------------------


def list_records(folder: Path, kind: str) -> list[Record]:
    """The records in a folder: outbox results by stem, else each entry (dot names are ours: temp
    files, staging folders, trash; never records)."""
    try:
        with os.scandir(folder) as scan:
            entries = [(e.name, e.stat(follow_symlinks=False)) for e in scan if not e.name.startswith(".")]
    except FileNotFoundError:
        return []
    if kind == "outbox":
        return _outbox_records(entries)
    return [Record(name, (name,), (st.st_ino,), st.st_mtime, _tree_size(folder / name, st))
            for name, st in entries]


def _outbox_records(entries: list[tuple[str, os.stat_result]]) -> list[Record]:
    stems: dict[str, dict[str, os.stat_result]] = {}
    for name, st in entries:
        stem, dot, _ = name.rpartition(".")
        stems.setdefault(stem if dot else name, {})[name] = st
    out = []
    for stem, files in stems.items():
        sidecar = f"{stem}.json"
        others = sorted(n for n in files if n != sidecar)
        parts = ([sidecar] if sidecar in files else []) + others
        sts = [files[p] for p in parts]
        out.append(Record(stem, tuple(parts), tuple(s.st_ino for s in sts), max(s.st_mtime for s in sts),
                          sum(disk_bytes(s) for s in sts), orphan=sidecar not in files))
    return out


def disk_bytes(st: os.stat_result) -> int:
    """What a file costs the disk: its allocated blocks, never more than its length. A sparse
    file a drop user grew to terabytes through a second handle (failed input_too_large, kept in
    failed/) holds almost nothing; counted by its length it would make every other record the
    oldest ones 'over the budget' and have them removed."""
    return min(st.st_size, st.st_blocks * 512)


def _tree_size(path: Path, st: os.stat_result) -> int:
    if not stat_mod.S_ISDIR(st.st_mode):
        return disk_bytes(st)
    total = 0
    for root, _dirs, files in os.walk(path):  # never follows links
        for name in files:
            try:
                total += disk_bytes(os.lstat(os.path.join(root, name)))
            except OSError:
                continue
    return total


# -- removing -------------------------------------------------------------------------------


def own_trash_prefix() -> str:
    """This device's trash names (fsutil.set_writer), so a prune clears only its own at once."""
    return TRASH_PREFIX + fsutil.own_temp_prefix()[len(fsutil.TEMP_PREFIX):]


def remove(folder: Path, record: Record) -> bool:
    """Remove one record, part by part in order; False when another remover had it, or a part is
    no longer the one listed (then nothing more of it is touched)."""
    for index, (part, inode) in enumerate(zip(record.parts, record.inodes)):
        trash = folder / f"{own_trash_prefix()}{secrets.token_hex(6)}"
        try:
            os.rename(folder / part, trash)
        except FileNotFoundError:
            if index == 0:
                return False  # another device's prune took it: it removes the rest
            continue
        if os.lstat(trash).st_ino != inode:
            _put_back(trash, folder / part)
            return False
        _delete(trash)
    fsync_dir(folder)
    return True


def _put_back(trash: Path, path: Path) -> None:
    try:
        rename_noreplace(trash, path)
    except FileExistsError:  # its name was taken again meanwhile: keep it, visibly, under another
        kept = fsutil.rename_distinct(trash, path.parent, f"{path.name}.kept", secrets.token_hex(4))
        log.error("retention.kept_aside", entry=path.name, kept=kept.name)


def _delete(path: Path) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, onerror=_make_writable)
    else:
        os.unlink(path)


def _make_writable(function: Any, path: str, exc_info: Any) -> None:
    """A read-only folder inside a record (copied with scp -rp): make it writable where we own it."""
    if isinstance(exc_info[1], FileNotFoundError):
        return
    parent = os.path.dirname(path)
    try:
        os.chmod(parent, 0o700)
        function(path)
    except OSError:
        raise exc_info[1] from None


def clear_trash(folder: Path, now: float | None = None) -> None:
    """Trash a kill left mid-prune: ours at once, another device's once it is stale."""
    now = time.time() if now is None else now
    mine = own_trash_prefix()
    try:
        with os.scandir(folder) as scan:
            entries = [e for e in scan if e.name.startswith(TRASH_PREFIX)]
    except FileNotFoundError:
        return
    for entry in entries:
        try:
            if entry.name.startswith(mine) or now - entry.stat(follow_symlinks=False).st_ctime > STALE_TRASH:
                _delete(Path(entry.path))
        except FileNotFoundError:
            continue


def prune(folders: dict[str, Path], plan: dict[str, Budget], now: float,
          tick: Callable[[], None] = lambda: None) -> list[Removal]:
    """One pass over the folders; each removal logged with its reason. A folder that cannot be
    pruned now is logged and left for the next pass; it never stops the others."""
    removed: list[Removal] = []
    for kind, budget in plan.items():
        folder = folders[kind]
        if not (budget.max_age or budget.max_bytes):
            continue
        try:
            clear_trash(folder, now)
            for record, reason in select(list_records(folder, kind), now, budget):
                tick()
                if remove(folder, record):
                    removed.append(Removal(kind, record, reason))
                    log.info("retention.removed", folder=kind, record=record.name, reason=str(reason),
                             age_days=round((now - record.mtime) / DAY, 2), bytes=record.size,
                             files=list(record.parts))
        except OSError as exc:
            log.warning("retention.failed", folder=kind, error=str(exc), note="tried again at the next pass")
    return removed
