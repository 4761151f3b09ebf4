"""Checkpoints that restore everything or raise.

One safetensors file per checkpoint: tensors (parameters, optimiser state,
torch RNG states, the per-step trail) plus the JSON metadata (run key, config,
step, Python/NumPy RNG states, dropout counter, optimiser scalars, metrics)
in the safetensors header. Never pickle: loading parses a JSON header and raw
little-endian bytes, so a file cannot execute code. Each file carries its own
content hash; one that fails it (corrupt, truncated) is reported and the
previous valid checkpoint is used.

The rules: ``Writer`` saves (in the background, in order) and prunes;
``restore`` finds the newest valid checkpoint of a run, checks that it is
this run's and fits this net, and restores every piece of state, or raises.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.numpy import save as save_numpy
from safetensors.torch import load as safetensors_load
from safetensors.torch import save

from ..core import _testing, atomic
from ..core.config import Config, config_to_dict
from ..core.errors import CheckpointError
from ..core.hashing import weights_sha256
from ..core.safeio import GIB, read_regular
from .determinism import capture_rng, restore_rng

if TYPE_CHECKING:
    from ..core.rng import DropoutStream
    from .net import Net, Optimizer

__all__ = ["FORMAT", "TRAIL_DIGEST", "Progress", "Writer", "restore", "save_checkpoint",
           "load_checkpoint", "latest_valid", "checkpoint_path", "read_safetensors", "prune"]

FORMAT = "pipeline-checkpoint-v2"  # v2: the content hash covers the stored meta JSON
TRAIL_DIGEST = 8  # bytes per tensor per step in the trail
MAX_TENSOR_FILE = 16 * GIB  # weights and checkpoint files larger than this are refused
_NAME = re.compile(r"^ckpt-(\d{9})\.safetensors$")


@dataclass
class Progress:
    """What a checkpoint carries beyond the model, optimiser and RNGs."""
    step: int = 0
    loss_sum: float = 0.0            # running sum of this epoch's step losses
    metrics: list[dict[str, Any]] = field(default_factory=list)
    trail: bytearray = field(default_factory=bytearray)


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:09d}.safetensors"


def _content_sha256(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """Over the metadata exactly as stored (no re-encoding: a NaN loss is
    JSON-able there) and the canonical hash of the tensors."""
    return hashlib.sha256(meta_json.encode() + weights_sha256(tensors).encode()).hexdigest()


def _encode(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """The checkpoint file's bytes; ``meta`` must be JSON-able."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    header = {"meta": meta_json, "content_sha256": _content_sha256(tensors, meta_json)}
    return _serialise(tensors, header)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write one checkpoint file atomically, in this thread."""
    atomic.write_bytes(Path(path), _encode(tensors, meta))


def _serialise(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """safetensors bytes; through NumPy views where every dtype has one (the
    same file, a third of the time of safetensors.torch.save)."""
    try:
        arrays = {k: v.numpy() for k, v in tensors.items()}
    except TypeError:  # bfloat16 and friends: no NumPy dtype
        return save(tensors, metadata=header)
    return save_numpy(arrays, metadata=header)


class Writer:
    """The checkpoints of one run: owned by ``train()``, which closes it.

    ``save`` builds the file's bytes at once and writes them (temp file,
    fsync, rename, directory fsync: atomic.write_bytes) on this writer's own
    thread while training goes on: the two fsyncs of a write cost ten or more
    training steps of the default run (bench/bench_checkpoint.py), and they
    wait on the disk, not the CPU or the GIL. Writes happen in call order;
    checkpoints a few steps apart (an interval next to an epoch end) queue
    rather than wait, up to ``max_pending``. After each write the directory is
    pruned to the newest ``keep``. A kill at any point leaves the old file or
    the new one.
    """

    def __init__(self, ckpt_dir: Path, run_key: str, cfg: Config, *, keep: int = 2,
                 max_pending: int = 3) -> None:
        self.dir, self.run_key, self.config = Path(ckpt_dir), run_key, config_to_dict(cfg)
        self.keep, self.max_pending = keep, max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
        self._pending: list[Future[None]] = []

    def save(self, net: Net, opt: Optimizer, dropout: DropoutStream, pr: Progress) -> None:
        while self._pending and (self._pending[0].done()
                                 or len(self._pending) >= self.max_pending):
            self._pending.pop(0).result()  # raises a failed write's error here
        rng_tensors, rng_meta = capture_rng(dropout.counter)
        tensors = {f"param.{k}": v for k, v in net.params.items()}
        tensors.update({f"buffer.{k}": v for k, v in net.buffers.items()})
        tensors.update({f"optim.{k}": v for k, v in opt.state_tensors().items()})
        tensors.update(rng_tensors)
        tensors["trail"] = torch.frombuffer(bytearray(pr.trail), dtype=torch.uint8) \
            if pr.trail else torch.zeros(0, dtype=torch.uint8)
        meta = {"run_key": self.run_key, "config": self.config, "step": pr.step,
                "loss_sum": pr.loss_sum, "metrics": pr.metrics, "rng": rng_meta,
                "optim_scalars": opt.state_scalars()}
        self.dir.mkdir(parents=True, exist_ok=True)
        job = functools.partial(self._write, pr.step, _encode(tensors, meta))
        self._pending.append(self._pool.submit(job))

    def _write(self, step: int, blob: bytes) -> None:
        hook = functools.partial(_testing.fault, "checkpoint", step)
        atomic.write_bytes(checkpoint_path(self.dir, step), blob, before_replace=hook)
        prune(self.dir, step, self.keep)

    def wait(self) -> None:
        """Return once every write is on disk; raise the first error."""
        while self._pending:
            self._pending.pop(0).result()

    def close(self) -> None:
        """Wait for every write, then stop the thread."""
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def prune(ckpt_dir: Path, step: int, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (so a corrupt newest
    one falls back), and drop what a killed writer left: its temp files, and
    checkpoints past ``step``, which resume found invalid (one writer per run:
    the run lock)."""
    named = {int(m.group(1)): p for p in ckpt_dir.iterdir() if (m := _NAME.match(p.name))}
    kept = sorted(n for n in named if n <= step)[-keep:]
    stale = [p for n, p in named.items() if n not in kept]
    for p in stale + list(ckpt_dir.glob(".ckpt-*.tmp")):
        p.unlink(missing_ok=True)


def restore(ckpt_dir: Path | None, run_key: str, cfg: Config, net: Net, opt: Optimizer,
            dropout: DropoutStream, pr: Progress) -> int:
    """Restore everything from the newest valid checkpoint of this run into
    ``net``, ``opt``, ``dropout`` and ``pr``, or raise; return its step (0: none)."""
    found = latest_valid(ckpt_dir) if ckpt_dir is not None else None
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
            for pre in ("param.", "buffer.", "optim.", "rng.")}
    _check_params(where, part["param."], part["optim."], net.params)
    _check_params(where, part["buffer."], {}, net.buffers)
    _check_layout(where, tensors, meta, len(net.params))
    with torch.no_grad():
        for k, v in part["param."].items():
            net.params[k].copy_(v)
        for k, v in part["buffer."].items():
            net.buffers[k].copy_(v)
    try:
        opt.load_state(part["optim."], meta["optim_scalars"])
        dropout.counter = restore_rng(tensors, meta["rng"], _testing.SWITCHES.skip_rng_restore)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        # A well-formed file (its hash holds) whose state does not fit this run.
        raise CheckpointError(where, "optimiser and RNG state for this config",
                              f"{type(e).__name__}: {e}") from None
    pr.step, pr.loss_sum, pr.metrics = meta["step"], meta["loss_sum"], meta["metrics"]
    pr.trail = bytearray(tensors["trail"].numpy().tobytes())
    print(f"resuming from {path.name} (step {pr.step})", file=sys.stderr)
    return pr.step


def _check_layout(where: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any],
                  n_params: int) -> None:
    """Exactly the named keys, the trail ``step`` steps long, JSON of the right
    types: a checkpoint that passes its hash may still not be ours."""
    extra = sorted(k for k in tensors if not re.fullmatch(
        r"param\..+|buffer\..+|optim\..+|rng\.torch_cpu|rng\.cuda\.\d+|trail", k))
    missing = sorted({"trail", "rng.torch_cpu"} - set(tensors))
    if extra or missing:
        raise CheckpointError(where, "tensors param.*, buffer.*, optim.*, rng.torch_cpu, "
                              "rng.cuda.*, trail",
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, or CheckpointError.

    Read as bytes through safeio (a regular file of at most MAX_TENSOR_FILE
    bytes: never a FIFO or a device), then parsed from memory."""
    try:
        blob = read_regular(path, MAX_TENSOR_FILE)
        n = int.from_bytes(blob[:8], "little")
        if len(blob) < 8 or n > len(blob) - 8:
            raise ValueError("truncated safetensors header")
        header = json.loads(blob[8:8 + n])
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if meta is not None and not isinstance(meta, dict):
            raise ValueError("__metadata__ is not an object")
        return safetensors_load(blob), dict(meta or {})
    except (SafetensorError, OSError, ValueError, RecursionError) as e:
        raise CheckpointError(str(path), "a safetensors file", f"unreadable data ({e})",
                              "pickled or truncated files are refused") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check one checkpoint (format and content hash)."""
    tensors, header = read_safetensors(path)
    try:
        meta = json.loads(header["meta"])
        recorded = header["content_sha256"]
    except (KeyError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(str(path), "pipeline metadata in the header",
                              f"none usable ({e!r})") from None
    found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
    if found != FORMAT:
        raise CheckpointError(str(path), f"format {FORMAT}", repr(found))
    actual = _content_sha256(tensors, header["meta"])
    if actual != recorded:
        raise CheckpointError(str(path), f"content sha256 {recorded}", actual, "file is corrupt")
    return tensors, meta


def latest_valid(ckpt_dir: Path) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest checkpoint that passes its own hash; corrupt ones are
    reported on stderr and skipped."""
    if not Path(ckpt_dir).is_dir():
        return None
    found = sorted((p for p in Path(ckpt_dir).iterdir() if _NAME.match(p.name)), reverse=True)
    for p in found:
        try:
            tensors, meta = load_checkpoint(p)
        except CheckpointError as e:
            print(f"warning: skipping corrupt checkpoint: {e}", file=sys.stderr)
            continue
        return p, tensors, meta
    return None
