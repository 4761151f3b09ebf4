"""The canonical weight hash: names, dtype, shape and little-endian bytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.hashing import tensor_digests, weights_sha256


def _by_hand(name: str, values: list[float]) -> str:
    """The spec (docs/exact-spec.md section 11) written out with struct."""
    header = f"{name}\nfloat32\n{len(values)}\n".encode()
    data = struct.pack(f"<{len(values)}f", *values)
    h = hashlib.sha256(b"pipeline-weights-v1\n")
    h.update(struct.pack("<Q", len(header)) + header + struct.pack("<Q", len(data)) + data)
    return h.hexdigest()


def test_matches_the_specification_byte_for_byte() -> None:
    """An independent struct-based encoding gives the same digest."""
    t = torch.tensor([1.5, -2.0, 3.25])
    assert weights_sha256({"w": t}) == _by_hand("w", [1.5, -2.0, 3.25])


def test_independent_of_insertion_order_and_container() -> None:
    """dict order and torch vs numpy do not matter."""
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)
    h = weights_sha256({"a": a, "b": b})
    assert h == weights_sha256({"b": b, "a": a})
    assert h == weights_sha256({"a": a.numpy(), "b": b.numpy()})


def test_independent_of_file_format(tmp_path: Path) -> None:
    """Saving to safetensors and loading back keeps the hash."""
    w = {"fc0.weight": torch.randn(3, 4), "fc0.bias": torch.randn(3)}
    save_file(w, tmp_path / "w.safetensors")
    assert weights_sha256(load_file(tmp_path / "w.safetensors")) == weights_sha256(w)


def test_sensitive_to_name_dtype_shape_and_one_bit() -> None:
    """Each of name, dtype, shape and a single flipped bit changes the hash."""
    t = torch.arange(6, dtype=torch.float32)
    base = weights_sha256({"a": t})
    flipped = t.clone()
    flipped.view(torch.int32)[3] ^= 1
    variants = [{"b": t}, {"a": t.double()}, {"a": t.reshape(2, 3)}, {"a": flipped}]
    assert all(weights_sha256(v) != base for v in variants)


def test_non_contiguous_and_big_endian_inputs_hash_as_their_values() -> None:
    """A transposed view and a big-endian array hash like their C-order LE copies."""
    t = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    assert weights_sha256({"a": t.t()}) == weights_sha256({"a": t.t().contiguous()})
    be = np.arange(4, dtype=">f4")
    assert weights_sha256({"a": be}) == weights_sha256({"a": be.astype("<f4")})


def test_trail_digests_are_compact_and_per_tensor() -> None:
    """8 bytes per tensor in sorted name order; only the changed tensor's slot moves."""
    w = {"b": torch.zeros(2), "a": torch.ones(2)}
    d = tensor_digests(w)
    assert len(d) == 16
    w2 = {"b": torch.zeros(2), "a": torch.full((2,), 2.0)}
    d2 = tensor_digests(w2)
    assert d[:8] != d2[:8] and d[8:] == d2[8:]
