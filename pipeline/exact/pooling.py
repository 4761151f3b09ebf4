"""Exact 2-D pooling (docs/exact-spec.md, section 23): MaxPool2d, AvgPool2d
and AdaptiveAvgPool2d on ``x (N, C, H, W)``. Windows are read as data
movement; a maximum is exact; a window's sum is section 5's tree over its
entries in C order; the backward adds each window's share into the input
gradient in a fixed order (kernel offset by offset, as col2im of section 6),
not by ``index_add``/``scatter_add``, whose order is torch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from .context import apply_trusted, trusted
from .context import trusted_backward as _trusted_backward
from .flat import select
from .ops import _scalar, tree_sum

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "pair"]

Pair = tuple[int, int]


def pair(v: int | Sequence[int], what: str) -> Pair:
    """``v`` as (H, W): one int for both dims, or a pair."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v, v
    t = tuple(v)
    if len(t) == 1:
        t = (t[0], t[0])
    if len(t) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in t):
        raise ValueError(f"exact pooling: {what} must be an int or a pair of ints, found {v!r}")
    return int(t[0]), int(t[1])


def _windows(x: Tensor, k: Pair, s: Pair, p: Pair, fill: float) -> Tensor:
    """``x (N, C, H, W)`` padded by ``p`` with ``fill`` -> windows ``(N, C,
    Ho, Wo, KH * KW)``, entries in (i, j) C order (a copy)."""
    n, c, h, w = x.shape
    xp = x.new_full((n, c, h + 2 * p[0], w + 2 * p[1]), fill)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    win = xp.unfold(2, k[0], s[0]).unfold(3, k[1], s[1])   # (N, C, Ho, Wo, KH, KW)
    return win.reshape(*win.shape[:4], k[0] * k[1])


def _fold(gw: Tensor, shape: torch.Size, k: Pair, s: Pair, p: Pair) -> Tensor:
    """The input gradient from per-window shares ``gw (N, C, Ho, Wo, KH *
    KW)``: a +0 padded buffer; for ``i`` then ``j`` in order, the shares of
    offset ``(i, j)`` of every window added at once (one f32 add per
    element; within one offset the targets are distinct); the interior."""
    n, c, h, w = shape
    ho, wo = gw.shape[2], gw.shape[3]
    g6 = gw.view(n, c, ho, wo, k[0], k[1])
    gp = gw.new_zeros(n, c, h + 2 * p[0], w + 2 * p[1])
    for i in range(k[0]):
        for j in range(k[1]):
            gp[:, :, i:i + s[0] * (ho - 1) + 1:s[0], j:j + s[1] * (wo - 1) + 1:s[1]] += \
                g6[..., i, j]
    return gp[:, :, p[0]:p[0] + h, p[1]:p[1] + w]


def _check(x: Tensor, k: Pair, s: Pair, p: Pair, what: str) -> None:
    if x.dim() != 4 or x.dtype != torch.float32:
        raise TypeError(f"exact {what}: expected a float32 input (N, C, H, W), found "
                        f"{x.dtype} of shape {tuple(x.shape)}")
    if min(k) < 1 or min(s) < 1 or min(p) < 0 or p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(f"exact {what}: expected kernel >= 1, stride >= 1 and 0 <= padding <= "
                         f"kernel / 2 (torch's rule), found kernel {k}, stride {s}, padding {p}")
    if x.shape[2] + 2 * p[0] < k[0] or x.shape[3] + 2 * p[1] < k[1]:
        raise RuntimeError(f"exact {what}: the padded input {tuple(x.shape[2:])} + 2 * {p} is "
                           f"smaller than the kernel {k}")


# ---------------------------------------------------------------- MaxPool2d
class _MaxPool(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Pair, s: Pair, p: Pair) -> Tensor:
        win = _windows(x, k, s, p, float("-inf"))
        y = win.amax(-1)
        # the first offset in C order holding the maximum (torch's choice on ties)
        first = (win == y.unsqueeze(-1)).to(torch.uint8).argmax(-1)
        ctx.save_for_backward(first)
        ctx.geom = (x.shape, k, s, p)
        return y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None]:
        (first,) = ctx.saved_tensors
        shape, k, s, p = ctx.geom
        hit = torch.arange(k[0] * k[1], device=g.device) == first.unsqueeze(-1)
        gw = select(hit, g.unsqueeze(-1).expand(hit.shape).contiguous())
        return _fold(gw, shape, k, s, p), None, None, None


def max_pool2d(x: Tensor, kernel_size: int | Sequence[int], stride: Any = None,
               padding: int | Sequence[int] = 0) -> Tensor:
    """Max pooling (spec section 23), no dilation, floor mode, no indices."""
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else pair(stride, "stride")
    p = pair(padding, "padding")
    _check(x, k, s, p, "max_pool2d")
    return apply_trusted(_MaxPool, x, k, s, p)


# ---------------------------------------------------------------- AvgPool2d
def _counts(shape: torch.Size, k: Pair, s: Pair, p: Pair, device: torch.device) -> Tensor:
    """Per output (Ho, Wo): how many window entries lie inside the input."""
    def along(n: int, kk: int, ss: int, pp: int) -> Tensor:
        start = torch.arange((n + 2 * pp - kk) // ss + 1, device=device) * ss - pp
        return (start + kk).clamp(max=n) - start.clamp(min=0)
    return along(shape[2], k[0], s[0], p[0]).unsqueeze(1) * \
        along(shape[3], k[1], s[1], p[1]).unsqueeze(0)


class _AvgPool(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, k: Pair, s: Pair, p: Pair, div: Tensor) -> Tensor:
        y = tree_sum(_windows(x, k, s, p, 0.0), -1) / div
        ctx.save_for_backward(div)
        ctx.geom = (x.shape, k, s, p)
        return y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None, None, None]:
        (div,) = ctx.saved_tensors
        shape, k, s, p = ctx.geom
        share = (g / div).unsqueeze(-1).expand(*g.shape, k[0] * k[1]).contiguous()
        return _fold(share, shape, k, s, p), None, None, None, None


def avg_pool2d(x: Tensor, kernel_size: int | Sequence[int], stride: Any = None,
               padding: int | Sequence[int] = 0, count_include_pad: bool = True,
               divisor_override: int | None = None) -> Tensor:
    """Average pooling (spec section 23), floor mode."""
    k = pair(kernel_size, "kernel_size")
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) \
        else pair(stride, "stride")
    p = pair(padding, "padding")
    _check(x, k, s, p, "avg_pool2d")
    if divisor_override is not None and (isinstance(divisor_override, bool)
                                         or int(divisor_override) < 1):
        raise ValueError(f"exact avg_pool2d: divisor_override must be a positive int, "
                         f"found {divisor_override!r}")
    with trusted():
        if divisor_override is not None:
            div = _scalar(x, float(divisor_override))
        elif count_include_pad:
            div = _scalar(x, float(k[0] * k[1]))
        else:
            div = _counts(x.shape, k, s, p, x.device).to(torch.float32)
        return _AvgPool.apply(x, k, s, p, div)


# ---------------------------------------------------------------- AdaptiveAvgPool2d
def _bounds(n: int, out: int) -> list[tuple[int, int]]:
    """torch's adaptive windows: ``[floor(i n / out), ceil((i + 1) n / out))``."""
    return [((i * n) // out, -((-(i + 1) * n) // out)) for i in range(out)]


class _AdaptiveAvg(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Pair) -> Tensor:
        n, c, h, w = x.shape
        rows, cols = _bounds(h, out[0]), _bounds(w, out[1])
        y = x.new_empty(n, c, out[0], out[1])
        for a, (h0, h1) in enumerate(rows):
            for b, (w0, w1) in enumerate(cols):
                cnt = (h1 - h0) * (w1 - w0)
                win = x[:, :, h0:h1, w0:w1].reshape(n, c, cnt)
                y[:, :, a, b] = tree_sum(win, -1) / _scalar(x, float(cnt))
        ctx.geom = (x.shape, rows, cols)
        return y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        shape, rows, cols = ctx.geom
        gx = g.new_zeros(shape)
        for a, (h0, h1) in enumerate(rows):          # outputs in C order
            for b, (w0, w1) in enumerate(cols):
                cnt = (h1 - h0) * (w1 - w0)
                gx[:, :, h0:h1, w0:w1] += (g[:, :, a, b] / _scalar(g, float(cnt)))[:, :, None, None]
        return gx, None


def adaptive_avg_pool2d(x: Tensor, output_size: int | Sequence[int | None]) -> Tensor:
    """Adaptive average pooling (spec section 23); a None size keeps the
    input's."""
    if x.dim() != 4 or x.dtype != torch.float32:
        raise TypeError(f"exact adaptive_avg_pool2d: expected a float32 input (N, C, H, W), "
                        f"found {x.dtype} of shape {tuple(x.shape)}")
    sizes = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(sizes) != 2:
        raise ValueError(f"exact adaptive_avg_pool2d: output_size must be an int or a pair, "
                         f"found {output_size!r}")
    out = (x.shape[2] if sizes[0] is None else int(sizes[0]),
           x.shape[3] if sizes[1] is None else int(sizes[1]))
    if min(out) < 1 or min(x.shape[2:]) < 1:
        raise ValueError(f"exact adaptive_avg_pool2d: expected positive sizes, found input "
                         f"{tuple(x.shape[2:])} and output {out}")
    return apply_trusted(_AdaptiveAvg, x, out)
