"""Parallel loading: each step's batch prepared ahead on loader workers.

``make(step)`` (gather the batch's examples, augment them: pipeline.data.augment)
is a pure function of the step, so where and when it runs cannot change a bit:
``Loader`` with ``workers`` = 0 calls it when the loop asks; with N > 0 it
submits the next ``2 N`` steps to N threads (NumPy's and torch's kernels, and
Pillow, release the GIL) and hands them out in step order. The wait for a batch
not yet ready is measured (``waited_s``): in the steady state it is zero
unless the loader is the bottleneck (``bench/bench_loader.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["Loader"]


class Loader:
    """Batches for steps ``start`` .. ``total - 1``, asked for in order."""

    def __init__(self, make: Callable[[int], Any], start: int, total: int, workers: int,
                 ahead: int | None = None) -> None:
        if type(workers) is not int or workers < 0:
            raise ValueError(f"loader workers must be an integer >= 0, got {workers!r}")
        self.make, self.next, self.total, self.workers = make, start, total, workers
        self.ahead = ahead if ahead is not None else 2 * workers
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="loader") if workers else None
        self.pending: dict[int, Future[Any]] = {}
        self.waited_s = 0.0

    def get(self, step: int) -> Any:
        """Step ``step``'s batch (its failure raised here, in the loop's thread)."""
        if self.pool is None:
            return self.make(step)
        self.next = max(self.next, step)
        while self.next < min(self.total, step + 1 + self.ahead):
            self.pending[self.next] = self.pool.submit(self.make, self.next)
            self.next += 1
        future = self.pending.pop(step, None)
        if future is None:  # not asked in order: made here, the same bits
            return self.make(step)
        if not future.done():
            t = time.perf_counter()
            out = future.result()
            self.waited_s += time.perf_counter() - t
            return out
        return future.result()

    def close(self) -> None:
        """Cancel what was prepared ahead and stop the workers."""
        if self.pool is not None:
            for f in self.pending.values():
                f.cancel()
            self.pending.clear()
            self.pool.shutdown(wait=True, cancel_futures=True)
