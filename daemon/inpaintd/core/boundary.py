"""Fault isolation: whatever one job's operation raises becomes that job's outcome.

The rule of the architecture: every per-file, per-group and per-job operation (probe, reject,
claim, paint, publish, archive, fail, recover) runs inside a boundary that hands any exception
to `classify`, which turns it into a `Verdict` for that job alone:

- ``fail``: the job goes to failed/ with a code (JobError; an OSError that only this job's
  name or input can cause; ``internal_error`` for anything unexpected, its traceback logged);
- ``hold``: the job stays claimed and is retried beside the queue with back-off (a full
  disk, a folder that is read-only, missing or erroring: nothing about the input);
- ``leave``: shutdown interrupted it; it stays claimed and runs again at the next start.

Nothing a job raises reaches the loops that serve the other jobs. Only KeyboardInterrupt is
let through (the service installs its own SIGINT handler, so it means a developer's ^C).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .errors import Code, Interrupted, JobError, StrEnum, TakenOver, TransientError
from .quoting import bounded, shorten

# Errors of our own folders that go away without anyone touching the input: wait and retry.
_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})
_TRANSIENT = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES, errno.EPERM, errno.ENOENT,
    errno.ENOTDIR, errno.EAGAIN, errno.EBUSY, errno.ENOMEM, errno.ETIMEDOUT, errno.ESTALE,
    errno.ENOTCONN, errno.EHOSTDOWN, errno.EHOSTUNREACH, errno.ECONNRESET, errno.ENXIO,
})
# Errors an input file itself causes (the same file fails the same way every time).
_INPUT_PERMANENT = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EIO})


class Action(StrEnum):
    """What becomes of a job whose operation raised."""

    FAIL = "fail"  # to failed/ with a code
    HOLD = "hold"  # stays claimed, retried beside the queue with back-off
    LEAVE = "leave"  # stays claimed untouched (shutdown, or another device has it)


@dataclass(frozen=True)
class Verdict:
    action: Action
    code: Code
    message: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    unexpected: bool = False  # log the traceback: this is a bug or an unforeseen condition

    def job_error(self) -> JobError:
        return JobError(self.code, self.message, dict(self.details))

    def transient_error(self) -> TransientError:
        return TransientError(self.code, self.message)


def classify(exc: BaseException, folders: Mapping[str, Path] | None = None, inputs: Path | None = None) -> Verdict:
    """The outcome for the job whose operation raised exc.

    folders: our own folders by name (outbox, failed, archive, state, inbox), to say which one a
    transient error is about; inputs: the job's claimed inputs, whose own errors are permanent.
    """
    if isinstance(exc, KeyboardInterrupt):
        raise exc
    if isinstance(exc, Interrupted):
        return Verdict(Action.LEAVE, Code.INTERRUPTED, shorten(str(exc)))
    if isinstance(exc, TakenOver):
        return Verdict(Action.LEAVE, Code.TAKEN_OVER, shorten(str(exc)))
    if isinstance(exc, JobError):
        return Verdict(Action.FAIL, exc.code, shorten(exc.message), bounded(exc.details))
    if isinstance(exc, TransientError):
        return Verdict(Action.HOLD, exc.code, shorten(exc.message))
    if isinstance(exc, OSError):
        return _os_verdict(exc, folders or {}, inputs)
    return Verdict(
        Action.FAIL, Code.INTERNAL_ERROR, shorten(f"{type(exc).__name__}: {exc}"), {"exception": type(exc).__name__},
        unexpected=True,
    )


def transient(exc: OSError, where: Path, what: str) -> TransientError | None:
    """A TransientError for an error of our folder `where` that retrying can cure; None otherwise."""
    if exc.errno in _FULL:
        return TransientError(Code.DISK_FULL, f"no space left to write the {what} in {where}")
    if exc.errno in _TRANSIENT:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return TransientError(f"{what}_unwritable", f"{what} folder {where} is not usable ({reason})")
    return None


def _os_verdict(exc: OSError, folders: Mapping[str, Path], inputs: Path | None) -> Verdict:
    paths = [Path(os.fsdecode(p)) for p in (exc.filename, exc.filename2) if isinstance(p, (str, bytes, os.PathLike))]
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENAMETOOLONG:
        return Verdict(Action.FAIL, Code.NAME_TOO_LONG, shorten(f"a name derived from this job is too long for the filesystem ({reason})"))
    if inputs is not None and any(_under(p, inputs) for p in paths) and exc.errno in _INPUT_PERMANENT:
        names = ", ".join(shorten(str(p.relative_to(inputs)), 200) for p in paths if _under(p, inputs))
        return Verdict(Action.FAIL, Code.INPUT_UNREADABLE, shorten(f"cannot read input {names}: {reason}"), {"errno": exc.errno})
    what = _which_folder(paths, folders)
    error = transient(exc, folders.get(what, paths[0].parent if paths else Path("?")), what)
    if error is not None:
        return Verdict(Action.HOLD, error.code, shorten(error.message))
    return Verdict(Action.FAIL, Code.INTERNAL_ERROR, shorten(f"{type(exc).__name__}: {exc}"), {"errno": exc.errno}, unexpected=True)


def _which_folder(paths: list[Path], folders: Mapping[str, Path]) -> str:
    best, best_len = "storage", -1
    for name, folder in folders.items():
        for path in paths:
            if _under(path, folder) and len(folder.parts) > best_len:
                best, best_len = name, len(folder.parts)
    return best


def _under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def retry_delay(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Back-off before retrying a job after its n-th transient failure in a row (intake and worker)."""
    return min(cap, base * 2 ** max(0, failures - 1))
