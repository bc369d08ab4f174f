"""Publication: the image first, the sidecar last, each atomic, nothing ever overwritten.

A consumer that waits for `NAME.json` in the outbox never sees a partial image. When
`NAME.<ext>` or `NAME.json` exists already, the result goes to `NAME-1.<ext>`/`NAME-1.json`
(and so on) and the sidecar says so. A full disk or a missing or unwritable outbox raises
TransientError: the job stays claimed, and no input is touched. What happens to the inputs
afterwards (archive/, failed/) is records.py.

A kill -9 can land anywhere in publication, so the names a job is about to take are recorded in
its claim (fsynced) before the image is written. At the next start `settle_publication` uses
that record: a sidecar carrying the claim's job id means the job is published (archive it, do
not paint it again); an image without its sidecar is removed (a consumer waits for NAME.json,
so an orphan image must never stay); and `remove_temp_files` clears the `.inpaintd-tmp-*` files
a kill left in the middle of an atomic write.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import stat as stat_mod
from pathlib import Path
from typing import Any, Callable, Mapping

import structlog

from ..core.boundary import transient
from ..core.digest import sha256_file
from ..core.errors import TransientError
from ..core.jobs import JobResult, distinct_names
from ..core.quoting import record_json
from .fsutil import TEMP_PREFIX, atomic_write_bytes, fsync_dir

log = structlog.get_logger("inpaintd.outbox")


def host() -> str:
    return socket.gethostname()


def encode_record(data: Mapping[str, Any]) -> bytes:
    """A record's bytes (sidecar, error.json): exact values, no hidden character raw (record_json)."""
    return (record_json(data) + "\n").encode("utf-8")


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
    for stem in distinct_names(result.name, str(extra.get("job_id") or secrets.token_hex(4))):
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
        if stem != result.name:
            sidecar["renamed_from"] = f"{result.name}.{result.extension}"
        if record is not None:
            # Outside the outbox's error mapping: this writes the claim in the state folder.
            record({"image": image.name, "sidecar": sidecar_path.name, "sha256": digest})
        try:
            if _write_pair(image, result.image_bytes, sidecar_path, encode_record(sidecar)):
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
        return job_id_in(sidecar) == job_id
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return False
    if stat_mod.S_ISREG(st.st_mode) and sha256_file(image).sha256 == names.get("sha256"):
        image.unlink()
        fsync_dir(outbox)
        log.warning("outbox.orphan_removed", file=image.name, job_id=job_id,
                    note="image published without its sidecar before a stop; the job runs again")
    return False


def read_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def job_id_in(path: Path) -> str | None:
    try:
        data = json.loads(path.read_bytes().decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    return str(data.get("job_id")) if isinstance(data, dict) else None


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


