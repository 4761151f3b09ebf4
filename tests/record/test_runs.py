"""Tests for pipeline/runs.py: the run key, and the differences between two
records. Reading and writing run directories is exercised by
tests/test_checkpoint.py (tampered weights), tests/test_cli.py and the
determinism suite; the recipe that calls them by tests/test_recipe.py."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from pipeline.core.config import load_config
from pipeline.record import runs

BASE: dict[str, Any] = {"data": {"digits": "d" * 64}, "code": "c" * 64,
                        "toolchain": {"torch": "2.13.0"}, "profile": {"name": "p"}}


def _key(mode: str, **change: Any) -> str:
    parts = {**BASE, **change}
    cfg = load_config(None, [f"mode={mode}"])
    return runs.RunInputs(cfg, parts["data"], parts["code"], parts["toolchain"],
                          parts["profile"]).key


@pytest.mark.parametrize("field,value", [("data", {"digits": "e" * 64}), ("code", "0" * 64),
                                         ("toolchain", {"torch": "2.14.1"}),
                                         ("profile", {"name": "q"})])
def test_pinned_key_covers_every_input(field: str, value: Any) -> None:
    """Changing any input of a pinned run changes its key."""
    assert _key("pinned", **{field: value}) != _key("pinned")


@pytest.mark.parametrize("field,value,changes", [("data", {"digits": "e" * 64}, True),
                                                 ("code", "0" * 64, True),
                                                 ("toolchain", {"torch": "2.14.1"}, False),
                                                 ("profile", {"name": "q"}, False)])
def test_exact_key_leaves_out_the_machine(field: str, value: Any, changes: bool) -> None:
    """An exact run's key covers config, data and code, not toolchain or profile."""
    assert (_key("exact", **{field: value}) != _key("exact")) is changes


def test_config_change_changes_the_key() -> None:
    cfg_a, cfg_b = load_config(None, ["seed=0"]), load_config(None, ["seed=1"])
    a = runs.RunInputs(cfg_a, BASE["data"], BASE["code"], BASE["toolchain"], BASE["profile"])
    b = runs.RunInputs(cfg_b, BASE["data"], BASE["code"], BASE["toolchain"], BASE["profile"])
    assert a.key != b.key and len(a.key) == 64


@pytest.mark.parametrize("override", ["optim.nesterov=true", "optim.clip_norm=1.0",
                                      "optim.schedule=cosine", "optim.warmup_steps=10",
                                      "optim.name=adamw"])
def test_each_optimiser_option_changes_the_key(override: str) -> None:
    """The optimiser options enter the run key in both modes."""
    for mode in ("pinned", "exact"):
        cfg = load_config(None, [f"mode={mode}", override])
        plain = load_config(None, [f"mode={mode}"])
        keys = [runs.RunInputs(c, BASE["data"], BASE["code"], BASE["toolchain"],
                               BASE["profile"]).key for c in (cfg, plain)]
        assert keys[0] != keys[1], (mode, override)


def _trail(steps: list[list[bytes]]) -> bytes:
    return b"".join(hashlib.sha1(t).digest()[:8] for step in steps for t in step)


def test_diff_runs_names_the_first_divergent_step_and_tensor() -> None:
    """Trails equal for two steps, then tensor b differs: step 3, tensor b."""
    rec = {"trail": {"tensors": ["a", "b"], "digest_bytes": 8}, "config": {"seed": 0}}
    same = [[b"1", b"2"], [b"3", b"4"]]
    ta = _trail([*same, [b"5", b"6"]])
    tb = _trail([*same, [b"5", b"X"]])
    lines = runs.diff_runs(rec, {**rec, "config": {"seed": 1}}, ta, tb)
    assert lines == ["config.seed: 0 != 1", "trails diverge at step 3 (of 3), first tensor b"]
    assert runs.diff_runs(rec, rec, ta, ta) == ["trails identical for all 3 steps"]


def test_diff_refuses_to_compare_trails_of_two_kinds() -> None:
    """A trail of SHA-1 digests (older runs) and one of sampled fingerprints
    are not compared step by step: the diff says so instead of naming a step."""
    old = {"trail": {"tensors": ["a"], "digest_bytes": 8}, "config": {}}
    new = {"trail": {"tensors": ["a"], "digest_bytes": 8, "kind": "sampled-int64-v1"},
           "config": {}}
    lines = runs.diff_runs(old, new, b"\0" * 8, b"\1" * 8)
    assert lines == ["trails not comparable: fingerprints of kinds sha1-8 and sampled-int64-v1"]
