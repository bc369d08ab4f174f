"""A random AutoencoderTiny folder (TAESD's shape), for the draft-decoder tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

from ..demo.model import SEED as _SEED
from ..weights.folder import RANDOM_MARKER


def build_random_tiny_vae(out: Path, *, seed: int = _SEED) -> Path:
    """A random-weight AutoencoderTiny with TAESD's default architecture (for --draft-decoder)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    out = Path(out)
    AutoencoderTiny().save_pretrained(str(out), safe_serialization=True)
    (out / RANDOM_MARKER).write_text("random weights: for tests and benchmarks only\n", encoding="utf-8")
    return out
