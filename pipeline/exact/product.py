"""``xmmb``: the matrix product of exact mode's layers (docs/exact-spec.md,
section 12), at least as accurate as stock fp32 and fixed by IEEE-754 alone.

The inner dimension is cut into blocks of 64. A is quantised per (row,
block) to 24 bits of that block's largest magnitude, B per (block, column)
to 23 bits, so every block's dot product is a sum of at most 64 integers
below ``2^47`` times one power of two: exact in f64 in any order, on any
BLAS, thread count or device. f64 GEMMs give the blocks' products (block
by block for large outputs, a few blocks batched for small ones); they are
added left to right over the blocks in f64 and rounded once to f32, so the
cost is one f64 GEMM of the product's size. Leading (batch) dims are
independent products.

The quantisation uses ``ops.quantise``'s rounding trick: ``(v + M) - M``
with ``M = 1.5 * 2^(52 + s)`` rounds ``v`` to a multiple of ``2^s``, half to
even, exactly; the result is the spec's integer already times ``2^s``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .flat import no_autograd

__all__ = ["xmmb", "quantise_a", "quantise_b", "mm_blocks", "BLOCK"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
_EXP_MASK = 0x7FF0000000000000
BLOCK = 64            # entries of k per block (spec section 12)
_PA, _PB = 24, 23     # bits of A's and B's entries: 64 * 2^24 * 2^23 = 2^53
_HELD = 1 << 16       # block products held at once (f64 entries, 512 KiB: cache)


def _magic(r: Tensor, p: int) -> Tensor:
    """``1.5 * 2^(52 + e - p)`` for each block maximum ``r`` (f32, >= 0; ``e``
    its frexp exponent) as f64: ``2^(e-1)`` is read off the f64 exponent
    bits of ``r`` (f32 -> f64 is exact), ``53 - p`` added to the exponent
    field and the top mantissa bit set. A zero block gets a harmless tiny
    value (its entries stay exactly zero)."""
    return r.to(_F64).view(_I64).bitwise_and_(_EXP_MASK).add_(
        ((53 - p) << 52) | (1 << 51)).view(_F64)


def _padded(x: Tensor, dim: int) -> Tensor:
    """``x`` with ``dim`` (-1 or -2) padded with +0 to a multiple of BLOCK
    (``x`` itself if it is one already)."""
    extra = -x.shape[dim] % BLOCK
    if not extra:
        return x
    return F.pad(x, (0, extra) if dim == -1 else (0, 0, 0, extra))


def _quantised(x: Tensor, dim: int, p: int) -> Tensor:
    """f64 ``x`` rounded per block of 64 along ``dim`` (-1 or -2) to ``p``
    bits of the block's largest magnitude, padded with +0 to whole blocks,
    laid out as ``x`` is: row-major, or (for a transposed view such as
    ``w.t()``) the transposed view of a row-major buffer, so the conversion
    and rounding run over contiguous memory and the GEMM reads either layout
    as it is. By the native kernel where there is one (pipeline.exact.fused:
    the same bits), else by ``_quantised_torch``."""
    if x.dim() >= 2 and x.stride(-1) != 1 and x.stride(-2) == 1:
        return _quantised(x.transpose(-1, -2), -3 - dim, p).transpose(-1, -2)
    got = fused.quantise(x, dim, p)
    return got if got is not None else _quantised_torch(x, dim, p)


def _quantised_torch(x: Tensor, dim: int, p: int) -> Tensor:
    """``_quantised`` by torch ops (the reference the native kernel equals):
    the maximum taken in f32, the rounding in place."""
    xp = _padded(x, dim)
    magic = _magic(xp.unflatten(dim, (-1, BLOCK)).abs().amax(dim, keepdim=True), p)
    out = torch.empty(xp.shape, dtype=_F64, device=x.device).copy_(xp)
    out.unflatten(dim, (-1, BLOCK)).add_(magic).sub_(magic)
    return out


def quantise_a(a: Tensor) -> Tensor:
    """f32 ``a (..., m, k)`` -> f64 ``(..., m, 64 T)``: each row's block ``t``
    rounded to 24 bits of its largest magnitude (the spec's ``a_il *
    2^sA_it``); a last block shorter than 64 is padded with +0."""
    return _quantised(a, -1, _PA)


def quantise_b(b: Tensor) -> Tensor:
    """f32 ``b (..., k, n)`` -> f64 ``(..., 64 T, n)``: each column's block
    ``t`` rounded to 23 bits of its largest magnitude; padded with +0."""
    return _quantised(b, -2, _PB)


def mm_blocks(qa: Tensor, qb: Tensor, k: int | None = None) -> Tensor:
    """``RN32(Q + 0.0)`` from ``quantise_a``'s and ``quantise_b``'s operands:
    every block's exact product by an f64 GEMM, the first block's product
    being the accumulator; ``Q = ((S_0 + S_1) + S_2) + ...`` in f64, ``+
    0.0`` (a zero of either sign becomes +0, nothing else changes), one
    rounding to f32. Outputs of ``_HELD`` entries or more go block by block
    (views of the operands, one GEMM each into one reused buffer), smaller
    ones a group of blocks per batched GEMM. ``k``: the inner dimension
    before padding, if known; the GEMM of a last block shorter than 64 then
    leaves its padding out (+0 entries add nothing to an exact sum)."""
    t, m, n = qa.shape[-1] // BLOCK, qa.shape[-2], qb.shape[-1]
    group = max(1, min(t, _HELD // max(1, m * n * math.prod(qa.shape[:-2]))))
    if group == 1:
        if k is not None and k < qa.shape[-1]:
            qa, qb = qa[..., :k], qb[..., :k, :]
        a_blocks, b_blocks = qa.split(BLOCK, -1), qb.split(BLOCK, -2)
        acc = torch.matmul(a_blocks[0], b_blocks[0])
        buf = torch.empty_like(acc) if t > 1 else acc
        for a, b in zip(a_blocks[1:], b_blocks[1:]):
            acc.add_(torch.matmul(a, b, out=buf))
        return acc.add_(0.0).to(_F32)
    a_blocks = qa.unflatten(-1, (t, BLOCK)).movedim(-2, -3)          # (..., T, m, 64)
    b_blocks = qb.unflatten(-2, (t, BLOCK))                          # (..., T, 64, n)
    acc = buf = None
    for a, b in zip(a_blocks.split(group, -3), b_blocks.split(group, -3)):
        reuse = buf is not None and a.shape[-3] == buf.shape[-3]
        p = torch.matmul(a, b, out=buf) if reuse else torch.matmul(a, b)  # (..., g, m, n)
        parts = p.unbind(-3)
        if acc is None:  # the first block's product is the accumulator: p is not reused
            acc, parts = parts[0], parts[1:]
        else:
            buf = p
        for part in parts:
            acc.add_(part)
    assert acc is not None
    return acc.add_(0.0).to(_F32)


def xmmb(a: Tensor, b: Tensor) -> Tensor:
    """The exact layer product of f32 ``a (..., m, k)`` and ``b (..., k, n)``
    -> f32 ``(..., m, n)`` (spec section 12). Each output row depends on that
    row of ``a`` and on ``b`` only, each column on ``a`` and that column of
    ``b``: shards of rows give the same bits as the whole."""
    if a.dim() < 2 or a.dim() != b.dim() or a.shape[-1] != b.shape[-2] \
            or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"xmmb: expected (..., m, k) @ (..., k, n), found {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")
    if a.dtype != _F32 or b.dtype != _F32:
        raise ValueError(f"xmmb: expected float32 operands, found {a.dtype} and {b.dtype}")
    no_autograd("xmmb", a, b)
    if a.shape[-1] == 0:
        return torch.zeros(*a.shape[:-1], b.shape[-1], dtype=_F32, device=a.device)
    return mm_blocks(quantise_a(a), quantise_b(b), a.shape[-1])
