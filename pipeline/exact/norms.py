"""Exact RMSNorm (docs/exact-spec.md, section 22): per row over the
normalised dims, the mean square by the fixed tree, ``sqrt32``, a correctly
rounded division (torch's kernel multiplies by an ``rsqrt`` whose last bit is
the vector library's), and the backward written out with the same ops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from .context import apply_trusted
from .context import trusted_backward as _trusted_backward
from .flat import rn32
from .ops import _scalar, sqrt32, tree_sum

__all__ = ["rms_norm", "rms_norm_torch", "rms_norm_grad_torch", "F32_EPS"]

F32_EPS = 2.0**-23  # torch.finfo(torch.float32).eps: torch's eps when none is given


def rms_norm_torch(x2: Tensor, w: Tensor | None, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm of rows ``x2 (R, D)``: ``(y, xh, s)``, ``s`` of shape (R, 1);
    ``eps`` already RN32."""
    fd = _scalar(x2, float(x2.shape[1]))
    ms = tree_sum(x2 * x2, 1) / fd
    s = sqrt32(ms + _scalar(ms, eps)).unsqueeze(1)
    xh = x2 / s
    return (xh * w if w is not None else xh), xh, s


def rms_norm_grad_torch(g2: Tensor, xh: Tensor, s: Tensor, w: Tensor | None) -> Tensor:
    """The input gradient: ``((gxh - xh * m) / s)``, ``m = tree_sum(gxh * xh) / f32(D)``."""
    gxh = g2 * w if w is not None else g2
    m = (tree_sum(gxh * xh, 1) / _scalar(xh, float(xh.shape[1]))).unsqueeze(1)
    return (gxh - xh * m) / s


class _RMSNorm(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, eps: float, k: int) -> Tensor:
        d = math.prod(x.shape[x.dim() - k:])
        x2 = x.reshape(math.prod(x.shape[:x.dim() - k]), d)
        w2 = w.reshape(d) if w is not None else None
        y, xh, s = rms_norm_torch(x2, w2, eps)
        ctx.save_for_backward(xh, s, w2)
        ctx.w_shape = w.shape if w is not None else None
        return y.view(x.shape)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        xh, s, w2 = ctx.saved_tensors
        g2 = g.reshape(xh.shape)
        gx = rms_norm_grad_torch(g2, xh, s, w2).view(g.shape) if ctx.needs_input_grad[0] \
            else None
        gw = None
        if w2 is not None and ctx.needs_input_grad[1]:
            gw = tree_sum(g2 * xh, 0).view(ctx.w_shape)
        return gx, gw, None, None


def rms_norm(x: Tensor, normalized_shape: int | Sequence[int], weight: Tensor | None = None,
             eps: float | None = None) -> Tensor:
    """``torch.nn.functional.rms_norm``: over the last ``len(normalized_shape)``
    dims (flattened in C order), ``eps`` None meaning float32's machine
    epsilon as in torch; rounded to f32 (spec section 22)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    k = len(shape)
    if x.dtype != torch.float32:
        raise TypeError(f"exact rms_norm: expected a float32 tensor, found {x.dtype}")
    if k == 0 or x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise RuntimeError(f"rms_norm: expected an input whose last dims are {list(shape)}, "
                           f"found shape {tuple(x.shape)}")
    if weight is not None and tuple(weight.shape) != shape:
        raise RuntimeError(f"rms_norm: expected a weight of shape {tuple(shape)}, found "
                           f"{tuple(weight.shape)}")
    return apply_trusted(_RMSNorm, x, weight, rn32(F32_EPS if eps is None else float(eps)), k)
