"""Exact mode's optimisers (docs/exact-spec.md, section 9): every tensor op a
single IEEE f32 op, constants rounded to f32 once; state as named f32 tensors
(``<slot>.<param name>``) and JSON-able scalars for checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..config import OptimConfig
from ..errors import CheckpointError
from .flat import F32 as _F32
from .flat import flat_of, flat_views, rn32
from .ops import sqrt32

__all__ = ["ExactSGD", "ExactAdam", "make_exact_optimizer"]


def _check_state(expected: dict[str, Tensor], tensors: dict[str, Tensor],
                 scalars: dict[str, Any], scalar_keys: dict[str, type]) -> None:
    """Raise CheckpointError (a ValueError) naming the first key that is
    missing, unexpected, or of the wrong shape, dtype or type."""
    _check_keys(expected, tensors, "optimiser state tensor")
    for key, want in expected.items():
        got = tensors[key]
        if not isinstance(got, Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            found = f"{tuple(got.shape)} {got.dtype}" if isinstance(got, Tensor) else type(got)
            raise CheckpointError(key, f"{tuple(want.shape)} {want.dtype}", str(found))
    _check_keys(scalar_keys, scalars, "optimiser state scalar")
    for key, tp in scalar_keys.items():
        v = scalars[key]
        if isinstance(v, bool) or not isinstance(v, tp):
            raise CheckpointError(key, f"a {tp.__name__}", repr(v))


def _check_keys(expected: dict[str, Any], got: dict[str, Any], what: str) -> None:
    for key in sorted(set(expected) | set(got)):
        if key not in got:
            raise CheckpointError(key, f"an {what}", "nothing (missing)")
        if key not in expected:
            raise CheckpointError(key, f"no such {what}", "an extra one")


class _Optimizer:
    """Shared machinery: named f32 state tensors (``<slot>.<param name>``,
    views of one flat buffer per slot), JSON-able scalars, and the choice
    between one flat update and one update per parameter (same bits)."""

    def __init__(self, params: dict[str, Tensor], slots: tuple[str, ...]) -> None:
        self.params = params
        self.t = 0
        self.slots = slots
        self.state: dict[str, Tensor] = {}
        self._flat_state: list[Tensor] = []
        for slot in slots:
            zeros = {name: torch.zeros_like(p) for name, p in params.items()}
            device = next(iter(params.values())).device
            views = flat_views(zeros, device)
            self.state.update({f"{slot}.{name}": v for name, v in views.items()})
            flat = flat_of(list(views.values()))
            assert flat is not None
            self._flat_state.append(flat)
        # The flat view over the parameters, valid while the dict holds these
        # very tensors on the same memory (checked each step: cheap).
        self._flat_theta = flat_of(list(params.values()))
        self._layout = [(p, p.data_ptr()) for p in params.values()]

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, grads: dict[str, Tensor]) -> None:
        """``_update`` once on flat views when the parameters still form one
        flat buffer (the gradients concatenated), else once per parameter."""
        names = list(self.params)
        theta = self._flat_theta
        if theta is not None and len(names) == len(self._layout) and all(
                self.params[n] is p and p.data_ptr() == ptr
                for n, (p, ptr) in zip(names, self._layout)):
            g = torch.cat([grads[n].reshape(-1) for n in names])
            self._update(theta, g, self._flat_state)
            return
        for n in names:
            self._update(self.params[n], grads[n], [self.state[f"{s}.{n}"] for s in self.slots])

    def state_tensors(self) -> dict[str, Tensor]:
        """Every state tensor by name (``<slot>.<param name>``)."""
        return dict(self.state)

    def state_scalars(self) -> dict[str, int | float]:
        return {"step": self.t}

    def _scalar_types(self) -> dict[str, type]:
        return {"step": int}

    def load_state(self, tensors: dict[str, Tensor], scalars: dict[str, Any]) -> None:
        """Restore exactly what ``state_tensors``/``state_scalars`` returned;
        raise CheckpointError (a ValueError) naming any wrong key. Copies into
        the existing buffers (which stay flat)."""
        _check_state(self.state, tensors, scalars, self._scalar_types())
        for key, t in tensors.items():
            self.state[key].copy_(t.detach())
        self._load_scalars(scalars)

    def _load_scalars(self, scalars: dict[str, Any]) -> None:
        self.t = scalars["step"]


class ExactSGD(_Optimizer):
    """SGD with optional momentum and L2 weight decay, spec section 9: each
    op a separate f32 op, constants rounded to f32 once."""

    def __init__(self, params: dict[str, Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, ("momentum",) if momentum != 0 else ())
        self.lr, self.mu, self.wd = rn32(lr), rn32(momentum), rn32(weight_decay)
        self.use_wd = weight_decay != 0

    def step(self, grads: dict[str, Tensor]) -> None:
        """``theta = theta - buf * lr`` with ``buf = buf * mu + g`` (``g`` on
        the first step), ``g = g + wd * theta`` first when ``wd != 0``."""
        self._apply(grads)
        self.t += 1

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        if self.use_wd:
            g = g + theta * self.wd
        buf = g
        if state:  # momentum
            buf = state[0]
            if self.t == 0:
                buf.copy_(g)
            else:
                buf.mul_(self.mu).add_(g)
        theta.sub_(buf * self.lr)


class ExactAdam(_Optimizer):
    """Adam in the L2 form (not AdamW), spec section 9; bias corrections from
    f64 running products ``b1p``, ``b2p`` rounded to f32 once per step."""

    def __init__(self, params: dict[str, Tensor], lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, ("m", "v"))
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.b1, self.b2 = rn32(beta1), rn32(beta2)
        self.c1, self.c2 = rn32(1.0 - beta1), rn32(1.0 - beta2)
        self.eps, self.wd, self.use_wd = rn32(eps), rn32(weight_decay), weight_decay != 0
        self.b1p = self.b2p = 1.0
        self._step, self._bc2 = 0.0, 1.0

    def step(self, grads: dict[str, Tensor]) -> None:
        """One Adam step; every tensor op is a single IEEE f32 op."""
        self.t += 1
        self.b1p *= self.beta1
        self.b2p *= self.beta2
        self._step = rn32(self.lr / (1.0 - self.b1p))
        self._bc2 = rn32(1.0 - self.b2p)
        self._apply(grads)

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        if self.use_wd:
            g = g + theta * self.wd
        m, v = state
        m.mul_(self.b1).add_(g * self.c1)
        v.mul_(self.b2).add_((g * g).mul_(self.c2))
        # a tensor divisor on v's device: see the module docstring of pipeline.exact.ops
        bc2 = torch.full((), self._bc2, dtype=_F32, device=v.device)
        den = sqrt32(v / bc2).add_(self.eps)
        theta.sub_((m / den).mul_(self._step))

    def state_scalars(self) -> dict[str, int | float]:
        return {"step": self.t, "b1p": self.b1p, "b2p": self.b2p}

    def _scalar_types(self) -> dict[str, type]:
        return {"step": int, "b1p": float, "b2p": float}

    def _load_scalars(self, scalars: dict[str, Any]) -> None:
        self.t, self.b1p, self.b2p = scalars["step"], scalars["b1p"], scalars["b2p"]


def make_exact_optimizer(optim_cfg: OptimConfig, params: dict[str, Tensor]) -> _Optimizer:
    """The exact optimiser the config names ("sgd" or "adam")."""
    if optim_cfg.name == "sgd":
        return ExactSGD(params, optim_cfg.lr, optim_cfg.momentum, optim_cfg.weight_decay)
    if optim_cfg.name == "adam":
        return ExactAdam(params, optim_cfg.lr, optim_cfg.beta1, optim_cfg.beta2, optim_cfg.eps,
                         optim_cfg.weight_decay)
    raise ValueError(f"optim.name: expected 'sgd' or 'adam', found {optim_cfg.name!r}")
