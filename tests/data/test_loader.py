"""Tests for pipeline/data/loader.py: batches come in step order with the same
values at 0, 1 and 3 workers; a failure is raised in the asking thread; the
workers stop on close."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline.data.loader import Loader


def _make(step: int) -> np.ndarray:
    return np.random.default_rng(step).random(4)


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_batches_are_the_steps_whatever_the_workers(workers: int) -> None:
    """Steps 2..9 (a resume from step 2) give make(step) for each step, in order."""
    loader = Loader(_make, 2, 10, workers)
    try:
        got = [loader.get(s) for s in range(2, 10)]
    finally:
        loader.close()
    assert all(np.array_equal(g, _make(s)) for g, s in zip(got, range(2, 10)))


def test_prepares_ahead_on_worker_threads() -> None:
    """With workers the batches are made on the loader's threads, ahead of the
    step asked for (2 per worker), never past the last step."""
    where: dict[int, str] = {}

    def make(step: int) -> int:
        where[step] = threading.current_thread().name
        return step

    loader = Loader(make, 0, 5, 2)
    assert loader.get(0) == 0
    assert len(loader.pending) == 4  # steps 1..4 submitted: 2 per worker ahead of step 0
    assert [loader.get(s) for s in range(1, 5)] == [1, 2, 3, 4]
    loader.close()
    assert sorted(where) == [0, 1, 2, 3, 4] and all(n.startswith("loader") for n in where.values())


def test_failure_is_raised_in_the_loop() -> None:
    """A batch that fails raises its exception from get()."""
    def make(step: int) -> int:
        if step == 3:
            raise ValueError("bad batch 3")
        return step

    loader = Loader(make, 0, 6, 2)
    assert [loader.get(s) for s in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad batch 3"):
        loader.get(3)
    loader.close()
    with pytest.raises(ValueError, match="workers"):
        Loader(make, 0, 1, -1)
