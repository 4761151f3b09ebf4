"""Issue 21: the features real models have, trained as written in both modes
at world sizes 1 and 2 and --threads 1 and 2 with one hash per mode, or
refused before (or, where only a step can tell, at) training with exit 2
naming the module path: tied, frozen and unused parameters, forward hooks,
BatchNorm (running statistics per shard, combined in the fixed tree),
parametrizations; each with a control that fails if the feature were
ignored (an untied copy, a frozen layer that moves, a hook that does not run,
a skipped parameter that moves)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from ..support import pipeline_env, run_pipeline

pytestmark = pytest.mark.process

FEATS = '''
import torch
from torch import nn


class Tied(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.b = nn.Linear(64, 64)
        self.b.weight = self.a.weight          # one tensor, two layers
        self.head = nn.Linear(64, n)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x.flatten(1))))))


def tied(input_shape, num_classes):
    return Tied(num_classes)


class Spare(nn.Sequential):
    """The plain net, and a head its forward never uses."""

    def __init__(self, body, n):
        super().__init__(*body)
        self.spare = nn.Linear(32, n)

    def forward(self, x):
        for layer in list(self)[:4]:
            x = layer(x)
        return x


def plain(input_shape, num_classes, hook=False, freeze=False, spare=False):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, num_classes))
    if freeze:
        m[1].requires_grad_(False)
    if hook:  # zeroes the first layer's output: the model can only guess
        m[1].register_forward_hook(lambda mod, inp, out: out * 0)
    return Spare(m, num_classes) if spare else m


def batchnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(),
                         nn.Linear(32, num_classes))


def specnorm(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(),
                         nn.utils.parametrizations.spectral_norm(nn.Linear(64, 32)),
                         nn.ReLU(), nn.Linear(32, num_classes))
'''
STEPS = 12


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("features")
    (d / "feats.py").write_text(FEATS)
    (d / "config.toml").write_text(f'[model]\nfactory = "feats:plain"\n'
                                   f"[train]\nmax_steps = {STEPS}\n")
    return d


def _train(project: Path, tmp: Path, *args: str, ok: bool = True) -> Any:
    p = run_pipeline(["train", str(project / "config.toml"), *args, "--runs-dir",
                      str(tmp / "runs"), "--json", "--quiet"], pipeline_env(tmp), cwd=project)
    if not ok:
        return p
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(p.stdout)
    rec["weights"] = load_file(str(tmp / "runs" / rec["run_key"] / "weights.safetensors"))
    return rec


def _one_hash(project: Path, tmp: Path, *args: str) -> dict[str, Any]:
    """The run at world size 1, 1 thread; the same hash at 2 threads and at 2 processes."""
    one = _train(project, tmp / "1", *args, "--threads", "1")
    for extra, where in ((["--threads", "2"], "2t"), (["--nproc", "2"], "2p")):
        assert _train(project, tmp / where, *args, *extra)["weights_sha256"] == \
            one["weights_sha256"], (args, extra)
    return one


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_tied_parameters_are_one_tensor(project: Path, tmp_path: Path, mode: str) -> None:
    """Saved once under the first name, recorded as tied; control: an untied
    copy would be a second tensor in the weights file."""
    rec = _one_hash(project, tmp_path, "model.factory=feats:tied", f"mode={mode}")
    assert rec["parameters"]["tied"] == {"b.weight": "a.weight"}
    assert "a.weight" in rec["weights"] and "b.weight" not in rec["weights"]
    assert "b.bias" in rec["weights"]  # the layer's own bias is its own


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_frozen_parameters_never_move(project: Path, tmp_path: Path, mode: str) -> None:
    """The frozen layer holds the same values after 1 and after 12 steps, and
    run.json names it; control: unfrozen, the same layer moves."""
    rec = _one_hash(project, tmp_path, "model.args.freeze=true", f"mode={mode}")
    assert rec["parameters"]["frozen"] == ["1.bias", "1.weight"]
    early = _train(project, tmp_path / "early", "model.args.freeze=true", f"mode={mode}",
                   "train.max_steps=1")
    assert torch.equal(rec["weights"]["1.weight"], early["weights"]["1.weight"])
    assert not torch.equal(rec["weights"]["3.weight"], early["weights"]["3.weight"])
    moving = _train(project, tmp_path / "moving", f"mode={mode}")
    moving_early = _train(project, tmp_path / "moving-early", f"mode={mode}",
                          "train.max_steps=1")
    assert not torch.equal(moving["weights"]["1.weight"], moving_early["weights"]["1.weight"])


@pytest.mark.parametrize("mode", ["pinned", "exact"])
def test_forward_hooks_run(project: Path, tmp_path: Path, mode: str) -> None:
    """A hook that zeroes the first layer's output leaves the model guessing
    (accuracy near 1/10); control: without it the model learns."""
    hooked = _one_hash(project, tmp_path, "model.args.hook=true", f"mode={mode}",
                       "train.max_steps=0", "train.epochs=2")
    plain = _train(project, tmp_path / "plain", f"mode={mode}", "train.max_steps=0",
                   "train.epochs=2")
    assert hooked["metrics"]["test_accuracy"] < 0.3 < 0.6 < plain["metrics"]["test_accuracy"]


def test_a_parameter_no_shard_uses_is_skipped_as_torch_skips_it(project: Path,
                                                               tmp_path: Path) -> None:
    """Pinned mode: the unused head keeps its initial values (and the run
    trains, at every world size); control: the used layers move."""
    rec = _one_hash(project, tmp_path, "model.args.spare=true")
    early = _train(project, tmp_path / "early", "model.args.spare=true", "train.max_steps=1")
    assert torch.equal(rec["weights"]["spare.weight"], early["weights"]["spare.weight"])
    assert not torch.equal(rec["weights"]["3.weight"], early["weights"]["3.weight"])


def test_exact_mode_refuses_an_unused_parameter_naming_it_and_the_step(
        project: Path, tmp_path: Path) -> None:
    """Exact mode's update has no skip: exit 2 naming the parameter and the
    step, no run directory."""
    p = _train(project, tmp_path, "model.args.spare=true", "mode=exact", ok=False)
    assert p.returncode == 2 and "spare.weight" in p.stderr and "step 1" in p.stderr
    assert not [d for d in (tmp_path / "runs").iterdir() if not d.name.startswith(".")]


def test_batchnorm_statistics_are_per_shard_and_world_size_free(project: Path,
                                                               tmp_path: Path) -> None:
    """Pinned mode: one hash (weights and running statistics) at world sizes
    1 and 2 and 1 and 2 threads; the statistics moved and are recorded as
    buffers."""
    rec = _one_hash(project, tmp_path, "model.factory=feats:batchnorm")
    assert rec["parameters"]["buffers"] == ["2.num_batches_tracked", "2.running_mean",
                                            "2.running_var"]
    assert int(rec["weights"]["2.num_batches_tracked"]) == STEPS
    assert not torch.equal(rec["weights"]["2.running_mean"], torch.zeros(32))


def test_a_parametrization_trains_pinned_and_is_refused_exact(project: Path,
                                                             tmp_path: Path) -> None:
    """spectral_norm: pinned mode trains it with one hash at every world size;
    exact mode refuses it by path before training (exit 2, not 70)."""
    _one_hash(project, tmp_path, "model.factory=feats:specnorm")
    p = _train(project, tmp_path / "x", "model.factory=feats:specnorm", "mode=exact", ok=False)
    assert p.returncode == 2 and "parametrized" in p.stderr and "1 (" in p.stderr


@pytest.mark.parametrize("args", [["model.factory=feats:batchnorm"], ["model.args.spare=true"]],
                         ids=["batchnorm", "unused"])
def test_killed_and_resumed_gives_the_uninterrupted_hash(project: Path, tmp_path: Path,
                                                        args: list[str]) -> None:
    """Running statistics and an optimiser state that some parameters lack
    (never given a gradient) survive a SIGKILL and resume bit for bit;
    control: the killed run did stop early (exit -9), with a checkpoint."""
    whole = _train(project, tmp_path / "whole", *args)
    env = {**pipeline_env(tmp_path), "PIPELINE_TEST_KILL_AT_STEP": "5"}
    argv = ["train", str(project / "config.toml"), *args, "train.checkpoint_every=5",
            "train.checkpoint_seconds=0", "--runs-dir", str(tmp_path / "runs"), "--quiet"]
    killed = run_pipeline(argv, env, cwd=project)
    assert killed.returncode == -9 and list((tmp_path / "runs").glob(".ckpt-*/ckpt-*"))
    resumed = _train(project, tmp_path, *args, "train.checkpoint_every=5",
                     "train.checkpoint_seconds=0")
    assert resumed["resumed_from_step"] == 5
    assert resumed["weights_sha256"] == whole["weights_sha256"]
