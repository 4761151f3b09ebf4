"""Accuracy of the exact products against fp64, beside stock fp32 (torch.mm):
the one-slice product of the spec's MLP/CNN (xmm, spec section 4), the
blocked product of the layers (xmmb, section 12) and the multi-slice
product pipeline.exact.matmul. Prints a table; the target is a normwise
relative error <= 2x fp32's (matmul, and xmmb up to one entry 2^20x per row).

    .venv/bin/python bench/bench_matmul.py [--m 32] [--n 32]
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32)
    ap.add_argument("--n", type=int, default=32)
    args = ap.parse_args()
    print(f"normwise relative error vs fp64, M={args.m}, N={args.n}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'K':>6} {'inputs':22} {'fp32':>9} {'xmm':>9} {'xmmb':>9} {'matmul':>9} "
          f"{'slices':>6} {'xmmb/fp32':>9} {'matmul/fp32':>11} {'ms matmul':>9} {'ms fp32':>8}")
    g = torch.Generator().manual_seed(0)
    for k in (64, 128, 512, 4096, 65536):
        for name, factor in (("normal", 1.0), ("one 1e6x per row", 1e6), ("one 2^20x per row",
                                                                            2.0**20),
                             ("one 2^30x per row", 2.0**30)):
            a, b = torch.randn(args.m, k, generator=g), torch.randn(k, args.n, generator=g)
            a[:, 0] *= factor
            ref = a.double() @ b.double()
            c32, t32 = _timed(torch.mm, a, b)
            cm, tm = _timed(matmul, a, b)
            e32, ex, em = _err(c32, ref), _err(xmm(a, b), ref), _err(cm, ref)
            e2 = _err(xmmb(a, b), ref)
            print(f"{k:6} {name:22} {e32:9.2e} {ex:9.2e} {e2:9.2e} {em:9.2e} "
                  f"{slices_for(a, b):6} {e2 / e32:9.3f} {em / e32:11.3f} {1e3 * tm:9.2f} "
                  f"{1e3 * t32:8.2f}")
    print("target: matmul / fp32 <= 2 (error); xmmb / fp32 <= 2 (up to one 2^20x entry per row)")


if __name__ == "__main__":
    main()
