"""Exact reductions and softmax over any dimension (docs/exact-spec.md,
section 21): ``sum`` and ``mean`` over any set of dims by one fixed tree
(section 5) over the reduced entries in C order; ``softmax`` and
``log_softmax`` along any dim by the row recipe of section 7 (the row
maximum, ``xexp``, the fixed tree, a correctly rounded division, ``xlog``).
torch's own ``sum``/``mean``/``softmax`` add in an order that depends on the
vector width and the thread split, so they are not used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd import Function

from . import fused
from .blocks import by_rows
from .context import apply_trusted
from .context import trusted_backward as _trusted_backward
from .ops import _scalar, _xlog_finite, tree_sum, xexp

__all__ = ["xsum", "xmean", "softmax", "log_softmax", "reduce_dims", "sum_dims"]

_F32 = torch.float32


def reduce_dims(ndim: int, dim: int | Sequence[int] | None, what: str) -> tuple[int, ...]:
    """The reduced dims, ascending: ``None`` or an empty list means all (as
    torch reads them); negative dims count from the end; a dim out of range
    or given twice is an IndexError/RuntimeError worded as torch words it."""
    if dim is None:
        return tuple(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        return tuple(range(ndim))
    out = []
    for d in dims:
        n = max(ndim, 1)
        if not isinstance(d, int) or isinstance(d, bool) or not -n <= d < n:
            raise IndexError(f"{what}: dimension out of range (expected to be in range of "
                             f"[{-n}, {n - 1}], but got {d})")
        out.append(d % n if ndim else 0)
    if len(set(out)) != len(out):
        raise RuntimeError(f"{what}: a dim appears multiple times in the list of dims {dims}")
    return tuple(sorted(out)) if ndim else ()


def sum_dims(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Section 21's sum of ``x`` over ``dims`` (ascending), the reduced dims
    dropped: for each kept index, one ``tree_sum`` over the reduced entries
    taken in C order (the reduced dims moved to the end, flattened). Reduced
    dims that lead are summed as dim 0 of an (n, rest) view, the others as the
    last dim of a permuted copy: the same entries in the same order, so the
    same adds."""
    kept = [d for d in range(x.dim()) if d not in dims]
    kshape = [x.shape[d] for d in kept]
    n, rest = math.prod(x.shape[d] for d in dims), math.prod(kshape)
    if dims == tuple(range(len(dims))):
        out = tree_sum(x.reshape(n, rest), 0)
    else:
        out = tree_sum(x.permute(*kept, *dims).reshape(rest, n), 1)
    return out.reshape(kshape)


def _keep(y: Tensor, shape: torch.Size, dims: tuple[int, ...]) -> Tensor:
    """``y`` (the kept dims) with a size-1 dim at each reduced dim."""
    return y.reshape([1 if d in dims else s for d, s in enumerate(shape)])


class _Sum(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dims: tuple[int, ...], keepdim: bool, mean: bool) -> Tensor:
        y = sum_dims(x, dims)
        n = math.prod(x.shape[d] for d in dims)
        if mean:
            y = y / _scalar(y, float(n))
        ctx.shape, ctx.dims, ctx.mean, ctx.n = x.shape, dims, mean, n
        return _keep(y, x.shape, dims) if keepdim else y

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, None, None, None]:
        g = _keep(g, ctx.shape, ctx.dims)
        if ctx.mean:
            g = g / _scalar(g, float(ctx.n))
        return g.expand(ctx.shape).contiguous(), None, None, None


def _reduction(what: str, x: Tensor, dim: Any, keepdim: bool, dtype: Any,
               mean: bool) -> Tensor:
    if dtype is not None and dtype != x.dtype:
        raise TypeError(f"exact {what}: dtype={dtype} (a conversion inside the reduction) is "
                        f"not supported; convert the tensor first")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"exact {what}: expected a float32 or float64 tensor, found {x.dtype}")
    return apply_trusted(_Sum, x, reduce_dims(x.dim(), dim, what), bool(keepdim), mean)


def xsum(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
         dtype: Any = None) -> Tensor:
    """``x.sum(dim, keepdim)`` by the fixed tree (spec section 21)."""
    return _reduction("sum", x, dim, keepdim, dtype, False)


def xmean(x: Tensor, dim: int | Sequence[int] | None = None, keepdim: bool = False, *,
          dtype: Any = None) -> Tensor:
    """``x.mean(dim, keepdim)``: the tree sum divided by ``f32(n)`` (section 21)."""
    return _reduction("mean", x, dim, keepdim, dtype, True)


# ---------------------------------------------------------------- softmax
def _softmax_rows(z: Tensor) -> tuple[Tensor]:
    """``P`` of rows ``z (R, S)``: section 7's ``e / s`` (attention's softmax
    with every key allowed; the native kernel gives the same bits)."""
    got = fused.softmax(z, False)
    if got is not None:
        return (got,)
    e = xexp(z - z.amax(-1, keepdim=True))
    return (e.div_(tree_sum(e, -1).unsqueeze(-1)),)


def _log_softmax_rows(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(dz - xlog(s), e / s)`` of rows ``z (R, S)`` (section 21)."""
    dz = z - z.amax(-1, keepdim=True)
    e = xexp(dz)
    s = tree_sum(e, -1)
    ls = dz.sub_(_xlog_finite(s).unsqueeze(-1))
    return ls, e.div_(s.unsqueeze(-1))


def _softmax_grad_rows(g: Tensor, p: Tensor) -> tuple[Tensor]:
    got = fused.softmax_grad(g, p, False)
    if got is not None:
        return (got,)
    return ((g - tree_sum(g * p, -1).unsqueeze(-1)).mul_(p),)


def _log_softmax_grad_rows(g: Tensor, p: Tensor) -> tuple[Tensor]:
    return (g - p * tree_sum(g, -1).unsqueeze(-1),)


def _rows(x: Tensor, dim: int) -> Tensor:
    """``x`` with ``dim`` moved last, contiguous, as rows ``(R, S)``."""
    m = x.movedim(dim, -1).contiguous()
    return m.view(-1, m.shape[-1])


def _back(r: Tensor, shape: torch.Size, dim: int) -> Tensor:
    moved = list(shape)
    moved.append(moved.pop(dim))
    return r.view(moved).movedim(-1, dim)


class _Softmax(Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, dim: int, log: bool) -> Tensor:
        ctx.dim, ctx.log, ctx.shape = dim, log, x.shape
        if x.numel() == 0:
            ctx.save_for_backward(None)
            return x.clone()
        z = _rows(x, dim)
        if log:
            y, p = by_rows(_log_softmax_rows, z, width=z.shape[-1])
        else:
            (p,) = by_rows(_softmax_rows, z, width=z.shape[-1])
            y = p
        ctx.save_for_backward(p)
        return _back(y, x.shape, dim).contiguous()

    @staticmethod
    @_trusted_backward
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        (p,) = ctx.saved_tensors
        if p is None:
            return g.clone(), None, None
        rule = _log_softmax_grad_rows if ctx.log else _softmax_grad_rows
        (gz,) = by_rows(rule, _rows(g, ctx.dim), p, width=p.shape[-1])
        return _back(gz, ctx.shape, ctx.dim).contiguous(), None, None


def _softmax(what: str, x: Tensor, dim: Any, dtype: Any, log: bool) -> Tensor:
    if dim is None:
        raise ValueError(f"exact {what}: give dim explicitly (torch's implicit choice of dim "
                         f"is deprecated and depends on the input's rank)")
    if dtype is not None and dtype != x.dtype:
        raise TypeError(f"exact {what}: dtype={dtype} is not supported; convert the tensor "
                        f"first")
    if x.dtype != _F32:
        raise TypeError(f"exact {what}: expected a float32 tensor, found {x.dtype}")
    (d,) = reduce_dims(x.dim(), int(dim), what) or (0,)
    if x.dim() == 0:
        return apply_trusted(_Softmax, x.reshape(1), 0, log).reshape(())
    return apply_trusted(_Softmax, x, d, log)


def softmax(x: Tensor, dim: int | None = None, dtype: Any = None) -> Tensor:
    """``torch.softmax(x, dim)`` (spec section 21)."""
    return _softmax("softmax", x, dim, dtype, False)


def log_softmax(x: Tensor, dim: int | None = None, dtype: Any = None) -> Tensor:
    """``torch.log_softmax(x, dim)`` (spec section 21)."""
    return _softmax("log_softmax", x, dim, dtype, True)
