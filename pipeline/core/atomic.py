"""Crash-safe file writes: temporary file in the same directory, fsync,
rename over the target, fsync of the directory. A reader sees the old file
or the new one, never a torn one, even after kill -9 or power loss."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import DistributedError

__all__ = ["write_bytes", "write_text", "fsync_dir", "set_owner_check", "check_owner"]

# Set by a launched worker (pipeline.launch): returns why this process may no
# longer write (its launcher, which holds the run lock, is gone), or None.
_owner_check: Callable[[], str | None] | None = None


def set_owner_check(check: Callable[[], str | None] | None) -> None:
    global _owner_check
    _owner_check = check


def check_owner() -> None:
    """Raise unless this process may still write (it, or its launcher, holds
    the run lock): called before every rename that publishes a file."""
    if _owner_check is not None and (why := _owner_check()) is not None:
        raise DistributedError(f"not writing: {why}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: Path, data: bytes,
                before_replace: Callable[[], None] | None = None) -> None:
    """Write ``data`` to ``path`` crash-safely. ``before_replace`` runs once the
    temp file is complete and synced, just before the rename (a test hook)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; runs are meant to be shared
        if before_replace is not None:
            before_replace()
        check_owner()
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))
