"""Counter-based random numbers (SplitMix64) whose values depend on nothing
but their key and index: not on the torch version, the ISA, the thread count
or the device. Used for the train/test split, the epoch order, dropout masks
and exact-mode initialisation; specified in docs/exact-spec.md, section 1.

NumPy's uint64 arithmetic wraps modulo 2^64 and its ``>>`` on unsigned
integers is logical, which is exactly SplitMix64's arithmetic.
"""

from __future__ import annotations

import numpy as np

__all__ = ["SPLIT", "SHUFFLE", "INIT", "DROPOUT", "FORWARD", "EXEC", "MASK", "AUGMENT", "key", "outputs", "u24",
           "permutation",
           "DropoutStream"]

SPLIT, SHUFFLE, INIT, DROPOUT = 1, 2, 3, 4
FORWARD = 5  # key(seed, FORWARD, step, shard): torch's generator state for one shard's pass
EXEC = 6  # key(seed, EXEC, i): `pipeline exec`'s seeds for a script's unseeded global generators
MASK = 7  # key(seed, MASK, step, site): exact layers' dropout masks (docs/exact-spec.md, 15)
AUGMENT = 8  # key(seed, AUGMENT, epoch, example, stream): augmentation (pipeline.data.augment)

_G = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser, in place on a uint64 array (it runs on every
    dropout mask, so no temporaries beyond one shift buffer)."""
    t = np.empty_like(z)
    with np.errstate(over="ignore"):
        z ^= np.right_shift(z, np.uint64(30), out=t)
        z *= _M1
        z ^= np.right_shift(z, np.uint64(27), out=t)
        z *= _M2
        z ^= np.right_shift(z, np.uint64(31), out=t)
    return z


def _mix_int(z: int) -> int:
    z &= _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def key(seed: int, *words: int) -> int:
    """Stream key ``absorb(...absorb(absorb(0, seed), w1)..., wn)``."""
    h = 0
    for w in (seed, *words):
        if not 0 <= w < 1 << 64:
            raise ValueError(f"key word {w} is outside [0, 2^64)")
        h = _mix_int(((h ^ w) + 0x9E3779B97F4A7C15) & _MASK)
    return h


def outputs(k: int, start: int, count: int) -> np.ndarray:
    """``out(k, i)`` for ``i`` in ``[start, start + count)`` as uint64."""
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z *= _G
        z += np.uint64(k)
    return _mix(z)


def u24(k: int, start: int, count: int) -> np.ndarray:
    """Top 24 bits of each output: integers in [0, 2^24) as int64."""
    return (outputs(k, start, count) >> np.uint64(40)).astype(np.int64)


def permutation(k: int, n: int) -> np.ndarray:
    """The stable ascending argsort of ``out(k, 0..n-1)``: a permutation of range(n)."""
    return np.argsort(outputs(k, 0, n), kind="stable")


class DropoutStream:
    """The dropout random numbers of a run (docs/exact-spec.md, section 6).

    A counter-based stream ``key(seed, DROPOUT)``; each call draws the mask of
    the whole global batch ``(B, F)`` and advances the counter by ``B * F``,
    so every rank of any world size sees the same masks. Its whole state is
    ``counter``, saved in checkpoints. Masks are computed a block of
    ``BLOCK`` calls ahead (one vectorised pass instead of one per step); the
    block is a cache of values fixed by (key, index), so it is not state.
    """

    BLOCK = 64

    def __init__(self, seed: int, counter: int = 0) -> None:
        self.key = key(seed, DROPOUT)
        self.counter = counter
        self._cache: tuple[int, float, np.ndarray] | None = None  # (start, rate, keep bits)

    def keep_mask(self, rate: float, rows: int, cols: int) -> np.ndarray:
        """Bool (rows, cols): True where the unit is kept."""
        n = rows * cols
        start, cached_rate, keep = self._cache or (-1, rate, np.empty(0, dtype=bool))
        lo = self.counter - start
        if start < 0 or cached_rate != rate or lo < 0 or lo + n > keep.size:
            threshold = np.uint64(int(np.floor(rate * 2.0**24 + 0.5)))
            z = outputs(self.key, self.counter, n * self.BLOCK)
            keep = np.right_shift(z, np.uint64(40), out=z) >= threshold
            start, lo = self.counter, 0
            self._cache = (start, rate, keep)
        self.counter += n
        return keep[lo:lo + n].reshape(rows, cols)
