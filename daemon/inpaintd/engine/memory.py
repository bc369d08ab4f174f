"""How much memory this process may use, and handing freed heap back to the kernel.

`memory_limit_bytes()` is the smallest of: the cgroup limits on the path from this process's
cgroup to the root (v2 ``memory.max`` and ``memory.high``, which systemd's MemoryMax= and
MemoryHigh= write; v1 ``memory.limit_in_bytes``) and the machine's MemTotal. The engine uses it
to pick the UNet weight format (``model.unet_int8: auto``).

`malloc_trim()` asks glibc to return the free pages inside its heaps. Tensors of a few MB come
from glibc's heap, not from their own mmap (the threshold adapts upwards to 32 MB), so after
a VAE pass hundreds of MB stay resident although nothing uses them. Measured with SD-1.5 at
512x512: 830 MB anonymous after a job, 330 MB after malloc_trim(0), which takes a few ms.
Under tcmalloc (the service preloads it) the same call is MallocExtension_ReleaseFreeMemory.

No torch here; everything is read from /proc and /sys and never raises.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

_UNLIMITED_V1 = 1 << 60  # v1 reports "no limit" as a huge page-aligned number


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return None if value >= _UNLIMITED_V1 else value


def _mounts(mountinfo: str | None = None) -> dict[str, Path]:
    """cgroup mount points: "v2" -> path, "memory" -> path of the v1 memory controller."""
    found: dict[str, Path] = {}
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return found
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rfields = right.split()
        if len(fields) < 5 or not rfields:
            continue
        mount_point = Path(fields[4])
        fstype = rfields[0]
        if fstype == "cgroup2":
            found.setdefault("v2", mount_point)
        elif fstype == "cgroup" and len(rfields) >= 3 and "memory" in rfields[2].split(","):
            found.setdefault("memory", mount_point)
    return found


def _walk_up(base: Path, rel: str) -> list[Path]:
    """base/rel, its parents, up to base itself."""
    parts = [p for p in rel.strip("/").split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def cgroup_limit_bytes(cgroup: str | None = None, mountinfo: str | None = None) -> int | None:
    """The tightest cgroup memory limit above this process, or None when there is none.

    cgroup and mountinfo default to /proc/self/cgroup and /proc/self/mountinfo (tests pass text).
    """
    if cgroup is None:
        try:
            cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            return None
    mounts = _mounts(mountinfo)
    limits: list[int] = []
    for line in cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hierarchy == "0" and controllers == "" and "v2" in mounts:
            for folder in _walk_up(mounts["v2"], rel):
                for name in ("memory.max", "memory.high"):
                    value = _read_int(folder / name)
                    if value is not None:
                        limits.append(value)
        elif "memory" in controllers.split(",") and "memory" in mounts:
            for folder in _walk_up(mounts["memory"], rel):
                value = _read_int(folder / "memory.limit_in_bytes")
                if value is not None:
                    limits.append(value)
    return min(limits) if limits else None


def mem_total_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def memory_limit_bytes() -> int | None:
    """min(cgroup limits, MemTotal); None only when neither can be read."""
    values = [v for v in (cgroup_limit_bytes(), mem_total_bytes()) if v is not None]
    return min(values) if values else None


_trim: "ctypes._CFuncPtr | None | bool" = None


def _find_trim() -> "ctypes._CFuncPtr | bool":
    """The allocator's own give-back call: tcmalloc's when it is preloaded, else glibc's."""
    try:
        process = ctypes.CDLL(None)  # the symbols the process already has, LD_PRELOAD first
    except OSError:
        return False
    # Under LD_PRELOAD=libtcmalloc_minimal.so.4 (the unit's allocator drop-in) glibc's
    # malloc_trim still exists but trims heaps nobody allocates from any more; tcmalloc
    # keeps freed spans until it is asked.
    release = getattr(process, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release.restype = None
        release.argtypes = []
        return release
    trim = getattr(process, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


def malloc_trim() -> bool:
    """Hand the allocator's free heap pages back to the kernel; False where it cannot (musl, macOS)."""
    global _trim
    if _trim is None:
        _trim = _find_trim()
    if not _trim:
        return False
    try:
        _trim()  # type: ignore[operator]
    except Exception:  # noqa: BLE001 - a trim that fails changes nothing
        return False
    return True


def allocator() -> str:
    """Which malloc this process runs on: "tcmalloc" or "glibc" (for the runtime report)."""
    try:
        return "tcmalloc" if hasattr(ctypes.CDLL(None), "MallocExtension_ReleaseFreeMemory") else "glibc"
    except OSError:
        return "glibc"


MADV_DONTNEED = 4
MADV_PAGEOUT = 21  # Linux >= 5.4


def _file_mappings(maps: str | None = None) -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process."""
    if maps is None:
        try:
            maps = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    found = []
    for line in maps.splitlines():
        parts = line.split(None, 5)
        if len(parts) < 6 or parts[4] == "0" or not parts[5].startswith("/"):
            continue
        start, _, end = parts[0].partition("-")
        found.append((int(start, 16), int(end, 16), parts[5].strip()))
    return found


def release_file_pages(ranges: list[tuple[int, int]], maps: str | None = None) -> int:
    """Drop the resident pages of memory-mapped weight files behind these (address, nbytes) ranges.

    Only ranges that lie entirely inside a file-backed mapping are touched, so anonymous
    memory (weights that were copied or converted) is never discarded. MADV_PAGEOUT frees
    the pages outright where the kernel allows it (Linux >= 5.4, and the file's owner or
    root); MADV_DONTNEED then unmaps whatever is left from this process, so it stops
    counting in RSS and is the first thing reclaimed. The next access faults the pages
    back in from the page cache or the file. Returns the bytes advised.
    """
    try:
        madvise = ctypes.CDLL(None).madvise
    except (OSError, AttributeError):
        return 0
    mappings = _file_mappings(maps)
    page = 4096
    try:
        import os

        page = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        pass
    advised = 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for address, nbytes in sorted(set(ranges)):
        end = address + nbytes
        if not any(start <= address and end <= stop for start, stop, _ in mappings):
            continue
        lo = (address + page - 1) // page * page
        hi = end // page * page
        if hi <= lo:
            continue
        madvise(lo, hi - lo, MADV_PAGEOUT)
        if madvise(lo, hi - lo, MADV_DONTNEED) == 0:
            advised += hi - lo
    return advised
