"""Run a user's command so that nothing it starts outlives it.

The command runs in a session of its own (a new process group), and when it
ends, or its time is up, the whole group is killed. A descendant that left
the group (``setsid``, a daemon's double fork) is still found: this process
makes itself the "child subreaper" of everything below it (Linux,
PR_SET_CHILD_SUBREAPER), so such a process is re-parented here when its
parent dies, and it carries the run's token in its environment, which says
whose it is when several commands run at once (``pipeline audit --jobs``).
Without a subreaper (not Linux) the group is still ended.

Without this, ``pipeline exec --timeout 5`` killed only its direct child: a
grandchild holding stdout kept the caller waiting (582 s in a review), and
an audit left children that had started sessions of their own.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["run", "TOKEN_VAR"]

TOKEN_VAR = "PIPELINE_RUN_TOKEN"
_PR_SET_CHILD_SUBREAPER = 36
_state: dict[str, bool] = {}


def _become_subreaper() -> None:
    if _state.get("subreaper") is not None or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    _state["subreaper"] = libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def run(cmd: Sequence[str], *, timeout: float | None, env: dict[str, str],
        **popen: Any) -> tuple[int, bool]:
    """Run ``cmd`` contained; (its exit status, whether it was killed at
    ``timeout``). Raises what Popen raises when it cannot start."""
    _become_subreaper()
    token = uuid.uuid4().hex
    proc = subprocess.Popen(list(cmd), env={**env, TOKEN_VAR: token},
                            start_new_session=True, **popen)
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        _kill_group(proc.pid)
        proc.wait()
        _end_strays(token)
    return int(proc.returncode), timed_out


def _kill_group(pgid: int) -> None:
    if pgid == os.getpgid(0):
        return  # never our own group
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _end_strays(token: str) -> None:
    """Kill and reap the processes re-parented to this one that carry
    ``token`` (and their groups), until none is left."""
    for _ in range(100):  # each round ends one generation of strays
        strays = [pid for pid in _children() if _token_of(pid) == token]
        if not strays:
            return
        for pid in strays:
            try:
                _kill_group(os.getpgid(pid))
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in strays:
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass


def _children() -> list[int]:
    """The pids whose parent is this process (from /proc; empty elsewhere)."""
    me, out = os.getpid(), []
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "
        if len(fields) > 1 and int(fields[1]) == me:
            out.append(int(d.name))
    return out


def _token_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(TOKEN_VAR.encode() + b"="):
            return item.split(b"=", 1)[1].decode(errors="replace")
    return None
