"""Exact batch normalisation and variance (pipeline/exact/batchnorm.py;
docs/exact-spec.md section 24): BatchNorm1d/2d in training (the batch's
statistics, the running statistics moved by momentum or the cumulative
average) and in evaluation, and ``var`` over any dims, against the spec read
with NumPy (the twin's tree) bit for bit, against float64 (no worse than
stock fp32), through the guard and from_torch; LayerNet's per-shard running
statistics (every shard from the step's values, combined by the tree)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import (
    BatchNorm1d,
    BatchNorm2d,
    Guard,
    LayerNet,
    batch_norm,
    check_graph,
    from_torch,
    xvar,
)
from pipeline.exact.modnet import BUFFER
from pipeline.exact.ops import tree_sum

from ..support import f32_bits
from ..twin import numpy_twin as tw

F32, F64 = np.float32, np.float64


def _rand(shape: tuple[int, ...], seed: int, spread: float = 4.0, shift: float = 0.0
          ) -> torch.Tensor:
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape) * np.exp2(g.uniform(-spread, spread, shape)) + shift
    return torch.from_numpy(np.asarray(x, dtype=F32))


def _sqrt32(v: np.ndarray) -> np.ndarray:
    """The correctly rounded f32 square root: the f64 root (correctly
    rounded) rounded to f32 is, since 53 >= 2 * 24 + 2."""
    return np.sqrt(v.astype(F64)).astype(F32)


def _rows(x: np.ndarray) -> np.ndarray:
    """Section 24's channel rows: (C, n), channel c's entries in C order of (N, *)."""
    return np.ascontiguousarray(np.moveaxis(x, 1, 0)).reshape(x.shape[1], -1)


def _unrows(r: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    return np.moveaxis(r.reshape((shape[1], shape[0], *shape[2:])), 0, 1)


def _np_bn_train(x: np.ndarray, g: np.ndarray, w: np.ndarray | None, b: np.ndarray | None,
                 eps: float, rm: np.ndarray, rv: np.ndarray, f: float) -> dict[str, np.ndarray]:
    """Section 24 in training, written from the spec with NumPy, row by row."""
    X, G = _rows(x), _rows(g)
    c, n = X.shape
    ep = F32(eps)
    out = {k: np.zeros_like(X) for k in ("y", "gx")}
    out.update({k: np.zeros(c, F32) for k in ("gw", "gb", "rm", "rv")})
    for r in range(c):
        xr = X[r]
        mu = tw.tree_sum(xr, 0) / F32(n)
        d = xr - mu
        sq = tw.tree_sum(d * d, 0)
        var = sq / F32(n)
        s = _sqrt32(np.asarray(var + ep))
        xh = d / s
        y64 = (xr.astype(F64) - F64(mu)) / F64(s)
        out["y"][r] = (y64 * F64(w[r]) + F64(b[r])).astype(F32) if w is not None \
            else y64.astype(F32)
        gxh = G[r] * w[r] if w is not None else G[r]
        m1 = tw.tree_sum(gxh, 0) / F32(n)
        m2 = tw.tree_sum(gxh * xh, 0) / F32(n)
        out["gx"][r] = ((gxh - m1) - xh * m2) / s
        out["gw"][r] = tw.tree_sum(G[r] * xh, 0)
        out["gb"][r] = tw.tree_sum(G[r], 0)
        vu = sq / F32(n - 1)
        out["rm"][r] = F32((1.0 - f) * F64(rm[r]) + f * F64(mu))
        out["rv"][r] = F32((1.0 - f) * F64(rv[r]) + f * F64(vu))
    out["y"], out["gx"] = _unrows(out["y"], x.shape), _unrows(out["gx"], x.shape)
    return out


CASES = [(BatchNorm2d, (4, 3, 5, 6), True, 0.1), (BatchNorm1d, (37, 5), True, 0.3),
         (BatchNorm1d, (6, 4, 9), False, None)]


@pytest.mark.parametrize("make,shape,affine,momentum", CASES, ids=["2d", "1d-NC", "1d-NCL-cum"])
def test_batch_norm_training_is_the_spec_bit_for_bit(make: type, shape: tuple[int, ...],
                                                     affine: bool, momentum: float | None) -> None:
    """Training: output, input/weight/bias gradients and both running
    statistics (momentum, or the cumulative average: factor 1/t at the
    layer's t-th batch) equal section 24 read with NumPy, bit for bit, over
    two batches; the counter counts them."""
    layer = make(shape[1], eps=1e-3, momentum=momentum, affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.copy_(_rand((shape[1],), 9, 1.0))
            layer.bias.copy_(_rand((shape[1],), 10, 1.0))
    for t in (1, 2):
        x = _rand(shape, t, shift=3.0).requires_grad_()
        rm, rv = layer.running_mean.numpy().copy(), layer.running_var.numpy().copy()
        y = layer(x)
        g = _rand(tuple(y.shape), 20 + t)
        params = [x, layer.weight, layer.bias] if affine else [x]
        grads = torch.autograd.grad(y, params, g)
        f = momentum if momentum is not None else 1.0 / t
        want = _np_bn_train(x.detach().numpy(), g.numpy(),
                            layer.weight.detach().numpy() if affine else None,
                            layer.bias.detach().numpy() if affine else None, 1e-3, rm, rv, f)
        assert (f32_bits(y.detach()) == f32_bits(want["y"])).all()
        assert (f32_bits(grads[0]) == f32_bits(want["gx"])).all()
        if affine:
            assert (f32_bits(grads[1]) == f32_bits(want["gw"])).all()
            assert (f32_bits(grads[2]) == f32_bits(want["gb"])).all()
        assert (f32_bits(layer.running_mean) == f32_bits(want["rm"])).all()
        assert (f32_bits(layer.running_var) == f32_bits(want["rv"])).all()
        assert int(layer.num_batches_tracked) == t


def test_batch_norm_evaluation_is_the_spec_bit_for_bit() -> None:
    """Evaluation: the running statistics normalise (``(x - rm) / sqrt32(rv
    + ep)``, then the affine step); the gradient is ``g * w / s``; nothing
    moves. Without running statistics (track_running_stats=False) the
    batch's statistics are used in evaluation too, as torch does."""
    layer = BatchNorm2d(3).eval()
    with torch.no_grad():
        layer.running_mean.copy_(_rand((3,), 1))
        layer.running_var.copy_(_rand((3,), 2).abs() + 0.5)
        layer.weight.copy_(_rand((3,), 3, 1.0))
        layer.bias.copy_(_rand((3,), 4, 1.0))
    x = _rand((2, 3, 4, 5), 5).requires_grad_()
    y = layer(x)
    g = _rand(tuple(y.shape), 6)
    gx, gw, gb = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
    X, G = _rows(x.detach().numpy()), _rows(g.numpy())
    rm, rv, w, b = (t.detach().numpy() for t in (layer.running_mean, layer.running_var,
                                                   layer.weight, layer.bias))
    s = _sqrt32(rv + F32(1e-5))[:, None]
    xh = (X - rm[:, None]) / s
    y64 = ((X.astype(F64) - rm[:, None].astype(F64)) / s.astype(F64)) * w[:, None].astype(F64) \
        + b[:, None].astype(F64)
    assert (f32_bits(y.detach()) == f32_bits(_unrows(y64.astype(F32), x.shape))).all()
    assert (f32_bits(gx) == f32_bits(_unrows((G * w[:, None]) / s, x.shape))).all()
    assert (f32_bits(gw) == f32_bits(tw.tree_sum(G * xh, 1))).all()
    assert (f32_bits(gb) == f32_bits(tw.tree_sum(G, 1))).all()
    assert int(layer.num_batches_tracked) == 0
    free = BatchNorm2d(3, affine=False, track_running_stats=False).eval()
    want = _np_bn_train(x.detach().numpy(), g.numpy(), None, None, 1e-5, np.zeros(3, F32),
                        np.ones(3, F32), 0.1)["y"]
    assert free.running_mean is None
    assert (f32_bits(free(x).detach()) == f32_bits(want)).all()


def test_batch_norm_reading_can_fail() -> None:
    """Control: the channel's entries summed left to right (not the tree),
    the variance taken as E[x^2] - E[x]^2, or the output rounded step by
    step in f32 give other bits; the spec's reading gives the same."""
    x = _rand((8, 2, 7, 7), 7, shift=100.0)
    y = BatchNorm2d(2, affine=False)(x)
    X = _rows(x.numpy())
    n = X.shape[1]
    mu_seq = np.zeros(X.shape[0], F32)
    for v in X.T:                                   # left to right
        mu_seq = mu_seq + v
    mu_seq = mu_seq / F32(n)
    d = X - mu_seq[:, None]
    s_seq = _sqrt32(tw.tree_sum(d * d, 1) / F32(n) + F32(1e-5))[:, None]
    y_seq = ((X.astype(F64) - mu_seq[:, None].astype(F64)) / s_seq.astype(F64)).astype(F32)
    assert (f32_bits(_unrows(y_seq, x.shape)) != f32_bits(y.detach())).any()
    mu = tw.tree_sum(X, 1) / F32(n)
    var_alt = tw.tree_sum(X * X, 1) / F32(n) - mu * mu
    s_alt = _sqrt32(var_alt + F32(1e-5))[:, None]
    y_alt = ((X.astype(F64) - mu[:, None].astype(F64)) / s_alt.astype(F64)).astype(F32)
    assert (f32_bits(_unrows(y_alt, x.shape)) != f32_bits(y.detach())).any()
    d = X - mu[:, None]
    s_ok = _sqrt32(tw.tree_sum(d * d, 1) / F32(n) + F32(1e-5))[:, None]
    y_ok = ((X.astype(F64) - mu[:, None].astype(F64)) / s_ok.astype(F64)).astype(F32)
    assert (f32_bits(_unrows(y_ok, x.shape)) == f32_bits(y.detach())).all()  # the reading
    aff = BatchNorm2d(2)
    with torch.no_grad():
        aff.weight.copy_(torch.tensor([0.7, -1.3]))
        aff.bias.copy_(torch.tensor([0.1, 2.5]))
    w, b = aff.weight.detach().numpy()[:, None], aff.bias.detach().numpy()[:, None]
    ya = aff(x).detach()
    y64 = ((X.astype(F64) - mu[:, None].astype(F64)) / s_ok.astype(F64)) * w.astype(F64) \
        + b.astype(F64)
    assert (f32_bits(_unrows(y64.astype(F32), x.shape)) == f32_bits(ya)).all()
    assert (f32_bits(_unrows((d / s_ok) * w + b, x.shape)) != f32_bits(ya)).any()  # f32 steps


def test_batch_norm_matches_float64_at_least_as_well_as_stock() -> None:
    """Forward and backward against float64 torch (a mean far from zero, as
    real activations have): the worst relative error at or below stock
    fp32's (a 1.25x margin for the draw) and below 1e-6, in training and
    evaluation."""
    x = _rand((16, 8, 6, 6), 11, 1.0, shift=50.0)
    g = _rand((16, 8, 6, 6), 12, 1.0)
    for training in (True, False):
        stock = nn.BatchNorm2d(8)
        with torch.no_grad():
            stock.weight.copy_(_rand((8,), 13, 1.0))
            stock.bias.copy_(_rand((8,), 14, 1.0))
            stock.running_mean.fill_(50.0)
            stock.running_var.fill_(3.0)
        ours, ref = from_torch(stock), nn.BatchNorm2d(8).double()
        ref.load_state_dict(stock.state_dict())
        errs = []
        outs = []
        for m, dt in ((stock, torch.float32), (ours, torch.float32), (ref, torch.float64)):
            m.train(training)
            xi = x.to(dt).requires_grad_()
            y = m(xi)
            (gx,) = torch.autograd.grad(y, xi, g.to(dt))
            outs.append((y.detach().double(), gx.double()))
        for y, gx in outs[:2]:
            errs.append(max(float((y - outs[2][0]).abs().max() / outs[2][0].abs().max()),
                            float((gx - outs[2][1]).abs().max() / outs[2][1].abs().max())))
        assert errs[1] <= errs[0] * 1.25 and errs[1] < 1e-6, (training, errs)


def test_var_is_the_spec_bit_for_bit_and_routed() -> None:
    """``var`` over any dims with correction 0/1 (f32 and f64): the tree
    mean, the tree of squared deviations, one division; the backward ``(d +
    d) * (g / (n - c))``; bit for bit with NumPy. ``torch.var`` and
    ``Tensor.var`` (``unbiased`` positional or keyword, ``correction``)
    under the guard are it, with an accepted graph; control: stock's graph
    is refused."""
    x = _rand((3, 5, 4), 15, shift=10.0)
    for dims, corr, keep in (((0, 2), 1, False), ((1,), 0, True), ((0, 1, 2), 1, False)):
        xr = x.clone().requires_grad_()
        v = xvar(xr, list(dims), correction=corr, keepdim=keep)
        g = _rand(tuple(v.shape), 16)
        (gx,) = torch.autograd.grad(v, xr, g)
        xs = x.numpy()
        kept = [d for d in range(3) if d not in dims]
        moved = np.moveaxis(xs, dims, range(3 - len(dims), 3)).reshape(
            *[xs.shape[d] for d in kept], -1)
        n = moved.shape[-1]
        mu = tw.tree_sum(moved, moved.ndim - 1) / F32(n)
        d = moved - mu[..., None]
        want = tw.tree_sum(d * d, d.ndim - 1) / F32(n - corr)
        assert (f32_bits(v.detach().reshape(-1)) == f32_bits(want.reshape(-1))).all()
        q = g.numpy().reshape(want.shape) / F32(n - corr)
        wgx = np.moveaxis(((d + d) * q[..., None]).reshape(
            *[xs.shape[k] for k in kept], *[xs.shape[k] for k in dims]),
            range(3 - len(dims), 3), dims)
        assert (f32_bits(gx) == f32_bits(wgx)).all()
        assert (v.detach().double() - x.double().var(dims, correction=corr, keepdim=keep)
                ).abs().max() <= 1e-6 * float(v.detach().abs().max())
    x64 = x.double()  # f64: the same steps in f64
    m64 = np.moveaxis(x64.numpy(), 1, 2)
    d64 = m64 - (tw.tree_sum(m64, 2) / 5.0)[..., None]
    assert np.array_equal(xvar(x64, 1).numpy(), tw.tree_sum(d64 * d64, 2) / 4.0)
    xr = x.clone().requires_grad_()
    with Guard():
        routed = [xr.var(), xr.var(1), torch.var(xr, (0, 2), False), xr.var(0, keepdim=True,
                  correction=0), torch.var(xr, True)]
    ours = [xvar(x), xvar(x, 1), xvar(x, (0, 2), correction=0),
            xvar(x, 0, correction=0, keepdim=True), xvar(x)]
    for r, o in zip(routed, ours):
        assert check_graph(r) == [] and torch.equal(r.detach(), o)
    assert check_graph(x.clone().requires_grad_().var(1)) != []
    with pytest.raises(ValueError, match="correction must be an integer"):
        xvar(x, 0, correction=0.5)  # type: ignore[arg-type]


def test_guard_routes_batch_norm_and_from_torch_converts_it() -> None:
    """F.batch_norm under the guard is the exact function (its running
    statistics moved in place); BatchNorm1d/2d convert with their options,
    parameters and running statistics; the model's graph is accepted. A
    single value per channel in training is refused, as torch refuses it."""
    x = _rand((4, 3, 5, 5), 17)
    rm, rv = torch.zeros(3), torch.ones(3)
    rm2, rv2 = torch.zeros(3), torch.ones(3)
    xr = x.clone().requires_grad_()
    with Guard():
        y = F.batch_norm(xr, rm, rv, training=True, momentum=0.2)
    assert check_graph(y) == []
    assert torch.equal(y.detach(), batch_norm(x, rm2, rv2, training=True, momentum=0.2))
    assert torch.equal(rm, rm2) and torch.equal(rv, rv2) and not torch.equal(rm, torch.zeros(3))
    stock = nn.Sequential(nn.BatchNorm2d(3, eps=1e-3, momentum=None), nn.Flatten(),
                          nn.BatchNorm1d(75, affine=False))
    stock.train()
    stock(x)                                        # moves the stock running statistics
    net = from_torch(stock)
    assert [type(m) for m in net] == [BatchNorm2d, nn.Flatten, BatchNorm1d]
    assert net[0].eps == 1e-3 and net[0].momentum is None and net[2].weight is None
    assert torch.equal(net[0].running_var, stock[0].running_var)
    assert int(net[0].num_batches_tracked) == 1
    assert set(net.state_dict()) == set(stock.state_dict())
    net.eval()
    stock.eval()
    assert (net(x) - stock(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1d(3)(torch.ones(1, 3))
    with pytest.raises(ConfigError, match="no exact version"):
        from_torch(nn.Sequential(nn.BatchNorm3d(3)))


class _BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8),
                                  nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_layernet_keeps_running_statistics_per_shard() -> None:
    """In LayerNet each shard of a step starts from the step's running
    statistics (a shard's values do not depend on the shards run before it),
    returns its values with its gradients, and end_step sets the tree sum
    over the shards divided by their count (the counter: 1 after one step,
    not one per shard); the sample check's forward leaves the statistics at
    their initial values. Control: without the per-shard start the second
    shard's values differ."""
    x = _rand((16, 1, 4, 4), 18, 1.0)
    y = torch.from_numpy(np.random.default_rng(0).integers(0, 3, 16))
    net = LayerNet(from_torch(_BNNet()), 3, "cpu", x[:2])
    assert torch.equal(net.buffers["body.1.running_mean"], torch.zeros(4))
    assert int(net.buffers["body.1.num_batches_tracked"]) == 0
    parts = [net.shard_grads(x[s:s + 4], y[s:s + 4], 16, None, step=0, row0=s)
             for s in range(0, 16, 4)]
    key = BUFFER + "body.5.running_var"
    alone = LayerNet(from_torch(_BNNet()), 3, "cpu", x[:2])
    (_, third) = alone.shard_grads(x[8:12], y[8:12], 16, None, step=0, row0=8)
    assert torch.equal(third[key], parts[2][1][key])
    summed = {k: tree_sum(torch.stack([p[1][k] for p in parts]), 0) for k in parts[0][1]}
    grads = net.end_step(summed, 4)
    assert not any(k.startswith(BUFFER) for k in grads)
    assert torch.equal(net.buffers["body.5.running_var"], summed[key] / 4)
    assert int(net.buffers["body.1.num_batches_tracked"]) == 1
    # control: shards that carry the statistics on give another value
    carried = LayerNet(from_torch(_BNNet()), 3, "cpu", x[:2])
    carried._begin_shard = lambda step: None  # type: ignore[method-assign]
    run = [carried.shard_grads(x[s:s + 4], y[s:s + 4], 16, None, step=0, row0=s)
           for s in range(0, 16, 4)]
    assert not torch.equal(run[2][1][key], parts[2][1][key])


def test_batch_norm_does_not_depend_on_the_thread_count() -> None:
    """Above ATen's grain size, forward, backward and running statistics:
    the same bits at 1 and 2 threads."""
    x = _rand((16, 32, 16, 16), 19, shift=5.0)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            layer = BatchNorm2d(32)
            xr = x.clone().requires_grad_()
            y = layer(xr)
            (gx,) = torch.autograd.grad(y, xr, y.detach())
            outs.append([f32_bits(t.detach()) for t in (y, gx, layer.running_var)])
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))


def test_the_short_square_root_is_sqrt32() -> None:
    """BatchNorm's square root of a channel vector (NumPy's f64 root rounded
    to f32) gives ops.sqrt32's bits on every f32 exponent, subnormals,
    exact squares, their neighbours, 0, -0 and inf (correct rounding both)."""
    from pipeline.exact.batchnorm import sqrt32_small
    from pipeline.exact.ops import sqrt32

    g = np.random.default_rng(3)
    v = np.concatenate([
        np.ldexp(g.uniform(1.0, 2.0, 3000), g.integers(-149, 128, 3000)),
        np.arange(1, 1000, dtype=F64) ** 2, np.nextafter(np.arange(1, 1000, dtype=F32) ** 2,
                                                        F32(np.inf)).astype(F64),
        [0.0, -0.0, np.inf, 1e-45, 3.4e38]]).astype(F32)
    for i in range(0, len(v), 4096):
        t = torch.from_numpy(v[i:i + 4096])
        assert (f32_bits(sqrt32_small(t)) == f32_bits(sqrt32(t))).all()
