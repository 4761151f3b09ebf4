"""Exact convolutions (docs/exact-spec.md, section 25): Conv2d with a stride,
padding and dilation per dim and groups (grouped and depthwise), and Conv1d
as Conv2d on a height of one. im2col (data movement) and the layers' product
``xmmb`` per group; the backward's column fold adds kernel offset by kernel
offset (section 6's col2im order), not by ``F.fold``, whose accumulation
order is torch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from .context import apply_trusted, cached, trusted
from .context import trusted_backward as _trusted_backward
from .ops import tree_sum
from .product import mm_blocks, quantise_a, quantise_b, xmmb

__all__ = ["conv2d", "conv1d", "im2col_nd", "col2im_nd", "conv_geometry"]

Pair = tuple[int, int]


def im2col_nd(x: Tensor, k: Pair, s: Pair, p: Pair, d: Pair) -> Tensor:
    """Channels-last ``x (N, H, W, C)`` -> ``cols (N*Ho*Wo, C*KH*KW)``: rows in
    ``(n, oh, ow)`` order, columns in ``(c, i, j)`` order, entry ``xpad[n,
    oh*SH + i*DH, ow*SW + j*DW, c]`` (zero padding, one copy)."""
    n, h, w, c = x.shape
    xpad = x.new_zeros(n, h + 2 * p[0], w + 2 * p[1], c)
    xpad[:, p[0]:p[0] + h, p[1]:p[1] + w, :] = x
    span = ((k[0] - 1) * d[0] + 1, (k[1] - 1) * d[1] + 1)
    win = xpad.unfold(1, span[0], s[0]).unfold(2, span[1], s[1])  # (N, Ho, Wo, C, sH, sW)
    if d != (1, 1):
        win = win[..., ::d[0], ::d[1]]
    return win.reshape(-1, c * k[0] * k[1])


def col2im_nd(gcols: Tensor, shape: tuple[int, int, int, int], k: Pair, s: Pair, p: Pair,
              d: Pair, out: Pair) -> Tensor:
    """Channels-last ``gx (N, H, W, C)`` from ``gcols (N*Ho*Wo, C*KH*KW)``: a
    +0 padded buffer; for ``i`` then ``j`` in order, ``gpad[:, i*DH + SH*oh,
    j*DW + SW*ow, :] += gcols[row(n, oh, ow), (c, i, j)]`` for all entries at
    once (one f32 add per element; within one offset the targets are
    distinct); the unpadded interior."""
    n, h, w, c = shape
    ho, wo = out
    g6 = gcols.view(n, ho, wo, c, k[0], k[1])
    gpad = gcols.new_zeros(n, h + 2 * p[0], w + 2 * p[1], c)
    for i in range(k[0]):
        for j in range(k[1]):
            r0, c0 = i * d[0], j * d[1]
            gpad[:, r0:r0 + s[0] * (ho - 1) + 1:s[0], c0:c0 + s[1] * (wo - 1) + 1:s[1], :] += \
                g6[:, :, :, :, i, j]
    return gpad[:, p[0]:p[0] + h, p[1]:p[1] + w, :]


def conv_geometry(hw: Pair, k: Pair, s: Pair, p: Pair, d: Pair) -> Pair:
    """``(Ho, Wo)``: ``floor((H + 2 PH - DH (KH - 1) - 1) / SH) + 1``, as torch."""
    return ((hw[0] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1,
            (hw[1] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1)


class _ConvNd(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, b: Tensor | None, s: Pair, p: Pair, d: Pair,
                groups: int) -> Tensor:
        one_d = x.dim() == 3
        w0 = w  # the parameter itself: the key of its cached blocks
        if one_d:  # Conv1d: Conv2d on a height of one
            x, w = x.unsqueeze(2), w.unsqueeze(2)
        n, c, h, wd = x.shape
        o, cg, kh, kw = w.shape
        k = (kh, kw)
        ho, wo = conv_geometry((h, wd), k, s, p, d)
        cols = im2col_nd(x.permute(0, 2, 3, 1), k, s, p, d)   # (R, C*KH*KW)
        # xmmb(cols_g, Wm_g^T), the weight's blocks kept while it is unchanged
        # (the step's shards share them: pipeline.exact.context.weight_cache)
        wm = w.reshape(groups, o // groups, -1)                            # (G, Og, Cg*KK)
        qw = cached(w0, "conv blocks of W^T", lambda: quantise_b(wm.transpose(1, 2)))
        if groups == 1:
            y = mm_blocks(quantise_a(cols), qw[0])
        else:
            cg_cols = cols.view(cols.shape[0], groups, -1).transpose(0, 1)  # (G, R, Cg*KK)
            y = mm_blocks(quantise_a(cg_cols), qw).transpose(0, 1) \
                .reshape(-1, o)
        if b is not None:
            y = y + b
        ctx.save_for_backward(cols, w0)
        ctx.geom = (n, h, wd, c, k, s, p, d, (ho, wo), groups, one_d)
        ctx.has_b = b is not None
        out = y.view(n, ho, wo, o).permute(0, 3, 1, 2)
        return out.squeeze(2) if one_d else out

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        cols, w0 = ctx.saved_tensors
        n, h, wd, c, k, s, p, d, out, groups, one_d = ctx.geom
        w = w0.unsqueeze(2) if one_d else w0
        if one_d:
            g = g.unsqueeze(2)
        o = w.shape[0]
        g2 = g.permute(0, 2, 3, 1).reshape(-1, o)           # (R, O)
        gx = gw = gb = None
        if ctx.needs_input_grad[0] and o:
            qw = cached(w0, "conv blocks of W", lambda: quantise_b(w.reshape(groups, o // groups,
                                                                              -1)))
        if groups == 1:
            if ctx.needs_input_grad[0]:
                gcols = mm_blocks(quantise_a(g2), qw[0]) if o else xmmb(g2, w.reshape(o, -1))
            if ctx.needs_input_grad[1]:
                gw = xmmb(g2.t(), cols).view(w.shape)
        else:
            gg = g2.view(-1, groups, o // groups).transpose(0, 1)          # (G, R, Og)
            if ctx.needs_input_grad[0]:
                gcols = mm_blocks(quantise_a(gg), qw).transpose(0, 1) \
                    .reshape(cols.shape)                                    # (R, C*KK)
            if ctx.needs_input_grad[1]:
                cg_cols = cols.view(cols.shape[0], groups, -1).transpose(0, 1)
                gw = xmmb(gg.transpose(1, 2), cg_cols).reshape(w.shape)
        if ctx.needs_input_grad[0]:
            gx = col2im_nd(gcols, (n, h, wd, c), k, s, p, d, out).permute(0, 3, 1, 2)
            gx = gx.squeeze(2) if one_d else gx
        if gw is not None and one_d:
            gw = gw.squeeze(2)
        if ctx.has_b and ctx.needs_input_grad[2]:
            gb = tree_sum(g2, 0)
        return gx, gw, gb, None, None, None, None


def _pair(v: int | Sequence[int], what: str, dims: int) -> tuple[int, ...]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (int(v),) * dims
    t = tuple(v)
    if len(t) == 1:
        t = t * dims
    if len(t) != dims or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"exact conv: {what} must be an int or {dims} ints, found {v!r}")
    return tuple(int(i) for i in t)


def _same(k: tuple[int, ...], d: tuple[int, ...], s: tuple[int, ...]) -> tuple[int, ...]:
    """``padding="same"``: ``D (K - 1) / 2`` each side; an odd total (torch
    pads the extra entry on one side only) is refused."""
    if any(v != 1 for v in s):
        raise ValueError("padding='same' is not supported for strided convolutions")
    total = [di * (ki - 1) for ki, di in zip(k, d)]
    if any(t % 2 for t in total):
        raise ValueError(f"exact conv: padding='same' with kernel {k} and dilation {d} pads "
                         f"unevenly (one side more); give the padding as numbers")
    return tuple(t // 2 for t in total)


def _conv(what: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any,
          padding: Any, dilation: Any, groups: int, dims: int) -> Tensor:
    with trusted():  # our own checks: not the user's forward code
        return _checked_conv(what, x, weight, bias, stride, padding, dilation, groups, dims)


def _checked_conv(what: str, x: Tensor, weight: Tensor, bias: Tensor | None, stride: Any,
                  padding: Any, dilation: Any, groups: int, dims: int) -> Tensor:
    if x.dim() != dims + 2 or weight.dim() != dims + 2 or x.dtype != torch.float32:
        raise RuntimeError(f"exact {what}: expected a float32 input of {dims + 2} dims and a "
                           f"weight of {dims + 2} dims, found input {x.dtype} "
                           f"{tuple(x.shape)}, weight {tuple(weight.shape)}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"exact {what}: groups must be a positive int, found {groups!r}")
    o, cg = weight.shape[0], weight.shape[1]
    if o % groups or x.shape[1] != cg * groups:
        raise RuntimeError(f"exact {what}: expected input (N, {cg * groups}, ...) and out "
                           f"channels divisible by groups={groups} for weight of shape "
                           f"{tuple(weight.shape)}, found input {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (o,):
        raise RuntimeError(f"exact {what}: expected a bias of shape ({o},), found "
                           f"{tuple(bias.shape)}")
    k = tuple(weight.shape[2:])
    s = _pair(stride, "stride", dims)
    d = _pair(dilation, "dilation", dims)
    if isinstance(padding, str):
        if padding not in ("valid", "same"):
            raise ValueError(f"exact {what}: padding must be 'valid', 'same' or numbers, "
                             f"found {padding!r}")
        p = (0,) * dims if padding == "valid" else _same(k, d, s)
    else:
        p = _pair(padding, "padding", dims)
    if min(s) < 1 or min(d) < 1 or min(p) < 0:
        raise ValueError(f"exact {what}: expected stride >= 1, dilation >= 1 and padding >= 0, "
                         f"found stride {s}, padding {p}, dilation {d}")
    if dims == 1:
        s, p, d = (1, s[0]), (0, p[0]), (1, d[0])
        hw, kk = (1, x.shape[2]), (1, k[0])
    else:
        hw, kk = (x.shape[2], x.shape[3]), k
    ho, wo = conv_geometry(hw, kk, s, p, d)
    if ho < 1 or wo < 1:
        raise RuntimeError(f"exact {what}: the padded input {tuple(x.shape[2:])} is smaller "
                           f"than the dilated kernel {k} (dilation {d[2 - dims:]})")
    return apply_trusted(_ConvNd, x, weight, bias, s, p, d, groups)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv2d`` (spec section 25): a stride, padding
    (numbers, ``"valid"``, or an even ``"same"``) and dilation per dim, groups."""
    return _conv("conv2d", x, weight, bias, stride, padding, dilation, groups, 2)


def conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1,
           padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    """``torch.nn.functional.conv1d`` (spec section 25): Conv2d on a height of one."""
    return _conv("conv1d", x, weight, bias, stride, padding, dilation, groups, 1)
