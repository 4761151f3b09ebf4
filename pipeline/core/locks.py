"""An exclusive file lock that removes its file when released.

``flock`` on a file that is unlinked while a waiter holds it open is the
classic trap: the waiter locks the orphaned inode while a newcomer creates
and locks a fresh file, and two processes hold "the" lock. So after
acquiring, the holder checks that the path still names the inode it locked,
and retries if not; the file is unlinked only by the holder, while it holds
the lock. The kernel drops the lock of a killed holder; the file it leaves
(stale) is taken over by the next holder and removed on release.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["exclusive"]

def _acquire(path: Path, waiting: str) -> int:
    said = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(waiting, file=sys.stderr)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False  # the previous holder removed it: lock a fresh one
            if same:
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: Path, waiting: str) -> Iterator[None]:
    """Hold the lock at ``path`` (printing ``waiting`` once if another process
    holds it); remove the file, still holding the lock, on the way out."""
    fd = _acquire(path, waiting)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)
