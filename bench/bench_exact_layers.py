"""Exact mode's layer networks vs pinned mode and vs stock PyTorch (the loop a
user would write, bench/loops.py): time per training step and peak memory
(the pipeline's own step: every shard's forward and backward, the fixed
reduction tree, the optimiser; the plain loop's zero_grad / backward / step
on whole batches), same config, data, batches and thread count. Prints a
table; the target is exact / stock <= 3 per step and <= 1.5 in peak memory.
Not a test.

    .venv/bin/python bench/bench_exact_layers.py [--config examples/charlm/config.toml]
        [--steps 8] [--repeats 3] [--threads 1,2] [--profile] [KEY=VALUE ...]

Each (mode, threads) runs in a fresh subprocess, under the pinned profile's
environment with the thread count replaced (so both modes run the same
kernels' ISA; exact mode needs no pinning, which only changes its speed),
its shards run as the loop runs them (``--threads N``: pinned mode's on a
pool of N threads, exact mode's in order on N intra-op threads),
and reports the median of its timed steps after two warm-up steps and its
peak RSS; the plain loop runs on N intra-op threads under the same
environment. The parent alternates the children (exact, pinned, plain,
exact, ...) and prints medians over ``--repeats``. Evaluation is not timed.
``--profile``: then where exact mode's step time goes, at one thread
(cProfile over the timed steps: the functions with the most own time, the
f64 GEMMs of the layer product among them as ``torch.matmul``).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _plain_child(config: Path, steps: int, overrides: list[str]) -> None:
    """Stock PyTorch: the loop a user would write (bench/loops.py: the
    factory's module, the config's torch.optim optimiser, whole batches,
    zero_grad / backward / step) on torch's own intra-op threads."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    from loops import UserLoop, load

    loop = UserLoop(load(config, overrides))
    model = loop.model()
    opt = loop.optimizer(model)
    data = loop.batches()
    model.train()
    times, cpu = [], []
    for s in range(steps + 2):
        xb, yb = data.at(s)
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loop.loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_s": statistics.median(times[2:]), "rss_mb": rss,
                      "cpu_s": statistics.median(cpu[2:]), "threads": torch.get_num_threads()}))


def _child(config: Path, mode: str, steps: int, overrides: list[str]) -> None:
    import torch

    if mode == "plain":
        _plain_child(config, steps, overrides)
        return

    from pipeline import modes, recipe
    from pipeline.core.config import load_config
    from pipeline.core.rng import DropoutStream
    from pipeline.data.sampling import batches, epoch_order, split
    from pipeline.train.distributed import LocalComm
    from pipeline.train.loop import _loop_masks, _step_grads, examples_of
    from pipeline.train.net import StepState
    from pipeline.train.threads import ShardRunner

    cfg = load_config(config, [*overrides, f"mode={mode}"])
    prep = recipe.prepare(cfg, [], config.resolve().parent)
    ds, parts, dev = prep.ds, prep.parts, torch.device("cpu")
    train_ids, _ = split(ds, cfg.seed, cfg.data.test_fraction, cfg.data.context)
    examples = examples_of(ds, cfg.data.context, dev)
    m = modes.of(cfg.mode)
    net = m.make_net(cfg, ds, dev, parts)
    opt = m.make_optimizer(cfg, net, steps + 2)
    dropout = DropoutStream(cfg.seed)
    # As the loop runs them at this thread count: pinned mode's shards on a
    # pool of threads (each op on one), exact mode's ops on torch's threads.
    runner = ShardRunner(net, torch.get_num_threads(), cfg.train.shards, m.pins_threads())
    order = batches(epoch_order(train_ids, cfg.seed, 0), cfg.train.batch_size)
    n_global = cfg.train.batch_size * examples.targets_per_example
    times, cpu = [], []
    prof = cProfile.Profile() if os.environ.get("BENCH_PROFILE") else None
    for step in range(steps + 2):
        x, y = examples.get(order[step])
        if prof is not None and step == 2:
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        masks = _loop_masks(net, dropout, cfg.train.batch_size)
        (_, grads), _ = _step_grads(net, x, y, masks, cfg, step, n_global, LocalComm(), dev,
                                    runner)
        if isinstance(net, StepState):  # BatchNorm's running statistics (as the loop)
            grads = net.end_step(grads, cfg.train.shards)
        opt.step(grads)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    runner.close()
    if prof is not None:
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
        gemm = sum(v[2] for k, v in stats.stats.items()  # type: ignore[attr-defined]
                   if k[2] in ("<built-in method torch.matmul>", "<built-in method torch.mm>",
                               "<built-in method torch.bmm>"))
        calls = stats.total_calls  # type: ignore[attr-defined]
        print(f"own time of {steps} steps: {total:.2f} s in {calls // steps} Python-level calls "
              f"per step ({1e6 * total / calls:.1f} us each); torch.matmul/mm/bmm (the layer "
              f"product's f64 GEMMs and any other): {gemm:.2f} s ({100 * gemm / total:.0f}%)")
        stats.sort_stats("tottime").print_stats(15)
        lines = [ln for ln in out.getvalue().splitlines() if ln.strip()]
        print("\n".join(lines[-17:]))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"step_s": statistics.median(times[2:]), "rss_mb": rss,
                      "cpu_s": statistics.median(cpu[2:]), "threads": torch.get_num_threads()}))


def _run(config: Path, mode: str, threads: int, steps: int, overrides: list[str],
         profile: bool = False) -> dict:
    from pipeline.core import environment

    # The profile's variables with the thread count replaced, set here for
    # both modes; PIPELINE_TEST_NO_PIN keeps pinned mode from re-executing to
    # restore the profile's one thread.
    env = {**os.environ, **environment.load_profile().env, "PYTHONPATH": str(ROOT),
           "PIPELINE_TEST_NO_PIN": "1", **({"BENCH_PROFILE": "1"} if profile else {})}
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    p = subprocess.run([sys.executable, __file__, "--child", mode, "--config", str(config),
                        "--steps", str(steps), *overrides], env=env, capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{mode} child failed:\n{p.stderr[-3000:]}")
    lines = p.stdout.strip().splitlines()
    if profile:
        print("\n".join(lines[:-1]))
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", type=Path, default=ROOT / "examples" / "charlm" / "config.toml")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--child", default=None)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.child:
        _child(args.config, args.child, args.steps, args.overrides)
        return
    print(f"{args.config}: {args.steps} timed steps per run, median of {args.repeats} "
          f"alternating runs per row")
    print(f"{'threads':>7} {'exact ms':>9} {'pinned ms':>9} {'plain ms':>9} {'ex/pin':>7} "
          f"{'ex/plain':>8} {'exact MB':>9} {'pinned MB':>9} {'plain MB':>9} {'ex/pin':>7} "
          f"{'cpu e/p':>7} {'cpu e/pl':>7}")
    modes = ("exact", "pinned", "plain")
    for threads in (int(t) for t in args.threads.split(",")):
        got: dict[str, list[dict]] = {m: [] for m in modes}
        for _ in range(args.repeats):
            for mode in modes:
                got[mode].append(_run(args.config, mode, threads, args.steps, args.overrides))
        ms = {m: statistics.median(r["step_s"] for r in got[m]) for m in modes}
        mb = {m: statistics.median(r["rss_mb"] for r in got[m]) for m in modes}
        cs = {m: statistics.median(r["cpu_s"] for r in got[m]) for m in modes}
        print(f"{threads:7d} {1000 * ms['exact']:9.1f} {1000 * ms['pinned']:9.1f} "
              f"{1000 * ms['plain']:9.1f} {ms['exact'] / ms['pinned']:7.2f} "
              f"{ms['exact'] / ms['plain']:8.2f} {mb['exact']:9.0f} {mb['pinned']:9.0f} "
              f"{mb['plain']:9.0f} {mb['exact'] / mb['pinned']:7.2f} "
              f"{cs['exact'] / cs['pinned']:7.2f} {cs['exact'] / cs['plain']:7.2f}")
    print("cpu e/p, cpu e/pl: the same ratios in process CPU time (a shared machine's")
    print("contention inflates wall times; CPU time counts every thread's work)")
    print("target: exact / stock (plain) <= 3 per step, <= 1.5 peak memory; pinned mode (stock")
    print("kernels, its shards on a pool of threads) is the stricter reference")
    if args.profile:
        print("\nWhere exact mode's step time goes (1 thread, cProfile, own time):")
        _run(args.config, "exact", 1, args.steps, args.overrides, profile=True)


if __name__ == "__main__":
    main()
