"""The canonical weight hash: names, dtype, shape and little-endian bytes."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.core.hashing import tensor_digests, weights_sha256


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


def test_fingerprints_follow_every_sampled_bit_and_nothing_else() -> None:
    """The per-step trail: 8 bytes per tensor in sorted name order; a change
    of one bit (even -0.0 for +0.0) in a small tensor changes its fingerprint
    and no other; equal tensors give equal bytes."""
    from pipeline.core.hashing import fingerprints

    w = {"b": torch.zeros(10), "a": torch.arange(12.0).reshape(3, 4)}
    base = fingerprints(w)
    assert len(base) == 16 and fingerprints({k: v.clone() for k, v in w.items()}) == base
    w2 = {"b": w["b"].clone(), "a": w["a"].clone()}
    w2["b"][3] = -0.0
    got = fingerprints(w2)
    assert got[:8] == base[:8] and got[8:] != base[8:]


def test_fingerprints_of_a_large_tensor_sample_a_fixed_set() -> None:
    """Above SAMPLES elements the fingerprint reads SAMPLES distinct elements,
    the same ones every step: a change there shows, a change elsewhere does
    not (until the next step moves the sampled ones too)."""
    from pipeline.core import hashing

    n = 3 * hashing.SAMPLES + 7
    idx, _ = hashing._plan(n, torch.device("cpu"))
    assert idx.unique().numel() == hashing.SAMPLES
    t = torch.rand(n, generator=torch.Generator().manual_seed(0))
    base = hashing.fingerprints({"w": t})
    sampled, unsampled = int(idx[5]), next(i for i in range(n) if i not in set(idx.tolist()))
    for i, changes in ((sampled, True), (unsampled, False)):
        u = t.clone()
        u[i] += 1.0
        assert (hashing.fingerprints({"w": u}) != base) is changes


def test_fingerprints_do_not_depend_on_threads() -> None:
    """Integer sums: the same bytes at 1 and 2 threads."""
    from pipeline.core.hashing import fingerprints

    t = {"w": torch.randn(1000, 1000, generator=torch.Generator().manual_seed(1))}
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fingerprints(t)
        torch.set_num_threads(2)
        assert fingerprints(t) == one
    finally:
        torch.set_num_threads(before)
