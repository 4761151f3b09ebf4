"""``pipeline train --nproc N``: N worker processes through torch's own launcher.

The launcher (this process, started by the CLI) checks the world size,
prepares the process through the recipe (pinned mode re-executes it) so that
the workers inherit the pinned environment before their interpreters start
(pytorch issue 15359), verifies the data, takes the run's file lock (node 0),
and runs torchrun in-process (``torch.distributed.run``) on
``-m pipeline.launch``: each worker reads the launch's ``Spec`` and runs the
recipe (recipe.get_or_train) with a TorchComm. Only rank 0 writes
runs/<key>. Workers report through rank-<r>.json files in a private
temporary directory; the launcher returns rank 0's result for the CLI to
print, or the first worker's error and its exit code; a worker that died is
a DistributedError (exit 6).

With ``--rdzv-endpoint`` the ranks are assigned at rendezvous, so no launcher
knows beforehand whether it runs rank 0: the worker of global rank 0 takes the
run lock (``Spec.worker_lock``), and the rendezvous id comes from the run key,
so two jobs on one endpoint never join each other. ``serve`` runs this process
as one worker of a job that another launcher started (torchrun, srun, a
PyTorchJob: pipeline.cluster); its global rank 0 takes the lock the same way.

SIGTERM or SIGUSR1 (preemption, pipeline.train.preempt) to the launcher is
passed to the workers, which stop after one step, rank 0 checkpointing it; the
launcher exits with core.errors.EXIT_PREEMPTED (143).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from . import modes, recipe
from .cluster import Worker
from .core import _testing, atomic
from .core.config import Config, load_config
from .core.errors import DistributedError, Preempted, UsageError, WorkerError, exit_status
from .record import runs
from .record.schema import RunRecord
from .train.threads import worker_environment, worker_threads

__all__ = ["Spec", "Outcome", "launch", "serve", "world_size", "rdzv_id", "TIMEOUT_ENV",
           "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_S"  # process-group timeout: a silent peer is an error
DEFAULT_TIMEOUT_S = 60.0
_RESULTS_ENV = "PIPELINE_LAUNCH_DIR"     # spec.json in, rank-<r>.json out (launcher-set)
_LAUNCHER_ENV = "PIPELINE_LAUNCHER_PID"  # the launcher's pid: workers die with it
_PREEMPT = (signal.SIGTERM, signal.SIGUSR1)


@dataclass(frozen=True)
class Spec:
    """One ``pipeline train --nproc N`` as the workers need it."""

    config: str              # the config file, resolved
    overrides: list[str]
    runs_dir: str            # absolute
    device: str = "cpu"
    quiet: bool = False
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None
    rdzv_endpoint: str | None = None
    force: bool = False      # replace a runs/<key> that fails its checks
    threads: int | None = None  # per worker (pipeline.train.threads); None: 1, as W workers use W cores
    manifest: str | None = None  # the project's data manifest (None: recipe.manifest_path's)
    loader_workers: int = 0  # per worker (pipeline.data.loader)
    worker_lock: bool = False  # global rank 0's worker takes the run lock (ranks from rendezvous)


@dataclass(frozen=True)
class Outcome:
    """Rank 0's record and whether it was reused; or, on a node without rank
    0, ``record`` None and a ``note`` to print."""

    record: RunRecord | None
    reused: bool = False
    note: str = ""


def _manifest(spec: Spec) -> Path | None:
    return Path(spec.manifest) if spec.manifest else None


def world_size(spec: Spec, cfg: Config) -> int:
    """nnodes * nproc, or UsageError unless it is a power of two dividing
    train.shards: then each rank's shards are an aligned subtree of the fixed
    reduction tree (docs/exact-spec.md sections 5 and 8)."""
    if spec.nproc < 1 or spec.nnodes < 1 or not 0 <= spec.node_rank < spec.nnodes:
        raise UsageError(f"expected --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < "
                         f"--nnodes, found --nproc {spec.nproc} --nnodes {spec.nnodes} "
                         f"--node-rank {spec.node_rank}")
    w = spec.nproc * spec.nnodes
    check_world(w, cfg, f"--nproc {spec.nproc} x --nnodes {spec.nnodes}", "--nproc")
    return w


def check_world(w: int, cfg: Config, how: str, change: str) -> None:
    """UsageError unless ``w`` (given as ``how``) is a power of two dividing
    train.shards; ``change``: what the user should change."""
    shards = cfg.train.shards
    if w & (w - 1) or shards % w:
        fits = [n for n in range(1, shards + 1) if shards % n == 0 and not n & (n - 1)]
        raise UsageError(f"world size {w} ({how}): expected a power of two dividing "
                         f"train.shards={shards}, i.e. one of {fits}; change {change}, or "
                         f"raise train.shards (which changes the run)")


def rdzv_id(key: str, spec: Spec) -> str:
    """The c10d rendezvous id: the run key's and the world's, so that two jobs
    sharing an endpoint (another run, or this run at another size) never meet."""
    return f"pipeline-{key[:24]}-{spec.nnodes}x{spec.nproc}"


def launch(spec: Spec, argv: list[str], cfg: Config) -> Outcome:
    """Run the recipe on nnodes * nproc workers; return rank 0's result."""
    world_size(spec, cfg)
    if spec.nnodes > 1 and not (spec.rdzv_endpoint or spec.master_addr):
        raise UsageError("--nnodes > 1 needs --master-addr and --master-port, or "
                         "--rdzv-endpoint HOST:PORT")
    os.environ.update(worker_environment(modes.of(cfg.mode).pins_threads()))
    prep = recipe.prepare(cfg, argv, Path(spec.config).parent,  # pinned: re-exec first
                          manifest_file=_manifest(spec), threads=worker_threads(spec.threads),
                          world_size=world_size(spec, cfg), device=spec.device)
    runs_dir, key = Path(spec.runs_dir), prep.inputs.key
    # With static ranks node 0 holds the run lock for the whole launch, so the
    # workers need none. With a rendezvous every node leaves out --node-rank (0):
    # the worker that becomes global rank 0 takes it (issue 24).
    spec = dataclasses.replace(spec, worker_lock=bool(spec.rdzv_endpoint))
    lead = spec.node_rank == 0 and not spec.worker_lock
    lock = runs.run_lock(runs_dir, key) if lead else contextlib.nullcontext()
    with lock, tempfile.TemporaryDirectory(prefix="pipeline-launch-") as tmp:
        # The recipe's checks of runs/<key> (re-derived reuse; a foreign file
        # refused) run here, before any worker starts.
        if lead and recipe.check_existing(runs_dir / key, prep.inputs, spec.force):
            return Outcome(runs.reusable(runs_dir / key, prep.inputs), reused=True)
        atomic.write_text(Path(tmp) / "spec.json", json.dumps(dataclasses.asdict(spec)))
        failures, stopped_by = _torchrun(spec, Path(tmp), key)
        results = {int(p.stem[5:]): json.loads(p.read_text(encoding="utf-8"))
                   for p in Path(tmp).glob("rank-*.json")}
    if stopped_by:
        raise _preempted(stopped_by, results, runs_dir, key)
    if failures or any(r["exit_code"] for r in results.values()):
        return _failed(failures, results, runs_dir, key)
    return _finish(results)


def _preempted(sig: str, results: dict[int, dict[str, Any]], runs_dir: Path,
               key: str) -> Preempted:
    """The launcher got SIGTERM/SIGUSR1 and passed it on: what rank 0 said."""
    said = results.get(0, {})
    if said.get("exit_code") == Preempted.exit_code:
        return Preempted(f"{sig}: {said['error']}", said.get("step"))
    if said.get("exit_code") == 0:
        return Preempted(f"{sig} came as the run ended; rerun the same command: the run "
                         f"is reused")
    return Preempted(f"{sig}: the workers stopped before a step's checkpoint (rank 0: "
                     f"{said.get('error', 'no report')}); the last checkpoint in "
                     f"{runs_dir / f'.ckpt-{key}'} (if any) stands: rerun the same command "
                     f"to resume")


def _torchrun(spec: Spec, results: Path, key: str) -> tuple[dict[int, Any], str | None]:
    """torchrun in this process; ({global rank: ProcessFailure} of failed
    workers, the name of the preempting signal that stopped it or None)."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .core.environment import child_pythonpath

    targs = ["--nproc-per-node", str(spec.nproc), "--nnodes", str(spec.nnodes),
             "--node-rank", str(spec.node_rank), "--max-restarts", "0",
             "--monitor-interval", "0.1"]
    if spec.rdzv_endpoint:
        targs += ["--rdzv-backend", "c10d", "--rdzv-endpoint", spec.rdzv_endpoint,
                  "--rdzv-id", rdzv_id(key, spec)]
    elif spec.master_addr or spec.master_port is not None:
        port = 29500 if spec.master_port is None else spec.master_port
        targs += ["--master-addr", spec.master_addr or "127.0.0.1", "--master-port", str(port)]
    else:
        targs += ["--standalone"]  # c10d rendezvous on a free localhost port
    targs += ["-m", "pipeline.launch"]
    os.environ[_RESULTS_ENV] = str(results)
    os.environ[_LAUNCHER_ENV] = str(os.getpid())  # the workers' parent, the lock holder
    # torchrun's agent logs a WARNING per worker when it stops them (Ctrl-C): the
    # CLI's one line says it; its errors (ERROR) still show.
    for name in list(logging.root.manager.loggerDict):  # each sets its own level
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.ERROR)
    # Workers are `sys.executable -m pipeline.launch`: under a wrapper that puts the
    # dependencies on sys.path only (nixpkgs' wrap-python) they need this process's path.
    if child_pythonpath():
        os.environ["PYTHONPATH"] = child_pythonpath()
    # torchrun's agent passes SIGTERM on to the workers itself; SIGUSR1 (Slurm's
    # warning before a time limit) it does not handle (torch 2.9), so it is raised
    # the way torchrun raises its own signals, and the agent passes it on likewise.
    before = signal.signal(signal.SIGUSR1, _raise_signal)
    try:
        run(get_args_parser().parse_args(targs))
    except ChildFailedError as e:
        return dict(e.failures), None
    except SignalException as e:
        if e.sigval == signal.SIGINT:
            raise KeyboardInterrupt from None  # the CLI's one line: rerun to resume
        if e.sigval in _PREEMPT:  # the workers stopped after a step, checkpointed
            return {}, e.sigval.name
        raise DistributedError(f"launcher stopped by {e.sigval.name}; the workers were "
                               f"stopped too. Rerun the same command to resume") from None
    finally:
        signal.signal(signal.SIGUSR1, before)
    return {}, None


def _raise_signal(signum: int, _frame: Any) -> None:
    from torch.distributed.elastic.multiprocessing.api import SignalException

    raise SignalException(f"Process {os.getpid()} got signal: {signum}",
                          sigval=signal.Signals(signum))


def _finish(results: dict[int, dict[str, Any]]) -> Outcome:
    hashes = {r: res["weights_sha256"] for r, res in sorted(results.items())}
    if len({h for h in hashes.values() if h}) > 1:
        raise DistributedError(f"ranks ended with different weights: {hashes}")
    if 0 not in results:  # rank 0 runs on another node; it writes and reports the run
        return Outcome(None, note=f"ranks {sorted(results)} finished here; rank 0 (another "
                       f"node) writes the run; weights sha256:"
                       f"{next((h for h in hashes.values() if h), '(memoised)')}")
    record = RunRecord.from_json(results[0]["record"], "rank 0's record")
    return Outcome(record, reused=results[0]["reused"])


def _failed(failures: dict[int, Any], results: dict[int, dict[str, Any]], runs_dir: Path,
            key: str) -> Outcome:
    """Raise the first worker's own error (with its exit code), else a DistributedError."""
    errors = sorted((r, res) for r, res in results.items() if res["exit_code"])
    for r, res in errors:
        if res["exit_code"] != DistributedError.exit_code:
            same = [q for q, other in errors if q != r and other["error"] == res["error"]]
            also = f" (ranks {same} the same)" if same else ""
            raise WorkerError(f"rank {r}{also}: {res['error']}", int(res["exit_code"]))
    died = [f"rank {r} ({_how(f)})" for r, f in sorted(failures.items()) if r not in results]
    said = [f"rank {r}: {res['error']}" for r, res in errors]
    raise DistributedError(
        f"{', '.join(died) or 'a worker'} failed; {'; '.join(said) or 'the others were stopped'}."
        f" Checkpoints (if any) are in {runs_dir / f'.ckpt-{key}'}: rerun the same command, "
        f"at any world size dividing train.shards, to resume")


def _how(failure: Any) -> str:
    if failure.exitcode < 0:
        return f"killed by {failure.signal_name()}"
    return f"exit code {failure.exitcode}"


# --- the worker: `python -m pipeline.launch`, started by torchrun ---------------------

def _redirect_stdout(quiet: bool) -> None:
    """Point this worker's file descriptor 1 at its stderr, or (--quiet) at /dev/null.
    The launcher alone writes stdout (the run record with --json); libraries write
    there from C++ too: torch 2.9.1's gloo (nixpkgs 25.11's torch) prints "[Gloo] Rank 0
    is connected to 1 peer ranks" on every rank, which made `--nproc 2 --json` print no
    JSON, and --quiet promises the interrupt's one line alone."""
    sys.stdout.flush()
    if quiet:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.close(null)
    else:
        os.dup2(2, 1)


def _worker_main() -> int:
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ[_RESULTS_ENV])
    _die_with_launcher(int(os.environ.get(_LAUNCHER_ENV, "0")))
    # Stopped by the launcher (Ctrl-C, or a peer failed) before or after the
    # training loop: quietly, no traceback per rank; every file is written
    # atomically, so nothing is torn. SIGTERM and SIGUSR1 (preemption) exit 143,
    # a retry; while the loop runs they stop it after a step (train.preempt).
    signal.signal(signal.SIGINT, lambda signum, _frame: os._exit(128 + signum))
    for sig in _PREEMPT:
        signal.signal(sig, lambda _signum, _frame: os._exit(Preempted.exit_code))
    try:
        spec = Spec(**json.loads((out / "spec.json").read_text(encoding="utf-8")))
        _redirect_stdout(spec.quiet)
        result: dict[str, Any] = {"exit_code": 0, **_work(spec, rank)}
    except Exception as e:  # noqa: BLE001 - reported by the launcher, one line for all ranks
        code, line = exit_status(e)
        result = {"exit_code": code, "error": line.removeprefix("error: "),
                  "step": getattr(e, "step", None)}
    atomic.write_text(out / f"rank-{rank}.json", json.dumps(result, sort_keys=True))
    return int(result["exit_code"])


def _die_with_launcher(launcher: int) -> None:
    """Die with the launcher, and never write once it is gone: it holds the
    run lock. PR_SET_PDEATHSIG (Linux) has the kernel SIGKILL this worker
    when its parent dies; before each published write, atomic.check_owner
    checks that the parent is still the launcher (it covers the moment
    before prctl, and systems without it)."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if not launcher:
        return
    if os.getppid() != launcher:  # it died before prctl took effect
        os._exit(DistributedError.exit_code)
    atomic.set_owner_check(lambda: None if os.getppid() == launcher else
                           f"the launcher (pid {launcher}, holder of the run lock) is gone")


def _work(spec: Spec, rank: int) -> dict[str, Any]:
    """The recipe with a TorchComm; returns what the launcher reports."""
    cfg = load_config(spec.config, spec.overrides)
    modes.of(cfg.mode).require_prepared()
    prep = recipe.prepare(cfg, [], Path(spec.config).parent,  # pinned already: no re-exec
                          manifest_file=_manifest(spec), threads=worker_threads(spec.threads),
                          world_size=world_size(spec, cfg), device=spec.device)
    out = _train_rank(spec, prep, rank)
    return {"record": out.record.to_json() if out.record is not None else None,
            "weights_sha256": out.weights_sha256, "reused": out.reused}


def _train_rank(spec: Spec, prep: recipe.Prepared, rank: int) -> recipe.Outcome:
    """Join the process group and run the recipe as global rank ``rank``;
    with ``spec.worker_lock`` rank 0 holds the run lock (and the checks of
    runs/<key>, ``--force`` included, are the recipe's, on rank 0)."""
    import torch.distributed as dist

    runs_dir = Path(spec.runs_dir)
    # World size 1 (a launcher's single task): recipe.get_or_train takes the lock
    # itself, as one process does; taking it here too would wait on ourselves.
    take = spec.worker_lock and rank == 0 and spec.nproc * spec.nnodes > 1
    with runs.run_lock(runs_dir, prep.inputs.key) if take else contextlib.nullcontext():
        comm = _init_comm(spec.device)
        _agree(comm, prep.inputs.key, runs_dir)
        out = recipe.get_or_train(prep, runs_dir, comm=comm, device=str(comm.device),
                                  quiet=spec.quiet or rank != 0,
                                  force=spec.force and spec.worker_lock,
                                  threads=worker_threads(spec.threads),
                                  loader_workers=spec.loader_workers)
        dist.destroy_process_group()
    return out


def serve(worker: Worker, spec: Spec, argv: list[str], cfg: Config) -> Outcome:
    """This process as rank ``worker.rank`` of a job that another launcher
    started (torchrun, srun, a PyTorchJob: pipeline.cluster); rank 0's
    Outcome carries the record, another rank's a note."""
    w = worker.world_size
    check_world(w, cfg, f"{worker.launcher}: rank {worker.rank} of {w}",
                "the launcher's task count")
    # Before the pinned re-exec and before torch starts: the workers' threads
    # and torch.distributed's env:// variables (Slurm's are translated).
    os.environ.update(worker_environment(modes.of(cfg.mode).pins_threads()))
    os.environ.update(worker.torch_env())
    prep = recipe.prepare(cfg, argv, Path(spec.config).parent, manifest_file=_manifest(spec),
                          threads=worker_threads(spec.threads), world_size=w, device=spec.device)
    spec = dataclasses.replace(spec, nproc=w, worker_lock=True)
    out = _train_rank(spec, prep, worker.rank)
    if out.record is not None:
        return Outcome(out.record, reused=out.reused)
    return Outcome(None, note=f"rank {worker.rank} of {w} ({worker.launcher}) finished; rank 0 "
                   f"writes the run; weights sha256:{out.weights_sha256 or '(memoised)'}")



def _init_comm(device: str) -> Any:
    """The process group (gloo on CPU, nccl on CUDA) with a bounded timeout."""
    import torch
    import torch.distributed as dist

    from .train.distributed import TorchComm

    timeout = timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    if device.startswith("cuda"):
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dev, backend = torch.device("cuda", local), "nccl"
    else:
        dev, backend = torch.device(device), "gloo"
    try:
        dist.init_process_group(backend, timeout=timeout)
    except RuntimeError as e:
        raise DistributedError(f"joining the {backend} process group failed: {e}") from None
    return TorchComm(dev, plain=_testing.SWITCHES.plain_allreduce)


def _agree(comm: Any, key: str, runs_dir: Path) -> None:
    """Every rank has the same run key and sees the same newest checkpoint.
    Exchanged as an int64 tensor (the key's 32 bytes, the step), never as a
    pickled object: all_gather_object unpickles what every peer sends."""
    import torch
    import torch.distributed as dist

    from .train.checkpoint import latest_valid

    found = latest_valid(runs_dir / f".ckpt-{key}")  # recipe.get_or_train's checkpoint dir
    raw = bytes.fromhex(key)  # a run key is a sha256 in hex
    mine = torch.tensor([*raw, found[2]["step"] if found else 0], dtype=torch.int64,
                        device=comm.device)
    got = [torch.empty_like(mine) for _ in range(comm.size)]
    try:
        dist.all_gather(got, mine)
    except RuntimeError as e:
        raise comm.failed("comparing run keys", e) from None
    views = [(bytes(v[:len(raw)].tolist()).hex(), int(v[len(raw)])) for v in
             (t.cpu() for t in got)]
    if len({v[0] for v in views}) > 1:
        raise DistributedError(f"ranks disagree on the run key ({[v[0][:16] for v in views]}):"
                               f" code, data, toolchain or profile differ between nodes")
    if len({v[1] for v in views}) > 1:
        raise DistributedError(f"ranks would resume from different steps "
                               f"({[v[1] for v in views]}): every node needs the same "
                               f"--runs-dir (a shared file system)")


if __name__ == "__main__":
    sys.exit(_worker_main())
