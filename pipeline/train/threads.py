"""How a run uses the cores (`pipeline train --threads N`; docs/explanation/determinism.md).

The bits never depend on N; only the speed does.

- Pinned mode: every op runs on one thread, as the profile says (stock CPU
  kernels are not thread-invariant: MKL's GEMM for some shapes, oneDNN's
  convolution gradients, LayerNorm's parameter gradients and long reductions
  split their sums by thread; measured: docs/explanation/determinism.md). The cores are used one
  level up: a step's shards run at once on a pool of up to N threads, each
  shard a whole forward and backward on its own rows with its own random
  stream (pipeline.train.pinned), and their gradients are summed in the fixed tree
  in shard order (pipeline.train.distributed), exactly as on one thread.
- Exact mode: every op is thread-invariant by construction, so N is torch's
  own intra-op thread count (measured faster than the pool for the charlm
  example's exact layers; docs/explanation/performance.md).
- A net that cannot run shards at once (BatchNorm buffers, CUDA) runs them in
  order whatever N is.

Launched workers (``--nproc``): each runs ``worker_threads(N)`` (N, else 1:
W workers on W cores), and where no profile pins the thread count,
``worker_environment`` starts them with one OpenMP thread each.

N defaults to every core this process may run on ("auto"): the pool is then
used only if a shard's work is large enough to gain from it (the first step
is timed on one thread); a tiny model, like the digits MLP, runs faster in
order. An explicit N is obeyed. The thread count is recorded in run.json
(``threads``), never keyed.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..core import _testing
from ..core.errors import UsageError
from .net import Threadable

__all__ = ["ShardRunner", "SharedGeneratorOp", "available_cores", "on_pool_thread",
           "worker_threads", "worker_environment", "MIN_SHARD_SECONDS"]

T = TypeVar("T")
MIN_SHARD_SECONDS = 0.003  # "auto": below this a shard gains less than the pool costs


class SharedGeneratorOp(RuntimeError):
    """A random op, in a shard running on a pool thread, that cannot be given
    a generator of its own (it would draw from torch's global one, which the
    threads share): the runner goes back to running shards in order."""


_POOL = threading.local()  # .shard: set on the runner's pool threads


def on_pool_thread() -> bool:
    """Whether this thread is one of a ShardRunner's pool, running shards at
    once with others (pinned mode then gives each shard a generator of its own)."""
    return getattr(_POOL, "shard", False)


def _pool_thread_init() -> None:
    import torch

    # Each pool thread runs its ops on itself alone, whatever its environment.
    torch.set_num_threads(1)
    _POOL.shard = True


def worker_threads(requested: int | None) -> int:
    """--threads for each launched worker: as asked, else 1 (W workers use W cores)."""
    return requested or 1


def worker_environment(pins_threads: bool) -> dict[str, str]:
    """What the launcher sets before torchrun starts its workers: one OpenMP
    thread each where no profile pins the count (the pinned profile says 1
    already), so that W workers do not oversubscribe the cores."""
    return {} if pins_threads else {"OMP_NUM_THREADS": "1"}


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class ShardRunner:
    """Runs a step's shard jobs and says how (``record``).

    ``requested``: N, or None for auto. ``shards``: this rank's shards per
    step. ``pins_threads``: the mode fixes every op to one thread (pinned).
    """

    def __init__(self, net: Any, requested: int | None, shards: int,
                 pins_threads: bool) -> None:
        import torch

        if requested is not None and requested < 1:
            raise UsageError(f"--threads: expected an integer >= 1, found {requested}")
        self.net, self.requested = net, requested
        self.pool: ThreadPoolExecutor | None = None
        self.used = 1  # shard threads
        self.fallback = ""
        self._auto_width = 0  # auto: the pool's width if the first step is slow enough
        self._intra_before = self.intra_op = torch.get_num_threads()
        width = min(requested or available_cores(), shards)
        if not pins_threads or (_testing.SWITCHES.intraop_threads and requested):
            # Exact mode's ops are thread-invariant (or the control: stock kernels).
            self.intra_op = requested or self.intra_op
        elif width > 1 and isinstance(net, Threadable) and net.threadable:
            if requested:
                self._start(width)
            else:
                self._auto_width = width
        if self.intra_op != self._intra_before:
            torch.set_num_threads(self.intra_op)

    def _start(self, width: int) -> None:
        self.pool = ThreadPoolExecutor(width, thread_name_prefix="pipeline-shard",
                                       initializer=_pool_thread_init)
        self.used = width

    def run(self, jobs: Sequence[Callable[[], T]]) -> list[T]:
        """The jobs' results, in job order."""
        if self.pool is not None:
            try:
                return list(self.pool.map(lambda job: job(), jobs))
            except SharedGeneratorOp as e:
                # Nothing was changed by the step's shards (they only return
                # gradients), so they run again, in order, from here on.
                self._stop_pool()
                self.used = 1
                self.fallback = (f"{e} draws from torch's global generator and takes no "
                                 f"other: shards run in order")
                print(f"note: --threads: {self.fallback}", file=sys.stderr)
        if not self._auto_width:
            return [job() for job in jobs]
        t = time.perf_counter()
        out = [job() for job in jobs]
        if (time.perf_counter() - t) / max(len(jobs), 1) >= MIN_SHARD_SECONDS:
            self._start(self._auto_width)
        self._auto_width = 0
        return out

    def run_into(self, jobs: Sequence[Callable[[], T]], take: Callable[[T], None]) -> None:
        """The jobs' results handed to ``take`` in job order, a wave of as many
        jobs as there are shard threads at a time (one, in order, without a
        pool): so a step holds a wave's results, not every shard's."""
        i = 0
        while i < len(jobs):
            wave = jobs[i:i + (self.used if self.pool is not None else 1)]
            for result in self.run(wave):
                take(result)
            i += len(wave)

    def record(self) -> dict[str, Any]:
        """What run.json keeps (``threads``): recorded, not keyed."""
        out = {"requested": self.requested if self.requested else "auto",
               "shard_threads": self.used, "op_threads": self.intra_op}
        return {**out, "fallback": self.fallback} if self.fallback else out

    def _stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def close(self) -> None:
        import torch

        self._stop_pool()
        if torch.get_num_threads() != self._intra_before:
            torch.set_num_threads(self._intra_before)
