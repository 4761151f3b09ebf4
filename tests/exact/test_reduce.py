"""Exact sums, means, softmax and log-softmax over any dims
(pipeline/exact/reduce.py; docs/exact-spec.md section 21): against float64
autograd, against the spec read with NumPy (the twin's tree, xexp and xlog,
written from sections 5 and 7 alone) bit for bit, with and without the native
kernels, and at 1 and 2 threads."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch

from pipeline.exact import fused, log_softmax, softmax, xmean, xsum

from ..support import f32_bits
from ..twin import numpy_twin as tw

F32 = np.float32


def _rand(shape: tuple[int, ...], seed: int, spread: float = 12.0) -> torch.Tensor:
    """Entries of very different magnitudes, so that the order of the adds
    shows in the bits."""
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape) * np.exp2(g.uniform(-spread, spread, shape))
    return torch.from_numpy(np.asarray(x, dtype=F32))


def _np_sum(x: np.ndarray, dims: tuple[int, ...]) -> np.ndarray:
    """Section 21: the reduced dims moved to the end (increasing order),
    flattened in C order, one tree (the twin's tree_sum)."""
    kept = [d for d in range(x.ndim) if d not in dims]
    moved = np.transpose(x, kept + list(dims))
    flat = moved.reshape([x.shape[d] for d in kept] + [-1])
    return tw.tree_sum(flat, flat.ndim - 1)


def _grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    y = f(xr)
    if g is None:
        g = _rand(tuple(y.shape), 77, 3.0)
    return y.detach(), torch.autograd.grad(y, xr, g)[0], g


DIMS = [None, 0, 2, -1, (0, 2), (1, 3), (3, 0), (0, 1, 2, 3), ()]


@pytest.mark.parametrize("dims", DIMS, ids=str)
@pytest.mark.parametrize("keepdim", [False, True])
def test_sum_and_mean_are_the_spec_bit_for_bit(dims: int | tuple[int, ...] | None,
                                                keepdim: bool) -> None:
    """sum and mean over any dims (one, several, unordered, all, none given,
    an empty list) equal one tree over the reduced entries in C order, then
    ``/ f32(n)``; the backward is g broadcast (sum) or g / f32(n) broadcast
    (mean), bit for bit."""
    x = _rand((3, 5, 4, 7), 1)
    full = tuple(range(4)) if dims in (None, ()) else tuple(
        sorted(d % 4 for d in ((dims,) if isinstance(dims, int) else dims)))
    n = int(np.prod([x.shape[d] for d in full]))
    want = _np_sum(x.numpy(), full)
    for f, w in ((xsum, want), (xmean, want / F32(n))):
        y, gx, g = _grad(lambda t, f=f: f(t, dims, keepdim), x)
        shape = [1 if d in full else s for d, s in enumerate(x.shape)] if keepdim else list(
            want.shape)
        assert list(y.shape) == shape
        assert (f32_bits(y.reshape(-1)) == f32_bits(np.asarray(w).reshape(-1))).all()
        gk = g.numpy().reshape([1 if d in full else s for d, s in enumerate(x.shape)])
        gw = gk if f is xsum else gk / F32(n)
        assert (f32_bits(gx) == f32_bits(np.broadcast_to(gw, x.shape))).all()


def test_sum_order_is_the_specified_one() -> None:
    """Control: the same entries summed with the reduced dims in another
    order, or left to right, give other bits, so the tests above can fail."""
    x = _rand((6, 5, 9), 2)
    want = _np_sum(x.numpy(), (0, 2))
    swapped = tw.tree_sum(np.transpose(x.numpy(), (1, 2, 0)).reshape(5, -1), 1)
    seq = np.transpose(x.numpy(), (1, 0, 2)).reshape(5, -1)
    left = seq[:, 0].copy()
    for j in range(1, seq.shape[1]):
        left = left + seq[:, j]
    assert (f32_bits(swapped) != f32_bits(want)).any() and (f32_bits(left) != f32_bits(want)).any()
    assert (f32_bits(xsum(x, (2, 0))) == f32_bits(want)).all()


def test_sum_edges_and_refusals() -> None:
    """0-dim and empty inputs give torch's shapes (+0 for an empty sum, NaN
    for an empty mean); float64 sums by the tree too; another dtype, an
    out-of-range or repeated dim is refused with torch's wording."""
    assert xsum(torch.tensor(3.5)).item() == 3.5 and xsum(torch.tensor(3.5)).shape == ()
    assert f32_bits(xsum(torch.zeros(2, 0), 1)).tolist() == [0, 0]
    assert torch.isnan(xmean(torch.zeros(0)))
    x64 = _rand((5, 33), 3).double()
    assert xsum(x64, 1).dtype == torch.float64
    assert torch.equal(xsum(x64, 1), torch.from_numpy(tw.tree_sum(x64.numpy(), 1)))
    with pytest.raises(TypeError, match="dtype"):
        xsum(torch.ones(3), dtype=torch.float64)
    with pytest.raises(TypeError, match="float32 or float64"):
        xmean(torch.ones(3, dtype=torch.float16))
    with pytest.raises(IndexError, match="out of range"):
        xsum(torch.ones(3, 4), 2)
    with pytest.raises(RuntimeError, match="multiple times"):
        xsum(torch.ones(3, 4), (1, -1))


# ------------------------------------------------------------------ softmax
def _np_softmax(x: np.ndarray, dim: int, log: bool) -> tuple[np.ndarray, np.ndarray]:
    """Section 21 per row along ``dim``: (y, p)."""
    z = np.moveaxis(x, dim, -1)
    dz = z - z.max(-1, keepdims=True)
    e = tw.xexp(dz)
    s = tw.tree_sum(e, e.ndim - 1)[..., None]
    p = e / s
    y = dz - tw.xlog(s) if log else p
    return np.moveaxis(y, -1, dim), np.moveaxis(p, -1, dim)


def _np_softmax_grad(g: np.ndarray, p: np.ndarray, dim: int, log: bool) -> np.ndarray:
    gm, pm = np.moveaxis(g, dim, -1), np.moveaxis(p, dim, -1)
    if log:
        out = gm - pm * tw.tree_sum(gm, gm.ndim - 1)[..., None]
    else:
        out = (gm - tw.tree_sum(gm * pm, gm.ndim - 1)[..., None]) * pm
    return np.moveaxis(out, -1, dim)


@pytest.mark.parametrize("native", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [0, 1, 2, -1])
def test_softmax_is_the_spec_bit_for_bit(dim: int, log: bool, native: bool,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """softmax and log_softmax along every dim (rows of 3 to 130 entries,
    logits up to +-60) and their backward equal section 21 in NumPy with
    the twin's xexp, xlog and tree, bit for bit, with the native kernels and
    with the torch path."""
    if not native:
        monkeypatch.setattr(fused, "softmax", lambda *a: None)
        monkeypatch.setattr(fused, "softmax_grad", lambda *a: None)
    x = _rand((3, 130, 5, 7), 4, 0.0) * 20
    f = log_softmax if log else softmax
    y, gx, g = _grad(lambda t: f(t, dim), x)
    want, p = _np_softmax(x.numpy(), dim, log)
    assert (f32_bits(y) == f32_bits(want)).all()
    assert (f32_bits(gx) == f32_bits(_np_softmax_grad(g.numpy(), p, dim, log))).all()


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_matches_float64(log: bool) -> None:
    """Within 2x stock float32 torch's error vs float64 torch (forward and
    gradient, the largest error relative to the largest entry) along each dim
    of a 4-D input."""
    x = _rand((4, 6, 5, 9), 5, 0.0) * 4
    for dim in range(4):
        f, ref = (log_softmax, torch.log_softmax) if log else (softmax, torch.softmax)
        y, gx, g = _grad(lambda t: f(t, dim), x)
        ys, gs, _ = _grad(lambda t: ref(t, dim), x, g)
        x64 = x.double().requires_grad_()
        y64 = ref(x64, dim)
        (g64,) = torch.autograd.grad(y64, x64, g.double())

        def err(a: torch.Tensor, r: torch.Tensor) -> float:
            return float((a.double() - r.detach()).abs().max() / r.detach().abs().max())

        assert err(y, y64) <= 2 * err(ys, y64) and err(gx, g64) <= 2 * err(gs, g64), dim


def test_sum_and_mean_match_float64() -> None:
    """Sums and means over several dim sets within 1e-6 of float64 (relative
    to the largest result)."""
    x = _rand((5, 6, 7), 6, 0.0)
    for dims, f in itertools.product(((0,), (1, 2), None), (xsum, xmean)):
        y = f(x, dims)
        want = (x.double().sum(dims) if f is xsum else x.double().mean(dims)) if dims \
            else (x.double().sum() if f is xsum else x.double().mean())
        assert (y.double() - want).abs().max() <= 1e-6 * max(want.abs().max().item(), 1e-30)


def test_softmax_edges_and_refusals() -> None:
    """A 0-dim input is a row of one (softmax 1, log_softmax 0), an empty one
    stays empty; dim None, another dtype or a float64 input is refused."""
    assert softmax(torch.tensor(2.0), 0).item() == 1.0
    assert log_softmax(torch.tensor(2.0), -1).item() == 0.0
    assert softmax(torch.zeros(2, 0), 1).shape == (2, 0)
    with pytest.raises(ValueError, match="give dim"):
        softmax(torch.ones(3))
    with pytest.raises(TypeError, match="dtype"):
        log_softmax(torch.ones(3), 0, torch.float64)
    with pytest.raises(TypeError, match="float32"):
        softmax(torch.ones(3, dtype=torch.float64), 0)


def test_reductions_do_not_depend_on_the_thread_count() -> None:
    """Inputs above ATen's grain size: sums over leading, trailing and
    inner dims, means and both softmaxes, forward and backward, give the
    same bits at 1 and 2 threads."""
    x = _rand((40, 33, 70), 7)
    z = _rand((40, 33, 70), 8, 0.0) * 10
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = []
            for f in (lambda t: xsum(t, 0), lambda t: xsum(t, (0, 2)), lambda t: xmean(t, -1),
                      lambda t: xsum(t)):
                res.append(f32_bits(_grad(f, x)[0]))
            for f in (lambda t: softmax(t, 1), lambda t: log_softmax(t, -1)):
                y, gx, _ = _grad(f, z)
                res += [f32_bits(y), f32_bits(gx)]
            outs.append(res)
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))
