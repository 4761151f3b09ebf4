"""Tests for pipeline/distributed.py and pipeline/launch.py: the weights do not
depend on the world size. End-to-end runs go through `pipeline train --nproc N`
(torchrun in the launcher, gloo on 127.0.0.1, a free port from torchrun's
standalone rendezvous) in a frozen copy of the checkout, so that edits made
while the suite runs cannot change the run key between two runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline import cli
from pipeline.train.distributed import LocalComm, TorchComm, TreeFold, add_grads, tree_reduce

from ..support import (
    ROOT,
    build_once,
    copy_source,
    pipeline_env,
    process_alive,
    run_pipeline,
    start_pipeline,
)

pytestmark = pytest.mark.distributed

PARTS = ("pipeline", "configs", "data", "data-manifest.json", "requirements.lock",
         "pyproject.toml")
# Tiny on purpose: the cost is interpreter start-up, W + 1 processes a run.
# 22 steps of the default config as committed: its 8 shards allow world sizes 1, 2, 4, 8.
SHORT = ["train.epochs=1", "train.checkpoint_every=5", "train.checkpoint_seconds=0"]
HASH = re.compile(r"^weights sha256:([0-9a-f]{64})$")
TIMEOUT_S = 300


# --- the tree: a rank's shards are a subtree ----------------------------------

def _grads(seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    # Magnitudes spread over decades, so that the order of additions shows.
    scale = torch.logspace(-6, 6, 257)[torch.randint(0, 257, (33,), generator=g)]
    return (torch.randn((), generator=g) * 1e3,
            {"w": torch.randn(33, generator=g) * scale, "b": torch.randn(3, generator=g)})


def _bits(x: tuple[torch.Tensor, dict[str, torch.Tensor]]) -> list[bytes]:
    return [x[0].numpy().tobytes(), *(v.numpy().tobytes() for _, v in sorted(x[1].items()))]


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_rank_partials_finish_the_same_tree(world: int) -> None:
    """Summing each rank's contiguous shards, then the W partials in rank order,
    gives the bits of one tree over all 16 shards."""
    shards = [_grads(s) for s in range(16)]
    whole = tree_reduce(shards, add_grads)
    per = 16 // world
    partials = [tree_reduce(shards[r * per:(r + 1) * per], add_grads) for r in range(world)]
    assert _bits(tree_reduce(partials, add_grads)) == _bits(whole)


def test_control_left_to_right_sum_has_other_bits() -> None:
    """Control: a left-to-right sum of the same 16 shards differs from the
    tree, so the test above can fail."""
    shards = [_grads(s) for s in range(16)]
    seq = shards[0]
    for s in shards[1:]:
        seq = add_grads(seq, s)
    assert _bits(seq) != _bits(tree_reduce(shards, add_grads))


def test_tree_fold_adds_as_the_tree_does_holding_log_n_sums() -> None:
    """Items pushed one at a time give tree_reduce's additions in its order
    (a non-associative add that writes the parentheses), for 1..70 items,
    holding at most log2(n) + 1 sums."""
    def paren(a: str, b: str) -> str:
        return f"({a}+{b})"
    for n in range(1, 71):
        fold: TreeFold[str] = TreeFold(paren)
        most = 0
        for i in range(n):
            fold.push(str(i))
            most = max(most, len(fold.stack))
        assert fold.result() == tree_reduce([str(i) for i in range(n)], paren), n
        assert most <= n.bit_length()
    # control: a left-to-right fold writes other parentheses from 3 items on
    assert tree_reduce(["0", "1", "2", "3"], paren) != "(((0+1)+2)+3)"


def _comm_worker(rank: int, world: int, port: int, out: str, gather_below: int) -> None:
    """One rank of a gloo group: combine() of its partial (some gradients None)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loss, grads = _rank_partial(rank)
        comm = TorchComm(torch.device("cpu"), gather_below=gather_below)
        comm.expect({k: torch.zeros_like(v) for k, v in _grads(0)[1].items()}
                    | {"c": torch.zeros(5)})
        total = comm.combine((loss, grads))
        # Preemption: the last rank's stop request reaches every rank; none, none.
        _, stop = comm.exchange((loss, grads), stop=rank == world - 1)
        _, quiet = comm.exchange((loss, grads), stop=False)
        torch.save({"loss": total[0], "stop": torch.tensor([stop, quiet]),
                    **{k: (v if v is not None else "none") for k, v in total[1].items()}},
                   f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def _rank_partial(rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | None]]:
    """Rank r's partial: 'b' only on even ranks, 'c' on rank 1 alone."""
    loss, g = _grads(100 + rank)
    return loss, {"w": g["w"], "b": g["b"] if rank % 2 == 0 else None,
                  "c": torch.full((5,), -0.0) if rank == 1 else None}


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.parametrize("world, gather_below", [(2, 0), (8, 0), (4, 1 << 20)])
def test_torch_comm_gives_the_trees_bits_on_every_rank(world: int, gather_below: int,
                                                       tmp_path: Path) -> None:
    """TorchComm.combine over gloo equals tree_reduce of the W partials on
    every rank, bit for bit, with gradients some ranks lack taken as they are
    (rank 1's -0.0 stays -0.0: never added to a zero): by the reduce-scatter
    and its mirror all-gather (gather_below 0: no rank holds W partials), and
    by one all-gather of the partials (a small buffer). A stop request
    (preemption) from the last rank reaches every rank with the gradients."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_comm_worker, args=(world, port, str(tmp_path), gather_below),
                       nprocs=world,
                       start_method="spawn")
    want = tree_reduce([_rank_partial(r) for r in range(world)], add_grads)
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        assert got["loss"].numpy().tobytes() == want[0].numpy().tobytes()
        for k in ("w", "b", "c"):
            assert got[k].numpy().tobytes() == want[1][k].numpy().tobytes(), (r, k)
        assert torch.signbit(got["c"]).all()  # -0.0, as rank 1 sent it
        assert got["stop"].tolist() == [True, False], r


def test_local_comm_is_the_identity() -> None:
    """World size 1: combine returns the partial; decide returns the flag."""
    part = _grads(0)
    assert LocalComm().combine(part) is part and LocalComm().decide(True)


@pytest.mark.parametrize("nproc, shards", [(3, 4), (8, 4), (2, 1), (0, 4)])
def test_world_size_must_be_a_power_of_two_dividing_shards(
        nproc: int, shards: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc that is not a power of two dividing train.shards: exit 2, a
    message naming the world size and train.shards, nothing written."""
    monkeypatch.setenv("PIPELINE_CACHE_DIR", str(tmp_path / "cache"))
    runs = tmp_path / "runs"
    code = cli.main(["train", "configs/digits.toml", f"train.shards={shards}",
                     "--nproc", str(nproc), "--runs-dir", str(runs)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"train.shards={shards}" in err or "--nproc 0" in err
    assert not runs.exists()


# --- end to end: pipeline train --nproc N -------------------------------------

@pytest.fixture(scope="session")
def frozen(shared_dir: Path) -> dict[str, Any]:
    """One copy of the checkout for the session, and the reference run trained
    in it at world size 1 (pinned), built once under a FileLock (pytest-xdist
    how-to, support.build_once) and shared by every worker."""
    root = shared_dir / "distributed"
    root.mkdir(exist_ok=True)

    def build() -> dict[str, Any]:
        src = copy_source(root / "src", PARTS)
        p = _train(src, root / "runs", pipeline_env(root, clean=True), 1, "--json")
        return {"src": str(src), "returncode": p.returncode, "stdout": p.stdout,
                "stderr": p.stderr}

    got = build_once(root, "frozen", build)
    if got["returncode"] == 4:  # this CPU cannot run the pinned profile
        pytest.skip(f"pinned profile refused here: {got['stderr'].strip()}")
    assert got["returncode"] == 0, got["stderr"][-3000:]
    return {"src": Path(got["src"]), "record": json.loads(got["stdout"])}


def _train(src: Path, runs: Path, env: dict[str, str], nproc: int, *extra: str
           ) -> subprocess.CompletedProcess[str]:
    return run_pipeline(["train", "configs/digits.toml", *SHORT, *extra, "--runs-dir", str(runs),
                         "--quiet", "--nproc", str(nproc)], env, src, timeout=TIMEOUT_S)


def _record(p: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    return dict(json.loads(p.stdout))


def _hash(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    m = HASH.match(p.stdout.strip().splitlines()[-1])
    assert m, p.stdout
    return m.group(1)


@pytest.mark.process
@pytest.mark.slow
def test_pinned_weights_are_the_same_at_world_size_1_2_4(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Pinned mode, the default config's 8 shards: world sizes 2 and 4 give the
    weight hash and run key of world size 1; run.json records the world size;
    the launcher's last line is rank 0's hash."""
    ref = frozen["record"]
    assert ref["world_size"] == 1
    for n in (2, 4):
        rec = _record(_train(frozen["src"], tmp_path / f"runs{n}",
                             pipeline_env(tmp_path, clean=True), n, "--json"))
        assert (rec["weights_sha256"], rec["run_key"]) == (ref["weights_sha256"],
                                                           ref["run_key"]), n
        assert rec["world_size"] == n
        assert len([d for d in (tmp_path / f"runs{n}").iterdir()
                    if not d.name.startswith(".")]) == 1
    again = _train(frozen["src"], tmp_path / "runs2", pipeline_env(tmp_path, clean=True), 2)
    assert _hash(again) == ref["weights_sha256"] and "reused" in again.stdout


@pytest.mark.process
@pytest.mark.slow
def test_exact_weights_are_the_same_at_world_size_1_2_4(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Exact mode (no profile, one thread per worker): world sizes 1, 2 and 4
    give one weight hash."""
    hashes = [_hash(_train(frozen["src"], tmp_path / f"runs{n}",
                           pipeline_env(tmp_path, clean=True), n,
                           "mode=exact")) for n in (1, 2, 4)]
    assert hashes[0] == hashes[1] == hashes[2], hashes


@pytest.mark.process
@pytest.mark.slow
def test_control_plain_all_reduce_changes_the_weights(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Control: with PIPELINE_TEST_PLAIN_ALLREDUCE=1 (dist.all_reduce(SUM) of
    the rank partials, the usual DDP way) world size 4 gives other weights
    than world size 1, so the invariance test can fail. (At world size 2 the
    all-reduce is one IEEE add of two operands, which commutes: the same bits.)"""
    env = pipeline_env(tmp_path, clean=True, PIPELINE_TEST_PLAIN_ALLREDUCE="1")
    rec = _record(_train(frozen["src"], tmp_path / "runs", env, 4, "--json"))
    assert rec["weights_sha256"] != frozen["record"]["weights_sha256"]
    # The switch changes the bits, so it is keyed and recorded: never served as the real run.
    assert rec["test_switches"] == {"plain_allreduce": {"world_size": 4}}
    assert rec["run_key"] != frozen["record"]["run_key"]


@pytest.mark.process
@pytest.mark.slow
def test_killed_rank_stops_the_run_which_resumes_at_another_world_size(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """SIGKILL of rank 1 before step 16 of world size 2: exit 6 naming the
    rank, well within the 60 s process-group timeout of the kill; its last
    checkpoint kept and no run directory; the same command at world size 1
    resumes from that checkpoint and ends with the uninterrupted run's hash."""
    runs, ref = tmp_path / "runs", frozen["record"]
    p = _train(frozen["src"], runs,
               pipeline_env(tmp_path, clean=True, PIPELINE_TEST_KILL_RANK_AT_STEP="1:15"), 2)
    ended = time.time()
    assert p.returncode == 6, f"exit {p.returncode}\n{p.stderr[-3000:]}"
    assert "rank 1 (killed by SIGKILL)" in p.stderr and "resume" in p.stderr
    killed = re.search(r"test: SIGKILL rank 1 at step 15 \(time ([0-9.]+)\)", p.stderr)
    assert killed, p.stderr[-3000:]
    assert ended - float(killed.group(1)) < 30, ended - float(killed.group(1))
    ckpts = sorted(c.name for c in (runs / f".ckpt-{ref['run_key']}").glob("ckpt-*"))
    # Rank 0 saves step 15's checkpoint as rank 1 dies; torchrun's SIGTERM may
    # beat that write (which is atomic: then there is no file), never tear it.
    assert ckpts and ckpts[-1] in ("ckpt-000000010.safetensors",
                                   "ckpt-000000015.safetensors"), ckpts
    assert not (runs / ref["run_key"]).exists()
    resumed = _train(frozen["src"], runs, pipeline_env(tmp_path, clean=True), 1, "--json")
    rec = _record(resumed)
    step = int(ckpts[-1][5:14])
    assert f"resuming from {ckpts[-1]} (step {step})" in resumed.stderr
    assert (rec["resumed_from_step"], rec["world_size"]) == (step, 1)
    assert rec["weights_sha256"] == ref["weights_sha256"]


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.process
@pytest.mark.slow
def test_sigkilled_launcher_takes_its_workers_and_a_rerun_resumes(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Issue 13, case 6: SIGKILL of the `--nproc 2` launcher (the run lock's
    holder) mid-run: no worker survives it by more than a few seconds (they
    die with their parent, PR_SET_PDEATHSIG), so none trains or writes
    without the lock; the same command then resumes from the last checkpoint
    and ends with the uninterrupted run's hash."""
    runs = tmp_path / "runs"
    longer = ["train.epochs=30", "train.shards=4", "train.checkpoint_every=5",
              "train.checkpoint_seconds=0"]
    cmd = ["train", "configs/digits.toml", *longer, "--runs-dir", str(runs), "--quiet",
           "--nproc", "2"]
    p = start_pipeline(cmd, pipeline_env(tmp_path, clean=True), frozen["src"])
    deadline = time.time() + TIMEOUT_S
    while not list(runs.glob(".ckpt-*/ckpt-*")) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.01)
    workers = _children(p.pid)
    assert len(workers) == 2, workers
    p.kill()
    p.communicate()
    gone = time.time() + 10
    while any(process_alive(w) for w in workers) and time.time() < gone:
        time.sleep(0.05)
    assert not any(process_alive(w) for w in workers), "workers outlived their launcher"
    assert not [d for d in runs.iterdir() if not d.name.startswith(".")]
    resumed = run_pipeline(cmd[:-2] + ["--json"], pipeline_env(tmp_path, clean=True),
                           frozen["src"], timeout=TIMEOUT_S)
    rec = _record(resumed)
    assert "resuming from" in resumed.stderr and rec["resumed_from_step"] > 0
    ref = _record(run_pipeline(cmd[:-2] + ["--json", "--runs-dir", str(tmp_path / "ref")],
                               pipeline_env(tmp_path, clean=True), frozen["src"],
                               timeout=TIMEOUT_S))
    assert rec["weights_sha256"] == ref["weights_sha256"]


@pytest.mark.process
@pytest.mark.slow
def test_ctrl_c_of_a_multi_process_run_prints_one_line(
        frozen: dict[str, Any], tmp_path: Path) -> None:
    """Issue 13, interrupts: Ctrl-C (SIGINT to the foreground process group) of
    `--nproc 2` mid-run: exit 130 and one line, no per-rank tracebacks and no
    torchrun warnings."""
    runs = tmp_path / "runs"
    cmd = ["train", "configs/digits.toml", "train.epochs=30", "train.shards=4",
           "train.checkpoint_seconds=0", "--runs-dir", str(runs), "--quiet", "--nproc", "2"]
    p = start_pipeline(cmd, pipeline_env(tmp_path, clean=True), frozen["src"],
                       start_new_session=True)
    deadline = time.time() + TIMEOUT_S
    while not list(runs.glob(".ckpt-*/ckpt-*")) and time.time() < deadline:
        assert p.poll() is None, p.communicate()
        time.sleep(0.01)
    os.killpg(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=TIMEOUT_S)
    assert p.returncode == 130, err
    assert err == "interrupted; rerun the same command to resume\n", err


def test_a_worker_writes_nothing_on_stdout(tmp_path: Path) -> None:
    """A worker's file descriptor 1 is its stderr, or /dev/null under --quiet
    (``launch._redirect_stdout``), so what a library prints from C++ (torch 2.9.1's
    gloo: "[Gloo] Rank 0 is connected ...") cannot get into the launcher's stdout,
    which `--json` makes one JSON record. The control: without it the writes reach
    stdout."""
    code = ("import os, sys\n"
            "if sys.argv[1] != 'control':\n"
            "    from pipeline.launch import _redirect_stdout\n"
            "    _redirect_stdout(sys.argv[1] == 'quiet')\n"
            "os.write(1, b'[Gloo] from C\\n'); print('from Python', flush=True)\n")
    out = {}
    for role in ("worker", "quiet", "control"):
        out[role] = subprocess.run([sys.executable, "-c", code, role], cwd=ROOT, text=True,
                                   capture_output=True, timeout=120, check=True,
                                   env=pipeline_env(tmp_path))
    assert out["worker"].stdout == "" and out["quiet"].stdout == "", out
    assert "[Gloo] from C" in out["worker"].stderr and "from Python" in out["worker"].stderr
    assert "[Gloo]" not in out["quiet"].stderr, out["quiet"].stderr
    assert "[Gloo] from C" in out["control"].stdout
