"""The learning-rate schedule (docs/exact-spec.md, section 9.1): linear
warm-up, then constant or half-cosine decay, as an f64 value per step.

Every value is a fixed sequence of IEEE-754 f64 operations on Python floats
(``+ - * /``, comparisons; no libm ``cos``), so it is the same on every
machine, and both modes use it: exact mode's optimisers round it as the spec
says, pinned mode hands it to ``torch.optim`` (as ``LambdaLR`` would:
``lr * factor``). Each Python float operation is one correctly rounded
binary64 operation (CPython calls one C function per operator: no fused
multiply-add, no extended precision on x86-64 or aarch64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import OptimConfig

__all__ = ["Schedule", "schedule_of", "cospi", "SCHEDULES"]

SCHEDULES = ("constant", "cosine")
PI = 3.141592653589793  # 0x400921FB54442D18, the f64 nearest pi
# Taylor coefficients (-1)^n / k!, each 1.0 / k! correctly rounded (k! < 2^53
# is an exact float for k <= 18), then negated (exact) for odd n.
_COS = [(-1.0 if n % 2 else 1.0) * (1.0 / math.factorial(2 * n)) for n in range(10)]
_SIN = [(-1.0 if n % 2 else 1.0) * (1.0 / math.factorial(2 * n + 1)) for n in range(9)]


def _horner(coef: list[float], z: float) -> float:
    """``coef[-1]``, then ``w = w * z + coef[n]`` for n from len-2 down to 0
    (two rounded f64 ops each)."""
    w = coef[-1]
    for c in reversed(coef[:-1]):
        w = w * z + c
    return w


def cospi(y: float) -> float:
    """``cos(pi * y)`` for ``0 <= y <= 1/2`` by the spec's recipe: for ``y <=
    1/4`` the cosine's Taylor polynomial in ``r = PI * y``, above it the
    sine's in ``r = PI * (0.5 - y)`` (the subtraction is exact, Sterbenz), so
    ``|r| <= pi/4`` and the truncation error is below 1e-20. Within a few f64
    ulps of ``math.cos(math.pi * y)``."""
    if not 0.0 <= y <= 0.5:
        raise ValueError(f"cospi: expected 0 <= y <= 0.5, found {y!r}")
    if y > 0.25:
        r = PI * (0.5 - y)
        return r * _horner(_SIN, r * r)
    r = PI * y
    return _horner(_COS, r * r)


@dataclass(frozen=True)
class Schedule:
    """``lr(t)`` for the 0-based global step ``t`` (the update made with step
    ``t``'s gradient): ``lr * (t + 1) / warmup`` while ``t < warmup``; then
    ``lr`` (constant) or ``lr * cospi(x / 2)^2`` (that is ``lr * (1 + cos(pi
    x)) / 2``) with ``x = (t - warmup) / (total - warmup)`` (cosine); the spec
    fixes every rounding. ``total``: the steps the run trains."""

    lr: float
    kind: str = "constant"
    warmup: int = 0
    total: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule: expected one of {SCHEDULES}, found {self.kind!r}")
        if self.warmup < 0 or self.total < 0:
            raise ValueError(f"schedule: expected warmup, total >= 0, found {self.warmup}, "
                             f"{self.total}")

    def __call__(self, t: int) -> float:
        if t < 0:
            raise ValueError(f"schedule: expected a step t >= 0, found {t}")
        if t < self.warmup:
            return self.lr * ((t + 1) / self.warmup)  # integers < 2^53: exact floats
        if self.kind == "constant":
            return self.lr
        if t >= self.total:
            raise ValueError(f"schedule: step {t} is past the run's {self.total} steps")
        # (1 + cos(pi x)) / 2 = cos(pi x / 2)^2: no cancellation as x nears 1.
        x = (t - self.warmup) / (self.total - self.warmup)
        h = cospi(x * 0.5)  # x * 0.5 is exact
        return self.lr * (h * h)


def schedule_of(cfg: OptimConfig, total_steps: int) -> Schedule:
    """The schedule ``[optim]`` names, over a run of ``total_steps`` steps."""
    return Schedule(cfg.lr, cfg.schedule, cfg.warmup_steps, total_steps)
