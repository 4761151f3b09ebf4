"""The per-step trail (trail.bin), read within the size its record declares
(where two trails diverge: pipeline.record.diff)."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import CheckpointError
from ..core.safeio import read_regular
from .schema import RunRecord

__all__ = ["read_trail"]


def read_trail(run_dir: Path, record: RunRecord) -> bytes:
    """trail.bin of a run whose record was read: a regular file of exactly
    steps x tensors x digest bytes (its size is declared by the record)."""
    path = Path(run_dir) / "trail.bin"
    size = record.steps * len(record.trail.tensors) * record.trail.digest_bytes
    try:
        return read_regular(path, size)
    except OSError as e:
        raise CheckpointError(str(path), "the trail the record declares",
                              e.strerror or str(e)) from None
