"""Exact mode's optimisers (docs/exact-spec.md, section 9): SGD (momentum,
Nesterov, L2 weight decay), Adam (L2) and AdamW (decoupled weight decay),
global-norm gradient clipping and the learning-rate schedule
(pipeline.core.schedule). Every tensor op a single IEEE f32 op, constants rounded
to f32 once (per step for those the schedule moves); state as named f32
tensors (``<slot>.<param name>``) and JSON-able scalars for checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..core.config import OptimConfig
from ..core.errors import CheckpointError, ConfigError
from ..core.schedule import Schedule, schedule_of
from .flat import F32 as _F32
from .flat import flat_of, flat_views, rn32
from .ops import sqrt32, tree_sum

__all__ = ["ExactSGD", "ExactAdam", "ExactAdamW", "clip_scale", "make_exact_optimizer"]
CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s: max_norm / (norm + 1e-6)


def clip_scale(grads: dict[str, Tensor], max_norm: float) -> Tensor:
    """Section 9.2: ``min(RN32(max_norm) / (norm + RN32(1e-6)), 1)`` (f32, a
    0-dim tensor on the gradients' device) with ``norm = sqrt32(tree_sum(g *
    g))`` over every gradient laid end to end, tensors in sorted name order,
    each in C order. No host sync: the clamp makes a norm within bounds a
    factor of exactly 1, and ``g * 1`` is ``g``."""
    flat = torch.cat([grads[n].reshape(-1) for n in sorted(grads)])
    norm = sqrt32(tree_sum(flat * flat, 0))
    num = torch.full((), rn32(max_norm), dtype=_F32, device=flat.device)
    # a tensor divisor: see the module docstring of pipeline.exact.ops
    return (num / (norm + rn32(CLIP_EPS))).clamp_(max=1.0)


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
    """Shared machinery: the step (clip, ``lr(t)``, update), named f32 state
    tensors (``<slot>.<param name>``, views of one flat buffer per slot),
    JSON-able scalars, and the choice between one flat update and one update
    per parameter (same bits)."""

    def __init__(self, params: dict[str, Tensor], slots: tuple[str, ...],
                 schedule: Callable[[int], float], clip_norm: float) -> None:
        self.params = params
        self.t = 0  # updates made: the next one uses step t's gradients and lr(t)
        self.slots = slots
        self.schedule, self.clip_norm = schedule, clip_norm
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

    def step(self, grads: dict[str, Tensor]) -> None:
        """One update from step ``t``'s summed gradients: clipped (section
        9.2) when ``clip_norm > 0``, at the rate ``lr(t)`` (9.1)."""
        unused = sorted(k for k, g in grads.items() if g is None)
        if unused:  # the spec's update has no "skip" (pinned mode skips them, as torch does)
            raise ConfigError(f"exact mode, step {self.t + 1}", [
                f"{k}: no shard of step {self.t + 1} used this trainable parameter (a branch "
                f"not taken, an unused head); exact mode updates every trainable parameter "
                f"every step: freeze it (requires_grad_(False)), or train in pinned mode"
                for k in unused])
        scale = clip_scale(grads, self.clip_norm) if self.clip_norm > 0 else None
        self._begin(self.schedule(self.t))
        self._apply(grads, scale)
        self.t += 1

    def _begin(self, lr: float) -> None:
        """This step's scalars from its f64 rate ``lr``."""
        raise NotImplementedError

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        raise NotImplementedError

    def _apply(self, grads: dict[str, Tensor], scale: Tensor | None) -> None:
        """``_update`` once on flat views when the parameters still form one
        flat buffer (the gradients concatenated), else once per parameter;
        the gradients multiplied by ``scale`` first (if given)."""
        names = list(self.params)
        theta = self._flat_theta
        if theta is not None and len(names) == len(self._layout) and all(
                self.params[n] is p and p.data_ptr() == ptr
                for n, (p, ptr) in zip(names, self._layout)):
            g = torch.cat([grads[n].reshape(-1) for n in names])
            self._update(theta, g if scale is None else g.mul_(scale), self._flat_state)
            return
        for n in names:
            g = grads[n] if scale is None else grads[n] * scale
            self._update(self.params[n], g, [self.state[f"{s}.{n}"] for s in self.slots])

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
    """SGD with optional momentum (dampening 0), Nesterov momentum and L2
    weight decay, spec section 9.3; ``schedule`` gives ``lr(t)`` (default: the
    constant ``lr``)."""

    def __init__(self, params: dict[str, Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, *, nesterov: bool = False,
                 schedule: Callable[[int], float] | None = None, clip_norm: float = 0.0) -> None:
        if nesterov and momentum == 0:
            raise ValueError("ExactSGD: Nesterov momentum needs a momentum, found 0")
        super().__init__(params, ("momentum",) if momentum != 0 else (),
                         schedule or Schedule(lr), clip_norm)
        self.mu, self.wd, self.nesterov = rn32(momentum), rn32(weight_decay), nesterov
        self.use_wd = weight_decay != 0
        self._lr = rn32(lr)

    def _begin(self, lr: float) -> None:
        self._lr = rn32(lr)

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        """``g += wd * theta``; ``buf = g`` (first step) or ``buf * mu + g``;
        ``d = g + buf * mu`` (Nesterov) or ``buf``; ``theta -= d * lr``."""
        if self.use_wd:
            g = g + theta * self.wd
        d = g
        if state:  # momentum
            buf = state[0]
            if self.t == 0:
                buf.copy_(g)
            else:
                buf.mul_(self.mu).add_(g)
            d = g + buf * self.mu if self.nesterov else buf
        theta.sub_(d * self._lr)


class ExactAdam(_Optimizer):
    """Adam, spec section 9.4: L2 weight decay (``g += wd * theta``), or with
    ``decoupled`` AdamW's (``theta *= RN32(1 - lr(t) * wd)`` first). Bias
    corrections from f64 running products ``b1p``, ``b2p``; the step's
    scalars rounded to f32 once per step."""

    def __init__(self, params: dict[str, Tensor], lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0, *,
                 decoupled: bool = False, schedule: Callable[[int], float] | None = None,
                 clip_norm: float = 0.0) -> None:
        super().__init__(params, ("m", "v"), schedule or Schedule(lr), clip_norm)
        self.beta1, self.beta2 = beta1, beta2
        self.b1, self.b2 = rn32(beta1), rn32(beta2)
        self.c1, self.c2 = rn32(1.0 - beta1), rn32(1.0 - beta2)
        self.eps, self.wd_f, self.wd = rn32(eps), weight_decay, rn32(weight_decay)
        self.l2 = weight_decay != 0 and not decoupled
        self.decay = weight_decay != 0 and decoupled
        self.b1p = self.b2p = 1.0
        self._step, self._bc2, self._dec = 0.0, 1.0, 1.0

    def _begin(self, lr: float) -> None:
        self.b1p *= self.beta1
        self.b2p *= self.beta2
        self._step = rn32(lr / (1.0 - self.b1p))
        self._bc2 = rn32(1.0 - self.b2p)
        self._dec = rn32(1.0 - lr * self.wd_f)

    def _update(self, theta: Tensor, g: Tensor, state: list[Tensor]) -> None:
        if self.l2:
            g = g + theta * self.wd
        if self.decay:
            theta.mul_(self._dec)
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


class ExactAdamW(ExactAdam):
    """AdamW: ExactAdam with decoupled weight decay (torch.optim.AdamW's)."""

    def __init__(self, params: dict[str, Tensor], lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01, *,
                 schedule: Callable[[int], float] | None = None, clip_norm: float = 0.0) -> None:
        super().__init__(params, lr, beta1, beta2, eps, weight_decay, decoupled=True,
                         schedule=schedule, clip_norm=clip_norm)


def make_exact_optimizer(optim_cfg: OptimConfig, params: dict[str, Tensor],
                         total_steps: int) -> _Optimizer:
    """The exact optimiser ``[optim]`` names ("sgd", "adam" or "adamw"), with
    its schedule over a run of ``total_steps`` steps and its clipping."""
    o, sched = optim_cfg, schedule_of(optim_cfg, total_steps)
    if o.name == "sgd":
        return ExactSGD(params, o.lr, o.momentum, o.weight_decay, nesterov=o.nesterov,
                        schedule=sched, clip_norm=o.clip_norm)
    if o.name in ("adam", "adamw"):
        return ExactAdam(params, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay,
                         decoupled=o.name == "adamw", schedule=sched, clip_norm=o.clip_norm)
    raise ValueError(f"optim.name: expected 'sgd', 'adam' or 'adamw', found {o.name!r}")
