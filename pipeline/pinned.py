"""Pinned mode's network and optimiser: a stock ``nn.Module`` from a model
factory (pipeline.models), autograd and ``torch.optim``, reproducible under
the pinned numeric profile (pipeline.environment). They implement the Net and
Optimizer protocols of pipeline.modes.

Randomness inside the module (``nn.Dropout``, ``torch.rand`` in forward) is
world-size invariant: each shard's forward and backward run with torch's
generators seeded from ``stream``, a key of (seed, step, shard) alone
(pipeline.train), so a shard draws the same numbers whichever rank runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import _testing
from .config import OptimConfig
from .errors import ConfigError

__all__ = ["PinnedNet", "TorchOptimizer", "build_module"]


def build_module(factory: Callable[..., Any], name: str, input_shape: tuple[int, ...],
                 n_classes: int, args: dict[str, Any], seed: int) -> nn.Module:
    """``factory(input_shape, n_classes, **args)`` with torch's generators
    seeded from ``seed`` for its initialisation (and restored after), or
    ConfigError (exit 2) naming the factory."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # nn's default init draws from the default generator
        try:
            module = factory(tuple(input_shape), n_classes, **args)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.factory = {name!r}", [
                f"model.args: {name}(input_shape={tuple(input_shape)}, num_classes={n_classes},"
                f" **{args}) failed: {type(e).__name__}: {e}"]) from None
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model.factory = {name!r}", [
            f"model.factory: expected a torch.nn.Module, found {type(module).__name__}"])
    return module


def _cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over examples (and positions, for (N, T, V) logits)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                           reduction="sum")


class PinnedNet:
    """A stock module; stock kernels under the pinned profile."""

    def __init__(self, module: nn.Module, device: torch.device,
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> None:
        self.module, self.device = module.to(device), device
        self.params = dict(self.module.named_parameters())
        # Persistent buffers (BatchNorm statistics): saved with the weights.
        self.buffers = {k: v for k, v in self.module.state_dict(keep_vars=True).items()
                        if k not in self.params}
        self._user_loss = loss

    def dropout_widths(self) -> list[int]:
        return []  # randomness lives inside the module (see the module docstring)

    def _loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self._user_loss is None:
            return _cross_entropy(logits, y)
        return self._user_loss(logits, y).sum()

    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None, stream: int = 0, *, step: int = 0,
                    row0: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the shard's summed loss, gradients of that sum / n_global);
        ``stream`` seeds the module's draws (``step``, ``row0``: unused)."""
        if not self.module.training:
            self.module.train()  # recursive: only on a switch from predict()
        if not _testing.SWITCHES.no_shard_streams:  # (the test-only control)
            # This shard's draws. The generators of the module's device only:
            # torch.manual_seed would visit every backend (60 us, per shard).
            torch.random.default_generator.manual_seed(stream)
            if self.device.type == "cuda":
                torch.cuda.manual_seed(stream)
        loss = self._loss_sum(self.module(x), y)
        grads = torch.autograd.grad(loss / n_global, list(self.params.values()))
        return loss.detach(), dict(zip(self.params, grads))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x)

    @torch.no_grad()
    def loss_sum(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        """Summed cross-entropy of ``logits`` against ``y`` (the test loss)."""
        return float(_cross_entropy(logits, y))


class TorchOptimizer:
    """torch.optim behind the Optimizer interface; state keyed by param name."""

    _STATE = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq", "step")}

    def __init__(self, cfg: OptimConfig, params: dict[str, torch.Tensor]) -> None:
        self.cfg, self.params = cfg, params
        plist = list(params.values())
        if cfg.name == "sgd":
            self.opt: torch.optim.Optimizer = torch.optim.SGD(
                plist, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                foreach=False)
        else:
            self.opt = torch.optim.Adam(plist, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                        eps=cfg.eps, weight_decay=cfg.weight_decay,
                                        foreach=False)

    def step(self, grads: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.grad = grads[name]
        self.opt.step()
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
        return {}

    def load_state(self, tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> None:
        expected = {f"{k}.{n}" for n in self.params for k in self._STATE[self.cfg.name]}
        if tensors and set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"optimiser state: missing {missing}, unexpected {extra}")
        if scalars:
            raise ValueError(f"optimiser state: unexpected scalars {sorted(scalars)}")
        self.opt.state.clear()
        for name, p in self.params.items():
            if tensors:
                self.opt.state[p] = {k: tensors[f"{k}.{name}"].clone().to(p.device)
                                     for k in self._STATE[self.cfg.name]}
