"""Publication: the image first, the sidecar last, each atomic, nothing ever overwritten.

A consumer that waits for `NAME.json` in the outbox never sees a partial image. When
`NAME.<ext>` or `NAME.json` exists already, the result goes to `NAME-1.<ext>`/`NAME-1.json`
(and so on) and the sidecar says so. After success the inputs go to `archive/NAME/` (or
are deleted); after a failure the inputs and `error.json` go to `failed/NAME/`; either folder
is built under a temp name and renamed into place whole (`_file_away`). A full disk
or a missing or unwritable outbox raises TransientError: the job stays claimed, and no
input is touched.

A kill -9 can land anywhere in publication, so the names a job is about to take are recorded in
its claim (fsynced) before the image is written. At the next start `settle_publication` uses
that record: a sidecar carrying the claim's job id means the job is published (archive it, do
not paint it again); an image without its sidecar is removed (a consumer waits for NAME.json,
so an orphan image must never stay); and `remove_temp_files` clears the `.inpaintd-tmp-*` files
a kill left in the middle of an atomic write.
"""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import secrets
import json
import os
import shutil
import socket
import stat as stat_mod
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from . import __version__
from .boundary import transient
from .errors import JobError, TransientError
from .fsutil import (TEMP_PREFIX, atomic_write_bytes, fsync_dir, move_entry, own_temp_prefix, rename_distinct,
                     rename_noreplace)
from .jobs import JobResult
from .quoting import bounded, shorten
from .spool import Claim, Spool

log = structlog.get_logger("inpaintd.outbox")

ERROR_SCHEMA = "inpaintd.error/1"


def timestamp(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="milliseconds")


def host() -> str:
    return socket.gethostname()


def _encode(data: Mapping[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n").encode("utf-8", "surrogateescape")


def publish(
    outbox: Path,
    result: JobResult,
    extra: Mapping[str, Any],
    record: Callable[[dict[str, str]], None] | None = None,
) -> tuple[Path, Path]:
    """Write NAME.<ext>, then NAME.json; returns their paths (possibly NAME-1.* ...).

    `record` is called with {"image", "sidecar", "sha256"} before anything is written under a
    pair of names (again for the next pair if one is taken meanwhile): the caller makes it
    durable, so that recovery after a kill knows which outbox files are this job's.
    """
    if not outbox.is_dir():
        raise TransientError("outbox_unwritable", f"outbox folder {outbox} is missing")
    digest = hashlib.sha256(result.image_bytes).hexdigest()
    for index in range(10_000):
        stem = result.name if index == 0 else f"{result.name}-{index}"
        image = outbox / f"{stem}.{result.extension}"
        sidecar_path = outbox / f"{stem}.json"
        if os.path.lexists(image) or os.path.lexists(sidecar_path):
            continue
        sidecar = {
            **result.sidecar,
            **extra,
            "status": "done",
            "output_file": image.name,
            "sidecar_file": sidecar_path.name,
        }
        if index:
            sidecar["renamed_from"] = f"{result.name}.{result.extension}"
        if record is not None:
            # Outside the outbox's error mapping: this writes the claim in the state folder.
            record({"image": image.name, "sidecar": sidecar_path.name, "sha256": digest})
        try:
            if _write_pair(image, result.image_bytes, sidecar_path, _encode(sidecar)):
                return image, sidecar_path
        except OSError as exc:
            error = transient(exc, outbox, "outbox")
            if error is not None:
                raise error from exc
            raise
    raise TransientError("outbox_unwritable", f"no free output name for {result.name} in {outbox}")


def _write_pair(image: Path, image_bytes: bytes, sidecar: Path, sidecar_bytes: bytes) -> bool:
    """The image, then its sidecar; False (nothing left behind) when a name was taken meanwhile."""
    try:
        atomic_write_bytes(image, image_bytes, overwrite=False)
    except FileExistsError:
        return False
    try:
        atomic_write_bytes(sidecar, sidecar_bytes, overwrite=False)
    except BaseException as exc:
        image.unlink(missing_ok=True)  # no image without its sidecar; the retry starts clean
        if isinstance(exc, FileExistsError):
            return False
        raise
    return True


def settle_publication(outbox: Path, job_id: str, names: Mapping[str, str]) -> bool:
    """After a stop in the middle of publishing (names as given to publish's `record`).

    True when the sidecar is out and is this job's (the job is published: archive it, never
    paint it again). Otherwise False, after removing the image if it is out without its
    sidecar and holds exactly the bytes this job was writing (so another writer's file is
    never touched). Raises OSError when the outbox cannot be looked at.
    """
    image = outbox / names["image"]
    sidecar = outbox / names["sidecar"]
    if os.path.lexists(sidecar):
        return _job_id_in(sidecar) == job_id
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return False
    if stat_mod.S_ISREG(st.st_mode) and _sha256(image) == names.get("sha256"):
        image.unlink()
        fsync_dir(outbox)
        log.warning("outbox.orphan_removed", file=image.name, job_id=job_id,
                    note="image published without its sidecar before a stop; the job runs again")
    return False


def _load_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _job_id_in(path: Path) -> str | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    return str(data.get("job_id")) if isinstance(data, dict) else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_temp_files(folder: Path, prefix: str = TEMP_PREFIX) -> list[str]:
    """Remove the temp files of atomic writes a kill interrupted (`.inpaintd-tmp-*`); their names.

    Only where no write of this daemon is in flight: the outbox at start-up, a job's own
    failed/NAME/ folder before its error.json is written.
    """
    removed: list[str] = []
    try:
        with os.scandir(folder) as scan:
            entries = list(scan)
    except FileNotFoundError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix) or entry.is_symlink():
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)  # a folder copy a stop interrupted (archive on another disk)
            else:
                os.unlink(entry.path)
            removed.append(entry.name)
        except FileNotFoundError:
            continue
    if removed:
        fsync_dir(folder)
        log.warning("outbox.temp_removed", folder=str(folder), files=sorted(removed),
                    note="left by an atomic write a stop interrupted")
    return removed


def record_dir_name(name: str, name_max: int = 255) -> str:
    """The folder name a job's record gets in failed/ or archive/: its name, cut (by UTF-8
    bytes, on a character boundary, with a short hash) where name-9999 would not fit."""
    room = name_max - len("-9999")
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


def _move_inputs(root: Path, entries: list[str], folder: str | None, dst: Path) -> list[str]:
    """Move a job's entries from root into dst; a job folder's contents go to dst itself.

    Repeatable: entries already moved by an attempt a stop interrupted are skipped.
    """
    moved: list[str] = []
    if folder is not None and entries == [folder]:
        src = root / folder
        if os.path.isdir(src) and not os.path.islink(src):
            for child in sorted(os.listdir(src)):
                move_entry(src / child, dst / child)
                moved.append(child)
            src.rmdir()
            return moved
    for entry in entries:
        if os.path.lexists(root / entry):
            move_entry(root / entry, dst / entry)
            moved.append(entry)
    return moved


def _file_away(spool: Spool, claim: Claim, root: Path, error: Mapping[str, Any] | None) -> Path | None:
    """The claim's inputs (and error.json) into root/NAME/ (NAME-1 ... when taken); the claim is dropped.

    The folder is built under `.inpaintd-tmp-<job id>` in root and renamed into place whole,
    so whoever reads failed/ or archive/ sees a record with all its inputs or nothing, two
    daemons never share a folder, and a kill anywhere leaves a staging folder that the next
    attempt (same job id) finishes. None when an earlier attempt had already renamed it into
    place before a stop (the claim's inputs are gone): only the drop was left.
    """
    staging = root / f"{TEMP_PREFIX}{claim.job_id}"
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
        _move_inputs(claim.inputs, claim.entries(), folder, staging)
        if error is not None:
            renamed = _set_aside(staging / "error.json", claim.job_id)
            record = {**error, "renamed_inputs": renamed} if renamed else dict(error)
            atomic_write_bytes(staging / "error.json", _encode(record))
        fsync_dir(staging)
        final = rename_distinct(staging, root, record_dir_name(claim.name))
        fsync_dir(root)
    spool.drop(claim)
    return final


def _lstat_mode(path: Path) -> int:
    try:
        return os.lstat(path).st_mode
    except FileNotFoundError:
        return 0


def _set_aside(path: Path, job_id: str) -> dict[str, str]:
    """An input that is itself named error.json is kept under another name, never overwritten."""
    if not os.path.lexists(path) or _job_id_in(path) == job_id:
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


def archive_inputs(spool: Spool, claim: Claim, archive: Path, after_success: str) -> Path | None:
    """After publication: inputs to archive/NAME/ (or deleted), then the claim is dropped."""
    try:
        if after_success == "delete":
            shutil.rmtree(claim.inputs, ignore_errors=False, onerror=_gone_is_fine)
            spool.drop(claim)
            return None
        return _file_away(spool, claim, archive, None)
    except OSError as exc:
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
        atomic_write_bytes(staging / "error.json", _encode(error_record(error, name, inputs=[], failed_at=timestamp(now))))
        final = failed / record_dir_name(name)
        try:
            rename_noreplace(staging, final)
        except FileExistsError:
            if _load_json(final / "error.json").get("code") == error.code:
                shutil.rmtree(staging)  # recorded already (another daemon on this inbox, or before a restart)
                return final
            final = rename_distinct(staging, failed, record_dir_name(name))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    fsync_dir(failed)
    return final


def fail_claim(spool: Spool, claim: Claim, error: JobError, failed: Path, now: float,
               extra: Mapping[str, Any] | None = None) -> Path | None:
    """Inputs and error.json to failed/NAME/ (distinct if taken); the claim is dropped.

    The error is recorded in the claim (state failing) before anything moves, so a stop
    anywhere is finished by the next attempt with the same record. None when a stop came
    after the record was in place (only the drop was left).
    """
    try:
        if claim.state != "failing" or "error" not in claim.record:
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
            spool.mark(claim, "failing", error=record)
        return _file_away(spool, claim, failed, claim.record["error"])
    except OSError as exc:
        trouble = transient(exc, failed, "failed")
        if trouble is not None:
            raise trouble from exc
        raise
