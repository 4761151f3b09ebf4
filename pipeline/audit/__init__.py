"""``pipeline audit`` and ``pipeline exec``: a user's own training script run
on simulated machines, stock and under the pinned profile, its per-step
capture compared, and a report of where and why it diverges."""

from __future__ import annotations

from ..core._lazy import exports

__all__ = ["add_commands", "run", "audit", "exec_script", "Machine", "MACHINES"]

__getattr__ = exports(__name__, {
    "add_commands": "commands", "run": "commands", "audit": "commands",
    "exec_script": "commands", "Machine": "machines", "MACHINES": "machines"})
