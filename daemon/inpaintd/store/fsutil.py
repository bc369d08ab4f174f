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
import sys
import tempfile
from pathlib import Path
from typing import Any

import structlog

from ..core.jobs import distinct_names, job_token

log = structlog.get_logger("inpaintd.store")

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


def read_bounded(path: Path, limit: int) -> bytes:
    """A small record file (job.json, a heartbeat, status.json) read back from a folder others
    can write: never through a link (O_NOFOLLOW on its last part), never blocking (a FIFO is
    opened O_NONBLOCK and refused as not a regular file), never more than `limit` bytes.
    OSError when it cannot be opened, ValueError when it is not a regular file or too large."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{os.path.basename(path)} is not a regular file")
        data = os.read(fd, limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise ValueError(f"{os.path.basename(path)} is larger than {limit} bytes")
    return data


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


def move_entry(src: Path, dst: Path, max_bytes: int | None = None) -> str:
    """Move one entry (file, folder, link, FIFO) without ever reading through a link.

    A copy across filesystems takes at most max_bytes of each file (see _copy_file).

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
            _copy_file(src, tmp, max_bytes)
        elif stat_mod.S_ISDIR(st.st_mode):
            shutil.copytree(src, tmp, symlinks=True, ignore=_uncopyable,
                            copy_function=lambda a, b: _copy_file(a, b, max_bytes))
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


def _copy_file(src: str | Path, dst: str | Path, max_bytes: int | None = None) -> None:
    """Copy one regular file's bytes and times; never follows a link, never blocks on a FIFO.

    Holes stay holes (_copy_data), and at most max_bytes are copied: a claimed input is still
    writable through a handle its uploader kept open (two sftp or SMB opens), and data written
    past the limit after the job read it would otherwise be copied onto the archive's disk
    whole. Such a file is cut at the limit and the cut is logged: the job read no more of it.
    """
    fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat_mod.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(src))
        with open(dst, "xb") as writer:
            size = os.fstat(fd).st_size
            kept = size if max_bytes is None else min(size, max_bytes)
            _copy_data(fd, writer.fileno(), kept)
            if kept < size:
                log.warning("store.copy_cut", file=os.fsdecode(os.path.basename(src)), kept_bytes=kept, size=size,
                            note="grew past limits.max_input_bytes after its check")
            os.fsync(writer.fileno())
    finally:
        os.close(fd)
    shutil.copystat(src, dst, follow_symlinks=False)


def _copy_data(src: int, dst: int, size: int) -> None:
    """Copy the data of src and leave its holes holes: a claimed input a drop user grew to
    terabytes by seeking past the end (a second write handle) holds a few bytes on disk, and
    copying its length in zeros would fill the archive's disk. Where the filesystem cannot say
    where data is (SEEK_DATA unsupported), everything counts as data."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(src, offset, os.SEEK_DATA)
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                break  # a hole up to the end
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = offset, size
        if _copy_range(src, dst, start, end) < end - start:
            break  # shorter than it said: what there was is copied
        offset = end
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> int:
    position = start
    while position < end:
        chunk = os.pread(src, min(1 << 20, end - position), position)
        if not chunk:
            break
        written = 0
        while written < len(chunk):
            written += os.pwrite(dst, chunk[written:], position + written)
        position += len(chunk)
    return position - start


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


# --------------------------------------------------------------------------- the publication's file operations


class OsFs:
    """The few operations the fenced publication (outbox.py) makes, on the real filesystem.

    A seam, so that the protocol's real functions run unchanged against an in-memory
    filesystem in tests/test_publication.py, one operation at a time, in every order.
    """

    def lexists(self, path: Path) -> bool:
        return os.path.lexists(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as handle:
            return handle.read()

    def write(self, path: Path, data: bytes) -> None:
        atomic_write_bytes(path, data)

    def mkdir(self, path: Path) -> None:
        # Never with parents: a claim folder a take-over renamed away must not be made again.
        try:
            os.mkdir(path)
        except FileExistsError:
            pass

    def link(self, src: Path, dst: Path) -> None:
        """A second name for src at dst; FileExistsError rather than replace (link(2) is
        no-replace on every server, even sshfs, where renameat2(NOREPLACE) is not)."""
        os.link(src, dst, follow_symlinks=False)
        fsync_dir(dst.parent)

    def copy_in(self, src: Path, dst: Path) -> None:
        """src into dst's folder under a temp name, then linked to dst (no-replace): for an
        outbox on another filesystem than the claim (single device only: not fenced)."""
        tmp = dst.parent / f"{own_temp_prefix()}{secrets.token_hex(6)}"
        try:
            _copy_file(src, tmp)
            os.link(tmp, dst)
        finally:
            if os.path.lexists(tmp):
                os.unlink(tmp)
        fsync_dir(dst.parent)

    def rename(self, src: Path, dst: Path) -> None:
        os.rename(src, dst)

    def unlink(self, path: Path) -> None:
        os.unlink(path)

    def same_file(self, a: Path, b: Path) -> bool:
        """Whether a and b are one file (two hard links of it).

        Inode numbers decide where they are equal; sshfs invents one per path, so unequal
        ones prove nothing there. Then a's mtime is set, twice, to a value b would only
        show if it were the same inode (whole seconds: SFTP carries no more). A client
        caching attributes can only make this say False (the caller then leaves the file
        alone), never True for another file.
        """
        sa, sb = os.lstat(a), os.lstat(b)
        if not (stat_mod.S_ISREG(sa.st_mode) and stat_mod.S_ISREG(sb.st_mode)) or sa.st_size != sb.st_size:
            return False
        if (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino):
            return True
        if sa.st_dev != sb.st_dev and not _fuse_dev(sa.st_dev):
            return False
        base = int(sa.st_mtime)
        for delta in (1, 2):
            os.utime(a, (base - delta, base - delta), follow_symlinks=False)
            if fresh_mtime(b) != base - delta:
                return False
        return True


_AT_SYMLINK_NOFOLLOW = 0x100
_AT_STATX_FORCE_SYNC = 0x2000  # ask the server, not the client's attribute cache (FUSE, NFS, SMB)
_STATX_MTIME = 0x40
_STATX_MTIME_OFFSET = 112  # struct statx: stx_mtime.tv_sec


def fresh_mtime(path: Path) -> int:
    """path's mtime in whole seconds as the server has it now (statx AT_STATX_FORCE_SYNC);
    lstat's (perhaps cached) where statx is not there."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    statx = getattr(_libc, "statx", None)
    if statx is not None:
        buf = ctypes.create_string_buffer(256)
        at_fdcwd = -100
        if statx(at_fdcwd, os.fsencode(path), _AT_SYMLINK_NOFOLLOW | _AT_STATX_FORCE_SYNC, _STATX_MTIME, buf) == 0:
            return int.from_bytes(buf.raw[_STATX_MTIME_OFFSET:_STATX_MTIME_OFFSET + 8], sys.byteorder, signed=True)
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(path))
    return int(os.lstat(path).st_mtime)


def _fuse_dev(dev: int) -> bool:
    """FUSE and other anonymous-device filesystems (major 0): inode numbers may be per path."""
    return os.major(dev) == 0
