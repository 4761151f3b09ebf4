"""Pinned-mode training time at 1 thread and at N threads (`--threads`): the
speed-up of running a step's shards on a pool of threads, each op on one
thread (pipeline/threads.py). The weights are the same at every N (checked
here on every run, and by tests/train/test_threads.py). Prints a table.

    .venv/bin/python bench/bench_threads.py [--repeats 3] [--threads 1,2] [--quick]

Models: the charlm transformer (examples/charlm, 4 shards) and the digits MLP
(configs/digits.toml, 8 shards of 8 rows). Runs alternate thread counts
round by round; medians of the training time per step (no checkpoints). The
script re-executes itself under the pinned numeric profile, as
``pipeline train`` does. "auto" is the default policy (time the first step,
use the pool only if a shard takes 3 ms or more).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import loops  # noqa: E402  (bench/loops.py: the pinned process, a loaded config)


def _timed(cfg: Any, ds: Any, parts: Any, threads: int | None) -> tuple[float, str, Any]:
    from pipeline import modes
    from pipeline.core.hashing import weights_sha256
    from pipeline.train.loop import train

    t = time.perf_counter()
    r = train(cfg, ds, modes.of(cfg.mode), parts, run_key="bench", ckpt_dir=None, quiet=True, threads=threads)
    return (time.perf_counter() - t) / r.steps, weights_sha256(r.params), r.threads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}",
                    help="thread counts to compare, comma-separated (and auto)")
    ap.add_argument("--quick", action="store_true", help="fewer steps, 2 rounds")
    args = ap.parse_args()
    profile = loops.pin().name
    counts: list[int | None] = [int(n) for n in args.threads.split(",")] + [None]
    repeats = 2 if args.quick else args.repeats
    lm_steps = 8 if args.quick else 30
    cases = [("charlm (4 shards of 8 x 64)", REPO / "examples/charlm/config.toml",
              [f"train.max_steps={lm_steps}"]),
             ("digits MLP (8 shards of 8)", REPO / "configs/digits.toml",
              ["train.epochs=3" if args.quick else "train.epochs=10"])]
    print(f"profile {profile}, {os.cpu_count()} cores, median of {repeats} rounds "
          f"(after one warm-up), ms per step")
    header = "".join(f"{('auto' if n is None else f'{n} thr'):>12}" for n in counts)
    print(f"{'model':32}{header}   speed-up (1 thread / best)")
    for name, config, overrides in cases:
        b = loops.load(config, overrides)
        cfg, ds, parts = b.cfg, b.ds, b.parts
        times: dict[int | None, list[float]] = {n: [] for n in counts}
        hashes, used = set(), {}
        for r in range(repeats + 1):
            for n in counts:
                per, h, rec = _timed(cfg, ds, parts, n)
                hashes.add(h)
                used[n] = rec["shard_threads"]
                if r:
                    times[n].append(per)
        med = {n: statistics.median(v) for n, v in times.items()}
        cells = "".join(f"{med[n] * 1e3:9.2f}({used[n]})" for n in counts)
        best = min(med.values())
        print(f"{name:32}{cells}   {med[1] / best if 1 in med else float('nan'):.2f}"
              f"   weights: {'one hash' if len(hashes) == 1 else 'DIFFER'}")
    print("(k): shard threads the run used")


if __name__ == "__main__":
    main()
