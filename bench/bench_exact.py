"""Time per training step of exact mode (ExactNet + ExactSGD) against stock
torch (nn.Sequential Linear/ReLU, F.cross_entropy, torch.optim.SGD) on the
same random data, at 1 and 2 threads, with peak memory. Not a test.

    .venv/bin/python bench/bench_exact.py [--repeats 3]

Each (case, implementation, threads) runs in a fresh subprocess so that its
peak RSS (``getrusage`` maxrss) is its own and the thread count is set before
any work; the child reports the best of several timed blocks, and the parent
keeps the best over ``--repeats`` alternating runs (the machine may be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (layer widths, batch size, timed steps per block)
CASES: dict[str, tuple[list[int], int, int]] = {
    "digits 64-128-10 b64": ([64, 128, 10], 64, 200),
    "784-1024-1024-10 b256": ([784, 1024, 1024, 10], 256, 8),
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _stock_step(dims: list[int], x, y):  # type: ignore[no-untyped-def]
    """A closure running one stock torch training step."""
    import torch
    import torch.nn.functional as F

    layers: list[torch.nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(torch.nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def _exact_step(dims: list[int], x, y):  # type: ignore[no-untyped-def]
    """A closure running one exact-mode training step (one shard)."""
    from pipeline.config import ModelConfig
    from pipeline.exact import ExactNet, ExactSGD

    net = ExactNet(ModelConfig("mlp", tuple(dims[1:-1]), 0.0), seed=0, in_features=dims[0])
    opt = ExactSGD(net.params, lr=0.01, momentum=0.9)

    def step() -> None:
        _, grads = net.shard_grads(x, y, x.shape[0], None)
        opt.step(grads)
    return step


def child(case: str, impl: str, threads: int) -> None:
    """Run one configuration and print a JSON line: ms/step, peak RSS."""
    import torch

    torch.set_num_threads(threads)
    dims, batch, steps = CASES[case]
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, dims[0], generator=g)
    y = torch.randint(0, dims[-1], (batch,), generator=g)
    step = (_exact_step if impl == "exact" else _stock_step)(dims, x, y)
    rss0 = _rss_mb()
    for _ in range(max(3, steps // 10)):
        step()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, (time.perf_counter() - t0) / steps)
    print(json.dumps({"ms": best * 1e3, "rss": _rss_mb(), "rss_setup": rss0}))


def _run(case: str, impl: str, threads: int) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", case, impl, str(threads)],
                         env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", nargs=3, metavar=("CASE", "IMPL", "THREADS"))
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows = []
    for case in CASES:
        for threads in (1, 2):
            res: dict[str, dict[str, float]] = {}
            for _ in range(args.repeats):  # alternate so both see the same load
                for impl in ("stock", "exact"):
                    r = _run(case, impl, threads)
                    if impl not in res or r["ms"] < res[impl]["ms"]:
                        res[impl] = r
            rows.append((case, threads, res["stock"], res["exact"]))
    print(f"{'case':<24}{'thr':>4}{'stock ms':>10}{'exact ms':>10}{'ratio':>7}"
          f"{'stock MB':>10}{'exact MB':>10}")
    for case, threads, s, e in rows:
        print(f"{case:<24}{threads:>4}{s['ms']:>10.3f}{e['ms']:>10.3f}{e['ms'] / s['ms']:>7.2f}"
              f"{s['rss']:>10.0f}{e['rss']:>10.0f}")
    print("MB: peak RSS of the whole child process (torch import included).")


if __name__ == "__main__":
    main()
