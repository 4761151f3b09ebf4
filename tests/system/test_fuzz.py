"""Issue 13's fuzz test (Hypothesis): configs, manifests, run records and
checkpoint metadata drawn at random, through the CLI in this process (the
no-pinning control, as tests/test_recipe.py) and the checkpoint reader.

Properties: only documented exit codes, no traceback, nothing half-written.
Bounded and reproducible: ``derandomize=True`` (examples derived from the
test itself, so CI sees the same ones), few examples, no deadline (the
machine is shared), no example database.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import cli
from pipeline.core.errors import CheckpointError, ConfigError
from pipeline.record.schema import record_digest
from pipeline.train import checkpoint

from ..support import unpin
from ..support.data import make_manifest

DOCUMENTED = {0, 1, 2, 3, 4, 5, 6, 70, 74, 130}
TINY = ["train.epochs=1", "model.args.hidden=[16]"]
FUZZ = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda kids: st.one_of(
    st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=8), kids, max_size=4)),
    max_leaves=12)
KEYS = ["seed", "mode", "data.dataset", "data.test_fraction", "data.context", "model.factory",
        "model.args", "model.args.hidden", "model.args.dropout", "train.epochs",
        "train.max_steps", "train.batch_size", "train.shards", "train.loss",
        "train.checkpoint_every", "optim.name", "optim.lr", "optim.momentum", "colour",
        "train", "model.args.hidden.x"]


@pytest.fixture(autouse=True)
def unpinned(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    unpin(monkeypatch, tmp_path)


def _main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code in DOCUMENTED, (code, err)
    assert "Traceback" not in err, err
    return code, err


def _no_leftovers(d: Path) -> None:
    """Nothing half-written: no temporary run directory or temp file."""
    if d.exists():
        assert not [p for p in d.rglob("*") if p.name.startswith(".tmp-")
                    or p.name.endswith(".tmp")]


def _toml_value(v: Any) -> str | None:
    """v as a TOML value, or None where TOML has none (null, nested nulls)."""
    try:
        text = tomllib.loads("v = " + json.dumps(v))  # JSON scalars/arrays are mostly TOML
        return json.dumps(v) if "v" in text else None
    except (tomllib.TOMLDecodeError, ValueError, TypeError):
        return None


@FUZZ
@given(st.dictionaries(st.sampled_from(KEYS), json_values, max_size=4),
       st.binary(max_size=64))
def test_fuzzed_configs_are_config_errors_or_valid(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], values: dict[str, Any],
        junk: bytes) -> None:
    """A config file of random keys and values, or random bytes: `train`
    either trains it (one small epoch: the overrides) or refuses it with
    exit 2; nothing else, and nothing half-written."""
    lines = [f"{k} = {t}" for k, v in values.items() if (t := _toml_value(v)) is not None]
    for i, text in enumerate(["\n".join(lines).encode(), junk]):
        cfg = tmp_path / f"c{i}.toml"
        cfg.write_bytes(text)
        rd = tmp_path / "runs"
        rd.mkdir(exist_ok=True)
        code, err = _main(capsys, ["train", str(cfg), *TINY, "model.args.hidden=[4]",
                                   "train.checkpoint_every=0", "--runs-dir", str(rd),
                                   "--quiet"])
        assert code in (0, 2), err
        _no_leftovers(rd)


@FUZZ
@given(st.sampled_from(["path", "sha256", "size", "rows", "format", "extra", "version",
                        "files", "name"]), json_values)
def test_fuzzed_manifests_are_data_errors_or_valid(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        field: str, value: Any) -> None:
    """A manifest with one field replaced by a random JSON value: `data verify`
    exits 0 or 3."""
    base = make_manifest(tmp_path_factory.mktemp("m"))
    raw = json.loads(base.read_text())
    if field in ("version", "files"):
        raw[field] = value
    elif field == "name":
        raw["files"] = {str(value)[:20]: raw["files"]["digits"]}
    else:
        raw["files"]["digits"][field] = value
    base.write_text(json.dumps(raw))
    code, err = _main(capsys, ["data", "verify", "--manifest", str(base)])
    assert code in (0, 3), err


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run, trained in this process (no pinning), for the record fuzzers."""
    mp = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp("trained")
    unpin(mp, tmp)
    try:
        assert cli.main(["train", *TINY, "train.checkpoint_every=5",
                         "train.checkpoint_seconds=0", "--runs-dir",
                         str(tmp / "runs"), "--quiet"]) == 0
    finally:
        mp.undo()
    (run,) = [p for p in (tmp / "runs").iterdir() if not p.name.startswith(".")]
    return run


@FUZZ
@given(st.sampled_from(["run_key", "config", "data", "data_decoded", "code_sha256",
                        "metrics", "weights_sha256", "weights_layout", "trail", "mode",
                        "toolchain", "profile", "key_inputs"]),
       json_values, st.booleans(), st.binary(max_size=32))
def test_fuzzed_run_records_are_refused_never_crash(
        tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str],
        trained: Path, field: str, value: Any, redigest: bool, junk: bytes) -> None:
    """run.json with one field replaced (its digest recomputed or not), or
    random bytes: `runs`, `diff`, `golden check` and `train` (reuse) give
    documented codes; train never reuses a changed record (exit 5) unless
    the change is no change."""
    tmp = tmp_path_factory.mktemp("rec")
    rd = tmp / "runs"
    run = rd / trained.name
    shutil.copytree(trained, run)
    shutil.copytree(trained.parent.parent / "cache", tmp / "cache")
    rec = json.loads((run / "run.json").read_text())
    same = rec.get(field) == value
    rec[field] = value
    if redigest:
        rec["record_sha256"] = record_digest(rec)
    (run / "run.json").write_text(json.dumps(rec))
    for text in (None, junk):
        if text is not None:
            (run / "run.json").write_bytes(text)
            same = False
        _main(capsys, ["runs", "--runs-dir", str(rd)])
        _main(capsys, ["diff", str(run), str(trained)])
        _main(capsys, ["golden", "check", str(run), "--file", str(tmp / "g.json")])
        code, err = _main(capsys, ["train", *TINY, "train.checkpoint_every=5",
                                   "train.checkpoint_seconds=0", "--runs-dir",
                                   str(rd), "--quiet"])
        assert code == (0 if same else 5), err
        _no_leftovers(rd)


@FUZZ
@given(st.sampled_from(["run_key", "config", "step", "loss_sum", "metrics", "rng",
                        "optim_scalars", "format"]), json_values)
def test_fuzzed_checkpoint_metadata_restores_or_raises_checkpoint_error(
        tmp_path_factory: pytest.TempPathFactory, trained: Path, field: str,
        value: Any) -> None:
    """A checkpoint whose metadata field is replaced by a random JSON value
    (its content hash recomputed, so it passes as intact) is refused with
    CheckpointError or restored; never another exception."""
    from pipeline.core.config import config_from_dict
    from pipeline.core.rng import DropoutStream
    from pipeline.data.dataset import load
    from pipeline.data.manifest import default_cache_dir, verify
    from pipeline.modes import of
    from pipeline.recipe import manifest_path

    rec = json.loads((trained / "run.json").read_text())
    cfg = config_from_dict(rec["config"], "run.json")
    tensors, meta = _a_checkpoint(trained, cfg, rec["run_key"])
    meta[field] = value
    ck = tmp_path_factory.mktemp("ck")
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(ck, 5), tensors, meta)
    import torch

    from pipeline.models import resolve
    ds = load(verify(manifest_path()), cfg.data.dataset, default_cache_dir())
    parts = resolve(cfg.model.factory, cfg.train.loss, None)
    net = of(cfg.mode).make_net(cfg, ds, torch.device("cpu"), parts)
    opt = of(cfg.mode).make_optimizer(cfg, net, 10)
    try:
        checkpoint.restore(ck, rec["run_key"], cfg, net, opt, DropoutStream(cfg.seed),
                           checkpoint.Progress())
    except (CheckpointError, ConfigError):
        pass


def _a_checkpoint(run: Path, cfg: Any, key: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A real checkpoint of the trained run's config at step 5 (trained here once)."""
    ck = run.parent.parent / "ck-ref"
    if not list(ck.glob("ckpt-*")):
        from pipeline.data.dataset import load
        from pipeline.data.manifest import default_cache_dir, verify
        from pipeline.recipe import manifest_path, train_in_process
        ds = load(verify(manifest_path()), cfg.data.dataset, default_cache_dir())
        train_in_process(cfg, ds, run_key=key, ckpt_dir=ck, quiet=True)
    found = checkpoint.latest_valid(ck)
    assert found is not None
    return dict(found[1]), dict(found[2])
