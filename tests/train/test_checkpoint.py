"""Tests for pipeline/checkpoint.py (Writer, prune, restore): what a checkpoint
holds, that resuming from one is bitwise, and that a corrupt, foreign or
untrusted one is refused.

These train in this process, unpinned, with one torch thread: each test
compares runs made in the same process, so the profile does not matter.
The kill-and-resume tests across processes are in tests/system/test_resume.py.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save

from pipeline import modes
from pipeline.core import _testing, atomic
from pipeline.core.config import Config, load_config
from pipeline.core.errors import CheckpointError, PipelineError
from pipeline.core.hashing import weights_sha256
from pipeline.data import dataset, manifest
from pipeline.recipe import train_in_process
from pipeline.record import runs
from pipeline.record.inputs import RunInputs
from pipeline.train import checkpoint
from pipeline.train import loop as train_mod

from ..support import ROOT, cli_main

CONFIG = ROOT / "configs" / "digits.toml"
# 22 steps per epoch: checkpoints at 5, 10, 15, 20, 22, 25, ... (not the last step).
PINNED = ["train.epochs=2", "train.checkpoint_every=5", "train.checkpoint_seconds=0"]
EXACT = ["mode=exact", "train.epochs=1", "model.args.hidden=[16]", "train.checkpoint_every=5",
         "train.checkpoint_seconds=0"]
MODES = [pytest.param(PINNED, id="pinned"), pytest.param(EXACT, id="exact")]


class _Marker:
    """Unpickling this creates the file ``path``: the proof that code ran."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> dataset.Dataset:
    cache = tmp_path_factory.mktemp("cache")
    verified = manifest.verify(ROOT / "data-manifest.json", stat_cache_dir=cache)
    return dataset.load(verified, "digits", cache)


# One torch thread, no test switch (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(overrides: list[str]) -> Config:
    return load_config(CONFIG, overrides)


def _train(cfg: Config, ds: dataset.Dataset, ckpt: Path | None,
           key: str = "k") -> train_mod.TrainResult:
    return train_in_process(cfg, ds, run_key=key, ckpt_dir=ckpt, quiet=True)


def _steps(ckpt: Path) -> list[int]:
    return sorted(int(p.name[5:14]) for p in ckpt.glob("ckpt-*.safetensors"))


def _same(a: train_mod.TrainResult, b: train_mod.TrainResult) -> bool:
    return (weights_sha256(a.params) == weights_sha256(b.params) and a.trail == b.trail
            and a.metrics == b.metrics and a.steps == b.steps)


@pytest.fixture(scope="module")
def pinned_run(ds: dataset.Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The short pinned config uninterrupted, and the checkpoint dir of a
    second full run (it keeps its last two checkpoints, at steps 35 and 40)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = _cfg(PINNED)
        ref = _train(cfg, ds, None)
        ckpt = tmp_path_factory.mktemp("pinned") / "ckpt"
        assert _same(_train(cfg, ds, ckpt), ref)
    finally:
        torch.set_num_threads(before)
    return {"cfg": cfg, "ref": ref, "ckpt": ckpt, "ds": ds}


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


# --- contents and format -------------------------------------------------------

def test_checkpoint_holds_every_state_under_named_keys(pinned_run: dict[str, Any]) -> None:
    """A checkpoint is plain safetensors (8-byte header length, JSON header, raw
    bytes): parameters, optimiser state, torch RNG, trail as tensors; step, run
    key, config, Python/NumPy RNG and the dropout counter in the metadata."""
    ckpt = pinned_run["ckpt"]
    assert _steps(ckpt) == [35, 40]
    path = checkpoint.checkpoint_path(ckpt, 40)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    assert set(header["__metadata__"]) == {"meta", "content_sha256"}
    tensors, meta = checkpoint.load_checkpoint(path)
    assert sorted(tensors) == sorted(
        [f"param.{k}" for k in ("fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight")]
        + [f"optim.momentum_buffer.{k}" for k in ("fc0.bias", "fc0.weight", "fc1.bias",
                                                  "fc1.weight")]
        + ["rng.torch_cpu", "trail"])
    assert meta["format"] == checkpoint.FORMAT and meta["run_key"] == "k"
    assert meta["step"] == 40 and meta["config"]["train"]["checkpoint_every"] == 5
    assert set(meta["rng"]) == {"python", "numpy", "dropout_counter"}
    # Pinned modules draw dropout from per-shard streams keyed by the step, not
    # from the counter-based stream (exact mode's): the counter stays 0.
    assert meta["rng"]["dropout_counter"] == 0
    assert tensors["trail"].numel() == 40 * 4 * 8
    assert [m["epoch"] for m in meta["metrics"]] == [1]


def test_content_hash_covers_metadata_and_tensors(tmp_path: Path) -> None:
    """Changing one tensor byte or one metadata character (keeping the file
    well-formed) fails the checkpoint's own hash; a NaN loss round-trips."""
    path = tmp_path / "ckpt-000000001.safetensors"
    checkpoint.save_checkpoint(path, {"a": torch.arange(4.0)}, {"step": 1, "loss": math.nan})
    tensors, meta = checkpoint.load_checkpoint(path)
    assert math.isnan(meta["loss"]) and tensors["a"].tolist() == [0, 1, 2, 3]
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01  # last byte of tensor a
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match="content sha256"):
        checkpoint.load_checkpoint(path)
    raw[-1] ^= 0x01
    i = raw.index(b'\\"step\\": 1')
    raw[i + 10] = ord("2")
    path.write_bytes(raw)
    with pytest.raises(CheckpointError, match=f"{path}.*content sha256"):
        checkpoint.load_checkpoint(path)


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path: Path) -> None:
    """An interruption after the temp file is written, before the rename, leaves
    the old file as it was; the temp file is removed."""
    path = tmp_path / "f"
    atomic.write_bytes(path, b"old")

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic.write_bytes(path, b"new", before_replace=interrupt)
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_prune_keeps_two_and_drops_leftovers(tmp_path: Path) -> None:
    """After saving step 30: the two newest checkpoints up to 30 stay; older ones,
    a killed writer's temp files, and files past 30 (which resume found
    invalid) go."""
    for s in (10, 20, 30, 40):
        checkpoint.checkpoint_path(tmp_path, s).write_bytes(b"x")
    (tmp_path / ".ckpt-000000040.safetensors.abc123.tmp").write_bytes(b"half")
    checkpoint.prune(tmp_path, 30, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ckpt-000000020.safetensors", "ckpt-000000030.safetensors"]


# --- resume --------------------------------------------------------------------

@pytest.mark.parametrize("overrides", MODES)
def test_resume_is_bitwise(overrides: list[str], ds: dataset.Dataset, tmp_path: Path,
                           capfd: pytest.CaptureFixture[str]) -> None:
    """Resuming from the newest checkpoint, and from an older one, gives the
    uninterrupted run's weights, trail and metrics, bit for bit."""
    cfg = _cfg(overrides)
    ref = _train(cfg, ds, None)
    ckpt = tmp_path / "ckpt"
    first = _train(cfg, ds, ckpt)
    assert _same(first, ref) and first.resumed_from == 0
    newest, older = _steps(ckpt)[-1], _steps(ckpt)[0]
    again = _train(cfg, ds, ckpt)
    assert again.resumed_from == newest and _same(again, ref)
    checkpoint.checkpoint_path(ckpt, newest).unlink()
    from_older = _train(cfg, ds, ckpt)
    assert from_older.resumed_from == older and _same(from_older, ref)
    assert f"resuming from ckpt-{older:09d}.safetensors" in capfd.readouterr().err


@pytest.mark.parametrize(("overrides", "skip", "no_streams", "differs"), [
    pytest.param(EXACT, "dropout", False, True, id="exact-dropout"),
    pytest.param(EXACT, "python,numpy,torch_cpu", False, False, id="exact-globals"),
    pytest.param(PINNED, "dropout,python,numpy,torch_cpu", False, False, id="pinned-all"),
    pytest.param(PINNED, "torch_cpu", True, True, id="pinned-no-streams-torch"),
])
def test_rng_restore_control(overrides: list[str], skip: str, no_streams: bool, differs: bool,
                             ds: dataset.Dataset, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The resume tests can fail. Exact mode: skipping the dropout stream's
    restore changes the weights; the global Python, NumPy and torch generators
    do not feed training after init, so skipping those changes nothing.
    Pinned mode: each shard's draws come from a stream keyed by (seed, step,
    shard), so no restore matters; with those streams disabled (the control)
    the module draws from torch's global generator, and skipping its restore
    changes the weights."""
    cfg = _cfg(overrides)
    switches = _testing.Switches(no_shard_streams=no_streams)
    monkeypatch.setattr(_testing, "SWITCHES", switches)
    ref = _train(cfg, ds, None)
    ckpt = tmp_path / "ckpt"
    _train(cfg, ds, ckpt)
    newest = _steps(ckpt)[-1]
    checkpoint.checkpoint_path(ckpt, newest).unlink()  # resume from the one before
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(
        skip_rng_restore=frozenset(skip.split(",")), no_shard_streams=no_streams))
    resumed = _train(cfg, ds, ckpt)
    assert 0 < resumed.resumed_from < newest
    same = weights_sha256(resumed.params) == weights_sha256(ref.params)
    assert same is not differs


@pytest.mark.parametrize("damage", ["flip", "truncate", "pickle", "empty"])
def test_corrupt_newest_falls_back(damage: str, pinned_run: dict[str, Any], tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A newest checkpoint that fails its hash, is truncated, is a pickle or is
    empty is reported (naming the file) and the previous one is used; the run
    still ends bitwise equal. Loading the pickle runs no code from it."""
    ckpt = _copy(pinned_run["ckpt"], tmp_path / "ckpt")
    newest = checkpoint.checkpoint_path(ckpt, 40)
    raw = bytearray(newest.read_bytes())
    marker = tmp_path / "unpickled"
    if damage == "flip":
        raw[len(raw) // 2] ^= 0x40
    elif damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "pickle":
        raw = bytearray(pickle.dumps(_Marker(marker)))
    else:
        raw = bytearray()
    newest.write_bytes(raw)
    resumed = _train(pinned_run["cfg"], pinned_run["ds"], ckpt)
    err = capfd.readouterr().err
    assert f"skipping corrupt checkpoint: {newest}" in err
    assert resumed.resumed_from == 35
    assert _same(resumed, pinned_run["ref"])
    assert not marker.exists()


def test_pickle_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    """load_checkpoint on pickle bytes (torch.save or pickle.dumps) raises
    CheckpointError (exit 5) naming the file; nothing is unpickled."""
    marker = tmp_path / "unpickled"
    for i, writer in enumerate([lambda p: p.write_bytes(pickle.dumps(_Marker(marker))),
                                lambda p: torch.save({"x": _Marker(marker)}, p)]):
        path = tmp_path / f"ckpt-00000000{i}.safetensors"
        writer(path)
        with pytest.raises(CheckpointError, match=str(path)) as e:
            checkpoint.load_checkpoint(path)
        assert e.value.exit_code == 5
    assert not marker.exists()


def _retamper(path: Path, edit: Any) -> None:
    """Rewrite a checkpoint after ``edit(tensors, meta)``, with a valid hash."""
    tensors, meta = checkpoint.load_checkpoint(path)
    meta.pop("format")
    edit(tensors, meta)
    checkpoint.save_checkpoint(path, tensors, meta)


_TAMPER = {
    "run key": lambda t, m: m.update(run_key="other"),
    "config": lambda t, m: m["config"]["optim"].update(lr=0.2),
    "param shape": lambda t, m: t.update({"param.fc0.bias": torch.zeros(129)}),
    "param dtype": lambda t, m: t.update({"param.fc0.bias": t["param.fc0.bias"].double()}),
    "extra param": lambda t, m: t.update({"param.fc9.bias": torch.zeros(3)}),
    "missing param": lambda t, m: t.pop("param.fc1.bias"),
    "optim shape": lambda t, m: t.update({"optim.momentum_buffer.fc0.bias": torch.zeros(1)}),
    "optim dtype": lambda t, m: t.update(
        {"optim.momentum_buffer.fc0.bias": t["optim.momentum_buffer.fc0.bias"].double()}),
    "missing optim": lambda t, m: t.pop("optim.momentum_buffer.fc0.bias"),
    "extra key": lambda t, m: t.update({"rng.other": torch.zeros(3)}),
    "missing trail": lambda t, m: t.pop("trail"),
    "short trail": lambda t, m: t.update(trail=t["trail"][:-8]),
    "rng state": lambda t, m: t.update({"rng.torch_cpu": torch.zeros(7, dtype=torch.uint8)}),
    "python rng": lambda t, m: m["rng"]["python"].update(state=[1, 2]),
    "counter type": lambda t, m: m["rng"].update(dropout_counter=1.5),
    "step type": lambda t, m: m.update(step="40"),
}


@pytest.mark.parametrize("what", list(_TAMPER))
def test_valid_hash_wrong_content_raises(what: str, pinned_run: dict[str, Any],
                                         tmp_path: Path) -> None:
    """A checkpoint whose own hash holds but which belongs to another run or
    config, or has a tensor of the wrong shape or dtype, an extra or missing
    key or malformed RNG state, raises CheckpointError (exit 5) naming the
    file: it is never skipped, never half-applied silently."""
    ckpt = _copy(pinned_run["ckpt"], tmp_path / "ckpt")
    newest = checkpoint.checkpoint_path(ckpt, 40)
    _retamper(newest, _TAMPER[what])
    with pytest.raises(CheckpointError, match=str(newest)) as e:
        _train(pinned_run["cfg"], pinned_run["ds"], ckpt)
    assert e.value.exit_code == 5


# --- weights files read by verify / golden check / diff ---------------------------

@pytest.fixture(scope="module")
def run_dir(pinned_run: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete run directory of the short pinned config (written in-process)."""
    inputs = RunInputs(pinned_run["cfg"], {"digits": "x"}, "code", {}, {"name": "t"},
                       key_fields=modes.PINNED.key_fields)
    final = tmp_path_factory.mktemp("runs") / inputs.key
    runs.write_run(final, inputs, pinned_run["ref"], 0.0, device="cpu", world_size=1,
                   config_dir=None)
    return final


def _tampered(run_dir: Path, tmp: Path, how: str, marker: Path) -> Path:
    d = _copy(run_dir, tmp / "run")
    w = d / "weights.safetensors"
    tensors, _ = checkpoint.read_safetensors(w)
    if how == "pickle":
        w.write_bytes(pickle.dumps(_Marker(marker)))
        return d
    if how == "shape":
        tensors["fc0.bias"] = torch.zeros(129)
    elif how == "dtype":
        tensors["fc0.bias"] = tensors["fc0.bias"].double()
    elif how == "extra key":
        tensors["fc9.bias"] = torch.zeros(3)
    else:
        tensors.pop("fc1.bias")
    w.write_bytes(save(tensors))
    return d


@pytest.mark.parametrize("how", ["pickle", "shape", "dtype", "extra key", "missing key"])
@pytest.mark.parametrize("command", ["verify", "golden check", "diff"])
def test_tampered_weights_are_refused(command: str, how: str, run_dir: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """`verify`, `golden check` and `diff` on a run whose weights.safetensors was
    replaced (a pickle, a wrong shape or dtype, an extra or missing tensor)
    fail with an error naming that file, before any training; nothing from
    the file is executed."""
    marker = tmp_path / "unpickled"
    bad = _tampered(run_dir, tmp_path, how, marker)
    argv = {"verify": ["verify", str(bad)],
            "golden check": ["golden", "check", str(bad), "--file", str(tmp_path / "g.json")],
            "diff": ["diff", str(run_dir), str(bad)]}[command]
    # Unpinned: no re-exec of the test process, should a tampered run ever get past read_run.
    code = cli_main(argv, monkeypatch)
    err = capsys.readouterr().err
    assert code != 0 and f"{bad}/weights.safetensors" in err, err
    assert not marker.exists()
    if how == "pickle":
        assert code == 5


def test_tampered_weights_exit_5(run_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A readable weights file that is not the recorded one (wrong shape) is a
    bad weights file: exit 5, like an unreadable one."""
    bad = _tampered(run_dir, tmp_path, "shape", tmp_path / "m")
    assert cli_main(["verify", str(bad)], monkeypatch) == 5


def test_read_run_refuses_pickled_weights(run_dir: Path, tmp_path: Path) -> None:
    """runs.read_run on a pickled weights file raises CheckpointError naming it."""
    marker = tmp_path / "unpickled"
    bad = _tampered(run_dir, tmp_path, "pickle", marker)
    with pytest.raises(PipelineError, match=f"{bad}/weights.safetensors") as e:
        runs.read_run(bad)
    assert isinstance(e.value, CheckpointError) and not marker.exists()


def test_checkpoint_policy_interval_epoch_ends_and_minimum_spacing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint at a multiple of checkpoint_every or an epoch end, once
    checkpoint_seconds have passed since the last (the default: 60 s); 0
    seconds: every such point."""
    import dataclasses

    from pipeline.core.config import Config
    from pipeline.train import loop as train_mod

    now = [1000.0]
    monkeypatch.setattr(train_mod.time, "monotonic", lambda: now[0])
    cfg = Config()
    assert cfg.train.checkpoint_seconds == 60.0 and cfg.train.checkpoint_every == 100
    due = train_mod._checkpoint_due
    assert not due(cfg, 100, 22, last_save=999.0)            # 1 s after the last
    assert due(cfg, 100, 22, last_save=940.0)                # 60 s after
    assert due(cfg, 110, 22, last_save=900.0)                # an epoch end (5 x 22)
    assert not due(cfg, 101, 22, last_save=0.0)              # neither
    eager = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                               checkpoint_seconds=0.0))
    assert due(eager, 100, 22, last_save=now[0]) and due(eager, 22, 22, last_save=now[0])
    never_by_steps = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, checkpoint_every=0, checkpoint_seconds=0.0))
    assert due(never_by_steps, 44, 22, 0.0) and not due(never_by_steps, 100, 22, 0.0)
