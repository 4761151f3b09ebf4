"""Whether a device computes what exact mode's spec assumes, checked on the
device before exact mode trains there (docs/exact-spec.md, notation and
section 12).

The layers' products are float64 GEMMs on integer-valued operands (the
quantised blocks): the spec needs them exact, which IEEE-754 float64
guarantees for every sum below 2^53, in any order. A device or library that
emulates float64 (CUDA 13's cuBLAS may, on GPUs with few FP64 units), rounds
partial sums to a narrower type (TF32, split-K in float32) or fuses them
differently loses low bits of such sums; the probe multiplies integer
operands with known exact results at sizes and magnitudes that show each of
these. The elementwise operations the spec builds on (float32 and float64
add, multiply and divide, correctly rounded; subnormals produced and read;
float64 to float32 rounding to nearest even; no fused multiply-add) are
checked on cases whose correct results are known in bits.

``device_problem(device)`` is None, or the operation that failed: exact mode
refuses the device then (exit 4), never trains on it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["device_problem", "gemm_problem", "elementwise_problem"]

Gemm = Callable[[Tensor, Tensor], Tensor]

# (m, k, n, bound): integer operands in [-bound, bound], so every sum of k
# products stays below 2^53: exact in float64 whatever the order.
_GEMMS = (
    (4, 2, 4, 1 << 26),        # one product of 2^52: all 53 bits of each result
    (8, 64, 8, 1 << 23),       # an exact-mode block (64 long) near the top of the range
    (3, 4096, 5, 1 << 20),     # long sums: split-K and reduction trees
    (2, 16384, 2, 1 << 18),    # longer: a narrower accumulator would round
    (64, 64, 64, 1 << 20),     # a square block, as the layers' batched GEMMs use
)


def _operands(m: int, k: int, n: int, bound: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return (g.integers(-bound, bound + 1, (m, k), dtype=np.int64),
            g.integers(-bound, bound + 1, (k, n), dtype=np.int64))


def gemm_problem(device: torch.device, gemm: Gemm = torch.matmul) -> str | None:
    """None if ``gemm`` of float64 integer operands on ``device`` gives their
    exact integer products (NumPy int64 arithmetic is the reference), also
    batched; else which size differed and by how much."""
    for i, (m, k, n, bound) in enumerate(_GEMMS):
        a, b = _operands(m, k, n, bound, 20261207 + i)
        want = a @ b  # int64: exact, every |sum| < 2^53
        ta = torch.from_numpy(a.astype(np.float64)).to(device)
        tb = torch.from_numpy(b.astype(np.float64)).to(device)
        for batched in (False, True):
            got = gemm(ta[None].expand(2, m, k), tb[None].expand(2, k, n))[1] if batched \
                else gemm(ta, tb)
            found = got.cpu().numpy()
            if not np.array_equal(found, want.astype(np.float64)):
                worst = float(np.max(np.abs(found - want.astype(np.float64))))
                return (f"float64 {'batched ' if batched else ''}matrix product of integer "
                        f"operands ({m}x{k} by {k}x{n}, entries up to 2^{bound.bit_length() - 1})"
                        f" is not exact: off by up to {worst:g} (emulated float64, or sums "
                        f"rounded to a narrower type)")
    return None


def _bits(t: Tensor) -> list[int]:
    view = torch.int32 if t.dtype == torch.float32 else torch.int64
    return [int(v) for v in t.cpu().view(view).tolist()]


def _f32(*bits: int) -> Tensor:
    return torch.tensor(list(bits), dtype=torch.int32).view(torch.float32)


def _f64(*bits: int) -> Tensor:
    return torch.tensor(list(bits), dtype=torch.int64).view(torch.float64)


def elementwise_problem(device: torch.device) -> str | None:
    """None if float32/float64 add, multiply and divide round correctly to
    nearest even, subnormals are produced and read, float64 -> float32
    rounds to nearest even and ``a * b + c`` is not fused, on ``device``;
    else the operation that failed. Operands and results are built and
    compared as bits (a float conversion on the host could hide a flush)."""
    one, eps = 0x3F800000, 0x33800000            # 1.0f, 2^-24 (half an ulp of 1)
    cases: list[tuple[str, Tensor, list[int]]] = []
    x = _f32(one, one + 1).to(device)
    cases.append(("float32 addition (round half to even)", x + _f32(eps, eps).to(device),
                  [one, one + 2]))
    cases.append(("float32 multiplication producing a subnormal (flush-to-zero?)",
                  _f32(0x0D800000).to(device) * _f32(0x2B800000).to(device), [0x00000200]))
    cases.append(("float32 multiplication reading a subnormal (denormals-are-zero?)",
                  _f32(one).to(device) * _f32(0x00000200).to(device), [0x00000200]))
    cases.append(("float32 division (correctly rounded)",
                  _f32(one).to(device) / _f32(0x40400000).to(device), [0x3EAAAAAB]))  # 1/3
    cases.append(("float64 addition (round half to even)",
                  _f64(0x3FF0000000000001).to(device) + _f64(0x3CA0000000000000).to(device),
                  [0x3FF0000000000002]))      # (1 + 2^-52) + 2^-53: a tie, to even
    cases.append(("float64 to float32 rounding (to nearest even)",
                  _f64(0x3FF0000010000000).to(device).to(torch.float32), [0x3F800000]))
    # (1 + 2^-23)(1 + 2^-22) - 1: the product 1 + 3 2^-23 + 2^-45 rounds to
    # 1 + 3 2^-23 first (so 3 2^-23); fused into one rounding it would keep 2^-45.
    a, b = _f32(0x3F800001).to(device), _f32(0x3F800002).to(device)
    c = _f32(0xBF800000 - (1 << 32)).to(device)                                  # -1
    cases.append(("float32 a * b + c (fused into one rounding)", a * b + c, [0x34C00000]))
    for what, got, want in cases:
        if _bits(got) != want:
            return f"{what}: expected bits {[hex(w) for w in want]}, found " \
                   f"{[hex(g & 0xFFFFFFFFFFFFFFFF) for g in _bits(got)]}"
    return None


def device_problem(device: torch.device, gemm: Gemm = torch.matmul) -> str | None:
    """The first operation ``device`` does not compute as exact mode assumes,
    or None."""
    return gemm_problem(device, gemm) or elementwise_problem(device)
