"""Host facts, without torch: does the CPU compute bf16, how many physical cores, which versions.

`prepare-model --dtype auto` asks `detect_dtype` without loading the engine; the engine asks
`resolve_dtype` and `physical_cores` once at load.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from .. import __version__
from ..core.errors import ModelError

DTYPES = ("bf16", "fp32")

def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (x86 AVX512-BF16/AMX, Arm BF16)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("flags", "features"):
            words = set(value.split())
            if words & {"avx512_bf16", "amx_bf16", "bf16"}:
                return True
    return False


def detect_dtype(cpuinfo: str | None = None) -> str:
    """The dtype `auto` means on this machine: "bf16" with native bf16, else "fp32"."""
    return "bf16" if cpu_has_native_bf16(cpuinfo) else "fp32"


def physical_cores(cpuinfo: str | None = None) -> int:
    """Physical cores this process may use: unique (physical id, core id), capped by affinity."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    cores: set[tuple[str, str]] = set()
    physical = core = None
    for line in text.splitlines() + [""]:
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
        elif not line.strip():
            if physical is not None and core is not None:
                cores.add((physical, core))
            physical = core = None
    count = len(cores) or (os.cpu_count() or 1)
    try:
        count = min(count, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        pass
    return max(1, count)


def versions() -> dict[str, str]:
    """Versions of the pieces that decide the pixels."""
    import diffusers
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "inpaintd": __version__,
    }


def resolve_dtype(setting: str) -> str:
    """model.dtype as the engine runs it: auto -> this CPU's choice (detect_dtype)."""
    if setting == "auto":
        return detect_dtype()
    if setting not in DTYPES:
        raise ModelError(f"model.dtype must be auto, bf16 or fp32, got {setting!r}")
    return setting
