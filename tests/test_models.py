"""Tests for pipeline/models.py and pipeline/core/usercode.py: the built-in
factories, loading a user's factory and loss from the config's directory,
their errors (exit 2, nothing written, at any step, sys.exit included), the
hash of the user modules they run (whatever their package form, from any
directory), and modules with buffers (BatchNorm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import models
from pipeline.core import usercode

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


def exits(input_shape, num_classes):
    raise SystemExit(0)


def recurses(input_shape, num_classes):
    return recurses(input_shape, num_classes)


class _FailsLater(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(64, 10), 0

    def forward(self, x):
        self.calls += 1
        if self.training and self.calls == 20:  # the model check is call 1; 8 shards a step
            raise RuntimeError("boom in the third step")
        return self.fc(x.flatten(1))


def fails_later(input_shape, num_classes):
    return _FailsLater()


def nan_loss(logits, y):
    return logits.sum(dim=-1) * float("nan")


def mean_loss(logits, y):  # reduction="mean": one number, not one per example
    return nn.functional.cross_entropy(logits, y)


def as_float(logits, y):
    return 1.5


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
    (d / "exits_on_import.py").write_text("import sys\nsys.exit(3)\n")
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
    ("model.factory=usernet:exits", "called sys.exit(0)"),
    ("model.factory=usernet:recurses", "RecursionError"),
    ("model.factory=exits_on_import:f", "called sys.exit(3)"),
    ("model.factory=usernet:fails_later", "a training step at step 3 raised RuntimeError: boom"),
    ("train.loss=usernet:mean_loss", "train.loss: expected one loss per target, shape (2,) "
                                     "(unreduced"),
    ("train.loss=usernet:as_float", "found float"),
])
def test_bad_factory_exits_2_naming_it_and_writes_nothing(
        override: str, found: str, project: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """An import error, a missing function, a non-Module return value, bad
    arguments, a missing loss, user code calling sys.exit (at import or in the
    factory), recursing, or failing in a later training step: exit 2 (never
    the code it exited with, never 70), the message names the factory or loss
    (and the step), and no run directory is written."""
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
    want = usercode.modules_sha256({"usernet": project / "usernet.py"})
    assert rec["model"] == {"factory": "usernet:small", "factory_sha256": want,
                            "loss": "usernet:squared_error", "loss_sha256": want,
                            "modules": ["usernet"]}


@pytest.mark.process
def test_buffers_are_saved_and_every_world_size_agrees(project: Path, tmp_path: Path) -> None:
    """A BatchNorm model's running statistics are part of the weights, and
    --nproc 2 gives the same weights (per-shard statistics, combined in the
    fixed tree: issue 21; it used to be refused)."""
    env = pipeline_env(tmp_path)
    base = ["train", str(project / "config.toml"), "model.factory=usernet:batchnorm",
            "train.max_steps=4", "--quiet", "--json"]
    one = run_pipeline([*base, "--runs-dir", str(tmp_path / "a")], env)
    assert one.returncode == 0, one.stderr
    rec = json.loads(one.stdout)
    weights = load_file(str(tmp_path / "a" / rec["run_key"] / "weights.safetensors"))
    assert "2.running_mean" in weights and not torch.all(weights["2.running_mean"] == 0)
    two = run_pipeline([*base, "--runs-dir", str(tmp_path / "b"), "--nproc", "2"], env)
    assert two.returncode == 0, two.stderr[-2000:]
    assert json.loads(two.stdout)["weights_sha256"] == rec["weights_sha256"]


def test_module_hash_follows_every_line_and_module(tmp_path: Path) -> None:
    """The hash of a set of modules changes with any line of any of them, and
    with their names; it does not depend on where the files are."""
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "m.py").write_text("x = 1\n")
    h = usercode.modules_sha256({"m": a / "m.py"})
    assert usercode.modules_sha256({"m": b / "m.py"}) == h  # the same source elsewhere
    assert usercode.modules_sha256({"n": a / "m.py"}) != h
    (a / "m.py").write_text("x = 1\n# comment\n")
    assert usercode.modules_sha256({"m": a / "m.py"}) != h


def test_builtin_factories_name_their_parameters_like_the_spec() -> None:
    """mlp: fc0..fcL; cnn: conv0, conv1, fc0 (the names exact mode uses too)."""
    mlp = models.mlp((1, 8, 8), 10, hidden=[32, 16])
    assert [n for n, _ in mlp.named_parameters()] == [
        "fc0.weight", "fc0.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    cnn = models.cnn((1, 8, 8), 10)
    assert [n for n, _ in cnn.named_parameters()][::2] == ["conv0.weight", "conv1.weight",
                                                          "fc0.weight"]
    assert cnn(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_a_run_that_diverges_stops_with_exit_7_and_records_nothing(
        project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 27: NaN weights were recorded with exit 0 (and run.json held a
    bare NaN). A non-finite loss stops the run: exit 7, the step named, no
    run directory."""
    runs = tmp_path / "runs"
    code = cli_main(["train", str(project / "config.toml"), "train.loss=usernet:nan_loss",
                     "--runs-dir", str(runs), "--quiet"], monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == 7 and "diverged at step 1" in err, err
    assert not [p for p in runs.iterdir() if not p.name.startswith(".")]


def test_non_finite_weights_are_divergence() -> None:
    """The weight check names the first parameter holding NaN or inf; finite
    weights and integer buffers pass (the control)."""
    from types import SimpleNamespace

    from pipeline.core.errors import DivergedError
    from pipeline.train.loop import _check_finite

    ok = SimpleNamespace(params={"w": torch.ones(3)}, buffers={"n": torch.tensor(3)})
    _check_finite(ok, 5)  # type: ignore[arg-type]
    bad = SimpleNamespace(params={"w": torch.tensor([1.0, float("inf")])}, buffers={})
    with pytest.raises(DivergedError, match="step 5: w is not finite"):
        _check_finite(bad, 5)  # type: ignore[arg-type]


_NS_NET = '''
from torch import nn
from mymodel.layers import block


def build(input_shape, num_classes):
    from mymodel import head  # imported only when the factory runs
    return nn.Sequential(nn.Flatten(), block(64, 16), head.make(16, num_classes))
'''


def _ns_project(root: Path) -> Path:
    """A project whose model is a namespace package (no __init__.py): the
    factory's module imports one sibling at import time and one inside the
    factory."""
    pkg = root / "mymodel"
    pkg.mkdir(parents=True)
    (pkg / "net.py").write_text(_NS_NET)
    (pkg / "layers.py").write_text("from torch import nn\n\n\ndef block(a, b):\n"
                                   "    return nn.Sequential(nn.Linear(a, b), nn.ReLU())\n")
    (pkg / "head.py").write_text("from torch import nn\n\n\ndef make(a, b):\n"
                                 "    return nn.Linear(a, b)\n")
    (root / "config.toml").write_text('[model]\nfactory = "mymodel.net:build"\n'
                                      "[train]\nmax_steps = 2\n")
    return root


@pytest.mark.process
def test_a_namespace_package_model_is_keyed_by_what_it_imports(tmp_path: Path) -> None:
    """Issue 27: a factory in a directory without __init__.py had no __file__,
    so the key hashed the working directory's .py files: an edited model was
    served as "reused (memoised)", and one project had other keys from other
    directories. Now: one key from two working directories, and an edit to a
    module imported at import time, or only inside the factory, is a new run."""
    proj = _ns_project(tmp_path / "proj")
    env = pipeline_env(tmp_path)
    runs = tmp_path / "runs"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def train(cwd: Path) -> dict[str, object]:
        p = run_pipeline(["train", str(proj / "config.toml"), "--runs-dir", str(runs),
                          "--json", "--quiet"], env, cwd=cwd)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout)

    first = train(proj)
    assert first["model"]["modules"] == ["mymodel.head", "mymodel.layers", "mymodel.net"]
    assert train(elsewhere)["run_key"] == first["run_key"]  # the same inputs, one key
    for module in ("layers.py", "head.py"):
        f = proj / "mymodel" / module
        f.write_text(f.read_text() + "# edited\n")
        again = train(elsewhere)
        assert again["run_key"] != first["run_key"], module
        first = again


def test_a_namesake_module_of_another_project_is_not_reused(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Two projects with a model.py in one process (two pipeline.load calls, or
    in-process runs): the second project's own file is imported, not the first
    one's cached module (it was: "module 'model' (.../examples/charlm/model.py)
    has no function 'small_cnn'"). Control: the same project's module is reused."""
    import sys

    a, b = tmp_path / "a", tmp_path / "b"
    for d, fn in ((a, "first"), (b, "second")):
        d.mkdir()
        (d / "model.py").write_text(f"def {fn}(input_shape, num_classes):\n    return None\n")
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "model", raising=False)
    first = models.load("model:first", a)
    assert models.load("model:second", b).function.__module__ == "model"
    assert sys.modules["model"].__file__ == str(b / "model.py")
    again = models.load("model:second", b)  # no re-import for the same file
    assert again.function is models.load("model:second", b).function
    assert first.function.__name__ == "first"
    sys.modules.pop("model", None)
