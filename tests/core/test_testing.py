"""Tests for pipeline/_testing.py: switches are parsed once from the
environment, and the fault hook kills exactly where it is told to."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from pipeline.core import _testing

from ..support import ROOT


def test_read_parses_every_switch_and_defaults_off() -> None:
    """Each variable maps to its field; an empty environment switches nothing on."""
    assert _testing.read({}) == _testing.Switches()
    sw = _testing.read({"PIPELINE_TEST_NO_PIN": "1", "PIPELINE_SIM_CPU_ISA": "avx2",
                        "PIPELINE_TEST_SKIP_RNG_RESTORE": "dropout,numpy",
                        "PIPELINE_TEST_DECODE_LOG": "/tmp/l",
                        "PIPELINE_TEST_KILL_AT_STEP": "7",
                        "PIPELINE_TEST_KILL_IN_CHECKPOINT": "5",
                        "PIPELINE_TEST_KILL_RANK_AT_STEP": "1:15",
                        "PIPELINE_TEST_PLAIN_ALLREDUCE": "1",
                        "PIPELINE_TEST_NO_SHARD_STREAMS": "1"})
    assert sw == _testing.Switches(True, "avx2", frozenset({"dropout", "numpy"}), "/tmp/l",
                                   7, 5, (1, 15), True, True)


@pytest.mark.process
@pytest.mark.parametrize(("env", "call", "killed"), [
    ({"PIPELINE_TEST_KILL_AT_STEP": "3"}, "'step', 3", True),
    ({"PIPELINE_TEST_KILL_AT_STEP": "3"}, "'step', 4", False),
    ({"PIPELINE_TEST_KILL_RANK_AT_STEP": "1:3"}, "'step', 3, 1", True),
    ({"PIPELINE_TEST_KILL_RANK_AT_STEP": "1:3"}, "'step', 3, 0", False),
    ({"PIPELINE_TEST_KILL_IN_CHECKPOINT": "5"}, "'checkpoint', 5", True),
    ({"PIPELINE_TEST_KILL_IN_CHECKPOINT": "5"}, "'step', 5", False),
])
def test_fault_kills_only_at_its_point(env: dict[str, str], call: str, killed: bool) -> None:
    """A fresh process reads the switch at start-up; fault() SIGKILLs it at the
    named point and nowhere else."""
    code = f"from pipeline.core import _testing; _testing.fault({call}); print('alive')"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert (p.returncode == -signal.SIGKILL) is killed, p.stderr
    assert ("alive" in p.stdout) is not killed
