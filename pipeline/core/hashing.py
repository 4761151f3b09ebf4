"""The canonical weight hash: one function, used for every weight hash the
pipeline prints, records or compares (docs/exact-spec.md, section 11).

It hashes names, dtypes, shapes and raw little-endian bytes, so it does not
depend on the file format the weights were stored in, nor on dict order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from typing import Protocol

import numpy as np
import torch

__all__ = ["weights_sha256", "tensor_digests", "fingerprints", "FINGERPRINT_KIND", "MAGIC"]

MAGIC = b"pipeline-weights-v1\n"
# The per-step fingerprint's definition (``fingerprints``), recorded as run.json's
# "trail.kind": trails of two kinds are not compared.
FINGERPRINT_KIND = "sampled-int64-v1"


def _le_array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """A C-contiguous little-endian NumPy view (a copy only when needed)."""
    a = t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else t
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


class Chunked(Protocol):
    """An array too large to hold, given as its C-order rows, chunk by chunk
    (pipeline.data.mapped.Rows): hashed as the whole array would be."""

    dtype: np.dtype
    shape: tuple[int, ...]

    def chunks(self) -> Iterator[np.ndarray]: ...


def _update(h: hashlib._Hash, name: str, a: np.ndarray | Chunked) -> None:
    header = f"{name}\n{a.dtype.name}\n{','.join(str(d) for d in a.shape)}\n".encode()
    h.update(len(header).to_bytes(8, "little"))
    h.update(header)
    h.update((math.prod(a.shape) * a.dtype.itemsize).to_bytes(8, "little"))
    for c in a.chunks() if not isinstance(a, np.ndarray) else [a]:
        h.update(memoryview(_le_array(c)).cast("B"))  # zero-copy: no tobytes()


def weights_sha256(tensors: Mapping[str, torch.Tensor | np.ndarray | Chunked]) -> str:
    """sha256 (64 hex) of a name -> tensor mapping, in sorted name order."""
    h = hashlib.sha256(MAGIC)
    for name in sorted(tensors):
        t = tensors[name]
        _update(h, name, t if hasattr(t, "chunks") else _le_array(t))  # type: ignore[arg-type]
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


SAMPLES = 4096  # elements per tensor per step: a constant cost whatever the model's size
_STRIDE = 1_000_000_007  # a prime: i * _STRIDE mod n visits SAMPLES distinct elements
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}


def _plan(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, weights) for a tensor of ``n`` elements: every element when
    ``n <= SAMPLES``, else ``i * _STRIDE mod n`` for ``i < SAMPLES`` (distinct:
    the stride is a prime larger than any n here, so coprime to n); weights
    ``1 + (i * 40503 mod 2^16)``, below 2^16, so that no sum can overflow."""
    key = (n, str(device))
    if key not in _cache:
        k = min(n, SAMPLES)
        i = torch.arange(k, dtype=torch.int64)
        idx = i if n <= SAMPLES else (i * _STRIDE) % n
        w = 1 + (i * 40503) % (1 << 16)
        _cache[key] = idx.to(device), w.to(device)
    return _cache[key]


def fingerprints(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """The per-step trail: 8 bytes per tensor, sorted name order, each the
    little-endian int64 ``sum(bits[idx_i] * w_i)`` over a fixed sample of the
    tensor's elements (all of them up to SAMPLES). Computed with tensor ops on
    the tensors' device: integer arithmetic, so exact and independent of the
    device, thread count and summation order (|bits| < 2^32, w < 2^16, at most
    2^12 terms: no sum leaves int64), and one transfer per step. Its cost is
    constant in the model's size; a change confined to unsampled elements shows
    from the next step on (a training step moves every weight). The full hash
    of every tensor is in each checkpoint."""
    parts = []
    for name in sorted(tensors):
        t = tensors[name].detach().reshape(-1)
        bits = t.view(_INT[t.element_size()]) if t.element_size() in _INT else t.view(torch.uint8)
        idx, w = _plan(bits.numel(), bits.device)
        parts.append((bits.index_select(0, idx).to(torch.int64) * w).sum())
    if not parts:
        return b""
    out = torch.stack(parts).cpu().numpy().astype("<i8")
    return out.tobytes()
