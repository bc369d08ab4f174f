"""The one file hash: sha256 and size of a regular file, read without following links or blocking.

Used for the sidecar's input hashes, the outbox's "is this image ours" check and the model
manifest. A FIFO or device planted where a file should be is refused (NotRegularFile), never
read: opening it O_NONBLOCK and checking fstat first means nothing can make the reader wait.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import NamedTuple

BLOCK = 1 << 20


class FileDigest(NamedTuple):
    sha256: str  # hex
    size: int  # bytes read


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or folder: nothing was read."""


def sha256_file(path: Path, *, nofollow: bool = True) -> FileDigest:
    """sha256 and size of the regular file at `path`; OSError (ELOOP) for a link when nofollow."""
    flags = os.O_RDONLY | os.O_NONBLOCK | (os.O_NOFOLLOW if nofollow else 0)
    fd = os.open(path, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotRegularFile(errno.EINVAL, "not a regular file", str(path))
        digest = hashlib.sha256()
        size = 0
        while chunk := os.read(fd, BLOCK):
            digest.update(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return FileDigest(digest.hexdigest(), size)
