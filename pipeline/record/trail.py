"""The per-step trail (trail.bin), read within the size its record declares
(where two trails diverge: runs.first_divergence)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.errors import CheckpointError
from ..core.safeio import read_regular

# The per-step fingerprint's definition, recorded as run.json "trail.kind"
# (pipeline.core.hashing.fingerprints computes it).
FINGERPRINT_KIND = "sampled-int64-v1"

__all__ = ["FINGERPRINT_KIND", "read_trail"]


def read_trail(run_dir: Path, record: dict[str, Any]) -> bytes:
    """trail.bin of a run whose record was read: a regular file of exactly
    steps x tensors x digest bytes (its size is declared by the record)."""
    path = Path(run_dir) / "trail.bin"
    try:
        t = record["trail"]
        size = int(record["metrics"]["steps"]) * len(t["tensors"]) * int(t["digest_bytes"])
        return read_regular(path, size)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{run_dir}/run.json [trail]", "a trail description",
                              f"malformed ({e!r})") from None
    except OSError as e:
        raise CheckpointError(str(path), "the trail the record declares",
                              e.strerror or str(e)) from None
