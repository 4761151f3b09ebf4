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
from pipeline.train.pinned import TorchOptimizer

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
from pipeline.train.pinned import TorchOptimizer
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
