"""The counter-based generator: SplitMix64, fixed by its definition."""

from __future__ import annotations

import numpy as np

from pipeline.core import rng


def test_splitmix64_reference_outputs() -> None:
    """key(0) is SplitMix64's first output for state 0; out(K, i) continues the
    sequence (published reference values of SplitMix64 seeded with 0)."""
    assert rng.key(0) == 0xE220A8397B1DCDAF
    # Stream from state 0: out(0, i) = mix((i + 1) * G) = the i-th SplitMix64 output.
    assert [int(v) for v in rng.outputs(0, 0, 3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


def test_outputs_are_random_access() -> None:
    """A window of the stream equals the same slice of a longer draw."""
    k = rng.key(7, rng.SHUFFLE, 3)
    assert np.array_equal(rng.outputs(k, 100, 50), rng.outputs(k, 0, 150)[100:])


def test_keys_separate_purposes_and_seeds() -> None:
    """Different seeds, tags or words give different keys."""
    keys = {rng.key(0, rng.SPLIT), rng.key(0, rng.SHUFFLE), rng.key(1, rng.SPLIT),
            rng.key(0, rng.SPLIT, 1)}
    assert len(keys) == 4


def test_permutation_is_a_permutation() -> None:
    """permutation() returns each index once."""
    p = rng.permutation(rng.key(3), 1000)
    assert sorted(p.tolist()) == list(range(1000))


def test_dropout_stream_rate_and_counter() -> None:
    """Masks keep about 1 - rate of units; the counter advances by rows*cols
    and fully determines the next mask."""
    s = rng.DropoutStream(seed=5)
    m = s.keep_mask(0.25, 64, 128)
    assert s.counter == 64 * 128
    assert abs(m.mean() - 0.75) < 0.02
    nxt = s.keep_mask(0.25, 4, 8)
    again = rng.DropoutStream(seed=5, counter=64 * 128).keep_mask(0.25, 4, 8)
    assert np.array_equal(nxt, again)
    assert not np.array_equal(nxt, rng.DropoutStream(seed=5).keep_mask(0.25, 4, 8))


def test_dropout_masks_equal_the_stream_definition_across_cache_blocks() -> None:
    """The prefetched block is a cache: mask after mask (several widths, past
    many block boundaries) equals u24(K_d, counter + i) >= T drawn directly."""
    s = rng.DropoutStream(seed=3)
    counter = 0
    for i in range(300):
        width = [128, 64, 7][i % 3]
        threshold = int(0.1 * 2**24 + 0.5)
        want = rng.u24(s.key, counter, 16 * width).reshape(16, width) >= threshold
        counter += 16 * width
        assert np.array_equal(s.keep_mask(0.1, 16, width), want), i
    resumed = rng.DropoutStream(seed=3, counter=counter)
    assert np.array_equal(resumed.keep_mask(0.1, 4, 4), s.keep_mask(0.1, 4, 4))
