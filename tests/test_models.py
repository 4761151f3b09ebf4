"""Tests for pipeline/models.py: the built-in factories, loading a user's
factory and loss from the config's directory, their errors (exit 2, nothing
written), the source hash, and modules with buffers (BatchNorm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import models

from .support import cli_main, pipeline_env, run_pipeline

USERNET = '''
import torch
from torch import nn


def small(input_shape, num_classes, width=16):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Dropout(0.2),
                         nn.Linear(width, num_classes))


def batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(),
                         nn.Linear(16, num_classes))


def not_a_module(input_shape, num_classes):
    return 3


def wrong_shape(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 3))


def crashes(input_shape, num_classes):
    return nn.Linear(7, num_classes)  # forward on (N, 1, 8, 8) fails


def squared_error(logits, y):
    one_hot = nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)
    return ((logits - one_hot) ** 2).sum(dim=-1)
'''


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A user's project: usernet.py beside config.toml (the shipped manifest)."""
    d = tmp_path / "proj"
    d.mkdir()
    (d / "usernet.py").write_text(USERNET)
    (d / "broken.py").write_text("import no_such_package_anywhere\n")
    (d / "config.toml").write_text('[model]\nfactory = "usernet:small"\n'
                                   "[train]\nepochs = 1\n")
    return d


@pytest.mark.parametrize(("override", "found"), [
    ("model.factory=nosuchmodule:f", "cannot import module 'nosuchmodule'"),
    ("model.factory=broken:f", "no_such_package_anywhere"),
    ("model.factory=usernet:missing", "has no function 'missing'"),
    ("model.factory=usernet:not_a_module", "expected a torch.nn.Module, found int"),
    ("model.args.depth=3", "unexpected keyword argument 'depth'"),
    ("model.factory=usernet:wrong_shape", "expected logits of shape (2, 10)"),
    ("model.factory=usernet:crashes", "forward on a batch of 2 inputs"),
    ("train.loss=usernet:nothere", "train.loss"),
])
def test_bad_factory_exits_2_naming_it_and_writes_nothing(
        override: str, found: str, project: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An import error, a missing function, a non-Module return value, bad
    arguments or a missing loss: exit 2, the message names the factory or loss,
    and no run directory is written."""
    runs = tmp_path / "runs"
    code = cli_main(["train", str(project / "config.toml"), override, "--runs-dir", str(runs)],
                    monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == 2, err
    assert found in err
    assert not runs.exists() or not [p for p in runs.iterdir() if not p.name.endswith(".lock")]


def test_user_factory_and_loss_train_and_are_recorded(project: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """A user's factory and loss train; run.json names both with their source
    hash, which is the hash of usernet.py."""
    code = cli_main(["train", str(project / "config.toml"), "train.loss=usernet:squared_error",
                     "--runs-dir", str(tmp_path / "runs"), "--json", "--quiet"], monkeypatch,
                    tmp_path)
    out = capsys.readouterr().out
    assert code == 0
    rec = json.loads(out)
    want = models.source_sha256(project / "usernet.py")
    assert rec["model"] == {"factory": "usernet:small", "factory_sha256": want,
                            "loss": "usernet:squared_error", "loss_sha256": want}


def test_buffers_are_saved_and_world_size_above_one_is_refused(project: Path,
                                                                tmp_path: Path) -> None:
    """A BatchNorm model trains in one process and its running statistics are
    part of the weights; with --nproc 2 it is refused (exit 2) before training."""
    env = pipeline_env(tmp_path)
    base = ["train", str(project / "config.toml"), "model.factory=usernet:batchnorm",
            "train.max_steps=4", "--quiet"]
    one = run_pipeline([*base, "--runs-dir", str(tmp_path / "a"), "--json"], env)
    assert one.returncode == 0, one.stderr
    rec = json.loads(one.stdout)
    weights = load_file(str(tmp_path / "a" / rec["run_key"] / "weights.safetensors"))
    assert "2.running_mean" in weights and not torch.all(weights["2.running_mean"] == 0)
    two = run_pipeline([*base, "--runs-dir", str(tmp_path / "b"), "--nproc", "2"], env)
    assert two.returncode == 2, two.stderr[-2000:]
    assert "running_mean" in two.stderr and "--nproc 1" in two.stderr


def test_source_hash_follows_every_line(tmp_path: Path) -> None:
    """The source hash of a module file changes with any line; a package's
    covers every .py file under its directory."""
    f = tmp_path / "m.py"
    f.write_text("x = 1\n")
    a = models.source_sha256(f)
    f.write_text("x = 1\n# comment\n")
    assert models.source_sha256(f) != a
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "deep.py").write_text("y = 2\n")
    b = models.source_sha256(pkg)
    (pkg / "sub" / "deep.py").write_text("y = 3\n")
    assert models.source_sha256(pkg) != b


def test_builtin_factories_name_their_parameters_like_the_spec() -> None:
    """mlp: fc0..fcL; cnn: conv0, conv1, fc0 (the names exact mode uses too)."""
    mlp = models.mlp((1, 8, 8), 10, hidden=[32, 16])
    assert [n for n, _ in mlp.named_parameters()] == [
        "fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    cnn = models.cnn((1, 8, 8), 10)
    assert [n for n, _ in cnn.named_parameters()][::2] == ["conv0.weight", "conv1.weight",
                                                          "fc0.weight"]
    assert cnn(torch.rand(3, 1, 8, 8)).shape == (3, 10)
