"""The operations of exact mode (docs/exact-spec.md, sections 4-7): the exact
matrix product, fixed summation trees, exp/log, softmax cross-entropy and the
layer forward/backward rules built from them.

Every function here is a fixed sequence of torch operations whose results
IEEE-754 determines bit for bit (``+ - * /`` and ``sqrt`` on tensors, exact
conversions, ``max``, comparisons, selects, integer arithmetic, data
movement), so the bits depend on neither the thread count, the ISA nor the
device. Forbidden on purpose: torch reductions that add floats
(``sum``/``mean``/``matmul`` on f32), fused kernels (``addcmul``, ``lerp``,
``foreach``), and torch's ``exp``/``log``/``pow``.
Pitfalls avoided:
- division by a Python scalar is done by a 0-dim tensor on the operand's
  device: CUDA turns ``x / cpu_scalar`` into ``x * (1 / scalar)``, which is
  not a correctly rounded division;
- ``torch.add``/``sub`` are never given ``alpha`` (``a + alpha * b`` may fuse).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import fused
from .consts import EXP_C, LN2_HI, LN2_LO, LOG2E, LOG_C, SQRT_HALF
from .flat import no_autograd, select

__all__ = ["xmm", "quantise", "mm_quantised", "tree_sum", "exp64", "xexp", "xlog",
           "sqrt32", "softmax_xent", "relu_dropout", "relu_dropout_grad", "im2col", "col2im"]

_F32, _F64, _I64 = torch.float32, torch.float64, torch.int64
_EXP_MASK = 0x7FF0000000000000  # the exponent field of an f64



def _bits_pow2(n: Tensor) -> Tensor:
    """``2.0 ** n`` as f64 for integral ``n`` in [-1022, 1023], built from the
    bit pattern ``(n + 1023) << 52`` (exact by construction, no pow routine)."""
    return n.to(_I64).add_(1023).bitwise_left_shift_(52).view(_F64)


def _scalar(x: Tensor, value: float) -> Tensor:
    """``value`` as a 0-dim tensor of ``x``'s dtype on ``x``'s device (a divisor
    that CUDA does not turn into a reciprocal multiply)."""
    return torch.full((), value, dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------- section 4
def _precision(k: int) -> int:
    """``p = min(24, floor((52 - c) / 2))`` with ``c = ceil(log2 k)``, so that
    ``k * 2^(2p) <= 2^52``: every partial sum of the integer GEMM is exact."""
    c = (k - 1).bit_length()
    return min(24, (52 - c) // 2)


def quantise(x: Tensor, dim: int) -> Tensor:
    """f32 ``x`` (2-D) quantised per slice along the other dim, as f64.

    The slice ``v`` (the entries along ``dim``) of ``x`` with ``r = max|v|``,
    frexp exponent ``e`` and ``s = e - p`` becomes ``round_half_even(v * 2^-s)
    * 2^s``: the spec's integers, already multiplied by their power-of-two
    scale. Exact: the rounding is ``(v + M) - M`` with ``M = 1.5 * 2^(52+s)``;
    ``|v| < 2^(s+p) << 2^(51+s)`` keeps ``v + M`` in ``[2^(52+s), 2^(53+s))``
    whose spacing is ``2^s``, so the add is one RNE rounding to a multiple of
    ``2^s`` (ties to an even multiple, as ``M / 2^s`` is even) and the
    subtraction is exact. ``2^(e-1)`` is read off ``r``'s f64 exponent bits
    (f32 subnormals are normal in f64); a zero slice gets a harmless tiny
    ``M`` and stays zero. Zeros come out as +0 (the spec's rounding can give
    -0; see ``mm_quantised`` for why the product is the same).
    Finite inputs only.
    """
    p = _precision(x.shape[dim])
    r = x.abs().amax(dim, keepdim=True).to(_F64)  # max is exact; f32 -> f64 exact
    # 2^(e-1) -> 1.5 * 2^(52 + e - p): add (53 - p) to the exponent field and
    # set the top mantissa bit (the masked mantissa is zero, so + is |).
    magic = r.view(_I64).bitwise_and_(_EXP_MASK).add_(((53 - p) << 52) | (1 << 51)).view(_F64)
    q = torch.add(x, magic)  # f64 by type promotion: x converts exactly
    return q.sub_(magic)


def mm_quantised(qa: Tensor, qb: Tensor) -> Tensor:
    """``RN32(qa @ qb)`` for ``qa = quantise(A, 1)``, ``qb = quantise(B, 0)``.

    Entry ``(i, j)`` sums products ``a_il * b_lj * 2^(sA_i + sB_j)`` of the
    spec's integers times one power of two common to the whole entry (the
    smallest, ``2^-344``, is a normal f64), so each partial sum is an integer
    of magnitude ``<= k * 2^(2p) <= 2^52`` times that power: exactly
    representable whatever the order, blocking, FMA or thread split. The f64
    GEMM therefore returns exactly ``P_ij * 2^(sA_i + sB_j)`` of the spec, and
    one conversion rounds it to f32. Adding +0.0 first makes a zero entry +0
    whether or not a BLAS kernel seeded its accumulator with a -0 product.
    """
    out = torch.empty(qa.shape[0], qb.shape[1], dtype=_F32, device=qa.device)
    return torch.add(torch.mm(qa, qb), 0.0, out=out)  # computed in f64, stored RN32


def xmm(a: Tensor, b: Tensor) -> Tensor:
    """The exact product of f32 ``a`` (m x k) and ``b`` (k x n) -> f32 (m x n),
    spec section 4: rows of ``a`` and columns of ``b`` quantised to ``p`` bits
    against their own maximum, an f64 integer GEMM (exact, see
    ``mm_quantised``), one rounding to f32. Each row of the result depends on
    that row of ``a`` and on ``b`` only."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"xmm: expected (m, k) @ (k, n), found {tuple(a.shape)} @ "
                         f"{tuple(b.shape)}")
    if a.dtype != _F32 or b.dtype != _F32:
        raise ValueError(f"xmm: expected float32 operands, found {a.dtype} and {b.dtype}")
    if a.shape[1] == 0:  # the empty sum
        return torch.zeros(a.shape[0], b.shape[1], dtype=_F32, device=a.device)
    return mm_quantised(quantise(a, 1), quantise(b, 0))


# ---------------------------------------------------------------- section 5
def tree_sum(x: Tensor, dim: int) -> Tensor:
    """The spec's fixed tree along ``dim``: neighbours ``2i, 2i+1`` are added
    (one f32 add per element), an odd last entry is carried, repeat. Every
    add is an elementwise IEEE add in a fixed pattern, so the result is
    determined; an aligned block of ``2^j`` entries is a subtree. An empty
    ``dim`` sums to +0.

    Implemented on ``dim`` padded with -0.0 to a power of two: ``v + (-0.0)``
    is ``v`` for every ``v`` (-0 included), so pairing an odd last entry with
    padding is exactly the spec's carry, and every level is one add.
    """
    dim = dim % x.dim()
    got = fused.tree_sum(x, dim)  # the same adds in one pass, where it runs
    return got if got is not None else _tree_sum_torch(x, dim)


def _tree_sum_torch(x: Tensor, dim: int) -> Tensor:
    """``tree_sum`` by torch ops (the reference the native kernel equals)."""
    dim = dim % x.dim()
    n = x.shape[dim]
    if n == 0:
        return torch.zeros(x.shape[:dim] + x.shape[dim + 1:], dtype=x.dtype, device=x.device)
    if n == 1:
        return x.select(dim, 0).clone()
    m = 1 << (n - 1).bit_length()
    if m != n:
        pad = list(x.shape)
        pad[dim] = m - n
        x = torch.cat([x, x.new_full(pad, -0.0)], dim)
    while m > 1:
        m //= 2
        a, b = x.unflatten(dim, (m, 2)).unbind(dim + 1)
        x = a + b
    return x.squeeze(dim)


def sqrt32(x: Tensor) -> Tensor:
    """Correctly rounded f32 square root (IEEE ``sqrt``; spec section 9).

    Not ``torch.sqrt``: on CPU torch computes sqrt with MKL's vector math in
    its "high accuracy" mode, which is within 1 ulp but not correctly rounded
    (about 20% of f32 results are off by one ulp here) and whose code path
    MKL picks by CPU. So: an approximation ``y`` from the f64 sqrt rounded to
    f32 (within 1 ulp of the true result), then an exact correction: with
    ``up``/``dn`` the neighbouring f32s, the midpoints ``(y + up) / 2`` and
    ``(y + dn) / 2`` have 25 bits and their squares 50, exact in f64, so
    comparing ``x`` with them decides the rounding exactly (``sqrt(x)`` is
    never a midpoint for an f32 ``x``). 0, +inf and NaN pass through.
    """
    x64 = x.to(_F64)
    y = x64.sqrt().to(_F32)
    up = torch.nextafter(y, _scalar(y, math.inf))  # broadcast 0-dim targets
    dn = torch.nextafter(y, _scalar(y, 0.0))
    y64 = y.to(_F64)
    mid_up = up.to(_F64).add_(y64).mul_(0.5)  # up + y == y + up (IEEE + commutes)
    mid_dn = dn.to(_F64).add_(y64).mul_(0.5)
    y = select(x64 > mid_up.mul_(mid_up), up, y)
    return select(x64 < mid_dn.mul_(mid_dn), dn, y)


# ---------------------------------------------------------------- section 7
def exp64(d: Tensor, inplace: bool = False) -> Tensor:
    """exp of an f64 tensor -> f64 by the spec's recipe (section 7; ``exp64``
    of section 14): clamp to [-110, 90], ``k = round(d * log2 e)``, Cody-Waite
    reduction with the split ln 2, an 11th-degree Taylor polynomial by Horner
    (each ``*`` and ``+`` a separate rounded f64 op), then ``q * 2^k`` (exact:
    a normal f64 times a power of two). NaN propagates (clamp keeps it).
    ``inplace``: ``d`` (a temporary of the caller's) holds the reduced
    argument; two buffers are reused for the rest (the same ops, fewer
    allocations: the chains stay in cache). Not differentiable (exact
    layers differentiate by their own backward): TypeError under autograd."""
    no_autograd("exp64", d)
    d = d.clamp_(-110.0, 90.0) if inplace else d.clamp(-110.0, 90.0)
    k = d.mul(LOG2E).round_()  # half to even
    tmp = torch.mul(k, LN2_HI)
    r = d.sub_(tmp).sub_(torch.mul(k, LN2_LO, out=tmp))
    q = torch.mul(r, EXP_C[11], out=tmp).add_(EXP_C[10])
    for n in range(9, -1, -1):
        q.mul_(r).add_(EXP_C[n])
    return q.mul_(_bits_pow2(k))


def xexp(x: Tensor) -> Tensor:
    """exp of f32 ``x`` -> f32: ``RN32(exp64(f64(x)))``; the one rounding to f32
    also yields subnormals, 0 and +inf correctly."""
    return exp64(x.to(_F64), inplace=x.dtype != _F64).to(_F32)


def _xlog_finite(s: Tensor) -> Tensor:
    """``xlog`` for ``s > 0`` finite (NaN propagates): frexp, mantissa moved to
    [sqrt(1/2), sqrt 2), ``u = f / (2 + f)``, the atanh series in ``u^2`` by
    Horner, recombined with the split ln 2; all separate rounded f64 ops."""
    m, e = torch.frexp(s.to(_F64))
    small = m < SQRT_HALF
    m = torch.where(small, m * 2.0, m)  # exact
    ef = e.to(_F64).sub_(small.to(_F64))  # small integers: exact
    f = m.sub_(1.0)  # exact (Sterbenz)
    u = f / (f + 2.0)
    z = u * u
    w = z * LOG_C[11]
    w.add_(LOG_C[10])
    for n in range(9, -1, -1):
        w.mul_(z).add_(LOG_C[n])
    lm = u.mul_(w).mul_(2.0)
    return (ef * LN2_LO).add_(lm).add_(ef * LN2_HI).to(_F32)


def xlog(s: Tensor) -> Tensor:
    """log of f32 ``s`` -> f32 (spec section 7); ``0 -> -inf``, ``+inf -> +inf``,
    negative or NaN -> NaN (selected, not computed)."""
    out = _xlog_finite(s)
    special = torch.where(s == 0, -math.inf, torch.where(s == math.inf, math.inf, math.nan))
    return torch.where((s > 0) & (s < math.inf), out, special.to(_F32))


def softmax_xent(logits: Tensor, labels: Tensor, n_global: int) -> tuple[Tensor, Tensor]:
    """Per-row loss ``lse_r`` (f32, (rows,)) and the gradient of the global-mean
    loss wrt ``logits`` (f32, (rows, C)), spec section 7. ``n_global`` is the
    whole step's batch size, also when ``logits`` is one shard. Determined:
    max is exact, then elementwise f32 ops, ``xexp``/``xlog`` and the fixed
    class tree; ``s >= 1`` (the max's term is exactly 1), so ``xlog``'s
    special cases cannot occur."""
    idx = labels.to(device=logits.device, dtype=_I64).view(-1, 1)
    dz = logits - logits.amax(1, keepdim=True)
    e = xexp(dz)
    s = tree_sum(e, 1)
    lse = _xlog_finite(s).sub_(dz.gather(1, idx).view(-1))
    g = e.div_(s.view(-1, 1))  # (rows, C)
    g.scatter_(1, idx, g.gather(1, idx).sub_(1.0))
    return lse, g.div_(_scalar(g, float(n_global)))


# ---------------------------------------------------------------- section 6
def relu_dropout(y: Tensor, keep: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """ReLU, then dropout where ``keep`` is given: ``y * scale`` where ``y > 0``
    and kept, +0 elsewhere (``+0 * scale`` is +0, so the fused select equals
    the two steps). Returns (output, the pass mask for ``relu_dropout_grad``);
    NaN fails ``y > 0`` and becomes +0, as the spec's comparison says."""
    mask = y > 0
    if keep is None:
        return select(mask, y), mask
    mask &= keep.to(mask.device)
    return select(mask, y * scale), mask


def relu_dropout_grad(gy: Tensor, mask: Tensor, scale: float | None) -> Tensor:
    """Backward of ``relu_dropout``: ``gy * scale`` (or ``gy``) where the mask
    passed, +0 elsewhere."""
    return select(mask, gy if scale is None else gy * scale)


def im2col(x: Tensor, kh: int, kw: int, stride: int, pad: int) -> Tensor:
    """Channels-last ``x`` (N, H, W, C) -> ``cols`` (N*Ho*Wo, C*KH*KW) with
    rows in (n, oh, ow) order and columns in (c, i, j) order: data movement
    only (zero padding, strided windows, one copy)."""
    n, h, w, c = x.shape
    xpad = x.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
    xpad[:, pad:pad + h, pad:pad + w, :] = x
    win = xpad.unfold(1, kh, stride).unfold(2, kw, stride)  # (N, Ho, Wo, C, KH, KW)
    return win.reshape(-1, c * kh * kw)


def col2im(gcols: Tensor, shape: tuple[int, int, int, int], kh: int, kw: int, stride: int,
           pad: int) -> Tensor:
    """Gradient (N, H, W, C) channels-last from ``gcols`` (N*Ho*Wo, C*KH*KW):
    the spec's shifted adds into a zero padded buffer, for ``i`` then ``j`` in
    order, one f32 add per element per ``(i, j)`` (within one ``(i, j)`` the
    targets are distinct), then the unpadded interior. Not ``F.fold``, whose
    accumulation order is unspecified."""
    n, h, w, c = shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    g6 = gcols.view(n, ho, wo, c, kh, kw)
    gpad = gcols.new_zeros(n, h + 2 * pad, w + 2 * pad, c)
    for i in range(kh):
        for j in range(kw):
            dst = gpad[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            dst += g6[:, :, :, :, i, j]
    return gpad[:, pad:pad + h, pad:pad + w, :]
