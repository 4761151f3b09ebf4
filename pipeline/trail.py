"""The per-step trail (trail.bin): read it within the size its record
declares, and find where two trails diverge."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import CheckpointError
from .safeio import read_regular

__all__ = ["read_trail", "divergence"]


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


def divergence(a: dict[str, Any], trail_a: bytes, trail_b: bytes) -> list[str]:
    """One line: the first step and tensor where two trails differ (``a``'s
    record names the tensors), or that they agree."""
    lines: list[str] = []
    names = a["trail"]["tensors"]
    width = len(names) * a["trail"]["digest_bytes"]
    steps = min(len(trail_a), len(trail_b)) // width
    for s in range(steps):
        ra, rb = trail_a[s * width:(s + 1) * width], trail_b[s * width:(s + 1) * width]
        if ra != rb:
            d = a["trail"]["digest_bytes"]
            t = next(i for i in range(len(names)) if ra[i * d:(i + 1) * d] != rb[i * d:(i + 1) * d])
            lines.append(f"trails diverge at step {s + 1} (of {steps}), first tensor {names[t]}")
            break
    else:
        if len(trail_a) != len(trail_b):
            lines.append(f"trails agree for {steps} steps, then one run stops")
        else:
            lines.append(f"trails identical for all {steps} steps")
    return lines
