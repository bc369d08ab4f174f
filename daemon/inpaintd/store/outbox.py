"""Publication: the image first, the sidecar last, nothing ever overwritten, fenced by the claim.

A consumer that waits for `NAME.json` in the outbox never sees a partial image. When
`NAME.<ext>` or `NAME.json` exists already, the result goes to `NAME-1.<ext>`/`NAME-1.json`
(and so on) and the sidecar says so. A full disk or a missing or unwritable outbox raises
TransientError: the job stays claimed, and no input is touched. What happens to the inputs
afterwards (archive/, failed/) is records.py.

**Fencing.** With several devices on one share a device can lose its claim at any moment
(frozen past its lease, cut off): another device then renames the claim folder into its own
(store/fleet.py). Nothing a device does to the shared outbox may depend on a check it made
earlier, so every step that changes the outbox starts *from inside the claim folder*, by the
claim's path: once a take-over renamed the folder away, the old owner's next step fails with
ENOENT (raised as TakenOver) and changes nothing. The steps:

  S1 stage      the result is written into the claim: `out/image`, `out/sidecar-base.json`
                (fsynced); then the claim is marked publishing with the image's sha256.
  S2 names      the first stem whose NAME.<ext> and NAME.json are both free is chosen;
                `out/sidecar.json` is written for those names, then the names are recorded
                in the claim (`publishing`).
  S3 image      link(2) `out/image` -> outbox/NAME.<ext>. link is no-replace on every server
                (sshfs too, where renameat2 NOREPLACE is not), and its source path is in the
                claim, so only the claim's holder can make it. Taken -> next stem (S2).
  S4 linked     the claim records that the image is out.
  S5 sidecar    link `out/sidecar.json` -> outbox/NAME.json: the commit point. Taken by this
                job already -> published; by another job -> the image is taken back (below)
                and the next stem is tried.
  S6 published  the claim is marked published; archiving (records.py) is fenced the same way:
                the record folder is built inside the claim and renamed out whole.

**Removal only of our own bytes.** Nothing in the outbox is removed by name. Taking an image
back (S5 lost its name to another job) renames it *into our claim* (fenced like S3), and
checks there that it holds our sha256; a file that turns out not to be ours is linked back
under its name. Temp files carry the device id (fsutil.set_writer).

**Every interleaving ends with one complete result.** A take-over can land between any two
steps; the new owner resumes from what the claim records (`publishing`), which is always
written before the step it announces, and the staged files travel with the folder:

- before S3: the image is not out; the new owner links it (or picks the next stem); the old
  owner's S3 fails (its source is gone).
- between S3 and S4: the image is out, unrecorded. The new owner asks whether
  outbox/NAME.<ext> is the staged file itself (fsutil.OsFs.same_file: inode, or an mtime
  probe through the hard link) and, if so, goes on with S5; if it cannot tell (a client
  caching attributes), it leaves that file alone and publishes under the next stem: at worst
  an image without a sidecar stays, never a sidecar without its image, never two results.
- between S4 and S5, or after S5: the new owner links the sidecar (or finds it there, with
  this job id: published). The old owner's S5 fails (its source is gone).
- two jobs of one name: S3 and S5 are no-replace, so each name has one image and one
  sidecar; a job whose sidecar lost to another job takes only its own image back.

A kill -9 is a take-over by the same device at its next start (spool.recover). Claims left
by an older version without a stage (`publishing` without `staged`) are settled as before:
published if the sidecar carries the job id, else the image is taken back if ours, and the
job is painted again (`settle_publication`).

`remove_temp_files` clears the `.inpaintd-tmp-*` files a kill left in the middle of an atomic
write (only this device's, on a shared outbox).
"""

from __future__ import annotations

import errno
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
from ..core.errors import TakenOver, TransientError
from ..core.jobs import NUMBERED_NAMES, JobResult, job_token
from ..core.quoting import record_json
from . import pausepoints
from .fsutil import TEMP_PREFIX, OsFs, fsync_dir, own_temp_prefix
from .pausepoints import PausePoint

log = structlog.get_logger("inpaintd.outbox")


def host() -> str:
    return socket.gethostname()


def encode_record(data: Mapping[str, Any]) -> bytes:
    """A record's bytes (sidecar, error.json): exact values, no hidden character raw (record_json)."""
    return (record_json(data) + "\n").encode("utf-8")


STAGE = "out"  # the claim's subfolder where a result waits for publication
STAGED_IMAGE = "image"
STAGED_BASE = "sidecar-base.json"
STAGED_SIDECAR = "sidecar.json"
MAX_STEMS = NUMBERED_NAMES + 1  # NAME, NAME-1 ... NAME-9999, then NAME-<job token> (core.jobs.distinct_names)

OS_FS = OsFs()
Record = Callable[[dict[str, Any]], None]


def stage(claim_dir: Path, result: JobResult, extra: Mapping[str, Any], fs: Any = OS_FS) -> dict[str, Any]:
    """S1: the painted result into the claim (fenced); what the claim records of it."""
    out = claim_dir / STAGE
    base = {**result.sidecar, **extra, "status": "done"}
    _fenced(fs, claim_dir, fs.mkdir, out)
    _fenced(fs, claim_dir, fs.write, out / STAGED_IMAGE, result.image_bytes)
    _fenced(fs, claim_dir, fs.write, out / STAGED_BASE, encode_record(base))
    return {"staged": True, "name": result.name, "extension": result.extension,
            "sha256": hashlib.sha256(result.image_bytes).hexdigest(), "job_id": str(extra.get("job_id", ""))}


def is_staged(progress: Mapping[str, Any] | None) -> bool:
    return bool(progress) and bool(progress.get("staged"))  # type: ignore[union-attr]


def stem_names(name: str, extension: str, index: int, job_id: str = "") -> tuple[str, str]:
    """The index-th distinct output names of a job (core.jobs.distinct_names: they never run out)."""
    if index == 0:
        stem = name
    elif index < NUMBERED_NAMES:
        stem = f"{name}-{index}"
    else:
        stem = f"{name}-{job_token(job_id)}"
    return f"{stem}.{extension}", f"{stem}.json"


def sidecar_for(base: Mapping[str, Any], name: str, extension: str, index: int) -> dict[str, Any]:
    image, sidecar = stem_names(name, extension, index, str(base.get("job_id", "")))
    data = {**base, "output_file": image, "sidecar_file": sidecar}
    if index:
        data["renamed_from"] = f"{name}.{extension}"
    return data


def publish_staged(
    outbox: Path, claim_dir: Path, progress: Mapping[str, Any], record: Record, *, shared: bool = True,
    fs: Any = OS_FS,
) -> tuple[str, str]:
    """S2-S5 from what the claim records (`progress`, from `stage`, perhaps half done by a
    stopped or taken-over owner); the (image, sidecar) names published.

    `record(progress)` makes the new progress durable in the claim before the step it
    announces; it must fail (FileNotFoundError) once the claim is gone. shared: other devices
    write this outbox (identity of an image by the file itself, never by its bytes).
    Raises TakenOver when the claim folder was taken away, TransientError for outbox trouble.
    """
    if not fs.lexists(outbox):
        raise TransientError("outbox_unwritable", f"outbox folder {outbox} is missing")
    try:
        return _publish_staged(outbox, claim_dir, dict(progress), record, shared, fs)
    except OSError as exc:
        error = transient(exc, outbox, "outbox")
        if error is not None:
            raise error from exc
        raise


def _publish_staged(outbox: Path, claim_dir: Path, progress: dict[str, Any], record: Record, shared: bool,
                    fs: Any) -> tuple[str, str]:
    out = claim_dir / STAGE
    name, extension, digest, job_id = progress["name"], progress["extension"], progress["sha256"], progress["job_id"]
    base = json.loads(_fenced(fs, claim_dir, fs.read, out / STAGED_BASE).decode("utf-8", "surrogateescape"))
    resume = "index" in progress  # names were recorded: a stopped or taken-over publication goes on
    index = int(progress.get("index", 0))
    while index < MAX_STEMS:
        image_name, sidecar_name = stem_names(name, extension, index, job_id)
        image, sidecar = outbox / image_name, outbox / sidecar_name
        if resume and fs.lexists(sidecar) and _job_id(fs, sidecar) == job_id:
            return image_name, sidecar_name  # S5 was done before the stop
        if not resume and (fs.lexists(image) or fs.lexists(sidecar)):
            index += 1
            continue
        _fenced(fs, claim_dir, fs.write, out / STAGED_SIDECAR, encode_record(sidecar_for(base, name, extension, index)))
        if not resume:
            progress = {**progress, "image": image_name, "sidecar": sidecar_name, "index": index, "linked": False}
            _fenced(fs, claim_dir, record, progress)
        if not progress.get("linked"):
            if not _link_image(fs, claim_dir, out / STAGED_IMAGE, image, digest, resume, shared):
                index, resume = index + 1, False
                continue
            progress = {**progress, "linked": True}
            _fenced(fs, claim_dir, record, progress)
        pausepoints.reached(PausePoint.BETWEEN_IMAGE_AND_SIDECAR)
        try:
            _fenced(fs, claim_dir, _put, fs, out / STAGED_SIDECAR, sidecar, shared)
        except FileExistsError:
            if _job_id(fs, sidecar) == job_id:
                return image_name, sidecar_name
            _take_back(fs, claim_dir, image, digest, sidecar)
            index, resume = index + 1, False
            continue
        return image_name, sidecar_name
    raise TransientError("outbox_unwritable", f"no free output name for {name} in {outbox}")


def _link_image(fs: Any, claim_dir: Path, staged: Path, image: Path, digest: str, resume: bool, shared: bool) -> bool:
    """S3; False when the name is another's (go to the next stem)."""
    try:
        _fenced(fs, claim_dir, _put, fs, staged, image, shared)
        return True
    except FileExistsError:
        if not resume:
            return False
    # Resuming, and the name is taken: by our own image (linked before a stop, not yet
    # recorded) or by another job's. Only the file itself can say; its bytes cannot (two
    # jobs can paint identical bytes).
    try:
        if shared:
            return bool(_fenced(fs, claim_dir, fs.same_file, staged, image))
        return _sha(fs, image) == digest  # one device: nobody else writes here
    except FileNotFoundError:
        if not fs.lexists(claim_dir):
            raise TakenOver("the claim was taken over during publication") from None
        return False


def _put(fs: Any, src: Path, dst: Path, shared: bool) -> None:
    try:
        fs.link(src, dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV or shared:
            raise
        fs.copy_in(src, dst)  # outbox on another filesystem than the state (one device only)


def _take_back(fs: Any, claim_dir: Path, image: Path, digest: str, blocking_sidecar: Path) -> None:
    """Our image whose sidecar name another job took: renamed into our claim (fenced), kept
    there only if it holds our bytes, else linked back under its name."""
    if _referenced_by(fs, blocking_sidecar) == image.name:
        return  # that job's sidecar names this file: it is its result now, never removed
    try:
        if _sha(fs, image) != digest:
            return
    except FileNotFoundError:
        return
    back = claim_dir / STAGE / f"taken-back-{secrets.token_hex(4)}"
    try:
        _fenced(fs, claim_dir, fs.rename, image, back)
    except FileNotFoundError:
        if not fs.lexists(claim_dir):
            raise TakenOver("the claim was taken over during publication") from None
        return  # gone already
    if _sha(fs, back) != digest:
        try:
            fs.link(back, image)  # not ours after all: where it was
        except FileExistsError:
            log.error("outbox.foreign_image_kept", file=image.name, kept=str(back),
                      note="a file not this job's was taken back and its name is taken again; it is kept in the claim")
            return
    log.warning("outbox.image_taken_back", file=image.name,
                note="its sidecar name was taken by another job; published under the next free name")


def _fenced(fs: Any, claim_dir: Path, op: Callable[..., Any], *args: Any) -> Any:
    """op(*args); its ENOENT is TakenOver when the claim folder is gone (renamed by a take-over)."""
    try:
        return op(*args)
    except FileNotFoundError:
        if not fs.lexists(claim_dir):
            raise TakenOver("the claim was taken over by another device during publication") from None
        raise


def _sha(fs: Any, path: Path) -> str:
    return hashlib.sha256(fs.read(path)).hexdigest()


def _job_id(fs: Any, path: Path) -> str | None:
    return _field(fs, path, "job_id")


def _referenced_by(fs: Any, sidecar: Path) -> str | None:
    return _field(fs, sidecar, "output_file")


def _field(fs: Any, path: Path, key: str) -> str | None:
    try:
        data = json.loads(fs.read(path).decode("utf-8", "surrogateescape"))
    except (OSError, ValueError):
        return None
    return str(data.get(key)) if isinstance(data, dict) and key in data else None


def publish(
    outbox: Path,
    result: JobResult,
    extra: Mapping[str, Any],
    record: Callable[[dict[str, Any]], None] | None = None,
    claim_dir: Path | None = None,
    shared: bool = False,
) -> tuple[Path, Path]:
    """Stage the result in claim_dir and publish it (S1-S5); returns the outbox paths.

    Without a claim_dir (one-off use, tests) the stage is a private temp folder in the outbox,
    removed afterwards. `record` gets the progress to make durable in the claim (publishing).
    """
    if not outbox.is_dir():
        raise TransientError("outbox_unwritable", f"outbox folder {outbox} is missing")
    own_stage = claim_dir is None
    folder = claim_dir if claim_dir is not None else outbox / f"{own_temp_prefix()}stage-{secrets.token_hex(4)}"
    if own_stage:
        folder.mkdir()
    try:
        try:
            progress = stage(folder, result, extra)
        except OSError as exc:
            error = transient(exc, folder, "state" if not own_stage else "outbox")
            if error is not None:
                raise error from exc
            raise
        last = progress

        def keep(step: dict[str, Any]) -> None:
            nonlocal last
            if record is not None:
                record(step)
            last = step

        keep(progress)
        try:
            image, sidecar = publish_staged(outbox, folder, progress, keep, shared=shared)
        except Exception:
            if own_stage and last.get("linked"):
                # Nobody resumes a private stage: no image may stay without its sidecar.
                _take_back(OS_FS, folder, outbox / last["image"], last["sha256"], outbox / last["sidecar"])
            raise
    finally:
        if own_stage:
            shutil.rmtree(folder, ignore_errors=True)
    return outbox / image, outbox / sidecar


def settle_publication(outbox: Path, job_id: str, names: Mapping[str, str], claim_dir: Path | None = None,
                       shared: bool = False) -> bool:
    """A publication an older version left half done (names recorded, nothing staged).

    True when the sidecar is out and is this job's (the job is published: archive it, never
    paint it again). Otherwise False (paint again), after taking back the image if it is out
    without its sidecar and holds exactly the bytes this job was writing. On a shared outbox
    it is taken back into the claim (fenced: never once the claim was taken over); on one
    device's own outbox it is removed. Raises OSError when the outbox cannot be looked at.
    """
    image = outbox / names["image"]
    sidecar = outbox / names["sidecar"]
    if os.path.lexists(sidecar):
        return job_id_in(sidecar) == job_id
    try:
        st = os.lstat(image)
    except FileNotFoundError:
        return False
    if not (stat_mod.S_ISREG(st.st_mode) and sha256_file(image).sha256 == names.get("sha256")):
        return False
    if shared and claim_dir is not None:
        OS_FS.mkdir(claim_dir / STAGE)
        _take_back(OS_FS, claim_dir, image, str(names.get("sha256")), sidecar)
    else:
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


