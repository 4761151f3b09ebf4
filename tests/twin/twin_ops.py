"""The twin's Part III ops (docs/exact-spec.md, sections 20-23): SiLU, Sigmoid,
Tanh; sum, mean, softmax and log-softmax over any dims; RMSNorm; MaxPool2d,
AvgPool2d, AdaptiveAvgPool2d: forward and backward as plain functions on NumPy
arrays, written from the spec alone (as twin_layers.py: each forward returns
what its backward needs, no autograd engine).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

try:
    from . import numpy_twin as nt
    from .twin_layers import exp64
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    from twin_layers import exp64  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64

__all__ = ["sigmoid_fwd", "sigmoid_bwd", "silu_fwd", "silu_bwd", "tanh_fwd", "tanh_bwd",
           "sum_fwd", "sum_bwd", "mean_fwd", "mean_bwd", "softmax_fwd", "softmax_bwd",
           "log_softmax_fwd", "log_softmax_bwd", "rmsnorm_fwd", "rmsnorm_bwd", "fold",
           "max_pool2d_fwd", "max_pool2d_bwd", "avg_pool2d_fwd", "avg_pool2d_bwd",
           "adaptive_avg_pool2d_fwd", "adaptive_avg_pool2d_bwd", "pool_args"]


# --------------------------------------------------------------- 20. SiLU, Sigmoid, Tanh
def _d(x) -> np.ndarray:
    return np.asarray(x, dtype=F32).astype(F64)


def _logistic(d: np.ndarray):
    """(p, q) = (sigmoid(|d|), sigmoid(-|d|)) in f64, as section 20 writes them."""
    a = np.abs(d)
    E = exp64(-a)
    t = F64(1.0) + E
    return F64(1.0) / t, E / t


def _f32(v: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        return np.asarray(v, dtype=F64).astype(F32)


def sigmoid_parts(x):
    """(y, dy) of Sigmoid, both f32."""
    d = _d(x)
    p, q = _logistic(d)
    return _f32(np.where(d >= 0, p, q)), _f32(p * q)


def silu_parts(x):
    d = _d(x)
    p, q = _logistic(d)
    pos = d >= 0
    sg, sc = np.where(pos, p, q), np.where(pos, q, p)
    return _f32(d * sg), _f32((d * sc + F64(1.0)) * sg)


# T_0 .. T_7, each the correctly rounded f64 quotient (Fraction -> float rounds once)
_TANH_T = [float(Fraction(a, b)) for a, b in [
    (1, 1), (-1, 3), (2, 15), (-17, 315), (62, 2835), (-1382, 155925), (21844, 6081075),
    (-929569, 638512875)]]


def tanh_parts(x):
    with np.errstate(over="ignore", invalid="ignore"):   # the branch not taken
        return _tanh_parts(_d(x))


def _tanh_parts(d):
    a = np.abs(d)
    # the odd series (a < 0.0625)
    z = d * d
    w = np.full_like(d, F64(_TANH_T[7]))
    for n in range(6, -1, -1):
        w = w * z + F64(_TANH_T[n])
    th_s = d * w
    dth_s = F64(1.0) - th_s * th_s
    # the exponential form
    E2 = exp64(F64(-2.0) * a)
    u = F64(1.0) + E2
    th_e = (F64(1.0) - E2) / u
    th_e = np.where(d < 0, -th_e, th_e)
    dth_e = (F64(4.0) * E2) / (u * u)
    small = a < F64(0.0625)
    return _f32(np.where(small, th_s, th_e)), _f32(np.where(small, dth_s, dth_e))


def _fwd(parts):
    def f(x):
        return parts(x)[0]
    return f


def _bwd(parts):
    def f(g, x):
        return (np.asarray(g, dtype=F32) * parts(x)[1]).astype(F32)
    return f


sigmoid_fwd, sigmoid_bwd = _fwd(sigmoid_parts), _bwd(sigmoid_parts)
silu_fwd, silu_bwd = _fwd(silu_parts), _bwd(silu_parts)
tanh_fwd, tanh_bwd = _fwd(tanh_parts), _bwd(tanh_parts)


# --------------------------------------------------------------- 21. sum, mean
def _dims(ndim: int, dims) -> tuple[int, ...]:
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    dims = list(dims)
    if not dims:
        return tuple(range(ndim))
    out = sorted({d % ndim if ndim else 0 for d in dims})
    return tuple(out)


def _reduce_tree(x: np.ndarray, dims, keepdim: bool):
    """(tree sum over ``dims`` in C order of those dims, n, the kept shape)."""
    x = np.asarray(x)
    if x.ndim == 0:
        return x.copy(), 1, ()
    red = _dims(x.ndim, dims)
    kept = [d for d in range(x.ndim) if d not in red]
    n = int(np.prod([x.shape[d] for d in red], dtype=np.int64))
    moved = np.transpose(x, kept + list(red)).reshape([x.shape[d] for d in kept] + [n])
    if np.issubdtype(x.dtype, np.integer):
        s = moved.sum(axis=-1, dtype=x.dtype)     # integer arithmetic: any order
    else:
        s = nt.tree_sum(np.ascontiguousarray(moved), -1)   # n = 0 gives +0
    shape = [1 if (d in red) else x.shape[d] for d in range(x.ndim)] if keepdim else \
        [x.shape[d] for d in kept]
    return np.asarray(s).reshape(shape), n, red


def sum_fwd(x, dims=None, keepdim: bool = False) -> np.ndarray:
    return _reduce_tree(x, dims, keepdim)[0]


def _expand_back(g: np.ndarray, x_shape, red, keepdim: bool) -> np.ndarray:
    if len(x_shape) == 0:
        return np.asarray(g).reshape(())
    if not keepdim:
        g = np.expand_dims(g, tuple(red))
    return np.ascontiguousarray(np.broadcast_to(g, x_shape))


def sum_bwd(g, x_shape, dims=None, keepdim: bool = False) -> np.ndarray:
    red = _dims(len(x_shape), dims) if len(x_shape) else ()
    return _expand_back(np.asarray(g), tuple(x_shape), red, keepdim)


def mean_fwd(x, dims=None, keepdim: bool = False) -> np.ndarray:
    s, n, _ = _reduce_tree(x, dims, keepdim)
    with np.errstate(invalid="ignore"):
        return (s / np.asarray(n, dtype=s.dtype)).astype(s.dtype)


def mean_bwd(g, x_shape, dims=None, keepdim: bool = False) -> np.ndarray:
    g = np.asarray(g)
    red = _dims(len(x_shape), dims) if len(x_shape) else ()
    n = int(np.prod([x_shape[d] for d in red], dtype=np.int64)) if len(x_shape) else 1
    with np.errstate(invalid="ignore", divide="ignore"):
        gs = (g / np.asarray(n, dtype=g.dtype)).astype(g.dtype)
    return _expand_back(gs, tuple(x_shape), red, keepdim)


# --------------------------------------------------------------- 21. softmax, log-softmax
def _rows_last(x: np.ndarray, dim: int):
    x = np.asarray(x, dtype=F32)
    if x.ndim == 0:
        return x.reshape(1), None
    return np.ascontiguousarray(np.moveaxis(x, dim, -1)), dim


def _back(y: np.ndarray, dim, shape) -> np.ndarray:
    if dim is None:
        return y.reshape(shape)
    return np.ascontiguousarray(np.moveaxis(y, -1, dim))


def _softmax_core(z: np.ndarray):
    """Rows along the last dim: (dz, e, s) with s kept as size 1."""
    if z.size == 0:
        return z.copy(), z.copy(), np.zeros(z.shape[:-1] + (1,), F32)
    mx = np.max(z, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        dz = (z - mx).astype(F32)
    e = nt.xexp(dz)
    s = nt.tree_sum(e, -1)[..., None]
    return dz, e, s


def softmax_fwd(x, dim: int):
    """(y, cache); ``y = e / s`` along ``dim``."""
    shape = np.shape(x)
    z, d = _rows_last(x, dim)
    _, e, s = _softmax_core(z)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = (e / s).astype(F32)
    return _back(p, d, shape), (p, d, shape)


def softmax_bwd(g, cache):
    p, d, shape = cache
    gr, _ = _rows_last(g, d if d is not None else 0)
    gr = gr.reshape(p.shape)
    if p.size == 0:
        return _back(gr.copy(), d, shape)
    dot = nt.tree_sum((gr * p).astype(F32), -1)[..., None]
    return _back(((gr - dot) * p).astype(F32), d, shape)


def log_softmax_fwd(x, dim: int):
    shape = np.shape(x)
    z, d = _rows_last(x, dim)
    dz, e, s = _softmax_core(z)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (dz - nt.xlog(s)).astype(F32) if z.size else dz
        p = (e / s).astype(F32) if z.size else e
    return _back(y, d, shape), (p, d, shape)


def log_softmax_bwd(g, cache):
    p, d, shape = cache
    gr, _ = _rows_last(g, d if d is not None else 0)
    gr = gr.reshape(p.shape)
    if p.size == 0:
        return _back(gr.copy(), d, shape)
    tot = nt.tree_sum(gr, -1)[..., None]
    return _back((gr - p * tot).astype(F32), d, shape)


# --------------------------------------------------------------- 22. RMSNorm
EPS_F32 = float(np.finfo(F32).eps)  # 2^-23


def rmsnorm_fwd(x, normalized_shape, w=None, eps=None):
    """(y, cache). ``normalized_shape`` a tuple; ``w`` of that shape or None."""
    x = np.asarray(x, dtype=F32)
    ns = tuple(normalized_shape)
    k = len(ns)
    if tuple(x.shape[x.ndim - k:]) != ns:
        raise ValueError(f"rms_norm: shape {x.shape} does not end with {ns}")
    D = int(np.prod(ns, dtype=np.int64))
    X = x.reshape(-1, D)
    ep = F32(EPS_F32 if eps is None else float(eps))
    ms = nt.tree_sum(X * X, -1)[:, None] / F32(D)
    s = np.sqrt((ms + ep).astype(F32))
    xh = (X / s).astype(F32)
    y = xh * w.reshape(D) if w is not None else xh
    return y.astype(F32).reshape(x.shape), (xh, s, D, x.shape, ns)


def rmsnorm_bwd(g, cache, w=None):
    """(gx, gw or None)."""
    xh, s, D, shape, ns = cache
    G = np.asarray(g, dtype=F32).reshape(-1, D)
    gxh = G * w.reshape(D) if w is not None else G
    m = nt.tree_sum((gxh * xh).astype(F32), -1)[:, None] / F32(D)
    gx = ((gxh - xh * m) / s).astype(F32)
    gw = nt.tree_sum((G * xh).astype(F32), 0).reshape(ns) if w is not None else None
    return gx.reshape(shape), gw


# --------------------------------------------------------------- 23. pooling
def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def pool_args(kernel, stride=None, padding=0):
    K = _pair(kernel)
    S = K if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(stride)
    P = _pair(padding)
    if not (0 <= P[0] <= K[0] / 2 and 0 <= P[1] <= K[1] / 2):
        raise ValueError(f"padding {P} outside 0..kernel/2 of {K}")
    return K, S, P


def _windows(x: np.ndarray, K, S, P, value):
    """(win (N, C, Ho, Wo, KH*KW) in (i, j) C order, Ho, Wo)."""
    N, C, H, W = x.shape
    (KH, KW), (SH, SW), (PH, PW) = K, S, P
    Ho, Wo = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    xpad = np.full((N, C, H + 2 * PH, W + 2 * PW), value, dtype=x.dtype)
    xpad[:, :, PH:PH + H, PW:PW + W] = x
    win = np.empty((N, C, Ho, Wo, KH, KW), dtype=x.dtype)
    for i in range(KH):
        for j in range(KW):
            win[..., i, j] = xpad[:, :, i:i + SH * (Ho - 1) + 1:SH, j:j + SW * (Wo - 1) + 1:SW]
    return win.reshape(N, C, Ho, Wo, KH * KW), Ho, Wo


def fold(w: np.ndarray, x_shape, K, S, P) -> np.ndarray:
    """``w (N, C, Ho, Wo, KH, KW)`` -> gx: gpad = +0; for i, for j: gpad[i + SH oh,
    j + SW ow] += w[.., oh, ow, i, j] (one f32 add each); the unpadded interior."""
    N, C, H, W = x_shape
    (KH, KW), (SH, SW), (PH, PW) = K, S, P
    Ho, Wo = w.shape[2], w.shape[3]
    gpad = np.zeros((N, C, H + 2 * PH, W + 2 * PW), dtype=F32)
    for i in range(KH):
        for j in range(KW):
            sl = (slice(None), slice(None), slice(i, i + SH * (Ho - 1) + 1, SH),
                  slice(j, j + SW * (Wo - 1) + 1, SW))
            gpad[sl] = gpad[sl] + w[..., i, j]
    return np.ascontiguousarray(gpad[:, :, PH:PH + H, PW:PW + W])


def max_pool2d_fwd(x, kernel, stride=None, padding=0):
    x = np.asarray(x, dtype=F32)
    K, S, P = pool_args(kernel, stride, padding)
    win, Ho, Wo = _windows(x, K, S, P, F32(-np.inf))
    mx = np.max(win, axis=-1, keepdims=True)
    a = np.argmax(win == mx, axis=-1)                 # the first entry equal to the max
    y = np.take_along_axis(win, a[..., None], -1)[..., 0]  # that entry (its sign of zero)
    return y, (a, x.shape, K, S, P)


def max_pool2d_bwd(g, cache):
    a, x_shape, K, S, P = cache
    g = np.asarray(g, dtype=F32)
    KK = K[0] * K[1]
    w = np.where(np.arange(KK) == a[..., None], g[..., None], F32(0.0)).astype(F32)
    return fold(w.reshape(g.shape + K), x_shape, K, S, P)


def _avg_div(x_shape, K, S, P, Ho, Wo, count_include_pad, divisor_override):
    if divisor_override is not None:
        return np.full((Ho, Wo), int(divisor_override), np.int64)
    if count_include_pad:
        return np.full((Ho, Wo), K[0] * K[1], np.int64)
    H, W = x_shape[2], x_shape[3]
    h0 = np.arange(Ho) * S[0] - P[0]
    w0 = np.arange(Wo) * S[1] - P[1]
    rh = np.minimum(h0 + K[0], H) - np.maximum(h0, 0)
    rw = np.minimum(w0 + K[1], W) - np.maximum(w0, 0)
    return rh[:, None] * rw[None, :]


def avg_pool2d_fwd(x, kernel, stride=None, padding=0, count_include_pad=True,
                   divisor_override=None):
    x = np.asarray(x, dtype=F32)
    K, S, P = pool_args(kernel, stride, padding)
    win, Ho, Wo = _windows(x, K, S, P, F32(0.0))
    div = _avg_div(x.shape, K, S, P, Ho, Wo, count_include_pad, divisor_override).astype(F32)
    y = (nt.tree_sum(win, -1) / div).astype(F32)
    return y, (div, x.shape, K, S, P)


def avg_pool2d_bwd(g, cache):
    div, x_shape, K, S, P = cache
    s = (np.asarray(g, dtype=F32) / div).astype(F32)
    w = np.broadcast_to(s[..., None, None], s.shape + K)
    return fold(w, x_shape, K, S, P)


def _adaptive_ranges(n_in: int, n_out: int):
    return [(a * n_in // n_out, -(-((a + 1) * n_in) // n_out)) for a in range(n_out)]


def adaptive_avg_pool2d_fwd(x, output_size):
    x = np.asarray(x, dtype=F32)
    N, C, H, W = x.shape
    o = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    Ho = H if o[0] is None else int(o[0])
    Wo = W if o[1] is None else int(o[1])
    rs, cs = _adaptive_ranges(H, Ho), _adaptive_ranges(W, Wo)
    y = np.empty((N, C, Ho, Wo), F32)
    for a, (h0, h1) in enumerate(rs):
        for b, (w0, w1) in enumerate(cs):
            win = x[:, :, h0:h1, w0:w1].reshape(N, C, -1)      # C order (h, w)
            y[:, :, a, b] = nt.tree_sum(win, -1) / F32((h1 - h0) * (w1 - w0))
    return y, (rs, cs, x.shape)


def adaptive_avg_pool2d_bwd(g, cache):
    rs, cs, shape = cache
    g = np.asarray(g, dtype=F32)
    gx = np.zeros(shape, F32)
    for a, (h0, h1) in enumerate(rs):
        for b, (w0, w1) in enumerate(cs):
            share = (g[:, :, a, b] / F32((h1 - h0) * (w1 - w0))).astype(F32)
            gx[:, :, h0:h1, w0:w1] = gx[:, :, h0:h1, w0:w1] + share[:, :, None, None]
    return gx
