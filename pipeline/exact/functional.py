"""Exact layers as functions with autograd (docs/exact-spec.md, section 14):
each is a ``torch.autograd.Function`` whose forward and backward are built
only from the exact ops (``xmmb``, ``tree_sum``, ``exp64``, ``sqrt32``,
elementwise IEEE ops, data movement); see pipeline/exact/ops.py for what is
forbidden and why. Both run as trusted regions of the guard.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from . import fused
from .blocks import by_rows
from .context import apply_trusted, cached, dropout_constants, next_mask, trusted
from .context import trusted_backward as _trusted_backward
from .flat import rn32, select
from .ops import col2im, im2col, tree_sum
from .product import mm_blocks, quantise_a, quantise_b, xmmb
from .refs import gelu_parts_torch, index_tree_sum_torch, layer_norm_grad_torch, layer_norm_torch

__all__ = ["linear", "conv2d", "embedding", "layer_norm", "gelu", "relu", "dropout",
           "index_tree_sum", "apply_trusted"]

_I64 = torch.int64


def _rows(t: Tensor) -> Tensor:
    """``t (..., n)`` as ``(rows, n)``, also for ``n == 0`` (where
    ``reshape(-1, 0)`` is ambiguous)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


# ---------------------------------------------------------------- Linear
class _Linear(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        x2 = _rows(x)                                  # (R, in)
        y = mm_blocks(quantise_a(x2), cached(w, "blocks of W^T", lambda: quantise_b(w.t())))
        if b is not None:
            y = y + b
        ctx.save_for_backward(x2, w)
        ctx.x_shape, ctx.has_b = x.shape, b is not None
        return y.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x2, w = ctx.saved_tensors
        g2 = _rows(g)                                  # (R, out)
        gx = None
        if ctx.needs_input_grad[0]:
            gx = mm_blocks(quantise_a(g2), cached(w, "blocks of W", lambda: quantise_b(w)))
            gx = gx.view(ctx.x_shape)
        gw = xmmb(g2.t(), x2) if ctx.needs_input_grad[1] else None
        gb = tree_sum(g2, 0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight^T + bias`` over the last dim, exactly (spec section 14).
    Shapes are checked as torch checks them (the blocked product's operands
    are quantised separately, so a mismatch would otherwise pass)."""
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"mat1 and mat2 shapes cannot be multiplied "
                           f"({math.prod(x.shape[:-1])}x{x.shape[-1] if x.dim() else 0} and "
                           f"{'x'.join(str(d) for d in weight.shape[::-1])})")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"linear: expected a bias of shape ({weight.shape[0]},), found "
                           f"{tuple(bias.shape)}")
    return apply_trusted(_Linear, x, weight, bias)


# ---------------------------------------------------------------- Conv2d
class _Conv2d(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, stride: int,
                pad: int) -> Tensor:
        n, c, h, wd = x.shape
        o, _, kh, kw = w.shape
        cols = im2col(x.permute(0, 2, 3, 1), kh, kw, stride, pad)  # (N*Ho*Wo, C*KH*KW)
        wm = w.reshape(o, -1)
        y = xmmb(cols, wm.t())
        if b is not None:
            y = y + b
        ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
        ctx.save_for_backward(cols, w)
        ctx.geom, ctx.has_b = (n, h, wd, c, kh, kw, stride, pad), b is not None
        return y.view(n, ho, wo, o).permute(0, 3, 1, 2)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        cols, w = ctx.saved_tensors
        n, h, wd, c, kh, kw, stride, pad = ctx.geom
        o = w.shape[0]
        g2 = g.permute(0, 2, 3, 1).reshape(-1, o)      # (N*Ho*Wo, O)
        wm = w.reshape(o, -1)
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gcols = xmmb(g2, wm)
            gx = col2im(gcols, (n, h, wd, c), kh, kw, stride, pad).permute(0, 3, 1, 2)
        if ctx.needs_input_grad[1]:
            gw = xmmb(g2.t(), cols).view(w.shape)
        if ctx.has_b and ctx.needs_input_grad[2]:
            gb = tree_sum(g2, 0)
        return gx, gw, gb, None, None


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: int = 1,
           padding: int = 0) -> Tensor:
    """2-D convolution (one stride and padding for both dims, no dilation,
    one group) by im2col and ``xmmb`` (spec sections 6 and 14)."""
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        raise RuntimeError(f"conv2d: expected input (N, {weight.shape[1]}, H, W) for weight of "
                           f"shape {tuple(weight.shape)}, found {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise RuntimeError(f"conv2d: expected a bias of shape ({weight.shape[0]},), found "
                           f"{tuple(bias.shape)}")
    return apply_trusted(_Conv2d, x, weight, bias, stride, padding)


# ---------------------------------------------------------------- Embedding
def index_tree_sum(idx: Tensor, g: Tensor, rows: int) -> Tensor:
    """``out[v] = `` the sum of the rows ``g[p]`` over positions ``p`` with
    ``idx[p] == v``, in the neighbour-pairing tree over all positions where a
    position holding another index is absent (spec section 14, Embedding);
    ``+0`` for a ``v`` that never occurs. By the native kernel where there is
    one (pipeline.exact.fused: the same bits), else by
    ``refs.index_tree_sum_torch``."""
    got = fused.index_tree(idx, g, rows)
    return got if got is not None else index_tree_sum_torch(idx, g, rows)


class _Embedding(Function):
    @staticmethod
    def forward(ctx: Any, idx: Tensor, w: Tensor) -> Tensor:
        if idx.dtype not in (torch.int32, _I64) or idx.is_floating_point():
            raise TypeError(f"embedding: expected integer indices, found {idx.dtype}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= w.shape[0]):
            raise IndexError(f"embedding: indices must lie in [0, {w.shape[0]}), found "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        ctx.save_for_backward(idx)
        ctx.rows = w.shape[0]
        return w[idx.reshape(-1)].view(*idx.shape, w.shape[1])

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor]:
        (idx,) = ctx.saved_tensors
        return None, index_tree_sum(idx, _rows(g), ctx.rows)


def embedding(idx: Tensor, weight: Tensor) -> Tensor:
    """Rows of ``weight`` at integer ``idx`` (spec section 14)."""
    return apply_trusted(_Embedding, idx, weight)


# ---------------------------------------------------------------- LayerNorm
class _LayerNorm(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor | None, b: Tensor | None,
                eps: float) -> Tensor:
        x2 = _rows(x)
        got = fused.layer_norm(x2, w, b, eps)  # the same bits in one pass, where it runs
        y, xh, s = got if got is not None else layer_norm_torch(x2, w, b, eps)
        ctx.save_for_backward(xh, s, w)
        ctx.has_b = b is not None
        return y.view(x.shape)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        xh, s, w = ctx.saved_tensors
        g2 = g.reshape(xh.shape)
        gx = fused.layer_norm_grad(g2, xh, s, w)
        if gx is None:
            gx = layer_norm_grad_torch(g2, xh, s, w)
        gw = tree_sum(g2 * xh, 0) if w is not None and ctx.needs_input_grad[1] else None
        gb = tree_sum(g2, 0) if ctx.has_b and ctx.needs_input_grad[2] else None
        return gx.view(g.shape), gw, gb, None


def layer_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """LayerNorm over the last dim (spec section 14); ``eps`` is rounded to f32."""
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (x.dim() < 1 or tuple(t.shape) != (x.shape[-1],)):
            raise RuntimeError(f"layer_norm: expected a {name} of shape "
                               f"({x.shape[-1] if x.dim() else 0},), found {tuple(t.shape)}")
    return apply_trusted(_LayerNorm, x, weight, bias, rn32(eps))


# ---------------------------------------------------------------- GELU, ReLU
class _GELU(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, tanh: bool) -> Tensor:
        grad = ctx.needs_input_grad[0]
        out = fused.gelu(x, tanh, grad)  # the same bits in one pass, where it runs
        if out is None:
            out = by_rows(lambda v: tuple(t for t in gelu_parts_torch(v, tanh, grad)
                                          if t is not None),
                          x, width=x.shape[-1] if x.dim() else 1)
        ctx.save_for_backward(out[1] if grad else None)
        return out[0]

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        (dy,) = ctx.saved_tensors
        return g * dy, None


def gelu(x: Tensor, approximate: str = "none") -> Tensor:
    """GELU, erf form (``"none"``) or tanh form (spec section 14)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', found {approximate!r}")
    return apply_trusted(_GELU, x, approximate == "tanh")


class _Select(Function):
    """``x * scale`` (or ``x``) where ``mask``, +0 elsewhere; the same backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, mask: Tensor, scale: float | None) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.scale = scale
        return select(mask, x if scale is None else x * scale)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (mask,) = ctx.saved_tensors
        return select(mask, g if ctx.scale is None else g * ctx.scale), None, None


def relu(x: Tensor) -> Tensor:
    """``x`` where ``x > 0``, +0 elsewhere (spec section 6)."""
    with trusted():
        return _Select.apply(x, x > 0, None)


def dropout(x: Tensor, rate: float, training: bool) -> Tensor:
    """Dropout with the step context's next mask (spec section 15); the
    identity in evaluation (no site is taken)."""
    if not training:
        return x
    with trusted():
        keep = next_mask(tuple(x.shape), rate, x.device)
        if keep is None:
            return x
        return _Select.apply(x, keep, dropout_constants(rate)[1])
