"""Benchmark: the world-size-invariant reduction against a plain all_reduce.

    .venv/bin/python bench/bench_distributed.py [--world 2] [--shards 4] [--steps 150]

Not a test: prints a table. W ranks (gloo on 127.0.0.1, one thread each) run
the training step of pipeline.train.loop on a pinned-mode MLP: their shards'
gradients, the fixed tree, ``TorchComm.combine`` (all_gather of one flat
buffer per rank + the tree over ranks, or with plain=True ``all_reduce(SUM)``),
the optimiser. The two reductions alternate in blocks of 10 steps in the same
processes; the numbers are rank 0's medians per step. Rows: the digits model
(configs/digits.toml) and a wide one, where the gradient buffer dominates.
The target is step(invariant) / step(plain) <= 1.3 at world size 2.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from pipeline import modes  # noqa: E402
from pipeline.core.config import Config, ModelConfig, TrainConfig  # noqa: E402
from pipeline.train.distributed import TorchComm, add_grads, tree_reduce  # noqa: E402

BLOCK = 10  # steps per block; the two reductions alternate block by block


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _net(cfg: Config, dev: torch.device) -> modes.Net:
    """The config's net for digits-shaped inputs (64 features, 10 classes)."""
    from types import SimpleNamespace

    from pipeline.models import resolve

    shapes = SimpleNamespace(shapes=lambda context: ((64,), 10))
    parts = resolve(cfg.model.factory, cfg.train.loss, None)
    return modes.of(cfg.mode).make_net(cfg, shapes, dev, parts)  # type: ignore[arg-type]


def _rank(rank: int, world: int, port: int, hidden: tuple[int, ...], shards: int, steps: int,
          out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = Config(model=ModelConfig(args={"hidden": list(hidden), "dropout": 0.0}),
                 train=TrainConfig(batch_size=64, shards=shards))
    dev = torch.device("cpu")
    net, gen = _net(cfg, dev), torch.Generator().manual_seed(0)
    opt = modes.of(cfg.mode).make_optimizer(cfg, net, steps)
    x, y = torch.rand(64, 64, generator=gen), torch.randint(0, 10, (64,), generator=gen)
    comms = {"invariant": TorchComm(dev, plain=False), "plain": TorchComm(dev, plain=True)}
    rows, per = 64 // shards, shards // world
    times: dict[str, dict[str, list[float]]] = {m: {"step": [], "reduce": []} for m in comms}
    for block in range(2 * (steps // BLOCK) + 2):  # the first two blocks warm up
        mode = "invariant" if block % 2 == 0 else "plain"
        for _ in range(BLOCK):
            dist.barrier()
            t0 = time.perf_counter()
            parts = [net.shard_grads(x[s * rows:(s + 1) * rows], y[s * rows:(s + 1) * rows],
                                     64, None) for s in range(rank * per, (rank + 1) * per)]
            partial = tree_reduce(parts, add_grads)
            t1 = time.perf_counter()
            _, grads = comms[mode].combine(partial)
            t2 = time.perf_counter()
            opt.step(grads)
            t3 = time.perf_counter()
            if block >= 2:
                times[mode]["step"].append(t3 - t0)
                times[mode]["reduce"].append(t2 - t1)
    if rank == 0:
        n = sum(p.numel() for p in net.params.values())
        med = {m: {k: statistics.median(v) * 1e3 for k, v in t.items()} for m, t in times.items()}
        Path(out).write_text(json.dumps([n, med]))
    dist.destroy_process_group()


def _measure(world: int, hidden: tuple[int, ...], shards: int, steps: int) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result")
        mp.spawn(_rank, args=(world, _free_port(), hidden, shards, steps, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--steps", type=int, default=150, help="measured steps per reduction")
    a = ap.parse_args()
    print(f"world size {a.world}, train.shards={a.shards}, batch 64, {a.steps} steps per "
          f"reduction, gloo on 127.0.0.1, 1 thread per rank, rank 0's medians\n")
    head = (f"{'model':<22} {'params':>9} {'reduce inv ms':>14} {'reduce plain ms':>16} "
            f"{'step inv ms':>12} {'step plain ms':>14} {'step ratio':>11}")
    print(head)
    print("-" * len(head))
    for name, hidden in (("digits 64-128-10", (128,)), ("wide 64-1024-1024-10", (1024, 1024))):
        n, med = _measure(a.world, hidden, a.shards, a.steps)
        inv, plain = med["invariant"], med["plain"]
        print(f"{name:<22} {n:>9} {inv['reduce']:>14.3f} {plain['reduce']:>16.3f} "
              f"{inv['step']:>12.3f} {plain['step']:>14.3f} "
              f"{inv['step'] / plain['step']:>11.3f}")
    print("\ntarget: step ratio (invariant / plain all_reduce) <= 1.3")


if __name__ == "__main__":
    main()
