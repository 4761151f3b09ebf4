"""Pinned mode's optimiser (pipeline/pinned.py): torch.optim's own arithmetic,
without the dynamo decorators that import torch._dynamo, and the determinism
switches without torch._inductor (pipeline/determinism.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from pipeline.core.config import OptimConfig
from pipeline.train.stock_optim import TorchOptimizer

from ..support import ROOT

CASES = [OptimConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
         OptimConfig(name="sgd", lr=0.05, momentum=0.0),
         OptimConfig(name="adam", lr=0.01, weight_decay=0.01)]


def _stock(cfg: OptimConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, foreach=False)
    return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay, foreach=False)


def _trajectory(cfg: OptimConfig, stock: bool, steps: int = 6) -> list[torch.Tensor]:
    """The parameters after ``steps`` updates from fixed weights and gradients."""
    g = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(7, 5, generator=g), "b": torch.randn(5, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in start.items()}
             for _ in range(steps)]
    params = {k: torch.nn.Parameter(v.clone()) for k, v in start.items()}
    if stock:
        opt = _stock(cfg, list(params.values()))
        for gs in grads:
            for k, p in params.items():
                p.grad = gs[k]
            opt.step()
    else:
        ours = TorchOptimizer(cfg, params, steps)
        for gs in grads:
            ours.step(gs)
    return [p.detach().clone() for p in params.values()]


@pytest.mark.parametrize("cfg", CASES, ids=["sgd-momentum-decay", "sgd-plain", "adam-decay"])
def test_optimizer_gives_stock_torch_optim_bits(cfg: OptimConfig) -> None:
    """TorchOptimizer's steps give the bits of the stock torch.optim class."""
    ours, stock = _trajectory(cfg, False), _trajectory(cfg, True)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))


def test_optimizer_comparison_can_fail() -> None:
    """Control: another learning rate gives other bits, so equality means something."""
    a = _trajectory(CASES[0], False)
    b = _trajectory(OptimConfig(name="sgd", lr=0.11, momentum=0.9, weight_decay=0.01), True)
    assert not all(torch.equal(x, y) for x, y in zip(a, b))


def test_optimizer_step_hooks_still_run() -> None:
    """torch's global optimizer-step hooks (what pipeline audit's capture uses)
    see every step of TorchOptimizer."""
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    seen: list[str] = []
    pre = register_optimizer_step_pre_hook(lambda opt, a, k: seen.append("pre") and None)
    post = register_optimizer_step_post_hook(lambda opt, a, k: seen.append("post"))
    try:
        _trajectory(CASES[0], False, steps=3)
    finally:
        pre.remove()
        post.remove()
    assert seen == ["pre", "post"] * 3


_PROBE = """
import sys, torch
from pipeline.core.config import OptimConfig
from pipeline.train.determinism import strict_torch
from pipeline.train.stock_optim import TorchOptimizer
if sys.argv[1] == "strict":
    strict_torch()
params = {"w": torch.nn.Parameter(torch.ones(3))}
for cfg in (OptimConfig(name="sgd", lr=0.1), OptimConfig(name="adam", lr=0.1),
            OptimConfig(name="adamw", lr=0.1, weight_decay=0.1, clip_norm=0.5,
                        schedule="cosine", warmup_steps=1),
            OptimConfig(name="sgd", lr=0.1, nesterov=True, clip_norm=0.5)):
    opt = TorchOptimizer(cfg, params, 2)
    opt.step({"w": torch.ones(3)})
    opt.step({"w": torch.ones(3)})
print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo",
      "inductor" if "torch._inductor" in sys.modules else "no-inductor",
      torch.are_deterministic_algorithms_enabled())
stock = torch.optim.SGD(list(params.values()), lr=0.1)  # control: the stock class
params["w"].grad = torch.ones(3)
stock.step()
print("dynamo" if "torch._dynamo" in sys.modules else "no-dynamo")
import torch._inductor.config as inductor
print(inductor.deterministic)
"""


def _probe(strict: bool) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_DETERMINISTIC"}
    out = subprocess.run([sys.executable, "-c", _PROBE, "strict" if strict else "plain"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.split("\n")[:3]


@pytest.mark.process
def test_training_steps_and_determinism_switches_load_no_dynamo() -> None:
    """In a fresh process, strict_torch and TorchOptimizer's SGD, Adam and
    AdamW steps (clipping and the cosine schedule included) import neither torch._dynamo nor torch._inductor (each costs about
    an `import torch`); deterministic algorithms are on, and inductor, once
    imported, is deterministic too (what torch.use_deterministic_algorithms
    sets). Control: the stock torch.optim step in the same process does import
    torch._dynamo, so the check sees it."""
    assert _probe(strict=True) == ["no-dynamo no-inductor True", "dynamo", "True"]


@pytest.mark.process
def test_determinism_probe_sees_the_switches_off() -> None:
    """Control: without strict_torch the same probe finds both flags off."""
    assert _probe(strict=False) == ["no-dynamo no-inductor False", "dynamo", "False"]


# --------------------------------------------------- issue 21: model features
def test_batchnorm_shards_start_from_the_step_and_average_in_the_tree() -> None:
    """Every shard of a step starts from the step's running statistics (the
    second shard's update is not applied on top of the first's), and the
    step's new statistics are the shards' updates summed and divided by the
    shard count; the counter takes the first shard's value."""
    from pipeline.train.distributed import add_grads, tree_reduce
    from pipeline.train.pinned import BUFFER, PinnedNet

    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    net = PinnedNet(module, torch.device("cpu"), None)
    start = net.buffers["1.running_mean"].clone()
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    parts = [net.shard_grads(x[i:i + 4], y[i:i + 4], 8, None, i, step=0) for i in (0, 4)]
    each = [p[1][BUFFER + "1.running_mean"] for p in parts]
    alone = PinnedNet(module, torch.device("cpu"), None)  # the second shard from the start
    with torch.no_grad():
        alone.buffers["1.running_mean"].copy_(start)
    assert torch.equal(each[1], alone.shard_grads(x[4:], y[4:], 8, None, 4, step=7)[1][
        BUFFER + "1.running_mean"])
    _, combined = tree_reduce(parts, add_grads)
    grads = net.end_step(combined, 2)
    assert not any(k.startswith(BUFFER) for k in grads)
    assert torch.equal(net.buffers["1.running_mean"], (each[0] + each[1]) / 2)
    assert int(net.buffers["1.num_batches_tracked"]) == 1


def test_a_parameter_without_a_gradient_is_skipped_and_its_state_optional() -> None:
    """TorchOptimizer skips a None gradient as torch.optim does (no update,
    no state), and a checkpointed state without that parameter restores;
    control: the one with a gradient moves and has state."""
    from pipeline.core.config import OptimConfig
    from pipeline.train.stock_optim import TorchOptimizer

    params = {"a": torch.nn.Parameter(torch.ones(2)), "b": torch.nn.Parameter(torch.ones(2))}
    opt = TorchOptimizer(OptimConfig(name="adam", lr=0.1), params, 10)
    opt.step({"a": torch.ones(2), "b": None})
    assert torch.equal(params["b"].detach(), torch.ones(2))
    assert not torch.equal(params["a"].detach(), torch.ones(2))
    state = opt.state_tensors()
    assert sorted(state) == ["exp_avg.a", "exp_avg_sq.a", "step.a"]
    assert opt.state_scalars() == {"step": 1, "stateless": ["b"]}
    again = TorchOptimizer(OptimConfig(name="adam", lr=0.1), params, 10)
    again.load_state(state, opt.state_scalars())
    with pytest.raises(ValueError, match="missing"):  # a lost state is not a missing one
        again.load_state({"exp_avg.a": state["exp_avg.a"]}, opt.state_scalars())
    with pytest.raises(ValueError, match="missing"):
        again.load_state(state, {"step": 1})
