"""``pipeline train --nproc N``: N worker processes through torch's own launcher.

The launcher (this process, started by the CLI) checks the world size, pins
the numeric profile (pinned mode re-executes it, cli._pin) so that the
workers inherit the pinned environment before their interpreters start
(pytorch issue 15359), verifies the data, takes the run's file lock (node 0),
and runs torchrun in-process (``torch.distributed.run``) on
``-m pipeline.launch``: each worker runs the normal train path
(runs.trained_run) with a TorchComm. Only rank 0 writes runs/<key>. Workers
report through rank-<r>.json files in a private temporary directory, and the
launcher prints rank 0's result, or the first worker's error and its exit
code; a worker that died is a DistributedError (exit 6).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from .config import Config
from .errors import DistributedError, PipelineError, ProfileError, UsageError

__all__ = ["launch", "world_size", "TIMEOUT_ENV", "DEFAULT_TIMEOUT_S"]

TIMEOUT_ENV = "PIPELINE_DIST_TIMEOUT_S"  # process-group timeout: a silent peer is an error
DEFAULT_TIMEOUT_S = 60.0
_RESULTS_ENV = "PIPELINE_LAUNCH_DIR"     # where workers leave rank-<r>.json (launcher-set)
_RDZV_ID = "pipeline"


def world_size(args: argparse.Namespace, cfg: Config) -> int:
    """nnodes * nproc, or UsageError unless it is a power of two dividing
    train.shards: then each rank's shards are an aligned subtree of the fixed
    reduction tree (docs/exact-spec.md sections 5 and 8)."""
    if args.nproc < 1 or args.nnodes < 1 or not 0 <= args.node_rank < args.nnodes:
        raise UsageError(f"expected --nproc >= 1, --nnodes >= 1 and 0 <= --node-rank < "
                         f"--nnodes, found --nproc {args.nproc} --nnodes {args.nnodes} "
                         f"--node-rank {args.node_rank}")
    w, shards = args.nproc * args.nnodes, cfg.train.shards
    if w & (w - 1) or shards % w:
        fits = [n for n in range(1, shards + 1) if shards % n == 0 and not n & (n - 1)]
        raise UsageError(f"world size {w} (--nproc {args.nproc} x --nnodes {args.nnodes}): "
                         f"expected a power of two dividing train.shards={shards}, i.e. one "
                         f"of {fits}; change --nproc, or raise train.shards (which changes "
                         f"the run)")
    return w


def launch(args: argparse.Namespace, argv: list[str], cfg: Config) -> int:
    """Run ``pipeline train`` on nnodes * nproc workers; print rank 0's result."""
    from . import cli, runs
    from .environment import pinning_disabled

    world_size(args, cfg)
    if args.rebuild:
        raise UsageError("--rebuild trains in one process: drop --nproc/--nnodes (the bits "
                         "are the same at every world size)")
    if args.nnodes > 1 and not (args.rdzv_endpoint or args.master_addr):
        raise UsageError("--nnodes > 1 needs --master-addr and --master-port, or "
                         "--rdzv-endpoint HOST:PORT")
    if cfg.mode != "pinned" or pinning_disabled():
        # No profile pins the threads here: one per worker, so that W workers
        # do not oversubscribe the cores (the pinned profile already says 1).
        os.environ["OMP_NUM_THREADS"] = "1"
    inputs, _ = cli._prepare(cfg, argv)  # pinned mode: re-exec with the profile first
    runs_dir = args.runs_dir.resolve()
    key = inputs.key
    # Node 0 holds the run lock for the whole launch, so the workers need none.
    lock = runs.run_lock(runs_dir, key) if args.node_rank == 0 else contextlib.nullcontext()
    with lock, tempfile.TemporaryDirectory(prefix="pipeline-launch-") as tmp:
        if args.nnodes == 1 and runs.is_complete(runs_dir / key):
            cli._report(runs.read_run(runs_dir / key), args.json, True, args.runs_dir)
            return 0
        failures = _torchrun(args, runs_dir, Path(tmp))
        results = {int(p.stem[5:]): json.loads(p.read_text(encoding="utf-8"))
                   for p in Path(tmp).glob("rank-*.json")}
    if failures or any(r["exit_code"] for r in results.values()):
        return _failed(failures, results, runs_dir, key)
    return _finish(args, results)


def _torchrun(args: argparse.Namespace, runs_dir: Path, results: Path) -> dict[int, Any]:
    """torchrun in this process; {global rank: ProcessFailure} of failed workers."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from .environment import child_pythonpath

    targs = ["--nproc-per-node", str(args.nproc), "--nnodes", str(args.nnodes),
             "--node-rank", str(args.node_rank), "--max-restarts", "0",
             "--monitor-interval", "0.1"]
    if args.rdzv_endpoint:
        targs += ["--rdzv-backend", "c10d", "--rdzv-endpoint", args.rdzv_endpoint,
                  "--rdzv-id", _RDZV_ID]
    elif args.master_addr or args.master_port is not None:
        targs += ["--master-addr", args.master_addr or "127.0.0.1",
                  "--master-port", str(29500 if args.master_port is None else args.master_port)]
    else:
        targs += ["--standalone"]  # c10d rendezvous on a free localhost port
    wargs = [*args.args, "--runs-dir", str(runs_dir), "--device", args.device]
    targs += ["-m", "pipeline.launch", *wargs, *(["--quiet"] if args.quiet else [])]
    os.environ[_RESULTS_ENV] = str(results)
    # Workers are `sys.executable -m pipeline.launch`: under a wrapper that puts the
    # dependencies on sys.path only (nixpkgs' wrap-python) they need this process's path.
    if child_pythonpath():
        os.environ["PYTHONPATH"] = child_pythonpath()
    try:
        run(get_args_parser().parse_args(targs))
    except ChildFailedError as e:
        return dict(e.failures)
    except SignalException as e:
        raise DistributedError(f"launcher stopped by {e.sigval.name}; the workers were "
                               f"stopped too. Rerun the same command to resume") from None
    return {}


def _finish(args: argparse.Namespace, results: dict[int, dict[str, Any]]) -> int:
    from . import cli

    hashes = {r: res["record"].get("weights_sha256") for r, res in sorted(results.items())}
    if len({h for h in hashes.values() if h}) > 1:
        raise DistributedError(f"ranks ended with different weights: {hashes}")
    if 0 not in results:  # rank 0 runs on another node; it writes and reports the run
        print(f"ranks {sorted(results)} finished here; rank 0 (another node) writes the run; "
              f"weights sha256:{next((h for h in hashes.values() if h), '(memoised)')}")
        return 0
    cli._report(results[0]["record"], args.json, results[0]["reused"], args.runs_dir)
    return 0


def _failed(failures: dict[int, Any], results: dict[int, dict[str, Any]], runs_dir: Path,
            key: str) -> int:
    """The first worker's own error (its exit code), else a DistributedError."""
    errors = sorted((r, res) for r, res in results.items() if res["exit_code"])
    for r, res in errors:
        if res["exit_code"] != DistributedError.exit_code:
            print(f"error: rank {r}: {res['error']}", file=sys.stderr)
            return int(res["exit_code"])
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


# --- the worker: `python -m pipeline.launch TRAIN-ARGS`, started by torchrun ----------

def _worker_main(argv: list[str]) -> int:
    rank = int(os.environ.get("RANK", "0"))
    out = Path(os.environ[_RESULTS_ENV])
    try:
        result: dict[str, Any] = {"exit_code": 0, **_work(argv, rank)}
    except PipelineError as e:
        print(f"error: rank {rank}: {e}", file=sys.stderr)
        result = {"exit_code": e.exit_code, "error": str(e)}
    from . import atomic
    atomic.write_text(out / f"rank-{rank}.json", json.dumps(result, sort_keys=True))
    return int(result["exit_code"])


def _work(argv: list[str], rank: int) -> dict[str, Any]:
    """The normal train path with a TorchComm; returns what the launcher reports."""
    import torch.distributed as dist

    from . import cli, runs
    from .config import load_config

    args = cli._parser().parse_args(["train", *argv])
    cfg = load_config(*cli._split_args(args.args))
    _require_inherited_pin(cfg)
    inputs, ds = cli._prepare(cfg, ["train", *argv])  # pinned already: no re-exec
    comm = _init_comm(args.device)
    _agree(comm, inputs.key, args.runs_dir)
    extra: dict[str, Any] = {"device": args.device, "world_size": comm.size}
    if comm.plain:
        extra["reduction"] = "plain all_reduce (test-only control)"
    record, reused = runs.trained_run(inputs, ds, args.runs_dir, comm=comm,
                                      device=str(comm.device), quiet=args.quiet or rank != 0,
                                      extra=extra)
    dist.destroy_process_group()
    return {"record": record, "reused": reused}


def _require_inherited_pin(cfg: Config) -> None:
    from . import environment as env

    if cfg.mode == "pinned" and not env.pinning_disabled():
        profile = env.load_profile()
        if env.needs_reexec(profile):
            raise ProfileError(f"worker started without numeric profile {profile.name}'s "
                               f"environment; start workers with `pipeline train --nproc N`, "
                               f"which pins before torchrun starts them")


def _init_comm(device: str) -> Any:
    """The process group (gloo on CPU, nccl on CUDA) with a bounded timeout."""
    import torch
    import torch.distributed as dist

    from .distributed import TorchComm

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
    return TorchComm(dev)


def _agree(comm: Any, key: str, runs_dir: Path) -> None:
    """Every rank has the same run key and sees the same newest checkpoint."""
    import torch.distributed as dist

    from .checkpoint import latest_valid

    found = latest_valid(runs_dir / f".ckpt-{key}")  # runs.trained_run's checkpoint dir
    mine = (key, found[2]["step"] if found else 0)
    views: list[Any] = [None] * comm.size
    try:
        dist.all_gather_object(views, mine)
    except RuntimeError as e:
        raise comm.failed("comparing run keys", e) from None
    if len({v[0] for v in views}) > 1:
        raise DistributedError(f"ranks disagree on the run key ({[v[0][:16] for v in views]}):"
                               f" code, data, toolchain or profile differ between nodes")
    if len({v[1] for v in views}) > 1:
        raise DistributedError(f"ranks would resume from different steps "
                               f"({[v[1] for v in views]}): every node needs the same "
                               f"--runs-dir (a shared file system)")


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
