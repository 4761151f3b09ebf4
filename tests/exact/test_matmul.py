"""Tests for pipeline/exact/matmul.py: the multi-slice (Ozaki) exact product
is at least as accurate as stock fp32, keeps what one slice loses, and its
bits do not depend on the thread count or on how the GEMM is blocked."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from pipeline.exact import matmul, xmm
from pipeline.exact.matmul import slices_for


def _err(c: torch.Tensor, ref: torch.Tensor) -> float:
    return float((c.double() - ref).norm() / ref.norm())


def _operands(k: int, outlier: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(32, k, generator=g), torch.randn(k, 32, generator=g)
    a[:, 0] *= outlier  # one entry per row `outlier` times the rest
    return a, b


@pytest.mark.parametrize("k", [1024, 65536])
@pytest.mark.parametrize("outlier", [1.0, 2.0**20])
def test_at_least_as_accurate_as_fp32(k: int, outlier: float) -> None:
    """Normwise relative error against fp64 at most 2x stock fp32's (torch.mm),
    for K up to 65536 and rows with one element 2^20 times the rest; the
    one-slice product (xmm) is the control that misses this."""
    a, b = _operands(k, outlier, seed=k)
    ref = a.double() @ b.double()
    fp32 = _err(a @ b, ref)
    assert _err(matmul(a, b), ref) <= 2 * fp32
    if k == 65536:
        assert _err(xmm(a, b), ref) > 2 * fp32


def test_nothing_fp32_keeps_is_lost_next_to_a_huge_entry() -> None:
    """A row with one entry 2^30 times the rest, whose partner in B is zero:
    the product is the rest's dot product. fp32 keeps it; one slice rounds the
    rest of the row to zero (the control); the sliced product keeps it."""
    a, b = _operands(256, 2.0**30, seed=1)
    b[0, :] = 0.0
    ref = a.double() @ b.double()
    assert _err(a @ b, ref) < 1e-5
    assert torch.count_nonzero(xmm(a, b)) == 0
    assert _err(matmul(a, b), ref) <= 2 * _err(a @ b, ref)


def test_bits_do_not_depend_on_threads_or_blocking() -> None:
    """1 and 2 threads, and the product computed in two halves of rows, give
    the same bits."""
    a, b = _operands(4096, 2.0**10, seed=3)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = matmul(a, b)
        torch.set_num_threads(2)
        two = matmul(a, b)
    finally:
        torch.set_num_threads(before)
    n = slices_for(a, b)
    halves = torch.cat([matmul(a[:16], b, n), matmul(a[16:], b, n)])
    assert torch.equal(one.view(torch.int32), two.view(torch.int32))
    assert torch.equal(one.view(torch.int32), halves.view(torch.int32))


def test_small_products_are_correctly_rounded() -> None:
    """Where the slices hold every bit (few terms, moderate range), the result
    is the exact rational dot product rounded to f64, then to f32 (the same
    two roundings as the f64 accumulation and the final conversion)."""
    g = np.random.default_rng(5)
    a = torch.from_numpy(g.standard_normal((6, 7)).astype(np.float32))
    b = torch.from_numpy(g.standard_normal((7, 5)).astype(np.float32))
    got = matmul(a, b, slices=4)
    for i in range(6):
        for j in range(5):
            exact = sum(Fraction(float(a[i, t])) * Fraction(float(b[t, j])) for t in range(7))
            assert got[i, j].item() == float(np.float32(float(exact)))


def test_bad_operands_are_refused() -> None:
    with pytest.raises(ValueError, match="float32"):
        matmul(torch.ones(2, 2, dtype=torch.float64), torch.ones(2, 2))
    with pytest.raises(ValueError, match="slices"):
        matmul(torch.ones(2, 2), torch.ones(2, 2), slices=0)
    assert torch.equal(matmul(torch.ones(2, 0), torch.ones(0, 3)), torch.zeros(2, 3))
