"""Ops the ViT twin needs beyond twin_layers.py, written from docs/exact-spec.md
alone (sections 21, 26, 27 and 29), as plain NumPy functions with explicit
caches (no autograd engine):

- section 21: ``sum``/``mean`` over any dims (this file's own reading, kept
  apart from twin_ops.py on purpose: two independent readings of the text);
- section 29: ``fan_in``, the gradient of a value with several consumers;
- section 26: scaled dot-product attention with a bool or additive mask (a row
  with no allowed key gives ``P = +0``), the masks of ``nn.MultiheadAttention``,
  its packed self-attention path (one Linear, split into q, k, v) and
  ``nn.TransformerEncoderLayer`` (pre-norm or post-norm);
- section 27: label-smoothed cross-entropy (an ignored class too).

Every ``+ - * /`` on arrays is one IEEE op per element in float32 unless the
spec says float64; sums over more than two terms are section 5's tree.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import numpy_twin as nt
    from . import twin_layers as L
except ImportError:  # run as a script from tests/twin/
    import numpy_twin as nt  # type: ignore[no-redef]
    import twin_layers as L  # type: ignore[no-redef]

F32 = np.float32
F64 = np.float64

__all__ = ["reduce_dims", "xsum_fwd", "xsum_bwd", "xmean_fwd", "xmean_bwd", "fan_in",
           "sdpa_fwd", "sdpa_bwd", "mha_mask", "mha_self_fwd", "mha_self_bwd",
           "encoder_layer_fwd", "encoder_layer_bwd", "smoothed_xent"]


# ------------------------------------------------------------------ 21. sum, mean
def reduce_dims(ndim: int, dims) -> tuple[int, ...]:
    """Section 21's ``dim``: an int, a list of ints, or none / an empty list
    (all dims); negative dims count from the end. Sorted, without repeats."""
    if dims is None:
        return tuple(range(ndim))
    if isinstance(dims, (int, np.integer)):
        dims = [int(dims)]
    dims = [int(d) for d in dims]
    if not dims:
        return tuple(range(ndim))
    rank = max(ndim, 1)                      # a 0-dim tensor takes dim 0 / -1
    for d in dims:
        if not -rank <= d < rank:
            raise IndexError(f"dim {d} out of range for {ndim} dims")
    return tuple(sorted({d % rank for d in dims})) if ndim else ()


def xsum_fwd(x: np.ndarray, dims=None, keepdim: bool = False) -> np.ndarray:
    """For each index of the kept dims: the entries over the reduced dims in C
    order of those dims (moved to the end in increasing order, flattened),
    summed by one tree of ``n`` entries; ``n = 0`` gives +0; a 0-dim ``x`` is
    its own sum. Integer tensors: exact integer arithmetic."""
    x = np.asarray(x)
    if x.ndim == 0:
        return x.copy()
    red = reduce_dims(x.ndim, dims)
    kept = [d for d in range(x.ndim) if d not in red]
    n = int(np.prod([x.shape[d] for d in red], dtype=np.int64))
    rows = np.ascontiguousarray(np.transpose(x, kept + list(red))).reshape(
        tuple(x.shape[d] for d in kept) + (n,))
    if np.issubdtype(x.dtype, np.integer):
        s = rows.sum(axis=-1, dtype=x.dtype)
    else:
        s = nt.tree_sum(rows, rows.ndim - 1) if n else np.zeros(rows.shape[:-1], x.dtype)
    if keepdim:
        s = np.asarray(s).reshape(tuple(1 if d in red else x.shape[d] for d in range(x.ndim)))
    return np.asarray(s, dtype=x.dtype)


def _broadcast_back(g: np.ndarray, shape: tuple[int, ...], dims, keepdim: bool) -> np.ndarray:
    if not shape:
        return np.asarray(g).reshape(())
    red = reduce_dims(len(shape), dims)
    if not keepdim:
        for d in red:                         # increasing order: positions stay right
            g = np.expand_dims(g, d)
    return np.ascontiguousarray(np.broadcast_to(g, shape))


def xsum_bwd(g: np.ndarray, shape: tuple[int, ...], dims=None, keepdim: bool = False):
    """``g`` broadcast to ``x``'s shape (data movement)."""
    return _broadcast_back(np.asarray(g), tuple(shape), dims, keepdim)


def _count(shape: tuple[int, ...], dims) -> int:
    if not shape:
        return 1
    return int(np.prod([shape[d] for d in reduce_dims(len(shape), dims)], dtype=np.int64))


def xmean_fwd(x: np.ndarray, dims=None, keepdim: bool = False) -> np.ndarray:
    """``sum / f(n)``: one correctly rounded division per entry (f32 or f64 as
    ``x``); ``n = 0`` gives NaN."""
    x = np.asarray(x)
    if x.dtype not in (F32, F64):
        raise TypeError(f"mean of {x.dtype}: the spec defines f32 and f64 only")
    s = xsum_fwd(x, dims, keepdim)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(s / x.dtype.type(_count(x.shape, dims)), dtype=x.dtype)


def xmean_bwd(g: np.ndarray, shape: tuple[int, ...], dims=None, keepdim: bool = False):
    """``g / f(n)`` (one division per entry of ``g``), then broadcast."""
    g = np.asarray(g)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.asarray(g / g.dtype.type(_count(tuple(shape), dims)), dtype=g.dtype)
    return _broadcast_back(q, tuple(shape), dims, keepdim)


# ------------------------------------------------------------------ 29. fan-in
def fan_in(grads: list[np.ndarray | None]) -> np.ndarray | None:
    """The gradient of a value from its consumers' gradients, in the order the
    forward ran the consumers (one entry per input position of a consumer
    that takes the value several times); ``None`` is a consumer that gives no
    gradient and is left out. One given: itself; two: their f32 sum (section
    13, commutative); three or more: section 5's tree over them in that order.
    None given: ``None``."""
    got = [np.asarray(g) for g in grads if g is not None]
    if not got:
        return None
    if len(got) == 1:
        return got[0]
    if len(got) == 2:
        return got[0] + got[1]
    return nt.tree_sum(np.stack(got), 0)


# ------------------------------------------------------------------ 26. attention with a mask
def _T(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(a, -1, -2))


def sdpa_fwd(q, k, v, mask=None, causal: bool = False, scale=None, keep=None,
             scale_a=F32(1.0)):
    """Section 14's attention with section 26's mask. ``mask``: None, a bool
    array (True: the pair takes part) or an f32 additive array, broadcastable
    to ``(N, H, T, S)``; ``keep``: the attention dropout mask or None.
    Returns (Y, cache); ``cache[4]`` is ``Pd`` (the weights)."""
    if mask is not None and causal:
        raise ValueError("causal and a mask together are refused (section 26)")
    E = q.shape[-1]
    c = F32(float(scale)) if scale is not None else F32(1.0 / math.sqrt(float(E)))
    N, H, Tn, _ = q.shape
    S = k.shape[-2]
    shape = (N, H, Tn, S)
    Sc = L.xmmb(q, _T(k))
    Z = Sc * c
    if mask is None:
        allowed = np.ones((1, 1, Tn, S), bool)
        if causal:
            allowed = (np.arange(S)[None, :] <= np.arange(Tn)[:, None])[None, None]
    else:
        m = np.asarray(mask)
        if m.dtype == np.bool_:
            allowed = m
        elif m.dtype == F32:
            if np.isnan(m).any() or (m == np.inf).any():
                raise ValueError("additive mask with +inf or NaN is refused (section 26)")
            Z = Z + m                                   # one f32 add, broadcast
            allowed = m != F32(-np.inf)
        else:
            raise TypeError(f"attention mask of dtype {m.dtype} is refused")
    allowed = np.broadcast_to(allowed, shape)
    anyk = allowed.any(axis=-1, keepdims=True)
    mx = np.where(anyk, np.max(np.where(allowed, Z, F32(-np.inf)), axis=-1, keepdims=True),
                  F32(0.0)).astype(F32)
    with np.errstate(over="ignore", invalid="ignore"):
        dz = np.where(allowed, Z - mx, F32(0.0)).astype(F32)
    e = np.where(allowed, nt.xexp(dz), F32(0.0)).astype(F32)
    s = nt.tree_sum(e, -1)[..., None]
    with np.errstate(invalid="ignore", divide="ignore"):
        P = np.where(s > F32(0.0), e / s, F32(0.0)).astype(F32)
    Pd = np.where(keep, P * scale_a, F32(0.0)).astype(F32) if keep is not None else P
    Y = L.xmmb(Pd, v)
    return Y, (q, k, v, P, Pd, allowed, c, keep, scale_a)


def sdpa_bwd(gY, cache, gW=None):
    """(gq, gk, gv). ``gW``: the gradient of the returned weights ``Pd``, added
    to ``gPd`` (one f32 add) when both have one."""
    q, k, v, P, Pd, allowed, c, keep, scale_a = cache
    if gY is None:
        gPd = gW
        gv = np.zeros_like(v)
    else:
        gPd = L.xmmb(gY, _T(v))
        gv = L.xmmb(_T(Pd), gY)
        if gW is not None:
            gPd = gPd + gW
    gP = np.where(keep, gPd * scale_a, F32(0.0)).astype(F32) if keep is not None else gPd
    dot = nt.tree_sum(gP * P, -1)[..., None]
    gZ = np.where(allowed, (gP - dot) * P, F32(0.0)).astype(F32)
    gSc = gZ * c
    gq = L.xmmb(gSc, k)
    gk = L.xmmb(_T(gSc), q)
    return gq, gk, gv


# ------------------------------------------------------------------ 26. MultiheadAttention
def mha_mask(N: int, H: int, T: int, S: int, key_padding_mask=None, attn_mask=None):
    """Step 3: the attention's mask from the module's masks (True: masked out).
    ``attn_mask (T, S)`` -> (1, 1, T, S), ``(N*H, T, S)`` -> (N, H, T, S);
    ``key_padding_mask (N, S)`` -> (N, 1, 1, S). All bool: the pairs none masks;
    otherwise bool ones become -inf / +0 and the f32 masks are added."""
    ms = []
    if attn_mask is not None:
        a = np.asarray(attn_mask)
        ms.append(a.reshape(1, 1, T, S) if a.ndim == 2 else a.reshape(N, H, T, S))
    if key_padding_mask is not None:
        ms.append(np.asarray(key_padding_mask).reshape(N, 1, 1, S))
    if not ms:
        return None
    if all(m.dtype == np.bool_ for m in ms):
        out = ~ms[0]
        for m in ms[1:]:
            out = out & ~m
        return out
    fl = [np.where(m, F32(-np.inf), F32(0.0)).astype(F32) if m.dtype == np.bool_ else
          m.astype(F32, copy=False) for m in ms]
    return fl[0] if len(fl) == 1 else (fl[0] + fl[1]).astype(F32)


def _heads(z: np.ndarray, H: int) -> np.ndarray:
    N, Lq, E = z.shape
    return np.ascontiguousarray(z.reshape(N, Lq, H, E // H).transpose(0, 2, 1, 3))


def _unheads(z: np.ndarray) -> np.ndarray:
    N, H, Lq, d = z.shape
    return np.ascontiguousarray(z.transpose(0, 2, 1, 3)).reshape(N, Lq, H * d)


def mha_self_fwd(p: dict, pre: str, x: np.ndarray, H: int, mask=None, keep=None,
                 scale_a=F32(1.0)):
    """``nn.MultiheadAttention(x, x, x)``, batch_first, packed weights, a bias,
    ``need_weights = False``: one Linear (``in_proj_weight``, ``in_proj_bias``)
    split into q, k, v; heads; the attention (``c = RN32(1 / sqrt(d))``,
    ``mask`` from ``mha_mask``, ``keep`` its dropout mask); ``out_proj``."""
    N, Lq, E = x.shape
    qkv = L.linear_fwd(x, p[pre + "in_proj_weight"], p[pre + "in_proj_bias"])
    q, k, v = (_heads(qkv[..., i * E:(i + 1) * E], H) for i in range(3))
    Y, ca = sdpa_fwd(q, k, v, mask, False, None, keep, scale_a)
    y2 = _unheads(Y)
    out = L.linear_fwd(y2, p[pre + "out_proj.weight"], p[pre + "out_proj.bias"])
    return out, (x, ca, y2)


def mha_self_bwd(p: dict, pre: str, g: np.ndarray, cache, H: int, grads: dict):
    """Gradients of the module's parameters into ``grads``; returns the
    gradients of (query, key, value): the one Linear's input gradient is the
    query's (its only input); key and value give none (section 29)."""
    x, ca, y2 = cache
    gW, gb, gy2 = L.linear_bwd(g, y2, p[pre + "out_proj.weight"])
    grads[pre + "out_proj.weight"], grads[pre + "out_proj.bias"] = gW, gb
    gq, gk, gv = sdpa_bwd(_heads(gy2, H), ca)
    gqkv = np.concatenate([_unheads(z) for z in (gq, gk, gv)], axis=-1)  # split -> cat
    gW, gb, gx = L.linear_bwd(gqkv, x, p[pre + "in_proj_weight"])
    grads[pre + "in_proj_weight"], grads[pre + "in_proj_bias"] = gW, gb
    return gx, None, None


# ------------------------------------------------------------------ 26. TransformerEncoderLayer
class Drops:
    """The dropout sites of one shard's forward (section 15): ``next(shape)``
    draws the keep-mask of the next site, or None at rate 0 (no site taken)."""

    def __init__(self, seed: int, step: int, row0: int, q: float) -> None:
        self.seed, self.step, self.row0, self.q = seed, step, row0, float(q)
        self.T, self.scale = nt.dropout_consts(self.q) if self.q > 0 else (0, F32(1.0))
        self.site = 0
        self.drawn: list[np.ndarray] = []

    def next(self, shape: tuple[int, ...]) -> np.ndarray | None:
        if self.q <= 0.0:
            return None
        m = L.layer_mask(self.seed, self.step, self.site, self.row0, shape, self.T)
        self.site += 1
        self.drawn.append(m)
        return m


def _drop(x, keep, scale):
    return x if keep is None else L.dropout_fwd(x, keep, scale)


def _drop_bwd(g, keep, scale):
    return g if keep is None else L.dropout_bwd(g, keep, scale)


LN_EPS = 1e-5  # nn.TransformerEncoderLayer's layer_norm_eps default


def encoder_layer_fwd(p: dict, pre: str, x: np.ndarray, H: int, drops: Drops, mask=None,
                      norm_first: bool = True, act: str = "gelu", eps: float = LN_EPS):
    """One ``nn.TransformerEncoderLayer`` (batch_first) on ``x (N, T, E)``;
    dropout sites in order: the attention's, dropout1, dropout, dropout2."""
    N, Tn, E = x.shape
    sc = drops.scale
    c: dict = {"x": x}

    def sa(y):
        c["ka"] = drops.next((N, H, Tn, Tn))
        o, c["mha"] = mha_self_fwd(p, pre + "self_attn.", y, H, mask, c["ka"], sc)
        c["k1"] = drops.next((N, Tn, E))
        return _drop(o, c["k1"], sc)

    def ff(y):
        c["ff_in"] = y
        f = L.linear_fwd(y, p[pre + "linear1.weight"], p[pre + "linear1.bias"])
        a = L.gelu_fwd(f) if act == "gelu" else np.where(f > F32(0.0), f, F32(0.0))
        c["kd"] = drops.next(a.shape)
        ad = _drop(a, c["kd"], sc)
        o = L.linear_fwd(ad, p[pre + "linear2.weight"], p[pre + "linear2.bias"])
        c["k2"] = drops.next(o.shape)
        c.update(f=f, ad=ad)
        return _drop(o, c["k2"], sc)

    if norm_first:
        n1, c["n1"] = L.layernorm_fwd(x, p[pre + "norm1.weight"], p[pre + "norm1.bias"], eps)
        x1 = x + sa(n1)
        n2, c["n2"] = L.layernorm_fwd(x1, p[pre + "norm2.weight"], p[pre + "norm2.bias"], eps)
        out = x1 + ff(n2)
    else:
        x1, c["n1"] = L.layernorm_fwd(x + sa(x), p[pre + "norm1.weight"],
                                      p[pre + "norm1.bias"], eps)
        out, c["n2"] = L.layernorm_fwd(x1 + ff(x1), p[pre + "norm2.weight"],
                                       p[pre + "norm2.bias"], eps)
    c["x1"] = x1
    return out, c


def encoder_layer_bwd(p: dict, pre: str, g: np.ndarray, c: dict, H: int, scale,
                      grads: dict, norm_first: bool = True, act: str = "gelu"):
    """Backward of ``encoder_layer_fwd``: parameter gradients into ``grads``;
    returns the gradient of the layer's input."""

    def ff_bwd(go):
        go = _drop_bwd(go, c["k2"], scale)
        gW, gb, gad = L.linear_bwd(go, c["ad"], p[pre + "linear2.weight"])
        grads[pre + "linear2.weight"], grads[pre + "linear2.bias"] = gW, gb
        ga = _drop_bwd(gad, c["kd"], scale)
        gf = L.gelu_bwd(ga, c["f"]) if act == "gelu" else \
            np.where(c["f"] > F32(0.0), ga, F32(0.0)).astype(F32)
        gW, gb, gy = L.linear_bwd(gf, c["ff_in"], p[pre + "linear1.weight"])
        grads[pre + "linear1.weight"], grads[pre + "linear1.bias"] = gW, gb
        return gy

    def sa_bwd(go):
        go = _drop_bwd(go, c["k1"], scale)
        return list(mha_self_bwd(p, pre + "self_attn.", go, c["mha"], H, grads))

    def ln_bwd(go, name, cache):
        gx, gw, gb = L.layernorm_bwd(go, cache, p[pre + name + ".weight"])
        grads[pre + name + ".weight"], grads[pre + name + ".bias"] = gw, gb
        return gx

    if norm_first:
        # out = x1 + ff(norm2(x1)); x1 = x + sa(norm1(x)); forward order of the
        # consumers: norm2 then the add (x1), norm1 then the add (x)
        gx1 = fan_in([ln_bwd(ff_bwd(g), "norm2", c["n2"]), g])
        # norm1(x) is self_attn's query, key and value: three consumer entries
        gn1 = fan_in(sa_bwd(gx1))
        return fan_in([ln_bwd(gn1, "norm1", c["n1"]), gx1])
    # out = norm2(x1 + ff(x1)); x1 = norm1(x + sa(x))
    gs2 = ln_bwd(g, "norm2", c["n2"])
    gx1 = fan_in([ff_bwd(gs2), gs2])
    gs1 = ln_bwd(gx1, "norm1", c["n1"])
    return fan_in(sa_bwd(gs1) + [gs1])        # x: query, key, value, then the add


# ------------------------------------------------------------------ 27. label smoothing
def smoothed_xent(z: np.ndarray, y: np.ndarray, n_global: int, a: float = 0.0,
                  ignore_index: int | None = None):
    """Per-row loss and the gradient of the step's mean wrt the logits
    ``z (rows, C)`` (section 27); rows whose target is ``ignore_index`` (when
    it is in ``[0, C)``) have loss +0 and gradient +0."""
    z = np.asarray(z, dtype=F32)
    y = np.asarray(y, dtype=np.int64)
    R, C = z.shape
    a = float(a)
    ign = np.zeros(R, bool) if ignore_index is None or not 0 <= ignore_index < C else \
        y == ignore_index
    yy = np.where(ign, 0, y)
    if (yy < 0).any() or (yy >= C).any():
        raise IndexError("target outside [0, C)")
    rows = np.arange(R)
    mx = np.max(z, axis=1, keepdims=True)
    with np.errstate(over="ignore"):
        dz = (z - mx).astype(F32)
    e = nt.xexp(dz)
    s = nt.tree_sum(e, 1)
    Lr = nt.xlog(s)
    nll = (Lr - dz[rows, yy]).astype(F32)
    if a > 0.0:
        sm = (Lr - nt.tree_sum(dz, 1) / F32(C)).astype(F32)
        loss = (nll * F32(1.0 - a) + sm * F32(a)).astype(F32)
    else:
        loss = nll
    P = (e / s[:, None]).astype(F32)
    g = (P - F32(a / C)).astype(F32)
    g[rows, yy] = P[rows, yy] - F32((1.0 - a) + a / C)
    g = (g / F32(n_global)).astype(F32)
    loss = np.where(ign, F32(0.0), loss).astype(F32)
    g = np.where(ign[:, None], F32(0.0), g).astype(F32)
    return loss, g
