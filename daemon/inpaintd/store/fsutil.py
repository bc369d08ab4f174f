"""Atomic file publication and moves: temp name in the same directory, fsync, rename, fsync the directory.

A reader of the destination sees either nothing or the complete file, never a partial one,
even across a crash or power loss (the borg SaveFile pattern). Moves across filesystems
(an archive on another disk) copy under a temp name and rename, so a kill mid-copy leaves a
temp file the next attempt removes, never a partial file under the real name.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import stat as stat_mod
import tempfile
from pathlib import Path
from typing import Any

from ..core.jobs import distinct_names, job_token

TEMP_PREFIX = ".inpaintd-tmp-"
_writer = ""  # this device's id in its temp names, on a folder several devices share


def set_writer(device: str) -> None:
    """Name this process's temp files `.inpaintd-tmp-<device>-*`, so that clean-up after a stop
    removes only its own in a folder other devices write to as well."""
    global _writer
    _writer = f"{device}-"


def own_temp_prefix() -> str:
    return TEMP_PREFIX + _writer


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, overwrite: bool = True) -> None:
    """Write data to path atomically.

    With overwrite=False the final step is link(2), which fails with FileExistsError instead
    of replacing a file someone else published meanwhile.
    """
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=own_temp_prefix(), dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644 & ~_current_umask())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            tmp.unlink()
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# --------------------------------------------------------------------------- moving

_RENAME_NOREPLACE = 1
_libc: Any = None


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with FileExistsError instead of replacing dst (renameat2 NOREPLACE).

    A plain rename of a folder onto an existing empty folder replaces it, and two daemons
    filing a job under the same free name must not both win. Filesystems without
    RENAME_NOREPLACE (some FUSE mounts) get a check-then-rename, which a racing writer
    could still slip between.
    """
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd = -100
    result = _libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), _RENAME_NOREPLACE)
    if result == 0:
        return
    err = ctypes.get_errno()
    if err == errno.EEXIST:
        raise FileExistsError(err, os.strerror(err), str(dst))
    if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        raise OSError(err, os.strerror(err), str(src), None, str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    try:
        os.rename(src, dst)
    except OSError as exc:
        if exc.errno == errno.ENOTEMPTY:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from exc
        raise


def rename_distinct(src: Path, parent: Path, name: str, job_id: str) -> Path:
    """Rename src to the first free of core.jobs.distinct_names (name, name-1 ... then a name
    with the job's token); the path it got."""
    for candidate_name in distinct_names(name, job_id):
        candidate = parent / candidate_name
        try:
            rename_noreplace(src, candidate)
            return candidate
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, f"no free name for {name} (even {name}-{job_token(job_id)} is taken)", str(parent))


def same_filesystem(a: Path, b: Path) -> bool:
    return os.stat(a).st_dev == os.stat(b).st_dev


def move_entry(src: Path, dst: Path) -> str:
    """Move one entry (file, folder, link, FIFO) without ever reading through a link.

    Returns "renamed", "copied" (across filesystems: copied under a temp name beside dst, made
    durable, renamed into place, then the source removed), "kept" (dst is already there and
    src too: a stop came between the copy's rename and the source's removal; dst is complete
    because only a finished copy is ever renamed in, so src is removed) or "removed" (a device
    node, which cannot be recreated across filesystems and holds no data of ours).
    """
    if os.path.lexists(dst):
        if not os.path.lexists(src):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
        _remove(src)
        return "kept"
    try:
        rename_noreplace(src, dst)
        return "renamed"
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    st = os.lstat(src)
    tmp = dst.parent / f"{own_temp_prefix()}{secrets.token_hex(6)}"
    try:
        if stat_mod.S_ISREG(st.st_mode):
            _copy_file(src, tmp)
        elif stat_mod.S_ISDIR(st.st_mode):
            shutil.copytree(src, tmp, symlinks=True, copy_function=_copy_file, ignore=_uncopyable)
            for dirpath, _dirs, _files in os.walk(tmp):
                fsync_dir(Path(dirpath))
        elif stat_mod.S_ISLNK(st.st_mode):
            os.symlink(os.readlink(src), tmp)  # the link itself, never what it points to
        elif stat_mod.S_ISFIFO(st.st_mode):
            os.mkfifo(tmp, stat_mod.S_IMODE(st.st_mode))
        else:
            _remove(src)
            return "removed"
        rename_noreplace(tmp, dst)
    except BaseException:
        if os.path.lexists(tmp):
            _remove(tmp)
        raise
    fsync_dir(dst.parent)
    _remove(src)
    return "copied"


def _remove(path: Path) -> None:
    if stat_mod.S_ISDIR(os.lstat(path).st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


def _uncopyable(directory: str, names: list[str]) -> list[str]:
    """Device nodes and sockets inside a folder: not copied (nothing of a job's data)."""
    skip = []
    for name in names:
        mode = os.lstat(os.path.join(directory, name)).st_mode
        if not (stat_mod.S_ISREG(mode) or stat_mod.S_ISDIR(mode) or stat_mod.S_ISLNK(mode)):
            skip.append(name)
    return skip


def _copy_file(src: str | Path, dst: str | Path) -> None:
    """Copy one regular file's bytes and times; never follows a link, never blocks on a FIFO."""
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        with os.fdopen(os.dup(fd), "rb") as reader, open(dst, "xb") as writer:
            shutil.copyfileobj(reader, writer, 1 << 20)
            writer.flush()
            os.fsync(writer.fileno())
    finally:
        os.close(fd)
    shutil.copystat(src, dst, follow_symlinks=False)


def publish_dir(tmp: Path, dst: Path, *, overwrite: bool) -> None:
    """Rename a finished folder into place; an old one is moved aside first and then removed."""
    for f in tmp.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    old: Path | None = None
    if dst.exists():
        if not overwrite:
            raise FileExistsError(f"{dst} already exists")
        old = dst.parent / f".{dst.name}.old-{os.getpid()}-{os.urandom(4).hex()}"
        os.replace(dst, old)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
