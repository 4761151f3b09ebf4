"""Test-only switches, read once from the environment when the package starts,
and the one fault hook through which the training loop and the checkpoint
writer honour them. No other module reads a ``PIPELINE_TEST_*`` variable.

Never set these for real runs (docs/reference/environment.md):

- ``PIPELINE_TEST_NO_PIN=1``: no re-exec, no profile (the suite's control);
- ``PIPELINE_SIM_CPU_ISA=default|avx2|avx512``: treat the CPU as offering
  only up to that ISA level;
- ``PIPELINE_TEST_SKIP_RNG_RESTORE=python,numpy,torch_cpu,cuda,dropout``:
  resume without restoring those RNG states (the resume control);
- ``PIPELINE_TEST_DECODE_LOG=FILE``: append ``<pid> <cache key>`` per decode;
- ``PIPELINE_TEST_KILL_AT_STEP=N``: SIGKILL after step N and its checkpoint;
- ``PIPELINE_TEST_KILL_IN_CHECKPOINT=N``: SIGKILL while checkpoint N is half
  written (temp file synced, not yet renamed);
- ``PIPELINE_TEST_KILL_RANK_AT_STEP=R:S``: SIGKILL rank R after step S;
- ``PIPELINE_TEST_SIGNAL_AT_STEP=R:S:SIG[:launcher]``: rank R sends SIG
  (SIGTERM, SIGUSR1) to itself, or to its parent (the ``--nproc`` launcher),
  after step S: a preemption at a chosen step;
- ``PIPELINE_TEST_PLAIN_ALLREDUCE=1``: ``dist.all_reduce(SUM)`` instead of
  the fixed tree (the world-size control);
- ``PIPELINE_TEST_NO_SHARD_STREAMS=1``: pinned modules draw from torch's
  global generator instead of a stream per (seed, step, shard) (the control
  for randomness inside a module);
- ``PIPELINE_TEST_INTRAOP_THREADS=1``: pinned mode runs ``--threads N`` as
  torch's own intra-op threads instead of shards on threads (the control for
  thread invariance).

In-process tests replace ``SWITCHES`` (``monkeypatch.setattr``); tests that
start processes set the variables, which the new process reads here.

The switches that change a run's bits (``keyed``: no shard streams, skipped
RNG restores, the plain all-reduce, stock intra-op threads) enter the run key
and run.json's ``test_switches``, so a stray variable can never make a
memoised run be served for a real one, nor a real one for a control.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Switches", "SWITCHES", "read", "keyed", "fault", "note_decode"]


@dataclass(frozen=True)
class Switches:
    no_pin: bool = False
    sim_isa: str | None = None
    skip_rng_restore: frozenset[str] = frozenset()
    decode_log: str | None = None
    kill_at_step: int | None = None
    kill_in_checkpoint: int | None = None
    kill_rank_at_step: tuple[int, int] | None = None
    plain_allreduce: bool = False
    no_shard_streams: bool = False
    intraop_threads: bool = False
    signal_at_step: tuple[int, int, str, bool] | None = None  # rank, step, signal, to parent


def _int(environ: Mapping[str, str], name: str) -> int | None:
    v = environ.get(name)
    return int(v) if v else None


def _signal_at(value: str | None) -> tuple[int, int, str, bool] | None:
    if not value:
        return None
    r, s, name, *to = value.split(":")
    return int(r), int(s), name, to == ["launcher"]


def read(environ: Mapping[str, str]) -> Switches:
    """The switches an environment sets (unset or empty: off)."""
    rank_step = environ.get("PIPELINE_TEST_KILL_RANK_AT_STEP")
    r, _, s = (rank_step or "").partition(":")
    return Switches(
        no_pin=environ.get("PIPELINE_TEST_NO_PIN") == "1",
        sim_isa=environ.get("PIPELINE_SIM_CPU_ISA") or None,
        skip_rng_restore=frozenset(
            filter(None, environ.get("PIPELINE_TEST_SKIP_RNG_RESTORE", "").split(","))),
        decode_log=environ.get("PIPELINE_TEST_DECODE_LOG") or None,
        kill_at_step=_int(environ, "PIPELINE_TEST_KILL_AT_STEP"),
        kill_in_checkpoint=_int(environ, "PIPELINE_TEST_KILL_IN_CHECKPOINT"),
        kill_rank_at_step=(int(r), int(s)) if rank_step else None,
        signal_at_step=_signal_at(environ.get("PIPELINE_TEST_SIGNAL_AT_STEP")),
        plain_allreduce=environ.get("PIPELINE_TEST_PLAIN_ALLREDUCE") == "1",
        no_shard_streams=environ.get("PIPELINE_TEST_NO_SHARD_STREAMS") == "1",
        intraop_threads=environ.get("PIPELINE_TEST_INTRAOP_THREADS") == "1",
    )


SWITCHES = read(os.environ)


def keyed(sw: Switches, *, threads: int | None, world_size: int) -> dict[str, Any]:
    """The switches in ``sw`` that change the bits of a run at ``threads``
    (--threads; None: auto) and ``world_size``, as the run key and run.json
    hold them; empty for every real run."""
    out: dict[str, Any] = {}
    if sw.no_shard_streams:
        out["no_shard_streams"] = True
    if sw.skip_rng_restore:
        out["skip_rng_restore"] = sorted(sw.skip_rng_restore)
    if sw.plain_allreduce and world_size > 1:
        out["plain_allreduce"] = {"world_size": world_size}
    if sw.intraop_threads and threads:
        out["intraop_threads"] = threads
    return out


def _kill(why: str) -> None:
    print(f"test: SIGKILL {why} (time {time.time():.3f})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


def fault(point: str, step: int, rank: int = 0,
          flush: Callable[[], None] | None = None) -> None:
    """The fault hook. ``point`` is "step" (after step ``step`` of this
    rank, its checkpoint queued; ``flush`` waits for that write so a kill
    after step N leaves checkpoint N on disk) or "checkpoint" (checkpoint
    ``step``'s temp file is synced, not yet renamed)."""
    sw = SWITCHES
    if point == "checkpoint":
        if sw.kill_in_checkpoint == step:
            _kill(f"in checkpoint {step}")
        return
    if sw.kill_rank_at_step == (rank, step):
        _kill(f"rank {rank} at step {step}")
    if sw.signal_at_step and sw.signal_at_step[:2] == (rank, step):
        name, to_parent = sw.signal_at_step[2:]
        target = os.getppid() if to_parent else os.getpid()
        print(f"test: {name} to pid {target} from rank {rank} after step {step}",
              file=sys.stderr, flush=True)
        os.kill(target, signal.Signals[name])
    if sw.kill_at_step == step:
        if flush is not None:
            flush()
        _kill(f"after step {step}")


def note_decode(key: str) -> None:
    """Append ``<pid> <key>`` to the decode log (tests count decodes)."""
    if SWITCHES.decode_log:
        with open(SWITCHES.decode_log, "a", encoding="utf-8") as f:  # O_APPEND: one write
            f.write(f"{os.getpid()} {key}\n")
