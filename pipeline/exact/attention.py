"""Exact scaled dot-product attention (docs/exact-spec.md, section 14):
``xmmb`` products, the row maximum, ``xexp``, the fixed tree over keys, a
correctly rounded division, counter-based dropout of the weights (section
15), and the backward written out with the same ops. The semantics are
``torch.nn.functional.scaled_dot_product_attention`` with ``is_causal``
(top-left aligned: query ``i`` sees keys ``j <= i``) or no mask, and (section
26) with a boolean mask (True: the pair takes part) or an additive f32 mask
(``-inf``: it does not), broadcast to ``(N, H, T, S)``; a query row with no
key taking part gives +0 weights, as torch's kernels do.
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

__all__ = ["attention", "mask_parts"]


def _softmax(z: Tensor, allowed: Tensor) -> tuple[Tensor]:
    """Rows of ``P`` from rows of ``Z`` (spec section 14): the maximum over
    allowed keys, ``xexp``, +0 where not allowed, the fixed tree, a division."""
    e = xexp(z - select(allowed, z, -math.inf).amax(-1, keepdim=True))
    e = select(allowed, e)
    return (e.div_(tree_sum(e, -1).unsqueeze(-1)),)


def _softmax_masked(z: Tensor, allowed: Tensor) -> tuple[Tensor]:
    """Section 26's rows of ``P``: as ``_softmax``, and a row with no allowed
    key (its sum ``s`` is +0) gives +0 weights."""
    mx = select(allowed, z, -math.inf).amax(-1, keepdim=True)
    e = select(allowed, xexp(z - select(allowed.any(-1, keepdim=True), mx)))
    s = tree_sum(e, -1).unsqueeze(-1)
    return (select(s > 0, e.div_(s)),)


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
                keep: Tensor | None, scale_a: float, allowed: Tensor | None = None,
                bias: Tensor | None = None, weights: bool = False) -> Any:
        z = xmmb(q, k.transpose(-1, -2)).mul_(c)          # (N, H, T, S)
        if bias is not None:                              # section 26: one f32 add
            z.add_(bias)
        if allowed is None:
            p = fused.softmax(z, causal)  # the same bits in one pass, where it runs
            if p is None:
                (p,) = by_rows(_softmax, z, _allowed(z, causal), width=z.shape[-1])
        else:
            allowed = allowed.expand(z.shape).contiguous()
            (p,) = by_rows(_softmax_masked, z, allowed, width=z.shape[-1])
        pd = p if keep is None else select(keep, p * scale_a)
        ctx.save_for_backward(q, k, v, p, pd, keep, allowed)
        ctx.causal = causal
        ctx.c, ctx.scale_a = c, scale_a
        ctx.set_materialize_grads(False)
        y = xmmb(pd, v)                                   # (N, H, T, Ev)
        if weights:
            return y, pd.clone()
        return y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor | None, gw: Tensor | None = None
                 ) -> tuple[Tensor | None, ...]:
        q, k, v, p, pd, keep, allowed = ctx.saved_tensors
        none = (None,) * 7  # causal, c, keep, scale_a, allowed, bias, weights
        if g is None and gw is None:
            return (None, None, None, *none)
        gv = gpd = None
        if g is not None:
            g = g.to(torch.float32)
            gpd = xmmb(g, v.transpose(-1, -2))            # (N, H, T, S)
            gv = xmmb(pd.transpose(-1, -2), g) if ctx.needs_input_grad[2] else None
        if gw is not None:                                # section 26: the weights' own
            gw = gw.to(torch.float32)
            gpd = gw.clone() if gpd is None else gpd.add_(gw)
        gp = gpd if keep is None else select(keep, gpd * ctx.scale_a)
        if allowed is None:
            gz = fused.softmax_grad(gp, p, ctx.causal)
            if gz is None:
                (gz,) = by_rows(_softmax_grad, gp, p, _allowed(p, ctx.causal),
                                width=p.shape[-1])
        else:
            (gz,) = by_rows(_softmax_grad, gp, p, allowed, width=p.shape[-1])
        gs = gz.mul_(ctx.c)
        gq = xmmb(gs, k) if ctx.needs_input_grad[0] else None
        gk = xmmb(gs.transpose(-1, -2), q) if ctx.needs_input_grad[1] else None
        if gv is None and ctx.needs_input_grad[2]:
            gv = torch.zeros_like(v)
        return gq, gk, gv, *none


def mask_parts(mask: Tensor | None, q: Tensor, what: str = "attn_mask"
               ) -> tuple[Tensor | None, Tensor | None]:
    """``(allowed, bias)`` of an SDPA-style mask (section 26): a bool mask is
    the allowed pairs (True: takes part), no bias; an f32 mask is the bias
    and its entries other than ``-inf`` the allowed pairs. Refused: another
    dtype, a gradient, ``+inf`` or NaN entries."""
    if mask is None:
        return None, None
    if not isinstance(mask, Tensor):
        raise ValueError(f"{what}: expected a tensor, found {type(mask).__name__}")
    if mask.requires_grad:
        raise ValueError(f"{what}: a mask with a gradient (a learned bias) is not supported "
                         f"by exact mode")
    if mask.dtype == torch.bool:
        return mask, None
    if mask.dtype != q.dtype:
        raise ValueError(f"{what}: expected a bool mask or one of the query's dtype {q.dtype}, "
                         f"found {mask.dtype}")
    with trusted():
        if bool(torch.isnan(mask).any()) or bool((mask == math.inf).any()):
            raise ValueError(f"{what}: entries +inf or NaN are outside exact mode's "
                             f"attention (docs/exact-spec.md, section 26)")
        return mask != -math.inf, mask


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = True, dropout_p: float = 0.0,
              scale: float | None = None, attn_mask: Tensor | None = None,
              weights: bool = False) -> Any:
    """Attention of ``q (N, H, T, E)`` over ``k (N, H, S, E)``, ``v (N, H, S,
    Ev)`` -> ``(N, H, T, Ev)``. ``dropout_p > 0`` drops attention weights with
    the step context's next mask (``F = H * T * S`` per row ``n``); pass 0 in
    evaluation, as with torch's function. ``scale`` defaults to ``1 /
    sqrt(E)``; both are rounded to f32. ``attn_mask`` (section 26): bool
    (True: takes part) or additive f32, broadcastable to ``(N, H, T, S)``;
    not with ``causal``. ``weights``: also return the (dropped-out)
    attention weights ``(N, H, T, S)``, with their gradient."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or q.shape[:2] != k.shape[:2] \
            or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: expected q (N, H, T, E), k (N, H, S, E), v (N, H, S, Ev), "
                         f"found {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if causal and attn_mask is not None:
        raise ValueError("attention: give is_causal or attn_mask, not both (as torch)")
    allowed, bias = mask_parts(attn_mask, q)
    c = rn32(scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    with trusted():
        n, h, t, s_len = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        if allowed is not None:
            try:
                shape = torch.broadcast_shapes(allowed.shape, (n, h, t, s_len))
            except RuntimeError:
                shape = None
            if shape != (n, h, t, s_len):
                raise ValueError(f"attention: attn_mask of shape {tuple(allowed.shape)} does "
                                 f"not broadcast to (N, H, T, S) = {(n, h, t, s_len)}")
        keep = next_mask((n, h, t, s_len), dropout_p, q.device)
        scale_a = dropout_constants(dropout_p)[1]
        return _Attention.apply(q, k, v, causal, c, keep, scale_a, allowed, bias, weights)
