"""examples/vit: one training step (4 shards of 16 images, forward, label-
smoothed cross-entropy, backward, the shards' gradients summed, AdamW) in
exact mode (pipeline.exact: from_torch, LayerNet, ExactAdamW) vs stock
PyTorch (the same module, F.cross_entropy with label smoothing,
torch.optim.AdamW), step times at each thread count (the two alternated in
one process: minimum, median, and the median ratio of neighbouring steps,
so a loaded machine's bursts hit both), and the peak resident memory of
each (a fresh process per mode and thread count). Then where exact
mode's time goes (cProfile, by function, one thread). Prints tables. Not a
test.

    .venv/bin/python bench/bench_vit.py [--threads 1,2] [--steps 20]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "examples" / "vit"))

ARGS = dict(patch=2, d_model=32, n_head=4, n_layer=2, dropout=0.1, pool="cls")
BATCH, SHARDS, SMOOTH = 64, 4, 0.1


def _data():  # noqa: ANN202
    import numpy as np
    import torch

    g = np.random.default_rng(0)
    x = torch.from_numpy(g.random((BATCH, 1, 8, 8)).astype(np.float32))
    y = torch.from_numpy(g.integers(0, 10, BATCH))
    return x, y


def _exact_step():  # noqa: ANN202
    import torch

    import model as M  # examples/vit/model.py
    from pipeline.exact import ExactAdamW, LayerNet, from_torch
    from pipeline.exact.losses import Xent
    from pipeline.train.distributed import tree_reduce

    torch.manual_seed(0)
    x, y = _data()
    net = LayerNet(from_torch(M.vit((1, 8, 8), 10, **ARGS)), 0, "cpu", x[:2], loss=Xent(SMOOTH))
    opt = ExactAdamW(net.params, 0.003, weight_decay=0.01)
    step = [0]
    per = BATCH // SHARDS

    def run() -> None:
        parts = [net.shard_grads(x[s:s + per], y[s:s + per], BATCH, None, step=step[0], row0=s)
                 for s in range(0, BATCH, per)]
        opt.step({k: tree_reduce([p[1][k] for p in parts], torch.add) for k in net.trainable})
        step[0] += 1
    return run


def _stock_step():  # noqa: ANN202
    import torch
    import torch.nn.functional as F

    import model as M

    torch.manual_seed(0)
    x, y = _data()
    m = M.vit((1, 8, 8), 10, **ARGS)
    m.train()
    opt = torch.optim.AdamW(m.parameters(), 0.003, weight_decay=0.01)
    per = BATCH // SHARDS

    def run() -> None:
        opt.zero_grad()
        for s in range(0, BATCH, per):
            loss = F.cross_entropy(m(x[s:s + per]), y[s:s + per], label_smoothing=SMOOTH,
                                   reduction="sum") / BATCH
            loss.backward()
        opt.step()
    return run


def _child(mode: str, threads: int, steps: int) -> None:
    """``mode`` "exact" or "stock": peak memory of its steps; "both": the two
    step functions alternated (a loaded machine's bursts hit both alike),
    the minimum and median of each and the median of the pairs' ratios."""
    import torch

    torch.set_num_threads(threads)
    if mode == "both":
        runs = {"exact": _exact_step(), "stock": _stock_step()}
        for run in runs.values():
            run()  # warm-up (caches, native kernels)
        ts: dict[str, list[float]] = {"exact": [], "stock": []}
        for _ in range(steps):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run()
                ts[name].append(time.perf_counter() - t0)
        ratios = [e / s for e, s in zip(ts["exact"], ts["stock"])]
        print(json.dumps({k: {"min_ms": min(v) * 1e3, "median_ms": statistics.median(v) * 1e3}
                          for k, v in ts.items()} | {"ratio": statistics.median(ratios)}))
        return
    run = (_exact_step if mode == "exact" else _stock_step)()
    run()
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(steps):
        run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"built_mb": built / 1024, "peak_mb": peak / 1024}))


def _profile(steps: int) -> str:
    import torch

    torch.set_num_threads(1)
    run = _exact_step()
    run()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        run()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
    return "\n".join(lines[-16:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.child[0], int(args.child[1]), args.steps)
        return
    import torch

    print(f"examples/vit step (batch {BATCH} in {SHARDS} shards, {ARGS}); torch "
          f"{torch.__version__}, {torch.backends.cpu.get_cpu_capability()}")
    print("| threads | stock ms (min / median) | exact ms (min / median) | exact / stock "
          "(median of pairs) | min / min | stock peak MB | exact peak MB | peak ratio |")
    print("|---|---|---|---|---|---|---|---|")

    def child(mode: str, t: int) -> dict:
        p = subprocess.run([sys.executable, __file__, "--child", mode, str(t), "--steps",
                            str(args.steps)], capture_output=True, text=True, check=True)
        return json.loads(p.stdout.strip().splitlines()[-1])

    for t in (int(s) for s in args.threads.split(",")):
        both, ms, me = child("both", t), child("stock", t), child("exact", t)
        s, e = both["stock"], both["exact"]
        print(f"| {t} | {s['min_ms']:.1f} / {s['median_ms']:.1f} | {e['min_ms']:.1f} / "
              f"{e['median_ms']:.1f} | {both['ratio']:.2f} | {e['min_ms'] / s['min_ms']:.2f} | "
              f"{ms['peak_mb']:.0f} | {me['peak_mb']:.0f} | {me['peak_mb'] / ms['peak_mb']:.2f} |")
    print("\nWhere exact mode's step time goes (1 thread, cProfile, tottime):\n")
    print(_profile(max(3, args.steps // 4)))


if __name__ == "__main__":
    main()
