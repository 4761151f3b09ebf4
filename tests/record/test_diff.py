"""Tests for pipeline/record/diff.py: what differs between two run records
(their inputs, and where their per-step trails diverge)."""

from __future__ import annotations

import hashlib
from typing import Any

from pipeline.record.diff import diff_runs
from pipeline.record.schema import RunRecord, Trail


def _record(config: dict[str, Any], tensors: tuple[str, ...], kind: str | None = None
            ) -> RunRecord:
    return RunRecord(run_key="k", weights_sha256="w", weights_layout={}, mode="pinned",
                     config=config, data={}, toolchain={}, profile={}, key_inputs=("config",),
                     metrics={"steps": 3}, trail=Trail(tensors, 8, kind))


def _trail(steps: list[list[bytes]]) -> bytes:
    return b"".join(hashlib.sha1(t).digest()[:8] for step in steps for t in step)


def test_diff_runs_names_the_first_divergent_step_and_tensor() -> None:
    """Trails equal for two steps, then tensor b differs: step 3, tensor b."""
    rec = _record({"seed": 0}, ("a", "b"))
    same = [[b"1", b"2"], [b"3", b"4"]]
    ta = _trail([*same, [b"5", b"6"]])
    tb = _trail([*same, [b"5", b"X"]])
    lines = diff_runs(rec, _record({"seed": 1}, ("a", "b")), ta, tb)
    assert lines == ["config.seed: 0 != 1", "trails diverge at step 3 (of 3), first tensor b"]
    assert diff_runs(rec, rec, ta, ta) == ["trails identical for all 3 steps"]


def test_diff_refuses_to_compare_trails_of_two_kinds() -> None:
    """A trail of SHA-1 digests (older runs) and one of sampled fingerprints
    are not compared step by step: the diff says so instead of naming a step."""
    old = _record({}, ("a",))
    new = _record({}, ("a",), "sampled-int64-v1")
    lines = diff_runs(old, new, b"\0" * 8, b"\1" * 8)
    assert lines == ["trails not comparable: fingerprints of kinds sha1-8 and sampled-int64-v1"]
