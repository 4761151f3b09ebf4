"""Benchmark: what a fresh ``pipeline train`` of the default run spends outside training,
against ``python -c "import torch"``.

    .venv/bin/python bench/bench_startup.py [--rounds 5] [CONFIG]

Not a test: prints a table. Each round runs, alternating, ``python -c "import torch"``
and ``python -m pipeline train CONFIG --runs-dir <a new empty directory> --quiet --json``
in this checkout (a fresh run every time: trained, not reused), each timed from spawn
to exit. From the run's own record (``--json``):

- total: the command's wall time, spawn to exit (the re-exec included);
- loop: ``run.json``'s ``loop_s``, the training loop of ``pipeline/train.py`` from its
  first step until its checkpoint writer has closed (steps, per-epoch metrics, every
  checkpoint on disk);
- outside = total - loop: interpreter start-up (both processes: the one the user starts
  and the pinned one it re-executes), imports, config, data verification (the stat
  cache's fast path: the caches are warmed by one untimed run first, as any second
  run finds them), decoding (the decode cache), building the model, the record
  (weights, trail, metrics, curves.png, run.json, fsyncs), the printing, and both
  interpreters' exit (``import torch``'s time holds its exit too);
- ratio = outside / import torch. Target: <= 1.3.

One more row, for the breakdown: the same command started with the pinned profile
already in its environment (as the Nix wrapper starts it), so that it does not
re-execute itself; its outside time less the row above's is the first process's cost.

Medians over the rounds. Caches live in a temporary ``PIPELINE_CACHE_DIR``; nothing
outside temporary directories is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.core.environment import load_profile  # noqa: E402  (torch-free; after the insert)


def _command() -> list[str]:
    """``python -m pipeline`` run in this checkout, so that its own code is measured
    (what the console script runs, and what the re-exec runs)."""
    return [sys.executable, "-m", "pipeline"]


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    took = time.perf_counter() - t
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stderr[-2000:]}")
    return took, out.stdout


def _train(config: str, overrides: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(total, loop) seconds of one fresh training of ``config``."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-runs-") as runs:
        total, out = _timed([*_command(), "train", config, *overrides, "--runs-dir", runs,
                             "--quiet", "--json"], env)
    return total, float(json.loads(out)["loop_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="configs/digits.toml")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    cache = tempfile.mkdtemp(prefix="bench-startup-cache-")
    env = {**os.environ, "PIPELINE_CACHE_DIR": cache}
    try:
        _train(args.config, args.overrides, env)  # warms the stat and decode caches
        pinned = {**env, **load_profile().env}
        imports, totals, loops, direct = [], [], [], []
        for _ in range(args.rounds):  # alternating, so that load on the machine hits all
            imports.append(_timed([sys.executable, "-c", "import torch"], env)[0])
            total, loop = _train(args.config, args.overrides, env)
            totals.append(total)
            loops.append(loop)
            total, loop = _train(args.config, args.overrides, pinned)
            direct.append(total - loop)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    outside = [t - lp for t, lp in zip(totals, loops)]
    med = statistics.median
    rows = [('python -c "import torch"', med(imports)),
            (f"pipeline train {args.config}: total", med(totals)),
            ("  training loop (run.json loop_s)", med(loops)),
            ("  outside = total - loop", med(outside)),
            ("  outside, started already pinned (no re-exec)", med(direct))]
    print(f"{args.rounds} rounds, alternating; medians; {sys.executable} -m pipeline in {REPO}")
    print(f"{'what':<48} {'seconds':>8}")
    for name, value in rows:
        print(f"{name:<48} {value:8.3f}")
    ratio = med([o / i for o, i in zip(outside, imports)])
    print(f"{'ratio outside / import torch (median of rounds)':<48} {ratio:8.2f}   "
          f"target <= 1.3: {'met' if ratio <= 1.3 else 'NOT met'}")
    print("per round (import, total, loop, outside): " + "; ".join(
        f"{i:.2f} {t:.2f} {lp:.2f} {o:.2f}" for i, t, lp, o in zip(imports, totals, loops,
                                                                   outside)))


if __name__ == "__main__":
    main()
