"""pipeline/record/schema.py: run.json as a typed RunRecord. Reading checks
every field's type (a wrong one is exit 5 naming it), keeps fields it does not
know, and gives back the file's own fields and digest; the digest catches an
edit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import CheckpointError
from pipeline.record.schema import RunRecord, load_record, record_digest


def _raw(**change: Any) -> dict[str, Any]:
    """A run.json as an older version wrote it: no optional field but two."""
    raw: dict[str, Any] = {
        "run_key": "k" * 64, "weights_sha256": "w" * 64, "weights_layout": {},
        "mode": "exact", "config": {"seed": 0}, "data": {}, "toolchain": {}, "profile": {},
        "key_inputs": ["code", "config", "data", "model"],
        "metrics": {"steps": 3, "test_accuracy": 0.5, "train_loss": 1.0},
        "trail": {"tensors": ["a"], "digest_bytes": 8}, "created_utc": "2026-01-01T00:00:00Z",
        "a_field_from_a_newer_version": [1, 2]}
    raw.update(change)
    raw["record_sha256"] = record_digest(raw)
    return raw


def _write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(raw))
    return path


def test_a_record_round_trips_to_its_own_fields_and_digest(tmp_path: Path) -> None:
    """Absent optional fields stay absent, unknown ones are kept, the digest
    is the file's: printing a record (--json) shows what the file holds."""
    raw = _raw()
    rec = load_record(_write(tmp_path, raw))
    assert rec.code_sha256 is None and rec.trail.fingerprint == "sha1-8" and rec.steps == 3
    assert rec.to_json() == raw
    assert RunRecord.from_json(raw, "x").field("a_field_from_a_newer_version") == [1, 2]


@pytest.mark.parametrize("field,value", [
    ("mode", "bogus"), ("key_inputs", [3]), ("config_dir", 7), ("world_size", True),
    ("metrics", {"steps": 3, "test_loss": float("nan")}),
    ("metrics", {"steps": -1}), ("trail", {"tensors": [], "digest_bytes": 8}),
    ("threads", "all")])
def test_a_field_of_the_wrong_type_is_exit_5_naming_it(tmp_path: Path, field: str,
                                                       value: Any) -> None:
    """Even with its digest recomputed (a forger), a record whose field has
    the wrong type, an unknown mode or a non-finite metric is refused, by name."""
    with pytest.raises(CheckpointError, match=rf"\[{field}\]") as e:
        load_record(_write(tmp_path, _raw(**{field: value})))
    assert e.value.exit_code == 5


def test_an_edit_without_a_new_digest_is_caught(tmp_path: Path) -> None:
    """Control for the digest: one changed metric, the digest left as it was."""
    raw = _raw()
    raw["metrics"]["test_accuracy"] = 0.99
    with pytest.raises(CheckpointError, match=r"\[record_sha256\]"):
        load_record(_write(tmp_path, raw))
