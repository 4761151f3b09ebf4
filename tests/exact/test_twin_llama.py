"""The twin's llama example (tests/twin/twin_llama.py, twin_llama_ops.py;
docs/exact-spec.md sections 21, 28, 29 and the network of examples/llama)
against the spec and, as a black box, the pipeline.

1. each new op: sincos64, sin/cos, log64, the rotary inverse frequencies and
   tables (section 28) against the spec's check values and float64 (math,
   mpmath) within the bounds the spec states, and bit for bit against the
   pipeline's public ``pipeline.exact.sin``, ``cos``, ``rotary_inv_freq``,
   ``rotary_tables``; the rotary application (the model's ``rope``) against
   float64 autograd and, converted by ``from_torch``, bit for bit; section 29's
   consumer sums by hand and against the pipeline (with inputs where another
   order gives other bits); this file's reading of section 21 (sum, mean,
   softmax, log-softmax) against twin_ops.py's reading, float64 and the
   pipeline; causal attention as section 26's lower-triangular mask;
2. the whole network (one shard): initialisation (section 16, the tied weight
   drawn once), logits and every parameter's gradient bit for bit against the
   stock model converted by ``from_torch``; within rounding of float64
   autograd through the stock model;
3. full runs: ``examples/llama/config.toml mode=exact`` (small dims, 3 steps,
   4 shards; Adam, or AdamW with clipping and a warm-up + cosine schedule) by
   ``python -m pipeline train`` (a subprocess) and by the twin: equal weight
   hash and test loss, at seeds 0 and 1; controls: the two seeds' hashes
   differ, the twin summing the three consumers of the normalised attention
   input in another order, or clipping with the tied weight counted twice,
   gives another hash.

The pipeline's training path (``LayerNet.shard_grads``, what ``pipeline
train`` runs) is the one compared for section 29: a plain ``backward()`` of a
module converted by ``from_torch`` leaves a value's consumer sum to autograd's
engine, which the spec does not specify.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from ..support import ROOT as REPO
from ..support import assert_close, train_json
from ..twin import numpy_twin as tw
from ..twin import twin_layers as tl
from ..twin import twin_llama as tlm
from ..twin import twin_llama_ops as R
from ..twin import twin_ops as to
from ..twin import twin_optim as topt

LLAMA = REPO / "examples" / "llama"
TEXT = REPO / "data" / "shakespeare.txt"
TEXT_SHA = "04decea0dd965df5e6cfc4a538b0c62623aaa3bfd848ac7fad6734e59c96624d"
F32 = np.float32
F64 = np.float64


def _same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    view = {4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    a, b = got.view(view).reshape(-1), want.view(view).reshape(-1)
    bad = np.nonzero(a != b)[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} differ; first at {bad[:4]}: got "
                           f"{got.reshape(-1)[bad[:4]]!r} want {want.reshape(-1)[bad[:4]]!r}")


def _differ(got, want) -> bool:
    got, want = np.asarray(got), np.asarray(want)
    view = {4: np.uint32, 8: np.uint64}[got.dtype.itemsize]
    return bool(np.any(got.view(view) != want.view(view)))




def _ulp32(ref: np.ndarray) -> np.ndarray:
    """The f32 ulp at the f64 values ``ref`` (the spacing of the f32 binade
    holding |ref|; subnormal spacing below)."""
    a = np.abs(np.asarray(ref, dtype=F64))
    _, e = np.frexp(np.maximum(a, np.finfo(F32).tiny))
    return np.ldexp(1.0, e - 24)


def _angles(rng, n=20000):
    """Normal at scales 0.01 .. 1e5, near multiples of pi/2, and edges."""
    scales = 10.0 ** rng.uniform(-2, 5, n)
    x = rng.standard_normal(n) * scales
    k = rng.integers(-600000, 600000, 2000)
    near = k * (math.pi / 2) + rng.uniform(-1e-3, 1e-3, 2000)
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-45, 0.7853981633974483, 2.0 ** 20, -2.0 ** 20,
             3.1415927, -3.1415927, 1.5707964, 1e5, 123456.789]
    return np.concatenate([x, near, edges]).astype(F32)


# ------------------------------------------------------------------ 28. constants, sincos64

def test_section_28_constants_and_coefficients():
    """The constants' bits and claims: PIO2_1 and PIO2_2 have 33 significant
    bits, the three parts sum to pi/2 within 1.1e-37 (mpmath); INV_PIO2 is 2/pi
    rounded; C_n, S_n are section 9.1's (the schedule's cospi uses the same)."""
    import mpmath

    mpmath.mp.prec = 200
    assert float(R.INV_PIO2).hex() == "0x1.45f306dc9c883p-1"
    assert R.INV_PIO2 == float(2 / mpmath.pi)
    for c in (R.PIO2_1, R.PIO2_2):
        m, _ = math.frexp(c)
        assert (m * 2 ** 33) == int(m * 2 ** 33)               # 33 bits
    err = abs(mpmath.mpf(R.PIO2_1) + mpmath.mpf(R.PIO2_2) + mpmath.mpf(R.PIO2_2T) - mpmath.pi / 2)
    assert err < mpmath.mpf("1.1e-37")
    assert R.C_COEF == topt._C and R.S_COEF == topt._S
    for n in range(10):
        assert abs(R.C_COEF[n] - float((-1) ** n / mpmath.factorial(2 * n))) <= \
            abs(R.C_COEF[n]) * 2 ** -53


def test_sin_cos_check_values():
    """Section 28's check values (float.hex of the f32 results) and sin(-0) = -0."""
    want = {1.0: ("0x1.aed548p-1", "0x1.14a28p-1"), 100.0: ("-0x1.03425cp-1", "0x1.b981dcp-1"),
            -3.0: ("-0x1.210386p-3", "-0x1.fae04cp-1"),
            2.0 ** 20: ("0x1.526cccp-2", "0x1.e33adap-1")}
    for x, (s, c) in want.items():
        xs = np.array([x], F32)
        assert float(R.sin_fwd(xs)[0]).hex() == float.fromhex(s).hex(), x
        assert float(R.cos_fwd(xs)[0]).hex() == float.fromhex(c).hex(), x
    y = R.sin_fwd(np.array([-0.0, 0.0], F32))
    assert np.signbit(y[0]) and not np.signbit(y[1])
    assert np.isnan(R.sin_fwd(np.array([np.nan], F32))).all()
    assert np.isnan(R.cos_parts(np.array([np.nan], F32))[1]).all()


def test_sincos64_refuses_outside_its_range():
    """|d| > 2^20 and infinities are refused, naming the largest |d|."""
    R.sincos64(np.array([2.0 ** 20, -2.0 ** 20]))
    for bad in (np.nextafter(2.0 ** 20, 3e6), 5e6, np.inf, -np.inf):
        with pytest.raises(ValueError, match="outside"):
            R.sincos64(np.array([0.5, bad, np.nan]))


def test_sincos64_close_to_math():
    """sincos64 within a few f64 ulps of math.sin/cos (the reduction keeps
    ``r`` to about 2^-53 |r|, the polynomials are Taylor to 2^-60), and each
    quadrant's sign and swap right (a misplaced quadrant errs by O(1))."""
    rng = np.random.default_rng(280)
    d = _angles(rng).astype(F64)
    S, C = R.sincos64(d)
    ms = np.array([math.sin(v) for v in d])
    mc = np.array([math.cos(v) for v in d])
    # absolute error in units of 2^-53 (sin, cos <= 1): the reduction's error is
    # relative to |r| <= pi/4, the polynomial's below 1 ulp
    assert np.max(np.abs(S - ms)) <= 2 ** -51
    assert np.max(np.abs(C - mc)) <= 2 ** -51
    big = np.abs(ms) > 1e-3
    assert np.max(np.abs(S[big] - ms[big]) / np.abs(ms[big])) < 2 ** -48


def test_sin_cos_f32_within_half_ulp_of_float64():
    """Section 28's measurement, on 22000 inputs (normal at scales 0.01 to 1e5,
    near multiples of pi/2, edges): each f32 ``sin``/``cos`` within 0.5 ulp
    of float64's ``math.sin``/``math.cos``; the derivatives are the other
    function's f32 (``cos`` and ``-sin``)."""
    rng = np.random.default_rng(281)
    x = _angles(rng)
    d = x.astype(F64)
    ms = np.array([math.sin(v) for v in d])
    mc = np.array([math.cos(v) for v in d])
    ys, dys = R.sin_parts(x)
    yc, dyc = R.cos_parts(x)
    assert np.all(np.abs(ys.astype(F64) - ms) <= 0.5 * _ulp32(ms))
    assert np.all(np.abs(yc.astype(F64) - mc) <= 0.5 * _ulp32(mc))
    _same_bits(dys, yc, "sin' = cos")
    _same_bits(dyc, (-ys).astype(F32), "cos' = -sin")
    g = rng.standard_normal(x.shape).astype(F32)
    _same_bits(R.sin_bwd(g, x), (g * yc).astype(F32), "sin backward")


def test_sin_cos_match_pipeline():
    """``pipeline.exact.sin`` / ``cos`` on the same inputs: forward and gradient
    (``g * RN32(cos)``, ``g * RN32(-sin)``) bit for bit; both refuse |x| > 2^20.
    Control: f32 ``np.sin`` (another libm) differs from both somewhere."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(282)
    x = _angles(rng)
    g = rng.standard_normal(x.shape).astype(F32)
    for name, fwd, bwd in (("sin", R.sin_fwd, R.sin_bwd), ("cos", R.cos_fwd, R.cos_bwd)):
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        y = getattr(exact, name)(xt)
        y.backward(torch.from_numpy(g.copy()))
        _same_bits(y.detach().numpy(), fwd(x), f"{name} y")
        _same_bits(xt.grad.numpy(), bwd(g, x), f"{name} gx")
        with pytest.raises(Exception, match="2\\^20"):
            getattr(exact, name)(torch.tensor([3e6]))
    assert _differ(np.sin(x), R.sin_fwd(x)) or _differ(np.cos(x), R.cos_fwd(x))


# ------------------------------------------------------------------ 28. log64, rotary tables

def test_log64_is_xlog_without_its_conversions_and_close_to_math():
    """``RN32(log64(f64(s)))`` is section 7's ``xlog(s)`` bit for bit on f32
    inputs; log64 is within 2 f64 ulps of math.log on f64 inputs."""
    rng = np.random.default_rng(283)
    s = np.ldexp(rng.uniform(0.5, 1, 20000), rng.integers(-140, 128, 20000)).astype(F32)
    s = np.concatenate([s, np.array([1.0, 2.0, 0.7071067, 0.70710677, 10000.0], F32)])
    _same_bits(R.log64(s.astype(F64)).astype(F32), tw.xlog(s), "log64 vs xlog")
    b = np.concatenate([10.0 ** rng.uniform(-300, 300, 20000), [1.0, 2.0, 10000.0, 500000.0]])
    ref = np.array([math.log(v) for v in b])
    err = np.abs(R.log64(b) - ref)
    assert np.all(err <= 2 * np.spacing(np.maximum(np.abs(ref), 1e-300)))
    with pytest.raises(ValueError):
        R.log64(np.array([0.0]))


ROTARY = [(8, 16, 10000.0, "half"), (32, 64, 10000.0, "half"), (128, 300, 500000.0, "half"),
          (6, 9, 2.5, "interleaved"), (2, 1, 10000.0, "half"), (64, 4096, 10000.0, "interleaved")]


@pytest.mark.parametrize("dim,T,base,layout", ROTARY)
def test_rotary_tables_close_to_float64_and_match_pipeline(dim, T, base, layout):
    """inv_i within 1 f32 ulp of ``base ** (-2i / dim)`` (mpmath), each table
    entry within 0.5 f32 ulp of math.cos/sin of the exact angle ``t * inv_i``;
    the layout; a table for T positions is the first rows of a longer one; and
    ``pipeline.exact.rotary_inv_freq`` / ``rotary_tables`` bit for bit."""
    import mpmath
    import torch

    from pipeline import exact

    inv = R.rotary_inv_freq(dim, base)
    assert inv.dtype == F32 and inv.shape == (dim // 2,)
    ref = np.array([float(mpmath.mpf(base) ** (-mpmath.mpf(2 * i) / dim))
                    for i in range(dim // 2)])
    assert np.all(np.abs(inv.astype(F64) - ref) <= _ulp32(ref))
    cos, sin = R.rotary_tables(dim, T, base, layout)
    assert cos.shape == sin.shape == (T, dim) and cos.dtype == sin.dtype == F32
    h = dim // 2
    cols = np.arange(dim) % h if layout == "half" else np.arange(dim) // 2
    ang = np.arange(T, dtype=F64)[:, None] * inv.astype(F64)[None, cols]
    rc, rs = np.cos(ang), np.sin(ang)      # f64 libm, compared within the spec's bound
    assert np.all(np.abs(cos.astype(F64) - rc) <= 0.5 * _ulp32(rc) + 2 ** -60)
    assert np.all(np.abs(sin.astype(F64) - rs) <= 0.5 * _ulp32(rs) + 2 ** -60)
    c2, s2 = R.rotary_tables(dim, T + 7, base, layout)
    _same_bits(c2[:T], cos, "prefix cos")
    _same_bits(s2[:T], sin, "prefix sin")
    _same_bits(exact.rotary_inv_freq(dim, base).numpy(), inv, "pipeline inv_freq")
    pc, ps = exact.rotary_tables(dim, T, base, layout=layout)
    assert isinstance(pc, torch.Tensor)
    _same_bits(pc.numpy(), cos, "pipeline cos table")
    _same_bits(ps.numpy(), sin, "pipeline sin table")


def test_rotary_tables_refusals():
    for args in [(7, 4), (0, 4), (8, 0), (8, (1 << 20) + 1), (8, 4, 1.0), (8, 4, 0.5)]:
        with pytest.raises(ValueError):
            R.rotary_tables(*args)
    with pytest.raises(ValueError):
        R.rotary_tables(8, 4, 10000.0, "other")


def _rope_module(E, T):
    """The stock model's ``Attention.rope`` on its own (a user module), its
    tables built in ``__init__`` by ``pipeline.exact.rotary_tables`` as the
    model builds them (exact mode refuses a table of other provenance)."""
    import torch

    from pipeline.exact import rotary_tables

    spec = importlib.util.spec_from_file_location("llama_model_for_rope", LLAMA / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    class Rope(torch.nn.Module):
        def __init__(self):
            super().__init__()
            cos, sin = rotary_tables(E, T, 10000.0)
            self.register_buffer("cos", cos, persistent=False)
            self.register_buffer("sin", sin, persistent=False)

        def forward(self, x):
            t = x.shape[2]
            return x * self.cos[:t] + mod.rotate_half(x) * self.sin[:t]

    return Rope()


def test_rope_matches_float64_autograd_and_pipeline():
    """The rotary application (examples/llama/model.py's ``rope``; the twin's
    tables, the module's from the pipeline's rotary_tables) on ``(N, H, T,
    E)``: the twin's forward and backward within rounding of float64
    autograd, and bit for bit equal to the module converted by from_torch
    under the guard (data movement, two f32 products and a sum; the input's
    gradient the f32 sum of its two consumers', which commutes).
    Control: the gradient without the ``rotate_half`` consumer differs."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(284)
    N, H, T, E = 3, 2, 11, 8
    cos, sin = R.rotary_tables(E, 16, 10000.0)
    x = (rng.standard_normal((N, H, T, E)) * 3).astype(F32)
    g = rng.standard_normal((N, H, T, E)).astype(F32)
    y = R.rope_fwd(x, cos[:T], sin[:T])
    gx = R.rope_bwd(g, cos[:T], sin[:T])
    x64 = torch.from_numpy(x.astype(F64)).requires_grad_(True)
    m64 = _rope_module(E, 16).double()
    y64 = m64(x64)
    y64.backward(torch.from_numpy(g.astype(F64)))
    assert_close(y, y64.detach().numpy(), 1e-6, "rope y")
    assert_close(gx, x64.grad.numpy(), 1e-6, "rope gx")
    m = exact.from_torch(_rope_module(E, 16))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    with exact.Guard():
        yt = m(xt)
    assert exact.check_graph(yt) == []
    yt.backward(torch.from_numpy(g.copy()))
    _same_bits(yt.detach().numpy(), y, "rope y vs pipeline")
    _same_bits(xt.grad.numpy(), gx, "rope gx vs pipeline")
    assert _differ((g * cos[:T]).astype(F32), gx)


# ------------------------------------------------------------------ 29. several consumers

def test_consumer_sums_by_hand():
    """n = 1: the gradient itself; n = 2: the f32 sum; n = 3: ``(g0 + g1) +
    g2``; n = 4: ``(g0 + g1) + (g2 + g3)``; n = 5: ``((g0 + g1) + (g2 + g3)) +
    g4``; ``None`` (a consumer giving no gradient) left out, the rest in order.
    The three values make each of the three groupings give other bits."""
    a, b, c, d, e = (np.array([v], F32) for v in (2.0 ** 24, 1.0, -1.5, 3.0, 0.5))
    big = F32(2.0 ** 24)
    assert R.consumers_grad([a])[0] == big
    assert R.consumers_grad([a, b])[0] == big + F32(1.0)
    got3 = R.consumers_grad([a, b, c])[0]
    assert got3 == (big + F32(1.0)) + F32(-1.5) == big - F32(2.0)
    assert (big + F32(-1.5)) + F32(1.0) == big - F32(1.0)   # another order: other bits
    assert (F32(1.0) + F32(-1.5)) + big == big
    assert R.consumers_grad([a, b, c, d])[0] == (a[0] + b[0]) + (c[0] + d[0])
    assert R.consumers_grad([a, b, c, d, e])[0] == ((a[0] + b[0]) + (c[0] + d[0])) + e[0]
    assert R.consumers_grad([a, None, b, None, c])[0] == got3
    with pytest.raises(ValueError):
        R.consumers_grad([None])


FAN_IN, FAN_N, FAN_B = 24, 16, 8


def _fanout_module(kind):
    """``h = lin(x)`` (a parameter's product, so its gradient reaches a
    parameter), then a value with several consumers."""
    import torch

    class Fan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(FAN_IN, FAN_N, bias=False)

        def forward(self, x):
            h = self.lin(x)
            if kind == "cat3":      # one op taking h three times: three consumers, in order
                return torch.cat([h, h, h], -1)
            if kind == "contig":    # contiguous() of a contiguous h is h: still three
                return torch.cat([h * 2.0, h.contiguous() * 3.0, h * 5.0], -1)
            if kind == "mul4":
                return torch.cat([h * 2.0, h * 3.0, h * 5.0, h * 7.0], -1)
            if kind == "mul5":
                return torch.cat([h * 2.0, h * 3.0, h * 5.0, h * 7.0, h * 0.5], -1)
            raise AssertionError(kind)

    return Fan()


def _groupings(k: int) -> list[list[int]]:
    """Consumer orders whose tree is not the spec's order up to commutativity."""
    return {3: [[0, 2, 1], [1, 2, 0]],
            4: [[0, 2, 1, 3], [0, 3, 1, 2]],
            5: [[4, 3, 2, 1, 0], [1, 2, 3, 4, 0], [0, 2, 1, 3, 4]]}[k]


@pytest.mark.parametrize("kind,factors", [("cat3", (1.0, 1.0, 1.0)),
                                          ("contig", (2.0, 3.0, 5.0)),
                                          ("mul4", (2.0, 3.0, 5.0, 7.0)),
                                          ("mul5", (2.0, 3.0, 5.0, 7.0, 0.5))])
def test_consumer_sums_match_pipeline(kind, factors):
    """A value ``h = lin(x)`` with three, four or five consumers (``cat`` of
    it three times: one consumer per input, in argument order; products with
    Python numbers, one through ``contiguous()``, which is no operation):
    section 29's tree of the consumers' gradients in forward order, then
    ``lin``'s weight gradient, bit for bit the pipeline's training path
    (``pipeline.exact.LayerNet.shard_grads`` on the module converted by
    from_torch). Controls: the other groupings of the sum give another weight
    gradient. (A plain ``backward()`` of the converted module outside LayerNet
    leaves the sum to autograd's engine, which section 29 does not specify.)"""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(290)
    k = len(factors)
    x = (rng.standard_normal((FAN_B, FAN_IN)) * 3).astype(F32)
    y = rng.integers(0, FAN_N * k, FAN_B)
    W = tl.uniform_init(9, 0, 0, (FAN_N, FAN_IN), FAN_IN)
    h = tl.linear_fwd(x, W, None)
    logits = np.concatenate([(h * F32(f)).astype(F32) for f in factors], -1)
    _, gz = tw.softmax_xent(logits, y, 2 * FAN_B)
    shares = [(gz[:, i * FAN_N:(i + 1) * FAN_N] * F32(f)).astype(F32)
              for i, f in enumerate(factors)]
    want = tl.linear_bwd(R.consumers_grad(shares), x, W, has_bias=False)[0]
    for order in _groupings(k):
        other = tl.linear_bwd(R.consumers_grad([shares[i] for i in order]), x, W, False)[0]
        assert _differ(other, want), f"{kind}: the order {order} gives the same bits"
    net = exact.LayerNet(exact.from_torch(_fanout_module(kind)), 9, "cpu")
    _same_bits(net.params["lin.weight"].detach().numpy(), W, "init")
    _, grads = net.shard_grads(torch.from_numpy(x), torch.from_numpy(y), 2 * FAN_B, None,
                               step=0, row0=0)
    _same_bits(grads["lin.weight"].numpy(), want, f"{kind} lin.weight gradient")


# ------------------------------------------------------------------ 21. a second reading

def _sum_cases(rng):
    x = (rng.standard_normal((3, 5, 4, 6)) * np.exp(rng.uniform(-8, 8, (3, 5, 4, 6)))).astype(F32)
    cases = [(x, d, k) for d in [None, [], 0, -1, 2, (0, 2), [3, 1], (-3, -1), (0, 1, 2, 3)]
             for k in (False, True)]
    cases += [(np.zeros((2, 0, 3), F32), 1, False), (np.zeros((2, 0, 3), F32), None, True),
              (np.array(F32(2.5)), None, False), (np.array(F32(-0.0)), 0, True),
              (rng.standard_normal(1000).astype(F32), 0, False)]
    return cases


def test_reductions_two_readings_agree_and_match_pipeline():
    """This file's reading of section 21's sum and mean (forward and gradient)
    equals twin_ops.py's and ``pipeline.exact.xsum`` / ``xmean`` bit for bit
    on every case (dims as int, list, negative, none, empty; keepdim; n = 0;
    0-dim), f32 and f64; and is within rounding of math.fsum. Control: a
    left-to-right sum differs somewhere."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(210)
    for x, dims, keep in _sum_cases(rng):
        for dt in (F32, F64):
            xx = x.astype(dt)
            label = f"{xx.dtype} {xx.shape} dims={dims} keepdim={keep}"
            s = R.xsum(xx, dims, keep)
            _same_bits(s, np.asarray(to.sum_fwd(xx, dims, keep)), f"sum two readings {label}")
            td = tuple(dims) if isinstance(dims, (list, tuple)) else dims
            xt = torch.from_numpy(xx.copy()).requires_grad_(True)
            y = exact.xsum(xt, td, keep) if td is not None else exact.xsum(xt, None, keep)
            _same_bits(y.detach().numpy(), s, f"sum vs pipeline {label}")
            g = rng.standard_normal(s.shape).astype(dt)
            y.backward(torch.from_numpy(np.array(g, copy=True)))
            _same_bits(xt.grad.numpy(), R.xsum_bwd(g, xx.shape, dims, keep), f"gsum {label}")
            if xx.size == 0:
                continue
            mn = R.xmean(xx, dims, keep)
            _same_bits(mn, np.asarray(to.mean_fwd(xx, dims, keep)), f"mean two readings {label}")
            xt = torch.from_numpy(xx.copy()).requires_grad_(True)
            y = exact.xmean(xt, td, keep)
            _same_bits(y.detach().numpy(), mn, f"mean vs pipeline {label}")
            y.backward(torch.from_numpy(np.array(g, copy=True)))
            gm = R.xmean_bwd(g, xx.shape, dims, keep)
            _same_bits(gm, np.asarray(to.mean_bwd(g, xx.shape, dims, keep)), f"gmean {label}")
            _same_bits(xt.grad.numpy(), gm, f"gmean vs pipeline {label}")
    x = rng.standard_normal((7, 300)).astype(F32) * F32(1e4)
    ref = np.array([math.fsum(r) for r in x.astype(F64)])
    assert_close(R.xsum(x, 1), ref, 300 * 2 ** -24, "sum vs fsum")
    left = np.zeros(7, F32)
    for j in range(300):
        left = left + x[:, j]
    assert _differ(left, R.xsum(x, 1))


def test_reductions_tree_order_by_hand():
    """The reduced dims' entries in C order of those dims: a sum over dims
    (0, 2) of a (2, 1, 2) tensor is the tree ``(x000 + x001) + (x100 + x101)``;
    over dims (2, 0) the same; an integer sum is exact."""
    x = np.array([[[1e8, 3.0]], [[-1e8, 3.0]]], F32)
    want = (F32(1e8) + F32(3.0)) + (F32(-1e8) + F32(3.0))
    assert R.xsum(x, (0, 2))[0] == want == R.xsum(x, [2, 0])[0] == F32(0.0)
    assert R.xsum(x, None) == want
    xi = np.array([[2 ** 40, 1], [-2 ** 40, 1]], np.int64)
    assert R.xsum(xi, None) == 2 and R.xsum(xi, 0).tolist() == [0, 2]


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_two_readings_agree_and_match_pipeline(fn):
    """This file's softmax / log-softmax over any dim (forward and gradient)
    equal twin_ops.py's and ``pipeline.exact.softmax`` / ``log_softmax`` bit
    for bit (dims 0, 1, -1, a 0-dim input, rows of 1000, large and -inf-free
    logits); within rounding of float64 autograd."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(211)
    mine_f, mine_b = getattr(R, fn), getattr(R, f"{fn}_bwd")
    other_f, other_b = getattr(to, f"{fn}_fwd"), getattr(to, f"{fn}_bwd")
    cases = [((rng.standard_normal((4, 7, 5)) * 8).astype(F32), d) for d in (0, 1, -1, 2)]
    cases += [((rng.standard_normal((3, 1000)) * 30).astype(F32), 1),
              (np.array(F32(1.5)), 0), (np.full((2, 5), 7.0, F32), 1)]
    for x, d in cases:
        label = f"{fn} {x.shape} dim={d}"
        y, cache = mine_f(x, d)
        y2, cache2 = other_f(x, d)
        _same_bits(y, y2, f"{label} two readings")
        g = rng.standard_normal(x.shape).astype(F32)
        gx = mine_b(g, cache)
        _same_bits(gx, other_b(g, cache2), f"{label} gx two readings")
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = getattr(exact, fn)(xt, d)
        _same_bits(yt.detach().numpy(), y, f"{label} vs pipeline")
        yt.backward(torch.from_numpy(g.copy()))
        _same_bits(xt.grad.numpy(), gx, f"{label} gx vs pipeline")
        x64 = torch.from_numpy(x.astype(F64)).requires_grad_(True)
        y64 = getattr(torch, fn)(x64, d)
        y64.backward(torch.from_numpy(g.astype(F64)))
        assert_close(y, y64.detach().numpy(), 1e-6, label)
        assert_close(gx, x64.grad.numpy(), 1e-5, f"{label} gx")
    with pytest.raises(TypeError):
        mine_f(np.zeros(3, F64), 0)


# ------------------------------------------------------------------ 22 / 26. as the model uses them

def test_causal_attention_is_the_lower_triangular_mask_and_rmsnorm_eps():
    """Section 26: a lower-triangular bool mask gives the causal bits: the
    twin's causal attention equals ``pipeline.exact.attention`` with
    ``causal=True`` and with ``attn_mask = tril`` (forward and gradients);
    RMSNorm with the model's weight and ``eps = 1e-5`` equals
    ``pipeline.exact.rms_norm`` (forward and gradients)."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(260)
    N, H, T, E = 2, 3, 9, 8
    q, k, v = (rng.standard_normal((N, H, T, E)).astype(F32) for _ in range(3))
    gy = rng.standard_normal((N, H, T, E)).astype(F32)
    y, cache = tl.attention_fwd(q, k, v, True)
    gq, gk, gv = tl.attention_bwd(gy, cache)
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    for kw in ({"causal": True}, {"causal": False, "attn_mask": tril}):
        ts = [torch.from_numpy(a.copy()).requires_grad_(True) for a in (q, k, v)]
        yt = exact.attention(*ts, **kw)
        yt.backward(torch.from_numpy(gy.copy()))
        _same_bits(yt.detach().numpy(), y, f"attention {list(kw)}")
        for name, t, want in zip("qkv", ts, (gq, gk, gv)):
            _same_bits(t.grad.numpy(), want, f"attention g{name} {list(kw)}")
    x = (rng.standard_normal((2, 5, 16)) * 4).astype(F32)
    w = rng.uniform(0.5, 1.5, 16).astype(F32)
    g = rng.standard_normal(x.shape).astype(F32)
    yr, cr = to.rmsnorm_fwd(x, (16,), w, 1e-5)
    gxr, gwr = to.rmsnorm_bwd(g, cr, w)
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    wt = torch.from_numpy(w.copy()).requires_grad_(True)
    yt = exact.rms_norm(xt, (16,), wt, 1e-5)
    yt.backward(torch.from_numpy(g.copy()))
    _same_bits(yt.detach().numpy(), yr, "rms_norm y")
    _same_bits(xt.grad.numpy(), gxr, "rms_norm gx")
    _same_bits(wt.grad.numpy(), gwr, "rms_norm gw")


# ------------------------------------------------------------------ the network

def _stock(V=84, context=16, **args):
    spec = importlib.util.spec_from_file_location("llama_model_for_twin", LLAMA / "model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.llama((context,), V, **args)


SMALL_ARGS = {"n_layer": 2, "n_head": 2, "d_model": 32, "hidden": 72}


def _arch(context=16, **args):
    return tlm.arch_of({**SMALL_ARGS, **args}, context)


def test_llama_init_numbering_matches_pipeline():
    """Section 16 on the stock model converted by from_torch and initialised by
    ``pipeline.exact.init_exact``: every tensor bit for bit the twin's (``tok``
    layer 0, each block's nine layers, ``norm``, the tied head drawing
    nothing); the tied weight is one tensor. Controls: numbering the Attention
    container as a layer, or drawing the head, gives other bits."""
    from pipeline import exact

    a = _arch()
    m = exact.init_exact(exact.from_torch(_stock(**SMALL_ARGS)), 11)
    assert m.head.weight is m.tok.weight
    got = {k: v.detach().numpy() for k, v in m.named_parameters()}
    want = tlm.init_params(11, 84, a)
    assert sorted(got) == sorted(want)
    for k in want:
        _same_bits(got[k], want[k], k)
    assert np.all(want["blocks.1.mlp_norm.weight"] == 1)
    # controls: another numbering
    shifted = tl.uniform_init(11, 3, 0, (32, 32), 32)          # wq numbered as 3
    assert _differ(shifted, want["blocks.0.attn.wq.weight"])
    head_draw = tl.uniform_init(11, 20, 0, (84, 32), 32)
    assert _differ(head_draw, want["tok.weight"])


@pytest.mark.parametrize("args,context,N", [
    pytest.param({}, 16, 3, id="small"),
    pytest.param({"n_layer": 1, "n_head": 4, "d_model": 64, "hidden": 136,
                  "rope_base": 500000.0, "eps": 1e-6}, 64, 2, id="wider")])
def test_llama_network_matches_pipeline_op_by_op(args, context, N):
    """One shard of the llama network, in this process, against the
    pipeline's training path: the stock model (examples/llama/model.py)
    converted by from_torch and initialised by ``pipeline.exact.LayerNet``
    (seed 5) holds the twin's weights, predicts the twin's logits, and its
    ``shard_grads`` (a global batch of 4 shards) gives the twin's loss sum and
    every parameter's gradient bit for bit (the tied ``tok.weight`` the sum of
    the embedding's and the head's; the normalised attention input's three
    consumers in section 29's order); sequences shorter than the context use
    the tables' first rows. Control: the twin summing the three consumers as
    ``(g_q + g_v) + g_k`` gives another gradient somewhere."""
    import torch

    from pipeline import exact

    a = _arch(context, **args)
    p = tlm.init_params(5, 84, a)
    rng = np.random.default_rng(31)
    T = context - 3
    x = rng.integers(0, 84, (N, T))
    y = rng.integers(0, 84, (N, T))
    tables = tlm.make_tables(a)
    grads, loss = tlm.shard_grads(p, x, y, 4 * N * T, a, tables)
    net = exact.LayerNet(exact.from_torch(_stock(84, context, **{**SMALL_ARGS, **args})), 5, "cpu")
    assert net.structure()["tied"] == tlm.TIED
    assert sorted(net.params) == sorted(p)
    for k in p:
        _same_bits(net.params[k].detach().numpy(), p[k], f"init {k}")
    logits, _ = tlm.forward(p, x, a, tables)
    _same_bits(net.predict(torch.from_numpy(x)).detach().numpy(), logits, "logits")
    got_loss, got = net.shard_grads(torch.from_numpy(x), torch.from_numpy(y), 4 * N * T, None,
                                    step=0, row0=0)
    _same_bits(np.asarray(float(got_loss), F32), np.asarray(loss, F32), "loss")
    assert sorted(got) == sorted(grads)
    for k in grads:
        _same_bits(got[k].numpy(), grads[k], k)
    real = R.consumers_grad

    def swapped(gs):
        return real([gs[0], gs[2], gs[1]] if len(gs) == 3 else gs)

    R.consumers_grad = swapped
    try:
        other, _ = tlm.shard_grads(p, x, y, 4 * N * T, a, tables)
    finally:
        R.consumers_grad = real
    assert any(_differ(other[k], grads[k]) for k in grads)


def test_llama_gradient_close_to_float64_autograd():
    """The twin's one-shard loss and gradients within float32 rounding of
    float64 autograd through the stock model (``.double()``, the same weights
    and rotary tables)."""
    import torch
    import torch.nn.functional as F

    a = _arch()
    p = tlm.init_params(2, 84, a)
    rng = np.random.default_rng(32)
    N, T = 3, 16
    x = rng.integers(0, 84, (N, T))
    y = rng.integers(0, 84, (N, T))
    grads, loss = tlm.shard_grads(p, x, y, N * T, a, tlm.make_tables(a))
    model = _stock(**SMALL_ARGS).double()
    with torch.no_grad():
        for k, v in p.items():
            model.get_parameter(k).copy_(torch.from_numpy(v.astype(F64)))
    logits = model(torch.from_numpy(x))
    ref = F.cross_entropy(logits.reshape(-1, 84), torch.from_numpy(y).reshape(-1))
    ref.backward()
    assert abs(float(loss) / (N * T) - float(ref.detach())) < 1e-5
    for k, prm in model.named_parameters():
        assert_close(grads[k], prm.grad.numpy(), 3e-5, k)


# ------------------------------------------------------------------ full runs

def test_twin_reproduces_the_documented_tiny_llama_check_value():
    """docs/explanation/exact-mode.md's check value for
    tests/system/test_llama.py's tiny configuration of the example (what the
    pipeline gives on any machine, at every ISA level, thread count and world
    size that file tries): the twin's weight hash equals the table's, and its
    test loss the printed one to its four decimals."""
    import re

    from ..system.test_llama import TINY

    doc = (REPO / "docs" / "explanation" / "exact-mode.md").read_text(encoding="utf-8")
    rows = [ln for ln in doc.splitlines() if "test_llama.py`'s tiny configuration" in ln]
    assert len(rows) == 1, rows
    want = re.search(r"`([0-9a-f]{64})`", rows[0])
    loss = re.search(r"validation loss (\d+\.\d+)", rows[0])
    assert want and loss, rows[0]
    params, metrics = tlm.train(_cfg([o for o in TINY if o != "mode=exact"]), str(TEXT),
                                TEXT_SHA, with_test_loss=True)
    assert tw.weights_sha256(params) == want.group(1)
    assert f"{metrics['test_loss']:.4f}" == loss.group(1)


SHORT = ["train.max_steps=3", "model.args.d_model=32", "model.args.n_head=2",
         "model.args.hidden=72", "data.context=16", "data.test_fraction=0.0001"]


def _cfg(overrides):
    return tw.load_config(str(LLAMA / "config.toml"), ["mode=exact", *overrides])


def _pipeline_run(overrides, runs, env):
    return train_json(["mode=exact", *overrides], runs, env, config=LLAMA / "config.toml", timeout=600)


def _swap_consumers(monkeypatch):
    """The normalised attention input's three consumers summed as ``(g_q +
    g_v) + g_k``."""
    real = R.consumers_grad
    monkeypatch.setattr(R, "consumers_grad",
                        lambda gs: real([gs[0], gs[2], gs[1]] if len(gs) == 3 else gs))


def _clip_counting_the_tie_twice(monkeypatch):
    """Clipping's norm with the tied weight counted under both names."""
    real = topt.clip_grads

    def twice(grads, c):
        both = {**grads, "head.weight": grads["tok.weight"]}
        scale = real(both, c)
        for k in grads:
            grads[k] = (grads[k] * scale).astype(F32)
        return scale

    monkeypatch.setattr(topt, "clip_grads", twice)


# AdamW's decay and clipping's norm reach the tied weight once (one value,
# saved once); a warm-up step, then the cosine.
OPTIONS = ["optim.name=adamw", "optim.weight_decay=0.1", "optim.clip_norm=0.5",
           "optim.schedule=cosine", "optim.warmup_steps=1", "optim.lr=0.01"]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("overrides,other_seed,control", [
    pytest.param(["seed=0"], 1, _swap_consumers, id="seed0"),
    pytest.param(["seed=1"], 0, _swap_consumers, id="seed1"),
    pytest.param(["seed=0", *OPTIONS], None, _clip_counting_the_tie_twice,
                 id="adamw_clip_cosine")])
def test_llama_hash_and_test_loss_match_pipeline(overrides, other_seed, control, tmp_path,
                                                 suite_env, monkeypatch):
    """examples/llama in exact mode, small dims (d_model 32, 2 heads, SwiGLU
    width 72, context 16), 3 steps on 4 shards, Adam as configured at seeds 0
    and 1, or AdamW with weight decay, clipping and a warm-up + cosine
    schedule: the twin's weight hash and test loss equal ``python -m pipeline
    train``'s (the tied weight saved once, as ``tok.weight``). Controls: the
    other seed's twin hash differs (so the seeds' hashes differ); the twin
    summing the normalised attention input's three consumers as ``(g_q + g_v)
    + g_k``, or clipping with the tied weight counted twice, gives another
    hash."""
    ov = [*SHORT, *overrides]
    params, metrics = tlm.train(_cfg(ov), str(TEXT), TEXT_SHA, with_test_loss=True)
    want = tw.weights_sha256(params)
    assert "head.weight" not in params
    run = _pipeline_run(ov, tmp_path / "runs", suite_env)
    assert run["parameters"]["tied"] == tlm.TIED
    assert run["weights_sha256"] == want, (overrides, run["weights_sha256"], want)
    assert run["metrics"]["test_loss"] == metrics["test_loss"]
    if other_seed is not None:
        flipped, _ = tlm.train(_cfg([*SHORT, f"seed={other_seed}"]), str(TEXT), TEXT_SHA)
        assert tw.weights_sha256(flipped) != want
    control(monkeypatch)
    other, _ = tlm.train(_cfg(ov), str(TEXT), TEXT_SHA)
    assert tw.weights_sha256(other) != want, "the control changed nothing"
