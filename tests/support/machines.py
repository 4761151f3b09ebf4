"""The determinism suite's simulated machines, and how to start `python -m
pipeline` on one.

The machines themselves (``Machine``, ``MACHINES``, how a machine's
environment and argv are built, locale compilation) live in
pipeline/machines.py, shared with ``pipeline audit``; this module re-exports
them under the names the suite uses and adds what only the suite needs: the
configs it trains, starting and finishing ``pipeline train`` processes. The
reference machine is this one with a clean environment (see ``clean_env``):
no PIPELINE_* switch and none of the numeric profile's variables, so that
every difference is the one a profile names.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pipeline.audit.machines import (
    ISA_ORDER,
    KEEP,
    LOCALES,
    MACHINES,
    Machine,
    Places,
    clean_env,
    compile_locales,
    environment,
    profile_variables,
    uts_namespace_problem,
    wrap,
)
from pipeline.core.environment import PROFILE_FILE as PROFILE_JSON

from . import ROOT, copy_source, pipeline_argv

__all__ = ["ISA_ORDER", "KEEP", "LOCALES", "MACHINES", "Machine", "Places", "PROFILE_JSON",
           "clean_env", "compile_locales", "environment", "profile_variables",
           "uts_namespace_problem", "command", "start", "copy_checkout", "Run", "finish",
           "train_argv", "FULL", "SHORT", "EXACT", "TRAIN_TIMEOUT_S", "ROOT"]


# The configs the determinism suite trains: the reference is configs/digits.toml
# as committed; most simulated machines train a shortened one (the cost is
# mostly interpreter start-up, but the fewer steps the better).
FULL: list[str] = []
SHORT = ["train.epochs=3"]
EXACT = ["mode=exact", "train.epochs=2"]
TRAIN_TIMEOUT_S = 300


@dataclass(frozen=True)
class Run:
    """A finished training: its run directory and its run.json."""
    dir: Path
    record: dict[str, Any]

    @property
    def sha256(self) -> str:
        return str(self.record["weights_sha256"])

    @property
    def trail(self) -> bytes:
        return (self.dir / "trail.bin").read_bytes()


def train_argv(overrides: list[str], runs_dir: Path | str,
               config: str = "configs/digits.toml") -> list[str]:
    return ["train", config, *overrides, "--runs-dir", str(runs_dir), "--json", "--quiet"]


def finish(proc: subprocess.Popen[str], runs_dir: Path, what: str) -> Run:
    """Wait for a `pipeline train --json` process; its Run, or a failed test."""
    try:
        out, err = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"{what}: no result in {TRAIN_TIMEOUT_S} s\n{err[-3000:]}")
    assert proc.returncode == 0, f"{what}: exit {proc.returncode}\n{err[-3000:]}"
    record = json.loads(out)
    return Run(runs_dir / record["run_key"], record)


def command(machine: Machine, argv: list[str]) -> list[str]:
    """The argv that starts ``python -m pipeline ARGV`` on ``machine``."""
    return wrap(machine, pipeline_argv(*argv))


def start(machine: Machine, argv: list[str], base: Mapping[str, str], places: Places,
          scratch: Path, extra: Mapping[str, str] | None = None) -> subprocess.Popen[str]:
    """Start ``python -m pipeline ARGV`` on ``machine``; the caller waits."""
    cwd = places.checkout if machine.cwd == "checkout" else places.repo
    return subprocess.Popen(command(machine, argv), cwd=cwd,
                            env=environment(machine, base, places, scratch, extra),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def copy_checkout(dest: Path) -> Path:
    """A copy of the code, configs and data at ``dest`` (no runs, no caches)."""
    return copy_source(dest)
