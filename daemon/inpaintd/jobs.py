"""The plain data that flows through inpaintd: what a job asks for and what it produced.

Nothing here touches files, clocks or torch; these are values passed between the modules
(grouping -> service -> process -> engine -> outbox).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIDECAR_SCHEMA = "inpaintd.sidecar/1"


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
class JobFiles:
    """The inbox files that make up one job; mask and prompt files are optional."""

    name: str
    image: Path
    mask: Path | None = None
    prompt: Path | None = None  # NAME.txt, NAME.yaml or NAME.json
    folder: Path | None = None  # set when the job arrived as a folder NAME/

    def paths(self) -> list[Path]:
        return [p for p in (self.image, self.mask, self.prompt) if p is not None]


@dataclass(frozen=True)
class JobRequest:
    """Everything process.run_job needs: where the inputs are and how to paint them."""

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
