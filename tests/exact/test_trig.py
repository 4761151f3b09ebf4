"""Exact sin and cos and the rotary tables (pipeline/exact/trig.py;
docs/exact-spec.md section 28): forward and backward against float64 (no
worse than stock fp32), against the spec read with NumPy bit for bit, the
spec's check values, the range refusal, the guard's routes, tables that do
not depend on their length, and rotary application (rotate-half and
interleaved) under the guard against float64."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.exact import Guard, cos, rotary_inv_freq, rotary_tables, sin
from pipeline.exact.trig import TrigRangeError, log64

from ..twin import twin_layers as tl

F64, F32 = np.float64, np.float32
# Section 28's constants, transcribed from the page (float.hex).
INV_PIO2 = float.fromhex("0x1.45f306dc9c883p-1")
PIO2_1 = float.fromhex("0x1.921fb54400000p+0")
PIO2_2 = float.fromhex("0x1.0b4611a600000p-34")
PIO2_2T = float.fromhex("0x1.3198a2e037073p-69")
COS_C = [(-1.0) ** n * (1.0 / math.factorial(2 * n)) for n in range(10)]
SIN_C = [(-1.0) ** n * (1.0 / math.factorial(2 * n + 1)) for n in range(9)]


def np_sincos(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Section 28 in NumPy f64, one rounding per operation."""
    k = np.rint(d * F64(INV_PIO2))  # rint: round half to even
    r = ((d - k * F64(PIO2_1)) - k * F64(PIO2_2)) - k * F64(PIO2_2T)
    r = np.where(k == 0, d, r)
    z = r * r
    ws = np.full_like(z, SIN_C[8])
    for n in range(7, -1, -1):
        ws = ws * z + F64(SIN_C[n])
    wc = np.full_like(z, COS_C[9])
    for n in range(8, -1, -1):
        wc = wc * z + F64(COS_C[n])
    s, c = r * ws, wc
    q = k.astype(np.int64) & 3
    sin_ = np.select([q == 0, q == 1, q == 2], [s, c, -s], -c)
    cos_ = np.select([q == 0, q == 1, q == 2], [c, -s, -c], s)
    return sin_, cos_


def _inputs(n: int = 3000, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    x = np.concatenate([g.standard_normal(n) * s for s in (1e-3, 1.0, 10.0, 1e3, 1e5)])
    edges = [0.0, -0.0, 1e-30, -1e-38, 1e-8, math.pi / 4, -math.pi / 4, math.pi / 2,
             math.pi, 3 * math.pi / 2, 2.0**20, -(2.0**20), 1e6, 355.0, 103993.0]
    return np.concatenate([x, edges]).astype(F32)


def _ulps(got: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return np.abs(got.astype(F64) - ref) / np.spacing(np.abs(ref).astype(F32)).astype(F64)


@pytest.mark.parametrize("which", ["sin", "cos"])
def test_forward_against_float64_and_stock(which: str) -> None:
    """Within 0.5 ulp of f64's sin/cos on these inputs (stock fp32's
    error is larger: about 0.6), and the signed zero of sin(-0)."""
    x = _inputs()
    f = sin if which == "sin" else cos
    got = f(torch.from_numpy(x)).numpy()
    ref = getattr(np, which)(x.astype(F64))
    stock = getattr(torch, which)(torch.from_numpy(x)).numpy()
    assert _ulps(got, ref).max() <= 0.5 + 1e-9
    assert _ulps(got, ref).max() <= _ulps(stock, ref).max()
    if which == "sin":
        assert np.signbit(sin(torch.tensor([-0.0])).numpy()[0])


@pytest.mark.parametrize("which", ["sin", "cos"])
def test_forward_and_backward_against_the_spec_in_numpy(which: str) -> None:
    """y = RN32 of section 28's f64 value and gx = g * RN32(derivative), bit
    for bit with the NumPy transcription (both signs of the quadrants)."""
    x = _inputs(seed=1)
    s, c = np_sincos(x.astype(F64))
    want_y, want_dy = (s, c) if which == "sin" else (c, -s)
    t = torch.from_numpy(x).requires_grad_(True)
    y = (sin if which == "sin" else cos)(t)
    g = torch.from_numpy(np.random.default_rng(2).standard_normal(x.size).astype(F32))
    (gx,) = torch.autograd.grad(y, t, g)
    assert np.array_equal(y.detach().numpy().view(np.uint32),
                          want_y.astype(F32).view(np.uint32))
    assert np.array_equal(gx.numpy(), g.numpy() * want_dy.astype(F32))


CHECKS = {1.0: ("0x1.aed548p-1", "0x1.14a28p-1"), 100.0: ("-0x1.03425cp-1", "0x1.b981dcp-1"),
          -3.0: ("-0x1.210386p-3", "-0x1.fae04cp-1"),
          1048576.0: ("0x1.526cccp-2", "0x1.e33adap-1")}


def _hex32(v: float) -> str:
    """float.hex of an f32 value without the trailing zeros of the f64 form."""
    sign, rest = ("-", v.hex()[1:]) if v < 0 else ("", v.hex())
    mant, exp = rest.split("p")
    return f"{sign}{mant.rstrip('0').rstrip('.')}p{exp}"


def test_check_values() -> None:
    """The spec's check values (section 28, f32 results as float.hex)."""
    for v, (want_s, want_c) in CHECKS.items():
        x = torch.tensor([v])
        assert (_hex32(sin(x).item()), _hex32(cos(x).item())) == (want_s, want_c), v


def test_range_is_refused_beyond_2_20() -> None:
    """|x| > 2^20 and infinities are outside section 28: a clear error, not
    a guess; 2^20 itself is inside; NaN stays NaN."""
    assert torch.isfinite(sin(torch.tensor([2.0**20, -(2.0**20)]))).all()
    for bad in (2.0**20 * 1.0000001, float("inf"), -3e38):
        with pytest.raises(TrigRangeError, match="2\\^20"):
            cos(torch.tensor([1.0, bad]))
    assert torch.isnan(sin(torch.tensor([float("nan")]))).all()


def test_guard_routes_torch_sin_and_cos() -> None:
    """torch.sin/cos and Tensor.sin/cos under the guard are the exact ones,
    forward and backward; outside it torch's own may differ."""
    x = torch.from_numpy(_inputs(seed=3)).requires_grad_(True)
    with Guard():
        y = torch.sin(x) * 2.0 + x.cos()
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    s, c = np_sincos(x.detach().numpy().astype(F64))
    want = s.astype(F32) * F32(2.0) + c.astype(F32)
    assert np.array_equal(y.detach().numpy(), want)
    want_g = c.astype(F32) * F32(2.0) + (-s).astype(F32)
    assert np.array_equal(gx.numpy(), want_g)


def test_inv_freq_and_tables_against_the_spec() -> None:
    """inv_freq = RN32(exp64(-((2i)/dim) * log64(base))) with section 7's exp64
    (the twin's) and log; angles exact in f64; tables RN32 of sincos64; the
    inverse frequencies within an f32 rounding of base^(-2i/dim)."""
    dim, T, base = 16, 40, 10000.0
    lb = log64(base)
    assert abs(lb - math.log(base)) <= 2 * math.ulp(math.log(base))
    e = np.array([-((2.0 * i) / dim) * lb for i in range(dim // 2)], dtype=F64)
    inv = tl.exp64(e).astype(F32)
    assert np.array_equal(rotary_inv_freq(dim, base).numpy(), inv)
    exact = np.array([base ** (-(2.0 * i) / dim) for i in range(dim // 2)])
    assert (np.abs(inv - exact) / exact).max() < 2.0**-24 * 1.01
    ang = np.arange(T, dtype=F64)[:, None] * inv.astype(F64)[None, :]
    s, c = np_sincos(ang)
    cos_t, sin_t = rotary_tables(dim, T, base)
    assert np.array_equal(cos_t.numpy(), np.concatenate([c, c], 1).astype(F32))
    assert np.array_equal(sin_t.numpy(), np.concatenate([s, s], 1).astype(F32))
    ci, si = rotary_tables(dim, T, base, layout="interleaved")
    assert np.array_equal(ci.numpy(), np.repeat(c, 2, 1).astype(F32))
    assert np.array_equal(si.numpy(), np.repeat(s, 2, 1).astype(F32))


def test_tables_do_not_depend_on_their_length() -> None:
    """A table for T positions is the first T rows of one built for 4T + 3
    (control: another base changes the table)."""
    a = rotary_tables(32, 50)
    b = rotary_tables(32, 203)
    assert all(torch.equal(x, y[:50]) for x, y in zip(a, b))
    assert not torch.equal(a[0], rotary_tables(32, 50, base=500000.0)[0])


def test_tables_refuse_bad_arguments() -> None:
    """An odd dim, a length beyond 2^20, a base <= 1 or an unknown layout."""
    for args, kw in (((15, 8), {}), ((16, 2**20 + 1), {}), ((16, 8, 1.0), {}),
                     ((16, 8), {"layout": "complex"})):
        with pytest.raises(ValueError):
            rotary_tables(*args, **kw)


def _rope64(x: np.ndarray, c: np.ndarray, s: np.ndarray, layout: str) -> np.ndarray:
    if layout == "half":
        h = x.shape[-1] // 2
        rot = np.concatenate([-x[..., h:], x[..., :h]], -1)
    else:
        rot = np.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * c + rot * s


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_rotary_application_under_the_guard(layout: str) -> None:
    """x * cos + rotate(x) * sin, written with stock ops, runs under the guard
    (mul/add/neg/cat/chunk/slicing/stack routed), its gradient is exact, and
    it is within a few f32 roundings of float64's rotation; the rotation
    keeps norms."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 10, 8, generator=g).requires_grad_(True)
    c, s = rotary_tables(8, 10, layout=layout)

    def rotate(v: torch.Tensor) -> torch.Tensor:
        if layout == "half":
            a, b = v.chunk(2, dim=-1)
            return torch.cat((-b, a), dim=-1)
        return torch.stack((-v[..., 1::2], v[..., ::2]), dim=-1).flatten(-2)

    with Guard():
        y = x * c + rotate(x) * s
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ref = _rope64(x.detach().double().numpy(), c.double().numpy(), s.double().numpy(), layout)
    assert np.abs(y.detach().numpy() - ref).max() < 4e-6 * np.abs(ref).max()
    n_in = np.linalg.norm(x.detach().double().numpy(), axis=-1)
    assert np.allclose(np.linalg.norm(ref, axis=-1), n_in, rtol=1e-6)
    assert torch.isfinite(gx).all() and gx.shape == x.shape
