"""The training loop: setup, data, model, optimiser, loop, save. It reads
top to bottom; helpers below carry detail out of it, never control flow."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import _testing, checkpoint, modes
from .checkpoint import TRAIL_DIGEST, Progress
from .config import Config
from .dataset import Dataset
from .determinism import seed_everything, strict_torch
from .distributed import LocalComm, add_grads, tree_reduce
from .errors import Interrupted
from .hashing import tensor_digests
from .modes import Net
from .rng import DropoutStream
from .sampling import batches, epoch_order, split

__all__ = ["train", "TrainResult"]


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    trail: bytes
    trail_names: list[str]
    steps: int
    resumed_from: int = 0


def train(cfg: Config, ds: Dataset, *, run_key: str, ckpt_dir: Path | None,
          comm: Any = None, device: str = "cpu", quiet: bool = False) -> TrainResult:
    """Train ``cfg`` on ``ds``; resume from ``ckpt_dir``'s newest valid
    checkpoint of this run, and write checkpoints there (rank 0)."""
    comm = comm or LocalComm()
    dev = torch.device(device)
    seed_everything(cfg.seed)
    strict_torch()

    # Data: the split and every epoch's order come from the seed and the data hash.
    train_ids, test_ids = split(ds, cfg.seed, cfg.data.test_fraction)
    x_all = torch.from_numpy(ds.x).to(dev)
    y_all = torch.from_numpy(ds.y).to(dev)
    bsz = cfg.train.batch_size
    steps_per_epoch = len(train_ids) // bsz
    total = steps_per_epoch * cfg.train.epochs
    if steps_per_epoch == 0:
        raise ValueError(f"train.batch_size={bsz} exceeds the {len(train_ids)} training rows")

    # Model, optimiser, the dropout stream; then whatever a checkpoint restores.
    mode = modes.of(cfg.mode)
    net = mode.make_net(cfg, ds, dev)
    opt = mode.make_optimizer(cfg, net)
    dropout = DropoutStream(cfg.seed)
    st = Progress()
    resumed = checkpoint.restore(ckpt_dir, run_key, cfg, net, opt, dropout, st)
    writer = checkpoint.Writer(ckpt_dir, run_key, cfg) if ckpt_dir and comm.rank == 0 else None

    bar = tqdm(total=total, initial=st.step, disable=quiet or not sys.stderr.isatty(),
               desc="train", unit="step", leave=False)
    order = None
    try:
        while st.step < total:
            epoch, b = divmod(st.step, steps_per_epoch)
            if order is None or b == 0:
                order = batches(epoch_order(train_ids, cfg.seed, epoch), bsz)
            idx = torch.from_numpy(order[b]).to(dev)
            masks = [dropout.keep_mask(cfg.model.dropout, bsz, w) for w in net.dropout_widths()]
            loss, grads = _step_grads(net, x_all[idx], y_all[idx], masks, cfg, comm, dev)
            opt.step(grads)
            st.step += 1
            st.loss_sum += float(loss) / bsz
            st.trail += tensor_digests(net.params, TRAIL_DIGEST)
            bar.update(1)
            if st.step % steps_per_epoch == 0:
                acc = _accuracy(net, x_all, y_all, test_ids, dev)
                st.metrics.append({"epoch": epoch + 1, "step": st.step,
                                   "train_loss": st.loss_sum / steps_per_epoch,
                                   "test_accuracy": acc})
                st.loss_sum = 0.0
                bar.set_postfix(acc=f"{acc:.4f}")
            every = cfg.train.checkpoint_every
            if writer and st.step < total and (
                    (every and st.step % every == 0) or st.step % steps_per_epoch == 0):
                writer.save(net, opt, dropout, st)
            _testing.fault("step", st.step, comm.rank, writer.wait if writer else None)
    except KeyboardInterrupt:
        raise Interrupted(st.step) from None  # the CLI prints one line: rerun to resume
    finally:
        if writer:
            writer.close()  # every checkpoint on disk (or its error raised) before returning
        bar.close()

    params = {k: v.detach().cpu().contiguous() for k, v in net.params.items()}
    return TrainResult(params, st.metrics, bytes(st.trail), sorted(params), st.step, resumed)


def _step_grads(net: Net, x: torch.Tensor, y: torch.Tensor, masks: list[np.ndarray],
                cfg: Config, comm: Any, dev: torch.device
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This rank's shards, each on its own rows, summed in the fixed tree;
    then the ranks' partial sums finish the same tree (pipeline.distributed)."""
    bsz, shards = cfg.train.batch_size, cfg.train.shards
    rows = bsz // shards
    per_rank = shards // comm.size
    parts = []
    for s in range(comm.rank * per_rank, (comm.rank + 1) * per_rank):
        sl = slice(s * rows, (s + 1) * rows)
        keep = [torch.from_numpy(m[sl]).to(dev) for m in masks] or None
        parts.append(net.shard_grads(x[sl], y[sl], bsz, keep))
    return comm.combine(tree_reduce(parts, add_grads))


@torch.no_grad()
def _accuracy(net: Net, x: torch.Tensor, y: torch.Tensor, ids: np.ndarray,
              dev: torch.device) -> float:
    idx = torch.from_numpy(ids).to(dev)
    pred = net.predict(x[idx]).argmax(dim=1)  # first maximum on ties
    return int((pred == y[idx]).sum()) / len(ids)
