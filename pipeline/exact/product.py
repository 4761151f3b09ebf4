"""``xmmb``: the matrix product of exact mode's layers (docs/exact-spec.md,
section 12), as accurate as the exact product of the f32 operands rounded
once, and fixed by IEEE-754 alone.

The inner dimension is cut into blocks of 64. A is split per (row, block)
into two slices: ``a``, 24 bits of that block's largest magnitude, and
``a'``, the remainder's next 23 bits; B per (block, column) into ``b`` (23
bits) and ``b'`` (the next 23). Each block's two sums, ``H = a.b`` and ``X
= a'.b + a.b'``, are sums of at most 64 (128) integers times one power of
two, below ``2^53``: exact in f64 in any order, on any BLAS, thread count or
device. ``S = H + X`` is one rounded f64 addition; the blocks' ``S`` are
added left to right in f64 and rounded once to f32.

Layout of a quantised operand (``quantise_a``, ``quantise_b``): f64, the
inner dimension doubled, block by block: for A the columns ``[a' | a]`` of
each block, for B the rows ``[b ; b']``, so that one GEMM of a block's
``2L`` columns and rows is ``X`` and one of its ``a`` and ``b`` halves is
``H`` (views, no copies). A last block shorter than 64 is as long as it is
(no padding). The values are the spec's integers times their powers of two.

The quantisation uses ``ops.quantise``'s rounding trick: ``(v + M) - M``
with ``M = 1.5 * 2^(52 + s)`` rounds ``v`` to a multiple of ``2^s``, half to
even, exactly.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from . import fused
from .flat import no_autograd

__all__ = ["xmmb", "quantise_a", "quantise_b", "mm_blocks", "BLOCK"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
_EXP_MASK = 0x7FF0000000000000
BLOCK = 64            # entries of k per block (spec section 12)
_PA, _PB = 24, 23     # bits of A's and B's high slices: 64 * 2^24 * 2^23 = 2^53
_LO = 23              # the low slices' scale: 2^-23 of the high one's
_HELD = 1 << 16       # block products held at once (f64 entries, 512 KiB: cache)
_KEPT = 1 << 21       # f64 entries (16 MiB) of each work buffer a thread keeps between calls
_WORK = threading.local()  # .bufs: this thread's three work buffers (mm_blocks)


def _magic(r: Tensor, p: int) -> Tensor:
    """``1.5 * 2^(52 + e - p)`` for each block maximum ``r`` (f32, >= 0; ``e``
    its frexp exponent) as f64: ``2^(e-1)`` is read off the f64 exponent
    bits of ``r`` (f32 -> f64 is exact), ``53 - p`` added to the exponent
    field and the top mantissa bit set. A zero block gets a harmless tiny
    value (its entries stay exactly zero)."""
    return r.to(_F64).view(_I64).bitwise_and_(_EXP_MASK).add_(
        ((53 - p) << 52) | (1 << 51)).view(_F64)


def _quantised(x: Tensor, dim: int, p: int, lo_first: bool) -> Tensor:
    """f32 ``x`` split per block of 64 along ``dim`` (-1 or -2) into its two
    slices (``p`` bits of the block's largest magnitude, then the next 23),
    laid out along ``dim`` block by block as ``[lo, hi]`` (``lo_first``, A)
    or ``[hi, lo]`` (B), ``dim`` doubled. For a transposed view such as
    ``w.t()`` the result is the transposed view of a row-major buffer, so the
    conversion runs over contiguous memory and the GEMM reads either layout
    as it is. By the native kernel where there is one (pipeline.exact.fused:
    the same bits), else by ``_quantised_torch``."""
    if x.dim() >= 2 and x.stride(-1) != 1 and x.stride(-2) == 1:
        return _quantised(x.transpose(-1, -2), -3 - dim, p, lo_first).transpose(-1, -2)
    got = fused.quantise(x, dim, p, lo_first)
    return got if got is not None else _quantised_torch(x, dim, p, lo_first)


def _quantised_torch(x: Tensor, dim: int, p: int, lo_first: bool) -> Tensor:
    """``_quantised`` by torch ops (the reference the native kernel equals):
    the maximum taken in f32, the roundings in place."""
    if dim == -2:
        return _quantised_torch(x.transpose(-1, -2), -1, p, lo_first).transpose(-1, -2)
    k = x.shape[-1]
    xp = F.pad(x, (0, -k % BLOCK)) if k % BLOCK else x
    blocks = xp.unflatten(-1, (-1, BLOCK))                              # (..., T, 64)
    magic = _magic(blocks.abs().amax(-1, keepdim=True), p)
    hi = blocks.to(_F64)
    lo = hi.clone()
    hi.add_(magic).sub_(magic)
    magic.mul_(2.0 ** -_LO)                         # exact: a power of two times 1.5
    lo.sub_(hi).add_(magic).sub_(magic)             # the remainder is exact in f64
    both = torch.stack((lo, hi) if lo_first else (hi, lo), -2)          # (..., T, 2, 64)
    full, r = k // BLOCK, k % BLOCK
    out = both[..., :full, :, :].flatten(-3)
    if r:
        out = torch.cat((out, both[..., full, :, :r].flatten(-2)), -1)
    return out.contiguous()


def quantise_a(a: Tensor) -> Tensor:
    """f32 ``a (..., m, k)`` -> f64 ``(..., m, 2k)``: each row's block ``t``
    as the spec's ``[a' * 2^(sA_it - 23) | a * 2^sA_it]``."""
    return _quantised(a, -1, _PA, True)


def quantise_b(b: Tensor) -> Tensor:
    """f32 ``b (..., k, n)`` -> f64 ``(..., 2k, n)``: each column's block ``t``
    as the spec's ``[b * 2^sB_tj ; b' * 2^(sB_tj - 23)]``."""
    return _quantised(b, -2, _PB, False)


def _work(shape: tuple[int, ...], device: torch.device) -> list[Tensor]:
    """Three f64 buffers of ``shape`` for ``mm_blocks``' accumulator and block
    sums: on the CPU, up to ``_KEPT`` entries, this thread's own, kept between
    calls (a fresh buffer of a few MiB costs more in page faults than a GEMM of
    64 into it; shards on pool threads each have their own); else new ones.
    Nothing returned to a caller is one of them."""
    numel = math.prod(shape)
    if device.type != "cpu" or numel > _KEPT:
        return [torch.empty(shape, dtype=_F64, device=device) for _ in range(3)]
    held = getattr(_WORK, "bufs", None)
    if held is None or held[0].numel() < numel:
        # Normal tensors even when first needed under torch.inference_mode(): an
        # inference tensor takes no in-place update outside it (every later product failed).
        with torch.inference_mode(False):
            held = _WORK.bufs = [torch.empty(numel, dtype=_F64, device="cpu") for _ in range(3)]
    return [t[:numel].view(shape) for t in held]


def _block_sum(a: Tensor, b: Tensor, out: Tensor | None = None,
               x: Tensor | None = None) -> Tensor:
    """``S = RN64(H + X)`` of one block (or a batch of blocks) from its
    quantised columns ``a (..., m, 2L)`` and rows ``b (..., 2L, n)``: ``X`` by
    one GEMM of all of them, ``H`` by one of ``a``'s and ``b``'s halves; into
    ``out`` and ``x`` where given, else new tensors."""
    half = a.shape[-1] // 2
    h = torch.matmul(a[..., half:], b[..., :half, :], out=out)
    return h.add_(torch.matmul(a, b, out=x))


def mm_blocks(qa: Tensor, qb: Tensor) -> Tensor:
    """``RN32(Q + 0.0)`` from ``quantise_a``'s and ``quantise_b``'s operands:
    every block's ``S = RN64(H + X)`` from its exact GEMMs, the first
    block's being the accumulator; ``Q = ((S_0 + S_1) + S_2) + ...`` in f64,
    ``+ 0.0`` (a zero of either sign becomes +0, nothing else changes), one
    rounding to f32. Outputs of ``_HELD`` entries or more go block by block
    (views of the operands, two GEMMs each into work buffers), smaller ones
    a group of whole blocks per batched GEMM."""
    k2, m, n = qa.shape[-1], qa.shape[-2], qb.shape[-1]
    lead = qa.shape[:-2]
    if k2 == 0:  # k = 0: +0
        return torch.zeros(*lead, m, n, dtype=_F32, device=qa.device)
    full, r = divmod(k2 // 2, BLOCK)
    group = max(1, min(full, _HELD // max(1, m * n * math.prod(lead))))
    acc: Tensor | None = None
    if group == 1:
        acc, h, x = _work((*lead, m, n), qa.device)
        for t in range(full + (r > 0)):
            lo, hi = 2 * BLOCK * t, min(2 * BLOCK * (t + 1), k2)
            if t == 0:  # the first block's S is the accumulator
                _block_sum(qa[..., lo:hi], qb[..., lo:hi, :], acc, x)
            else:
                acc.add_(_block_sum(qa[..., lo:hi], qb[..., lo:hi, :], h, x))
        return acc.add_(0.0).to(_F32)
    if full:
        a_blocks = qa[..., :2 * BLOCK * full].unflatten(-1, (full, 2 * BLOCK)) \
            .movedim(-2, -3)                                               # (..., T, m, 128)
        b_blocks = qb[..., :2 * BLOCK * full, :].unflatten(-2, (full, 2 * BLOCK))
        for a, b in zip(a_blocks.split(group, -3), b_blocks.split(group, -3)):
            for part in _block_sum(a, b).unbind(-3):                        # (..., g, m, n)
                acc = part if acc is None else acc.add_(part)
    if r:
        last = _block_sum(qa[..., 2 * BLOCK * full:], qb[..., 2 * BLOCK * full:, :])
        acc = last if acc is None else acc.add_(last)
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
    return mm_blocks(quantise_a(a), quantise_b(b))
