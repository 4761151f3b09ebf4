"""Exact pooling (pipeline/exact/pooling.py; docs/exact-spec.md section 23):
MaxPool2d, AvgPool2d and AdaptiveAvgPool2d against float64 autograd,
against the spec read with NumPy loops (the twin's tree) bit for bit, ties
as torch breaks them, the guard's routes and from_torch, and the thread
count."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.errors import ConfigError
from pipeline.exact import (
    AdaptiveAvgPool2d,
    AvgPool2d,
    Guard,
    MaxPool2d,
    adaptive_avg_pool2d,
    avg_pool2d,
    check_graph,
    from_torch,
    max_pool2d,
)

from ..support import f32_bits
from ..twin import numpy_twin as tw

F32 = np.float32
Pair = tuple[int, int]


def _rand(shape: tuple[int, ...], seed: int, spread: float = 10.0) -> torch.Tensor:
    g = np.random.default_rng(seed)
    x = g.standard_normal(shape) * np.exp2(g.uniform(-spread, spread, shape))
    return torch.from_numpy(np.asarray(x, dtype=F32))


def _grad(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
          seed: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    y = f(xr)
    g = _rand(tuple(y.shape), seed, 4.0)
    return y.detach(), torch.autograd.grad(y, xr, g)[0], g


def _np_pool(x: np.ndarray, g: np.ndarray, k: Pair, s: Pair, p: Pair, kind: str,
             div: object = None) -> tuple[np.ndarray, np.ndarray]:
    """Section 23 with NumPy loops: windows, max/first argmax or the tree
    and a division, then the fold in (i, j) order. Returns (y, gx)."""
    n, c, h, w = x.shape
    fill = -np.inf if kind == "max" else 0.0
    xp = np.full((n, c, h + 2 * p[0], w + 2 * p[1]), fill, F32)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = x
    ho, wo = (h + 2 * p[0] - k[0]) // s[0] + 1, (w + 2 * p[1] - k[1]) // s[1] + 1
    y = np.zeros((n, c, ho, wo), F32)
    share = np.zeros((n, c, ho, wo, k[0], k[1]), F32)
    for a in range(ho):
        for b in range(wo):
            win = xp[:, :, a * s[0]:a * s[0] + k[0], b * s[1]:b * s[1] + k[1]].reshape(n, c, -1)
            if kind == "max":
                y[:, :, a, b] = win.max(-1)
                first = (win == y[:, :, a, b][..., None]).argmax(-1)
                for ij in range(k[0] * k[1]):
                    share[:, :, a, b, ij // k[1], ij % k[1]] = np.where(
                        first == ij, g[:, :, a, b], F32(0))
            else:
                d = div[a, b] if isinstance(div, np.ndarray) else div
                y[:, :, a, b] = tw.tree_sum(win, 2) / F32(d)
                share[:, :, a, b] = (g[:, :, a, b] / F32(d))[..., None, None]
    gp = np.zeros((n, c, h + 2 * p[0], w + 2 * p[1]), F32)
    for i in range(k[0]):
        for j in range(k[1]):
            gp[:, :, i:i + s[0] * (ho - 1) + 1:s[0], j:j + s[1] * (wo - 1) + 1:s[1]] += \
                share[..., i, j]
    return y, gp[:, :, p[0]:p[0] + h, p[1]:p[1] + w]


GEOMS = [((2, 2), (2, 2), (0, 0)), ((3, 3), (2, 2), (1, 1)), ((3, 2), (1, 2), (1, 0)),
         ((3, 3), (1, 1), (1, 1))]


@pytest.mark.parametrize("k,s,p", GEOMS, ids=["2x2", "3x3s2p1", "3x2s12p10", "3x3s1p1"])
def test_max_pool_is_the_spec_bit_for_bit(k: Pair, s: Pair, p: Pair) -> None:
    """Forward and backward of max pooling equal section 23 with NumPy loops,
    bit for bit, also with overlapping windows (stride below the kernel,
    where one input collects several gradients) and repeated values (ties)."""
    x = _rand((2, 3, 9, 11), 1)
    x[0, 0, :4, :4] = 1.5                          # ties inside windows
    y, gx, g = _grad(lambda t: max_pool2d(t, k, s, p), x)
    wy, wg = _np_pool(x.numpy(), g.numpy(), k, s, p, "max")
    assert (f32_bits(y) == f32_bits(wy)).all() and (f32_bits(gx) == f32_bits(wg)).all()


@pytest.mark.parametrize("include", [True, False, 5], ids=["with-pad", "without-pad", "div5"])
@pytest.mark.parametrize("k,s,p", GEOMS[:3], ids=["2x2", "3x3s2p1", "3x2s12p10"])
def test_avg_pool_is_the_spec_bit_for_bit(k: Pair, s: Pair, p: Pair, include: bool | int) -> None:
    """Average pooling: the tree over each window divided by KH * KW, by the
    count inside the input, or by divisor_override, and the fold of the
    shares, bit for bit with NumPy loops."""
    x = _rand((2, 3, 9, 11), 2)
    override = include if include not in (True, False) else None
    cip = include is not False
    y, gx, g = _grad(lambda t: avg_pool2d(t, k, s, p, cip, override), x)
    if override is not None:
        div: object = override
    elif cip:
        div = k[0] * k[1]
    else:
        ho, wo = y.shape[2:]
        div = np.array([[(min(a * s[0] - p[0] + k[0], 9) - max(a * s[0] - p[0], 0))
                         * (min(b * s[1] - p[1] + k[1], 11) - max(b * s[1] - p[1], 0))
                         for b in range(wo)] for a in range(ho)])
    wy, wg = _np_pool(x.numpy(), g.numpy(), k, s, p, "avg", div)
    assert (f32_bits(y) == f32_bits(wy)).all() and (f32_bits(gx) == f32_bits(wg)).all()


@pytest.mark.parametrize("out", [(1, 1), (4, 3), (None, 5), (9, 11)], ids=str)
def test_adaptive_avg_pool_is_the_spec_bit_for_bit(out: tuple[int | None, int]) -> None:
    """Adaptive average pooling over torch's windows [floor(a H / Ho),
    ceil((a + 1) H / Ho)): the tree over each window in C order divided by
    its size; the backward adds the shares output by output in C order
    (windows overlap for 9 -> 4 and 11 -> 3), bit for bit."""
    x = _rand((2, 3, 9, 11), 3)
    y, gx, g = _grad(lambda t: adaptive_avg_pool2d(t, out), x)
    ho, wo = (9 if out[0] is None else out[0]), out[1]
    xs, gs = x.numpy(), g.numpy()
    wy = np.zeros((2, 3, ho, wo), F32)
    wg = np.zeros_like(xs)
    for a in range(ho):
        h0, h1 = (a * 9) // ho, math.ceil((a + 1) * 9 / ho)
        for b in range(wo):
            w0, w1 = (b * 11) // wo, math.ceil((b + 1) * 11 / wo)
            cnt = F32((h1 - h0) * (w1 - w0))
            wy[:, :, a, b] = tw.tree_sum(xs[:, :, h0:h1, w0:w1].reshape(2, 3, -1), 2) / cnt
            wg[:, :, h0:h1, w0:w1] += (gs[:, :, a, b] / cnt)[:, :, None, None]
    assert (f32_bits(y) == f32_bits(wy)).all() and (f32_bits(gx) == f32_bits(wg)).all()


def test_pooling_reading_can_fail() -> None:
    """Control: the window summed left to right, or the overlapping
    gradients added output by output instead of offset by offset, give
    other bits on the same input."""
    x = _rand((2, 3, 9, 11), 4)
    y, gx, g = _grad(lambda t: avg_pool2d(t, 3, 1, 1), x)
    xp = np.pad(x.numpy(), ((0, 0), (0, 0), (1, 1), (1, 1)))
    seq = np.zeros(y.shape, F32)
    for i in range(3):
        for j in range(3):
            seq = seq + xp[:, :, i:i + 9, j:j + 11]
    assert (f32_bits(seq / F32(9)) != f32_bits(y)).any()
    share = g.numpy() / F32(9)
    by_out = np.zeros(xp.shape, F32)
    for a in range(9):
        for b in range(11):
            by_out[:, :, a:a + 3, b:b + 3] += share[:, :, a, b][..., None, None]
    assert (f32_bits(by_out[:, :, 1:10, 1:12]) != f32_bits(gx)).any()


def test_pooling_matches_float64_and_breaks_ties_as_torch() -> None:
    """Each pooling within 2e-7 of float64 torch (relative to the largest
    entry), forward and backward; on ties max pooling passes the gradient
    to the same input torch does."""
    x = _rand((2, 3, 10, 10), 5, 0.0)
    cases = [(lambda t: max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1)),
             (lambda t: avg_pool2d(t, 3, 2, 1, False), lambda t: F.avg_pool2d(
                 t, 3, 2, 1, count_include_pad=False)),
             (lambda t: adaptive_avg_pool2d(t, (3, 4)), lambda t: F.adaptive_avg_pool2d(t, (3, 4)))]
    for ours, ref in cases:
        y, gx, g = _grad(ours, x)
        x64 = x.double().requires_grad_()
        y64 = ref(x64)
        (g64,) = torch.autograd.grad(y64, x64, g.double())
        assert (y.double() - y64.detach()).abs().max() <= 2e-7 * y64.detach().abs().max()
        assert (gx.double() - g64).abs().max() <= 2e-7 * g64.abs().max()
    ties = torch.zeros(1, 1, 4, 4)
    ties[0, 0, :2, :2] = 1.0
    ties[0, 0, 2:, 2:] = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    _, gx, g = _grad(lambda t: max_pool2d(t, 2), ties)
    _, gs, _ = _grad(lambda t: F.max_pool2d(t, 2), ties)
    assert torch.equal(gx, gs)


def test_guard_routes_pooling_and_from_torch_converts_it() -> None:
    """F.max_pool2d, torch.max_pool2d, F.avg_pool2d and F.adaptive_avg_pool2d
    under the guard are the exact functions (same bits, accepted graph);
    the nn modules convert; options exact mode lacks are refused."""
    x = _rand((2, 3, 8, 8), 6)
    for f, ours in ((lambda t: F.max_pool2d(t, 2), lambda t: max_pool2d(t, 2)),
                    (lambda t: torch.max_pool2d(t, 3, 2, 1), lambda t: max_pool2d(t, 3, 2, 1)),
                    (lambda t: F.avg_pool2d(t, 3, 1, 1, count_include_pad=False),
                     lambda t: avg_pool2d(t, 3, 1, 1, False)),
                    (lambda t: F.adaptive_avg_pool2d(t, 3), lambda t: adaptive_avg_pool2d(t, 3))):
        xr = x.clone().requires_grad_()
        with Guard():
            y = f(xr)
        assert check_graph(y) == []
        assert (f32_bits(y.detach()) == f32_bits(ours(x))).all()
        assert check_graph(f(x.clone().requires_grad_())) != []  # control: stock's graph
    net = from_torch(nn.Sequential(nn.MaxPool2d(2), nn.AvgPool2d(3, 1, 1), nn.AdaptiveAvgPool2d(1)))
    assert [type(m) for m in net] == [MaxPool2d, AvgPool2d, AdaptiveAvgPool2d]
    with pytest.raises(ConfigError) as e:
        from_torch(nn.Sequential(nn.MaxPool2d(2, dilation=2), nn.AvgPool2d(2, ceil_mode=True)))
    assert "0 (torch.nn.modules.pooling.MaxPool2d): dilation" in str(e.value)
    assert "1 (torch.nn.modules.pooling.AvgPool2d): ceil_mode" in str(e.value)
    with pytest.raises(ValueError, match="ceil_mode"), Guard():
        F.max_pool2d(x, 2, ceil_mode=True)
    with pytest.raises(ValueError, match="padding <= kernel / 2"):
        max_pool2d(x, 2, 1, 2)


def test_pooling_does_not_depend_on_the_thread_count() -> None:
    """Above ATen's grain size, forward and backward: the same bits at 1 and
    2 threads."""
    x = _rand((8, 16, 32, 32), 7)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            res = []
            for f in (lambda t: max_pool2d(t, 3, 2, 1), lambda t: avg_pool2d(t, 2),
                      lambda t: adaptive_avg_pool2d(t, (5, 5))):
                y, gx, _ = _grad(f, x)
                res += [f32_bits(y), f32_bits(gx)]
            outs.append(res)
    finally:
        torch.set_num_threads(before)
    assert all((a == b).all() for a, b in zip(*outs))
