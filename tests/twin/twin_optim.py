"""The twin's optimisers, clipping and learning-rate schedule (docs/exact-spec.md, 9).

Written from the specification alone. Tensors are NumPy float32 arrays, scalars
Python floats (f64); every line is one IEEE-754 operation in the order the
spec writes it (``a * b + c`` is two rounded NumPy ops, never fused).
"""

from __future__ import annotations

import math

import numpy as np

F32 = np.float32
F64 = np.float64

__all__ = ["PI", "cospi", "lr_at", "clip_grads", "SGD", "Adam", "make_optimizer", "update"]

# ---------------------------------------------------------------- 9.1 schedule
PI = 3.141592653589793
assert F64(PI).view(np.uint64) == np.uint64(0x400921FB54442D18)


def _sign(n: int) -> float:
    return 1.0 if n % 2 == 0 else -1.0


# k! for k <= 18 is an exact f64 (an exact Python int converted exactly); the
# division is correctly rounded; the sign flip is exact.
_C = [_sign(n) * (1.0 / float(math.factorial(2 * n))) for n in range(10)]       # C_0..C_9
_S = [_sign(n) * (1.0 / float(math.factorial(2 * n + 1))) for n in range(9)]    # S_0..S_8


def cospi(y: float) -> float:
    """cos(pi * y) for 0 <= y <= 0.5, f64, by the spec's two polynomials."""
    y = float(y)
    if not 0.0 <= y <= 0.5:
        raise ValueError(f"cospi wants 0 <= y <= 0.5, got {y!r}")
    if y > 0.25:
        r = PI * (0.5 - y)
        z = r * r
        w = _S[8]
        for n in range(7, -1, -1):
            w = w * z + _S[n]
        return r * w
    r = PI * y
    z = r * r
    w = _C[9]
    for n in range(8, -1, -1):
        w = w * z + _C[n]
    return w


def lr_at(t: int, lr: float, schedule: str, warmup: int, total: int) -> float:
    """lr(t) of section 9.1 as an f64 (Python float)."""
    lr, W = float(lr), int(warmup)
    if t < W:
        return lr * (float(t + 1) / float(W))
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown schedule {schedule!r}")
    if not W <= t < total:
        raise ValueError(f"cosine schedule: step {t} outside [{W}, {total})")
    x = float(t - W) / float(total - W)
    y = x * 0.5
    h = cospi(y)
    return lr * (h * h)


# ---------------------------------------------------------------- 9.2 clipping
def _tree_sum_flat(x: np.ndarray) -> np.float32:
    """Section 5's neighbour-pairing tree over a 1-D f32 array."""
    n = x.shape[0]
    if n == 0:
        return F32(0.0)
    while n > 1:
        h = n // 2
        pairs = x[0:2 * h:2] + x[1:2 * h:2]
        x = np.concatenate([pairs, x[n - 1:n]]) if n % 2 else pairs
        n = x.shape[0]
    return x[0]


def clip_grads(grads: dict[str, np.ndarray], clip_norm: float) -> np.float32:
    """Scale every gradient in place of the dict by the global-norm rule; returns
    the f32 scale (1.0 when nothing was scaled)."""
    flat = np.concatenate([np.asarray(grads[k], dtype=F32).reshape(-1) for k in sorted(grads)])
    q = flat * flat
    s = _tree_sum_flat(q)
    norm = np.sqrt(F32(s))
    scale = np.minimum(F32(clip_norm) / (norm + F32(1e-6)), F32(1.0))
    for k in grads:
        grads[k] = (grads[k] * scale).astype(F32)
    return F32(scale)


# ---------------------------------------------------------------- 9.3 SGD
class SGD:
    """SGD with momentum (dampening 0), Nesterov, L2 weight decay."""

    def __init__(self, momentum: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        self.momentum, self.weight_decay = float(momentum), float(weight_decay)
        self.mu, self.wd = F32(self.momentum), F32(self.weight_decay)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0.0:
            raise ValueError("nesterov needs momentum > 0")
        self.buf: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
             lr_t: float) -> None:
        lr32 = F32(lr_t)
        for name in params:
            theta, g = params[name], grads[name]
            if self.weight_decay != 0.0:
                g = g + theta * self.wd
            if self.momentum != 0.0:
                buf = g.copy() if name not in self.buf else self.buf[name] * self.mu + g
                self.buf[name] = buf
                d = g + buf * self.mu if self.nesterov else buf
            else:
                d = g
            params[name] = (theta - d * lr32).astype(F32)


# ---------------------------------------------------------------- 9.4 Adam, AdamW
class Adam:
    """Adam (L2 weight decay) or, with ``decoupled``, AdamW."""

    def __init__(self, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                 weight_decay: float = 0.0, decoupled: bool = False) -> None:
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.weight_decay = float(weight_decay)
        self.decoupled = bool(decoupled)
        self.b1, self.b2 = F32(self.beta1), F32(self.beta2)
        self.c1, self.c2 = F32(1.0 - self.beta1), F32(1.0 - self.beta2)
        self.e = F32(float(eps))
        self.wd = F32(self.weight_decay)
        self.b1p = 1.0
        self.b2p = 1.0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
             lr_t: float) -> None:
        self.b1p = self.b1p * self.beta1
        self.b2p = self.b2p * self.beta2
        step = F32(lr_t / (1.0 - self.b1p))
        bc2 = F32(1.0 - self.b2p)
        dec = F32(1.0 - lr_t * self.weight_decay) if self.decoupled else None
        for name in params:
            theta, g = params[name], grads[name]
            if self.weight_decay != 0.0:
                if self.decoupled:
                    theta = theta * dec
                else:
                    g = g + theta * self.wd
            m = self.m.get(name, np.zeros_like(theta))
            v = self.v.get(name, np.zeros_like(theta))
            m = m * self.b1 + g * self.c1
            v = v * self.b2 + (g * g) * self.c2
            self.m[name], self.v[name] = m, v
            den = np.sqrt(v / bc2) + self.e
            params[name] = (theta - (m / den) * step).astype(F32)


def make_optimizer(oc: dict) -> SGD | Adam:
    """The optimiser of an ``[optim]`` table (the README's defaults)."""
    name = oc.get("name", "sgd")
    if name == "sgd":
        return SGD(oc.get("momentum", 0.9), oc.get("weight_decay", 0.0),
                   oc.get("nesterov", False))
    if name in ("adam", "adamw"):
        return Adam(oc.get("beta1", 0.9), oc.get("beta2", 0.999), oc.get("eps", 1e-8),
                    oc.get("weight_decay", 0.0), decoupled=name == "adamw")
    raise ValueError(f"unknown optimiser {name!r}")


def update(opt: SGD | Adam, params: dict[str, np.ndarray], grads: dict[str, np.ndarray],
           oc: dict, t: int, total: int) -> None:
    """Update ``t`` of a run of ``total`` (section 9): clip, lr(t), the step."""
    clip = float(oc.get("clip_norm", 0.0))
    if clip > 0.0:
        grads = dict(grads)
        clip_grads(grads, clip)
    lr_t = lr_at(t, oc.get("lr", 0.1), oc.get("schedule", "constant"),
                 int(oc.get("warmup_steps", 0)), total)
    opt.step(params, grads, lr_t)
