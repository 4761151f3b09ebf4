"""The twin's layers and the charlm network (tests/twin/twin_layers.py,
twin_charlm.py; docs/exact-spec.md sections 12-18) against the spec and the
pipeline.

1. self-checks: each op against a scalar (pure-Python) reading of the spec bit
   for bit where one is short, and against float64 references (math, mpmath,
   torch autograd in float64) within rounding;
2. the whole charlm network's gradient, dropout included, against float64
   torch autograd of the stock model in examples/charlm/model.py with the
   twin's weights and masks;
3. full runs: ``examples/charlm/config.toml mode=exact`` trained by ``python -m
   pipeline train`` (a subprocess: a black box) and by the twin, weight hash
   and test loss equal; a control: the twin with two dropout sites swapped
   gives another hash; the same for the project ``pipeline new`` writes (a
   stock convnet converted to the layers).
"""

from __future__ import annotations

import importlib.util
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from .helpers import run_pipeline
from .twin import numpy_twin as tw
from .twin import twin_charlm as tc
from .twin import twin_convnet as tn
from .twin import twin_layers as tl
from .twin import twin_optim as to

REPO = Path(__file__).resolve().parents[1]
CHARLM = REPO / "examples" / "charlm"
TEXT = REPO / "data" / "shakespeare.txt"
TEXT_SHA = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
F32 = np.float32
F64 = np.float64


def _bits(a) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype=F32)).view(np.uint32)


def _same_bits(got, want, what=""):
    got, want = np.asarray(got, dtype=F32), np.asarray(want, dtype=F32)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    bad = np.nonzero(_bits(got).reshape(-1) != _bits(want).reshape(-1))[0]
    assert bad.size == 0, f"{what}: {bad.size} differ; first got {got.reshape(-1)[bad[:4]]!r} " \
                          f"want {want.reshape(-1)[bad[:4]]!r}"


def _close(got, want, rel, what=""):
    """Elementwise within ``rel`` of the reference's largest magnitude."""
    got, want = np.asarray(got, dtype=F64), np.asarray(want, dtype=F64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    tol = rel * max(np.abs(want).max(), 1e-30)
    err = np.abs(got - want).max()
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


# ------------------------------------------------------------------ 12. xmm2

def _xmm2_scalar(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Section 12 with Python integers and exact fractions, one product."""
    m, k = A.shape
    n = B.shape[1]
    c = max(0, (k - 1).bit_length())
    pa = 28 - c

    def exp_of(vec):
        r = max(abs(float(v)) for v in vec)
        return 0 if r == 0 else math.frexp(r)[1]

    cols = []
    for j in range(n):
        sB = exp_of(B[:, j]) - 24
        cols.append((sB, [round(Fraction(float(v)) / Fraction(2) ** sB) for v in B[:, j]]))
    C = np.empty((m, n), dtype=F32)
    for i in range(m):
        s1 = exp_of(A[i]) - pa
        s2 = s1 - pa
        a1 = [round(Fraction(float(v)) / Fraction(2) ** s1) for v in A[i]]
        a2 = [round((Fraction(float(v)) - x * Fraction(2) ** s1) / Fraction(2) ** s2)
              for v, x in zip(A[i], a1)]
        for j, (sB, b) in enumerate(cols):
            P1 = sum(x * y for x, y in zip(a1, b))
            P2 = sum(x * y for x, y in zip(a2, b))
            assert abs(P1) <= 2**52 and abs(P2) <= 2**52
            Q = math.ldexp(float(P1), s1 + sB) + math.ldexp(float(P2), s2 + sB)
            with np.errstate(over="ignore"):
                C[i, j] = F32(Q) if Q != 0 else F32(0.0)
    return C


def _xmm2_cases(rng):
    cases = [(rng.standard_normal((m, k)).astype(F32), rng.standard_normal((k, n)).astype(F32))
             for m, k, n in [(3, 1, 4), (4, 7, 6), (5, 64, 3), (2, 129, 4), (3, 700, 2)]]
    A = rng.standard_normal((6, 9)).astype(F32)
    A[0] = 0
    A[1] *= F32(1e30)
    A[2] *= F32(1e-42)
    A[3, :4] = F32(3e38)
    A[3, 4:] = F32(1e-30)
    A[4] = np.finfo(F32).smallest_subnormal
    A[5] = -A[5] * F32(2.0**-60)
    A[5, 0] = F32(1.0)   # one large entry: the second slice carries the rest
    B = rng.standard_normal((9, 5)).astype(F32)
    B[:, 0] = 0
    B[:, 1] *= F32(1e-5)
    B[:, 2] = F32(1e-44)
    B[3, 3] = F32(-2.0**40)
    cases.append((A, B))
    return cases


def test_xmm2_matches_integer_reading_and_is_accurate():
    """xmm2 equals a transcription of section 12 in Python integers and exact
    fractions, bit for bit (extremes included: zero rows and columns, huge,
    tiny, subnormal, a row whose entries span 2^60); batched products equal
    their slices; k = 0 and exact zeros give +0; on ordinary data the error is
    within 2^-22 of sum |a||b| (about an f32 rounding)."""
    rng = np.random.default_rng(30)
    for A, B in _xmm2_cases(rng):
        _same_bits(tl.xmm2(A, B), _xmm2_scalar(A, B), f"xmm2 {A.shape}x{B.shape}")
    A = rng.standard_normal((3, 2, 5, 33)).astype(F32)
    B = rng.standard_normal((3, 2, 33, 4)).astype(F32)
    C = tl.xmm2(A, B)
    for i in range(3):
        for j in range(2):
            _same_bits(C[i, j], tl.xmm2(A[i, j], B[i, j]), "batched")
    assert _bits(tl.xmm2(np.zeros((2, 0), F32), np.zeros((0, 3), F32))).tolist() == [[0] * 3] * 2
    neg = -np.ones((2, 4), F32) * F32(0.0)   # -0 everywhere: an exact zero sum is +0
    assert (_bits(tl.xmm2(neg, np.ones((4, 3), F32))) == 0).all()
    A = rng.standard_normal((40, 300)).astype(F32)
    B = rng.standard_normal((300, 20)).astype(F32)
    ref = A.astype(F64) @ B.astype(F64)
    err = np.abs(tl.xmm2(A, B) - ref)
    assert (err <= 2.0**-22 * (np.abs(A).astype(F64) @ np.abs(B).astype(F64))).all()


# ------------------------------------------------------------------ exp64, GELU

def test_exp64_is_xexp_without_its_conversions():
    """exp64 is within 1e-14 relative of exp (mpmath) on [-100, 85] (the degree-11
    polynomial's truncation, (ln 2 / 2)^12 / 12! = 6e-15); RN32(exp64(f64(x)))
    equals xexp(x) bit for bit; the clamp gives exp(90) and exp(-110)."""
    import mpmath

    rng = np.random.default_rng(31)
    t = np.concatenate([rng.uniform(-100, 85, 3000), rng.uniform(-1, 1, 1000)])
    got = tl.exp64(t)
    with mpmath.workdps(40):
        ref = np.array([float(mpmath.exp(mpmath.mpf(float(x)))) for x in t])
    assert (np.abs(got - ref) <= 1e-14 * np.abs(ref)).all()
    x = rng.uniform(-120, 95, 5000).astype(F32)
    with np.errstate(over="ignore"):
        _same_bits(tl.exp64(x.astype(F64)).astype(F32), tw.xexp(x), "xexp")
    assert tl.exp64(np.array([1e9]))[0] == tl.exp64(np.array([90.0]))[0]
    assert tl.exp64(np.array([-1e9]))[0] == tl.exp64(np.array([-110.0]))[0] > 0


def _gelu_scalar(x: np.float32):
    """Section 14's erf-form GELU and its derivative with Python floats."""
    d = float(x)
    z = d * (-0.7071067811865476)
    a = abs(z)
    t = 1.0 / (1.0 + 0.5 * a)
    C = [-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
         0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277]
    w = C[9]
    for n in range(8, -1, -1):
        w = w * t + C[n]
    ec = t * float(tl.exp64(np.array([w - a * a]))[0])
    Phi = 0.5 * ec if z >= 0 else 0.5 * (2.0 - ec)
    phi = float(tl.exp64(np.array([-((d * d) * 0.5)]))[0]) * 0.3989422804014327
    return F32(d * Phi), F32(Phi + d * phi)


def test_gelu_erf_matches_scalar_reading_and_erf():
    """GELU (erf form): forward and derivative equal a scalar reading of
    section 14 bit for bit; they are within the fit's 1.2e-7 (relative to
    Phi) of x * Phi(x) and Phi + x * phi computed with math.erf; large |x|
    gives x or +-0 and finite derivatives."""
    rng = np.random.default_rng(32)
    x = np.concatenate([rng.standard_normal(3000) * 3, rng.uniform(-40, 40, 500),
                        [0.0, -0.0, 1e-30, -1e-30, 3e38, -3e38, 7.0, -7.0]]).astype(F32)
    g = np.ones_like(x)
    y, dy = tl.gelu_fwd(x), tl.gelu_bwd(g, x)
    ref = [_gelu_scalar(v) for v in x]
    _same_bits(y, [r[0] for r in ref], "gelu y")
    _same_bits(dy, [r[1] for r in ref], "gelu dy")
    d = x.astype(F64)
    Phi = np.array([0.5 * math.erfc(-v / math.sqrt(2)) for v in d])
    phi = np.exp(-d * d / 2) / math.sqrt(2 * math.pi)
    fin = np.abs(d) < 1e18
    assert (np.abs(y[fin] - d[fin] * Phi[fin]) <= 1.3e-7 * np.abs(d[fin]) + 1e-37).all()
    assert (np.abs(dy[fin] - (Phi + d * phi)[fin]) <= 3e-7).all()
    assert y[-4] == x[-4] and _bits(y[-3]) in (0, 0x80000000)


def test_gelu_tanh_close_to_the_tanh_formula():
    """GELU (tanh form) and its derivative are within 1e-6 of the formula
    0.5 x (1 + tanh(u)) and its derivative in float64."""
    rng = np.random.default_rng(33)
    x = (rng.standard_normal(4000) * 4).astype(F32)
    d = x.astype(F64)
    u = math.sqrt(2 / math.pi) * (d + 0.044715 * d**3)
    th = np.tanh(u)
    ref = 0.5 * d * (1 + th)
    dref = 0.5 * (1 + th) + 0.5 * d * (1 - th**2) * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * d**2)
    assert np.abs(tl.gelu_tanh_fwd(x) - ref).max() <= 1e-6 * max(1, np.abs(ref).max())
    assert np.abs(tl.gelu_tanh_bwd(np.ones_like(x), x) - dref).max() <= 1e-6


# ------------------------------------------------------------------ LayerNorm, Linear, attention

def _t64(a, grad=True):
    import torch

    return torch.tensor(np.asarray(a, dtype=F64), requires_grad=grad)


def test_layernorm_linear_conv_match_float64_autograd():
    """LayerNorm, Linear (3-D input) and Conv2d (xmm2) forward and backward are
    within float32 rounding of float64 torch autograd; LayerNorm's mean is the
    fixed tree (a row of [1e8, 1, -1e8, 1] gives mean 0.5 exactly)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(34)
    x = (rng.standard_normal((3, 5, 24)) * 2 + 1).astype(F32)
    w = (rng.standard_normal(24) * 0.5 + 1).astype(F32)
    b = rng.standard_normal(24).astype(F32)
    g = rng.standard_normal((3, 5, 24)).astype(F32)
    y, cache = tl.layernorm_fwd(x, w, b, 1e-5)
    gx, gw, gb = tl.layernorm_bwd(g, cache, w)
    tx, twt, tb = _t64(x), _t64(w), _t64(b)
    ty = F.layer_norm(tx, (24,), twt, tb, 1e-5)
    ty.backward(torch.tensor(g.astype(F64)))
    for got, ref, what in [(y, ty, "ln y"), (gx, tx.grad, "ln gx"), (gw, twt.grad, "ln gw"),
                           (gb, tb.grad, "ln gb")]:
        _close(got, ref.detach().numpy(), 1e-5, what)
    row = np.array([[1, 1e8, -1e8, 1]], dtype=F32)  # tree: (1 + 1e8) + (-1e8 + 1) = 0
    xh = tl.layernorm_fwd(row, None, None, 1e-5)[0]
    var = ((row[0, 0] * row[0, 0] + row[0, 1] * row[0, 1])
           + (row[0, 2] * row[0, 2] + row[0, 3] * row[0, 3])) / F32(4)
    _same_bits(xh, row / np.sqrt(var + F32(1e-5)), "tree mean 0 (a running sum gives 0.25)")

    W = rng.standard_normal((7, 24)).astype(F32)
    bl = rng.standard_normal(7).astype(F32)
    gl = rng.standard_normal((3, 5, 7)).astype(F32)
    yl = tl.linear_fwd(x, W, bl)
    gW, gbl, gxl = tl.linear_bwd(gl, x, W)
    tx, tW, tbl = _t64(x), _t64(W), _t64(bl)
    ty = F.linear(tx, tW, tbl)
    ty.backward(torch.tensor(gl.astype(F64)))
    for got, ref, what in [(yl, ty, "lin y"), (gW, tW.grad, "lin gW"), (gbl, tbl.grad, "lin gb"),
                           (gxl, tx.grad, "lin gx")]:
        _close(got, ref.detach().numpy(), 2e-6, what)

    xc = rng.standard_normal((2, 3, 6, 5)).astype(F32)
    Wc = rng.standard_normal((4, 3, 3, 3)).astype(F32)
    bc = rng.standard_normal(4).astype(F32)
    yc, cc = tl.conv2d_fwd(xc, Wc, bc, 2, 1)
    gc = rng.standard_normal(yc.shape).astype(F32)
    gWc, gbc, gxc = tl.conv2d_bwd(gc, cc, Wc, 2, 1)
    tx, tW, tb = _t64(xc), _t64(Wc), _t64(bc)
    ty = F.conv2d(tx, tW, tb, stride=2, padding=1)
    ty.backward(torch.tensor(gc.astype(F64)))
    for got, ref, what in [(yc, ty, "conv y"), (gWc, tW.grad, "conv gW"),
                           (gbc, tb.grad, "conv gb"), (gxc, tx.grad, "conv gx")]:
        _close(got, ref.detach().numpy(), 2e-6, what)


def _torch_attention(q, k, v, keep, scale_a, causal=True):
    import torch

    E = q.shape[-1]
    s = (q @ k.transpose(-1, -2)) * float(F32(1.0 / math.sqrt(E)))
    T, S = s.shape[-2:]
    if causal:
        s = s.masked_fill(torch.ones(T, S, dtype=torch.bool).triu(1), float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p * torch.as_tensor(keep, dtype=p.dtype) * float(scale_a)
    return p @ v


@pytest.mark.parametrize("causal,dropout", [(True, 0.0), (True, 0.25), (False, 0.1)])
def test_attention_matches_float64_autograd(causal, dropout):
    """Scaled dot-product attention (causal or not, with or without its dropout
    mask) forward and backward are within float32 rounding of float64 autograd;
    disallowed (future) positions get exactly +0 probability."""
    import torch

    rng = np.random.default_rng(35)
    N, H, T, E = 2, 3, 7, 4
    q, k, v = (rng.standard_normal((N, H, T, E)).astype(F32) for _ in range(3))
    gy = rng.standard_normal((N, H, T, E)).astype(F32)
    keep, scale = None, F32(1.0)
    if dropout:
        Tq, scale = tw.dropout_consts(dropout)
        keep = tl.layer_mask(5, 2, 1, 0, (N, H, T, T), Tq)
    y, cache = tl.attention_fwd(q, k, v, causal, None, keep, scale)
    gq, gk, gv = tl.attention_bwd(gy, cache)
    P = cache[3]
    if causal:
        assert (_bits(P[..., np.triu(np.ones((T, T), bool), 1)]) == 0).all()
    tq, tk, tv = _t64(q), _t64(k), _t64(v)
    ty = _torch_attention(tq, tk, tv, keep, scale, causal)
    ty.backward(torch.tensor(gy.astype(F64)))
    for got, ref, what in [(y, ty, "y"), (gq, tq.grad, "gq"), (gk, tk.grad, "gk"),
                           (gv, tv.grad, "gv")]:
        _close(got, ref.detach().numpy(), 5e-6, what)


def test_embedding_backward_tree_with_absent_entries():
    """Embedding: a copy forward (out-of-range indices refused); backward row v
    is the tree over positions holding v with the others absent: equal to a
    scalar reading of that tree bit for bit, an unused row is +0, a row whose
    only gradient is -0 stays -0; close to np.add.at in float64."""
    rng = np.random.default_rng(36)
    V, D = 6, 3
    idx = rng.integers(0, V - 1, (4, 9))          # row V-1 never occurs
    idx[0, 0] = 2
    g = rng.standard_normal((4, 9, D)).astype(F32) * F32(1e3)
    g[idx == 3] = F32(-0.0)                        # every occurrence of 3: a -0 gradient
    gW = tl.embedding_bwd(g, idx, V)

    def tree(vals):  # None is "absent"
        while len(vals) > 1:
            h = len(vals) // 2
            nxt = []
            for i in range(h):
                a, b = vals[2 * i], vals[2 * i + 1]
                nxt.append(b if a is None else a if b is None else F32(a + b))
            vals = nxt + ([vals[-1]] if len(vals) % 2 else [])
        return vals[0]

    flat_i, flat_g = idx.reshape(-1), g.reshape(-1, D)
    for vv in range(V):
        for dd in range(D):
            r = tree([flat_g[p, dd] if flat_i[p] == vv else None for p in range(len(flat_i))])
            _same_bits(gW[vv, dd], F32(0.0) if r is None else r, f"row {vv} col {dd}")
    assert (_bits(gW[V - 1]) == 0).all() and (_bits(gW[3]) == 0x80000000).all()
    ref = np.zeros((V, D))
    np.add.at(ref, flat_i, flat_g.astype(F64))
    _close(gW, ref, 1e-6, "embedding")
    W = rng.standard_normal((V, D)).astype(F32)
    assert np.array_equal(tl.embedding_fwd(idx, W), W[idx])
    with pytest.raises(IndexError):
        tl.embedding_fwd(np.array([V]), W)


def test_sum_to_follows_section_13():
    """sum_to: leading dims flattened and tree-summed, then size-1 dims of the
    operand in increasing order; equal to explicit trees bit for bit."""
    rng = np.random.default_rng(37)
    g = (rng.standard_normal((3, 4, 5, 6)) * 1e4).astype(F32)
    _same_bits(tl.sum_to(g, (5, 6)), tw.tree_sum(g.reshape(12, 5, 6), 0), "leading")
    want = np.expand_dims(tw.tree_sum(tw.tree_sum(g.reshape(12, 5, 6), 0), 0), 0)
    _same_bits(tl.sum_to(g, (1, 6)), want, "leading then dim 0")
    want = np.expand_dims(tw.tree_sum(g, 1), 1)
    want = np.expand_dims(tw.tree_sum(want, 3), 3)
    _same_bits(tl.sum_to(g, (3, 1, 5, 1)), want, "dims 1 then 3")


# ------------------------------------------------------------------ masks, init

def test_layer_masks_depend_on_global_row_step_and_site():
    """Section 15: a row's mask depends on (seed, step, site, global row) only:
    the shard holding rows [r0, r1) sees those rows of the whole batch's mask;
    another step or site gives another mask; the kept share is about 1 - q;
    element j of row g uses u24(key(seed, 7, t, site), g*F + j)."""
    T, _ = tw.dropout_consts(0.25)
    full = tl.layer_mask(3, 5, 2, 0, (8, 4, 6), T)
    for r0 in (0, 2, 4, 6):
        assert np.array_equal(tl.layer_mask(3, 5, 2, r0, (2, 4, 6), T), full[r0:r0 + 2])
    assert not np.array_equal(tl.layer_mask(3, 6, 2, 0, (8, 4, 6), T), full)
    assert not np.array_equal(tl.layer_mask(3, 5, 3, 0, (8, 4, 6), T), full)
    big = tl.layer_mask(0, 0, 0, 0, (64, 1000), T)
    assert abs(big.mean() - 0.75) < 0.01
    K = tw.key(3, 7, 5, 2)
    assert full[5, 1, 3] == ((tw.out_int(K, 5 * 24 + 1 * 6 + 3) >> 40) >= T)


def test_charlm_init_numbering_and_distributions():
    """Section 16/18: names and shapes of the stock model; layer numbers in
    registration order (qkv of block 1 is layer 9, the head 2 + 6 n_layer + 1);
    embeddings are Irwin-Hall N(0, 1) (mean ~0, std ~1, |w| <= 6, element 0 by
    hand); LayerNorm w = 1, b = 0; Linear uniform within its bound."""
    p = tc.init_params(0, 84, 64, 2, 32)
    gpt = _stock_model(d_model=32)
    assert {k: v.shape for k, v in p.items()} == {
        k: tuple(v.shape) for k, v in gpt.state_dict().items()}
    assert np.array_equal(p["blocks.1.qkv.weight"], tl.uniform_init(0, 9, 0, (96, 32), 32))
    assert np.array_equal(p["head.bias"], tl.uniform_init(0, 15, 1, (84,), 32))
    assert np.array_equal(p["pos.weight"], tl.normal_init(0, 1, (64, 32)))
    e = p["tok.weight"]
    assert abs(e.mean()) < 0.05 and abs(e.std() - 1) < 0.05 and np.abs(e).max() <= 6
    K = tw.key(0, tw.INIT, 0, 0)
    s = sum(tw.out_int(K, j) >> 40 for j in range(12))
    assert e[0, 0] == F32(s / 2**24 - 6.0)
    assert (p["blocks.0.ln2.weight"] == 1).all() and (_bits(p["ln_f.bias"]) == 0).all()
    bound = F32(1 / math.sqrt(128))
    assert (np.abs(p["blocks.0.fc_out.weight"]) <= bound).all()


# ------------------------------------------------------------------ the whole network

def _stock_model(**args):
    spec = importlib.util.spec_from_file_location("charlm_model_for_twin", CHARLM / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.gpt((64,), 84, **{"n_layer": 2, "n_head": 4, "d_model": 128, "dropout": 0.1,
                                 **args})


def test_charlm_gradient_matches_the_stock_model_in_float64():
    """The twin's charlm forward/backward (one shard, dropout 0.2) is within
    float32 rounding of float64 autograd through examples/charlm/model.py with
    the twin's weights, its nn.Dropout modules and its attention dropout fed the
    twin's masks in the order the stock model draws them (drop; per block the
    attention, drop1, drop2): loss, logits' gradient and every parameter."""
    import torch
    import torch.nn.functional as F

    arch = {"n_layer": 2, "n_head": 4, "d_model": 16, "dropout": 0.2}
    T, V, N = 8, 84, 3
    p = tc.init_params(4, V, 64, 2, 16)
    rng = np.random.default_rng(38)
    x = rng.integers(0, V, (N, T))
    y = rng.integers(0, V, (N, T))
    ctx = tc.Ctx(4, 7, 5, 0.2)
    grads, loss = tc.shard_grads(p, x, y, N * T, arch, ctx)
    assert ctx.site == 7 and [m.shape for m in ctx.drawn[:2]] == [(N, T, 16), (N, 4, T, T)]

    model = _stock_model(d_model=16, dropout=0.2).double()
    model.load_state_dict({k: torch.tensor(v.astype(F64)) for k, v in p.items()})
    model.train()
    masks = iter(ctx.drawn)
    scale = float(ctx.scale)

    def drop_forward(h):
        return h * torch.as_tensor(next(masks), dtype=h.dtype) * scale

    def sdpa(q, k, v, dropout_p=0.0, is_causal=False, **kw):
        assert is_causal and dropout_p == 0.2
        return _torch_attention(q, k, v, next(masks), scale)

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.forward = drop_forward
    real = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa
    try:
        logits = model(torch.tensor(x))
    finally:
        F.scaled_dot_product_attention = real
    assert next(masks, None) is None
    ref_loss = F.cross_entropy(logits.reshape(-1, V), torch.tensor(y).reshape(-1))
    ref_loss.backward()
    assert abs(float(loss) / (N * T) - float(ref_loss.detach())) < 1e-5
    for k, prm in model.named_parameters():
        _close(grads[k], prm.grad.numpy(), 2e-5, k)


# ------------------------------------------------------------------ full runs

def _charlm_cfg(overrides):
    return tw.load_config(str(CHARLM / "config.toml"), ["mode=exact", *overrides])


def _pipeline(overrides, runs, env):
    p = run_pipeline(["train", str(CHARLM / "config.toml"), "mode=exact", *overrides,
                      "--runs-dir", str(runs), "--json", "--quiet"], env, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout)


SMALL = ["train.max_steps=3", "model.args.d_model=32", "data.context=16",
         "data.test_fraction=0.0001"]
# AdamW's decay reaches LayerNorm and embedding weights; clipping's norm is a
# tree over 30 tensors in sorted-name order ("blocks.0..." before "head...").
OPTIONS = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.clip_norm=0.5",
           "optim.schedule=cosine", "optim.warmup_steps=1"]
DEFAULT_SIZE = ["train.max_steps=3", "data.test_fraction=0.0002"]  # the example's own size


def _swap_drop_sites(monkeypatch):
    real = tl.layer_mask

    def swapped(seed, step, site, row0, shape, T):
        site = {2: 3, 3: 2}.get(site, site)  # block 0's drop1 and drop2
        return real(seed, step, site, row0, shape, T)

    monkeypatch.setattr(tl, "layer_mask", swapped)


def _no_clip(monkeypatch):
    monkeypatch.setattr(to, "clip_grads", lambda grads, c: F32(1.0))


@pytest.mark.parametrize("name,overrides,control", [
    pytest.param("small", SMALL, _swap_drop_sites, id="small"),
    pytest.param("options", SMALL + OPTIONS, _no_clip, id="small_adamw_clip_cosine"),
    pytest.param("default", DEFAULT_SIZE, None, id="default_size")])
def test_charlm_hash_and_test_loss_match_pipeline(name, overrides, control, tmp_path, suite_env,
                                                  monkeypatch):
    """The charlm example in exact mode (4 shards, dropout 0.1; Adam as
    configured, or AdamW with weight decay, clipping and a warm-up + cosine
    schedule): the twin's weight hash and test loss equal the pipeline's.
    Controls: the twin with drop1 and drop2 drawing each other's site numbers,
    or without clipping, gives another hash."""
    params, metrics = tc.train(_charlm_cfg(overrides), str(TEXT), TEXT_SHA, with_test_loss=True)
    want = tw.weights_sha256(params)
    run = _pipeline(overrides, tmp_path / "runs", suite_env)
    assert run["weights_sha256"] == want, (name, run["weights_sha256"], want)
    assert run["metrics"]["test_loss"] == metrics["test_loss"]
    if control is not None:
        control(monkeypatch)
        other, _ = tc.train(_charlm_cfg(overrides), str(TEXT), TEXT_SHA)
        assert tw.weights_sha256(other) != want, f"{name}: the control changed nothing"


def test_new_project_convnet_hash_matches_pipeline(tmp_path, suite_env):
    """The project ``pipeline new`` writes (a stock Conv2d/ReLU/Flatten/Dropout/
    Linear Sequential) trained in exact mode, 3 steps on 8 shards: the twin's
    weight hash and test accuracy equal the pipeline's (Conv2d with xmm2,
    ReLU, a dropout site on flattened rows, layer numbering of a Sequential).
    Control: the twin without the dropout mask gives another hash."""
    proj = tmp_path / "proj"
    p = run_pipeline(["new", str(proj)], suite_env)
    assert p.returncode == 0, p.stderr
    overrides = ["mode=exact", "model.args.channels=4", "train.max_steps=3"]
    cfg = tw.load_config(str(proj / "config.toml"), overrides)
    data = proj / "data" / "digits.csv.gz"
    params, metrics = tn.train(cfg, str(data), tw.file_sha256(str(data)))
    want = tw.weights_sha256(params)
    p = run_pipeline(["train", str(proj / "config.toml"), *overrides, "--runs-dir",
                      str(tmp_path / "runs"), "--json", "--quiet"], suite_env, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    run = json.loads(p.stdout)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    cfg["model"]["args"]["dropout"] = 0.0
    assert tw.weights_sha256(tn.train(cfg, str(data), tw.file_sha256(str(data)))[0]) != want
