"""Tests for pipeline/recipe.py: prepare verifies once, get-or-train reuses a
complete run, rebuild and verify compare bit for bit (and fail when the bits
differ). In this process, with the no-pinning control: the recipe's logic,
not the profile, is under test here (the profile: tests/system/test_determinism.py)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline import recipe
from pipeline.core.config import load_config
from pipeline.core.errors import CheckpointError, MismatchError
from pipeline.data import manifest
from pipeline.record.schema import record_digest

from .support import forge_record, unpin

SHORT = ["train.epochs=1", "model.args.hidden=[16]"]


@pytest.fixture(autouse=True)
def unpinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unpin(monkeypatch, tmp_path)


def test_prepare_verifies_every_file_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """One manifest parse and one verification per prepared run."""
    calls: list[Any] = []
    real = manifest.verify
    monkeypatch.setattr(manifest, "verify", lambda *a, **k: calls.append(a) or real(*a, **k))
    parses: list[Any] = []
    real_load = manifest.load_manifest
    monkeypatch.setattr(manifest, "load_manifest",
                        lambda p: parses.append(p) or real_load(p))
    prep = recipe.prepare(load_config(None, SHORT), ["train"])
    assert len(calls) == 1 and len(parses) == 1
    assert prep.ds.input_shape == (1, 8, 8) and prep.ds.n_classes == 10
    assert prep.inputs.data["files"] == {"digits": prep.ds.sha256}
    assert prep.inputs.data["dataset"] == "digits" and prep.parts.factory.name.endswith(":mlp")


def test_second_call_reuses_and_rebuild_agrees(tmp_path: Path) -> None:
    """A complete run is reused as is; rebuild retrains to the same bits."""
    prep = recipe.prepare(load_config(None, SHORT), ["train"])
    first = recipe.get_or_train(prep, tmp_path / "runs", quiet=True)
    assert not first.reused and first.record is not None
    again = recipe.get_or_train(prep, tmp_path / "runs", quiet=True)
    assert again.reused and again.record == first.record
    recipe.rebuild(prep, first.record, quiet=True)


@pytest.mark.slow
def test_rebuild_and_verify_fail_on_different_bits(tmp_path: Path) -> None:
    """Control: a record whose weight hash is not what training gives is a
    mismatch for rebuild; verify of a record edited that way fails too."""
    prep = recipe.prepare(load_config(None, SHORT), ["train"])
    record = recipe.get_or_train(prep, tmp_path / "runs", quiet=True).record
    assert record is not None
    with pytest.raises(MismatchError, match="rebuild differs"):
        recipe.rebuild(prep, dataclasses.replace(record, weights_sha256="0" * 64), quiet=True)
    record_after, differences = recipe.verify_run(tmp_path / "runs" / record.run_key,
                                                  ["verify"], quiet=True)
    assert record_after.weights_sha256 == record.weights_sha256 and differences == []
    run_json = tmp_path / "runs" / record.run_key / "run.json"
    rec = json.loads(run_json.read_text())
    rec["config"]["seed"] = 1  # the record now claims another seed than its weights'
    run_json.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=r"\[record_sha256\]"):  # an edit is caught
        recipe.verify_run(run_json.parent, ["verify"], quiet=True)
    rec["record_sha256"] = record_digest(rec)  # a forger recomputes the digest
    run_json.write_text(json.dumps(rec))
    with pytest.raises(CheckpointError, match=r"\[run_key\]"):  # its key no longer fits
        recipe.verify_run(run_json.parent, ["verify"], quiet=True)
    forged = tmp_path / "forged" / "run"  # and the key too, under a name that is no key
    shutil.copytree(run_json.parent, forged)
    (forged / "run.json").write_text(json.dumps(forge_record(rec)))
    with pytest.raises(MismatchError, match="verify failed"):
        recipe.verify_run(forged, ["verify"], quiet=True)


def test_verify_retrains_on_the_recorded_device_or_refuses_with_exit_4(tmp_path: Path) -> None:
    """Issue 28: verify always retrained on the CPU. It now retrains on the
    device run.json names, and where this machine lacks it, refuses (exit 4)
    rather than compare other bits; control: a CPU record verifies."""
    from pipeline.core.errors import ProfileError

    prep = recipe.prepare(load_config(None, SHORT), ["train"])
    record = recipe.get_or_train(prep, tmp_path / "runs", quiet=True).record
    assert record is not None and record.device == "cpu"
    assert record.profile["device"] == {"type": "cpu"}
    run_json = tmp_path / "runs" / record.run_key / "run.json"
    recipe.verify_run(run_json.parent, ["verify"], quiet=True)  # control
    rec = json.loads(run_json.read_text())
    rec["device"] = "cuda:7"
    rec["record_sha256"] = record_digest(rec)
    run_json.write_text(json.dumps(rec))
    with pytest.raises(ProfileError, match="trained on 'cuda:7', which this machine lacks") \
            as e:
        recipe.verify_run(run_json.parent, ["verify"], quiet=True)
    assert e.value.exit_code == 4
