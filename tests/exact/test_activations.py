"""Exact SiLU, Sigmoid and Tanh (pipeline/exact/activations.py;
docs/exact-spec.md section 20): forward and backward against float64
autograd, against the spec read with NumPy (with the twin's exp64, written
from section 7 alone) bit for bit, the spec's check values, and the thread
count."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.exact import fused, sigmoid, silu, tanh

from ..support import f32_bits
from ..twin import twin_layers as tl

F64 = np.float64
# tanh's series coefficients, section 20 (correctly rounded int / int)
_T = [1 / 1, -1 / 3, 2 / 15, -17 / 315, 62 / 2835, -1382 / 155925, 21844 / 6081075,
      -929569 / 638512875]


def _inputs(n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Normal values at several scales and the edges: both zeros, tiny,
    the series' threshold and its neighbours, exp64's clamps."""
    g = np.random.default_rng(seed)
    x = np.concatenate([g.standard_normal(n) * s for s in (0.01, 0.3, 3.0, 30.0)])
    edges = [0.0, -0.0, 1e-30, -1e-30, 1e-8, 0.0625, -0.0625, np.nextafter(0.0625, 0),
             np.nextafter(0.0625, 1), 20.0, -20.0, 55.0, 60.0, -89.0, -95.0, 100.0, -100.0,
             109.0, 111.0, -111.0, 3e38, -3e38]
    return torch.from_numpy(np.concatenate([x, edges]).astype(np.float32))


def _np_parts(kind: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Section 20 transcribed in NumPy f64 (one rounding per op), (y, dy) f32."""
    d = x.astype(F64)
    with np.errstate(over="ignore", invalid="ignore"):
        if kind in ("silu", "sigmoid"):
            e = tl.exp64(-np.abs(d))
            t = F64(1.0) + e
            p, q = F64(1.0) / t, e / t
            pos = d >= 0
            sg, sc = np.where(pos, p, q), np.where(pos, q, p)
            if kind == "sigmoid":
                return sg.astype(np.float32), (p * q).astype(np.float32)
            return (d * sg).astype(np.float32), ((d * sc + F64(1.0)) * sg).astype(np.float32)
        a = np.abs(d)
        z = d * d
        w = np.full_like(d, _T[7])
        for n in range(6, -1, -1):
            w = w * z + F64(_T[n])
        th_s = d * w
        e2 = tl.exp64(F64(-2.0) * a)
        u = F64(1.0) + e2
        th_b = (F64(1.0) - e2) / u
        th_b = np.where(d < 0, -th_b, th_b)
        small = a < 0.0625
        th = np.where(small, th_s, th_b)
        dth = np.where(small, F64(1.0) - th_s * th_s, (F64(4.0) * e2) / (u * u))
        return th.astype(np.float32), dth.astype(np.float32)


_FUNCS = {"silu": (silu, F.silu), "sigmoid": (sigmoid, torch.sigmoid), "tanh": (tanh, torch.tanh)}


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("kind", ["silu", "sigmoid", "tanh"])
def test_activation_is_the_spec_read_with_numpy_bit_for_bit(kind: str, native: bool,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """y and the input gradient (g * dy) equal section 20 written with NumPy
    f64 ops and the twin's exp64, bit for bit, on normal values of four
    scales and the edges (zeros of both signs, the series' threshold,
    exp64's clamps, huge values), with the native kernel and without."""
    if not native:
        monkeypatch.setattr(fused, "activation", lambda *a: None)
    x = _inputs()
    xr = x.clone().requires_grad_()
    y = _FUNCS[kind][0](xr)
    g = torch.from_numpy(np.random.default_rng(1).standard_normal(x.shape).astype(np.float32))
    (gx,) = torch.autograd.grad(y, xr, g)
    want_y, want_dy = _np_parts(kind, x.numpy())
    assert (f32_bits(y.detach()) == f32_bits(want_y)).all()
    assert (f32_bits(gx) == f32_bits(g.numpy() * want_dy)).all()


def test_tanh_series_branch_is_needed_and_is_the_spec() -> None:
    """Control: below 1/16 the exponential form (1 - E)/(1 + E) loses the
    small values (relative error far above f32's) where the spec's series
    is within half an ulp; the exact layer takes the series."""
    x = torch.tensor([1e-20, -1e-12, 3e-7, -2e-5, 0.01, 0.06], dtype=torch.float32)
    d = x.numpy().astype(F64)
    e2 = tl.exp64(-2.0 * np.abs(d))
    naive = np.sign(d) * (1.0 - e2) / (1.0 + e2)
    exact = np.tanh(d)
    assert (np.abs(naive - exact) / np.abs(exact)).max() > 1e-3
    got = tanh(x).double().numpy()
    assert (np.abs(got - exact) / np.abs(exact)).max() < 6e-8


@pytest.mark.parametrize("kind", ["silu", "sigmoid", "tanh"])
def test_activation_matches_float64(kind: str) -> None:
    """Forward within half an ulp (f32) of torch's float64 function, the
    input gradient within 2e-7 of float64 autograd's (relative to the
    largest)."""
    ours, ref = _FUNCS[kind]
    x = _inputs(2000, 3)[:-2]            # without +-3e38 (float64 torch's own overflow)
    xr = x.clone().requires_grad_()
    y = ours(xr)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    (gx,) = torch.autograd.grad(y, xr, g)
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    (gx64,) = torch.autograd.grad(y64, x64, g.double())
    r32 = y64.detach().float()
    ulp = (torch.nextafter(r32.abs(), torch.tensor(math.inf)) - r32.abs()).double()
    assert ((y.detach().double() - y64.detach()).abs() / ulp).max() <= 0.5
    assert (gx.double() - gx64).abs().max() <= 2e-7 * gx64.abs().max()


def test_check_values_of_the_spec() -> None:
    """The check values printed in section 20 (f32 results as float.hex)."""
    cases = [(sigmoid, -100.0, "0x1.bp-145", "0x1.bp-145"),
             (sigmoid, 1.0, "0x1.764d5p-1", "0x1.92a946p-3"),
             (silu, -2.5, "-0x1.8464d6p-3", "-0x1.97259ep-4"),
             (tanh, 0.03, "0x1.eb5f62p-6", "0x1.ff8a1cp-1"),
             (tanh, -3.0, "-0x1.fd77d2p-1", "0x1.434a52p-7")]
    for f, v, y_hex, dy_hex in cases:
        x = torch.tensor([v], requires_grad=True)
        y = f(x)
        (dy,) = torch.autograd.grad(y, x, torch.ones(1))
        assert (float(y.detach()[0]), float(dy[0])) == (float.fromhex(y_hex),
                                                        float.fromhex(dy_hex)), (f, v)
    assert torch.sigmoid(torch.tensor([-100.0])).item() == 0.0  # stock f32 loses it


def test_activations_refuse_other_dtypes_and_keep_shapes() -> None:
    """A float64 input is refused by name; 0-dim and empty inputs keep their
    shapes; -0 stays -0 through tanh and silu(-0) is -0 * 0.5 = -0."""
    with pytest.raises(TypeError, match="exact tanh: expected a float32 tensor"):
        tanh(torch.zeros(2, dtype=torch.float64))
    assert tanh(torch.tensor(0.5)).shape == ()
    assert silu(torch.zeros(3, 0)).shape == (3, 0)
    assert f32_bits(tanh(torch.tensor([-0.0]))).tolist() == [0x80000000]
    assert f32_bits(silu(torch.tensor([-0.0]))).tolist() == [0x80000000]


def test_activations_do_not_depend_on_the_thread_count() -> None:
    """More than ATen's grain size of elements (so torch may split the
    work): the same bits at 1 and 2 threads."""
    x = (torch.randn(300, 257, generator=torch.Generator().manual_seed(5)) * 5).requires_grad_()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = []
            for f in (silu, sigmoid, tanh):
                y = f(x)
                res += [f32_bits(y.detach()), f32_bits(torch.autograd.grad(y, x, y.detach())[0])]
            outs.append(res)
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))


def test_the_numpy_reading_can_fail() -> None:
    """Control for the bit-for-bit tests: readings that differ from section
    20 only in rounding (sigmoid's derivative as sg * (1 - sg), with the
    subtraction; sigmoid as 1 / (1 + exp(-d)) for negative d) give other
    bits on some of the same inputs."""
    x = _inputs()
    d = x.numpy().astype(F64)
    y, dy = _np_parts("sigmoid", x.numpy())
    with np.errstate(over="ignore"):
        sg = np.where(d >= 0, 1.0 / (1.0 + tl.exp64(-np.abs(d))),
                      tl.exp64(-np.abs(d)) / (1.0 + tl.exp64(-np.abs(d))))
        other_dy = (sg * (1.0 - sg)).astype(np.float32)
        other_sig = (1.0 / (1.0 + tl.exp64(-d))).astype(np.float32)
    assert (f32_bits(other_dy) != f32_bits(dy)).any()
    assert (f32_bits(other_sig) != f32_bits(y)).any()
    assert (f32_bits(sigmoid(x)) == f32_bits(y)).all()
