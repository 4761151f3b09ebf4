"""Exact mode's functions of docs/exact-spec.md sections 24-25 (BatchNorm,
var, Conv1d and the general Conv2d) vs stock PyTorch, op by op, at the
ResNet example's shapes (examples/resnet: shards of 16 rows of 8x8 digits)
and at a larger batch: one forward + backward, median time (exact / stock)
at each thread count, and the largest error vs float64 torch (relative to
the largest entry of the reference; forward and input gradient) for exact
and for stock float32. Prints a table. Not a test. The whole example's step
time and peak memory: bench/bench_exact_layers.py --config
examples/resnet/config.toml.

    .venv/bin/python bench/bench_exact_cnn.py [--threads 1,2] [--repeats 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import pipeline.exact as X  # noqa: E402
from bench_exact_ops import Fn, _err, _step, _time  # noqa: E402
from pipeline.exact.conv import conv2d as xconv2d  # noqa: E402


def _bn(exact: bool, c: int) -> Fn:
    gen = np.random.default_rng(c)
    w = torch.from_numpy(gen.uniform(0.5, 1.5, c).astype(np.float32))
    b = torch.from_numpy(gen.uniform(-0.5, 0.5, c).astype(np.float32))

    def f(t: torch.Tensor) -> torch.Tensor:
        rm, rv = torch.zeros(c, dtype=t.dtype), torch.ones(c, dtype=t.dtype)
        args = (rm, rv, w.to(t.dtype), b.to(t.dtype), True, 0.1, 1e-5)
        return X.batch_norm(t, *args) if exact else F.batch_norm(t, *args)
    return f


def _conv(exact: bool, o: int, c: int, k: int, s: int, p: int, d: int = 1, g: int = 1,
          one_d: bool = False) -> Fn:
    gen = np.random.default_rng(o * 31 + c)
    shape = (o, c // g, k) if one_d else (o, c // g, k, k)
    w = torch.from_numpy((gen.standard_normal(shape) / np.sqrt(c * k * k)).astype(np.float32))

    def f(t: torch.Tensor) -> torch.Tensor:
        ww = w.to(t.dtype)
        if one_d:
            return X.conv1d(t, ww, None, s, p, d, g) if exact else F.conv1d(t, ww, None, s, p, d, g)
        return xconv2d(t, ww, None, s, p, d, g) if exact else F.conv2d(t, ww, None, s, p, d, g)
    return f


def _cases() -> list[tuple[str, tuple[int, ...], Fn, Fn]]:
    cases = []
    for n in (16, 256):
        cases += [
            (f"bn2d N={n}", (n, 16, 8, 8), _bn(True, 16), _bn(False, 16)),
            (f"bn2d N={n}", (n, 32, 2, 2), _bn(True, 32), _bn(False, 32)),
            (f"conv 1->16 3x3 N={n}", (n, 1, 8, 8), _conv(True, 16, 1, 3, 1, 1),
             _conv(False, 16, 1, 3, 1, 1)),
            (f"conv 16->16 3x3 N={n}", (n, 16, 4, 4), _conv(True, 16, 16, 3, 1, 1),
             _conv(False, 16, 16, 3, 1, 1)),
            (f"conv 16->32 3x3 s2 N={n}", (n, 16, 4, 4), _conv(True, 32, 16, 3, 2, 1),
             _conv(False, 32, 16, 3, 2, 1)),
            (f"conv 16->32 1x1 s2 N={n}", (n, 16, 4, 4), _conv(True, 32, 16, 1, 2, 0),
             _conv(False, 32, 16, 1, 2, 0)),
        ]
    cases += [
        ("conv 32->32 g4 d2", (64, 32, 16, 16), _conv(True, 32, 32, 3, 1, 2, 2, 4),
         _conv(False, 32, 32, 3, 1, 2, 2, 4)),
        ("depthwise 32 3x3", (64, 32, 16, 16), _conv(True, 32, 32, 3, 1, 1, 1, 32),
         _conv(False, 32, 32, 3, 1, 1, 1, 32)),
        ("conv1d 16->32 k5 s2", (64, 16, 256), _conv(True, 32, 16, 5, 2, 2, one_d=True),
         _conv(False, 32, 16, 5, 2, 2, one_d=True)),
        ("var(0,2)", (256, 64, 64), lambda t: X.xvar(t, (0, 2)), lambda t: t.var((0, 2))),
    ]
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=7)
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
    for name, shape, exact, stock in _cases():
        x = torch.from_numpy((gen.standard_normal(shape) * 3 + 1).astype(np.float32))
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
