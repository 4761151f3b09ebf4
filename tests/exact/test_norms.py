"""Exact RMSNorm (pipeline/exact/norms.py; docs/exact-spec.md section 22):
against float64 autograd and torch's own RMSNorm, against the spec read with
NumPy (the twin's tree, correctly rounded sqrt) bit for bit, with and
without a weight, eps given or torch's default, one or two normalised dims,
and at 1 and 2 threads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.exact import RMSNorm, from_torch, init_exact, rms_norm

from ..support import f32_bits
from ..twin import numpy_twin as tw

F32 = np.float32


def _rand(shape: tuple[int, ...], seed: int, spread: float = 6.0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    row = np.exp2(g.uniform(-spread, spread, shape[:-1] + (1,)))
    return torch.from_numpy((g.standard_normal(shape) * row).astype(F32))


def _np_rms(x: np.ndarray, k: int, w: np.ndarray | None, eps: float,
            g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Section 22 in NumPy f32 ops (np.sqrt is IEEE's correctly rounded
    sqrt): (y, gx, gw)."""
    d = int(np.prod(x.shape[x.ndim - k:]))
    x2 = x.reshape(-1, d)
    g2 = g.reshape(-1, d)
    w2 = None if w is None else w.reshape(d)
    ms = tw.tree_sum(x2 * x2, 1) / F32(d)
    s = np.sqrt(ms + F32(eps))[:, None]
    xh = x2 / s
    y = xh * w2 if w2 is not None else xh
    gxh = g2 * w2 if w2 is not None else g2
    m = (tw.tree_sum(gxh * xh, 1) / F32(d))[:, None]
    gx = (gxh - xh * m) / s
    gw = None if w is None else tw.tree_sum(g2 * xh, 0).reshape(w.shape)
    return y.reshape(x.shape), gx.reshape(x.shape), gw


CASES = [((6, 5, 24), (24,), True, 1e-6), ((6, 5, 24), (24,), False, None),
         ((4, 7, 9), (7, 9), True, None), ((3, 1000), (1000,), True, 1e-5)]


@pytest.mark.parametrize("shape,norm,weight,eps", CASES,
                         ids=["weight-eps", "no-weight-default-eps", "two-dims", "wide"])
def test_rms_norm_is_the_spec_bit_for_bit(shape: tuple[int, ...], norm: tuple[int, ...],
                                          weight: bool, eps: float | None) -> None:
    """Forward, input gradient and weight gradient equal section 22 written
    with NumPy f32 ops, bit for bit, on rows of very different scales."""
    x = _rand(shape, 1)
    w = _rand(norm, 2, 0.0) if weight else None
    g = _rand(shape, 3)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_() if w is not None else None
    y = rms_norm(xr, norm, wr, eps)
    grads = torch.autograd.grad(y, [t for t in (xr, wr) if t is not None], g)
    eps32 = 2.0**-23 if eps is None else float(np.float32(eps))
    wy, wgx, wgw = _np_rms(x.numpy(), len(norm), None if w is None else w.numpy(), eps32,
                           g.numpy())
    assert (f32_bits(y.detach()) == f32_bits(wy)).all()
    assert (f32_bits(grads[0]) == f32_bits(wgx)).all()
    if w is not None:
        assert (f32_bits(grads[1]) == f32_bits(wgw)).all()


def test_rms_norm_reading_can_fail() -> None:
    """Control: torch's formula (a multiply by 1/sqrt) and the mean square
    summed left to right give other bits than the spec on the same rows."""
    x = _rand((50, 24), 4).numpy()
    want, _, _ = _np_rms(x, 1, None, 1e-6, np.zeros_like(x))
    ms = tw.tree_sum(x * x, 1) / F32(24)
    recip = x * (F32(1) / np.sqrt(ms + F32(1e-6)))[:, None]
    seq = np.zeros(50, F32)
    for j in range(24):
        seq = seq + x[:, j] * x[:, j]
    left = x / np.sqrt(seq / F32(24) + F32(1e-6))[:, None]
    assert (f32_bits(recip) != f32_bits(want)).any() and (f32_bits(left) != f32_bits(want)).any()


@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_layer_matches_torch_in_float64(affine: bool) -> None:
    """nn.RMSNorm converted by from_torch (its weight copied, eps None and
    given) is within 2x stock float32's error of float64 torch, forward and
    every gradient; init_exact sets the weight to ones."""
    for eps in (None, 1e-5):
        torch.manual_seed(0)
        stock = nn.RMSNorm((32,), eps=eps, elementwise_affine=affine)
        if affine:
            with torch.no_grad():
                stock.weight.copy_(torch.randn(32))
        exact = from_torch(stock)
        assert isinstance(exact, RMSNorm) and (exact.weight is None) == (not affine)
        x = _rand((8, 32), 5, 3.0)
        g = _rand((8, 32), 6, 0.0)
        ref = nn.RMSNorm((32,), eps=eps, elementwise_affine=affine).double()
        ref.load_state_dict(stock.state_dict())

        def run(m: nn.Module, inp: torch.Tensor) -> list[torch.Tensor]:
            xi = inp.clone().requires_grad_()
            y = m(xi)
            params = [xi, *m.parameters()]
            return [y.detach(), *torch.autograd.grad(y, params, g.to(inp.dtype))]

        want = run(ref, x.double())
        for name, a, s, r in zip(("y", "gx", "gw"), run(exact, x), run(stock, x), want):
            err = float((a.double() - r).abs().max() / r.abs().max())
            stock_err = float((s.double() - r).abs().max() / r.abs().max())
            assert err <= max(2 * stock_err, 1e-7), (name, eps, err, stock_err)
    m = init_exact(nn.Sequential(RMSNorm(5)), 3)
    assert torch.equal(m[0].weight, torch.ones(5))


def test_rms_norm_refuses_shapes_torch_refuses() -> None:
    """A normalized_shape that is not the input's trailing dims, a weight
    of another shape and a float64 input are refused by name."""
    with pytest.raises(RuntimeError, match="last dims"):
        rms_norm(torch.ones(3, 4), (5,))
    with pytest.raises(RuntimeError, match="weight of shape"):
        rms_norm(torch.ones(3, 4), (4,), torch.ones(3))
    with pytest.raises(TypeError, match="float32"):
        rms_norm(torch.ones(3, 4, dtype=torch.float64), (4,))
    assert torch.equal(rms_norm(torch.zeros(0, 4), (4,)), torch.zeros(0, 4))


def test_rms_norm_does_not_depend_on_the_thread_count() -> None:
    """Above ATen's grain size: the same bits at 1 and 2 threads."""
    x, w = _rand((200, 256), 7).requires_grad_(), _rand((256,), 8, 0.0).requires_grad_()
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y = rms_norm(x, (256,), w, 1e-6)
            outs.append([f32_bits(t) for t in (y.detach(), *torch.autograd.grad(y, [x, w], x))])
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))
