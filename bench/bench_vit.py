"""examples/vit: one training step (4 shards of 16 images, forward, label-
smoothed cross-entropy, backward, the shards' gradients summed, AdamW) in
exact mode (pipeline.exact: from_torch, LayerNet, ExactAdamW) vs stock
PyTorch (the same module, F.cross_entropy with label smoothing,
torch.optim.AdamW), median step time at each thread count, and the peak
resident memory of each (a fresh process per mode and thread count: the
high-water mark after the model is built, and at the end). Then where exact
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
    import torch

    torch.set_num_threads(threads)
    run = (_exact_step if mode == "exact" else _stock_step)()
    run()  # warm-up (caches, native kernels)
    built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ts = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        ts.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"ms": statistics.median(ts) * 1e3, "built_mb": built / 1024,
                      "peak_mb": peak / 1024}))


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
    print("| threads | stock ms | exact ms | exact / stock | stock peak MB | exact peak MB | "
          "peak ratio | ratio over the built model |")
    print("|---|---|---|---|---|---|---|---|")
    for t in (int(s) for s in args.threads.split(",")):
        res = {}
        for mode in ("stock", "exact"):
            p = subprocess.run([sys.executable, __file__, "--child", mode, str(t), "--steps",
                                str(args.steps)], capture_output=True, text=True, check=True)
            res[mode] = json.loads(p.stdout.strip().splitlines()[-1])
        s, e = res["stock"], res["exact"]
        growth = (e["peak_mb"] - e["built_mb"] + 1) / (s["peak_mb"] - s["built_mb"] + 1)
        print(f"| {t} | {s['ms']:.1f} | {e['ms']:.1f} | {e['ms'] / s['ms']:.2f} | "
              f"{s['peak_mb']:.0f} | {e['peak_mb']:.0f} | {e['peak_mb'] / s['peak_mb']:.2f} | "
              f"{growth:.2f} |")
    print("\nWhere exact mode's step time goes (1 thread, cProfile, tottime):\n")
    print(_profile(max(3, args.steps // 4)))


if __name__ == "__main__":
    main()
