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

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from . import atomic
from .config import canonical_json
from .errors import CheckpointError
from .hashing import weights_sha256

__all__ = ["FORMAT", "save_checkpoint", "load_checkpoint", "latest_valid", "checkpoint_path",
           "read_safetensors"]

FORMAT = "pipeline-checkpoint-v1"
_NAME = re.compile(r"^ckpt-(\d{9})\.safetensors$")


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"ckpt-{step:09d}.safetensors"


def _content_sha256(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(meta) + weights_sha256(tensors).encode()).hexdigest()


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically; ``meta`` must be JSON-able."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, **meta}
    header = {"meta": json.dumps(meta, sort_keys=True),
              "content_sha256": _content_sha256(tensors, meta)}
    atomic.write_bytes(path, save(tensors, metadata=header))


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
                              f"none usable ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(str(path), f"format {FORMAT}", repr(meta.get("format")))
    actual = _content_sha256(tensors, meta)
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
