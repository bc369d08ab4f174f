"""The few kinds of failure inpaintd distinguishes.

A ConfigError stops start-up (the operator must fix a file); a JobError fails one job
permanently (the input is bad and retrying cannot help); a TransientError leaves the job
claimed to be retried later (disk full, outbox missing); ModelError means the model folder
cannot be used; Interrupted unwinds a job that shutdown asked to stop.
"""

from __future__ import annotations

from typing import Any


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
        self.code = code
        self.message = message
        self.details = details or {}


class TransientError(InpaintdError):
    """The job could not finish for a reason outside the input; keep it and retry later."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Interrupted(InpaintdError):
    """Shutdown asked the running job to stop at the next denoising step."""


class TakenOver(InpaintdError):
    """Another device took this job over while this one was away (fleet): drop it, write nothing."""


# Machine-readable codes written to failure sidecars. One place, so docs and tests agree.
JOB_ERROR_CODES: dict[str, str] = {
    "image_unreadable": "the image file is corrupt, truncated, empty or not an image",
    "image_unsupported": "the image format or mode cannot be processed (e.g. animated)",
    "image_too_large": "the image has more pixels than limits.max_pixels allows (decompression bomb guard)",
    "input_too_large": "an input file is larger than limits.max_input_bytes (refused before it is read)",
    "input_unreadable": "an input file cannot be read (its permissions, or an I/O error reading it)",
    "input_unmovable": "an inbox entry inpaintd may not move (e.g. a read-only folder); it stays in the inbox",
    "mask_unreadable": "the mask file is corrupt, truncated, empty or not an image",
    "mask_missing": "no mask file and the image has no alpha channel",
    "mask_size_mismatch": "the mask's size differs from the image's",
    "mask_empty": "the mask selects no pixel to repaint",
    "prompt_invalid": "the prompt file is not UTF-8 text, too large, or not valid YAML/JSON",
    "options_invalid": "a per-job option has a wrong type, is out of range, or is unknown",
    "job_incomplete": "a part of the job never arrived within watch.incomplete_timeout",
    "job_ambiguous": "one name has two images, masks or prompt files, or both a folder and loose files",
    "job_unsafe": "an inbox entry is a symlink, hardlink, FIFO, device or escapes the inbox",
    "name_too_long": "the job's name would make an output, record or folder name longer than the filesystem allows",
    "mask_too_fragmented": "the mask has more separate areas than limits.max_regions, even after merging nearby ones",
    "job_too_costly": "regions x steps exceed limits.max_region_steps, or the job ran past limits.max_job_seconds",
    "retries_exhausted": "the job could not be finished for limits.hold_timeout seconds (disk full, folder unwritable); inputs kept",
    "poison_job": "the job crashed the daemon too many times",
    "internal_error": "an unexpected error inside inpaintd; see the log for the traceback",
}
