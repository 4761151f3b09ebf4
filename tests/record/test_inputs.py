"""Tests for pipeline/record/inputs.py: the run key (the differences between
two records: tests/record/test_diff.py). Reading and writing run directories
(record/runs.py) is exercised by tests/train/test_checkpoint.py (tampered weights),
tests/test_cli.py and the determinism suite; the recipe that calls them by
tests/test_recipe.py."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline import modes
from pipeline.core import _testing
from pipeline.core.config import Config, load_config
from pipeline.record.inputs import RunInputs

BASE: dict[str, Any] = {"data": {"digits": "d" * 64}, "code": "c" * 64,
                        "toolchain": {"torch": "2.13.0"}, "profile": {"name": "p"}}


def _inputs(cfg: Config, switches: dict[str, Any] | None = None, **change: Any) -> RunInputs:
    parts = {**BASE, **change}
    return RunInputs(cfg, parts["data"], parts["code"], parts["toolchain"], parts["profile"],
                     switches=switches or {}, key_fields=modes.of(cfg.mode).key_fields)


def _key(mode: str, **change: Any) -> str:
    return _inputs(load_config(None, [f"mode={mode}"]), **change).key


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
    a, b = _inputs(cfg_a), _inputs(cfg_b)
    assert a.key != b.key and len(a.key) == 64


@pytest.mark.parametrize("override", ["optim.nesterov=true", "optim.clip_norm=1.0",
                                      "optim.schedule=cosine", "optim.warmup_steps=10",
                                      "optim.name=adamw"])
def test_each_optimiser_option_changes_the_key(override: str) -> None:
    """The optimiser options enter the run key in both modes."""
    for mode in ("pinned", "exact"):
        cfg = load_config(None, [f"mode={mode}", override])
        plain = load_config(None, [f"mode={mode}"])
        keys = [_inputs(c).key for c in (cfg, plain)]
        assert keys[0] != keys[1], (mode, override)


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_a_bit_changing_test_switch_changes_the_key_and_is_recorded(mode: str) -> None:
    """Each switch that changes bits (core._testing.keyed) enters the run key and
    the record's fields; none set leaves the key as it was (real runs)."""
    cfg = load_config(None, [f"mode={mode}"])
    plain = _inputs(cfg)
    for sw, threads, world in [(_testing.Switches(no_shard_streams=True), None, 1),
                               (_testing.Switches(skip_rng_restore=frozenset({"numpy"})), None, 1),
                               (_testing.Switches(plain_allreduce=True), None, 2),
                               (_testing.Switches(intraop_threads=True), 7, 1)]:
        keyed = _testing.keyed(sw, threads=threads, world_size=world)
        assert keyed, sw
        switched = _inputs(cfg, keyed)
        assert switched.key != plain.key and switched.fields()["test_switches"] == keyed
    assert "test_switches" not in plain.fields() and "switches" not in plain.keyed()


def test_switches_that_change_nothing_here_are_not_keyed() -> None:
    """The plain all-reduce at world size 1, stock intra-op threads without
    --threads, the kill points and the decode log leave the key alone."""
    sw = _testing.Switches(plain_allreduce=True, intraop_threads=True, kill_at_step=3,
                           decode_log="/tmp/x", sim_isa="avx2")
    assert _testing.keyed(sw, threads=None, world_size=1) == {}
