"""Free space on the folders the daemon writes, and the low-disk guard's rule.

`free_space` asks the filesystems (statvfs); `low_space` is the rule, pure: a folder whose
filesystem has less free than `limits.min_free_bytes` or `limits.min_free_fraction` of its
size stops the intake from claiming (intake.Intake.tick): new jobs wait in the inbox, nothing
fails, and claiming resumes on its own once space is back. A job already claimed finishes, or
is held as before.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

# The folders whose filesystems a job writes: the result, a failure record, the archived
# inputs, the claim's job.json. (The inbox only loses files: claims are renames.)
WRITTEN = ("outbox", "failed", "archive", "state")


@dataclass(frozen=True)
class Space:
    free: int  # bytes an unprivileged writer may still use (f_bavail)
    total: int


def free_space(folders: Mapping[str, Path]) -> dict[str, Space]:
    """Free and total bytes of each folder's filesystem; a folder that cannot be asked is left out
    (a missing or unreachable folder is the folder checks' business, not the guard's)."""
    out: dict[str, Space] = {}
    for name, path in folders.items():
        try:
            st = os.statvfs(path)
        except OSError:
            continue
        out[name] = Space(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)
    return out


def low_space(space: Mapping[str, Space], min_bytes: int, min_fraction: float) -> dict[str, str]:
    """The folders below either threshold, each with the sentence saying so (0 turns a check off)."""
    low: dict[str, str] = {}
    for name, s in sorted(space.items()):
        if min_bytes and s.free < min_bytes:
            low[name] = f"{name} has {_size(s.free)} free, below limits.min_free_bytes ({_size(min_bytes)})"
        elif min_fraction and s.total and s.free < min_fraction * s.total:
            low[name] = (f"{name} has {s.free / s.total:.1%} free, below limits.min_free_fraction "
                         f"({min_fraction:.1%})")
    return low


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
