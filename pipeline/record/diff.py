"""What differs between two runs: their inputs (by the fields of
pipeline.record.inputs.INPUT_FIELDS) and where their per-step trails diverge.
``pipeline diff``, ``pipeline verify``'s note and the audit's report use it."""

from __future__ import annotations

import json
from typing import Any

from .inputs import INPUT_FIELDS
from .schema import RunRecord

__all__ = ["input_fields", "input_differences", "diff_runs", "first_divergence", "differences"]


def input_fields(record: RunRecord) -> dict[str, Any]:
    """run.json field -> value for every input a record holds."""
    return {f: record.field(f) for f in INPUT_FIELDS.values()}


def input_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """One line per differing input of two runs' input fields (``input_fields``
    or ``RunInputs.fields``), naming the dotted key and both values."""
    lines = []
    for name, fld in INPUT_FIELDS.items():
        va, vb = a.get(fld), b.get(fld)
        if name == "switches":  # absent and empty are the same: no test switch
            va, vb = va or {}, vb or {}
        for path, va, vb in differences(va, vb, name):
            lines.append(f"{path}: {json.dumps(va)} != {json.dumps(vb)}")
    return lines


def diff_runs(a: RunRecord, b: RunRecord, trail_a: bytes, trail_b: bytes) -> list[str]:
    """Lines naming the differing inputs, then where the trails diverge."""
    lines = input_differences(input_fields(a), input_fields(b))
    if a.trail.fingerprint != b.trail.fingerprint:  # two definitions of the fingerprint
        return [*lines, f"trails not comparable: fingerprints of kinds {a.trail.fingerprint} "
                        f"and {b.trail.fingerprint}"]
    names, d = list(a.trail.tensors), a.trail.digest_bytes
    steps = min(len(trail_a), len(trail_b)) // (len(names) * d)
    where = first_divergence(names, d, trail_a, trail_b)
    if where is not None:
        lines.append(f"trails diverge at step {where[0]} (of {steps}), first tensor {where[1]}")
    elif len(trail_a) != len(trail_b):
        lines.append(f"trails agree for {steps} steps, then one run stops")
    else:
        lines.append(f"trails identical for all {steps} steps")
    return lines


def first_divergence(names: list[str], digest_bytes: int, trail_a: bytes,
                     trail_b: bytes) -> tuple[int, str] | None:
    """(step, tensor) where two trails (``digest_bytes`` per tensor per step,
    tensors in ``names`` order) first differ, steps counted from 1; None if
    they agree for as long as both go. ``pipeline diff`` and ``pipeline audit``
    both locate divergence with it."""
    width = len(names) * digest_bytes
    for s in range(min(len(trail_a), len(trail_b)) // width):
        ra, rb = trail_a[s * width:(s + 1) * width], trail_b[s * width:(s + 1) * width]
        if ra != rb:
            t = next(i for i in range(len(names))
                     if ra[i * digest_bytes:(i + 1) * digest_bytes]
                     != rb[i * digest_bytes:(i + 1) * digest_bytes])
            return s + 1, names[t]
    return None


def differences(va: Any, vb: Any, path: str) -> list[tuple[str, Any, Any]]:
    """(dotted path, a's value, b's value) for every leaf where two JSON values differ."""
    if isinstance(va, dict) and isinstance(vb, dict):
        out = []
        for k in sorted(set(va) | set(vb)):
            out += differences(va.get(k), vb.get(k), f"{path}.{k}")
        return out
    if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb) and va != vb:
        out = []  # lists of one length: the elements that differ, by index
        for i, (a, b) in enumerate(zip(va, vb)):
            out += differences(a, b, f"{path}[{i}]")
        return out
    return [] if va == vb else [(path, va, vb)]
