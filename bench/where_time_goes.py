"""Where a tiny model's step goes (issue 24, item 5): the pipeline's per-step
time on a config beside the plain PyTorch loop's (bench/loops.py, the same
work as bench/peers.py's contenders), at the config's shard count and at 1
shard (what sharding costs), and the pipeline's step split by part under
cProfile (fractions only: the profiler's own cost inflates small calls);
then whether one batched pass over the shards (``torch.func.vmap`` of
``torch.func.grad``) gives each shard's gradient with the bits of its own
pass, per MLP shape: the idea for a cheaper step that keeps world-size
invariance, which holds only if it is bitwise on every shape.

    .venv/bin/python bench/where_time_goes.py [--config configs/digits.toml] [--steps N]

Pinned numeric profile, one thread, as peers.py. Prints a table of per-step
times, then the parts' shares of the profiled loop.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
from pathlib import Path

import loops  # bench/loops.py: the script's directory is first on sys.path

# The loop's parts, by the function whose cumulative time is the part's.
PARTS = {
    "shard forward+backward (Net.shard_grads, all shards)": "shard_grads",
    "the shards' tree (add_grads)": "add_grads",
    "the ranks' exchange (LocalComm.exchange)": "exchange",
    "optimiser step": "step",
    "trail: a fingerprint of every parameter": "fingerprints",
    "batch gather (examples.get)": "get",
    "epoch-end metrics (test split)": "_metrics",
    "dropout masks and shard streams (rng.key)": "key",
}


def per_step(run: object, b: loops.Loaded, short: int, long: int, rounds: int) -> float:
    """Median over rounds of (long - short) / (long - short steps) seconds."""
    run(b, short)  # type: ignore[operator]  # warm-up: first calls, caches
    out = []
    for _ in range(rounds):
        t_short = run(b, short).seconds  # type: ignore[operator]
        t_long = run(b, long).seconds  # type: ignore[operator]
        out.append((t_long - t_short) / (long - short))
    return statistics.median(out)


# (inputs, hidden, classes, rows per shard, shards): digits' MLP and larger.
VMAP_SHAPES = [(64, 128, 10, 8, 8), (64, 256, 10, 8, 8), (64, 128, 10, 8, 64),
               (784, 512, 10, 16, 8)]


def vmap_check() -> None:
    """Per shape: bitwise equal per-shard gradients, and ms for the loop of
    passes vs one vmapped pass (after a warm-up)."""
    import time

    import torch
    from torch.func import functional_call, grad, vmap

    print("\n| MLP (in, hidden, classes), rows x shards | vmap bitwise = loop | loop ms "
          "| vmap ms |\n|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for din, h, c, rows, n in VMAP_SHAPES:
        m = torch.nn.Sequential(torch.nn.Linear(din, h), torch.nn.ReLU(), torch.nn.Linear(h, c))
        params = {k: v.detach() for k, v in m.named_parameters()}
        x, y = torch.randn(n, rows, din, generator=gen), torch.randint(0, c, (n, rows),
                                                                      generator=gen)

        def loss(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
            logits = functional_call(m, p, (xs,))  # noqa: B023 - used at once
            return torch.nn.functional.cross_entropy(logits, ys, reduction="sum")

        g = grad(loss)
        times = {}
        for how in ("loop", "vmap", "loop", "vmap"):  # the second of each is timed
            t0 = time.perf_counter()
            for _ in range(20):
                out = ([g(params, x[s], y[s]) for s in range(n)] if how == "loop"
                       else vmap(g, in_dims=(None, 0, 0))(params, x, y))
            times[how] = (time.perf_counter() - t0) / 20
            if how == "loop":
                loop = out
            else:
                batched = out
        same = all(torch.equal(loop[s][k], batched[k][s]) for s in range(n) for k in params)
        print(f"| ({din}, {h}, {c}), {rows} x {n} | {same} | {times['loop'] * 1e3:.2f} "
              f"| {times['vmap'] * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=loops.ROOT / "configs" / "digits.toml")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    loops.pin()
    import torch

    torch.set_num_threads(1)
    base = loops.load(args.config, [])
    one = loops.load(args.config, ["train.shards=1"])
    short, long = args.steps // 4, args.steps
    plain = per_step(loops.plain, base, short, long, args.rounds)
    sharded = per_step(loops.pipeline, base, short, long, args.rounds)
    single = per_step(loops.pipeline, one, short, long, args.rounds)
    shards = base.cfg.train.shards
    print(f"| {args.config.name}, per step | ms | / plain |\n|---|---|---|")
    for name, t in (("plain PyTorch loop", plain), (f"pipeline, {shards} shards", sharded),
                    ("pipeline, 1 shard", single)):
        print(f"| {name} | {t * 1e3:.3f} | {t / plain:.2f} |")
    prof = cProfile.Profile()
    prof.enable()
    loops.pipeline(base, long)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = max(v[3] for k, v in stats.items() if k[2] == "train")
    print(f"\n| part of the profiled loop ({shards} shards, {long} steps) | share |\n|---|---|")
    for label, fn in PARTS.items():
        cum = sum(v[3] for k, v in stats.items() if k[2] == fn and "pipeline" in k[0])
        print(f"| {label} | {cum / total:.0%} |")
    print(f"\n| the loop's self time by kind (each function's own time) | share |\n|---|---|")
    for label, share in self_time(stats, total).items():
        print(f"| {label} | {share:.0%} |")
    vmap_check()


def self_time(stats: dict, total: float) -> dict[str, float]:
    """Self time split into torch's autograd engine (backward kernels), torch's
    other built-ins (forward kernels, tensor methods), torch's Python (module
    calls, functional wrappers) and the pipeline's own Python."""
    out = {"torch autograd engine (the backward passes' kernels)": 0.0,
           "torch kernels and tensor methods (forward, optimiser, tree)": 0.0,
           "torch's Python (nn.Module calls, functional wrappers)": 0.0,
           "the pipeline's own Python (shards, tree, trail, loop)": 0.0, "other": 0.0}
    keys = list(out)
    for (path, _, name), v in stats.items():
        t = v[2]
        if "run_backward" in name:
            out[keys[0]] += t
        elif path == "~" and ("torch" in name or "method" in name):
            out[keys[1]] += t
        elif "/torch/" in path:
            out[keys[2]] += t
        elif "/pipeline/" in path:
            out[keys[3]] += t
        else:
            out[keys[4]] += t
    return {k: v / total for k, v in out.items()}


if __name__ == "__main__":
    main()
