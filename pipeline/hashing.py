"""The canonical weight hash: one function, used for every weight hash the
pipeline prints, records or compares (docs/exact-spec.md, section 11).

It hashes names, dtypes, shapes and raw little-endian bytes, so it does not
depend on the file format the weights were stored in, nor on dict order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
import torch

__all__ = ["weights_sha256", "tensor_digests", "MAGIC"]

MAGIC = b"pipeline-weights-v1\n"


def _le_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous little-endian NumPy view (a copy only when needed)."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def _update(h: hashlib._Hash, name: str, a: np.ndarray) -> None:
    header = f"{name}\n{a.dtype.name}\n{','.join(str(d) for d in a.shape)}\n".encode()
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    h.update(a.nbytes.to_bytes(8, "little"))
    h.update(memoryview(a).cast("B"))  # zero-copy: no tobytes()


def weights_sha256(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> str:
    """sha256 (64 hex) of a name -> tensor mapping, in sorted name order."""
    h = hashlib.sha256(MAGIC)
    for name in sorted(tensors):
        _update(h, name, _le_array(tensors[name]))
    return h.hexdigest()


def tensor_digests(tensors: Mapping[str, torch.Tensor], size: int = 8) -> bytes:
    """Compact per-tensor digests for the per-step trail: the first ``size``
    bytes of SHA-1 over each tensor's raw little-endian bytes, concatenated in
    sorted name order. The trail locates where two runs diverge; it is no
    security boundary (the weights hash is sha256). It runs after every step,
    so it hashes data only (names, dtypes and shapes are fixed for a run and
    recorded in run.json), with the hash the CPU's SHA instructions make
    fastest here (bench/bench_hash.py: half the time of sha256)."""
    out = bytearray()
    for name in sorted(tensors):
        t = tensors[name].detach()
        a = t.numpy() if t.device.type == "cpu" and t.is_contiguous() else _le_array(t)
        out += hashlib.sha1(memoryview(a).cast("B")).digest()[:size]
    return bytes(out)
