"""``xmm2``: the matrix product of exact mode's layers (docs/exact-spec.md,
section 12), at least as accurate as stock fp32 and fixed by IEEE-754 alone.

B is quantised per column to 24 bits of its column maximum; A per row in two
slices of ``pa = 28 - ceil(log2 k)`` bits each against its row maximum, so
``k * 2^pa * 2^24 <= 2^52``: each slice product is an f64 GEMM of integers
times one power of two per entry whose partial sums are all exact, in any
order, on any BLAS, thread count or device. The two slices are stacked
along the rows (one GEMM with ``2m`` rows), their results added once in f64
and rounded once to f32. Leading (batch) dims are independent products.

The quantisation uses ``ops.quantise``'s rounding trick: ``(v + M) - M``
with ``M = 1.5 * 2^(52 + s)`` rounds ``v`` to a multiple of ``2^s``, half to
even, exactly; the result is the spec's integer already times ``2^s``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["xmm2", "slice_bits", "quantise_cols", "split_rows", "mm_sliced", "matmul_sliced"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
_EXP_MASK = 0x7FF0000000000000


def slice_bits(k: int) -> int:
    """``pa = 28 - ceil(log2 k)``: the bits of each of A's two slices."""
    c = (k - 1).bit_length()
    if c > 27:
        raise ValueError(f"xmm2: expected an inner dimension of at most 2^27, found {k}")
    return 28 - c


def _magic(x: Tensor, dim: int, p: int) -> Tensor:
    """``1.5 * 2^(52 + e - p)`` per slice along ``dim`` (``e`` the frexp exponent
    of the slice's largest magnitude), as f64 with ``dim`` kept: ``2^(e-1)``
    is read off the f64 exponent bits of the maximum (exact), ``53 - p``
    added to the exponent field and the top mantissa bit set. A zero slice
    gets a harmless tiny value (its entries stay exactly zero)."""
    r = x.abs().amax(dim, keepdim=True).to(_F64)  # max is exact; f32 -> f64 exact
    # (``x`` may be the f64 copy of an f32 tensor: the same maximum)
    return r.view(_I64).bitwise_and_(_EXP_MASK).add_(((53 - p) << 52) | (1 << 51)).view(_F64)


def quantise_cols(b: Tensor) -> Tensor:
    """f32 ``b (..., k, n)`` rounded per column to 24 bits of the column's
    maximum, as f64 (the spec's ``b_lj * 2^sB_j``)."""
    m = _magic(b, -2, 24)
    return torch.add(b, m).sub_(m)  # f64 by promotion; b converts exactly


def split_rows(a: Tensor, pa: int) -> Tensor:
    """f32 ``a (..., m, k)`` -> f64 ``(..., 2m, k)``: the two row slices
    ``a1 * 2^s1`` (rows ``0..m-1``) and ``a2 * 2^s2`` (rows ``m..2m-1``).
    The remainder ``a - a1 * 2^s1`` is exact in f64; its magic constant is the
    first one times ``2^-pa`` (a power of two: exact)."""
    m = a.shape[-2]
    out = torch.empty(*a.shape[:-2], 2 * m, a.shape[-1], dtype=_F64, device=a.device)
    q1, q2 = out.narrow(-2, 0, m), out.narrow(-2, m, m)
    q2.copy_(a)                                        # f32 -> f64, exact, any layout
    m1 = _magic(q2, -1, pa)
    torch.add(q2, m1, out=q1).sub_(m1)
    rem = q2.sub_(q1)                                  # exact
    m2 = m1.mul_(2.0 ** -pa)
    rem.add_(m2).sub_(m2)
    return out


def matmul_sliced(a: Tensor, qb: Tensor) -> Tensor:
    """``xmm2(a, b)`` given ``qb = quantise_cols(b)`` (which may be cached)."""
    k = a.shape[-1]
    if k == 0:
        return torch.zeros(*a.shape[:-1], qb.shape[-1], dtype=_F32, device=a.device)
    return mm_sliced(split_rows(a, slice_bits(k)), qb)


def mm_sliced(sa: Tensor, qb: Tensor) -> Tensor:
    """``RN32(P1 + P2)`` from ``split_rows``'s stacked slices and
    ``quantise_cols``' B: one f64 GEMM, the two halves added once in f64, +0
    for a zero sum (``+ 0.0`` turns a -0 into +0 and changes nothing else),
    one rounding to f32."""
    p = torch.matmul(sa, qb)
    m = sa.shape[-2] // 2
    q = p.narrow(-2, 0, m).add_(p.narrow(-2, m, m))   # f64, in place
    out = torch.empty(q.shape, dtype=_F32, device=q.device)
    return torch.add(q, 0.0, out=out)


def xmm2(a: Tensor, b: Tensor) -> Tensor:
    """The exact layer product of f32 ``a (..., m, k)`` and ``b (..., k, n)``
    -> f32 ``(..., m, n)`` (spec section 12). Each output row depends on that
    row of ``a`` and on ``b`` only, each column on ``a`` and that column of
    ``b``: shards of rows give the same bits as the whole."""
    if a.dim() < 2 or a.dim() != b.dim() or a.shape[-1] != b.shape[-2] \
            or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"xmm2: expected (..., m, k) @ (..., k, n), found {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")
    if a.dtype != _F32 or b.dtype != _F32:
        raise ValueError(f"xmm2: expected float32 operands, found {a.dtype} and {b.dtype}")
    return matmul_sliced(a, quantise_cols(b))
