"""The training loop: setup, data, model, optimiser, loop, save. It reads
top to bottom; helpers below carry detail out of it, never control flow."""

from __future__ import annotations

import math
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..core import _testing, rng, usercode
from ..core.config import Config
from ..core.errors import DivergedError, Interrupted, Preempted
from ..core.hashing import fingerprints
from ..core.rng import DropoutStream
from ..data.dataset import Dataset
from ..data.augment import Augmenter, augmenter
from ..data.loader import Loader
from ..data.sampling import batches, epoch_order, split, split3
from . import checkpoint, preempt
from .checkpoint import Progress
from .determinism import seed_everything, strict_torch
from .distributed import LocalComm, TreeFold, add_grads
from .net import LoopMasks, Maker, Net, StepState
from .threads import ShardRunner

__all__ = ["train", "TrainResult", "examples_of", "score"]


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]   # parameters and persistent buffers: the weights
    metrics: list[dict[str, Any]]
    trail: bytes
    trail_names: list[str]
    steps: int
    resumed_from: int = 0
    threads: dict[str, Any] | None = None  # how the cores were used (pipeline.train.threads)
    structure: dict[str, Any] | None = None  # frozen, tied, buffers (Net.structure)
    loop_s: float = 0.0  # wall time of the loop (steps, metrics, checkpoints), not the setup


def train(cfg: Config, ds: Dataset, mode: Maker, parts: Any, *, run_key: str,
          ckpt_dir: Path | None, comm: Any = None, device: str = "cpu",
          quiet: bool = False, threads: int | None = None,
          loader_workers: int = 0) -> TrainResult:
    """Train ``cfg`` on ``ds`` in numeric ``mode`` (pipeline.modes) with the
    model ``parts`` (pipeline.models.Parts); resume from ``ckpt_dir``'s newest
    valid checkpoint of this run, and write checkpoints there (rank 0).
    ``threads``: cores to use, None for all (pipeline.train.threads; the bits
    do not depend on it); ``loader_workers``: threads preparing batches ahead
    (pipeline.data.loader; nor do the bits depend on it)."""
    comm = comm or LocalComm()
    dev = torch.device(device)
    seed_everything(cfg.seed)
    strict_torch()

    # Data: the split and every epoch's order come from the seed and the data hash.
    ctx = cfg.data.context
    train_ids, val_ids, test_ids = split3(ds, cfg.seed, cfg.data.test_fraction,
                                          cfg.data.val_fraction, ctx)
    examples = examples_of(ds, ctx, dev)
    bsz = cfg.train.batch_size
    steps_per_epoch = len(train_ids) // bsz
    total = steps_per_epoch * cfg.train.epochs
    if cfg.train.max_steps:
        total = min(total, cfg.train.max_steps)
    n_global = bsz * ds.task.targets_per_example(ctx)  # the loss is a mean over these

    # Model, optimiser, the dropout stream; then whatever a checkpoint restores.
    net = mode.make_net(cfg, ds, dev, parts)
    comm.expect(net.trainable)
    opt = mode.make_optimizer(cfg, net, total)  # the schedule spans the run's steps
    dropout = DropoutStream(cfg.seed)
    st = Progress()
    resumed = checkpoint.restore(ckpt_dir, run_key, cfg, net, opt, dropout, st)
    writer = checkpoint.Writer(ckpt_dir, run_key, cfg) if ckpt_dir and comm.rank == 0 else None
    runner = ShardRunner(net, threads, cfg.train.shards // comm.size, mode.pins_threads())

    bar = tqdm(total=total, initial=st.step, disable=quiet or not sys.stderr.isatty(),
               desc="train", unit="step", leave=False)
    aug = augmenter(cfg.data.augment, cfg.seed, parts.transform.function
                    if getattr(parts, "transform", None) else None)
    loader = Loader(_batch_maker(examples, aug, train_ids, cfg.seed, bsz, steps_per_epoch),
                    st.step, total, loader_workers)  # the bits never depend on the workers
    last_save = time.monotonic()
    loop_started = time.perf_counter()
    late = usercode.LateImports()  # user modules the key did not see: refused when imported
    with preempt.watch():  # SIGTERM/SIGUSR1: stop after a step, checkpointed
        try:
            while st.step < total:
                x, y = loader.get(st.step)  # this step's batch, augmented by key
                masks = _loop_masks(net, dropout, bsz)
                with usercode.guarded("a training step", "model.factory", step=st.step + 1,
                                      always=False):  # a failure in the user's forward or loss
                    (loss, grads), stop = _step_grads(net, x, y, masks, cfg, st.step, n_global,
                                                      comm, dev, runner, late)
                if isinstance(net, StepState):
                    grads = net.end_step(grads, cfg.train.shards)
                if not math.isfinite(step_loss := float(loss)):
                    raise DivergedError(st.step + 1, f"the loss ({step_loss})")
                opt.step(grads)
                st.step += 1
                st.loss_sum += step_loss / n_global
                st.trail += fingerprints(net.params)  # checkpoint.TRAIL_DIGEST bytes a tensor
                bar.update(1)
                if st.step % steps_per_epoch == 0 or st.step == total:
                    st.metrics.append(_metrics(net, examples, test_ids, st, steps_per_epoch,
                                               val_ids))
                    late.check("scoring the test split", st.step)
                    st.loss_sum = 0.0
                    bar.set_postfix({k: f"{v:.4f}" for k, v in st.metrics[-1].items()
                                     if k.startswith(("test_", "val_"))})
                if stop and st.step < total:  # every rank learnt it with this step's gradients
                    _stop(writer, net, opt, dropout, st, comm.rank)
                if writer and st.step < total and _checkpoint_due(cfg, st.step, steps_per_epoch,
                                                                  last_save):
                    _check_finite(net, st.step)  # a checkpoint never holds what diverged
                    writer.save(net, opt, dropout, st)
                    last_save = time.monotonic()
                _testing.fault("step", st.step, comm.rank, writer.wait if writer else None)
        except KeyboardInterrupt:
            raise Interrupted(st.step) from None  # the CLI prints one line: rerun to resume
        finally:
            loader.close()
            runner.close()
            if writer:
                writer.close()  # every checkpoint on disk (or its error raised) before returning
            bar.close()
    loop_s = time.perf_counter() - loop_started
    _check_finite(net, st.step)
    mode.check_process()  # whatever the run loaded since the net was built

    state = {**net.params, **net.buffers}
    weights = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return TrainResult(weights, st.metrics, bytes(st.trail), sorted(net.params), st.step,
                       resumed, {**runner.record(), **mode.how_it_ran(),
                                 **({"loader_workers": loader_workers} if loader_workers else {})},
                       net.structure(),
                       loop_s)


class _Examples:
    """The dataset's examples on the device: rows (classification) or windows
    of ``context`` tokens and their next tokens (language modelling). A mapped
    dataset's inputs stay in their file: each call gathers just its rows
    (pipeline.data.mapped.Rows.take), the same float32 bits as the in-memory tensor's."""

    def __init__(self, ds: Dataset, context: int, dev: torch.device) -> None:
        self.ds, self.context, self.dev = ds, context, dev
        if isinstance(ds.x, np.ndarray):
            self.x, self.rows = torch.from_numpy(np.ascontiguousarray(ds.x)).to(dev), None
        else:
            self.x, self.rows = torch.empty(0), ds.x
        self.y = torch.from_numpy(ds.y).to(dev) if ds.y is not None else None
        self.offsets = torch.arange(context, device=dev)
        self.targets_per_example = ds.task.targets_per_example(context)

    def get(self, ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of examples ``ids``: (B, ...) and (B,), or (B, T) twice."""
        if self.y is not None:
            idx = torch.from_numpy(np.asarray(ids)).to(self.dev)
            if self.rows is not None:
                return torch.from_numpy(self.rows.take(ids)).to(self.dev), self.y[idx]
            return self.x[idx], self.y[idx]
        starts = torch.from_numpy(self.ds.starts(ids, self.context)).to(self.dev)
        pos = starts[:, None] + self.offsets                   # (B, T) token positions
        return self.x[pos], self.x[pos + 1]


def _batch_maker(examples: _Examples, aug: Augmenter | None, train_ids: np.ndarray, seed: int,
                 bsz: int, steps_per_epoch: int) -> Any:
    """``make(step)``: step's (x, y), its examples from the epoch's order, augmented
    by (seed, epoch, example); a pure function of the step, safe on loader threads."""
    lock, orders = threading.Lock(), {}

    def make(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, b = divmod(step, steps_per_epoch)
        with lock:  # one epoch order computed once; gathers one at a time (mapped rows)
            if epoch not in orders:
                if len(orders) > 2:  # workers ahead span at most a few epochs; pure anyway
                    orders.clear()
                orders[epoch] = batches(epoch_order(train_ids, seed, epoch), bsz)
            ids = orders[epoch][b]
            x, y = examples.get(ids)
        if aug is not None:  # by (seed, epoch, example): pipeline.data.augment
            x = _augmented(aug, x, ids, epoch)
        return x, y

    return make


def _augmented(aug: Augmenter, x: torch.Tensor, ids: np.ndarray, epoch: int) -> torch.Tensor:
    """The batch's inputs augmented on the CPU (the user's transform guarded as
    user code), back on ``x``'s device."""
    with usercode.guarded("an augmentation transform", "data.augment.transform",
                          always=False):
        out = aug.batch(x.cpu().numpy(), ids, epoch)
    return torch.from_numpy(out).to(x.device)


def examples_of(ds: Dataset, context: int, dev: torch.device) -> _Examples:
    """The dataset's examples as the loop draws them (also the recipe's model check)."""
    return _Examples(ds, context, dev)


def score(net: Net, ds: Dataset, cfg: Config, device: str = "cpu") -> tuple[str, float, int]:
    """(the task's test metric, its value, the test examples) of ``net`` on the
    test split ``cfg`` draws from ``ds``, computed as the loop computes it at an
    epoch's end (``pipeline eval``: the recorded metric again, or another dataset's)."""
    ctx = cfg.data.context
    _, test_ids = split(ds, cfg.seed, cfg.data.test_fraction, ctx)
    metric, examples = ds.task.metric, examples_of(ds, ctx, torch.device(device))
    return metric, _SCORES[metric](net, examples, test_ids), len(test_ids)


def _checkpoint_due(cfg: Config, step: int, steps_per_epoch: int, last_save: float) -> bool:
    """A checkpoint after ``step``: at a multiple of ``train.checkpoint_every``
    or an epoch's end, once ``train.checkpoint_seconds`` have passed since the
    last one (or the start). Where checkpoints fall never changes the bits
    (resume is bitwise); the end of the run is the run directory itself."""
    every = cfg.train.checkpoint_every
    at = (every and step % every == 0) or step % steps_per_epoch == 0
    return bool(at) and time.monotonic() - last_save >= cfg.train.checkpoint_seconds


def _stop(writer: checkpoint.Writer | None, net: Net, opt: Any, dropout: DropoutStream,
          st: Progress, rank: int) -> None:
    """Preempted after step ``st.step``: rank 0 checkpoints it (the loop's
    ``finally`` waits for the write), every rank raises Preempted."""
    if writer:
        _check_finite(net, st.step)
        writer.save(net, opt, dropout, st)
    why = preempt.requested() or "SIGTERM/SIGUSR1 to another rank"
    saved = "rank 0 checkpointed it" if writer or rank else "no checkpoint directory"
    raise Preempted(f"preempted after step {st.step} ({why}); {saved}: rerun the same "
                    f"command to resume", st.step)


def _check_finite(net: Net, step: int) -> None:
    """DivergedError naming the first parameter or buffer holding NaN or inf."""
    for name, t in {**net.params, **net.buffers}.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise DivergedError(step, f"{name}")


def _loop_masks(net: Net, dropout: DropoutStream, bsz: int) -> list[np.ndarray]:
    """This step's dropout masks, drawn from the run's stream, for a net that
    takes them from the loop (LoopMasks); none for the others."""
    if not isinstance(net, LoopMasks):
        return []
    return [dropout.keep_mask(net.dropout_rate, bsz, w) for w in net.dropout_widths()]


def _step_grads(net: Net, x: torch.Tensor, y: torch.Tensor, masks: list[np.ndarray],
                cfg: Config, step: int, n_global: int, comm: Any, dev: torch.device,
                runner: ShardRunner, late: usercode.LateImports | None = None
                ) -> tuple[tuple[torch.Tensor, dict[str, torch.Tensor]], bool]:
    """This rank's shards, each on its own rows and with its own random stream
    (key(seed, FORWARD, step, shard)), run by ``runner`` (in order, or at once
    on threads), summed in the fixed tree in shard order; then the ranks'
    partial sums finish the same tree (pipeline.train.distributed); with them,
    whether any rank was asked to stop (pipeline.train.preempt)."""
    bsz, shards = cfg.train.batch_size, cfg.train.shards
    rows = bsz // shards
    per_rank = shards // comm.size

    def job(s: int) -> Any:
        sl = slice(s * rows, (s + 1) * rows)
        keep = [torch.from_numpy(m[sl]).to(dev) for m in masks] or None
        stream = rng.key(cfg.seed, rng.FORWARD, step, s)
        return lambda: net.shard_grads(x[sl], y[sl], n_global, keep, stream, step=step,
                                       row0=s * rows)

    fold = TreeFold(add_grads)  # the tree, folded as the shards finish: O(log S) sums held
    runner.run_into([job(s) for s in range(comm.rank * per_rank, (comm.rank + 1) * per_rank)],
                    fold.push)
    if late is not None:  # before the exchange: a rank that refuses stops its peers there
        late.check("a training step", step + 1)
    return comm.exchange(fold.result(), preempt.requested() is not None)


def _metrics(net: Net, examples: _Examples, test_ids: np.ndarray, st: Progress,
             steps_per_epoch: int, val_ids: np.ndarray) -> dict[str, Any]:
    """At an epoch's end (or the last step): the mean train loss since the last
    record, and the test split's accuracy (classification) or loss per token;
    the validation split's too (``val_accuracy``, ``val_loss``), if there is one."""
    since = st.metrics[-1]["step"] if st.metrics else 0
    metric = examples.ds.task.metric
    out = {"epoch": -(-st.step // steps_per_epoch), "step": st.step,
           "train_loss": st.loss_sum / max(st.step - since, 1),
           metric: _SCORES[metric](net, examples, test_ids)}
    if len(val_ids):
        out[metric.replace("test_", "val_", 1)] = _SCORES[metric](net, examples, val_ids)
    return out


@torch.no_grad()
def _accuracy(net: Net, examples: _Examples, ids: np.ndarray, chunk: int = 1024) -> float:
    """Accuracy over ``ids``, ``chunk`` examples at a time (a mapped test split is
    never gathered whole)."""
    right = 0
    for i in range(0, len(ids), chunk):
        x, y = examples.get(ids[i:i + chunk])
        right += int((net.predict(x).argmax(dim=1) == y).sum())  # first maximum on ties
    return right / len(ids)


@torch.no_grad()
def _test_loss(net: Net, examples: _Examples, ids: np.ndarray, chunk: int = 256) -> float:
    """Mean cross-entropy per target token over ``ids``: chunks of ``chunk``
    examples (each the net's ``loss_sum``), summed in order in float64."""
    total = 0.0
    for i in range(0, len(ids), chunk):
        x, y = examples.get(ids[i:i + chunk])
        total += net.loss_sum(net.predict(x), y)
    return total / (len(ids) * examples.targets_per_example)


# The task's test metric (pipeline.data.task.Task.metric) -> how it is computed.
_SCORES = {"test_accuracy": _accuracy, "test_loss": _test_loss}
