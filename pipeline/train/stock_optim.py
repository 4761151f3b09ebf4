"""Pinned mode's optimiser: ``torch.optim`` (SGD, Adam, AdamW: their step bodies
without torch's dynamo decorators), ``clip_grad_norm_``, and the schedule's
rate per step, behind the loop's Optimizer protocol (pipeline.train.net).

It updates the net's trainable parameters only (a frozen one has no state and
never moves); a parameter that got no gradient in a step is skipped as torch
skips it (no update, its state unchanged), so its state may be missing from
a checkpoint until its first gradient.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..core.config import OptimConfig
from ..core.errors import ConfigError
from ..core.schedule import schedule_of

__all__ = ["TorchOptimizer"]


def _undecorated(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    """``cls`` whose ``add_param_group`` and ``step`` skip torch's dynamo decorators.

    torch 2.13 imports ``torch._dynamo`` (about 1 s, as long as ``import torch``
    itself: bench/bench_startup.py) in ``Optimizer.add_param_group``'s
    ``torch._disable_dynamo`` wrapper and in ``_use_grad_for_differentiable``
    around every ``step`` (torch/optim/optimizer.py), for graph breaks that only
    a ``torch.compile`` tracing the optimizer needs; the pipeline never compiles
    it. The same bodies run, undecorated (``inspect.unwrap``), step under
    ``no_grad`` as ``_use_grad`` sets it (``differentiable`` is False); the step
    hooks and profiler label that Optimizer wraps around ``step`` are kept.
    tests/test_pinned.py checks equal bits against the stock classes."""
    add_group = inspect.unwrap(torch.optim.Optimizer.add_param_group)
    step = inspect.unwrap(cls.step)

    def add_param_group(self: Any, param_group: dict[str, Any]) -> None:
        add_group(self, param_group)

    @torch.no_grad()
    def undecorated_step(self: Any, closure: Any = None) -> Any:
        return step(self, closure)
    return type(cls.__name__, (cls,), {"add_param_group": add_param_group,
                                       "step": undecorated_step, "__module__": __name__})


_SGD, _ADAM = _undecorated(torch.optim.SGD), _undecorated(torch.optim.Adam)
_ADAMW = _undecorated(torch.optim.AdamW)


class TorchOptimizer:
    """torch.optim behind the Optimizer interface; state keyed by param name.
    SGD (momentum, Nesterov, weight decay), Adam, AdamW, all with
    ``foreach=False``; ``clip_norm > 0``: ``torch.nn.utils.clip_grad_norm_``
    (``foreach=False``) before each step, which scales the given gradient
    tensors in place; the rate of step ``t`` is the
    schedule's ``lr(t)`` (pipeline.core.schedule, as ``LambdaLR`` would set it),
    so the step count is state too."""

    _STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step"),
              "adamw": ("exp_avg", "exp_avg_sq", "step")}

    def __init__(self, cfg: OptimConfig, params: dict[str, torch.Tensor],
                 total_steps: int) -> None:
        if not params:
            raise ConfigError("model", ["model: every parameter is frozen (requires_grad "
                                        "False): there is nothing to train"])
        self.cfg, self.params = cfg, params
        self.schedule, self.t = schedule_of(cfg, total_steps), 0
        plist = list(params.values())
        if cfg.name == "sgd":
            self.opt: torch.optim.Optimizer = _SGD(
                plist, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                nesterov=cfg.nesterov, foreach=False)
        else:
            cls = _ADAMW if cfg.name == "adamw" else _ADAM
            self.opt = cls(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                           weight_decay=cfg.weight_decay, foreach=False)

    def step(self, grads: dict[str, torch.Tensor | None]) -> None:
        """One update; a parameter whose gradient is None is skipped, as torch
        skips it (no update, no change to its state)."""
        for name, p in self.params.items():
            p.grad = grads[name]
        if self.cfg.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.clip_norm,
                                           foreach=False)
        for group in self.opt.param_groups:
            group["lr"] = self.schedule(self.t)
        self.opt.step()
        self.t += 1
        for p in self.params.values():
            p.grad = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.params.items():
            for k, v in self.opt.state.get(p, {}).items():
                if isinstance(v, torch.Tensor):
                    out[f"{k}.{name}"] = v.detach().reshape(p.shape if k != "step" else ())
        return out

    def state_scalars(self) -> dict[str, Any]:
        """The step count, and the parameters with no state yet (never given a
        gradient), so that a restore can tell a missing state from a lost one."""
        bare = sorted(n for n, p in self.params.items() if not self.opt.state.get(p))
        return {"step": self.t, **({"stateless": bare} if bare else {})}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        """Restore every parameter's state: all its slots, or none for a
        parameter the checkpoint names as stateless (never given a gradient)."""
        slots = self._STATE[self.cfg.name]
        step, bare = scalars.get("step"), scalars.get("stateless", [])
        if set(scalars) - {"step", "stateless"} or isinstance(step, bool) \
                or not isinstance(step, int) or not isinstance(bare, list):
            raise ValueError(f"optimiser state: expected scalars {{'step': an integer, "
                             f"'stateless': names}}, found {sorted(scalars)}")
        # A checkpoint written at step 0 holds no state at all.
        expected = {f"{k}.{n}" for n in self.params for k in slots
                    if n not in bare} if tensors else set()
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"optimiser state: missing {missing}, unexpected {extra}")
        self.opt.state.clear()
        self.t = step
        for name, p in self.params.items():
            if f"{slots[0]}.{name}" in tensors:
                self.opt.state[p] = {k: tensors[f"{k}.{name}"].clone().to(p.device)
                                     for k in slots}
