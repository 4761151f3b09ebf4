"""Crash safety across processes: `pipeline train` SIGKILLed at random steps
(some in the middle of a checkpoint write) resumes to the uninterrupted run's
weights, bit for bit, in both numeric modes; a killed lock holder blocks
nobody; concurrent trainers of one run key share one result.

The uninterrupted runs are the session's reference runs (tests/conftest.py).
They checkpoint at their default interval; the runs here checkpoint every few
steps. The interval is part of the run key, but not of the arithmetic, so the
weights must agree all the same. Kill points come from a seeded
random.Random and are printed (pytest -s shows them). Each test trains in its
own copy of the checkout: the code is part of the run key, and a run that
resumes must see the code it was killed with.
"""

from __future__ import annotations

import json
import random
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.record.runs import read_run

from ..support import run_pipeline, start_pipeline
from ..support.machines import EXACT, SHORT, TRAIN_TIMEOUT_S, Run, copy_checkout, train_argv

pytestmark = pytest.mark.process

# (overrides, steps per run, the steps that write a checkpoint: every interval
# and every epoch end, never the last step). 22 steps per epoch.
PINNED = (SHORT + ["train.checkpoint_every=7", "train.checkpoint_seconds=0"], 66,
          [7, 14, 21, 22, 28, 35, 42, 44, 49, 56, 63])
EXACT_MODE = (EXACT + ["train.checkpoint_every=5", "train.checkpoint_seconds=0"], 44, [5, 10, 15, 20, 22, 25, 30, 35, 40])
KILLED = -signal.SIGKILL


def _kill_plan(seed: int, total: int, ckpts: list[int], n: int = 5) -> list[tuple[int, str]]:
    """``n`` distinct increasing kill points: two inside a checkpoint write, the
    rest right after a step (the last step included: a kill before the run
    directory is written)."""
    rng = random.Random(seed)
    in_write = rng.sample(ckpts, 2)
    after = rng.sample([s for s in range(1, total + 1) if s not in in_write], n - 2)
    return sorted([(s, "checkpoint") for s in in_write] + [(s, "step") for s in after])


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """This test's own copy of the code, configs and data."""
    return copy_checkout(tmp_path / "checkout")


def _train(overrides: list[str], runs: Path, env: dict[str, str], cwd: Path,
           **extra: str) -> subprocess.CompletedProcess[str]:
    return run_pipeline(train_argv(overrides, runs), {**env, **extra}, cwd,
                        timeout=TRAIN_TIMEOUT_S)


def _resumed_from(stderr: str) -> int:
    m = re.search(r"resuming from ckpt-\d{9}\.safetensors \(step (\d+)\)", stderr)
    return int(m.group(1)) if m else 0


def _ckpt_dir(runs: Path) -> Path:
    found = list(runs.glob(".ckpt-*"))
    assert len(found) == 1, found
    return found[0]


def _finished_clean(runs: Path, p: subprocess.CompletedProcess[str], want: Run) -> None:
    """Exit 0, the reference's weights, a run directory that passes read_run,
    and no checkpoint or temporary directory left behind."""
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    record = json.loads(p.stdout)
    assert record["weights_sha256"] == want.sha256
    assert read_run(runs / record["run_key"]).weights_sha256 == want.sha256
    assert (runs / record["run_key"] / "trail.bin").read_bytes() == want.trail
    assert not [d for d in runs.iterdir() if d.name.startswith((".ckpt-", ".tmp-"))]


def _kill_chain(mode: tuple[list[str], int, list[int]], seed: int, want: Run, runs: Path,
                env: dict[str, str], cwd: Path) -> None:
    overrides, total, ckpts = mode
    plan = _kill_plan(seed, total, ckpts)
    print(f"kill plan (random.Random({seed})): {plan}")
    expect_from = 0
    for step, where in plan:
        switch = "PIPELINE_TEST_KILL_IN_CHECKPOINT" if where == "checkpoint" \
            else "PIPELINE_TEST_KILL_AT_STEP"
        p = _train(overrides, runs, env, cwd, **{switch: str(step)})
        assert p.returncode == KILLED, f"kill at {where} {step}: exit {p.returncode}\n" \
                                       f"{p.stderr[-3000:]}"
        assert _resumed_from(p.stderr) == expect_from, p.stderr[-3000:]
        ckpt = _ckpt_dir(runs)
        if where == "checkpoint":  # died with the temp file synced, not renamed
            assert list(ckpt.glob(f".ckpt-{step:09d}.safetensors.*.tmp"))
            assert not (ckpt / f"ckpt-{step:09d}.safetensors").exists()
        written = [c for c in ckpts if c < step or (c == step and where == "step")]
        expect_from = max(written, default=0)
    p = _train(overrides, runs, env, cwd)
    assert _resumed_from(p.stderr) == expect_from, p.stderr[-3000:]
    _finished_clean(runs, p, want)


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bitwise_pinned(
        short_reference: Run, suite_env: dict[str, str], tmp_path: Path,
        checkout: Path) -> None:
    """Pinned: five SIGKILLs (two in the middle of a checkpoint write), each
    followed by a resume from the newest checkpoint written before it; the
    finished run's weights and trail equal the uninterrupted run's."""
    _kill_chain(PINNED, 20260, short_reference, tmp_path / "runs", suite_env, checkout)


@pytest.mark.slow
def test_sigkill_at_random_steps_resumes_bitwise_exact(
        exact_reference: Run, suite_env: dict[str, str], tmp_path: Path,
        checkout: Path) -> None:
    """Exact mode: the same kill-and-resume chain ends on the uninterrupted
    exact run's weights and trail."""
    _kill_chain(EXACT_MODE, 20261, exact_reference, tmp_path / "runs", suite_env, checkout)


def test_external_sigkill_of_lock_holder(short_reference: Run, suite_env: dict[str, str],
                                         tmp_path: Path, checkout: Path) -> None:
    """A trainer SIGKILLed from outside at a random moment after its first
    checkpoint (holding the run lock, training or writing the run) leaves a
    stale lock file that blocks nobody: the next trainer resumes (or finds the
    run complete) and ends on the uninterrupted weights."""
    runs = tmp_path / "runs"
    overrides = PINNED[0]
    delay = random.Random(20262).uniform(0.0, 0.05)
    print(f"external SIGKILL {delay * 1e3:.1f} ms after the first checkpoint appears")
    proc = start_pipeline(train_argv(overrides, runs), suite_env, checkout,
                          stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + TRAIN_TIMEOUT_S
        while not list(runs.glob(".ckpt-*/ckpt-*.safetensors")):
            assert proc.poll() is None, f"exit {proc.returncode} before any checkpoint"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.001)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)  # the same pid after the pinned re-exec
    finally:
        _, err = proc.communicate(timeout=TRAIN_TIMEOUT_S)
    assert proc.returncode == KILLED, f"exit {proc.returncode}: finished before the kill"
    assert list(runs.glob(".*.lock")), "the killed holder's lock file"
    p = _train(overrides, runs, suite_env, checkout)  # a blocked lock would time out here
    assert _resumed_from(p.stderr) > 0 or not list(runs.glob(".ckpt-*")), p.stderr[-3000:]
    _finished_clean(runs, p, short_reference)


@pytest.mark.slow
def test_four_concurrent_trainers_share_one_run(short_reference: Run,
                                                suite_env: dict[str, str],
                                                tmp_path: Path, checkout: Path) -> None:
    """Four `pipeline train` processes started at once on one run key and one
    runs dir: one trains, the others wait on the lock and reuse its run; all
    print the same weights hash, the uninterrupted one; the run directory is
    intact and nothing temporary is left."""
    runs = tmp_path / "runs"
    argv = ["train", "configs/digits.toml", *PINNED[0], "--runs-dir", str(runs), "--quiet"]
    procs = [start_pipeline(argv, suite_env, checkout) for _ in range(4)]
    outs = [p.communicate(timeout=TRAIN_TIMEOUT_S) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"exit {p.returncode}\n{err[-3000:]}"
    states = sorted("trained" if " trained: " in out else "reused" for out, _ in outs)
    assert states == ["reused", "reused", "reused", "trained"], outs
    hashes = {out.strip().splitlines()[-1] for out, _ in outs}
    assert hashes == {f"weights sha256:{short_reference.sha256}"}
    (key,) = [d.name for d in runs.iterdir() if not d.name.startswith(".")]
    assert read_run(runs / key).weights_sha256 == short_reference.sha256
    assert not [d for d in runs.iterdir() if d.name.startswith((".ckpt-", ".tmp-"))]
