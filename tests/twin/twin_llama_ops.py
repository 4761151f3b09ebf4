"""The twin's ops for the llama example (docs/exact-spec.md, Part IV and a second
reading of section 21), written from the spec alone:

- section 28: ``sincos64``, ``sin``/``cos`` (forward and derivative), ``log64``,
  the rotary inverse frequencies and tables, and the rotary application of
  ``examples/llama/model.py`` (``x * cos + rotate_half(x) * sin``: data
  movement and section 13's elementwise ops) with its backward;
- section 29: the gradient of a value with several consumers;
- section 21: sum, mean, softmax and log-softmax over any dims (an independent
  reading beside twin_ops.py's; the tests compare the two and the pipeline).

Plain functions on NumPy arrays; every ``+ - * /`` is one rounded IEEE op in
the order the spec writes it (NumPy never fuses them).
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import numpy_twin as nt
    from .twin_layers import exp64
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    from twin_layers import exp64  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64

__all__ = ["INV_PIO2", "PIO2_1", "PIO2_2", "PIO2_2T", "C_COEF", "S_COEF", "sincos64",
           "sin_parts", "cos_parts", "sin_fwd", "sin_bwd", "cos_fwd", "cos_bwd", "log64",
           "rotary_inv_freq", "rotary_tables", "rotate_half", "rope_fwd", "rope_bwd",
           "consumers_grad", "xsum", "xsum_bwd", "xmean", "xmean_bwd", "softmax",
           "softmax_bwd", "log_softmax", "log_softmax_bwd"]

# ---------------------------------------------------------------- 28. constants
INV_PIO2 = float.fromhex("0x1.45f306dc9c883p-1")    # 2/pi
PIO2_1 = float.fromhex("0x1.921fb54400000p+0")      # pi/2: 33 bits,
PIO2_2 = float.fromhex("0x1.0b4611a600000p-34")     # the next 33 bits,
PIO2_2T = float.fromhex("0x1.3198a2e037073p-69")    # and the rest


def _sgn(n: int) -> float:
    return 1.0 if n % 2 == 0 else -1.0


# Section 9.1's C_n = s_n * (1.0 / (2n)!) and S_n = s_n * (1.0 / (2n+1)!): k! for
# k <= 18 is an exact f64 (an exact int, converted exactly), one rounded division,
# an exact sign.
C_COEF = [_sgn(n) * (1.0 / float(math.factorial(2 * n))) for n in range(10)]
S_COEF = [_sgn(n) * (1.0 / float(math.factorial(2 * n + 1))) for n in range(9)]
LIMIT = 2.0 ** 20


def sincos64(d) -> tuple[np.ndarray, np.ndarray]:
    """(sin, cos) of f64 ``d`` (|d| <= 2^20) by section 28's reduction and
    polynomials; NaN gives NaN; a larger |d| or an infinity is refused."""
    d = np.asarray(d, dtype=F64)
    fin = d[~np.isnan(d)]
    if fin.size and not np.all(np.abs(fin) <= LIMIT):
        raise ValueError(f"sincos64: |d| up to {float(np.max(np.abs(fin)))!r} is outside "
                         f"the spec's |d| <= 2^20")
    nan = np.isnan(d)
    dd = np.where(nan, F64(0.0), d)
    k = np.rint(dd * F64(INV_PIO2))                         # the product, then RNE
    r_gen = ((dd - k * F64(PIO2_1)) - k * F64(PIO2_2)) - k * F64(PIO2_2T)
    r = np.where(k == 0, dd, r_gen)                         # k == 0: r = d (keeps -0)
    z = r * r
    w = np.full_like(r, F64(S_COEF[8]))
    for n in range(7, -1, -1):
        w = w * z + F64(S_COEF[n])
    s = r * w
    w = np.full_like(r, F64(C_COEF[9]))
    for n in range(8, -1, -1):
        w = w * z + F64(C_COEF[n])
    c = w
    q = np.mod(k.astype(np.int64), 4)                       # 0..3, also for k < 0
    sin = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    sin = np.where(nan, F64(np.nan), sin)
    cos = np.where(nan, F64(np.nan), cos)
    return sin, cos


def _f32(v) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        return np.asarray(v, dtype=F64).astype(F32)


def sin_parts(x):
    """(y, dy) of ``sin`` on f32 ``x``: RN32(S), RN32(C)."""
    S, C = sincos64(np.asarray(x, dtype=F32).astype(F64))
    return _f32(S), _f32(C)


def cos_parts(x):
    """(y, dy) of ``cos`` on f32 ``x``: RN32(C), RN32(-S)."""
    S, C = sincos64(np.asarray(x, dtype=F32).astype(F64))
    return _f32(C), _f32(-S)


def sin_fwd(x):
    return sin_parts(x)[0]


def cos_fwd(x):
    return cos_parts(x)[0]


def sin_bwd(g, x):
    return (np.asarray(g, dtype=F32) * sin_parts(x)[1]).astype(F32)


def cos_bwd(g, x):
    return (np.asarray(g, dtype=F32) * cos_parts(x)[1]).astype(F32)


# ---------------------------------------------------------------- 28. log64
def log64(b) -> np.ndarray:
    """Section 7's xlog without its conversions, for f64 ``b > 0`` finite."""
    b = np.asarray(b, dtype=F64)
    if not np.all((b > 0) & np.isfinite(b)):
        raise ValueError("log64 wants finite b > 0")
    m0, e = np.frexp(b)                                     # b = m0 * 2^e, 0.5 <= m0 < 1
    small = m0 < F64(nt.SQRT_HALF)
    m = np.where(small, m0 * F64(2.0), m0)
    e = np.where(small, e - 1, e).astype(F64)
    f = m - F64(1.0)                                        # exact
    u = f / (F64(2.0) + f)
    z = u * u
    w = np.full_like(b, F64(1.0 / 23.0))                    # D_11 = 1 / (2*11 + 1)
    for n in range(10, -1, -1):
        w = w * z + F64(1.0 / float(2 * n + 1))
    lm = (u * w) * F64(2.0)
    return (e * F64(nt.LN2_LO) + lm) + e * F64(nt.LN2_HI)


# ---------------------------------------------------------------- 28. rotary tables
def rotary_inv_freq(dim: int, base: float = 10000.0) -> np.ndarray:
    """``RN32(exp64(-((2.0 * i) / dim) * log64(base)))`` for ``i < dim / 2``."""
    if dim < 2 or dim % 2:
        raise ValueError(f"rotary dim must be even and >= 2, got {dim}")
    if not float(base) > 1.0:
        raise ValueError(f"rotary base must be > 1, got {base!r}")
    lb = log64(F64(float(base)))
    i = np.arange(dim // 2, dtype=F64)
    frac = (F64(2.0) * i) / F64(dim)                        # 2.0 * i exact; the division
    arg = -(frac * lb)                                      # the product, exact negation
    return _f32(exp64(arg))


def rotary_tables(dim: int, T: int, base: float = 10000.0,
                  layout: str = "half") -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each ``(T, dim)`` f32."""
    if not 1 <= T <= 1 << 20:
        raise ValueError(f"rotary length must be in [1, 2^20], got {T}")
    inv = rotary_inv_freq(dim, base).astype(F64)
    ang = np.arange(T, dtype=F64)[:, None] * inv[None, :]  # exact (<= 20 + 24 bits)
    S, C = sincos64(ang)
    cos, sin = _f32(C), _f32(S)
    if layout == "half":
        return np.concatenate([cos, cos], 1), np.concatenate([sin, sin], 1)
    if layout == "interleaved":
        return np.repeat(cos, 2, axis=1), np.repeat(sin, 2, axis=1)
    raise ValueError(f"unknown rotary layout {layout!r}")


def rotate_half(x: np.ndarray) -> np.ndarray:
    """``cat(-x2, x1)`` of the halves of the last dim (negation exact)."""
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def rope_fwd(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x * cos + rotate_half(x) * sin`` (tables ``(T, E)`` broadcast over the
    leading dims): two f32 products and one f32 add per element."""
    return ((x * cos) + (rotate_half(x) * sin)).astype(F32)


def rope_bwd(g: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """``x`` has two consumers (the product with ``cos``, then ``chunk``):
    ``g * cos`` plus the gradient through ``rotate_half``: with ``gr = g *
    sin``, ``chunk``'s backward is ``cat(gr[h:], -gr[:h])`` (the gradient of
    ``x1`` is cat's second half, of ``x2`` the negated first half)."""
    h = g.shape[-1] // 2
    gr = g * sin
    via_rot = np.concatenate([gr[..., h:], -gr[..., :h]], axis=-1)
    return consumers_grad([g * cos, via_rot])


# ---------------------------------------------------------------- 29. several consumers
def consumers_grad(grads: list) -> np.ndarray:
    """A value's gradient from its consumers' gradients in consumer (forward)
    order: one consumer its own; two the f32 sum; ``n >= 3`` section 5's tree
    over the ``n`` entries in that order (a consumer giving none: ``None``, left
    out)."""
    gs = [np.asarray(g, dtype=F32) for g in grads if g is not None]
    if not gs:
        raise ValueError("no consumer gives a gradient")
    if len(gs) == 1:
        return gs[0]
    if len(gs) == 2:
        return (gs[0] + gs[1]).astype(F32)
    return nt.tree_sum(np.stack(gs), 0)


# ---------------------------------------------------------------- 21. sum, mean
def _reduced(ndim: int, dims) -> list[int]:
    """The reduced dims, increasing; none, or an empty list, means all."""
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, (int, np.integer)):
        dims = [int(dims)]
    if len(dims) == 0:
        return list(range(ndim))
    out = set()
    for d in dims:
        d = int(d)
        if ndim == 0:
            if d not in (0, -1):
                raise IndexError(f"dim {d} of a 0-dim tensor")
            continue
        if not -ndim <= d < ndim:
            raise IndexError(f"dim {d} outside a {ndim}-dim tensor")
        out.add(d % ndim)
    return sorted(out)


def _tree_last(X: np.ndarray) -> np.ndarray:
    """Section 5's tree along the last dim (n = 0 gives +0), kept in the dtype."""
    n = X.shape[-1]
    if n == 0:
        return np.zeros(X.shape[:-1], dtype=X.dtype)
    while n > 1:
        h = n // 2
        pairs = X[..., 0:2 * h:2] + X[..., 1:2 * h:2]
        X = np.concatenate([pairs, X[..., n - 1:n]], axis=-1) if n % 2 else pairs
        n = X.shape[-1]
    return X[..., 0]


def xsum(x, dims=None, keepdim: bool = False) -> np.ndarray:
    """Section 21's sum: the reduced dims moved to the end in increasing order,
    flattened (C order), one tree over their ``n`` entries per kept index."""
    x = np.asarray(x)
    if x.dtype not in (F32, F64) and not np.issubdtype(x.dtype, np.integer):
        raise TypeError(f"sum of {x.dtype}")
    if x.ndim == 0:
        return x.copy()
    red = _reduced(x.ndim, dims)
    kept = [d for d in range(x.ndim) if d not in red]
    n = 1
    for d in red:
        n *= x.shape[d]
    X = np.transpose(x, kept + red).reshape([x.shape[d] for d in kept] + [n])
    if np.issubdtype(x.dtype, np.integer):
        s = X.sum(axis=-1, dtype=x.dtype)        # integer sums: exact in any order
    else:
        s = _tree_last(np.ascontiguousarray(X))
    if keepdim:
        s = s.reshape([1 if d in red else x.shape[d] for d in range(x.ndim)])
    return np.asarray(s)


def _broadcast_back(g, shape, dims, keepdim):
    g = np.asarray(g)
    if len(shape) == 0:
        return g.reshape(()).copy()
    red = _reduced(len(shape), dims)
    if not keepdim:
        g = g.reshape([1 if d in red else shape[d] for d in range(len(shape))])
    return np.ascontiguousarray(np.broadcast_to(g, shape))


def xsum_bwd(g, shape, dims=None, keepdim: bool = False) -> np.ndarray:
    """``g`` broadcast to the input's shape (data movement)."""
    return _broadcast_back(g, tuple(shape), dims, keepdim)


def _count(shape, dims) -> int:
    if len(shape) == 0:
        return 1
    n = 1
    for d in _reduced(len(shape), dims):
        n *= shape[d]
    return n


def xmean(x, dims=None, keepdim: bool = False) -> np.ndarray:
    """``sum / f(n)`` (one correctly rounded division; f32 or f64)."""
    x = np.asarray(x)
    if x.dtype not in (F32, F64):
        raise TypeError(f"mean of {x.dtype}")
    s = xsum(x, dims, keepdim)
    with np.errstate(invalid="ignore"):
        return np.asarray(s / x.dtype.type(_count(x.shape, dims)), dtype=x.dtype)


def xmean_bwd(g, shape, dims=None, keepdim: bool = False) -> np.ndarray:
    """``g / f(n)`` (one division per entry of ``g``), broadcast."""
    g = np.asarray(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.asarray(g / g.dtype.type(_count(tuple(shape), dims)), dtype=g.dtype)
    return _broadcast_back(q, tuple(shape), dims, keepdim)


# ---------------------------------------------------------------- 21. softmax, log-softmax
def _to_rows(x, dim: int) -> np.ndarray:
    """Rows ``(..., S)``: ``dim`` moved last (a 0-dim ``x`` is a row of one)."""
    x = np.asarray(x)
    if x.ndim == 0:
        return x.reshape(1)
    if not -x.ndim <= int(dim) < x.ndim:
        raise IndexError(f"dim {dim} outside a {x.ndim}-dim tensor")
    return np.ascontiguousarray(np.moveaxis(x, int(dim), -1))


def _from_rows(y: np.ndarray, dim: int, shape) -> np.ndarray:
    if len(shape) == 0:
        return y.reshape(())
    return np.ascontiguousarray(np.moveaxis(y, -1, int(dim)))


def _core(z):
    """(dz, e, s): mx exact, the f32 subtraction, xexp, the tree (s kept size 1)."""
    mx = np.max(z, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", over="ignore"):
        dz = (z - mx).astype(F32)
    e = nt.xexp(dz)
    return dz, e, _tree_last(e)[..., None]


def _check_f32(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != F32:
        raise TypeError(f"softmax / log_softmax of {x.dtype}: f32 only")
    return x


def softmax(x, dim: int):
    """(y, cache) of ``softmax(x, dim)``: per row ``p = e / s``."""
    x = _check_f32(x)
    z = _to_rows(x, dim)
    if z.size == 0:
        return x.copy(), (z, dim, x.shape)
    _, e, s = _core(z)
    p = (e / s).astype(F32)
    return _from_rows(p, dim, x.shape), (p, dim, x.shape)


def softmax_bwd(g, cache):
    """``gz = (g - tree_sum(g * p)) * p`` per row."""
    p, dim, shape = cache
    if p.size == 0:
        return np.zeros(shape, F32)
    gr = _to_rows(np.asarray(g, dtype=F32).reshape(shape), dim)
    dot = _tree_last((gr * p).astype(F32))[..., None]
    return _from_rows(((gr - dot) * p).astype(F32), dim, shape)


def log_softmax(x, dim: int):
    """(y, cache) of ``log_softmax(x, dim)``: ``y = dz - xlog(s)``; the cache
    holds ``p = e / s`` for the backward."""
    x = _check_f32(x)
    z = _to_rows(x, dim)
    if z.size == 0:
        return x.copy(), (z, dim, x.shape)
    dz, e, s = _core(z)
    y = (dz - nt.xlog(s)).astype(F32)
    p = (e / s).astype(F32)
    return _from_rows(y, dim, x.shape), (p, dim, x.shape)


def log_softmax_bwd(g, cache):
    """``gz = g - p * tree_sum(g)`` per row."""
    p, dim, shape = cache
    if p.size == 0:
        return np.zeros(shape, F32)
    gr = _to_rows(np.asarray(g, dtype=F32).reshape(shape), dim)
    tot = _tree_last(gr)[..., None]
    return _from_rows((gr - p * tot).astype(F32), dim, shape)
