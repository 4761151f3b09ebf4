"""Checkpoints that restore everything or raise.

One safetensors file per checkpoint: tensors (parameters, optimiser state,
torch RNG states, the per-step trail) plus the JSON metadata (run key, config,
step, Python/NumPy RNG states, dropout counter, optimiser scalars, metrics)
in the safetensors header. Never pickle: loading parses a JSON header and raw
little-endian bytes, so a file cannot execute code. Each file carries its own
content hash; one that fails it (corrupt, truncated) is reported and the
previous valid checkpoint is used.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as save_numpy
from safetensors.torch import save

from . import atomic
from .errors import CheckpointError
from .hashing import weights_sha256

__all__ = ["FORMAT", "save_checkpoint", "wait_for_writes", "load_checkpoint", "latest_valid",
           "checkpoint_path", "read_safetensors"]

FORMAT = "pipeline-checkpoint-v2"  # v2: the content hash covers the stored meta JSON
# Test-only (docs/architecture-notes.md, "Test-only switches"); see _kill_hook.
KILL_IN_CHECKPOINT_ENV = "PIPELINE_TEST_KILL_IN_CHECKPOINT"
_NAME = re.compile(r"^ckpt-(\d{9})\.safetensors$")
# The one background writer of this process (it writes in order), and the
# writes queued or in flight: at most _MAX_PENDING, each holding one file's bytes.
_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-writer")
_pending: list[Future[None]] = []
_MAX_PENDING = 3


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:09d}.safetensors"


def _content_sha256(tensors: dict[str, torch.Tensor], meta_json: str) -> str:
    """Over the metadata exactly as stored (no re-encoding: a NaN loss is
    JSON-able there) and the canonical hash of the tensors."""
    return hashlib.sha256(meta_json.encode() + weights_sha256(tensors).encode()).hexdigest()


def _kill_hook(meta: dict[str, Any]) -> Callable[[], None] | None:
    """Test-only: SIGKILL this process while checkpoint N is half written
    (temp file synced, not yet renamed): $PIPELINE_TEST_KILL_IN_CHECKPOINT=N."""
    if os.environ.get(KILL_IN_CHECKPOINT_ENV) != str(meta.get("step")):
        return None
    return lambda: os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], *,
                    background: bool = False, then: Callable[[], None] | None = None) -> None:
    """Write atomically, then call ``then``; ``meta`` must be JSON-able.

    The file's bytes are built before this returns. With ``background`` the
    writing and syncing (atomic.write_bytes) and ``then`` run in one writer
    thread while the caller goes on: the two fsyncs of a write cost ten or
    more training steps of the default run (bench/bench_checkpoint.py), and
    they wait on the disk, not the CPU or the GIL. Writes happen in call
    order; checkpoints a few steps apart (an interval next to an epoch end)
    queue rather than wait, up to _MAX_PENDING. ``wait_for_writes`` waits for
    all. A kill at any point leaves the old file or the new one.
    """
    while _pending and (_pending[0].done() or len(_pending) >= _MAX_PENDING):
        _pending.pop(0).result()  # raises a failed write's error here
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta_json = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    header = {"meta": meta_json, "content_sha256": _content_sha256(tensors, meta_json)}
    job = functools.partial(_write, Path(path), _serialise(tensors, header),
                            _kill_hook(meta), then)
    if background:
        _pending.append(_writer.submit(job))
    else:
        wait_for_writes()
        job()


def _serialise(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> bytes:
    """safetensors bytes; through NumPy views where every dtype has one (the
    same file, a third of the time of safetensors.torch.save)."""
    try:
        arrays = {k: v.numpy() for k, v in tensors.items()}
    except TypeError:  # bfloat16 and friends: no NumPy dtype
        return save(tensors, metadata=header)
    return save_numpy(arrays, metadata=header)


def wait_for_writes() -> None:
    """Return once every background write is on disk; raise the first error."""
    while _pending:
        _pending.pop(0).result()


def _write(path: Path, blob: bytes, hook: Callable[[], None] | None,
           then: Callable[[], None] | None) -> None:
    atomic.write_bytes(path, blob, before_replace=hook)
    if then is not None:
        then()


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header metadata of a safetensors file, or CheckpointError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(str(path), "a safetensors file", f"unreadable data ({e})",
                              "pickled or truncated files are refused") from None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and check one checkpoint (format and content hash)."""
    tensors, header = read_safetensors(path)
    try:
        meta = json.loads(header["meta"])
        recorded = header["content_sha256"]
    except (KeyError, json.JSONDecodeError) as e:
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
