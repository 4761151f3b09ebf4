"""The twin's Part III ops (tests/twin/twin_ops.py; docs/exact-spec.md sections
20-23) against the spec and, as a black box, the pipeline.

1. self-checks: the spec's check values (section 20), float64 references
   within rounding, scalar readings of the trees, and controls showing that
   each bit-for-bit comparison can fail;
2. op by op, forward and backward, bit for bit: a stock torch module (or a
   module whose forward calls the torch function) converted by
   ``pipeline.exact.from_torch`` and run under ``pipeline.exact.Guard`` (as
   ``pipeline train`` runs a user's forward), against the twin, on random
   inputs drawn with NumPy and the edge inputs the spec names;
3. a training run: a project whose model uses every new op, trained by
   ``python -m pipeline train ... mode=exact`` (a subprocess) and by the twin
   (tests/twin/twin_opsnet.py): equal weight hashes, with a control.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ..support import f32_bits as _bits
from ..support import assert_close, run_pipeline
from ..twin import numpy_twin as tw
from ..twin import twin_ops as to

F32 = np.float32
F64 = np.float64
TINY = np.finfo(F32).smallest_subnormal


def _same_bits(got, want, what=""):
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, (what, got.dtype, want.dtype)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    view = np.uint32 if got.dtype == F32 else np.uint64 if got.dtype == F64 else got.dtype
    a, b = got.view(view).reshape(-1), want.view(view).reshape(-1)
    bad = np.nonzero(a != b)[0]
    assert bad.size == 0, (f"{what}: {bad.size} of {a.size} differ; first at {bad[:4]}: got "
                           f"{got.reshape(-1)[bad[:4]]!r} want {want.reshape(-1)[bad[:4]]!r}")




# ------------------------------------------------------------------ the pipeline, a black box

def _fn_module(fn):
    """A stock user module whose forward calls ``fn`` (kept by from_torch with its
    forward code, which then runs under the guard)."""
    import torch

    class Fn(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    return Fn()


def _pipeline(module, x, g, params=None):
    """(y, gx, {name: grad}) of ``from_torch(module)`` on ``x`` under the guard,
    backward from ``g``; ``params`` (name -> array) set on the stock module first."""
    import torch

    from pipeline import exact

    if params:
        with torch.no_grad():
            for name, v in params.items():
                module.get_parameter(name).copy_(torch.from_numpy(np.asarray(v)))
    m = exact.from_torch(module)
    for name, v in (params or {}).items():
        _same_bits(m.get_parameter(name).detach().numpy(), np.asarray(v), f"copied {name}")
    xt = torch.from_numpy(np.array(x, copy=True)).requires_grad_(True)
    with exact.Guard():
        y = m(xt)
    assert exact.check_graph(y) == [], exact.check_graph(y)
    y.backward(torch.from_numpy(np.array(g, copy=True)))
    grads = {n: p.grad.detach().numpy() for n, p in m.named_parameters()}
    return y.detach().numpy(), xt.grad.detach().numpy(), grads


# ------------------------------------------------------------------ 20. SiLU, Sigmoid, Tanh

def _wide(rng, n=4000):
    """6 N(0, 1), every f32 exponent from 2^-149 to 2^127 with both signs, the
    series/exponential boundary 0.0625, the clamp of exp64 (|x| near 110, 45,
    55), subnormal outputs (sigmoid of -88 .. -104), signed zeros."""
    e = rng.integers(-149, 128, n)
    sweep = (np.ldexp(rng.uniform(1, 2, n), e) * rng.choice([-1, 1], n)).astype(F32)
    b = F32(0.0625)
    edges = [0.0, -0.0, TINY, -TINY, 1e-30, -1e-30, b, -b, np.nextafter(b, F32(0)),
             -np.nextafter(b, F32(0)), np.nextafter(b, F32(1)), 1.0, -1.0, 15.0, -15.0,
             44.0, 45.0, -45.0, 55.0, -55.0, 88.0, -88.0, 100.0, -100.0, -103.0, -104.0,
             109.9, -109.9, 110.0, -110.0, 111.0, -111.0, 1e30, -1e30, 3e38, -3e38]
    return np.concatenate([(rng.standard_normal(n) * 6).astype(F32), sweep,
                           rng.uniform(-0.07, 0.07, 500).astype(F32),
                           rng.uniform(-104, -85, 500).astype(F32),
                           np.array(edges, dtype=F32)])


def test_activation_check_values():
    """Section 20's check values (float.hex of y and dy) bit for bit; the
    sigmoid of -100 is a subnormal where stock torch's f32 sigmoid gives 0 (the
    control: a stock float32 evaluation does not give the spec's bits)."""
    import torch

    cases = [(to.sigmoid_parts, -100.0, "0x1.bp-145", "0x1.bp-145"),
             (to.sigmoid_parts, 1.0, "0x1.764d5p-1", "0x1.92a946p-3"),
             (to.silu_parts, -2.5, "-0x1.8464d6p-3", "-0x1.97259ep-4"),
             (to.tanh_parts, 0.03, "0x1.eb5f62p-6", "0x1.ff8a1cp-1"),
             (to.tanh_parts, -3.0, "-0x1.fd77d2p-1", "0x1.434a52p-7")]
    for parts, x, y, dy in cases:
        gy, gdy = parts(np.array([x], F32))
        assert (float(gy[0]), float(gdy[0])) == (float.fromhex(y), float.fromhex(dy)), parts
    assert float(torch.sigmoid(torch.tensor([-100.0]))[0]) == 0.0
    y, _ = to.tanh_parts(np.array([-0.0], F32))
    assert _bits(y).tolist() == [0x80000000]            # d = -0 takes the series: -0
    # A consequence of exp64's clamp at -110, kept literally (the pipeline agrees:
    # these inputs are in test_activations_match_pipeline): below about -414,
    # SiLU's y = RN32(d * E / (1 + E)) with E = exp64(-110) is no longer -0
    # (stock torch gives -0), and so is its derivative.
    y, dy = to.silu_parts(np.array([-1e30, -3e38, -400.0], F32))
    E = float(to.exp64(np.array([-110.0]))[0])
    assert y[0] == F32(float(F32(-1e30)) * (E / (1.0 + E))) == dy[0] and float(y[0]) < -1e-18
    assert float(y[1]) < -5e-10 and _bits(y[2]) == 0x80000000


@pytest.mark.parametrize("name", ["sigmoid", "silu", "tanh"])
def test_activation_close_to_float64(name):
    """y within 0.5 ulp (plus f64's own error) of torch's float64 function, and dy
    within 1 ulp of the derivative in float64 forms that do not cancel
    (sigmoid(x) sigmoid(-x); sigmoid(x) (1 + x sigmoid(-x)); 1 / cosh(x)^2),
    on 6 N(0, 1) inputs and small ones (the series)."""
    import torch

    rng = np.random.default_rng(200)
    x = np.concatenate([(rng.standard_normal(20000) * 6), rng.uniform(-0.1, 0.1, 2000)])
    x = x.astype(F32)
    y, dy = getattr(to, f"{name}_parts")(x)
    t = torch.tensor(x.astype(F64))
    s, sn = torch.sigmoid(t), torch.sigmoid(-t)
    r, dr = {"sigmoid": (s, s * sn), "silu": (t * s, s * (1 + t * sn)),
             "tanh": (torch.tanh(t), 1 / torch.cosh(t) ** 2)}[name]
    r, dr = r.numpy(), dr.numpy()
    ulp_y = np.abs(y - r) / np.spacing(np.abs(r).astype(F32))
    ulp_d = np.abs(dy - dr) / np.spacing(np.abs(dr).astype(F32))
    assert ulp_y.max() <= 0.5 + 1e-6 and ulp_d.max() <= 1.0, (name, ulp_y.max(), ulp_d.max())


def _act_modules():
    import torch
    import torch.nn.functional as F

    nn = torch.nn
    return [("nn.SiLU", nn.SiLU(), "silu"), ("F.silu", _fn_module(F.silu), "silu"),
            ("nn.Sigmoid", nn.Sigmoid(), "sigmoid"),
            ("torch.sigmoid", _fn_module(torch.sigmoid), "sigmoid"),
            ("Tensor.sigmoid", _fn_module(lambda x: x.sigmoid()), "sigmoid"),
            ("nn.Tanh", nn.Tanh(), "tanh"), ("torch.tanh", _fn_module(torch.tanh), "tanh"),
            ("Tensor.tanh", _fn_module(lambda x: x.tanh()), "tanh")]


def test_activations_match_pipeline():
    """SiLU, Sigmoid, Tanh (modules and function spellings) converted by
    from_torch: y and gx bit for bit equal to the twin's on 6 N(0, 1), every
    f32 exponent, the 0.0625 series boundary, exp64's clamp, subnormal outputs,
    +-0 and huge inputs; g random with subnormal and zero entries.
    Control: the twin's derivative with the series bound moved to 0.05 differs
    from the pipeline somewhere, so the comparison can fail."""
    rng = np.random.default_rng(201)
    x = _wide(rng)
    g = (rng.standard_normal(x.shape) * np.exp(rng.uniform(-20, 20, x.shape))).astype(F32)
    g[:50] = TINY
    g[50:60] = -0.0
    for label, mod, name in _act_modules():
        parts = getattr(to, f"{name}_parts")
        y, gx, _ = _pipeline(mod, x, g)
        _same_bits(y, getattr(to, f"{name}_fwd")(x), f"{label} y")
        _same_bits(gx, getattr(to, f"{name}_bwd")(g, x), f"{label} gx")
        _same_bits(gx, (g * parts(x)[1]).astype(F32), f"{label} gx = g * dy")
    # control: stock torch's float32 functions give other bits somewhere on these
    # inputs (y or gx), so an op the guard let through unconverted would show
    import torch

    for label, mod, name in _act_modules():
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        yt = mod(xt)
        yt.backward(torch.from_numpy(g))
        y, gx, _ = _pipeline(mod, x, g)
        assert np.any(_bits(yt.detach().numpy()) != _bits(y)) or \
            np.any(_bits(xt.grad.numpy()) != _bits(gx)), f"{label}: stock torch's bits"


# ------------------------------------------------------------------ 21. sum, mean

def test_sum_mean_trees_by_hand():
    """sum over dims (1, 2) of a (2, 3, 2) tensor is the tree over the 6 entries in
    C order ((a0 + a1) + (a2 + a3)) + (a4 + a5), written out; it differs from a
    left-to-right sum on these values (a control); mean divides by f32(n);
    n = 0 gives +0 (sum) and NaN (mean); reduced dims are taken in increasing
    order whatever order they are given."""
    x = np.array([[[1e8, 1], [-1e8, 1], [3, 1e-8]]] * 2, F32)
    x[1] *= F32(-1)
    a = x.reshape(2, 6)
    want = ((a[:, 0] + a[:, 1]) + (a[:, 2] + a[:, 3])) + (a[:, 4] + a[:, 5])
    _same_bits(to.sum_fwd(x, (1, 2)), want, "tree")
    _same_bits(to.sum_fwd(x, (2, 1)), want, "dims given in another order")
    left = a[:, 0]
    for j in range(1, 6):
        left = left + a[:, j]
    assert np.any(_bits(left) != _bits(want)), "the control sums the same"
    _same_bits(to.mean_fwd(x, [1, 2], keepdim=True), (want / F32(6)).reshape(2, 1, 1), "mean")
    e = np.zeros((2, 0, 3), F32)
    assert _bits(to.sum_fwd(e, 1)).tolist() == [[0, 0, 0]] * 2
    assert np.isnan(to.mean_fwd(e, 1)).all()
    s = np.array(-0.0, F32)
    assert _bits(to.sum_fwd(s)).reshape(-1).tolist() == [0x80000000]  # its own sum


def _sum_cases(rng):
    """(label, x, dims, keepdim) over a wide-range (3, 5, 7) tensor and edge shapes."""
    x = (rng.standard_normal((3, 5, 7)) * np.exp(rng.uniform(-30, 30, (3, 5, 7)))).astype(F32)
    x[0, 0, :3] = -0.0
    x[1, :, 0] = -0.0                 # a whole reduced row of -0: its tree gives -0
    cases = [(f"dims={d} keep={k}", x, d, k)
             for d in [None, [], 0, 1, 2, -1, (0, 2), (2, 0), (1, 2), (0, 1, 2), [-2]]
             for k in (False, True)]
    cases += [("n=0", np.zeros((2, 0, 3), F32), 1, False), ("0-dim", np.array(3.5, F32), None,
                                                            False),
              ("one entry", np.array([-0.0], F32), 0, False),
              ("long", (rng.standard_normal((2, 1000)) * 1e4).astype(F32), 1, False)]
    return cases


@pytest.mark.parametrize("fn", ["sum", "mean"])
def test_sum_mean_match_pipeline(fn):
    """torch.sum / Tensor.mean / torch.mean over any dims (int, tuple, negative,
    none, keepdim; n = 0; a 0-dim tensor) converted by from_torch: the result
    and its gradient (g broadcast, or g / f32(n) broadcast) bit for bit equal
    to the twin's."""
    import torch

    rng = np.random.default_rng(202)
    for label, x, dims, keep in _sum_cases(rng):
        if dims is None and not keep:
            f = (lambda t: torch.sum(t)) if fn == "sum" else (lambda t: t.mean())
        else:
            f = ((lambda t, d=dims, k=keep: torch.sum(t, d, keepdim=k)) if fn == "sum" else
                 (lambda t, d=dims, k=keep: torch.mean(t, d, keepdim=k)))
        want = getattr(to, f"{fn}_fwd")(x, dims, keep)
        g = (rng.standard_normal(want.shape) * 1e3).astype(F32)
        if fn == "mean" and x.size == 0:
            continue                  # NaN forward; compared below without a backward
        y, gx, _ = _pipeline(_fn_module(f), x, g)
        _same_bits(y, want, f"{fn} {label} y")
        _same_bits(gx, getattr(to, f"{fn}_bwd")(g, x.shape, dims, keep), f"{fn} {label} gx")
    from pipeline import exact

    y = exact.xmean(torch.zeros((2, 0, 3)), 1).numpy()
    assert y.shape == (2, 3) and np.isnan(y).all()


def test_sum_mean_float64_match_pipeline():
    """An f64 tensor's sum and mean: the same tree with f64 adds and f64(n)."""
    import torch

    rng = np.random.default_rng(203)
    x = (rng.standard_normal((4, 6, 5)) * np.exp(rng.uniform(-300, 300, (4, 6, 5))))
    for dims in [1, (0, 2), None]:
        for fn in ("sum", "mean"):
            f = ((lambda t, d=dims: torch.sum(t, d) if d is not None else torch.sum(t))
                 if fn == "sum" else
                 (lambda t, d=dims: torch.mean(t, d) if d is not None else torch.mean(t)))
            want = getattr(to, f"{fn}_fwd")(x, dims)
            assert want.dtype == F64
            g = rng.standard_normal(want.shape)
            y, gx, _ = _pipeline(_fn_module(f), x, g)
            _same_bits(y, want, f"f64 {fn} {dims}")
            _same_bits(gx, getattr(to, f"{fn}_bwd")(g, x.shape, dims), f"f64 {fn} {dims} gx")


def test_integer_sums_and_refusals_match_spec():
    """Section 21's other rules through the guard: an integer tensor's sum is
    integer arithmetic (wrapping as int64 does, as the twin's); a dtype other
    than the input's is refused (sum, mean), as is a softmax without dim and a
    log_softmax of an f64 tensor; an f64 tensor without a gradient sums by the
    f64 tree (the twin's bits)."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(215)
    xi = rng.integers(-2**62, 2**62, (3, 5, 4))
    xi[0, 0, :2] = 2**62                         # partial sums that wrap
    xd = rng.standard_normal((3, 5, 4)) * np.exp(rng.uniform(-200, 200, (3, 5, 4)))

    class Sums(torch.nn.Module):
        def forward(self, a, b):
            return torch.sum(a, (0, 2)), a.sum(), torch.sum(b, 1), b.mean((0, 2), keepdim=True)

    m = exact.from_torch(Sums())
    with exact.Guard():
        out = m(torch.from_numpy(xi), torch.from_numpy(xd))
    with np.errstate(over="ignore"):
        want = [to.sum_fwd(xi, (0, 2)), to.sum_fwd(xi), to.sum_fwd(xd, 1),
                to.mean_fwd(xd, (0, 2), True)]
    for o, w, what in zip(out, want, ["int (0, 2)", "int all", "f64 1", "f64 mean"]):
        _same_bits(o.numpy(), w, what)
    z = torch.zeros(2, 3)
    refused = {"sum dtype": lambda: exact.xsum(z, 1, dtype=torch.float64),
               "mean dtype": lambda: exact.xmean(z, 1, dtype=torch.float64),
               "softmax no dim": lambda: exact.softmax(z),
               "log_softmax f64": lambda: exact.log_softmax(z.double(), 1),
               "softmax f64": lambda: exact.softmax(z.double(), 1),
               "softmax dtype f64": lambda: exact.softmax(z, 1, dtype=torch.float64)}
    for what, f in refused.items():
        with pytest.raises((TypeError, ValueError)):
            f()
            pytest.fail(f"{what} was not refused")
    xs = torch.from_numpy(rng.standard_normal((4, 9)).astype(F32))  # dtype= its own
    for f in (exact.softmax, exact.log_softmax):
        _same_bits(f(xs, 1, dtype=torch.float32).numpy(), f(xs, 1).numpy(), f.__name__)
    _same_bits(exact.xsum(xs, 1, dtype=torch.float32).numpy(), to.sum_fwd(xs.numpy(), 1), "sum")


# ------------------------------------------------------------------ 21. softmax, log-softmax

def _softmax_input(rng):
    """(3, 6, 7): wide magnitudes per row along every dim, ties, a row of one
    huge entry, rows whose e underflow to subnormal and to 0, differences that
    overflow f32 (3e38 - -3e38), -0 entries."""
    x = (rng.standard_normal((3, 6, 7)) * np.exp(rng.uniform(-4, 4, (3, 6, 1)))).astype(F32)
    x[0, 0] = 5.0                          # ties
    x[0, 1] = np.arange(7, dtype=F32) * F32(-15.0)   # e down to exp(-90): subnormal / 0
    x[0, 2] = np.arange(7, dtype=F32) * F32(-16.5)
    x[0, 3, 2] = F32(1e30)
    x[0, 4] = [3e38, -3e38, 0, 1, -1, 2e38, -0.0]
    x[1, 0] = -1e30
    x[1, 1] = np.arange(7, dtype=F32) * F32(1e-40)
    x[2, 5] = -0.0
    x[2, :, 3] = F32(-87.5)
    return x


@pytest.mark.parametrize("fn", ["softmax", "log_softmax"])
def test_softmax_match_pipeline(fn):
    """nn.Softmax / nn.LogSoftmax / F.softmax / torch.log_softmax / Tensor.softmax
    along every dim (and negative ones) of a (3, 6, 7) tensor with ties, huge,
    tiny, -0 entries, underflowing and subnormal probabilities: y and gx bit
    for bit equal to the twin's; a 0-dim x is a row of one entry; an empty x
    gives an empty result."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(204)
    x = _softmax_input(rng)
    g = (rng.standard_normal(x.shape) * 10).astype(F32)
    g[0, 0] = 0.0
    fwd, bwd = getattr(to, f"{fn}_fwd"), getattr(to, f"{fn}_bwd")
    Mod = torch.nn.Softmax if fn == "softmax" else torch.nn.LogSoftmax
    fun = F.softmax if fn == "softmax" else torch.log_softmax
    for dim in (0, 1, 2, -1, -3):
        for label, mod in [("module", Mod(dim=dim)),
                           ("function", _fn_module(lambda t, d=dim: fun(t, dim=d))),
                           ("Tensor", _fn_module(lambda t, d=dim: getattr(t, fn)(d)))]:
            want, cache = fwd(x, dim)
            y, gx, _ = _pipeline(mod, x, g)
            _same_bits(y, want, f"{fn} {label} dim={dim} y")
            _same_bits(gx, bwd(g, cache), f"{fn} {label} dim={dim} gx")
    for shape, dim in [((), 0), ((2, 0), 1), ((0, 3), 1)]:
        xs = rng.standard_normal(shape).astype(F32)
        gs = rng.standard_normal(shape).astype(F32)
        want, cache = fwd(xs, dim)
        y, gx, _ = _pipeline(_fn_module(lambda t, d=dim: fun(t, dim=d)), xs, gs)
        _same_bits(y, want, f"{fn} shape {shape} y")
        _same_bits(gx, bwd(gs, cache), f"{fn} shape {shape} gx")


def test_softmax_close_to_float64_and_refuses_other_dtypes():
    """The twin's softmax and log_softmax (and gradients) are within f32
    rounding of float64 torch; the pipeline refuses a dtype other than f32."""
    import torch

    from pipeline import exact

    rng = np.random.default_rng(205)
    x = (rng.standard_normal((5, 9)) * 3).astype(F32)
    g = rng.standard_normal((5, 9)).astype(F32)
    for fn, tf in [("softmax", torch.softmax), ("log_softmax", torch.log_softmax)]:
        y, cache = getattr(to, f"{fn}_fwd")(x, 1)
        gx = getattr(to, f"{fn}_bwd")(g, cache)
        t = torch.tensor(x.astype(F64), requires_grad=True)
        r = tf(t, 1)
        r.backward(torch.tensor(g.astype(F64)))
        assert_close(y, r.detach().numpy(), 1e-6, f"{fn} y")
        assert_close(gx, t.grad.numpy(), 1e-6, f"{fn} gx")
    for f in (exact.softmax, exact.log_softmax):
        with pytest.raises(Exception):
            f(torch.zeros(2, 3), 1, dtype=torch.float64)


# ------------------------------------------------------------------ 22. RMSNorm

def test_rmsnorm_close_to_float64_and_by_hand():
    """RMSNorm (weight, two normalised dims) within f32 rounding of float64
    torch (forward, gx, gw); one row by hand (tree of squares, sqrt, quotient)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(206)
    x = rng.standard_normal((3, 4, 2, 5)).astype(F32)
    w = rng.standard_normal((2, 5)).astype(F32)
    g = rng.standard_normal(x.shape).astype(F32)
    y, cache = to.rmsnorm_fwd(x, (2, 5), w, 1e-5)
    gx, gw = to.rmsnorm_bwd(g, cache, w)
    tx, tw_ = (torch.tensor(a.astype(F64), requires_grad=True) for a in (x, w))
    r = F.rms_norm(tx, (2, 5), tw_, 1e-5)
    r.backward(torch.tensor(g.astype(F64)))
    assert_close(y, r.detach().numpy(), 2e-6, "y")
    assert_close(gx, tx.grad.numpy(), 2e-6, "gx")
    assert_close(gw, tw_.grad.numpy(), 2e-6, "gw")
    row = np.array([[1e4, 1, -1e4, 1]], F32)
    sq = row * row
    ms = ((sq[0, 0] + sq[0, 1]) + (sq[0, 2] + sq[0, 3])) / F32(4)
    _same_bits(to.rmsnorm_fwd(row, (4,))[0], row / np.sqrt(ms + F32(2.0**-23)), "by hand")


def _rms_cases(rng):
    import torch

    nn = torch.nn
    x = (rng.standard_normal((2, 3, 4, 6)) * np.exp(rng.uniform(-20, 20, (2, 3, 1, 1))))
    x = x.astype(F32)
    x[0, 0, 0] = 0.0                               # ms = 0: s = sqrt32(eps)
    x[0, 1, 0] = TINY                              # squares underflow
    x[1, 2, 0] = rng.standard_normal(6) * 1e-20    # squares near the subnormal range
    x[1, 2, 1] = rng.standard_normal(6) * 1e18     # squares near f32's largest
    w6 = rng.standard_normal(6).astype(F32)
    w46 = rng.standard_normal((4, 6)).astype(F32)
    return x, [("RMSNorm(6)", nn.RMSNorm(6), (6,), {"weight": w6}, None),
               ("RMSNorm(6, eps=1e-5)", nn.RMSNorm(6, eps=1e-5), (6,), {"weight": w6}, 1e-5),
               ("RMSNorm((4, 6))", nn.RMSNorm((4, 6), eps=0.1), (4, 6), {"weight": w46}, 0.1),
               ("RMSNorm no weight", nn.RMSNorm(6, elementwise_affine=False), (6,), {}, None),
               ("F.rms_norm", None, (4, 6), {}, 1e-6)]


def test_rmsnorm_matches_pipeline():
    """nn.RMSNorm (eps none = 2^-23 or given; one or two normalised dims; with
    and without a weight) and F.rms_norm, converted by from_torch: y, gx and
    gw bit for bit equal to the twin's, on rows of wide-ranging scale, a zero
    row and a subnormal row. Control: the twin with eps 1e-5 in place of none
    (2^-23) gives other bits, so the comparison can fail."""
    import torch.nn.functional as F

    rng = np.random.default_rng(207)
    x, cases = _rms_cases(rng)
    g = (rng.standard_normal(x.shape) * 10).astype(F32)
    for label, mod, ns, params, eps in cases:
        if mod is None:
            mod = _fn_module(lambda t, e=eps: F.rms_norm(t, ns, None, e))
        y, gx, grads = _pipeline(mod, x, g, params)
        w = params.get("weight")
        want, cache = to.rmsnorm_fwd(x, ns, w, eps)
        wgx, wgw = to.rmsnorm_bwd(g, cache, w)
        _same_bits(y, want, f"{label} y")
        _same_bits(gx, wgx, f"{label} gx")
        if w is not None:
            _same_bits(grads["weight"], wgw, f"{label} gw")
        else:
            assert grads == {}
    y, _, _ = _pipeline(_torch_rms(6), x, g)
    assert np.any(_bits(y) != _bits(to.rmsnorm_fwd(x, (6,), None, 1e-5)[0])), "control"


def _torch_rms(d):
    import torch

    return torch.nn.RMSNorm(d, elementwise_affine=False)


# ------------------------------------------------------------------ 23. pooling

def _pool_x(rng, shape=(2, 3, 7, 8), ties=False):
    if ties:      # few distinct values: ties inside windows, and +0 / -0 ties
        x = rng.choice(np.array([-2, -1, 0, 0, 0, 1], F32), shape)
        x[x == 0] = np.where(rng.random(np.count_nonzero(x == 0)) < 0.5, F32(0.0), F32(-0.0))
        return x
    return (rng.standard_normal(shape) * np.exp(rng.uniform(-20, 20, shape[:2] + (1, 1)))
            ).astype(F32)


MAX_ARGS = [dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1),
            dict(kernel_size=(3, 2), stride=(1, 2), padding=(1, 0)),
            dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=(2, 4), stride=(3, 1),
                                                           padding=(1, 2))]
AVG_ARGS = MAX_ARGS[:3] + [
    dict(kernel_size=3, stride=1, padding=1, count_include_pad=False),
    dict(kernel_size=(2, 4), stride=(3, 1), padding=(1, 2), count_include_pad=False),
    dict(kernel_size=3, stride=2, padding=1, divisor_override=5),
    dict(kernel_size=2, divisor_override=3, count_include_pad=False)]


def _twin_args(a):
    a = dict(a)
    k = a.pop("kernel_size")
    return (k, a.pop("stride", None), a.pop("padding", 0)), a


def test_pool_by_hand():
    """Max pooling's choice among ties is the first entry in (i, j) order, and
    its gradient goes there only; -0 and +0 tie (the first kept, its sign); the
    -inf padding never wins; AvgPool2d's tree over a 2x2 window is (x00 + x01)
    + (x10 + x11), count_include_pad=False divides by the entries inside x;
    the fold adds overlapping windows' shares in (i, j) order."""
    x = np.array([[[[1, 3, 3], [3, 2, 0], [-0.0, 0, 1]]]], F32)
    y, c = to.max_pool2d_fwd(x, 2, 1)
    assert y.tolist() == [[[[3, 3], [3, 2]]]]
    gx = to.max_pool2d_bwd(np.array([[[[1, 2], [4, 8]]]], F32), c)
    assert gx.tolist() == [[[[0, 3, 0], [4, 8, 0], [0, 0, 0]]]]
    z = np.array([[[[-0.0, 0.0], [0.0, -0.0]]]], F32)
    assert _bits(to.max_pool2d_fwd(z, 2)[0]).tolist() == [[[[0x80000000]]]]
    n = -np.ones((1, 1, 2, 2), F32)
    assert to.max_pool2d_fwd(n, 2, 1, 1)[0].tolist() == [[[[-1] * 3] * 3]]
    v = np.array([[[[1e8, 1], [-1e8, 1]]]], F32)
    # (1e8 + 1) + (-1e8 + 1) = 0 in f32; left to right ((1e8 + 1) - 1e8) + 1 = 1
    assert to.avg_pool2d_fwd(v, 2)[0].tolist() == [[[[0.0]]]]
    a, _ = to.avg_pool2d_fwd(np.ones((1, 1, 3, 3), F32), 3, 1, 1, count_include_pad=False)
    assert (a == 1).all()
    a, _ = to.avg_pool2d_fwd(np.ones((1, 1, 3, 3), F32), 3, 1, 1)
    assert a[0, 0].tolist() == [[F32(4) / F32(9), F32(6) / F32(9), F32(4) / F32(9)],
                                [F32(6) / F32(9), 1, F32(6) / F32(9)],
                                [F32(4) / F32(9), F32(6) / F32(9), F32(4) / F32(9)]]


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_close_to_float64(kind):
    """MaxPool2d / AvgPool2d (every argument set of the pipeline comparison) in
    the twin: forward and gx within f32 rounding of float64 torch."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(208)
    x = _pool_x(rng, ties=False)
    for args in (MAX_ARGS if kind == "max" else AVG_ARGS):
        (k, s, p), rest = _twin_args(args)
        fwd = to.max_pool2d_fwd if kind == "max" else to.avg_pool2d_fwd
        bwd = to.max_pool2d_bwd if kind == "max" else to.avg_pool2d_bwd
        y, cache = fwd(x, k, s, p, **rest)
        g = rng.standard_normal(y.shape).astype(F32)
        t = torch.tensor(x.astype(F64), requires_grad=True)
        r = (F.max_pool2d if kind == "max" else F.avg_pool2d)(t, **args)
        r.backward(torch.tensor(g.astype(F64)))
        assert_close(y, r.detach().numpy(), 1e-6, f"{args} y")
        assert_close(bwd(g, cache), t.grad.numpy(), 1e-6, f"{args} gx")


@pytest.mark.parametrize("ties", [False, True], ids=["random", "ties"])
def test_max_pool_matches_pipeline(ties):
    """nn.MaxPool2d / F.max_pool2d / torch.max_pool2d (kernels 2, 3, (3, 2),
    (2, 4); strides equal to, below and above the kernel; padding): y and gx bit
    for bit equal to the twin's, on wide-range values and on small integers
    with many ties, +0 / -0 ties included (overlapping windows add their
    shares by the fold)."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(209 + ties)
    x = _pool_x(rng, ties=ties)
    for args in MAX_ARGS:
        (k, s, p), _ = _twin_args(args)
        want, cache = to.max_pool2d_fwd(x, k, s, p)
        if ties:     # the case is real: windows whose maximum 0 is held by +0 and -0
            win = to._windows(x, *to.pool_args(k, s, p), F32(-np.inf))[0]
            zero = (win == 0) & (want[..., None] == 0)
            both = (zero & np.signbit(win)).any(-1) & (zero & ~np.signbit(win)).any(-1)
            assert both.sum() >= 3 and np.signbit(want[both]).any() and \
                (~np.signbit(want[both])).any(), args
        g = (rng.standard_normal(want.shape) * 100).astype(F32)
        wgx = to.max_pool2d_bwd(g, cache)
        for label, mod in [("nn", torch.nn.MaxPool2d(**args)),
                           ("F", _fn_module(lambda t, a=args: F.max_pool2d(t, **a))),
                           ("torch", _fn_module(lambda t, a=args: torch.max_pool2d(t, **a)))]:
            y, gx, _ = _pipeline(mod, x, g)
            _same_bits(y, want, f"max {label} {args} y")
            _same_bits(gx, wgx, f"max {label} {args} gx")


@pytest.mark.parametrize("ties", [False, True], ids=["random", "small-integers"])
def test_avg_pool_matches_pipeline(ties):
    """nn.AvgPool2d / F.avg_pool2d with padding, count_include_pad both ways and
    divisor_override: y and gx bit for bit equal to the twin's."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(211 + ties)
    x = _pool_x(rng, ties=ties)
    for args in AVG_ARGS:
        (k, s, p), rest = _twin_args(args)
        want, cache = to.avg_pool2d_fwd(x, k, s, p, **rest)
        g = (rng.standard_normal(want.shape) * 100).astype(F32)
        wgx = to.avg_pool2d_bwd(g, cache)
        for label, mod in [("nn", torch.nn.AvgPool2d(**args)),
                           ("F", _fn_module(lambda t, a=args: F.avg_pool2d(t, **a)))]:
            y, gx, _ = _pipeline(mod, x, g)
            _same_bits(y, want, f"avg {label} {args} y")
            _same_bits(gx, wgx, f"avg {label} {args} gx")


ADAPTIVE = [3, (2, 5), (None, 3), (7, 8), (10, 11), (1, 1), (4, None)]


def test_adaptive_avg_pool_by_hand_and_float64():
    """Windows [floor(a H / Ho), ceil((a + 1) H / Ho)): for H = 7, Ho = 3 rows
    [0, 3), [2, 5), [4, 7) (overlapping); outputs within rounding of float64
    torch, gradients too."""
    import torch
    import torch.nn.functional as F

    assert to._adaptive_ranges(7, 3) == [(0, 3), (2, 5), (4, 7)]
    assert to._adaptive_ranges(4, 6) == [(0, 1), (0, 2), (1, 2), (2, 3), (2, 4), (3, 4)]
    rng = np.random.default_rng(213)
    x = _pool_x(rng)
    for o in ADAPTIVE:
        y, cache = to.adaptive_avg_pool2d_fwd(x, o)
        g = rng.standard_normal(y.shape).astype(F32)
        t = torch.tensor(x.astype(F64), requires_grad=True)
        r = F.adaptive_avg_pool2d(t, o)
        r.backward(torch.tensor(g.astype(F64)))
        assert_close(y, r.detach().numpy(), 1e-6, f"{o} y")
        assert_close(to.adaptive_avg_pool2d_bwd(g, cache), t.grad.numpy(), 1e-6, f"{o} gx")


def test_adaptive_avg_pool_matches_pipeline():
    """nn.AdaptiveAvgPool2d / F.adaptive_avg_pool2d with output sizes that divide
    the input, that do not (overlapping windows: the order of the backward's
    adds decides the bits), larger than the input, and with a None entry: y
    and gx bit for bit equal to the twin's. Control: the backward's adds in
    reverse output order differ somewhere on these inputs."""
    import torch
    import torch.nn.functional as F

    rng = np.random.default_rng(214)
    x = _pool_x(rng)
    differs = False
    for o in ADAPTIVE:
        want, cache = to.adaptive_avg_pool2d_fwd(x, o)
        g = (rng.standard_normal(want.shape) * np.exp(rng.uniform(-12, 12, want.shape))
             ).astype(F32)
        wgx = to.adaptive_avg_pool2d_bwd(g, cache)
        for label, mod in [("nn", torch.nn.AdaptiveAvgPool2d(o)),
                           ("F", _fn_module(lambda t, o=o: F.adaptive_avg_pool2d(t, o)))]:
            y, gx, _ = _pipeline(mod, x, g)
            _same_bits(y, want, f"adaptive {label} {o} y")
            _same_bits(gx, wgx, f"adaptive {label} {o} gx")
        rs, cs, shape = cache
        rev = to.adaptive_avg_pool2d_bwd(g[:, :, ::-1, ::-1],
                                         (rs[::-1], cs[::-1], shape))
        differs |= bool(np.any(_bits(rev) != _bits(wgx)))
    assert differs, "the reversed order gave the same bits on every case"


# ------------------------------------------------------------------ larger shapes, 2 threads

def _check(label, mod, x, fwd, bwd, rng):
    want, cache = fwd(x)
    g = rng.standard_normal(want.shape).astype(F32)
    y, gx, _ = _pipeline(mod, x, g)
    _same_bits(y, want, f"{label} y")
    _same_bits(gx, bwd(g, cache), f"{label} gx")


@pytest.mark.parametrize("threads", [1, 2])
def test_larger_shapes_match_pipeline(threads):
    """Each op on tensors large enough for the pipeline's vectorised and
    threaded paths (rows of 2000 entries, trees over 64000, 40x44 planes of 16
    channels), with torch at 1 and 2 threads: bit for bit the twin's."""
    import torch

    rng = np.random.default_rng(216)
    x = (rng.standard_normal((32, 2000)) * np.exp(rng.uniform(-5, 5, (32, 1)))).astype(F32)
    xi = rng.standard_normal((4, 16, 40, 44)).astype(F32)
    nn = torch.nn
    cases = [(n, M(), x, lambda v, n=n: (getattr(to, f"{n}_fwd")(v), v),
              lambda g, v, n=n: getattr(to, f"{n}_bwd")(g, v))
             for n, M in [("silu", nn.SiLU), ("sigmoid", nn.Sigmoid), ("tanh", nn.Tanh)]]
    cases += [("softmax -1", nn.Softmax(-1), x, lambda v: to.softmax_fwd(v, -1), to.softmax_bwd),
              ("log_softmax 0", nn.LogSoftmax(0), x, lambda v: to.log_softmax_fwd(v, 0),
               to.log_softmax_bwd),
              ("sum", _fn_module(lambda t: t.sum()), x, lambda v: (to.sum_fwd(v), v.shape),
               to.sum_bwd),
              ("mean 1", _fn_module(lambda t: t.mean(1)), x,
               lambda v: (to.mean_fwd(v, 1), v.shape), lambda g, s: to.mean_bwd(g, s, 1)),
              ("rms (2, 1000)", nn.RMSNorm((2, 1000), elementwise_affine=False),
               x.reshape(32, 2, 1000), lambda v: to.rmsnorm_fwd(v, (2, 1000)),
               lambda g, c: to.rmsnorm_bwd(g, c)[0]),
              ("max pool", nn.MaxPool2d(3, 2, 1), xi, lambda v: to.max_pool2d_fwd(v, 3, 2, 1),
               to.max_pool2d_bwd),
              ("avg pool", nn.AvgPool2d(3, 2, 1, count_include_pad=False), xi,
               lambda v: to.avg_pool2d_fwd(v, 3, 2, 1, False), to.avg_pool2d_bwd),
              ("adaptive", nn.AdaptiveAvgPool2d((7, 9)), xi,
               lambda v: to.adaptive_avg_pool2d_fwd(v, (7, 9)), to.adaptive_avg_pool2d_bwd)]
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for label, mod, xx, fwd, bwd in cases:
            _check(label, mod, xx, fwd, bwd, rng)
    finally:
        torch.set_num_threads(old)


# ------------------------------------------------------------------ a training run

def _last_tie_max_pool(x, kernel, stride=None, padding=0):
    """A misreading for the control: the last entry equal to the maximum."""
    y, (a, shape, K, S, P) = _REAL_MAX_POOL(x, kernel, stride, padding)
    win, _, _ = to._windows(np.asarray(x, F32), K, S, P, F32(-np.inf))
    rev = win[..., ::-1] == y[..., None]
    return y, (win.shape[-1] - 1 - np.argmax(rev, axis=-1), shape, K, S, P)


_REAL_MAX_POOL = to.max_pool2d_fwd
OPSNET_RUN = ["mode=exact", "train.max_steps=6", "optim.lr=0.02"]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("native", ["1", "0"], ids=["native", "torch-path"])
def test_opsnet_project_hash_matches_pipeline(native, tmp_path, suite_env, monkeypatch):
    """A project (``pipeline new``, then its model.py replaced by
    twin_opsnet.MODEL_PY: Conv2d, SiLU, softmax over channels, MaxPool2d with
    padding and overlapping windows, AvgPool2d without counting the padding,
    AdaptiveAvgPool2d with overlapping windows, a mean over (2, 3) broadcast
    back, RMSNorm, Tanh times Sigmoid, a sum over dim 1 times a Python number,
    LogSoftmax) trained in exact mode for 6 steps on 8 shards by ``python -m
    pipeline train`` (its native kernels, or PIPELINE_EXACT_NATIVE=0) and by
    the twin: equal weight hashes and test accuracy.
    Control: the twin sending max pooling's gradient to the last of tied
    entries (the digits' blank margins tie everywhere) gives another hash."""
    import re

    from ..twin import twin_opsnet as tn

    proj = tmp_path / "proj"
    p = run_pipeline(["new", str(proj)], suite_env)
    assert p.returncode == 0, p.stderr
    (proj / "model.py").write_text(tn.MODEL_PY, encoding="utf-8")
    cfg_text = (proj / "config.toml").read_text(encoding="utf-8")
    cfg_text = cfg_text.replace('"model:convnet"', '"model:opsnet"')
    cfg_text, n = re.subn(r"\[model\.args\]\n(?:.*\n)*?\n", "[model.args]\nchannels = 4\n\n",
                          cfg_text)
    assert n == 1 and '"model:opsnet"' in cfg_text
    (proj / "config.toml").write_text(cfg_text, encoding="utf-8")
    cfg = tw.load_config(str(proj / "config.toml"), OPSNET_RUN)
    data = proj / "data" / "digits.csv.gz"
    params, metrics = tn.train(cfg, str(data), tw.file_sha256(str(data)))
    want = tw.weights_sha256(params)
    env = {**suite_env, "PIPELINE_EXACT_NATIVE": native}
    p = run_pipeline(["train", str(proj / "config.toml"), *OPSNET_RUN, "--runs-dir",
                      str(tmp_path / "runs"), "--json", "--quiet"], env, timeout=600)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    run = json.loads(p.stdout)
    assert run["weights_sha256"] == want, (run["weights_sha256"], want)
    assert run["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert metrics["test_accuracy"] > 0.3          # it learns: the gradients are real
    if native == "0":
        assert run["threads"]["exact_kernels"].startswith("off"), run["threads"]
    monkeypatch.setattr(tn.P, "max_pool2d_fwd", _last_tie_max_pool)
    other, _ = tn.train(cfg, str(data), tw.file_sha256(str(data)))
    assert tw.weights_sha256(other) != want, "the control changed nothing"
