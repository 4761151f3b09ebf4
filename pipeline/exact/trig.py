"""Exact sine and cosine (docs/exact-spec.md, section 28) and the rotary
position embedding tables built from them.

torch's ``sin``/``cos`` come from vector math libraries whose last bit depends
on the ISA and the libm (SLEEF, MKL's VML, glibc), so a table a model builds
in ``__init__`` with them differs between machines. Here the argument is
reduced by Cody-Waite's split of pi/2 in f64 (exact for ``|x| <= 2^20``), the
Taylor polynomials of section 9.1's ``cospi`` evaluate ``sin r`` and
``cos r`` on ``|r| <= pi/4`` in f64 (one rounding per ``+``/``*``), and the
result is rounded to f32 once: within about half an f32 ulp of the true value.

``rotary_tables`` builds RoPE's ``(cos, sin)`` tables: the inverse
frequencies ``base^(-2i/dim)`` by section 7's ``exp64`` and a ``log64`` (no
``pow``), the angles ``t * inv_freq`` exact in f64, then ``sincos64``. Row
``t`` depends on ``t`` alone, so a table built for ``T`` positions is the
first ``T`` rows of one built for more.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from .consts import COS_C, INV_PIO2, LN2_HI, LN2_LO, LOG_C, PIO2_1, PIO2_2, PIO2_2T, \
    SIN_C, SQRT_HALF, TRIG_MAX
from .context import apply_f32, trusted
from .context import trusted_backward as _trusted_backward
from .flat import select
from .ops import exp64
from .provenance import register_exact_constant

__all__ = ["sin", "cos", "sincos64", "log64", "rotary_inv_freq", "rotary_tables",
           "TrigRangeError"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64


class TrigRangeError(ValueError):
    """An argument outside section 28's range (``|x| > 2^20``, or infinite)."""


def _horner(coef: tuple[float, ...], z: Tensor) -> Tensor:
    """``w = coef[-1]``; ``w = w * z + coef[n]`` for n from the second last down
    to 0 (two rounded f64 ops each)."""
    w = torch.full_like(z, coef[-1])
    for c in reversed(coef[:-1]):
        w.mul_(z).add_(c)
    return w


def sincos64(d: Tensor) -> tuple[Tensor, Tensor]:
    """``(sin d, cos d)`` in f64 for f64 ``d`` with ``|d| <= 2^20`` (section 28):
    ``k = round_half_even(d * INV_PIO2)``; ``r = d`` if ``k == 0``, else
    ``((d - k * PIO2_1) - k * PIO2_2) - k * PIO2_2T``; the polynomials in
    ``z = r * r``; the quadrant ``k mod 4`` picks and negates (exactly).
    NaN gives NaN; a larger or infinite ``|d|`` raises TrigRangeError."""
    if d.dtype != _F64:
        raise TypeError(f"sincos64: expected a float64 tensor, found {d.dtype}")
    big = d.abs() > TRIG_MAX  # NaN compares false: it stays NaN below
    if bool(big.any()):
        worst = float(d.abs().masked_fill(~big, 0.0).max())
        raise TrigRangeError(
            f"exact sin/cos: |x| <= 2^20 (1048576) is specified (docs/exact-spec.md section "
            f"28), found |x| = {worst!r}: reduce the angle first, or train in pinned mode")
    k = (d * INV_PIO2).round_()                # RNE to an integral f64, |k| < 2^20
    r = d - k * PIO2_1                         # k * PIO2_1 exact; the difference exact
    r.sub_(k * PIO2_2).sub_(k * PIO2_2T)
    r = select(k == 0, d, r)                   # no reduction: sin(-0) = -0, tiny x exact
    z = r * r
    s = r * _horner(SIN_C, z)
    c = _horner(COS_C, z)
    q = k.to(_I64).bitwise_and_(3)             # k mod 4 (two's complement)
    swap = (q == 1) | (q == 3)
    sin_ = select(swap, c, s)
    cos_ = select(swap, s, c)
    sin_ = select((q == 2) | (q == 3), sin_.neg(), sin_)
    cos_ = select((q == 1) | (q == 2), cos_.neg(), cos_)
    return sin_, cos_


def log64(d: float) -> float:
    """Natural log of an f64 ``d > 0`` (finite): section 7's ``xlog`` without
    its conversions (frexp, ``u = f / (2 + f)``, the series in ``u * u``),
    an f64 result. Python floats: one rounding per operation."""
    if not (d > 0.0 and math.isfinite(d)):
        raise ValueError(f"log64: expected a finite number > 0, found {d!r}")
    m, e = math.frexp(d)
    if m < SQRT_HALF:
        m, e = m * 2.0, e - 1
    f = m - 1.0
    u = f / (2.0 + f)
    z = u * u
    w = LOG_C[11]
    for n in range(10, -1, -1):
        w = w * z + LOG_C[n]
    lm = (u * w) * 2.0
    return (e * LN2_LO + lm) + e * LN2_HI


class _SinCos(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, which: str) -> Tensor:
        s, c = sincos64(x.to(_F64))
        y, dy = (s, c) if which == "sin" else (c, s.neg_())
        ctx.save_for_backward(dy.to(_F32) if ctx.needs_input_grad[0] else None)
        return y.to(_F32)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (dy,) = ctx.saved_tensors
        return g * dy, None


def _apply(which: str, x: Tensor) -> Tensor:
    return apply_f32(_SinCos, which, x, which)


def sin(x: Tensor) -> Tensor:
    """``sin(x)`` of an f32 tensor (spec section 28), with gradient
    ``g * RN32(cos x)``."""
    return _apply("sin", x)


def cos(x: Tensor) -> Tensor:
    """``cos(x)`` of an f32 tensor (spec section 28), with gradient
    ``g * RN32(-sin x)``."""
    return _apply("cos", x)


def rotary_inv_freq(dim: int, base: float = 10000.0) -> Tensor:
    """RoPE's ``dim / 2`` inverse frequencies (f32, section 28):
    ``RN32(exp64(-((2 i) / dim) * log64(base)))`` for ``i < dim / 2`` (the
    f64 division, the product, the exact negation)."""
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2 or dim % 2:
        raise ValueError(f"rotary dim: expected an even integer >= 2, found {dim!r}")
    if not (isinstance(base, (int, float)) and math.isfinite(base) and base > 1.0):
        raise ValueError(f"rotary base: expected a finite number > 1, found {base!r}")
    lb = log64(float(base))
    e = torch.tensor([-((2.0 * i) / dim) * lb for i in range(dim // 2)], dtype=_F64)
    with trusted():
        out = exp64(e).to(_F32)
    register_exact_constant(out)
    return out


_LAYOUTS = ("half", "interleaved")


def rotary_tables(dim: int, seq_len: int, base: float = 10000.0, *,
                  layout: str = "half") -> tuple[Tensor, Tensor]:
    """``(cos, sin)``, each ``(seq_len, dim)`` f32, for rotary position
    embeddings (section 28): angle ``(t, i) = f64(t) * f64(inv_freq_i)``
    (exact: at most 20 + 24 bits), then ``sincos64`` and one rounding.
    ``layout="half"`` repeats the ``dim / 2`` columns (``[a_0 .. a_(h-1),
    a_0 .. a_(h-1)]``, for ``rotate_half``: ``x * cos + rotate_half(x) *
    sin``); ``"interleaved"`` repeats each (``[a_0, a_0, a_1, a_1, ...]``,
    for rotating pairs ``(x_2i, x_2i+1)``). The same bits on every machine;
    build them in ``__init__`` and register them (or views of them) as
    buffers: exact mode checks that a float buffer comes from here."""
    if layout not in _LAYOUTS:
        raise ValueError(f"rotary layout: expected one of {_LAYOUTS}, found {layout!r}")
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or \
            not 1 <= seq_len <= int(TRIG_MAX):
        raise ValueError(f"rotary seq_len: expected an integer in [1, 2^20], found {seq_len!r}")
    inv = rotary_inv_freq(dim, base)  # <= 1, so every angle is at most seq_len
    with trusted():
        ang = torch.arange(seq_len, dtype=_F64)[:, None] * inv.to(_F64)[None, :]
        s, c = sincos64(ang)
        c, s = c.to(_F32), s.to(_F32)
        if layout == "half":
            c, s = torch.cat([c, c], 1), torch.cat([s, s], 1)
        else:
            c, s = c.repeat_interleave(2, 1), s.repeat_interleave(2, 1)
    register_exact_constant(c)
    register_exact_constant(s)
    return c, s
