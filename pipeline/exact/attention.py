"""Exact scaled dot-product attention (docs/exact-spec.md, section 14):
``xmmb`` products, the row maximum, ``xexp``, the fixed tree over keys, a
correctly rounded division, counter-based dropout of the weights (section
15), and the backward written out with the same ops. The semantics are
``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal``
(top-left aligned: query ``i`` sees keys ``j <= i``) or no mask.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from . import fused
from .blocks import by_rows
from .context import dropout_constants, next_mask, trusted
from .context import trusted_backward as _trusted_backward
from .flat import rn32, select
from .ops import tree_sum, xexp
from .product import xmmb

__all__ = ["attention"]


def _softmax(z: Tensor, allowed: Tensor) -> tuple[Tensor]:
    """Rows of ``P`` from rows of ``Z`` (spec section 14): the maximum over
    allowed keys, ``xexp``, +0 where not allowed, the fixed tree, a division."""
    e = xexp(z - select(allowed, z, -math.inf).amax(-1, keepdim=True))
    e = select(allowed, e)
    return (e.div_(tree_sum(e, -1).unsqueeze(-1)),)


def _softmax_grad(gp: Tensor, p: Tensor, allowed: Tensor) -> tuple[Tensor]:
    """Rows of ``gZ``: ``(gP - tree_sum(gP * P)) * P``, +0 where not allowed."""
    gz = (gp - tree_sum(gp * p, -1).unsqueeze(-1)).mul_(p)
    return (select(allowed, gz),)


def _allowed(z: Tensor, causal: bool) -> Tensor:
    """Bool ``z.shape``: which (query, key) pairs are attended (a broadcast view)."""
    t, s_len = z.shape[-2:]
    mask = torch.ones(t, s_len, dtype=torch.bool, device=z.device)
    return (mask.tril_() if causal else mask).expand(z.shape)


class _Attention(Function):
    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, c: float,
                keep: Tensor | None, scale_a: float) -> Tensor:
        z = xmmb(q, k.transpose(-1, -2)).mul_(c)          # (N, H, T, S)
        p = fused.softmax(z, causal)  # the same bits in one pass, where it runs
        if p is None:
            (p,) = by_rows(_softmax, z, _allowed(z, causal), width=z.shape[-1])
        pd = p if keep is None else select(keep, p * scale_a)
        ctx.save_for_backward(q, k, v, p, pd, keep)
        ctx.causal = causal
        ctx.c, ctx.scale_a = c, scale_a
        return xmmb(pd, v)                                # (N, H, T, Ev)

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, p, pd, keep = ctx.saved_tensors
        g = g.to(torch.float32)
        gpd = xmmb(g, v.transpose(-1, -2))                # (N, H, T, S)
        gv = xmmb(pd.transpose(-1, -2), g) if ctx.needs_input_grad[2] else None
        gp = gpd if keep is None else select(keep, gpd * ctx.scale_a)
        gz = fused.softmax_grad(gp, p, ctx.causal)
        if gz is None:
            (gz,) = by_rows(_softmax_grad, gp, p, _allowed(p, ctx.causal), width=p.shape[-1])
        gs = gz.mul_(ctx.c)
        gq = xmmb(gs, k) if ctx.needs_input_grad[0] else None
        gk = xmmb(gs.transpose(-1, -2), q) if ctx.needs_input_grad[1] else None
        return gq, gk, gv, None, None, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, dropout_p: float = 0.0,
              scale: float | None = None) -> Tensor:
    """Attention of ``q (N, H, T, E)`` over ``k (N, H, S, E)``, ``v (N, H, S,
    Ev)`` -> ``(N, H, T, Ev)``. ``dropout_p > 0`` drops attention weights with
    the step context's next mask (``F = H * T * S`` per row ``n``); pass 0 in
    evaluation, as with torch's function. ``scale`` defaults to ``1 /
    sqrt(E)``; both are rounded to f32."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: expected q (N, H, T, E), k (N, H, S, E), v (N, H, S, Ev), "
                         f"found {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    c = rn32(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    with trusted():
        n, h, t, s_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        keep = next_mask((n, h, t, s_len), dropout_p, q.device)
        scale_a = dropout_constants(dropout_p)[1]
        return _Attention.apply(q, k, v, causal, c, keep, scale_a)
