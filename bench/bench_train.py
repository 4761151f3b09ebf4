"""Pinned-mode training time vs a plain PyTorch loop: same model, data,
threads and steps. Prints a table; the target is a ratio of at most 1.05.

    .venv/bin/python bench/bench_train.py [--repeats 5] [--epochs 30] [KEY=VALUE ...]

(overrides such as model.hidden=[512,512] show how the fixed per-step cost of
the pipeline's bookkeeping shrinks as the model grows)

The script re-executes itself under the pinned numeric profile (one thread,
AVX2 kernels), so both loops run with the same kernels. Runs alternate
(pipeline, plain, pipeline, ...) and the medians are compared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import environment  # noqa: E402


def _plain(ds, cfg, train_ids, test_ids) -> float:  # type: ignore[no-untyped-def]
    """The loop a user would write: nn.Sequential, randperm, CE mean, SGD."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    x, y = torch.from_numpy(ds.x), torch.from_numpy(ds.y)
    tr, te = torch.from_numpy(train_ids), torch.from_numpy(test_ids)
    sizes = [64, *cfg.model.hidden, 10]
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers += [nn.ReLU(), nn.Dropout(cfg.model.dropout)]
    model = nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          foreach=False)
    bsz = cfg.train.batch_size
    t0 = time.perf_counter()
    for _ in range(cfg.train.epochs):
        model.train()
        perm = tr[torch.randperm(len(tr))]
        for b in range(len(tr) // bsz):
            idx = perm[b * bsz:(b + 1) * bsz]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            (model(x[te]).argmax(1) == y[te]).float().mean().item()
    return time.perf_counter() - t0


def _pipeline(ds, cfg, ckpt: bool) -> float:  # type: ignore[no-untyped-def]
    from pipeline.train import train

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        train(cfg, ds, run_key="bench", ckpt_dir=Path(tmp) if ckpt else None, quiet=True)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = ap.parse_args()
    profile = environment.load_profile()
    if environment.needs_reexec(profile):
        env = {**os.environ, **profile.env}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    environment.apply_in_process(profile)

    from pipeline import dataset, manifest, sampling
    from pipeline.config import load_config

    root = environment.project_root()
    cfg = load_config(root / "configs" / "digits.toml", [f"train.epochs={args.epochs}",
                                                              *args.overrides])
    with tempfile.TemporaryDirectory() as cache:
        verified = manifest.verify(root / "data-manifest.json", stat_cache_dir=Path(cache))
        ds = dataset.load(verified, "digits", Path(cache))
    train_ids, test_ids = sampling.split(ds, cfg.seed, cfg.data.test_fraction)
    times: dict[str, list[float]] = {"pipeline (no checkpoints)": [],
                                     "pipeline (checkpoints)": [], "plain loop": []}
    _plain(ds, cfg, train_ids, test_ids)  # warm-up both paths once
    _pipeline(ds, cfg, False)
    for _ in range(args.repeats):
        times["pipeline (no checkpoints)"].append(_pipeline(ds, cfg, False))
        times["plain loop"].append(_plain(ds, cfg, train_ids, test_ids))
        times["pipeline (checkpoints)"].append(_pipeline(ds, cfg, True))
    base = statistics.median(times["plain loop"])
    steps = (len(train_ids) // cfg.train.batch_size) * cfg.train.epochs
    arch = "-".join(str(n) for n in (64, *cfg.model.hidden, 10))
    print(f"digits MLP {arch}, {steps} steps, profile {profile.name}, "
          f"median of {args.repeats} alternating runs")
    print(f"{'loop':28} {'median s':>9} {'ms/step':>8} {'ratio':>6}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:28} {m:9.3f} {1000 * m / steps:8.3f} {m / base:6.3f}")
    print("target: pipeline / plain loop <= 1.05")


if __name__ == "__main__":
    main()
