"""Exact batch normalisation and variance (docs/exact-spec.md, section 24).

``batch_norm`` is ``torch.nn.functional.batch_norm``: per channel, over the
batch and spatial entries in C order, the mean and the biased variance by
section 5's fixed tree, ``sqrt32`` and a correctly rounded division (torch's
kernels sum in an order that depends on the vector width and the thread
split, and multiply by an ``rsqrt``). In training the running statistics
are moved towards the batch's (the unbiased variance, as torch), in f64 with
one rounding each; the training loop then combines the shards' values in the
fixed tree (pipeline.exact.modnet), so every world size gives the same bits.

``xvar`` is ``torch.var`` over any dims (``correction`` an integer) by the
same trees.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd import Function

from .context import apply_trusted, trusted
from .context import trusted_backward as _trusted_backward
from .flat import rn32
from .ops import _scalar, sqrt32, tree_sum
from .reduce import _keep, reduce_dims, sum_dims

__all__ = ["batch_norm", "xvar", "channel_rows", "from_channel_rows"]

_F32, _F64 = torch.float32, torch.float64


def channel_rows(x: Tensor) -> Tensor:
    """``x (N, C, *)`` as ``(C, n)``: channel ``c``'s entries in C order of
    ``(N, *)`` (a copy)."""
    c = x.shape[1]
    return x.transpose(0, 1).reshape(c, x.numel() // c if c else 0)


def from_channel_rows(r: Tensor, shape: torch.Size) -> Tensor:
    """The inverse of ``channel_rows``: ``(C, n)`` back to ``shape (N, C, *)``."""
    moved = (shape[1], shape[0], *shape[2:])
    return r.reshape(moved).transpose(0, 1).contiguous()


def _col(t: Tensor) -> Tensor:
    return t.unsqueeze(1)


_SMALL = 4096  # per-channel vectors up to this long take the NumPy square root


def sqrt32_small(v: Tensor) -> Tensor:
    """``ops.sqrt32`` of an f32 vector, the same bits: on the CPU for a short
    vector (a channel's statistics) by NumPy's float64 square root (IEEE's
    correctly rounded ``sqrt``) rounded to f32, which is the correctly
    rounded f32 root since 53 >= 2 * 24 + 2 (double rounding is innocuous
    for the square root); one call instead of ``sqrt32``'s dozen torch ops."""
    if v.device.type != "cpu" or v.dtype != _F32 or v.numel() > _SMALL:
        return sqrt32(v)
    with np.errstate(invalid="ignore"):
        return torch.from_numpy(np.sqrt(v.numpy().astype(np.float64)).astype(np.float32))


class _BatchNorm(Function):
    """Training (``stats`` None: the batch's mean and biased variance) or
    evaluation (``stats`` = (running mean, running var)) normalisation of
    ``x (N, C, *)`` per channel, then ``* w + b``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None, eps: float,
                rm: Tensor | None, rv: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        xc = channel_rows(x)                                   # (C, n)
        n = xc.shape[1]
        if rm is None:
            fn = _scalar(xc, float(n))
            mu = tree_sum(xc, 1) / fn
            d = xc - _col(mu)
            sq = tree_sum(d * d, 1)
            var = sq / fn
        else:
            var = rv
            d = xc - _col(rm)
            mu = sq = xc.new_zeros(0)  # (no batch statistics in evaluation)
        s = sqrt32_small(var + _scalar(var, eps))
        xh = d / _col(s)
        # The output in f64 with one rounding (stock's error or below):
        # RN32(((f64(x) - f64(m)) / f64(s)) * f64(w) + f64(b)), m the mean used.
        m = rm if rm is not None else mu
        per = torch.stack([t for t in (m, s, w, b) if t is not None], 1).to(_F64)  # (C, 2-4)
        y64 = (xc.to(_F64) - per[:, :1]).div_(per[:, 1:2])
        if w is not None:
            y64.mul_(per[:, 2:3])
        if b is not None:
            y64.add_(per[:, 3:4] if w is not None else per[:, 2:3])
        y = y64.to(_F32)
        ctx.save_for_backward(xh, s, w)
        ctx.batch, ctx.shape, ctx.has_b = rm is None, x.shape, b is not None
        ctx.mark_non_differentiable(mu, sq)
        return from_channel_rows(y, x.shape), mu, sq

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor, _gmu: Any, _gsq: Any) -> tuple[Tensor | None, ...]:
        xh, s, w = ctx.saved_tensors
        g2 = channel_rows(g)
        gx = None
        if ctx.needs_input_grad[0]:
            gxh = g2 * _col(w) if w is not None else g2
            if ctx.batch:
                fn = _scalar(xh, float(xh.shape[1]))
                m1 = tree_sum(gxh, 1) / fn
                m2 = tree_sum(gxh * xh, 1) / fn
                gx2 = ((gxh - _col(m1)) - xh * _col(m2)) / _col(s)
            else:
                gx2 = gxh / _col(s)
            gx = from_channel_rows(gx2, ctx.shape)
        gw = tree_sum(g2 * xh, 1) if w is not None and ctx.needs_input_grad[1] else None
        gb = tree_sum(g2, 1) if ctx.has_b and ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None


def _update(rm: Tensor, rv: Tensor, mu: Tensor, vu: Tensor, factor: float) -> None:
    """``r = RN32((1.0 - f) * f64(r) + f * f64(stat))`` (f64, in this order)
    for the running mean and variance, in place (both in one pass)."""
    new = torch.stack((rm, rv)).to(_F64).mul_(1.0 - factor).add_(
        torch.stack((mu, vu)).to(_F64).mul_(factor)).to(_F32)
    rm.copy_(new[0])
    rv.copy_(new[1])


def batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
               weight: Tensor | None = None, bias: Tensor | None = None,
               training: bool = False, momentum: float | None = 0.1,
               eps: float = 1e-5) -> Tensor:
    """``torch.nn.functional.batch_norm`` (spec section 24): ``training``
    normalises by the batch's statistics and, where running statistics are
    given, moves them by ``momentum`` (in place; ``momentum`` None is the
    layer's cumulative average, given here as ``1 / count`` by the layer);
    otherwise the running statistics normalise."""
    with trusted():  # our own checks: not the user's forward code
        return _batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                weight: Tensor | None, bias: Tensor | None, training: bool,
                momentum: float | None, eps: float) -> Tensor:
    if x.dtype != _F32 or x.dim() < 2:
        raise TypeError(f"exact batch_norm: expected a float32 input (N, C, ...), found "
                        f"{x.dtype} of shape {tuple(x.shape)}")
    c = x.shape[1]
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None and (tuple(t.shape) != (c,) or t.dtype != _F32):
            raise RuntimeError(f"batch_norm: expected a float32 {name} of shape ({c},), found "
                               f"{t.dtype} of shape {tuple(t.shape)}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("exact batch_norm: give both running_mean and running_var, or neither")
    if not training and running_mean is None:
        raise ValueError("exact batch_norm: evaluation needs running_mean and running_var")
    ep = rn32(float(eps))
    if training:
        n = x.numel() // c if c else 0
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input "
                             f"size {list(x.shape)}")
        y, mu, sq = apply_trusted(_BatchNorm, x, weight, bias, ep, None, None)
        if running_mean is not None and momentum is not None:
            with trusted(), torch.no_grad():
                _update(running_mean, running_var, mu, sq / _scalar(sq, float(n - 1)),
                        float(momentum))
        return y
    y, _, _ = apply_trusted(_BatchNorm, x, weight, bias, ep, running_mean.detach(),
                            running_var.detach())
    return y


# ---------------------------------------------------------------- var
class _Var(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dims: tuple[int, ...], correction: int,
                keepdim: bool) -> Tensor:
        n = math.prod(x.shape[d] for d in dims)
        fn = _scalar(x, float(n))
        mu = _keep(sum_dims(x, dims) / fn, x.shape, dims)
        d = x - mu
        var = sum_dims(d * d, dims) / _scalar(x, float(n - correction))
        ctx.save_for_backward(d)
        ctx.dims, ctx.div = dims, float(n - correction)
        return _keep(var, x.shape, dims) if keepdim else var

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (d,) = ctx.saved_tensors
        q = _keep(g, d.shape, ctx.dims) / _scalar(g, ctx.div)
        return (d + d) * q, None, None, None


def xvar(x: Tensor, dim: int | Sequence[int] | None = None, *, correction: int = 1,
         keepdim: bool = False) -> Tensor:
    """``torch.var(x, dim, correction=correction, keepdim=keepdim)`` by the
    fixed trees (spec section 24); ``correction`` an integer (0: the biased
    variance, 1: the unbiased, torch's default)."""
    if x.dtype not in (_F32, _F64):
        raise TypeError(f"exact var: expected a float32 or float64 tensor, found {x.dtype}")
    if isinstance(correction, bool) or not isinstance(correction, int):
        if isinstance(correction, float) and correction.is_integer():
            correction = int(correction)
        else:
            raise ValueError(f"exact var: correction must be an integer, found {correction!r}")
    return apply_trusted(_Var, x, reduce_dims(x.dim(), dim, "var"), correction, bool(keepdim))
