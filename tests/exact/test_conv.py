"""Exact convolutions (pipeline/exact/conv.py; docs/exact-spec.md section
25): Conv2d with a stride, padding and dilation per dim and groups (grouped,
depthwise), and Conv1d, against the spec read with NumPy loops (the twin's
``xmmb`` per group) bit for bit, against float64 (no worse than stock
fp32), section 14's Conv2d as its special case, the guard's routes,
from_torch and the thread count."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import Conv1d, Conv2d, Guard, check_graph, conv1d, from_torch
from pipeline.exact import conv2d as section14_conv2d
from pipeline.exact.conv import conv2d

from ..support import f32_bits
from ..twin import numpy_twin as tw
from ..twin import twin_layers as tl

F32 = np.float32
Pair = tuple[int, int]


def _rand(shape: tuple[int, ...], seed: int, spread: float = 4.0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape) * np.exp2(g.uniform(-spread, spread, shape))
    return torch.from_numpy(np.asarray(x, dtype=F32))


def _np_conv2d(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, g: np.ndarray, s: Pair,
               p: Pair, d: Pair, groups: int) -> tuple[np.ndarray, ...]:
    """Section 25 with NumPy loops: cols entry by entry, xmmb per group, the
    fold offset by offset. Returns (y, gx, gw, gb)."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h + 2 * p[0] - d[0] * (kh - 1) - 1) // s[0] + 1
    wo = (wd + 2 * p[1] - d[1] * (kw - 1) - 1) // s[1] + 1
    xp = np.zeros((n, c, h + 2 * p[0], wd + 2 * p[1]), F32)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + wd] = x
    cols = np.zeros((n * ho * wo, c * kh * kw), F32)
    for nn_ in range(n):
        for oh in range(ho):
            for ow in range(wo):
                for ci in range(c):
                    for i in range(kh):
                        for j in range(kw):
                            cols[(nn_ * ho + oh) * wo + ow, (ci * kh + i) * kw + j] = \
                                xp[nn_, ci, oh * s[0] + i * d[0], ow * s[1] + j * d[1]]
    og, kk = o // groups, cg * kh * kw
    gy = np.ascontiguousarray(g.transpose(0, 2, 3, 1)).reshape(-1, o)
    y = np.zeros((n * ho * wo, o), F32)
    gcols = np.zeros_like(cols)
    gw = np.zeros((o, kk), F32)
    for q in range(groups):
        cq = cols[:, q * kk:(q + 1) * kk]
        wq = w[q * og:(q + 1) * og].reshape(og, kk)
        gq = np.ascontiguousarray(gy[:, q * og:(q + 1) * og])
        y[:, q * og:(q + 1) * og] = tl.XMMB(cq, np.ascontiguousarray(wq.T))
        gw[q * og:(q + 1) * og] = tl.XMMB(np.ascontiguousarray(gq.T), cq)
        gcols[:, q * kk:(q + 1) * kk] = tl.XMMB(gq, wq)
    if b is not None:
        y = y + b
    gpad = np.zeros_like(xp)
    g6 = gcols.reshape(n, ho, wo, c, kh, kw)
    for i in range(kh):
        for j in range(kw):
            gpad[:, :, i * d[0]:i * d[0] + s[0] * (ho - 1) + 1:s[0],
                 j * d[1]:j * d[1] + s[1] * (wo - 1) + 1:s[1]] += \
                g6[..., i, j].transpose(0, 3, 1, 2)
    gb = tw.tree_sum(gy, 0) if b is not None else None
    return (y.reshape(n, ho, wo, o).transpose(0, 3, 1, 2),
            gpad[:, :, p[0]:p[0] + h, p[1]:p[1] + wd], gw.reshape(w.shape), gb)


GEOMS = [  # (C, O, kernel, stride, padding, dilation, groups)
    (3, 4, (3, 3), (2, 1), (1, 0), (1, 1), 1),
    (4, 6, (3, 2), (1, 2), (2, 1), (2, 1), 2),
    (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 4),       # depthwise
    (2, 6, (1, 1), (2, 2), (0, 0), (1, 1), 1),       # a strided 1x1 projection
    (70, 3, (1, 1), (1, 1), (0, 0), (1, 1), 1)]      # k = 70: two blocks of the product


@pytest.mark.parametrize("c,o,k,s,p,d,groups", GEOMS,
                         ids=["s21p10", "grouped-dil", "depthwise", "1x1s2", "k70"])
def test_conv2d_is_the_spec_bit_for_bit(c: int, o: int, k: Pair, s: Pair, p: Pair, d: Pair,
                                        groups: int) -> None:
    """Forward and the input, weight and bias gradients equal section 25
    read with NumPy loops, bit for bit."""
    x = _rand((2, c, 7, 6), 1)
    w = _rand((o, c // groups, *k), 2, 2.0)
    b = _rand((o,), 3, 2.0)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = conv2d(xr, wr, br, s, p, d, groups)
    g = _rand(tuple(y.shape), 4)
    gx, gw, gb = torch.autograd.grad(y, [xr, wr, br], g)
    want = _np_conv2d(x.numpy(), w.numpy(), b.numpy(), g.numpy(), s, p, d, groups)
    for got, ref in zip((y.detach(), gx, gw, gb), want):
        assert got.shape == ref.shape and (f32_bits(got) == f32_bits(ref)).all()


def test_conv1d_is_conv2d_on_a_height_of_one() -> None:
    """Conv1d (stride, padding, dilation, groups) equals section 25's Conv2d
    on (N, C, 1, L) read with NumPy, bit for bit, forward and backward."""
    x, w, b = _rand((3, 4, 13), 5), _rand((6, 2, 3), 6, 2.0), _rand((6,), 7, 2.0)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = conv1d(xr, wr, br, 2, 1, 2, 2)
    g = _rand(tuple(y.shape), 8)
    gx, gw, gb = torch.autograd.grad(y, [xr, wr, br], g)
    want = _np_conv2d(x.numpy()[:, :, None], w.numpy()[:, :, None], b.numpy(),
                      g.numpy()[:, :, None], (1, 2), (0, 1), (1, 2), 2)
    for got, ref in zip((y.detach(), gx, gw, gb), (want[0][:, :, 0], want[1][:, :, 0],
                                                   want[2][:, :, 0], want[3])):
        assert got.shape == ref.shape and (f32_bits(got) == f32_bits(ref)).all()


def test_section_14_conv2d_is_its_special_case() -> None:
    """One stride and padding, no dilation, one group: the same bits as
    section 14's conv2d (pipeline.exact.conv2d), forward and backward."""
    x, w, b = _rand((2, 3, 9, 9), 9), _rand((5, 3, 3, 3), 10, 2.0), _rand((5,), 11)
    outs = []
    for f in (lambda *a: conv2d(*a, 2, 1), lambda *a: section14_conv2d(*a, 2, 1)):
        ts = [t.clone().requires_grad_() for t in (x, w, b)]
        y = f(*ts)
        outs.append([f32_bits(t) for t in (y.detach(), *torch.autograd.grad(y, ts, y.detach()))])
    assert all((a == b).all() for a, b in zip(*outs))


def test_conv_reading_can_fail() -> None:
    """Control: the groups' columns interleaved wrongly (the weight of group
    0 used for group 1) or the fold output by output give other bits."""
    x, w = _rand((2, 4, 6, 6), 12), _rand((4, 2, 3, 3), 13, 2.0)
    y = conv2d(x, w, None, 1, 1, 1, 2)
    swapped = torch.cat([w[2:], w[:2]])
    assert not torch.equal(y, conv2d(x, swapped, None, 1, 1, 1, 2))
    gcols = _rand((2 * 6 * 6, 4 * 9), 14).numpy()
    g6 = gcols.reshape(2, 6, 6, 4, 3, 3)
    by_offset = np.zeros((2, 8, 8, 4), F32)
    for i in range(3):
        for j in range(3):
            by_offset[:, i:i + 6, j:j + 6] += g6[..., i, j]
    by_out = np.zeros_like(by_offset)
    for a in range(6):
        for b in range(6):
            by_out[:, a:a + 3, b:b + 3] += g6[:, a, b].transpose(0, 2, 3, 1)
    assert (f32_bits(by_out) != f32_bits(by_offset)).any()


def test_conv_matches_float64_at_least_as_well_as_stock() -> None:
    """Against float64 torch: the worst normwise error of the output and the
    three gradients at most stock fp32's (with a 2x margin and a floor of
    2e-7), for a strided, a grouped/dilated and a depthwise convolution and
    a Conv1d."""
    cases = [(nn.Conv2d(8, 16, 3, stride=(2, 1), padding=(1, 2)), (4, 8, 12, 10)),
             (nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=4), (4, 8, 9, 9)),
             (nn.Conv2d(16, 16, 3, padding=1, groups=16), (4, 16, 8, 8)),
             (nn.Conv1d(6, 12, 5, stride=2, padding=2), (4, 6, 40))]
    for i, (stock, shape) in enumerate(cases):
        ours, ref = from_torch(stock), type(stock)(**_kwargs(stock)).double()
        ref.load_state_dict(stock.state_dict())
        x = _rand(shape, 20 + i, 2.0)
        res = []
        for m, dt in ((stock, torch.float32), (ours, torch.float32), (ref, torch.float64)):
            xi = x.to(dt).requires_grad_()
            y = m(xi)
            gs = torch.autograd.grad(y, [xi, m.weight, m.bias], y.detach().to(dt))
            res.append([t.detach().double() for t in (y, *gs)])
        err = [max(float((a - r).norm() / r.norm()) for a, r in zip(res[j], res[2]))
               for j in (0, 1)]
        assert err[1] <= max(2 * err[0], 2e-7), (type(stock).__name__, err)


def _kwargs(m: nn.Module) -> dict[str, object]:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels,
                kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, groups=m.groups)


def test_guard_routes_conv_and_from_torch_converts_it() -> None:
    """F.conv2d, torch.conv2d and F.conv1d under the guard are the exact
    functions (same bits, accepted graph; control: stock's graph refused);
    nn.Conv1d/nn.Conv2d with tuples, groups, dilation and "same" padding
    convert with their parameters; padding_mode other than zeros and an
    uneven "same" are refused."""
    x = _rand((2, 4, 8, 8), 30)
    w, w1 = _rand((6, 2, 3, 3), 31), _rand((6, 4, 3), 32)
    x1 = _rand((2, 4, 10), 33)
    for f, ours, inp in (
            (lambda t: F.conv2d(t, w, None, (2, 1), 1, 1, 2), lambda t: conv2d(t, w, None, (2, 1),
                                                                                1, 1, 2), x),
            (lambda t: torch.conv2d(t, w, None, 1, 0, 2, 2), lambda t: conv2d(t, w, None, 1, 0,
                                                                              2, 2), x),
            (lambda t: F.conv1d(t, w1, None, 1, "same"), lambda t: conv1d(t, w1, None, 1, 1), x1)):
        xr = inp.clone().requires_grad_()
        with Guard():
            y = f(xr)
        assert check_graph(y) == [] and torch.equal(y.detach(), ours(inp))
        assert check_graph(f(inp.clone().requires_grad_())) != []
    stock = nn.Sequential(nn.Conv2d(4, 8, (3, 1), stride=(1, 2), padding=(1, 0), groups=2),
                          nn.Conv2d(8, 8, 3, padding="same", groups=8, bias=False),
                          nn.Flatten(2), nn.Conv1d(8, 4, 3, dilation=2))
    net = from_torch(stock)
    assert [type(m) for m in net] == [Conv2d, Conv2d, nn.Flatten, Conv1d]
    assert (net(x) - stock(x)).abs().max() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), stock.parameters()))
    with pytest.raises(ConfigError) as e:
        from_torch(nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                                 nn.Conv2d(4, 4, 2, padding="same")))
    assert "0 (torch.nn.modules.conv.Conv2d): padding_mode 'reflect'" in str(e.value)
    assert "1 (torch.nn.modules.conv.Conv2d): padding='same' pads unevenly" in str(e.value)
    with pytest.raises(RuntimeError, match="groups=3"):
        conv2d(x, w, None, 1, 0, 1, 3)


def test_conv_does_not_depend_on_the_thread_count() -> None:
    """Grouped, strided and dilated: the same bits at 1 and 2 threads."""
    x, w = _rand((8, 32, 20, 20), 40), _rand((32, 8, 3, 3), 41, 2.0)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
            y = conv2d(xr, wr, None, (2, 1), (2, 1), (2, 1), 4)
            outs.append([f32_bits(t) for t in (y.detach(), *torch.autograd.grad(
                y, [xr, wr], y.detach()))])
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))
