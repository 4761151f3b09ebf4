"""The training loop: setup, data, model, optimiser, loop, save. It reads
top to bottom; helpers below carry detail out of it, never control flow."""

from __future__ import annotations

import os
import re
import signal
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import checkpoint
from .config import Config, config_to_dict
from .data import Dataset, batches, epoch_order, split
from .determinism import capture_rng, restore_rng, seed_everything, strict_torch
from .distributed import LocalComm, add_grads, kill_for_test, tree_reduce
from .errors import CheckpointError
from .hashing import tensor_digests
from .model import Net, Optimizer, make_net, make_optimizer
from .rng import DropoutStream

__all__ = ["train", "TrainResult"]

TRAIL_DIGEST = 8  # bytes per tensor per step in the trail
# Test-only (docs/architecture-notes.md, "Test-only switches"): SIGKILL this
# process right after step N and its checkpoint, so the resume tests can kill
# a run at a chosen step. Unset in every real run.
KILL_AT_STEP_ENV = "PIPELINE_TEST_KILL_AT_STEP"


@dataclass
class TrainResult:
    params: dict[str, torch.Tensor]
    metrics: list[dict[str, Any]]
    trail: bytes
    trail_names: list[str]
    steps: int
    resumed_from: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """What a checkpoint carries beyond the model and optimiser."""
    step: int = 0
    loss_sum: float = 0.0            # running sum of this epoch's step losses
    metrics: list[dict[str, Any]] = field(default_factory=list)
    trail: bytearray = field(default_factory=bytearray)


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
    net = make_net(cfg, dev)
    opt = make_optimizer(cfg, net)
    dropout = DropoutStream(cfg.seed)
    st = _State()
    resumed = _resume(ckpt_dir, run_key, cfg, net, opt, dropout, st)

    bar = tqdm(total=total, initial=st.step, disable=quiet or not sys.stderr.isatty(),
               desc="train", unit="step", leave=False)
    order = None
    while st.step < total:
        epoch, b = divmod(st.step, steps_per_epoch)
        if order is None or b == 0:
            order = batches(epoch_order(train_ids, cfg.seed, epoch), bsz)
        idx = torch.from_numpy(order[b]).to(dev)
        kill_for_test(comm.rank, st.step)  # test-only: $PIPELINE_TEST_KILL_RANK_AT_STEP
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
        at_interval = cfg.train.checkpoint_every and st.step % cfg.train.checkpoint_every == 0
        if ckpt_dir is not None and comm.rank == 0 and st.step < total and (
                at_interval or st.step % steps_per_epoch == 0):
            _save(ckpt_dir, run_key, cfg, net, opt, dropout, st)
        _kill_for_test(st.step)  # test-only: $PIPELINE_TEST_KILL_AT_STEP
    checkpoint.wait_for_writes()
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


def _save(ckpt_dir: Path, run_key: str, cfg: Config, net: Net, opt: Optimizer,
          dropout: DropoutStream, st: _State) -> None:
    rng_tensors, rng_meta = capture_rng(dropout.counter)
    tensors = {f"param.{k}": v for k, v in net.params.items()}
    tensors.update({f"optim.{k}": v for k, v in opt.state_tensors().items()})
    tensors.update(rng_tensors)
    tensors["trail"] = torch.frombuffer(bytearray(st.trail), dtype=torch.uint8) if st.trail \
        else torch.zeros(0, dtype=torch.uint8)
    meta = {"run_key": run_key, "config": config_to_dict(cfg), "step": st.step,
            "loss_sum": st.loss_sum, "metrics": st.metrics, "rng": rng_meta,
            "optim_scalars": opt.state_scalars()}
    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    # Written in the background (the fsyncs cost steps); train() waits for it at the end.
    checkpoint.save_checkpoint(checkpoint.checkpoint_path(ckpt_dir, st.step), tensors, meta,
                               background=True, then=partial(_prune, Path(ckpt_dir), st.step, 2))


def _prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (so a corrupt newest
    one falls back), and drop what a killed writer left: its temp files, and
    checkpoints past ``step``, which resume found invalid (one writer per run:
    the run lock)."""
    named = {int(m.group(1)): p for p in ckpt_dir.iterdir()
             if (m := re.fullmatch(r"ckpt-(\d{9})\.safetensors", p.name))}
    kept = sorted(n for n in named if n <= step)[-keep:]
    stale = [p for n, p in named.items() if n not in kept]
    for p in stale + list(ckpt_dir.glob(".ckpt-*.tmp")):
        p.unlink(missing_ok=True)


def _resume(ckpt_dir: Path | None, run_key: str, cfg: Config, net: Net, opt: Optimizer,
            dropout: DropoutStream, st: _State) -> int:
    """Restore everything from the newest valid checkpoint, or raise."""
    checkpoint.wait_for_writes()  # one still in flight from an earlier train() lands first
    found = checkpoint.latest_valid(ckpt_dir) if ckpt_dir is not None else None
    if found is None:
        return 0
    path, tensors, meta = found
    where = str(path)
    if meta.get("run_key") != run_key:
        raise CheckpointError(where, f"run key {run_key}", str(meta.get("run_key")),
                              "the checkpoint belongs to another run")
    if meta.get("config") != config_to_dict(cfg):
        raise CheckpointError(where, "the config of this run", "a different config snapshot")
    part = {pre: {k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)}
            for pre in ("param.", "optim.", "rng.")}
    _check_params(where, part["param."], part["optim."], net.params)
    _check_layout(where, tensors, meta, len(net.params))
    with torch.no_grad():
        for k, v in part["param."].items():
            net.params[k].copy_(v)
    try:
        opt.load_state(part["optim."], meta["optim_scalars"])
        dropout.counter = restore_rng(tensors, meta["rng"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # A well-formed file (its hash holds) whose state does not fit this run.
        raise CheckpointError(where, "optimiser and RNG state for this config",
                              f"{type(e).__name__}: {e}") from None
    st.step, st.loss_sum, st.metrics = meta["step"], meta["loss_sum"], meta["metrics"]
    st.trail = bytearray(tensors["trail"].numpy().tobytes())
    print(f"resuming from {path.name} (step {st.step})", file=sys.stderr)
    return st.step


def _check_layout(where: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  n_params: int) -> None:
    """Exactly the named keys, the trail ``step`` steps long, JSON of the right
    types: a checkpoint that passes its hash may still not be ours."""
    extra = sorted(k for k in tensors if not re.fullmatch(
        r"param\..+|optim\..+|rng\.torch_cpu|rng\.cuda\.\d+|trail", k))
    missing = sorted({"trail", "rng.torch_cpu"} - set(tensors))
    if extra or missing:
        raise CheckpointError(where, "tensors param.*, optim.*, rng.torch_cpu, rng.cuda.*, trail",
                              f"unexpected {extra}, missing {missing}")
    types = {"step": int, "loss_sum": float, "metrics": list, "rng": dict, "optim_scalars": dict}
    bad = sorted(k for k, tp in types.items()
                 if isinstance(meta.get(k), bool) or not isinstance(meta.get(k), tp))
    if bad or meta["step"] < 0 or not isinstance(meta["rng"].get("dropout_counter"), int):
        raise CheckpointError(where, f"metadata {types} and an int rng.dropout_counter",
                              f"wrong or missing {bad or 'step/dropout_counter'}")
    trail = tensors["trail"]
    n_expected = meta["step"] * n_params * TRAIL_DIGEST
    if trail.dtype != torch.uint8 or trail.shape != (n_expected,):
        raise CheckpointError(where, f"a uint8 trail of {n_expected} bytes",
                              f"{trail.dtype} {tuple(trail.shape)}")


def _check_params(where: str, got: dict[str, torch.Tensor], optim: dict[str, torch.Tensor],
                  want: dict[str, torch.Tensor]) -> None:
    """Parameters: exactly this net's names, shapes and dtypes. Optimiser
    state ``<slot>.<param>``: that parameter's shape and dtype (torch's Adam
    ``step`` is a scalar); its key set is the optimiser's own check."""
    if set(got) != set(want):
        raise CheckpointError(where, f"parameters {sorted(want)}", f"{sorted(got)}")
    for k, v in want.items():
        if got[k].shape != v.shape or got[k].dtype != v.dtype:
            raise CheckpointError(where, f"param.{k} {v.dtype} {tuple(v.shape)}",
                                  f"{got[k].dtype} {tuple(got[k].shape)}")
    for k, t in optim.items():
        slot, _, name = k.partition(".")
        if name in want and slot != "step" and (t.shape != want[name].shape
                                                or t.dtype != want[name].dtype):
            raise CheckpointError(where, f"optim.{k} {want[name].dtype} "
                                  f"{tuple(want[name].shape)}", f"{t.dtype} {tuple(t.shape)}")
        if slot == "step" and t.shape != ():
            raise CheckpointError(where, f"optim.{k} a scalar", f"shape {tuple(t.shape)}")


def _kill_for_test(step: int) -> None:
    """Test-only: SIGKILL this process after step $PIPELINE_TEST_KILL_AT_STEP."""
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        checkpoint.wait_for_writes()  # this step's checkpoint first: a deterministic test
        os.kill(os.getpid(), signal.SIGKILL)
