"""Host facts, without torch: what the CPU computes natively (and whether inpaintd may use its
bf16), how many physical cores, which versions.

Everything is decided from a cpuinfo *text* (`cpu_facts(text)`), so tests and emulators can say
which CPU they mean: under qemu-user /proc/cpuinfo is the host's. The engine asks
`bf16_in_use` (this machine's /proc/cpuinfo, the setting, the environment) and `physical_cores`
once at load, then weightpolicy.choose_weight_policy with the folder's dtype.

bf16 can be switched off for inpaintd whatever the CPU says: ``model.cpu_bf16: ignore``, or, while
that setting is ``auto``, the environment variable ``INPAINTD_CPU_BF16=0`` (``1`` forces it on).
A oneDNN ISA cap below bf16 (``ONEDNN_MAX_CPU_ISA=AVX2``, as an N100 simulation sets) counts as
no bf16 too: oneDNN would emulate every bf16 op then, which is slower than fp32.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .. import __version__
from ..core.errors import ModelError

DTYPES = ("bf16", "fp32")
BF16_SETTINGS = ("auto", "use", "ignore")
BF16_ENV = "INPAINTD_CPU_BF16"
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA, upper case) under which it has no bf16 instructions.
_ONEDNN_NO_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
_X86_BF16 = {"avx512_bf16", "amx_bf16"}


@dataclass(frozen=True)
class CpuFacts:
    """What a cpuinfo text says about the CPU's arithmetic (the flags/Features words that matter)."""

    arch: str  # "x86_64" | "aarch64" | "unknown" (from the words, not from this process)
    bf16: bool  # native bf16 dot products: x86 AVX512-BF16 or AMX-BF16, Arm BF16
    isa: str  # the widest vector ISA named: amx | avx512 | avx2 | avx | neon | none
    vnni: bool  # int8 dot products: x86 AVX-VNNI/AVX512-VNNI, Arm dotprod (asimddp)
    fp16: bool  # native fp16 arithmetic: x86 AVX512-FP16, Arm FEAT_FP16 (asimdhp)


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _feature_words(text: str) -> tuple[str, set[str]]:
    """("x86_64"|"aarch64"|"unknown", the words of the first flags/Features line)."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "flags":
            return "x86_64", set(value.split())
        if key == "features":
            return "aarch64", set(value.split())
    return "unknown", set()


def cpu_facts(cpuinfo: str | None = None) -> CpuFacts:
    """The CpuFacts of a cpuinfo text (default: this machine's /proc/cpuinfo)."""
    text = _read_cpuinfo() if cpuinfo is None else cpuinfo
    arch, words = _feature_words(text)
    if arch == "x86_64":
        isa = ("amx" if "amx_tile" in words else "avx512" if "avx512f" in words else "avx2" if "avx2" in words
               else "avx" if "avx" in words else "none")
        return CpuFacts(arch, bool(words & _X86_BF16), isa, bool(words & {"avx_vnni", "avx512_vnni"}),
                        "avx512_fp16" in words)
    if arch == "aarch64":
        return CpuFacts(arch, "bf16" in words, "neon" if words & {"asimd", "neon"} else "none",
                        "asimddp" in words, "asimdhp" in words)
    return CpuFacts(arch, False, "none", False, False)


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 in hardware (x86 AVX512-BF16/AMX, Arm BF16)."""
    return cpu_facts(cpuinfo).bf16


def bf16_in_use(setting: str = "auto", facts: CpuFacts | None = None,
                environ: Mapping[str, str] | None = None) -> bool:
    """Whether inpaintd may compute in bf16: model.cpu_bf16 (use|ignore) wins; under auto,
    INPAINTD_CPU_BF16 (0|1) if set, else the CPU's facts, unless oneDNN is capped below bf16."""
    if setting not in BF16_SETTINGS:
        raise ModelError(f"model.cpu_bf16 must be one of {', '.join(BF16_SETTINGS)}, got {setting!r}")
    if setting != "auto":
        return setting == "use"
    env = os.environ if environ is None else environ
    forced = env.get(BF16_ENV, "").strip().lower()
    if forced in ("0", "no", "false", "off"):
        return False
    if forced in ("1", "yes", "true", "on"):
        return True
    if env.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in _ONEDNN_NO_BF16:
        return False
    return (facts or cpu_facts()).bf16


def detect_dtype(cpuinfo: str | None = None, *, setting: str = "auto",
                 environ: Mapping[str, str] | None = None) -> str:
    """The compute dtype `auto` means: "bf16" where bf16 is in use (bf16_in_use), else "fp32"."""
    return "bf16" if bf16_in_use(setting, cpu_facts(cpuinfo), environ) else "fp32"


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


def resolve_dtype(setting: str, *, cpu_bf16: str = "auto", cpuinfo: str | None = None,
                  environ: Mapping[str, str] | None = None) -> str:
    """model.dtype as the engine computes: auto -> detect_dtype (with model.cpu_bf16)."""
    if setting == "auto":
        return detect_dtype(cpuinfo, setting=cpu_bf16, environ=environ)
    if setting not in DTYPES:
        raise ModelError(f"model.dtype must be auto, bf16 or fp32, got {setting!r}")
    return setting
