"""Exact mode's functions of docs/exact-spec.md sections 20-23 vs stock
PyTorch, op by op: one forward + backward, median time (exact / stock) at
each thread count, and the largest error vs float64 torch (relative to the
largest entry of the reference; forward and input gradient) for exact and
for stock float32. Prints a table. Not a test.

    .venv/bin/python bench/bench_exact_ops.py [--threads 1,2] [--repeats 7] [--rows 4096]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.exact as X  # noqa: E402

Fn = Callable[[torch.Tensor], torch.Tensor]


def _cases(rows: int) -> list[tuple[str, tuple[int, ...], Fn, Fn]]:
    """(name, input shape, exact, stock): the stock function also serves as
    the float64 reference (on a float64 input)."""
    w = torch.from_numpy(np.random.default_rng(9).uniform(0.5, 1.5, 256).astype(np.float32))
    img = (rows // 64, 16, 32, 32)
    return [
        ("silu", (rows, 256), X.silu, F.silu),
        ("sigmoid", (rows, 256), X.sigmoid, torch.sigmoid),
        ("tanh", (rows, 256), X.tanh, torch.tanh),
        ("softmax(-1)", (rows, 256), lambda t: X.softmax(t, -1), lambda t: torch.softmax(t, -1)),
        ("softmax(0)", (rows, 256), lambda t: X.softmax(t, 0), lambda t: torch.softmax(t, 0)),
        ("log_softmax(-1)", (rows, 256), lambda t: X.log_softmax(t, -1),
         lambda t: torch.log_softmax(t, -1)),
        ("sum(-1)", (rows, 256), lambda t: X.xsum(t, -1), lambda t: t.sum(-1)),
        ("sum(0)", (rows, 256), lambda t: X.xsum(t, 0), lambda t: t.sum(0)),
        ("mean()", (rows, 256), X.xmean, lambda t: t.mean()),
        ("rms_norm", (rows, 256), lambda t: X.rms_norm(t, (256,), w.to(t.dtype), 1e-6),
         lambda t: F.rms_norm(t, (256,), w.to(t.dtype), 1e-6)),
        ("max_pool2d(3,2,1)", img, lambda t: X.max_pool2d(t, 3, 2, 1),
         lambda t: F.max_pool2d(t, 3, 2, 1)),
        ("avg_pool2d(2)", img, lambda t: X.avg_pool2d(t, 2), lambda t: F.avg_pool2d(t, 2)),
        ("adaptive_avg(1)", img, lambda t: X.adaptive_avg_pool2d(t, 1),
         lambda t: F.adaptive_avg_pool2d(t, 1)),
    ]


def _step(f: Fn, x: torch.Tensor, g: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    xr = x.clone().requires_grad_()
    y = f(xr)
    if g is None:
        g = torch.ones_like(y)
    return y.detach(), torch.autograd.grad(y, xr, g)[0]


def _time(f: Fn, x: torch.Tensor, g: torch.Tensor, repeats: int) -> float:
    _step(f, x, g)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _step(f, x, g)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _err(a: torch.Tensor, r: torch.Tensor) -> float:
    return float((a.double() - r).abs().max() / max(float(r.abs().max()), 1e-300))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--rows", type=int, default=4096)
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    gen = np.random.default_rng(0)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"exact kernels: {'on' if X.native.kernels('tree') is not None else 'off'}")
    head = ["op", "shape", "err exact y", "err stock y", "err exact gx", "err stock gx"]
    head += [f"{t}t exact ms" for t in threads] + [f"{t}t x stock" for t in threads]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    before = torch.get_num_threads()
    for name, shape, exact, stock in _cases(args.rows):
        x = torch.from_numpy((gen.standard_normal(shape) * 3).astype(np.float32))
        y, _ = _step(exact, x, None)
        g = torch.from_numpy(gen.standard_normal(tuple(y.shape)).astype(np.float32))
        ye, ge = _step(exact, x, g)
        ys, gs = _step(stock, x, g)
        y64, g64 = _step(stock, x.double(), g.double())
        row = [name, "x".join(map(str, shape)), *(f"{e:.1e}" for e in (
            _err(ye, y64), _err(ys, y64), _err(ge, g64), _err(gs, g64)))]
        times, ratios = [], []
        for t in threads:
            torch.set_num_threads(t)
            te, ts = _time(exact, x, g, args.repeats), _time(stock, x, g, args.repeats)
            times.append(f"{te * 1e3:.2f}")
            ratios.append(f"{te / ts:.1f}")
        torch.set_num_threads(before)
        print("| " + " | ".join(row + times + ratios) + " |")


if __name__ == "__main__":
    main()
