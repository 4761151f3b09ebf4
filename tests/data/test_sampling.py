"""Tests for pipeline/sampling.py: the split and the epoch order (spec section 2)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.data import sampling as data

from ..support.data import SHA


@dataclass(frozen=True, eq=False)
class _Data:
    sha256: str
    y: np.ndarray
    n_test_part: int = 0

    def counts(self, context: int) -> tuple[int, int]:
        return len(self.y), self.n_test_part


# --- split and order --------------------------------------------------------

def _ref_out(k: int, n: int) -> list[int]:
    """SplitMix64 out(K, i), i < n, in plain Python integers (docs/exact-spec.md, 1)."""
    m = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    return [mix((k + (i + 1) * 0x9E3779B97F4A7C15) & m) for i in range(n)]


def _ds(sha: str = SHA, n: int = 1797) -> _Data:
    return _Data(sha, np.zeros(n, np.int64))


def test_split_matches_spec_reference() -> None:
    """split is section 2 of the spec, recomputed here with Python integers."""
    from pipeline.core import rng

    seed, n = 7, 1797
    out = _ref_out(rng.key(seed, rng.SPLIT, int(SHA[:16], 16)), n)
    perm = sorted(range(n), key=lambda i: out[i])  # sorted() is stable
    n_test = int(n * 0.2)
    train, test = data.split(_ds(), seed, 0.2)
    assert test.tolist() == perm[:n_test] and train.tolist() == perm[n_test:]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.2, 0.5, 0.999])
def test_split_is_a_deterministic_partition(fraction: float) -> None:
    """Train and test partition range(n) with n_test = floor(n * f), the same every call."""
    train, test = data.split(_ds(), 3, fraction)
    assert len(test) == int(1797 * fraction) and len(train) == 1797 - len(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    again = data.split(_ds(), 3, fraction)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])


def test_split_depends_on_seed_and_data_hash() -> None:
    """Another seed or another data sha256 gives another split."""
    base = data.split(_ds(), 0, 0.2)[1]
    assert not np.array_equal(base, data.split(_ds(), 1, 0.2)[1])
    assert not np.array_equal(base, data.split(_ds("f" * 64), 0, 0.2)[1])


def test_split_rejects_bad_arguments() -> None:
    """Seeds outside [0, 2^63) and fractions outside [0, 1) are errors."""
    for seed, fraction in [(-1, 0.2), (1 << 63, 0.2), (0, 1.0), (0, -0.1)]:
        with pytest.raises(ValueError):
            data.split(_ds(), seed, fraction)


def test_epoch_order_is_a_permutation_differing_by_epoch() -> None:
    """Each epoch orders exactly the train ids, reproducibly, differently per epoch."""
    from pipeline.core import rng

    train, _ = data.split(_ds(), 0, 0.2)
    orders = [data.epoch_order(train, 0, e) for e in range(3)]
    for o in orders:
        assert sorted(o.tolist()) == sorted(train.tolist())
    assert not np.array_equal(orders[0], orders[1])
    assert not np.array_equal(orders[1], orders[2])
    assert np.array_equal(orders[2], data.epoch_order(train, 0, 2))
    out = _ref_out(rng.key(0, rng.SHUFFLE, 1), len(train))
    assert orders[1].tolist() == [int(train[i]) for i in sorted(range(len(train)),
                                                                key=lambda i: out[i])]


def test_batches_drop_the_last_partial_batch() -> None:
    """floor(n / b) consecutive batches of exactly b ids."""
    order = np.arange(10)
    got = data.batches(order, 3)
    assert [b.tolist() for b in got] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.batches(order, 11) == []
    assert len(data.batches(np.arange(1437), 64)) == 22
    with pytest.raises(ValueError):
        data.batches(order, 0)


def test_a_test_part_of_its_own_is_the_test_split() -> None:
    """A dataset with a manifest test part trains on every train example and
    tests on every test-part example, whatever the seed or fraction."""
    ds = _Data(SHA, np.zeros(10, np.int64), n_test_part=4)
    for seed, fraction in ((0, 0.2), (5, 0.5)):
        train, test = data.split(ds, seed, fraction)
        assert train.tolist() == list(range(10)) and test.tolist() == [10, 11, 12, 13]
