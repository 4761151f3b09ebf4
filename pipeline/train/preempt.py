"""Preemption: SIGTERM or SIGUSR1 asks the training loop to stop after a step.

Slurm preempts a job (and, with ``--signal``, warns of its time limit) with
SIGTERM or SIGUSR1; Kubernetes evicts a pod with SIGTERM. While the loop runs
(``watch``), either signal only records the request; the loop sends it with the
step's gradients (TorchComm.exchange), so every rank learns of a request made
on any rank at the same step, finishes that step, rank 0 checkpoints it, and
every rank raises core.errors.Preempted (exit 143, a retry for the schedulers).
Outside ``watch`` the process's own handlers apply.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["SIGNALS", "watch", "requested", "request"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_state: dict[str, str | None] = {"signal": None}


def request(signum: int, _frame: Any = None) -> None:
    """The handler: remember the (first) signal; the loop stops after its step."""
    if _state["signal"] is None:
        _state["signal"] = signal.Signals(signum).name


def requested() -> str | None:
    """The name of the signal that asked this process to stop, or None."""
    return _state["signal"]


@contextlib.contextmanager
def watch() -> Iterator[None]:
    """Record SIGTERM/SIGUSR1 instead of acting on them, for the duration; the
    previous handlers come back afterwards. Only the main thread may set
    handlers (an in-process caller on another thread trains unwatched)."""
    _state["signal"] = None
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, request) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
