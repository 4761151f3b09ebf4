"""pipeline/audit/contain.py: a user's command runs in a session of its own and
nothing it starts outlives it, whether it ends by itself or at its timeout,
including descendants that started sessions of their own (issue 27, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.audit import contain

from ..support import pipeline_env, run_pipeline

pytestmark = [pytest.mark.process,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux /proc")]

# Starts a grandchild that leaves the session (setsid) and keeps the parent's
# stdout open, writes the grandchild's pid, then sleeps or exits at once.
_SCRIPT = """
import os, subprocess, sys, time
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                     start_new_session=True)
open(sys.argv[1], "w").write(str(g.pid))
if sys.argv[2] == "hang":
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _grandchild(pid_file: Path) -> int:
    for _ in range(200):
        if pid_file.is_file() and pid_file.read_text():
            return int(pid_file.read_text())
        time.sleep(0.05)
    raise AssertionError("the script wrote no pid")


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_a_session_leaving_grandchild_is_ended_with_the_command(tmp_path: Path, how: str) -> None:
    """Whether the command exits (leaving a daemon) or is killed at its
    timeout, the grandchild that called setsid is gone when run() returns."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    code, timed_out = contain.run([sys.executable, "-c", _SCRIPT, str(pid_file), how],
                                  timeout=3, env=dict(os.environ), stdout=subprocess.DEVNULL)
    assert time.monotonic() - started < 60
    assert timed_out is (how == "hang") and (code == 0 if how == "exit" else code < 0)
    assert not _alive(_grandchild(pid_file))


def test_control_without_containment_the_grandchild_survives(tmp_path: Path) -> None:
    """Control: the same script under plain subprocess.run leaves its
    grandchild running (so the test above can fail)."""
    pid_file = tmp_path / "pid"
    subprocess.run([sys.executable, "-c", _SCRIPT, str(pid_file), "exit"], timeout=60,
                   check=True, stdout=subprocess.DEVNULL)
    pid = _grandchild(pid_file)
    try:
        assert _alive(pid)
    finally:
        os.kill(pid, 9)


def test_exec_timeout_returns_promptly_and_ends_everything(tmp_path: Path) -> None:
    """`pipeline exec --timeout 3` of a script whose grandchild holds stdout:
    the caller reading that stdout gets EOF and exit 124 within seconds."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    p = run_pipeline(["exec", "--timeout", "3", "--record", str(tmp_path / "rec.json"), "--",
                      sys.executable, "-c", _SCRIPT, str(pid_file), "hang"],
                     pipeline_env(tmp_path), timeout=120)
    assert p.returncode == 124, p.stderr
    assert time.monotonic() - started < 60
    assert not _alive(_grandchild(pid_file))


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_exec_and_audit_refuse_a_timeout_that_is_not_positive(tmp_path: Path,
                                                              value: str) -> None:
    """Both commands refuse --timeout 0 (and negative, NaN) with exit 2
    (exec used to kill at once, audit refused)."""
    for cmd in (["exec", "--timeout", value, "--", "true"],
                ["audit", "--timeout", value, "--", "true"]):
        p = run_pipeline(cmd, pipeline_env(tmp_path), timeout=120)
        assert p.returncode == 2 and "--timeout" in p.stderr, (cmd, p.stderr)
