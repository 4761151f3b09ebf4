"""Time per training step of exact mode against stock torch (nn.Sequential
Linear/ReLU, F.cross_entropy, torch.optim.SGD) on the same random data, at 1
and 2 threads, with peak memory. Two exact implementations: the spec's MLP
(ExactNet, the one-slice product ``xmm``, hand-written backward) and the
same stock Sequential converted to exact layers (``pipeline.exact.from_torch``
in a LayerNet: the layers' product ``xmmb``, at least fp32's accuracy, and
autograd), each with ExactSGD. Not a test.

    .venv/bin/python bench/bench_exact.py [--repeats 3]

Each (case, implementation, threads) runs in a fresh subprocess so that its
peak RSS (``getrusage`` maxrss) is its own and the thread count is set before
any work; the child reports the median step of each implementation, the
three alternating, and the parent the median over ``--repeats`` processes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (layer widths, batch size, timed steps per block)
CASES: dict[str, tuple[list[int], int, int]] = {
    "digits 64-128-10 b64": ([64, 128, 10], 64, 300),
    "784-1024-1024-10 b256": ([784, 1024, 1024, 10], 256, 10),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _mlp(dims: list[int]):  # type: ignore[no-untyped-def]
    """The stock nn.Sequential of Linear layers with ReLU between them."""
    import torch

    layers: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _stock_step(dims: list[int], x, y):  # type: ignore[no-untyped-def]
    """A closure running one stock torch training step."""
    import torch
    import torch.nn.functional as F

    net = _mlp(dims)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def _sgd_steps(net, x, y):  # type: ignore[no-untyped-def]
    """A closure running one step of an exact net (one shard) with ExactSGD."""
    from pipeline.exact import ExactSGD

    opt = ExactSGD(net.params, lr=0.01, momentum=0.9)

    def step() -> None:
        _, grads = net.shard_grads(x, y, x.shape[0], None)
        opt.step(grads)
    return step


def _exact_step(dims: list[int], x, y):  # type: ignore[no-untyped-def]
    """A closure running one exact-mode training step (one shard)."""
    from pipeline.exact import Arch, ExactNet

    net = ExactNet(Arch("mlp", tuple(dims[1:-1]), 0.0), seed=0, input_shape=(dims[0],),
                   n_classes=dims[-1])
    return _sgd_steps(net, x, y)


def _layers_step(dims: list[int], x, y):  # type: ignore[no-untyped-def]
    """A closure running one step of the stock Sequential as exact layers."""
    from pipeline.exact import from_torch
    from pipeline.exact.modnet import LayerNet

    net = LayerNet(from_torch(_mlp(dims)), seed=0, device="cpu")
    return _sgd_steps(net, x, y)


IMPLS = {"stock": _stock_step, "exact": _exact_step, "layers": _layers_step}


def _setup(case: str, impl: str):  # type: ignore[no-untyped-def]
    import torch

    dims, batch, _ = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, dims[0], generator=g)
    y = torch.randint(0, dims[-1], (batch,), generator=g)
    return IMPLS[impl](dims, x, y)


def child_time(case: str, threads: int) -> None:
    """Time stock and exact steps alternately in one process (so both see the
    same machine load) and print their median per-step times as JSON."""
    import torch

    torch.set_num_threads(threads)
    steps = {impl: _setup(case, impl) for impl in IMPLS}
    n = CASES[case][2]
    for step in steps.values():
        for _ in range(max(3, n // 10)):
            step()
    times: dict[str, list[float]] = {impl: [] for impl in IMPLS}
    for _ in range(n):
        for impl, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[impl].append(time.perf_counter() - t0)
    print(json.dumps({impl: statistics.median(ts) * 1e3 for impl, ts in times.items()}))


def child_memory(case: str, impl: str) -> None:
    """Peak RSS (whole process) and its growth over a few steps, as JSON."""
    step = _setup(case, impl)
    before = _rss_mb()
    for _ in range(5):
        step()
    print(json.dumps({"rss": _rss_mb(), "grow": _rss_mb() - before}))


def _child(*args: str, threads: int = 1) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", *args], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        if args.child[0] == "time":
            child_time(args.child[1], int(args.child[2]))
        else:
            child_memory(args.child[1], args.child[2])
        return
    print(f"{'case':<24}{'thr':>4}{'stock ms':>10}{'exact ms':>10}{'layers ms':>10}"
          f"{'exact/stock':>12}{'layers/stock':>13}")
    for case in CASES:
        for threads in (1, 2):
            runs = [_child("time", case, str(threads), threads=threads)
                    for _ in range(args.repeats)]
            med = {impl: statistics.median(r[impl] / r["stock"] for r in runs) for impl in IMPLS}
            ms = {impl: statistics.median(r[impl] for r in runs) for impl in IMPLS}
            print(f"{case:<24}{threads:>4}{ms['stock']:>10.3f}{ms['exact']:>10.3f}"
                  f"{ms['layers']:>10.3f}{med['exact']:>12.2f}{med['layers']:>13.2f}")
    print(f"\n{'case':<24}" + "".join(f"{impl + ' MB':>10}" for impl in IMPLS)
          + "".join(f"{impl + ' +MB':>11}" for impl in IMPLS))
    for case in CASES:
        m = {impl: _child("memory", case, impl) for impl in IMPLS}
        print(f"{case:<24}" + "".join(f"{m[i]['rss']:>10.0f}" for i in IMPLS)
              + "".join(f"{m[i]['grow']:>11.0f}" for i in IMPLS))
    print("ms: median per step, the three alternating in one process; ratios: median over")
    print("--repeats processes of each process's ratio. Target: layers / stock <= 3.")
    print("MB: peak RSS of a fresh 1-thread process (torch import included); +MB: its growth")
    print("over 5 training steps. Load average 1/5/15 min at the end:",
          " ".join(f"{v:.1f}" for v in os.getloadavg()))


if __name__ == "__main__":
    main()
