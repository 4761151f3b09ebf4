"""``matmul``: an exact-mode matrix product at least as accurate as stock fp32.

The one-slice product of docs/exact-spec.md section 4 (``xmm``) keeps ``p``
bits of each row of A and column of B against that row's (column's) largest
entry, ``p = (52 - ceil(log2 K)) / 2`` (18 at K = 65536): fewer bits than
fp32 holds, so its error grows with K and a row with one entry 2^30 times
the rest loses the rest. ``matmul`` splits each operand into ``S`` integer
slices (the Ozaki scheme): slice ``k`` holds the next ``p`` bits below slice
``k - 1``, against the same per-row (per-column) scale, so the slices of A
sum exactly to A rounded to ``S * p`` bits of its row maximum. Each slice
product ``A_i @ B_j`` is an f64 GEMM of integers times one power of two whose
partial sums stay below 2^52: exact in any order, on any BLAS, thread count
or device. The products with ``i + j <= S + 1`` (the rest lie below the
result's precision) are added in a fixed order as f64 elementwise adds, and
one rounding gives f32. ``S`` follows from the operands' dynamic range, so
entries far below their row's maximum keep their own 24 bits; it is a pure
function of the operands' bits.

Not yet used by exact mode's layers (their product is ``xmm``, which the
NumPy twin and the golden hashes pin); bench/bench_matmul.py prints the
error table beside stock fp32's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops import _precision

__all__ = ["matmul", "slices_for"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
_EXP_MASK = 0x7FF0000000000000
MAX_SLICES = 8


def _exponent(r: Tensor) -> Tensor:
    """frexp exponent ``e`` of positive f64 ``r`` (``2^(e-1) <= r < 2^e``) as int64."""
    return r.view(_I64).bitwise_and(_EXP_MASK).bitwise_right_shift(52).sub(1022)


def _range_bits(x: Tensor, dim: int) -> int:
    """The most binades between a slice's largest entry and its smallest
    non-zero one (the slices along ``dim``); 0 for all-zero operands."""
    a = x.abs().to(_F64)
    big = a.amax(dim, keepdim=True)
    small = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(dim, keepdim=True)
    have = small < math.inf
    if not bool(have.any()):
        return 0
    spread = _exponent(big[have].reshape(-1)) - _exponent(small[have].reshape(-1))
    return int(spread.max())


def slices_for(a: Tensor, b: Tensor) -> int:
    """The number of slices that keeps 24 bits of every non-zero entry of
    ``a`` (rows) and ``b`` (columns) below its slice's maximum: ``ceil((24 +
    range) / p)``, at least 2, at most MAX_SLICES."""
    p = _precision(a.shape[1])
    spread = max(_range_bits(a, 1), _range_bits(b, 0))
    return max(2, min(MAX_SLICES, -(-(24 + spread) // p)))


def _split(x: Tensor, dim: int, n: int, p: int) -> list[Tensor]:
    """``n`` slices of f32 ``x`` along ``dim`` as f64, each ``round_half_even(r
    * 2^-s_k) * 2^s_k`` of the remainder ``r`` with ``s_k = e - k p`` (``e``
    the slice's frexp exponent): the rounding trick of ``ops.quantise``, with
    ``M_k = 1.5 * 2^(52 + s_k)`` (an f64 add rounds to a multiple of 2^s_k,
    the subtraction is exact). The remainder after each slice is exact in f64."""
    r = x.to(_F64)
    top = r.abs().amax(dim, keepdim=True)
    base = top.view(_I64).bitwise_and(_EXP_MASK).add(((53 - p) << 52) | (1 << 51)).view(_F64)
    out = []
    for k in range(n):
        magic = base * (2.0 ** (-k * p))  # a power-of-two factor: exact
        q = (r + magic).sub_(magic)
        out.append(q)
        r = r - q
    return out


def matmul(a: Tensor, b: Tensor, slices: int | None = None) -> Tensor:
    """f32 ``a`` (m x k) @ ``b`` (k x n) -> f32 (m x n), bits fixed by
    IEEE-754 alone; ``slices`` (default: ``slices_for(a, b)``) per operand."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: expected (m, k) @ (k, n), found {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")
    if a.dtype != _F32 or b.dtype != _F32:
        raise ValueError(f"matmul: expected float32 operands, found {a.dtype} and {b.dtype}")
    if a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=_F32, device=a.device)
    n = slices_for(a, b) if slices is None else slices
    if not 1 <= n <= MAX_SLICES:
        raise ValueError(f"matmul: expected 1 to {MAX_SLICES} slices, found {n}")
    p = _precision(a.shape[1])
    sa, sb = _split(a, 1, n, p), _split(b, 0, n, p)
    acc = torch.zeros(a.shape[0], b.shape[1], dtype=_F64, device=a.device)
    for d in range(n):  # fixed order: by diagonal i + j = d, then by i
        for i in range(d + 1):
            acc = acc + torch.mm(sa[i], sb[d - i])
    out = torch.empty(a.shape[0], b.shape[1], dtype=_F32, device=a.device)
    return torch.add(acc, 0.0, out=out)  # one rounding to f32; a zero entry is +0
