"""Reading files an adversary may have planted: regular files only, opened
without blocking, checked with fstat before a byte is read, read within a
bound. Every reader of a file the pipeline did not just write goes through
here (config, manifest, data files, run.json, weights, checkpoints, trails,
the golden file, the stat cache, the decode cache).

A FIFO opened for reading blocks until a writer appears, and ``/dev/zero``
reads forever: both are refused by ``O_NONBLOCK`` plus an fstat that must
say "regular file" (checked on the descriptor, so a path swapped after the
check cannot matter). Errors are ``OSError`` subclasses carrying the path,
so each caller turns them into its own error type, and an uncaught one is
the CLI's file-system error (exit 74), never a hang.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

__all__ = ["NotRegularFile", "FileTooLarge", "open_regular", "read_regular", "KIB", "MIB",
           "GIB"]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30


class NotRegularFile(OSError):
    """The path is a FIFO, device, socket or directory: it is not read."""


class FileTooLarge(OSError):
    """The file is larger than what its reader accepts."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | Path, *, follow: bool = True) -> BinaryIO:
    """``path`` opened read-only, unbuffered, if it is a regular file.

    ``follow=False`` adds O_NOFOLLOW: a symbolic link as the last component
    is refused (ELOOP) rather than followed."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise NotRegularFile(errno.ELOOP, "a symbolic link, refused", str(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"{_kind(st.st_mode)}, not a regular file",
                                 str(path))
        os.set_blocking(fd, True)  # a regular file never blocks; plain reads from here
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | Path, limit: int, *, follow: bool = True) -> bytes:
    """The bytes of regular file ``path``, refusing one over ``limit`` bytes
    (by fstat, and again while reading: a file growing meanwhile is cut off
    at ``limit + 1`` and refused)."""
    with open_regular(path, follow=follow) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise FileTooLarge(errno.EFBIG, f"{size} bytes, more than the {limit} accepted",
                               str(path))
        data = bytearray()
        while len(data) <= limit:  # one read() may return less than asked (2 GiB cap)
            chunk = f.read(min(limit + 1 - len(data), 1 << 30))
            if not chunk:
                break
            data += chunk
        if len(data) > limit:
            raise FileTooLarge(errno.EFBIG, f"more than the {limit} bytes accepted",
                               str(path))
        return bytes(data)


def describe(e: OSError) -> str:
    """'PATH: what' for an OSError: the one way errors name a file."""
    where = e.filename if e.filename is not None else "(no path)"
    return f"{where}: {e.strerror or e}"
