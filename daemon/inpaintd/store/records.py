"""Records: a finished job's inputs into archive/NAME/, a failed one's with error.json into failed/NAME/.

Either folder is built inside the claim (`record/`; in root under a temp name when root is on
another filesystem) and renamed into place whole (`_file_away`), so whoever reads failed/ or
archive/ sees a record with all its inputs or nothing, a kill anywhere leaves a staging folder
the next attempt finishes, and a device whose claim was taken over (fleet) cannot file anything:
its last rename starts from the claim folder it no longer has. The error is
recorded in the claim (state failing) before anything moves.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import stat as stat_mod
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..core.boundary import transient
from ..core.errors import JobError, TakenOver
from ..core.jobs import DISTINCT_SUFFIX_CHARS, timestamp
from ..core.quoting import bounded, shorten
from .fsutil import (
    TEMP_PREFIX,
    atomic_write_bytes,
    fsync_dir,
    move_entry,
    own_temp_prefix,
    rename_distinct,
    rename_noreplace,
    same_filesystem,
)
from . import pausepoints
from .outbox import encode_record, host, job_id_in, read_record, remove_temp_files
from .pausepoints import PausePoint
from .spool import Claim, ClaimState, Spool

ERROR_SCHEMA = "inpaintd.error/1"
RECORD = "record"  # the claim's subfolder where a failed/ or archive/ record is built


def record_dir_name(name: str, name_max: int = 255) -> str:
    """The folder name a job's record gets in failed/ or archive/: its name, cut (by UTF-8
    bytes, on a character boundary, with a short hash) where its longest distinct name
    (core.jobs.distinct_names) would not fit."""
    room = name_max - DISTINCT_SUFFIX_CHARS
    raw = os.fsencode(name)
    if len(raw) <= room:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:8]
    cut = raw[: room - len(digest) - 1]
    text = cut.decode("utf-8", "ignore") if not _has_surrogates(name) else os.fsdecode(cut)
    while len(os.fsencode(text)) > room - len(digest) - 1:
        text = text[:-1]
    return f"{text}~{digest}"


def _has_surrogates(text: str) -> bool:
    return any(0xDC80 <= ord(c) <= 0xDCFF for c in text)


def _move_inputs(root: Path, entries: list[str], folder: str | None, dst: Path, max_bytes: int | None) -> list[str]:
    """Move a job's entries from root into dst; a job folder's contents go to dst itself.

    Repeatable: entries already moved by an attempt a stop interrupted are skipped. A copy
    across filesystems takes at most max_bytes of a file (fsutil.move_entry).
    """
    moved: list[str] = []
    if folder is not None and entries == [folder]:
        src = root / folder
        if os.path.isdir(src) and not os.path.islink(src):
            for child in sorted(os.listdir(src)):
                move_entry(src / child, dst / child, max_bytes)
                moved.append(child)
            src.rmdir()
            return moved
    for entry in entries:
        if os.path.lexists(root / entry):
            move_entry(root / entry, dst / entry, max_bytes)
            moved.append(entry)
    return moved


def _file_away(spool: Spool, claim: Claim, root: Path, error: Mapping[str, Any] | None,
               max_bytes: int | None) -> Path | None:
    try:
        return _file_away_fenced(spool, claim, root, error, max_bytes)
    except FileNotFoundError as exc:
        _taken_over(exc, claim)
        raise


def _file_away_fenced(spool: Spool, claim: Claim, root: Path, error: Mapping[str, Any] | None,
                      max_bytes: int | None) -> Path | None:
    """The claim's inputs (and error.json) into root/NAME/ (NAME-1 ... when taken); the claim is dropped.

    The folder is built in the claim (`_staging`) and renamed into place whole, so whoever
    reads failed/ or archive/ sees a record with all its inputs or nothing, two daemons never
    share a folder, and a kill anywhere leaves a staging folder that the next attempt (same
    job id, or the device that took the claim over) finishes. None when an earlier attempt had already renamed it into
    place before a stop (the claim's inputs are gone): only the drop was left.
    """
    staging = _staging(claim, root)
    final: Path | None = None
    folder = claim.record.get("folder")
    job_folder = claim.inputs / folder if folder is not None else None
    if (not os.path.lexists(staging) and job_folder is not None and claim.entries() == [folder]
            and stat_mod.S_ISDIR(_lstat_mode(job_folder))):
        # A job folder becomes the record folder itself, in one rename: what it holds (a
        # read-only subfolder, a tree nested deep) is never moved piece by piece.
        try:
            os.rename(job_folder, staging)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.ENOENT):
                raise
    if os.path.lexists(staging) or _has_inputs(claim):
        staging.mkdir(exist_ok=True)
        remove_temp_files(staging, own_temp_prefix())  # a copy or a write a stop interrupted
        _move_inputs(claim.inputs, claim.entries(), folder, staging, max_bytes)
        if error is not None:
            renamed = _set_aside(staging / "error.json", claim.job_id)
            record = {**error, "renamed_inputs": renamed} if renamed else dict(error)
            atomic_write_bytes(staging / "error.json", encode_record(record))
        os.utime(staging)  # retention ages a record from its filing, not from the uploader's mtimes
        fsync_dir(staging)
        pausepoints.reached(PausePoint.ARCHIVING)
        final = rename_distinct(staging, root, record_dir_name(claim.name), claim.job_id)
        fsync_dir(root)
    spool.drop(claim)
    return final


def _staging(claim: Claim, root: Path) -> Path:
    """Where the record folder is built: inside the claim (fenced: a take-over renames it away
    with the claim, and the old owner's last rename then fails), or, when root is on another
    filesystem (one device, archive on another disk), `.inpaintd-tmp-<job id>` in root; one an
    older version began there is finished there."""
    legacy = root / f"{TEMP_PREFIX}{claim.job_id}"
    if os.path.lexists(legacy):
        return legacy
    return claim.dir / RECORD if same_filesystem(claim.dir, root) else legacy


def _taken_over(exc: OSError, claim: Claim) -> None:
    """A step that failed because the claim folder is gone: another device took the claim."""
    if isinstance(exc, FileNotFoundError) and not os.path.lexists(claim.dir):
        raise TakenOver(f"{claim.name} was taken over by another device") from None


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _set_aside(path: Path, job_id: str) -> dict[str, str]:
    """An input that is itself named error.json is kept under another name, never overwritten."""
    if not os.path.lexists(path) or job_id_in(path) == job_id:
        return {}
    for index in range(1, 1000):
        candidate = path.with_name(f"{path.name}.input" if index == 1 else f"{path.name}.input-{index}")
        try:
            rename_noreplace(path, candidate)
        except FileExistsError:
            continue
        return {path.name: candidate.name}
    raise OSError(errno.EEXIST, "no free name to keep an input named error.json", str(path))


def _has_inputs(claim: Claim) -> bool:
    try:
        return any(True for _ in os.scandir(claim.inputs))
    except FileNotFoundError:
        return False


def archive_inputs(spool: Spool, claim: Claim, archive: Path, after_success: str,
                   max_bytes: int | None = None) -> Path | None:
    """After publication: inputs to archive/NAME/ (or deleted), then the claim is dropped.
    max_bytes: limits.max_input_bytes, what a copy to another filesystem takes of a file at most."""
    try:
        if after_success == "delete":
            shutil.rmtree(claim.inputs, ignore_errors=False, onerror=_gone_is_fine)
            spool.drop(claim)
            return None
        return _file_away(spool, claim, archive, None, max_bytes)
    except OSError as exc:
        _taken_over(exc, claim)
        error = transient(exc, archive, "archive")
        if error is not None:
            raise error from exc
        raise


def _gone_is_fine(function: Any, path: str, exc_info: Any) -> None:
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def error_record(error: JobError, name: str, **fields: Any) -> dict[str, Any]:
    """error.json's content; the message and details are bounded whatever the input was."""
    return {
        "schema": ERROR_SCHEMA,
        "status": "failed",
        "code": error.code,
        "message": shorten(error.message),
        "details": bounded(dict(error.details)),
        "job": name,
        **fields,
        "host": host(),
        "daemon_version": __version__,
    }


def record_without_inputs(failed: Path, name: str, error: JobError, now: float) -> Path:
    """failed/NAME/error.json for entries that cannot be taken out of the inbox (they stay there)."""
    staging = failed / f"{own_temp_prefix()}{secrets.token_hex(6)}"
    staging.mkdir()
    try:
        atomic_write_bytes(staging / "error.json", encode_record(error_record(error, name, inputs=[], failed_at=timestamp(now))))
        final = failed / record_dir_name(name)
        try:
            rename_noreplace(staging, final)
        except FileExistsError:
            if read_record(final / "error.json").get("code") == error.code:
                shutil.rmtree(staging)  # recorded already (another daemon on this inbox, or before a restart)
                return final
            final = rename_distinct(staging, failed, record_dir_name(name), secrets.token_hex(4))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(failed)
    return final


def fail_claim(spool: Spool, claim: Claim, error: JobError, failed: Path, now: float,
               extra: Mapping[str, Any] | None = None, max_bytes: int | None = None) -> Path | None:
    """Inputs and error.json to failed/NAME/ (distinct if taken); the claim is dropped.

    The error is recorded in the claim (state failing) before anything moves, so a stop
    anywhere is finished by the next attempt with the same record. None when a stop came
    after the record was in place (only the drop was left).
    """
    try:
        if claim.state is not ClaimState.FAILING or "error" not in claim.record:
            record = error_record(
                error,
                claim.name,
                job_id=claim.job_id,
                attempts=claim.attempts,
                inputs=claim.entries(),
                arrived=timestamp(claim.arrived),
                failed_at=timestamp(now),
                **(extra or {}),
            )
            spool.mark(claim, ClaimState.FAILING, error=record)
        # A drop rejected at intake was never found within the limit (input_too_large is one of
        # them): it is filed whole, however large; only a copy of what passed the check is cut.
        bound = None if "rejection" in claim.record else max_bytes
        return _file_away(spool, claim, failed, claim.record["error"], bound)
    except OSError as exc:
        _taken_over(exc, claim)
        trouble = transient(exc, failed, "failed")
        if trouble is not None:
            raise trouble from exc
        raise
