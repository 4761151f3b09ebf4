"""The twin's layers (docs/exact-spec.md, sections 12-16): forward and backward
of each layer as plain functions on NumPy arrays, written from the spec alone.

Every function returns what its backward needs as an explicit cache; nothing
here is an autograd engine: a network (twin_charlm.py) calls the backwards in
reverse order itself and adds fan-out gradients (section 13) where it has them.

The layers' product is ``XMMB`` (looked up at each call): ``xmmb``, section
12's text (two slices of A and B). ``xmmb_v1``, the first text (one slice),
is kept as the tests' control (it gives other bits).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import numpy_twin as nt
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64
MASK = 7  # section 15's purpose tag

__all__ = ["xmmb", "xmmb_v1", "XMMB", "exp64", "sum_to", "linear_fwd", "linear_bwd",
           "embedding_fwd", "embedding_bwd",
           "layernorm_fwd", "layernorm_bwd", "gelu_fwd", "gelu_bwd", "gelu_tanh_fwd",
           "gelu_tanh_bwd", "layer_mask", "dropout_fwd", "dropout_bwd", "attention_fwd",
           "attention_bwd", "conv2d_fwd", "conv2d_bwd", "uniform_init", "normal_init"]


# --------------------------------------------------------------- 12. xmmb
BLOCK = 64            # section 12's block length along the inner dimension
_CHUNK_BYTES = 1 << 25  # at most this many bytes of block products (P) at once
# The blocks' GEMM: any exact one will do (integer sums below 2^53); only the
# sign of an exact zero sum depends on it, which a test checks by swapping it.
_gemm = np.matmul


def _checked(A, B):
    A, B = np.asarray(A), np.asarray(B)
    if A.dtype != F32 or B.dtype != F32:
        raise TypeError(f"xmmb wants float32, got {A.dtype}, {B.dtype}")
    k = A.shape[-1]
    if A.ndim < 2 or B.ndim != A.ndim or B.shape[-2] != k or A.shape[:-2] != B.shape[:-2]:
        raise ValueError(f"xmmb shapes {A.shape} @ {B.shape}")
    if k > 1 << 31:
        raise ValueError("k > 2^31 is outside the spec")
    return A, B


def _two_slices(M: np.ndarray, axis: int, bits: int):
    """Section 12's two slices of ``M`` (f64 values of f32 entries) per block along
    ``axis``: s = frexp exponent of the block's max |.| (0 for a zero block) minus
    ``bits``; hi = round_half_even(M * 2^-s); the remainder r = M - hi * 2^s
    (exact); lo = round_half_even(r * 2^-(s - 23)). Returns (hi, lo, s), s kept
    as size 1 along ``axis``."""
    _, e = np.frexp(np.max(np.abs(M), axis=axis, keepdims=True))  # frexp(0) = (0, 0)
    s = e.astype(np.int32) - np.int32(bits)
    hi = np.rint(np.ldexp(M, -s))                 # the scaling is exact; rint is RNE
    r = M - np.ldexp(hi, s)                       # exact (|r| <= 2^(s-1))
    lo = np.rint(np.ldexp(r, 23 - s))
    return hi, lo, s


def xmmb(A: np.ndarray, B: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """Blocked product of f32 ``A (..., m, k)`` and ``B (..., k, n)`` (section 12:
    two slices of A and B per block, H and X exact integer sums, one f64
    addition per block, the f64 fold left to right). ``block`` exists for the
    tests' control only; the spec's is 64."""
    return _blocked(A, B, block, low_slices=True)


def xmmb_v1(A: np.ndarray, B: np.ndarray, block: int = BLOCK) -> np.ndarray:
    """The first text of section 12 (one slice: ``a`` of 24 bits, ``b`` of 23 bits
    per block, no ``a'``/``b'``), the tests' control; ``block`` as in ``xmmb``.
    With the low slices zero, X = 0 and S = H * 2^s, the first text's block sum
    (a zero S's sign can differ, and a zero Q is +0 in both)."""
    return _blocked(A, B, block, low_slices=False)


def _blocked(A: np.ndarray, B: np.ndarray, block: int, low_slices: bool) -> np.ndarray:
    A, B = _checked(A, B)
    k = A.shape[-1]
    lead, m, n = A.shape[:-2], A.shape[-2], B.shape[-1]
    if k == 0:
        return np.zeros(lead + (m, n), dtype=F32)
    T = -(-k // block)
    pad = T * block - k       # zeros: change neither a block's maximum nor its sums
    Ad = np.concatenate([A.astype(F64), np.zeros(lead + (m, pad), F64)], axis=-1)
    Bd = np.concatenate([B.astype(F64), np.zeros(lead + (pad, n), F64)], axis=-2)
    a, a2, sA = _two_slices(Ad.reshape(lead + (m, T, block)), -1, 24)  # (..., m, T, block)
    a, a2, sA = (np.moveaxis(v, -2, -3) for v in (a, a2, sA))          # (..., T, m, .)
    b, b2, sB = _two_slices(Bd.reshape(lead + (T, block, n)), -2, 23)  # (..., T, block, n)
    if not low_slices:
        a2, b2 = np.zeros_like(a2), np.zeros_like(b2)
    # X = a b' + a' b as one product of [a | a'] and [b' ; b]; every product and
    # partial sum of H (<= 2^53) and of X (< 64 (2^46 + 2^45) < 2^53) is an
    # exact integer in f64, so the f64 GEMMs below are exact in any order.
    aa = np.concatenate([a, a2], axis=-1)                               # (..., T, m, 2 block)
    bb = np.concatenate([b2, b], axis=-2)                               # (..., T, 2 block, n)
    per = max(1, _CHUNK_BYTES // max(1, 8 * m * n * int(np.prod(lead, dtype=np.int64))))
    Q = None
    for t0 in range(0, T, per):
        t1 = min(T, t0 + per)
        H = _gemm(a[..., t0:t1, :, :], b[..., t0:t1, :, :])           # (..., c, m, n)
        X = _gemm(aa[..., t0:t1, :, :], bb[..., t0:t1, :, :])
        s = sA[..., t0:t1, :, :] + sB[..., t0:t1, :, :]
        S = np.ldexp(H, s) + np.ldexp(X, s - 23)   # both exact; one f64 rounding
        for t in range(t1 - t0):     # the f64 fold, left to right over the blocks
            Q = S[..., t, :, :] if Q is None else Q + S[..., t, :, :]
    with np.errstate(over="ignore", under="ignore"):
        return (Q + F64(0.0)).astype(F32)   # RN32(Q + 0.0): a zero Q of either sign is +0


# The product every layer below calls, looked up at each call: section 12's
# text.
XMMB = xmmb


# --------------------------------------------------------------- exp64 (14, GELU)
def exp64(t: np.ndarray) -> np.ndarray:
    """Section 7's xexp on an f64 argument without the conversions: an f64 result."""
    d = np.minimum(np.maximum(np.asarray(t, dtype=F64), F64(-110.0)), F64(90.0))
    k = np.rint(d * F64(nt.LOG2E))
    r = (d - k * F64(nt.LN2_HI)) - k * F64(nt.LN2_LO)
    q = np.full_like(d, F64(nt.E_COEF[11]))
    for n in range(10, -1, -1):
        q = q * r + F64(nt.E_COEF[n])
    ki = np.where(np.isnan(k), F64(0.0), k).astype(np.int32)
    return np.ldexp(q, ki)


# --------------------------------------------------------------- 13. sum_to
def sum_to(g: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A broadcast operand's gradient: the leading extra dims flattened (C order)
    and tree-summed, then each dim where the operand has 1 and ``g`` not,
    in increasing order, tree-summed and kept as size 1."""
    shape = tuple(shape)
    r, o = g.ndim, len(shape)
    if r > o:
        g = nt.tree_sum(g.reshape((-1,) + g.shape[r - o:]), 0)
    for d in range(o):
        if shape[d] == 1 and g.shape[d] != 1:
            g = np.expand_dims(nt.tree_sum(g, d), d)
    return g.reshape(shape)


# --------------------------------------------------------------- 14. Linear
def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, x.shape[-1]))


def linear_fwd(x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """``x (..., in)`` -> ``(..., out)``: XMMB(X, W^T) (+ b per row)."""
    Y = XMMB(_rows(x), np.ascontiguousarray(W.T))
    if b is not None:
        Y = Y + b
    return Y.reshape(x.shape[:-1] + (W.shape[0],))


def linear_bwd(g: np.ndarray, x: np.ndarray, W: np.ndarray, has_bias: bool = True):
    """(gW, gb or None, gx) from ``g (..., out)``."""
    G, X = _rows(g), _rows(x)
    gW = XMMB(np.ascontiguousarray(G.T), X)
    gb = nt.tree_sum(G, 0) if has_bias else None
    gX = XMMB(G, np.ascontiguousarray(W))
    return gW, gb, gX.reshape(x.shape)


# --------------------------------------------------------------- 14. Embedding
def embedding_fwd(idx: np.ndarray, W: np.ndarray) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.size and (idx.min() < 0 or idx.max() >= W.shape[0]):
        raise IndexError(f"embedding index outside [0, {W.shape[0]})")
    return W[idx]


def embedding_bwd(g: np.ndarray, idx: np.ndarray, V: int) -> np.ndarray:
    """Row v: section 5's tree over all P positions, those holding another index
    absent. -0.0 is IEEE addition's identity (-0 + a = a for every a, -0 + -0
    = -0), so an absent entry is a -0.0 placeholder; a row with no occurrence
    then comes out -0 and is set to +0."""
    D = g.shape[-1]
    G = g.reshape(-1, D)                                   # (P, D)
    ids = np.asarray(idx).reshape(-1)                      # (P,)
    gW = np.zeros((V, D), dtype=F32)
    for v0 in range(0, V, 16):                             # 16 rows at a time: bounded memory
        vs = np.arange(v0, min(v0 + 16, V))
        hit = ids[:, None] == vs[None, :]                  # (P, v)
        X = np.where(hit[:, :, None], G[:, None, :], F32(-0.0))  # (P, v, D)
        rows = nt.tree_sum(X, 0)
        rows[~hit.any(axis=0)] = F32(0.0)
        gW[vs] = rows
    return gW.astype(F32)


# --------------------------------------------------------------- 14. LayerNorm
def layernorm_fwd(x: np.ndarray, w: np.ndarray | None, b: np.ndarray | None, eps: float):
    D = x.shape[-1]
    fD = F32(D)
    ep = F32(float(eps))
    mu = nt.tree_sum(x, -1)[..., None] / fD
    d = x - mu
    var = nt.tree_sum(d * d, -1)[..., None] / fD
    s = np.sqrt(var + ep)
    xh = d / s
    y = xh
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y, (xh, s)


def layernorm_bwd(g: np.ndarray, cache, w: np.ndarray | None, has_bias: bool = True):
    """(gx, gw or None, gb or None)."""
    xh, s = cache
    D = g.shape[-1]
    fD = F32(D)
    gxh = g * w if w is not None else g
    m1 = nt.tree_sum(gxh, -1)[..., None] / fD
    m2 = nt.tree_sum(gxh * xh, -1)[..., None] / fD
    gx = ((gxh - m1) - xh * m2) / s
    gw = nt.tree_sum(_rows(g * xh), 0) if w is not None else None
    gb = nt.tree_sum(_rows(g), 0) if has_bias else None
    return gx, gw, gb


# --------------------------------------------------------------- 14. GELU
_NEG_SQRT_HALF = -0.7071067811865476
assert F64(-_NEG_SQRT_HALF).view(np.uint64) == np.uint64(0x3FE6A09E667F3BCD)
_INV_SQRT_2PI = 0.3989422804014327
assert F64(_INV_SQRT_2PI).view(np.uint64) == np.uint64(0x3FD9884533D43651)
_ERFC_C = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
           0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277]
_SQRT_2_PI = 0.7978845608028654


def _phi_cdf(d: np.ndarray) -> np.ndarray:
    """Phi(d) in f64 by the erfcc fit, as written in section 14."""
    z = d * F64(_NEG_SQRT_HALF)
    a = np.abs(z)
    t = F64(1.0) / (F64(1.0) + F64(0.5) * a)
    w = np.full_like(d, F64(_ERFC_C[9]))
    for n in range(8, -1, -1):
        w = w * t + F64(_ERFC_C[n])
    with np.errstate(over="ignore", invalid="ignore"):
        ec = t * exp64(w - a * a)
    return np.where(z >= 0, F64(0.5) * ec, F64(0.5) * (F64(2.0) - ec))


def gelu_fwd(x: np.ndarray) -> np.ndarray:
    d = np.asarray(x, dtype=F32).astype(F64)
    with np.errstate(over="ignore"):
        return (d * _phi_cdf(d)).astype(F32)


def gelu_bwd(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    d = np.asarray(x, dtype=F32).astype(F64)
    Phi = _phi_cdf(d)
    with np.errstate(over="ignore", invalid="ignore"):
        phi = exp64(-((d * d) * F64(0.5))) * F64(_INV_SQRT_2PI)
        dy = (Phi + d * phi).astype(F32)
    return g * dy


def _tanh_sg(d: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        u = (d + F64(0.044715) * (d * (d * d))) * F64(_SQRT_2_PI)
        E = exp64(F64(-2.0) * u)
        return F64(1.0) / (F64(1.0) + E)


def gelu_tanh_fwd(x: np.ndarray) -> np.ndarray:
    d = np.asarray(x, dtype=F32).astype(F64)
    with np.errstate(over="ignore"):
        return (d * _tanh_sg(d)).astype(F32)


def gelu_tanh_bwd(g: np.ndarray, x: np.ndarray) -> np.ndarray:
    d = np.asarray(x, dtype=F32).astype(F64)
    sg = _tanh_sg(d)
    with np.errstate(over="ignore", invalid="ignore"):
        du = (F64(1.0) + F64(0.134145) * (d * d)) * F64(_SQRT_2_PI)
        dy = (sg + ((d * F64(2.0)) * du) * (sg * (F64(1.0) - sg))).astype(F32)
    return g * dy


# --------------------------------------------------------------- 15. Dropout masks
def layer_mask(seed: int, step: int, site: int, row0: int, shape: tuple[int, ...],
               T: int) -> np.ndarray:
    """Keep-mask of a site: ``shape = (rows, ...)`` of this shard, first row = global
    row ``row0``; element j of global row g uses u24(key(seed, MASK, t, site), g*F + j)."""
    rows = shape[0]
    F = int(np.prod(shape[1:], dtype=np.int64))
    K = nt.key(seed, MASK, step, site)
    return (nt.u24(K, row0 * F, rows * F) >= T).reshape(shape)


def dropout_fwd(x: np.ndarray, keep: np.ndarray, scale: np.float32) -> np.ndarray:
    return np.where(keep, x * scale, F32(0.0)).astype(F32)


def dropout_bwd(g: np.ndarray, keep: np.ndarray, scale: np.float32) -> np.ndarray:
    return np.where(keep, g * scale, F32(0.0)).astype(F32)


# --------------------------------------------------------------- 14. attention
def _T(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def attention_fwd(q, k, v, causal: bool, scale=None, keep=None, scale_a=F32(1.0)):
    """``q (N,H,T,E)``, ``k (N,H,S,E)``, ``v (N,H,S,Ev)`` -> ``(N,H,T,Ev)``; ``keep``
    the attention dropout mask ``(N,H,T,S)`` or None."""
    E = q.shape[-1]
    c = F32(float(scale)) if scale is not None else F32(1.0 / math.sqrt(float(E)))
    Tn, S = q.shape[-2], k.shape[-2]
    allowed = (np.arange(S)[None, :] <= np.arange(Tn)[:, None]) if causal else \
        np.ones((Tn, S), dtype=bool)
    Sc = XMMB(q, _T(k))
    Z = Sc * c
    mx = np.max(np.where(allowed, Z, F32(-np.inf)), axis=-1, keepdims=True)
    with np.errstate(over="ignore", invalid="ignore"):
        dz = Z - mx
    e = np.where(allowed, nt.xexp(np.where(allowed, dz, F32(0.0))), F32(0.0))
    s = nt.tree_sum(e, -1)[..., None]
    P = e / s
    Pd = np.where(keep, P * scale_a, F32(0.0)).astype(F32) if keep is not None else P
    Y = XMMB(Pd, v)
    return Y, (q, k, v, P, Pd, allowed, c, keep, scale_a)


def attention_bwd(gY, cache):
    """(gq, gk, gv)."""
    q, k, v, P, Pd, allowed, c, keep, scale_a = cache
    gPd = XMMB(gY, _T(v))
    gv = XMMB(_T(Pd), gY)
    gP = np.where(keep, gPd * scale_a, F32(0.0)).astype(F32) if keep is not None else gPd
    dot = nt.tree_sum(gP * P, -1)[..., None]
    gZ = np.where(allowed, (gP - dot) * P, F32(0.0)).astype(F32)
    gSc = gZ * c
    gq = XMMB(gSc, k)
    gk = XMMB(_T(gSc), q)
    return gq, gk, gv


# --------------------------------------------------------------- 14. Conv2d (xmmb)
def conv2d_fwd(x, Wt, b, stride: int, pad: int):
    """Section 6's im2col convolution with xmmb; ``x (N, C, H, W)``."""
    Oc, C, KH, KW = Wt.shape
    N = x.shape[0]
    cols, Ho, Wo = nt.im2col(x, KH, KW, stride, pad)
    Wm = Wt.reshape(Oc, C * KH * KW)
    Y = XMMB(cols, np.ascontiguousarray(Wm.T))
    if b is not None:
        Y = Y + b
    y = np.ascontiguousarray(Y.reshape(N, Ho, Wo, Oc).transpose(0, 3, 1, 2))
    return y, (cols, Ho, Wo, x.shape)


def conv2d_bwd(gy, cache, Wt, stride: int, pad: int, has_bias: bool = True):
    """(gW, gb or None, gx)."""
    cols, Ho, Wo, x_shape = cache
    Oc, C, KH, KW = Wt.shape
    N, _, H, W = x_shape
    gY = np.ascontiguousarray(gy.transpose(0, 2, 3, 1)).reshape(N * Ho * Wo, Oc)
    gWm = XMMB(np.ascontiguousarray(gY.T), cols)
    gb = nt.tree_sum(gY, 0) if has_bias else None
    Wm = np.ascontiguousarray(Wt.reshape(Oc, C * KH * KW))
    gcols = XMMB(gY, Wm).reshape(N, Ho, Wo, C, KH, KW)
    gxpad = np.zeros((N, C, H + 2 * pad, W + 2 * pad), dtype=F32)
    for i in range(KH):
        for j in range(KW):
            sl = (slice(None), slice(None), slice(i, i + stride * (Ho - 1) + 1, stride),
                  slice(j, j + stride * (Wo - 1) + 1, stride))
            gxpad[sl] = gxpad[sl] + gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    gx = np.ascontiguousarray(gxpad[:, :, pad:pad + H, pad:pad + W])
    return gWm.reshape(Wt.shape), gb, gx


# --------------------------------------------------------------- 16. init
def uniform_init(seed: int, li: int, part: int, shape: tuple[int, ...], fan_in: int):
    """Section 3's uniform: ``part`` 0 the weight, 1 the bias."""
    bound = F32(1.0 / math.sqrt(float(fan_in)))
    n = int(np.prod(shape, dtype=np.int64))
    return nt._uniform(nt.key(seed, nt.INIT, li, part), n, bound).reshape(shape)


def normal_init(seed: int, li: int, shape: tuple[int, ...]) -> np.ndarray:
    """Embedding: Irwin-Hall N(0, 1), RN32(sum of 12 u24 * 2^-24 - 6.0)."""
    n = int(np.prod(shape, dtype=np.int64))
    u = nt.u24(nt.key(seed, nt.INIT, li, 0), 0, 12 * n).reshape(n, 12)
    tot = u.sum(axis=1)                                   # int64, exact
    v = tot.astype(F64) * nt.pow2(-24) - F64(6.0)          # both exact
    return v.astype(F32).reshape(shape)
