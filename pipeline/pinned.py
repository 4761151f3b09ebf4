"""Pinned mode's network and optimiser: stock torch (nn modules, autograd,
torch.optim), reproducible under the pinned numeric profile
(pipeline.environment). They implement the Net and Optimizer protocols of
pipeline.modes."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, OptimConfig

__all__ = ["PinnedNet", "TorchOptimizer"]


class _Module(nn.Module):
    """The stock-torch network: MLP (fc0..fcL) or CNN (conv0, conv1, fc0)."""

    def __init__(self, cfg: ModelConfig, input_shape: tuple[int, ...], n_classes: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_shape = input_shape
        if cfg.arch == "mlp":
            sizes = [math.prod(input_shape), *cfg.hidden, n_classes]
            for i in range(len(sizes) - 1):
                self.add_module(f"fc{i}", nn.Linear(sizes[i], sizes[i + 1]))
            self.n_fc = len(sizes) - 1
        else:
            c, h, w = input_shape
            self.conv0 = nn.Conv2d(c, 8, 3, stride=1, padding=1)
            self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)  # 8x8 -> 4x4
            self.fc0 = nn.Linear(16 * ((h - 1) // 2 + 1) * ((w - 1) // 2 + 1), n_classes)
            self.n_fc = 1

    def forward(self, x: torch.Tensor, keep: list[torch.Tensor] | None) -> torch.Tensor:
        if self.cfg.arch == "cnn":
            x = x.reshape(-1, *self.input_shape)           # (N, 64) -> (N, 1, 8, 8)
            x = F.relu(self.conv1(F.relu(self.conv0(x))))  # -> (N, 16, 4, 4)
            return self.fc0(x.flatten(1))                  # -> (N, classes)
        scale = 1.0 / (1.0 - self.cfg.dropout)
        for i in range(self.n_fc - 1):
            x = F.relu(getattr(self, f"fc{i}")(x))
            if keep is not None:
                x = x * keep[i] * scale  # mask from pipeline.rng: same on every rank
        return getattr(self, f"fc{self.n_fc - 1}")(x)


class PinnedNet:
    """Stock torch kernels; reproducible under the pinned numeric profile."""

    def __init__(self, cfg: ModelConfig, seed: int, device: torch.device, *,
                 input_shape: tuple[int, ...], n_classes: int) -> None:
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)  # explicit: init draws only from it
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.set_state(gen.get_state())
            # nn's default init draws from the default generator
            self.module = _Module(cfg, tuple(input_shape), n_classes)
        self.module.to(device)
        self.params = dict(self.module.named_parameters())

    def dropout_widths(self) -> list[int]:
        if self.cfg.arch != "mlp" or self.cfg.dropout == 0.0:
            return []
        return list(self.cfg.hidden)

    def shard_grads(self, x: torch.Tensor, y: torch.Tensor, n_global: int,
                    keep: list[torch.Tensor] | None) -> tuple[torch.Tensor,
                                                              dict[str, torch.Tensor]]:
        if not self.module.training:
            self.module.train()  # recursive: only on a switch from predict()
        logits = self.module(x, keep)
        if len(y) == n_global:  # one shard, one process: the stock mean, one op fewer
            mean = F.cross_entropy(logits, y)
            grads = torch.autograd.grad(mean, list(self.params.values()))
            return mean.detach() * n_global, dict(zip(self.params, grads))
        loss = F.cross_entropy(logits, y, reduction="sum")
        grads = torch.autograd.grad(loss / n_global, list(self.params.values()))
        return loss.detach(), dict(zip(self.params, grads))

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        self.module.eval()
        return self.module(x, None)


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
