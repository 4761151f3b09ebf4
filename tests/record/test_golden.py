"""Tests for pipeline/golden.py: add, check, replace, keyed by the mode."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline import modes
from pipeline.core.errors import MismatchError
from pipeline.record import golden
from pipeline.record.schema import RunRecord, Trail


def _record(mode: str, sha: str, torch_version: str = "2.13.0",
            switches: dict[str, Any] | None = None) -> RunRecord:
    return RunRecord(run_key="k", weights_sha256=sha, weights_layout={}, mode=mode, config={},
                     data={}, toolchain={"torch": torch_version, "platform": "Linux-x86_64",
                                         "lock": "pip:x"},
                     profile={"name": "p"}, key_inputs=tuple(modes.of(mode).key_fields),
                     metrics={"steps": 1}, trail=Trail(("a",), 8), config_sha256="c" * 64,
                     test_switches=switches)


def test_add_then_check_matches_and_a_different_hash_mismatches(tmp_path: Path) -> None:
    """An added entry checks; another hash under the same key is a mismatch."""
    f = tmp_path / "g.json"
    assert golden.add(_record("pinned", "a" * 64), f) == "added"
    assert golden.check(_record("pinned", "a" * 64), f)[0] is True
    ok, msg = golden.check(_record("pinned", "b" * 64), f)
    assert ok is False and "a" * 64 in msg and "b" * 64 in msg


def test_no_entry_for_another_toolchain_in_pinned_mode_but_exact_is_shared(
        tmp_path: Path) -> None:
    """A pinned entry does not cover another torch; an exact entry does."""
    f = tmp_path / "g.json"
    golden.add(_record("pinned", "a" * 64), f)
    golden.add(_record("exact", "e" * 64), f)
    assert golden.check(_record("pinned", "a" * 64, "2.14.1"), f)[0] is None
    assert golden.check(_record("exact", "e" * 64, "2.14.1"), f)[0] is True


def test_add_refuses_a_differing_entry_unless_forced(tmp_path: Path) -> None:
    """A differing entry is kept unless --force, which replaces it (one entry)."""
    f = tmp_path / "g.json"
    golden.add(_record("exact", "a" * 64), f)
    with pytest.raises(MismatchError, match="--force"):
        golden.add(_record("exact", "b" * 64), f)
    assert golden.add(_record("exact", "b" * 64), f, force=True) == "replaced"
    entries = json.loads(f.read_text())["entries"]
    assert [e["weights_sha256"] for e in entries] == ["b" * 64]


def test_a_control_run_never_checks_against_a_real_runs_entry(tmp_path: Path) -> None:
    """A run made under a bit-changing test switch has a golden key of its own:
    neither a match nor a mismatch against the real entry."""
    f = tmp_path / "g.json"
    golden.add(_record("exact", "a" * 64), f)
    assert golden.check(_record("exact", "b" * 64, switches={"no_shard_streams": True}),
                        f)[0] is None
    assert golden.check(_record("exact", "a" * 64), f)[0] is True
