"""The plain data that flows through inpaintd: what a job asks for and what it produced.

Nothing here touches files, clocks or torch; these are values passed between the layers
(service -> paint -> the painter -> store). `Painter` is what paint/ needs of the engine:
paint one working-size crop and say how it ran; paint/ never imports the engine, it is
handed one (tests hand it a fake).
"""

from __future__ import annotations

import datetime as _dt
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol


@dataclass(frozen=True)
class InpaintParams:
    """Fully resolved generation parameters for one job (defaults merged with overrides)."""

    prompt: str
    negative_prompt: str
    scheduler: str
    steps: int
    guidance: float
    strength: float
    seed: int  # always concrete here: a random one is drawn before the job starts
    cfg_cutoff: float = 1.0  # fraction of the steps run with classifier-free guidance (1.0: all)
    step_cache: int = 1  # DeepCache interval (1: every step in full)
    decoder: str = "full"  # full | draft (the model's AutoencoderTiny)


@dataclass(frozen=True)
class JobRequest:
    """Everything paint.job.run_job needs: where the inputs are and how to paint them."""

    name: str
    image: Path
    mask: Path | None
    params: InpaintParams
    output_format: str = "same"  # same | png | jpg | webp
    roi_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"padding": 64}
    sources: dict[str, str] = field(default_factory=dict)  # parameter -> job | config | model | builtin


@dataclass(frozen=True)
class RegionReport:
    """One processed region as the sidecar reports it."""

    mask_box: tuple[int, int, int, int]  # x0, y0, x1, y1 of the dilated mask component(s)
    crop_box: tuple[int, int, int, int]  # the context crop taken from the image
    work_size: tuple[int, int]  # width, height the model ran at
    seconds: float


@dataclass
class JobResult:
    """A finished job before publication: encoded image bytes and the sidecar content."""

    name: str
    image_bytes: bytes
    extension: str  # without the dot, e.g. "png"
    sidecar: dict[str, Any]
    regions: list[RegionReport] = field(default_factory=list)
    debug_overlay: bytes | None = None  # PNG with region boxes and mask outline (CLI --debug-overlay)


StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class Painted:
    """One painted working-size crop and how the painter ran it (the sidecar's "runtime" keys
    that vary per call: guidance batch, cut-off, step caching, decoder, eta)."""

    image: Any  # PIL RGB image, the size of the crop it was given
    report: Mapping[str, Any]


class Painter(Protocol):
    """What paints one crop (engine.Engine; a fake in tests)."""

    info: Any  # engine.ModelInfo: path, model_id, dtype, architecture, random_weights, manifest
    has_draft_decoder: bool

    def inpaint(self, image: Any, mask: Any, params: InpaintParams, on_step: StepCallback | None = None) -> Painted:
        """Paint `image` (RGB) where `mask` (L, 255 = repaint) says; sides multiples of 8."""
        ...

    def runtime_report(self, work_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """The runtime policies in force (dtype, threads, tiling, caches ...) for the sidecar."""
        ...


def timestamp(epoch: float) -> str:
    """ISO 8601 in UTC with milliseconds: how every record inpaintd writes says a time."""
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).isoformat(timespec="milliseconds")


# A result, record or archive folder never overwrites: NAME, then NAME-1 ... NAME-9999, then
# NAME-<the job id's 8 random hex digits>, so distinct names never run out (a client that always
# uploads scan.jpg takes NAME-9999 in a week at one job a minute).
NUMBERED_NAMES = 10_000
DISTINCT_SUFFIX_CHARS = len("-") + 8  # the longest suffix distinct_names adds


def distinct_names(name: str, job_id: str) -> Iterator[str]:
    """The names to try, in order, for a job's output or record named `name`."""
    yield name
    for index in range(1, NUMBERED_NAMES):
        yield f"{name}-{index}"
    yield f"{name}-{job_token(job_id)}"


def job_token(job_id: str) -> str:
    """The random part of a job id ("20261204T172742Z-81ad309a" -> "81ad309a")."""
    return job_id.rsplit("-", 1)[-1][-8:]


def name_problem(name: str) -> str | None:
    """Why a name (an inbox entry, a job's NAME) cannot be used safely: it escapes its folder or
    holds control characters or undecodable bytes; None when it is fine. The intake applies it
    to what is dropped, the spool to claims read back from disk (a shared state folder is as
    untrusted as the inbox)."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        return "name escapes the inbox"
    if any(0xD800 <= ord(c) <= 0xDFFF for c in name):
        return "name is not valid UTF-8"
    if any(unicodedata.category(c) == "Cc" for c in name):
        return "name contains control characters"
    return None
