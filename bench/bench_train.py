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
import statistics
from pathlib import Path

import loops


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("overrides", nargs="*", help="config overrides, KEY=VALUE")
    args = ap.parse_args()
    profile = loops.pin()
    path = args.config or loops.ROOT / "configs" / "digits.toml"
    b = loops.load(path, args.overrides)
    cfg, steps = b.cfg, b.steps
    times: dict[str, list[float]] = {"pipeline (no checkpoints)": [],
                                     "pipeline (checkpoints)": [], "plain loop": []}
    loops.plain(b, steps)  # warm-up both paths once
    loops.pipeline(b, steps)
    for _ in range(args.repeats):
        times["pipeline (no checkpoints)"].append(loops.pipeline(b, steps).seconds)
        times["plain loop"].append(loops.plain(b, steps).seconds)
        times["pipeline (checkpoints)"].append(loops.pipeline(b, steps, ckpt=True).seconds)
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
