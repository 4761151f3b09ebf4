"""Tests for the validation split (pipeline/data/sampling.py ``validation``,
``split3``; ``data.val_fraction``): held out of the training examples, keyed
by the seed and the data, and nothing changes while it is 0."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from pipeline.data.sampling import split, split3, validation


@dataclass
class _D:
    sha256: str = "ab" * 32
    n: int = 1000

    def counts(self, context: int) -> tuple[int, int]:
        return self.n, 0


def test_validation_is_held_out_of_the_training_examples() -> None:
    ds = _D()
    train, test = split(ds, 3, 0.2)
    t, v, te = split3(ds, 3, 0.2, 0.15)
    assert np.array_equal(te, test) and len(v) == 120 and len(t) == 680
    assert not set(t) & set(v) and sorted([*t, *v]) == sorted(train)
    # both keep the training examples' relative order
    pos = {int(i): k for k, i in enumerate(train)}
    assert [pos[int(i)] for i in t] == sorted(pos[int(i)] for i in t)


def test_no_validation_changes_nothing() -> None:
    ds = _D()
    train, _ = split(ds, 3, 0.2)
    t, v = validation(ds, train, 3, 0.0)
    assert np.array_equal(t, train) and len(v) == 0
    assert len(validation(ds, train[:5], 3, 0.1)[1]) == 0  # floor(0.5): none


def test_validation_depends_on_the_seed_and_the_data() -> None:
    ds = _D()
    train, _ = split(ds, 3, 0.2)
    v = validation(ds, train, 3, 0.1)[1]
    assert np.array_equal(v, validation(ds, train, 3, 0.1)[1])
    assert not np.array_equal(v, validation(ds, train, 4, 0.1)[1])  # control: the seed
    assert not np.array_equal(v, validation(_D("cd" * 32), train, 3, 0.1)[1])  # the data


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_a_fraction_outside_0_1_is_refused(bad: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        validation(_D(), np.arange(10), 0, bad)
