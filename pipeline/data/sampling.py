"""Which rows train and test, and in which order (docs/exact-spec.md, section 2).

The split and each epoch's order are permutations from the counter-based
generator (pipeline.core.rng), keyed by the seed and the data's sha256, so they
depend on nothing else: not the torch version, the CPU or the world size.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from ..core import rng

__all__ = ["split", "validation", "split3", "epoch_order", "batches"]


class _Data(Protocol):
    sha256: str

    def counts(self, context: int) -> tuple[int, int]: ...


def _check_seed(seed: int) -> None:
    if type(seed) is not int or not 0 <= seed < 1 << 63:
        raise ValueError(f"seed must be an integer in [0, 2^63), got {seed!r}")


def split(ds: _Data, seed: int, test_fraction: float,
          context: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, test_ids) of the dataset's examples (``ds.counts(context)``).

    With a test part of its own (the manifest's ``test``), every train example
    trains and every test-part example tests, in id order. Otherwise both are
    drawn from the train examples, in ``perm`` order keyed by the seed and the
    data's sha256, ``test_fraction`` of them testing.
    """
    _check_seed(seed)
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction!r}")
    n, n_fixed = ds.counts(context)
    if n_fixed:
        return np.arange(n, dtype=np.int64), np.arange(n, n + n_fixed, dtype=np.int64)
    perm = rng.permutation(rng.key(seed, rng.SPLIT, int(ds.sha256[:16], 16)), n)
    n_test = math.floor(n * float(test_fraction))  # f64 product, as specified
    return perm[n_test:].astype(np.int64), perm[:n_test].astype(np.int64)


def validation(ds: _Data, train_ids: np.ndarray, seed: int, val_fraction: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """(train_ids, val_ids): ``floor(len(train_ids) * val_fraction)`` of the
    training examples (an f64 product, as the test split's) held out for
    validation, drawn by the permutation keyed ``(seed, SPLIT, data, 1)``
    (the test split's key with one more word); both keep ``train_ids``'
    relative order. ``val_fraction`` 0: every example trains (no key drawn)."""
    _check_seed(seed)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    train_ids = np.asarray(train_ids, dtype=np.int64)
    n = len(train_ids)
    n_val = math.floor(n * float(val_fraction))
    if n_val == 0:
        return train_ids, np.empty(0, dtype=np.int64)
    perm = rng.permutation(rng.key(seed, rng.SPLIT, int(ds.sha256[:16], 16), 1), n)
    return train_ids[np.sort(perm[n_val:])], train_ids[np.sort(perm[:n_val])]


def split3(ds: _Data, seed: int, test_fraction: float, val_fraction: float,
           context: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train_ids, val_ids, test_ids): ``split``, then ``validation`` of its
    training examples."""
    train_ids, test_ids = split(ds, seed, test_fraction, context)
    train_ids, val_ids = validation(ds, train_ids, seed, val_fraction)
    return train_ids, val_ids, test_ids


def epoch_order(train_ids: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """``train_ids`` permuted for 0-based ``epoch`` by ``key(seed, SHUFFLE, epoch)``."""
    _check_seed(seed)
    return np.asarray(train_ids)[rng.permutation(rng.key(seed, rng.SHUFFLE, epoch),
                                                 len(train_ids))]


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Consecutive ``batch_size`` slices of ``order``; a last partial batch is dropped."""
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
