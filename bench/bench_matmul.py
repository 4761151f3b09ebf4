"""Accuracy of the exact products against fp64, beside stock fp32 (torch.mm):
the one-slice product of the spec's MLP/CNN (xmm, spec section 4), the
blocked two-slice product of the layers (xmmb, section 12) and the
multi-slice product pipeline.exact.matmul, on the inputs of issue 22's table
(normal; an outlier channel: a column of A 2^10 or 2^20 times the rest with
the matching row of B as much smaller; one entry per row 2^30 times the
rest; x and -x + tiny in one 64-block). Prints a table; the target is a
normwise relative error <= 2x fp32's for K >= 17 (xmmb and matmul), and no
entry that fp32 keeps non-zero is zero ("zeroed").

    .venv/bin/python bench/bench_matmul.py [--m 16] [--n 16]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline.exact import matmul, xmm, xmmb  # noqa: E402
from pipeline.exact.matmul import slices_for  # noqa: E402


def _err(c: torch.Tensor, ref: torch.Tensor) -> float:
    return float((c.double() - ref).norm() / ref.norm())


def _timed(fn, *args):  # type: ignore[no-untyped-def]
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


INPUTS = ("normal", "outlier channel 2^10", "outlier channel 2^20", "one 2^30x per row",
          "x, -x + tiny")


def operands(name: str, m: int, k: int, n: int,
             g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``a (m, k)``, ``b (k, n)`` for one row of the table."""
    a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
    if name.startswith("outlier channel"):
        f = 2.0 ** int(name.rsplit("^", 1)[1])
        a[:, k // 2] *= f
        b[k // 2] /= f
    elif name == "one 2^30x per row":
        a[torch.arange(m), torch.randint(0, k, (m,), generator=g)] *= 2.0 ** 30
    elif name == "x, -x + tiny":
        a[:, 1] = -a[:, 0] + a[:, 0] * 2.0 ** -12    # exact in f32
        b[1] = b[0]
    return a, b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--ks", default="17,64,1000,4097,65536")
    args = ap.parse_args()
    print(f"normwise relative error vs fp64, M={args.m}, N={args.n}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'K':>6} {'inputs':22} {'fp32':>9} {'xmm':>9} {'xmmb':>9} {'matmul':>9} "
          f"{'slices':>6} {'xmmb/fp32':>9} {'matmul/fp32':>11} {'zeroed':>6} "
          f"{'ms xmmb':>8} {'ms fp32':>8}")
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for k in (int(v) for v in args.ks.split(",")):
        for name in INPUTS if k > 1 else INPUTS[:-1]:  # x, -x + tiny needs two entries
            a, b = operands(name, args.m, k, args.n, g)
            ref = a.double() @ b.double()
            c32, t32 = _timed(torch.mm, a, b)
            cb, tb = _timed(xmmb, a, b)
            e32, ex, em = _err(c32, ref), _err(xmm(a, b), ref), _err(matmul(a, b), ref)
            e2 = _err(cb, ref)
            zeroed = int(((cb == 0) & (c32 != 0)).sum())
            worst = max(worst, e2 / e32)
            print(f"{k:6} {name:22} {e32:9.2e} {ex:9.2e} {e2:9.2e} {em:9.2e} "
                  f"{slices_for(a, b):6} {e2 / e32:9.3f} {em / e32:11.3f} {zeroed:6} "
                  f"{1e3 * tb:8.2f} {1e3 * t32:8.2f}")
    print(f"worst xmmb/fp32: {worst:.3f}; target <= 2 from K = 17 (<= 3 below), zeroed 0")


if __name__ == "__main__":
    main()
