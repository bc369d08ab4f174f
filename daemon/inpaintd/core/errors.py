"""The kinds of failure inpaintd distinguishes, and every code a record or a log line can carry.

A ConfigError stops start-up (the operator must fix a file); a JobError fails one job
permanently (the input is bad and retrying cannot help); a TransientError leaves the job
claimed to be retried later (disk full, a folder unwritable); a ModelError means the model
folder cannot be used. Interrupted and TakenOver are not errors of the job but orders to stop
working on it; like KeyboardInterrupt they derive from BaseException, so no ``except
Exception`` on the way (a compile fallback, a retry loop) can swallow them.

`Code` is the one table of machine-readable codes, each with the sentence a person reads.
"""

from __future__ import annotations

from enum import Enum
from typing import Any


class StrEnum(str, Enum):
    """A str enum that formats as its value (``f"{Code.DISK_FULL}"`` is ``disk_full``), as JSON does."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class Code(StrEnum):
    """Every code inpaintd writes: failed/NAME/error.json, held jobs, status.json, the journal."""

    description: str

    def __new__(cls, value: str, description: str) -> "Code":
        member = str.__new__(cls, value)
        member._value_ = value
        member.description = description
        return member

    # A job's input is unusable: the job goes to failed/ (JobError).
    IMAGE_UNREADABLE = "image_unreadable", "the image file is corrupt, truncated, empty or not an image"
    IMAGE_UNSUPPORTED = "image_unsupported", "the image format or mode cannot be processed (e.g. animated)"
    IMAGE_TOO_LARGE = "image_too_large", "the image has more pixels than limits.max_pixels allows (decompression bomb guard)"
    INPUT_TOO_LARGE = "input_too_large", "an input file is larger than limits.max_input_bytes (refused before it is read)"
    INPUT_UNREADABLE = "input_unreadable", "an input file cannot be read (its permissions, or an I/O error reading it)"
    INPUT_UNMOVABLE = "input_unmovable", "an inbox entry inpaintd may not move (e.g. a read-only folder); it stays in the inbox"
    MASK_UNREADABLE = "mask_unreadable", "the mask file is corrupt, truncated, empty or not an image"
    MASK_MISSING = "mask_missing", "no mask file and the image has no alpha channel"
    MASK_SIZE_MISMATCH = "mask_size_mismatch", "the mask's size differs from the image's"
    MASK_EMPTY = "mask_empty", "the mask selects no pixel to repaint"
    PROMPT_INVALID = "prompt_invalid", "the prompt file is not UTF-8 text, too large, or not valid YAML/JSON"
    OPTIONS_INVALID = "options_invalid", "a per-job option has a wrong type, is out of range, or is unknown"
    JOB_INCOMPLETE = "job_incomplete", "a part of the job never arrived within watch.incomplete_timeout"
    JOB_AMBIGUOUS = "job_ambiguous", "one name has two images, masks or prompt files, or both a folder and loose files"
    NOT_A_JOB = "not_a_job", "an inbox entry no job can use (an unknown file type, an abandoned partial upload, client litter), left unchanged too long"
    JOB_UNSAFE = "job_unsafe", "an inbox entry is a symlink, hardlink, FIFO, device or escapes the inbox"
    NAME_TOO_LONG = "name_too_long", "the job's name would make an output, record or folder name longer than the filesystem allows"
    MASK_TOO_FRAGMENTED = "mask_too_fragmented", "the mask has more separate areas than limits.max_regions, even after merging nearby ones"
    JOB_TOO_COSTLY = "job_too_costly", "regions x steps exceed limits.max_region_steps, or the job ran past limits.max_job_seconds"
    RETRIES_EXHAUSTED = "retries_exhausted", "the job could not be finished for limits.hold_timeout seconds (disk full, folder unwritable); inputs kept"
    POISON_JOB = "poison_job", "the job crashed the daemon too many times"
    OUTPUT_NOT_FINITE = "output_not_finite", "the model produced NaN or infinite values (broken weights, or an overflow at this dtype); nothing was published"
    INTERNAL_ERROR = "internal_error", "an unexpected error inside inpaintd; see the log for the traceback"

    # Nothing is wrong with the input: the job is held and retried (TransientError).
    DISK_FULL = "disk_full", "no space left on the filesystem of one of inpaintd's folders; the job is retried"
    INBOX_UNWRITABLE = "inbox_unwritable", "the inbox is read-only, missing or failing; the job is retried"
    OUTBOX_UNWRITABLE = "outbox_unwritable", "the outbox is read-only, missing or failing; the job is retried"
    FAILED_UNWRITABLE = "failed_unwritable", "the failed folder is read-only, missing or failing; the job is retried"
    ARCHIVE_UNWRITABLE = "archive_unwritable", "the archive folder is read-only, missing or failing; the job is retried"
    STATE_UNWRITABLE = "state_unwritable", "the state folder is read-only, missing or failing; the job is retried"
    STORAGE_UNWRITABLE = "storage_unwritable", "a folder inpaintd writes is read-only, missing or failing; the job is retried"
    SHARE_UNREACHABLE = "share_unreachable", "fleet: this device cannot reach the shared folder; nothing is written until it can"
    OUTPUT_UNWRITABLE = "output_unwritable", "`inpaintd process`: the output file cannot be written (exit code 4)"

    # Not a failure: the job stays claimed (Interrupted, TakenOver).
    INTERRUPTED = "interrupted", "shutdown stopped the job; it stays claimed and runs again at the next start"
    TAKEN_OVER = "taken_over", "fleet: another device took the job over while this one was away; this one drops it"


_FIRST_TRANSIENT = list(Code).index(Code.DISK_FULL)
# The codes a failure record (failed/NAME/error.json) can carry, with their sentences.
JOB_ERROR_CODES: dict[str, str] = {code.value: code.description for code in list(Code)[:_FIRST_TRANSIENT]}
# The codes of a held job (status.json "last_error", the journal), retried until limits.hold_timeout.
TRANSIENT_CODES: dict[str, str] = {
    code.value: code.description for code in list(Code)[_FIRST_TRANSIENT:] if code not in (Code.INTERRUPTED, Code.TAKEN_OVER)
}


class InpaintdError(Exception):
    """Base of every error inpaintd raises on purpose."""


class ConfigError(InpaintdError):
    """A configuration value is missing, of the wrong type or out of bounds; names the key."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ModelError(InpaintdError):
    """The model folder cannot be loaded or is not an inpainting model inpaintd supports."""


class JobError(InpaintdError):
    """A job's input is unusable; the job goes to the failed folder with this code and sentence."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = Code(code)  # an unknown code is a bug, found where it is raised
        self.message = message
        self.details = details or {}


class TransientError(InpaintdError):
    """The job could not finish for a reason outside the input; keep it and retry later."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = Code(code)
        self.message = message


class Interrupted(BaseException):
    """Shutdown asked the running job to stop at the next denoising step."""


class TakenOver(BaseException):
    """Another device took this job over while this one was away (fleet): drop it, write nothing."""
