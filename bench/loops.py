"""The training loops the benchmarks time (bench_train.py, peers.py), and the
set-up they share: the process pinned to the numeric profile, and a config's
data and model loaded as the pipeline loads them (data verified, decoded,
split), outside any timing.

Every runner trains from scratch for ``steps`` steps and returns a ``Run``:
the seconds it took inside the process, from building the model to the end
of training, evaluating on the test split where the pipeline does (each
epoch's end and the last step), and the trained weights. The user's loop is built from the pipeline's own parts
where they are the same by definition: the factory's module initialised by
``pinned.build_module``, the optimiser by ``stock_optim.TorchOptimizer``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.core import environment  # noqa: E402


def pin() -> Any:
    """Re-execute this script under the pinned numeric profile if the process
    does not have it (it must be set before torch loads: pytorch issue 15359),
    then apply its in-process settings; return the profile."""
    profile = environment.load_profile()
    environment.check_host(profile)  # a CPU without the profile's ISA: refused, named
    if environment.needs_reexec(profile):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **profile.env})
    environment.apply_in_process(profile)
    return profile


class Run(NamedTuple):
    seconds: float
    weights: dict[str, Any]  # name -> tensor


@dataclass(frozen=True)
class Loaded:
    """A config with its data and model factory, ready to train."""

    path: Path
    cfg: Any
    ds: Any
    parts: Any
    train_ids: Any
    test_ids: Any
    steps: int  # the config's own number of steps

    def with_steps(self, steps: int) -> Any:
        """The config, stopped after ``steps`` steps (train.max_steps)."""
        return dataclasses.replace(self.cfg, train=dataclasses.replace(self.cfg.train,
                                                                       max_steps=steps))


def load(path: Path, overrides: list[str]) -> Loaded:
    """Load ``path`` with ``overrides`` as ``pipeline train`` does: data
    verified against the manifest and decoded, the factory imported."""
    from pipeline import recipe
    from pipeline.core.config import load_config
    from pipeline.data import sampling

    cfg = load_config(path, overrides)
    prep = recipe.prepare(cfg, [], path.resolve().parent)
    train_ids, test_ids = sampling.split(prep.ds, cfg.seed, cfg.data.test_fraction,
                                         cfg.data.context)
    steps = (len(train_ids) // cfg.train.batch_size) * cfg.train.epochs
    steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps else steps
    return Loaded(path, cfg, prep.ds, prep.parts, train_ids, test_ids, steps)


def pipeline(b: Loaded, steps: int, ckpt: bool = False, threads: int | None = 1) -> Run:
    """``pipeline.train.loop.train`` (the config's mode), no run record; with
    ``ckpt``, its checkpoints written to a temporary directory. One thread
    by default, as the user's loops run here (``threads=None``: the
    pipeline's own default, every core)."""
    from pipeline import modes
    from pipeline.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = train(b.with_steps(steps), b.ds, modes.of(b.cfg.mode), b.parts, run_key="bench",
                    ckpt_dir=Path(tmp) if ckpt else None, quiet=True, threads=threads)
        return Run(time.perf_counter() - t0, res.params)


class UserLoop:
    """What the loop a user would write is made of: the factory's module, the
    config's optimiser, a shuffled order cut into whole batches, the stock
    mean cross-entropy over the batch, evaluation on the test split."""

    def __init__(self, b: Loaded) -> None:
        import numpy as np
        import torch

        self.b, self.cfg = b, b.cfg
        self.x = torch.from_numpy(np.ascontiguousarray(b.ds.x))
        self.y = torch.from_numpy(b.ds.y) if b.ds.y is not None else None
        self.tr, self.te = torch.from_numpy(b.train_ids), torch.from_numpy(b.test_ids)
        self.per_epoch = len(b.train_ids) // self.cfg.train.batch_size

    def model(self) -> Any:
        """The factory's module, initialised exactly as the pipeline's."""
        from pipeline.train.pinned import build_module

        shape, classes = self.b.ds.shapes(self.cfg.data.context)
        f = self.b.parts.factory
        return build_module(f.function, f.name, shape, classes, self.cfg.model.args,
                            self.cfg.seed)

    def optimizer(self, model: Any) -> Any:
        """The torch.optim optimiser the pipeline builds from the config (at
        the base rate: the plain loop does not follow a warm-up or cosine
        schedule, nor clip)."""
        from pipeline.train.stock_optim import TorchOptimizer

        t = self.cfg.train
        total = self.per_epoch * t.epochs if not t.max_steps else min(
            self.per_epoch * t.epochs, t.max_steps)
        return TorchOptimizer(self.cfg.optim, dict(model.named_parameters()), total).opt

    def batches(self) -> Batches:
        import torch

        torch.manual_seed(self.cfg.seed)
        return Batches(self, self.tr[torch.randperm(len(self.tr))])

    def batch(self, idx: Any) -> tuple[Any, Any]:
        """Inputs and targets of examples ``idx``: rows, or windows of tokens."""
        import torch

        if self.y is not None:
            return self.x[idx], self.y[idx]
        ctx = self.cfg.data.context
        pos = (idx * ctx)[:, None] + torch.arange(ctx)  # (B, T) token positions
        return self.x[pos], self.x[pos + 1]

    @staticmethod
    def loss(logits: Any, y: Any) -> Any:
        import torch.nn.functional as F

        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def due(self, done: int, steps: int) -> bool:
        """Whether the pipeline evaluates after ``done`` of ``steps`` steps."""
        return done % self.per_epoch == 0 or done == steps

    def evaluate(self, model: Any) -> float:
        """Summed test cross-entropy, in chunks of 256 examples."""
        import torch
        import torch.nn.functional as F

        model.eval()
        with torch.no_grad():
            total = 0.0
            for i in range(0, len(self.te), 256):
                xb, yb = self.batch(self.te[i:i + 256])
                logits = model(xb)
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                               yb.reshape(-1), reduction="sum"))
        model.train()
        return total


class Batches:
    """One epoch of whole batches, drawn lazily in a fixed shuffled order."""

    def __init__(self, loop: UserLoop, perm: Any) -> None:
        self.loop, self.perm = loop, perm
        self.bsz = loop.cfg.train.batch_size

    def __len__(self) -> int:
        return self.loop.per_epoch

    def at(self, s: int) -> tuple[Any, Any]:
        """The batch of step ``s`` (0-based; epochs repeat the order)."""
        b = s % self.loop.per_epoch
        return self.loop.batch(self.perm[b * self.bsz:(b + 1) * self.bsz])

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        return (self.at(s) for s in range(len(self)))


def plain(b: Loaded, steps: int) -> Run:
    """The loop a user would write: zero_grad, backward, step."""
    t0 = time.perf_counter()
    loop = UserLoop(b)
    model = loop.model()
    opt = loop.optimizer(model)
    data = loop.batches()
    model.train()
    for s in range(steps):
        xb, yb = data.at(s)
        loss = loop.loss(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loop.due(s + 1, steps):
            loop.evaluate(model)
    return Run(time.perf_counter() - t0, model.state_dict())
