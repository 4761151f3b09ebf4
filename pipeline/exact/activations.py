"""Exact SiLU, Sigmoid and Tanh (docs/exact-spec.md, section 20): per element
in f64 from the spec's ``exp64`` (section 7) and correctly rounded ``+ - * /``,
one rounding to f32 at the end. torch's own ``exp``/``tanh``/``sigmoid`` come
from vector libraries whose last bit depends on the ISA and the libm, so
they are not used.

Each forward also returns the derivative ``dy`` (f32), which the backward
multiplies by the incoming gradient: ``gx = g * dy`` (one f32 product), as
for GELU (section 14).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from . import fused
from .blocks import by_rows
from .consts import TANH_C, TANH_SMALL
from .context import apply_f32
from .context import trusted_backward as _trusted_backward
from .flat import select
from .ops import exp64

__all__ = ["silu", "sigmoid", "tanh", "activation_parts_torch", "KINDS"]

_F32, _F64 = torch.float32, torch.float64

def _logistic(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(E, p, q)`` of section 20: ``E = exp64(-|d|)``, ``t = 1 + E``,
    ``p = 1 / t``, ``q = E / t`` (so ``sigmoid(d)`` is ``p`` for ``d >= 0``,
    ``q`` otherwise, and ``1 - sigmoid(d)`` the other one)."""
    e = exp64(d.abs().neg_(), inplace=True)
    t = e + 1.0
    one = torch.ones((), dtype=_F64, device=d.device)
    return e, one / t, e / t


def _sigmoid_parts(d: Tensor, grad: bool) -> tuple[Tensor, ...]:
    _, p, q = _logistic(d)
    y = select(d >= 0, p, q).to(_F32)
    return (y, (p * q).to(_F32)) if grad else (y,)


def _silu_parts(d: Tensor, grad: bool) -> tuple[Tensor, ...]:
    _, p, q = _logistic(d)
    pos = d >= 0
    sg = select(pos, p, q)
    y = (d * sg).to(_F32)
    if not grad:
        return (y,)
    sc = select(pos, q, p)                      # 1 - sigmoid(d), without cancellation
    return y, (d * sc).add_(1.0).mul_(sg).to(_F32)


def _tanh_parts(d: Tensor, grad: bool) -> tuple[Tensor, ...]:
    a = d.abs()
    small = a < TANH_SMALL
    # the series (|d| < 1/16): w = C7; w = w * z + C_n for n = 6 .. 0; d * w
    z = d * d
    w = z * TANH_C[7]
    w.add_(TANH_C[6])
    for n in range(5, -1, -1):
        w.mul_(z).add_(TANH_C[n])
    th_s = d * w
    # the exponential form: E = exp64(-2a), (1 - E) / (1 + E), the sign of d
    e = exp64(a.mul(-2.0), inplace=True)
    u = e + 1.0
    one = torch.ones((), dtype=_F64, device=d.device)
    th_b = (one - e).div_(u)
    th_b = select(d < 0, th_b.neg(), th_b)
    th = select(small, th_s, th_b)
    y = th.to(_F32)
    if not grad:
        return (y,)
    dy_s = one - th_s * th_s
    dy_b = (e * 4.0).div_(u * u)               # 1 - tanh^2 = 4E / (1 + E)^2
    return y, select(small, dy_s, dy_b).to(_F32)


_PARTS = {"silu": _silu_parts, "sigmoid": _sigmoid_parts, "tanh": _tanh_parts}
KINDS = tuple(_PARTS)  # the native kernel's kind numbers: 0, 1, 2


def activation_parts_torch(kind: str, x: Tensor, grad: bool) -> tuple[Tensor, ...]:
    """``(y,)`` or ``(y, dy)`` (f32, the shape of ``x``) of ``kind`` by torch
    ops, in cache-sized blocks of rows (the same bits as on the whole)."""
    part = _PARTS[kind]
    return by_rows(lambda v: part(v.to(_F64), grad), x,
                   width=x.shape[-1] if x.dim() else 1)


class _Activation(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str) -> Tensor:
        grad = ctx.needs_input_grad[0]
        if x.numel() == 0:
            out: tuple[Tensor, ...] = (x.clone(), x.clone())
        else:  # the same bits in one pass where the native kernel runs
            got = fused.activation(KINDS.index(kind), x, grad)
            out = got if got is not None else activation_parts_torch(kind, x, grad)
        ctx.save_for_backward(out[1] if grad else None)
        return out[0]

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (dy,) = ctx.saved_tensors
        return g * dy, None


def _apply(kind: str, x: Tensor) -> Tensor:
    return apply_f32(_Activation, kind, x, kind)


def silu(x: Tensor) -> Tensor:
    """``x * sigmoid(x)`` (spec section 20)."""
    return _apply("silu", x)


def sigmoid(x: Tensor) -> Tensor:
    """``1 / (1 + exp(-x))`` (spec section 20)."""
    return _apply("sigmoid", x)


def tanh(x: Tensor) -> Tensor:
    """The hyperbolic tangent (spec section 20)."""
    return _apply("tanh", x)
