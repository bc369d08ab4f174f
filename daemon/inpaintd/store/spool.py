"""Claiming: a ready job leaves the inbox by atomic rename into state/claimed/<job-id>/.

A claim directory holds `job.json` (name, original entries, arrival, attempts, state),
`inputs/` with the job's entries under their original names and, on the way out, `out/` (the
painted result waiting for publication, outbox.py) and `record/` (the archive/ or failed/
record being built, records.py): everything that leaves for a shared folder leaves from the
claim, so a device whose claim was taken over (renamed away) can publish nothing. Renames never follow links
and never read a file: a crash or a second daemon can never process a job twice, and a
job found claimed at start-up is simply queued again. `begin_attempt` counts (fsynced)
every start of processing; a job still counted `limits.poison_after` times at the next
start crashed the daemon that often and is failed as a poison job.

A claim's `state`: claiming (entries still moving in), claimed, publishing (the result is staged
in `out/`; `publishing` records each step of the publication before it happens, see outbox.py), published
(only archiving is left), failing (only the move to failed/ is left). Every change is fsynced
before the step it announces, so a kill -9 anywhere leaves a state recovery can finish; the
in-memory record changes only once the file did (a full state disk leaves both as they were).

A job the intake rejects (incomplete, unsafe, ambiguous, too large) is claimed too, straight
into `failing` with its error: the rename decides which daemon records it, so two daemons on
one inbox never both record one job, and a kill mid-rejection is finished by recovery.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import re
import secrets
import shutil
import stat as stat_mod
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Protocol

import structlog

from ..core.errors import ConfigError, JobError, StrEnum
from ..core.jobs import name_problem
from ..core.quoting import quote, record_json
from .fsutil import atomic_write_bytes, fsync_dir, read_bounded, same_filesystem

log = structlog.get_logger("inpaintd.spool")

CLAIM_SCHEMA = "inpaintd.claim/1"
MAX_FOLDER_DEPTH = 16  # folders inside a job folder: deeper trees are refused (job_unsafe)
INPUTS = "inputs"


class ClaimState(StrEnum):
    """Where a claim is on its way (job.json "state"); each change is fsynced before its step."""

    CLAIMING = "claiming"  # entries still moving in from the inbox
    CLAIMED = "claimed"  # ready to paint
    PUBLISHING = "publishing"  # the outbox names it is about to write are recorded
    PUBLISHED = "published"  # only archiving is left
    FAILING = "failing"  # only the move to failed/ is left


class ClaimRequest(Protocol):
    """A ready job as the intake hands it over (intake.grouping.JobGroup)."""

    name: str
    entries: tuple[str, ...]
    folder: str | None
    image: str
    mask: str | None
    prompt: str | None


@dataclass
class Claim:
    """A job that left the inbox and is ours until published or failed."""

    dir: Path
    record: dict[str, Any] = field(default_factory=dict)
    # When this process first saw the job, by its monotonic clock; None for a claim another
    # process made (a restart, a take-over). Wall times step with NTP; this does not.
    seen: float | None = None

    @property
    def job_id(self) -> str:
        return str(self.record["job_id"])

    @property
    def name(self) -> str:
        return str(self.record["name"])

    @property
    def attempts(self) -> int:
        return int(self.record.get("attempts", 0))

    @property
    def arrived(self) -> float:
        return float(self.record["arrived"])

    @property
    def order(self) -> tuple[int, float]:
        """The key the queue orders by: claims from before this process (or another device's)
        first, by their recorded arrival; then this process's own, by when it first saw them.
        Not by wall time alone: a clock stepped back would put later jobs before earlier ones."""
        return (0, self.arrived) if self.seen is None else (1, self.seen)

    def queue_wait(self, started: float, started_seen: float) -> float:
        """Seconds from arrival to `started` (wall) / `started_seen` (monotonic); never negative,
        even when the arrival was stamped by another clock (another device, before a step)."""
        if self.seen is not None:
            return max(0.0, started_seen - self.seen)
        return max(0.0, started - self.arrived)

    @property
    def owner(self) -> int:
        """The uid that dropped the job (-1: unknown, a claim from before owners were recorded)."""
        return int(self.record.get("owner", -1))

    @property
    def state(self) -> ClaimState:
        return ClaimState(self.record.get("state", ClaimState.CLAIMED))

    @property
    def inputs(self) -> Path:
        return self.dir / INPUTS

    def input_path(self, role: str) -> Path | None:
        rel = self.record["files"].get(role)
        return None if rel is None else self.inputs / rel

    def entries(self) -> list[str]:
        return list(self.record["entries"])


def new_job_id(now: float | None = None) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(4)}"


class Spool:
    """state/claimed/: the jobs this daemon has taken out of the inbox."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.claimed = self.state_dir / "claimed"
        self._lock_fd: int | None = None
        # Claims this process is making right now (intake thread): recover_claiming (the fleet
        # keeper's thread) must not "finish" a claim whose renames are still under way.
        self._making: set[str] = set()
        self._making_lock = threading.Lock()

    def open(self, inbox: Path) -> None:
        """Create the spool, check it shares a filesystem with the inbox, and lock it."""
        self.claimed.mkdir(parents=True, exist_ok=True)
        if not same_filesystem(inbox, self.claimed):
            raise ConfigError(
                "paths.state",
                f"{self.state_dir} must be on the same filesystem as paths.inbox ({inbox}): "
                "claims are atomic renames",
            )
        fd = os.open(self.state_dir / "inpaintd.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                "paths.state", f"another inpaintd is already running with state directory {self.state_dir}"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:  # a full disk must not keep the daemon from starting (jobs are held)
            log.warning("spool.lock_pid_unwritten", error=str(exc))
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- taking jobs --------------------------------------------------------------------

    def claim(self, inbox: Path, group: ClaimRequest, arrived: float, now: float | None = None,
              seen: float | None = None) -> Claim | None:
        """Move a ready job's entries into a new claim; None if they vanished (another daemon).
        arrived: wall time of its first part; seen: the same moment on this process's monotonic clock."""
        files = {"image": group.image, "mask": group.mask, "prompt": group.prompt}
        claim = self._take(inbox, group.name, group.entries, group.folder, files, arrived, now, {})
        if claim is not None:
            claim.seen = seen
        return claim

    def claim_rejected(
        self, inbox: Path, name: str, entries: tuple[str, ...], folder: str | None, arrived: float,
        rejection: Mapping[str, Any], now: float | None = None,
    ) -> Claim | None:
        """Take a rejected job's entries as a claim already `failing`; rejection: its code, message, details."""
        return self._take(inbox, name, entries, folder, {}, arrived, now, {"state": ClaimState.FAILING, "rejection": dict(rejection)})

    def _take(
        self, inbox: Path, name: str, entries: tuple[str, ...], folder: str | None, files: Mapping[str, str | None],
        arrived: float, now: float | None, final: Mapping[str, Any],
    ) -> Claim | None:
        now = time.time() if now is None else now
        job_id = new_job_id(now)
        claim = Claim(
            self.claimed / job_id,
            {
                "schema": CLAIM_SCHEMA,
                "job_id": job_id,
                "name": name,
                "folder": folder,
                "entries": list(entries),
                "files": dict(files),
                "arrived": arrived,
                "claimed": now,
                "attempts": 0,
                "owner": _owner(inbox, folder or files.get("image") or (entries[0] if entries else name)),
                "state": ClaimState.CLAIMING,
                "then": dict(final),
            },
        )
        with self._making_lock:
            self._making.add(job_id)
        try:
            return self._move_in(claim, inbox, name, entries)
        finally:
            with self._making_lock:
                self._making.discard(job_id)

    def _move_in(self, claim: Claim, inbox: Path, name: str, entries: tuple[str, ...]) -> Claim | None:
        try:
            claim.inputs.mkdir(parents=True)
            self.save(claim)
        except BaseException:
            shutil.rmtree(claim.dir, ignore_errors=True)
            raise
        moved: list[str] = []
        for entry in entries:
            try:
                os.rename(inbox / entry, claim.inputs / entry)
            except OSError as exc:
                if _moved_after_all(inbox / entry, claim.inputs / entry):
                    # A network filesystem can report an error for a rename it did (the reply
                    # was lost and the retried request found nothing): the entry is ours.
                    moved.append(entry)
                    continue
                self._roll_back(claim, inbox, moved)
                if isinstance(exc, FileNotFoundError) and not os.path.lexists(inbox / entry):
                    log.warning("job.claim_lost", job=name, missing=entry, note="taken by someone else")
                    return None
                raise
            moved.append(entry)
        fsync_dir(claim.inputs)
        fsync_dir(inbox)
        self._finish_claiming(claim)
        return claim

    def _finish_claiming(self, claim: Claim) -> None:
        """claiming -> claimed (or what the claim was taken for: failing, for a rejection)."""
        record = {k: v for k, v in claim.record.items() if k != "then"}
        record.update({"state": ClaimState.CLAIMED, **claim.record.get("then", {})})
        self._save_record(claim, record)

    def _roll_back(self, claim: Claim, inbox: Path, moved: list[str]) -> None:
        for entry in moved:
            try:
                os.rename(claim.inputs / entry, inbox / entry)
            except OSError:
                log.exception("job.rollback_failed", job=claim.name, entry=entry)
                return  # keep the claim: recovery finishes it
        shutil.rmtree(claim.dir, ignore_errors=True)

    def recover(self, inbox: Path) -> list[Claim]:
        """Claims left by an earlier run, oldest arrival first; half-made claims are completed.

        One claim that cannot be read or completed is logged and left where it is (it is tried
        again at the next start); it never keeps the others, or the daemon, from starting.
        """
        claims: list[Claim] = []
        for path in sorted(self.claimed.iterdir()):
            if not path.is_dir() or path.name.startswith("."):
                continue
            claim = self.adopt(path, inbox)
            if claim is not None:
                claims.append(claim)
        claims.sort(key=lambda c: (c.arrived, c.job_id))
        return claims

    def adopt(self, path: Path, inbox: Path, only_claiming: bool = False) -> Claim | None:
        """The claim in `path` (ours: left by an earlier run, or taken over from a dead device),
        with a half-made one completed; None if it cannot be read or completed now (it stays,
        tried again later) or, with only_claiming, if it was complete already."""
        try:
            claim = self.load(path)
            if claim is None or (only_claiming and claim.state is not ClaimState.CLAIMING):
                return None
            if claim.state is ClaimState.CLAIMING:
                for entry in claim.entries():
                    if not os.path.lexists(claim.inputs / entry) and os.path.lexists(inbox / entry):
                        os.rename(inbox / entry, claim.inputs / entry)
                if not any(os.path.lexists(claim.inputs / entry) for entry in claim.entries()):
                    # Stopped before its first rename, and the files are gone (another device has
                    # them): there is nothing here to finish.
                    shutil.rmtree(claim.dir)
                    log.info("spool.empty_claim_removed", path=str(path))
                    return None
                self._finish_claiming(claim)
        except Exception:  # noqa: BLE001 - fault isolation: one claim, not the start-up
            log.exception("spool.recover_failed", path=str(path), note="left in place; tried again later")
            return None
        return claim

    def recover_claiming(self, inbox: Path) -> list[Claim]:
        """Claims whose claiming an error interrupted (a network share that went away mid-rename):
        completed now that the share answers again, for the queue."""
        try:
            paths = sorted(p for p in self.claimed.iterdir() if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return []
        # A claim listed here whose making is not under way now was left by an interrupted one:
        # its making registered before its folder existed and never starts again.
        with self._making_lock:
            paths = [p for p in paths if p.name not in self._making]
        return [c for c in (self.adopt(p, inbox, only_claiming=True) for p in paths) if c is not None]

    def load(self, path: Path) -> Claim | None:
        try:
            record = _read_claim(path)
        except FileNotFoundError:
            inputs = path / INPUTS
            if not inputs.exists() or not any(inputs.iterdir()):
                shutil.rmtree(path, ignore_errors=True)  # crashed before anything moved in
                return None
            log.error("spool.unreadable_claim", path=str(path), error="job.json missing")
            return None
        except (OSError, ValueError) as exc:
            log.error("spool.unreadable_claim", path=str(path), error=str(exc))
            return None
        return Claim(path, record)

    @staticmethod
    def claim_problem(path: Path) -> str | None:
        """Why the claim folder at `path` (another device's, before a take-over) cannot be
        trusted, or None; reads its job.json (bounded) and changes nothing."""
        try:
            _read_claim(path)
        except FileNotFoundError:
            return "job.json is missing"
        except (OSError, ValueError) as exc:
            return str(exc)
        return None

    def save(self, claim: Claim) -> None:
        self._save_record(claim, claim.record)

    def _save_record(self, claim: Claim, record: dict[str, Any]) -> None:
        """Write record as the claim's job.json, then (only then) make it the claim's record."""
        data = record_json(record).encode("utf-8")
        atomic_write_bytes(claim.dir / "job.json", data)
        claim.record = record

    # -- attempts -----------------------------------------------------------------------

    def begin_attempt(self, claim: Claim, poison_after: int) -> None:
        """Count a start of processing on disk before it happens; raise poison_job past the limit."""
        if claim.attempts >= poison_after:
            raise JobError(
                "poison_job",
                f"job {claim.name} was being processed when the daemon stopped unexpectedly "
                f"{claim.attempts} times; not trying again",
                {"attempts": claim.attempts, "poison_after": poison_after},
            )
        self._save_record(claim, {**claim.record, "attempts": claim.attempts + 1})

    def undo_attempt(self, claim: Claim) -> None:
        """The attempt ended cleanly (interrupted, or a transient error): it was no crash."""
        self._save_record(claim, {**claim.record, "attempts": max(0, claim.attempts - 1)})

    def mark(self, claim: Claim, state: ClaimState, **fields: Any) -> None:
        self._save_record(claim, {**claim.record, "state": state, **fields})

    def forget(self, claim: Claim, *keys: str) -> None:
        self._save_record(claim, {k: v for k, v in claim.record.items() if k not in keys})

    def drop(self, claim: Claim) -> None:
        shutil.rmtree(claim.dir, onerror=_gone_is_fine)
        fsync_dir(self.claimed)

    def oversized_inputs(self, claim: Claim, max_bytes: int) -> dict[str, int]:
        """Claimed files over max_bytes ({path: bytes}), from lstat: nothing is read.

        The intake refuses such jobs already; this catches a file that grew after the scan
        (a writer still holding it) and claims made before the limit was lowered.
        """
        sizes: dict[str, int] = {}
        for path, st, _depth in _walk(claim.inputs):
            if stat_mod.S_ISREG(st.st_mode) and st.st_size > max_bytes:
                sizes[str(path.relative_to(claim.inputs))] = st.st_size
        return sizes

    def unsafe_inputs(self, claim: Claim) -> dict[str, str]:
        """Entries that turned out to be links or special files once claimed (swapped after the scan)."""
        problems: dict[str, str] = {}
        paths = [claim.inputs / e for e in claim.entries()]
        paths += [p for p in (claim.input_path(r) for r in ("image", "mask", "prompt")) if p is not None]
        for path in dict.fromkeys(paths):
            rel = str(path.relative_to(claim.inputs))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                problems[rel] = "is missing"
                continue
            if stat_mod.S_ISDIR(st.st_mode) and rel == claim.record.get("folder"):
                deepest = max((depth for _p, _st, depth in _walk(path)), default=0)
                if deepest > MAX_FOLDER_DEPTH:
                    problems[rel] = f"nests folders more than {MAX_FOLDER_DEPTH} levels deep"
                continue
            if not stat_mod.S_ISREG(st.st_mode):
                problems[rel] = "is not a regular file"
            elif st.st_nlink > 1:
                problems[rel] = "is a hard link to another file"
        return problems


# A claim's job.json is a few hundred bytes; one read back from a shared state folder is as
# untrusted as the inbox (issue 22: a forged state/ghost/job.json named ../../pwned).
MAX_RECORD_BYTES = 1 << 20
_JOB_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")
_ROLES = ("image", "mask", "prompt")


def record_problem(record: Any, folder_name: str) -> str | None:
    """Why a claim record read back from disk cannot be trusted, or None.

    Everything that becomes a path (the name, each entry, each role's file) must be a plain
    name inside the claim, as the intake would have accepted it; the job id must be the
    claim folder's own name; the state and the counters must be what the spool writes.
    """
    if not isinstance(record, dict):
        return "job.json is not a JSON object"
    if record.get("schema") != CLAIM_SCHEMA:
        return f"unknown schema {quote(record.get('schema'))}"
    job_id = record.get("job_id")
    if not isinstance(job_id, str) or not _JOB_ID.fullmatch(job_id) or job_id != folder_name:
        return f"job_id {quote(job_id)} is not this claim folder's id"
    name = record.get("name")
    if not isinstance(name, str) or name_problem(name):
        return f"name {quote(name)}: {name_problem(name) if isinstance(name, str) else 'not a string'}"
    entries = record.get("entries")
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) and not name_problem(e) for e in entries):
        return "entries are not plain inbox names"
    folder = record.get("folder")
    if folder is not None and folder not in entries:
        return "folder is not one of the entries"
    files = record.get("files")
    if not isinstance(files, dict) or set(files) - set(_ROLES):
        return "files is not a mapping of image, mask, prompt"
    for role, rel in files.items():
        if rel is None:
            continue
        parts = rel.split("/") if isinstance(rel, str) else []
        if not 1 <= len(parts) <= 2 or any(name_problem(part) for part in parts) or parts[0] not in entries:
            return f"{role} {quote(rel)} is not a file among the entries"
    try:
        ClaimState(record.get("state", ClaimState.CLAIMED))
    except ValueError:
        return f"unknown state {quote(record.get('state'))}"
    for key in ("arrived", "claimed"):
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            return f"{key} is not a time"
    attempts = record.get("attempts", 0)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 0:
        return "attempts is not a count"
    owner = record.get("owner")
    if owner is not None and (not isinstance(owner, int) or isinstance(owner, bool) or owner < -1):  # -1: unknown
        return "owner is not a uid"
    return None


def _read_claim(path: Path) -> dict[str, Any]:
    """A claim folder's validated record. The folder and its inputs/ must be real folders, not
    links: every path of the job is built under them (a forged inputs/ linked to a folder
    outside the share would make its names, valid as they are, read files there)."""
    for folder in (path, path / INPUTS):
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            if folder == path:
                raise
            continue  # a claim whose inputs/ was never made (a crash before it) has no paths yet
        if not stat_mod.S_ISDIR(mode):
            raise ValueError(f"{folder.name} is not a folder (a link or a file)")
    try:
        record = json.loads(read_bounded(path / "job.json", MAX_RECORD_BYTES).decode("utf-8"))
    except RecursionError:
        raise ValueError("job.json nests too deep") from None
    problem = record_problem(record, path.name)
    if problem:
        raise ValueError(problem)
    return record


def _owner(inbox: Path, entry: str) -> int:
    """Who dropped a job: the owner of its folder, else of its image (fair turns, queues.py)."""
    try:
        return os.lstat(inbox / entry).st_uid
    except OSError:
        return -1


def _walk(root: Path):  # type: ignore[no-untyped-def]
    """(path, lstat, depth) of everything under root, without recursion (a folder nested a
    thousand deep must not exhaust Python's stack) and without following links."""
    stack = [(root, 1)]
    while stack:
        folder, depth = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            yield Path(entry.path), st, depth
            if stat_mod.S_ISDIR(st.st_mode):
                stack.append((Path(entry.path), depth + 1))


def _gone_is_fine(function: Any, path: str, exc_info: Any) -> None:
    """rmtree's error hook: a path already removed (a stop came mid-drop) is what we wanted."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _moved_after_all(src: Path, dst: Path) -> bool:
    try:
        return os.path.lexists(dst) and not os.path.lexists(src)
    except OSError:
        return False
