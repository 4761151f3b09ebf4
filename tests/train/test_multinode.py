"""Issue 24: several nodes, other launchers, preemption, each end to end on this
machine (gloo over loopback, a shared runs directory): every way of starting
the workers gives the weights of one process (the `frozen` reference of
test_distributed.py, pinned, world size 1).

- Two "nodes" are two `pipeline train --nproc 2 --nnodes 2` launchers, with
  static ranks or a c10d rendezvous; a node that dies stops the job (exit 6)
  and the rerun resumes to the same hash.
- torchrun, srun and a PyTorchJob start `pipeline train` as a worker: their
  environments are faked here (pipeline.cluster reads them).
- SIGTERM/SIGUSR1 at a seeded step: exit 143 (EXIT_PREEMPTED), rank 0's
  checkpoint of the step the ranks agreed on, and the rerun's hash is the
  uninterrupted run's.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.errors import EXIT_PREEMPTED
from pipeline.launch import Spec, rdzv_id

from ..support import ROOT, build_once, pipeline_argv, pipeline_env, start_pipeline
from .test_distributed import SHORT, TIMEOUT_S, _hash, _train, frozen  # noqa: F401 - fixture

pytestmark = pytest.mark.distributed

ARGS = ["train", "configs/digits.toml", *SHORT, "--quiet"]
NOTE = re.compile(r"finished(?: here)?; rank 0 .*writes the run; weights sha256:([0-9a-f]{64})$")
# Steps are chosen at random from a fixed seed: any step, the same on every run.
STEPS = random.Random(24)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start(src: Path, args: list[str], env: dict[str, str], **popen: Any
           ) -> subprocess.Popen[str]:
    return start_pipeline(args, env, src, **popen)


def _wait(procs: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        out.append((p.returncode, o, e))
    return out


def _nodes(src: Path, runs: Path, env: dict[str, str], how: list[list[str]],
           *extra: str) -> list[tuple[int, str, str]]:
    """One launcher per entry of ``how`` (its own options), all at once."""
    return _wait([_start(src, [*ARGS, *extra, "--runs-dir", str(runs), "--nproc", "2",
                               "--nnodes", str(len(how)), *opts], env) for opts in how])


def _one_hash(results: list[tuple[int, str, str]]) -> str:
    """Every process exited 0; exactly one printed the run (rank 0's), the
    others the note with the same hash; that hash."""
    for code, out, err in results:
        assert code == 0, f"exit {code}\n{out}\n{err[-3000:]}"
    hashes = [m.group(1) for _, out, _ in results if (m := NOTE.search(out.strip()))]
    runs = [_hash(subprocess.CompletedProcess([], 0, out, "")) for _, out, _ in results
            if not NOTE.search(out.strip())]
    assert len(runs) == 1, results
    assert set(hashes) <= set(runs) and len(hashes) == len(results) - 1, results
    return runs[0]


# --- several nodes -----------------------------------------------------------------

def test_rendezvous_id_comes_from_the_run_key() -> None:
    """Two runs (or one run at two world sizes) on one endpoint have different
    rendezvous ids; one run at one size has one."""
    spec = Spec("c.toml", [], "/r", nproc=2, nnodes=2)
    a, b = "a" * 64, "b" * 64
    assert rdzv_id(a, spec) == rdzv_id(a, spec) != rdzv_id(b, spec)
    assert rdzv_id(a, spec) != rdzv_id(a, Spec("c.toml", [], "/r", nproc=4, nnodes=2))


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("ranks", ["static", "rendezvous"])
def test_two_nodes_give_the_one_process_hash(ranks: str, frozen: dict[str, Any],
                                             tmp_path: Path) -> None:
    """Two launchers of two workers each (world size 4), one shared runs
    directory: static ranks (--node-rank, --master-addr/--master-port) or a
    c10d rendezvous where neither names its rank (before issue 24 both took
    rank 0's run lock, and the second waited for ever). One run directory,
    the hash of world size 1."""
    port = _free_port()
    how = ([["--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)]
            for n in range(2)] if ranks == "static" else
           [["--rdzv-endpoint", f"127.0.0.1:{port}"]] * 2)
    runs = tmp_path / "runs"
    h = _one_hash(_nodes(frozen["src"], runs, pipeline_env(tmp_path, clean=True), how))
    assert h == frozen["record"]["weights_sha256"]
    assert [d.name for d in runs.iterdir() if not d.name.startswith(".")] == \
        [frozen["record"]["run_key"]]


@pytest.mark.process
@pytest.mark.slow
def test_a_node_that_dies_stops_the_job_and_the_rerun_resumes(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Node 1 (its launcher and both workers) SIGKILLed after the first
    checkpoint: node 0 exits 6 naming what failed, long before the 60 s
    process-group timeout; the same two commands then resume from the
    checkpoint and end with the uninterrupted run's hash (world size 1)."""
    longer = ["train.epochs=10"]
    env = pipeline_env(tmp_path, clean=True)
    ref = subprocess.run(pipeline_argv(*ARGS, *longer, "--runs-dir", str(tmp_path / "ref")),
                         cwd=frozen["src"], env=env, capture_output=True, text=True,
                         timeout=TIMEOUT_S)
    port, runs = _free_port(), tmp_path / "runs"
    how = [["--node-rank", str(n), "--master-addr", "127.0.0.1", "--master-port", str(port)]
           for n in range(2)]
    procs = [_start(frozen["src"], [*ARGS, *longer, "--runs-dir", str(runs), "--nproc", "2",
                                    "--nnodes", "2", *opts], env, start_new_session=True)
             for opts in how]
    deadline = time.time() + TIMEOUT_S
    while not list(runs.glob(".ckpt-*/ckpt-*")) and time.time() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    os.killpg(procs[1].pid, signal.SIGKILL)
    killed = time.time()
    code, _, err = _wait(procs[:1])[0]
    procs[1].communicate()
    assert code == 6, err[-3000:]
    assert time.time() - killed < 30, time.time() - killed
    assert "resume" in err, err[-3000:]
    assert not [d for d in runs.iterdir() if not d.name.startswith(".")]
    again = _nodes(frozen["src"], runs, env, how, *longer)
    assert any("resuming from ckpt-" in e for _, _, e in again), again
    assert _one_hash(again) == _hash(ref)


# --- other launchers ------------------------------------------------------------------

def _fake_slurm(bin_dir: Path) -> Path:
    """``srun`` (each of SLURM_NTASKS tasks with its SLURM_STEP_ID, SLURM_PROCID
    and SLURM_LOCALID, on this machine; the highest exit code, as srun's),
    ``scontrol`` (appends its arguments to scontrol.log) and ``pipeline``
    (this interpreter's ``-m pipeline``) on a PATH; the log."""
    bin_dir.mkdir()
    log = bin_dir / "scontrol.log"
    scripts = {
        "srun": f"#!{sys.executable}\nimport os, subprocess, sys\n"
                "n = int(os.environ['SLURM_NTASKS'])\n"
                "tasks = [subprocess.Popen(sys.argv[1:], env={**os.environ, 'SLURM_STEP_ID': '0',"
                " 'SLURM_PROCID': str(r), 'SLURM_LOCALID': str(r)}) for r in range(n)]\n"
                "sys.exit(max(t.wait() for t in tasks))\n",
        "scontrol": f'#!/bin/sh\necho "$@" >> {log}\n',
        "pipeline": f'#!/bin/sh\nexec {sys.executable} -m pipeline "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text, encoding="utf-8")
        (bin_dir / name).chmod(0o755)
    return log


@pytest.mark.process
@pytest.mark.slow
def test_the_sbatch_example_trains_requeues_and_resumes(frozen: dict[str, Any],
                                                        tmp_path: Path) -> None:
    """examples/cluster/train.sbatch as sbatch runs it (SLURM_JOB_ID,
    SLURM_NTASKS=2, a compressed SLURM_JOB_NODELIST whose first host is this
    machine), srun faked: SIGUSR1 to a task at a seeded step (Slurm's
    --signal) makes it exit 143 and requeue the job with scontrol; the
    requeued script resumes from rank 0's checkpoint to the hash of one process."""
    log = _fake_slurm(tmp_path / "bin")
    at = STEPS.randrange(2, 18)
    env = pipeline_env(tmp_path, clean=True, PATH=f"{tmp_path / 'bin'}:{os.environ['PATH']}",
                       SLURM_JOB_ID="2424", SLURM_NTASKS="2",
                       SLURM_JOB_NODELIST="127.0.0.[1-2]", MASTER_PORT=str(_free_port()),
                       RUNS_DIR=str(tmp_path / "runs"))
    script = ["bash", str(ROOT / "examples" / "cluster" / "train.sbatch"), "configs/digits.toml",
              *SHORT]

    def batch(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(script, cwd=frozen["src"], env={**env, **extra}, text=True,
                              capture_output=True, timeout=TIMEOUT_S)

    first = batch(PIPELINE_TEST_SIGNAL_AT_STEP=f"1:{at}:SIGUSR1")
    step = _preempted(first, tmp_path / "runs", frozen["record"]["run_key"])
    assert step == at + 1 and log.read_text() == "requeue 2424\n", (at, step, first.stderr)
    again = batch()
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming from ckpt-{step:09d}.safetensors" in again.stderr
    assert _one_hash([(0, o, "") for o in _split_tasks(again.stdout)]) == \
        frozen["record"]["weights_sha256"]
    assert log.read_text() == "requeue 2424\n"


def _split_tasks(stdout: str) -> list[str]:
    """The tasks' outputs, interleaved in one stream: rank 0's record (three
    lines) and each other rank's note (one line)."""
    notes = [ln for ln in stdout.splitlines() if NOTE.search(ln)]
    rest = "\n".join(ln for ln in stdout.splitlines() if not NOTE.search(ln))
    return [rest, *notes]


@pytest.mark.process
@pytest.mark.slow
def test_the_pytorchjob_example_trains_as_the_operator_starts_it(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """examples/cluster/pytorchjob.yaml's replicas started as the training
    operator starts them (RANK 0 the Master, then the Workers; WORLD_SIZE the
    replicas; MASTER_ADDR the Master's service, here this machine; MASTER_PORT
    its pytorchjob-port), each its container's command and args: the hash of
    one process. Its restart policy retries the preempted exit code."""
    import yaml

    job = yaml.safe_load((ROOT / "examples" / "cluster" / "pytorchjob.yaml").read_text())
    specs = job["spec"]["pytorchReplicaSpecs"]
    pods = [specs[kind]["template"]["spec"]["containers"][0]
            for kind in ("Master", "Worker") for _ in range(specs[kind]["replicas"])]
    assert all(specs[k]["restartPolicy"] == "ExitCode" for k in specs)
    assert 128 <= EXIT_PREEMPTED <= 255  # ExitCode: 128-255 are retried, 1-127 are not
    port = str(_free_port())
    assert [p["name"] for p in pods[0]["ports"]] == ["pytorchjob-port"]
    runs = str(tmp_path / "runs")
    procs = []
    for rank, pod in enumerate(pods):
        argv = [a.replace("/runs", runs) for a in pod["command"] + pod["args"]] + SHORT
        assert argv[:3] == ["python", "-m", "pipeline"]
        env = pipeline_env(tmp_path, clean=True, RANK=str(rank), WORLD_SIZE=str(len(pods)),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=port, PYTHONUNBUFFERED="0")
        procs.append(subprocess.Popen([sys.executable, *argv[1:]], cwd=frozen["src"], env=env,
                                      text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE))
    assert _one_hash(_wait(procs)) == frozen["record"]["weights_sha256"]


@pytest.mark.process
@pytest.mark.slow
def test_torchrun_workers_give_the_one_process_hash(frozen: dict[str, Any],
                                                    tmp_path: Path) -> None:
    """`torchrun --nproc-per-node 2 -m pipeline train ...` (torch's own
    launcher, started by the user): the hash of world size 1, printed by rank 0."""
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc-per-node", "2", "-m", "pipeline", *ARGS, "--runs-dir",
                        str(tmp_path / "runs")], cwd=frozen["src"],
                       env=pipeline_env(tmp_path, clean=True), capture_output=True, text=True,
                       timeout=TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith(("weights sha256:", "rank "))]
    assert f"weights sha256:{frozen['record']['weights_sha256']}" in lines, p.stdout
    assert any(NOTE.search(ln) for ln in lines), p.stdout


# --- preemption -----------------------------------------------------------------------

def _preempted(p: subprocess.CompletedProcess[str], runs: Path, key: str) -> int:
    """Exit 143 with the one line, no run directory, and the checkpoint of the
    step the ranks stopped after: that step."""
    assert p.returncode == EXIT_PREEMPTED, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    m = re.search(r"preempted after step (\d+) \((SIG[A-Z0-9]+)", p.stderr)
    assert m, p.stderr[-3000:]
    step = int(m.group(1))
    assert (runs / f".ckpt-{key}" / f"ckpt-{step:09d}.safetensors").is_file()
    assert not (runs / key).exists()
    return step


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize(("world", "sig", "rank"), [(1, "SIGTERM", 0), (1, "SIGUSR1", 0),
                                                    (2, "SIGUSR1", 1)])
def test_preempted_run_checkpoints_and_the_rerun_gives_the_same_hash(
        world: int, sig: str, rank: int, frozen: dict[str, Any], tmp_path: Path) -> None:
    """``sig`` reaches rank ``rank`` alone after a seeded step S (as Slurm
    signals a task, or Kubernetes a pod): every rank finishes step S + 1,
    whose gradients carry the request, rank 0 checkpoints it, the command
    exits 143; the same command resumes from it to the uninterrupted hash.
    At world size 2 the signal reaches rank 1 only: rank 0 stops at the same
    step because the request travels with the gradients."""
    at = STEPS.randrange(2, 18)  # of 22
    runs, key = tmp_path / "runs", frozen["record"]["run_key"]
    env = pipeline_env(tmp_path, clean=True, PIPELINE_TEST_SIGNAL_AT_STEP=f"{rank}:{at}:{sig}")
    step = _preempted(_train(frozen["src"], runs, env, world), runs, key)
    assert step == at + 1, (at, step)
    resumed = _train(frozen["src"], runs, pipeline_env(tmp_path, clean=True), world)
    assert f"resuming from ckpt-{step:09d}.safetensors (step {step})" in resumed.stderr
    assert _hash(resumed) == frozen["record"]["weights_sha256"]


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1"])
def test_a_preempted_launcher_passes_the_signal_on(sig: str, frozen: dict[str, Any],
                                                   shared_dir: Path, tmp_path: Path) -> None:
    """``sig`` to the `--nproc 2` launcher (Kubernetes signals the container's
    first process; Slurm's --signal without B: every process) at a seeded
    step: it passes it to the workers (torchrun's agent SIGTERM itself,
    SIGUSR1 through the launcher's handler), which stop after a later step,
    rank 0 checkpointing it, and exits 143; the rerun ends with the hash of
    an uninterrupted run of that config (world size 1, built once)."""
    longer = ["train.epochs=4"]  # 88 steps: the signal's path takes a few
    at = STEPS.randrange(2, 40)
    env = pipeline_env(tmp_path, clean=True,
                       PIPELINE_TEST_SIGNAL_AT_STEP=f"0:{at}:{sig}:launcher")
    runs = tmp_path / "runs"
    p = _train(frozen["src"], runs, env, 2, *longer)
    assert f"error: {sig}: preempted after step" in p.stderr, p.stderr[-3000:]
    key = next(runs.glob(".ckpt-*")).name.removeprefix(".ckpt-")
    step = _preempted(p, runs, key)
    assert step > at, (at, step)
    resumed = _train(frozen["src"], runs, pipeline_env(tmp_path, clean=True), 2, *longer)
    assert f"(step {step})" in resumed.stderr, resumed.stderr[-3000:]

    def reference() -> dict[str, Any]:
        ref = _train(frozen["src"], shared_dir / "preempt-ref", pipeline_env(shared_dir), 1,
                     *longer)
        return {"hash": _hash(ref)}

    assert _hash(resumed) == build_once(shared_dir, "preempt-ref", reference)["hash"]
