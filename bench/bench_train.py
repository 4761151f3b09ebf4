"""Pinned-mode training time vs a plain PyTorch loop: same model (the config's
factory), data, optimiser, threads and steps. Prints a table; the target is a
ratio of at most 1.05.

    .venv/bin/python bench/bench_train.py [--config CONFIG] [--repeats 5] [KEY=VALUE ...]
    .venv/bin/python bench/bench_train.py --config examples/charlm/config.toml train.max_steps=60

The plain loop is what a user would write: the factory's module, a shuffled
batch, the stock mean cross-entropy over the whole batch, zero_grad, backward,
step. The pipeline adds what makes it reproducible: the batch cut into
``train.shards`` shards (each its own forward/backward, with its own random
stream), the fixed reduction tree, the per-step trail. The script
re-executes itself under the pinned numeric profile, so both loops run the
same kernels. Runs alternate (pipeline, plain, ...) and medians are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import environment  # noqa: E402


def _plain(ds: Any, cfg: Any, parts: Any, train_ids: Any, test_ids: Any, steps: int) -> float:
    """The loop a user would write, for ``steps`` steps, evaluating on the test
    split where the pipeline does (each epoch's end and the last step)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.manual_seed(cfg.seed)
    shape, classes = ds.shapes(cfg.data.context)
    model = parts.factory.function(shape, classes, **cfg.model.args)
    o = cfg.optim
    opt = (torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, foreach=False)
           if o.name == "sgd" else torch.optim.Adam(model.parameters(), lr=o.lr, foreach=False))
    x = torch.from_numpy(np.ascontiguousarray(ds.x))
    y = torch.from_numpy(ds.y) if ds.y is not None else None
    ctx, bsz = cfg.data.context, cfg.train.batch_size
    tr, te = torch.from_numpy(train_ids), torch.from_numpy(test_ids)

    def batch(idx: Any) -> tuple[Any, Any]:
        if y is not None:
            return x[idx], y[idx]
        pos = (idx * ctx)[:, None] + torch.arange(ctx)
        return x[pos], x[pos + 1]

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(te), 256):
                xb, yb = batch(te[i:i + 256])
                logits = model(xb)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               yb.reshape(-1), reduction="sum"))
        model.train()
        return total

    per_epoch = len(tr) // bsz
    t0 = time.perf_counter()
    model.train()
    perm = tr[torch.randperm(len(tr))]
    for s in range(steps):
        idx = perm[(s % per_epoch) * bsz:(s % per_epoch + 1) * bsz]
        xb, yb = batch(idx)
        logits = model(xb)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), yb.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (s + 1) % per_epoch == 0 or s + 1 == steps:
            evaluate()
    return time.perf_counter() - t0


def _pipeline(ds: Any, cfg: Any, parts: Any, ckpt: bool) -> float:
    from pipeline.train import train

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(cfg, ds, parts, run_key="bench", ckpt_dir=Path(tmp) if ckpt else None,
              quiet=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = ap.parse_args()
    profile = environment.load_profile()
    if environment.needs_reexec(profile):
        env = {**os.environ, **profile.env}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    environment.apply_in_process(profile)

    from pipeline import recipe, sampling
    from pipeline.config import load_config

    path = args.config or environment.project_root() / "configs" / "digits.toml"
    cfg = load_config(path, args.overrides)
    prep = recipe.prepare(cfg, [], path.resolve().parent)
    ds, parts = prep.ds, prep.parts
    train_ids, test_ids = sampling.split(ds, cfg.seed, cfg.data.test_fraction,
                                         cfg.data.context)
    steps = (len(train_ids) // cfg.train.batch_size) * cfg.train.epochs
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    times: dict[str, list[float]] = {"pipeline (no checkpoints)": [],
                                     "pipeline (checkpoints)": [], "plain loop": []}
    _plain(ds, cfg, parts, train_ids, test_ids, steps)  # warm-up both paths once
    _pipeline(ds, cfg, parts, False)
    for _ in range(args.repeats):
        times["pipeline (no checkpoints)"].append(_pipeline(ds, cfg, parts, False))
        times["plain loop"].append(_plain(ds, cfg, parts, train_ids, test_ids, steps))
        times["pipeline (checkpoints)"].append(_pipeline(ds, cfg, parts, True))
    base = statistics.median(times["plain loop"])
    print(f"{path.name}: {cfg.model.factory} {cfg.model.args}, {steps} steps of "
          f"{cfg.train.batch_size} in {cfg.train.shards} shards, profile {profile.name}, "
          f"median of {args.repeats} alternating runs (both evaluate at epoch ends and "
          f"the last step)")
    print(f"{'loop':28} {'median s':>9} {'ms/step':>8} {'ratio':>6}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28} {m:9.3f} {1000 * m / steps:8.3f} {m / base:6.3f}")
    print("target: pipeline / plain loop <= 1.05")


if __name__ == "__main__":
    main()
