"""Publication: the image first, the sidecar last, each atomic, nothing ever overwritten.

A consumer that waits for `NAME.json` in the outbox never sees a partial image. When
`NAME.<ext>` or `NAME.json` exists already, the result goes to `NAME-1.<ext>`/`NAME-1.json`
(and so on) and the sidecar says so. After success the inputs go to `archive/NAME/` (or
are deleted); after a failure the inputs and `error.json` go to `failed/NAME/`. A full disk
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
import json
import os
import shutil
import socket
import stat as stat_mod
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from . import __version__
from .errors import JobError, TransientError
from .fsutil import TEMP_PREFIX, atomic_write_bytes, fsync_dir
from .jobs import JobResult
from .spool import Claim, Spool, distinct_dir, move_entry

log = structlog.get_logger("inpaintd.outbox")

ERROR_SCHEMA = "inpaintd.error/1"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_UNWRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EIO)


def timestamp(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="milliseconds")


def host() -> str:
    return socket.gethostname()


def transient(exc: OSError, where: Path, what: str) -> TransientError | None:
    """A TransientError for a full disk or an unwritable folder; None for other errors."""
    if exc.errno in _FULL:
        return TransientError("disk_full", f"no space left to write the {what} in {where}")
    if exc.errno in _UNWRITABLE:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return TransientError(f"{what}_unwritable", f"{what} folder {where} is not writable ({reason})")
    return None


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


def remove_temp_files(folder: Path) -> list[str]:
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
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                continue
    if removed:
        fsync_dir(folder)
        log.warning("outbox.temp_removed", folder=str(folder), files=sorted(removed),
                    note="left by an atomic write a stop interrupted")
    return removed


def _move_inputs(root: Path, entries: list[str], folder: str | None, dst: Path) -> list[str]:
    """Move a job's entries from root into dst; a job folder's contents go to dst itself."""
    moved: list[str] = []
    if folder is not None and entries == [folder]:
        src = root / folder
        if src.is_dir() and not src.is_symlink():
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


def archive_inputs(spool: Spool, claim: Claim, archive: Path, after_success: str) -> Path | None:
    """After publication: inputs to archive/NAME/ (or deleted), then the claim is dropped."""
    target: Path | None = None
    try:
        if after_success == "delete":
            shutil.rmtree(claim.inputs)
        else:
            target = Path(claim.record.get("archive_dir") or distinct_dir(archive, claim.name))
            if "archive_dir" not in claim.record:
                spool.mark(claim, claim.state, archive_dir=str(target))
            target.mkdir(exist_ok=True)
            _move_inputs(claim.inputs, claim.entries(), claim.record.get("folder"), target)
            fsync_dir(target)
    except OSError as exc:
        error = transient(exc, archive, "archive")
        if error is not None:
            raise error from exc
        raise
    spool.drop(claim)
    return target


def error_record(error: JobError, name: str, **fields: Any) -> dict[str, Any]:
    return {
        "schema": ERROR_SCHEMA,
        "status": "failed",
        "code": error.code,
        "message": error.message,
        "details": dict(error.details),
        "job": name,
        **fields,
        "host": host(),
        "daemon_version": __version__,
    }


def _write_error(dst: Path, record: Mapping[str, Any]) -> Path:
    for index in range(1000):
        path = dst / ("error.json" if index == 0 else f"error-{index}.json")
        if record.get("job_id") and _job_id_in(path) == record["job_id"]:
            return path  # written before a stop: this job's failure is recorded already
        try:
            atomic_write_bytes(path, _encode(record), overwrite=False)
            return path
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"no free name for error.json in {dst}")


def fail_claim(spool: Spool, claim: Claim, error: JobError, failed: Path, now: float) -> Path:
    """Inputs and error.json to failed/NAME/ (distinct if taken); the claim is dropped."""
    try:
        if claim.state != "failing":
            target = distinct_dir(failed, claim.name)
            record = error_record(
                error,
                claim.name,
                job_id=claim.job_id,
                attempts=claim.attempts,
                inputs=claim.entries(),
                arrived=timestamp(claim.arrived),
                failed_at=timestamp(now),
            )
            spool.mark(claim, "failing", failed_dir=str(target), error=record)
        target = Path(claim.record["failed_dir"])
        target.mkdir(exist_ok=True)
        remove_temp_files(target)  # an error.json write a stop interrupted
        _move_inputs(claim.inputs, claim.entries(), claim.record.get("folder"), target)
        path = _write_error(target, claim.record["error"])
    except OSError as exc:
        trouble = transient(exc, failed, "failed")
        if trouble is not None:
            raise trouble from exc
        raise
    spool.drop(claim)
    return path


def fail_entries(
    inbox: Path, name: str, entries: list[str], folder: str | None, error: JobError, failed: Path, now: float
) -> Path:
    """A job rejected before claiming (incomplete, unsafe, ambiguous): its entries move as they are."""
    try:
        target = distinct_dir(failed, name)
        moved = _move_inputs(inbox, entries, folder, target)
        fsync_dir(inbox)
        record = error_record(error, name, inputs=moved, failed_at=timestamp(now))
        return _write_error(target, record)
    except OSError as exc:
        trouble = transient(exc, failed, "failed")
        if trouble is not None:
            raise trouble from exc
        raise
