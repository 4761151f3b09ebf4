"""Which launcher started this process, read from its environment: torchrun,
Slurm's ``srun``, or any launcher that sets torch's ``env://`` variables (a
Kubernetes PyTorchJob, TorchX). ``pipeline train`` started by one of them is a
worker of its job (pipeline.launch.serve), not a launcher of its own.

Each launcher is recognised by the variables it alone sets, and read whole:

- torchrun: ``TORCHELASTIC_RUN_ID``, with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR`` and ``MASTER_PORT``. torchrun is the direct parent, so its
  variables are this process's even under ``srun`` (whose ``SLURM_*`` then
  describe the torchrun agent, not this worker).
- srun: ``SLURM_STEP_ID`` (srun sets it for a job step; the batch script and an
  ``salloc`` shell have none), with ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID`` and ``SLURM_JOB_NODELIST``. Rank 0's address is
  ``MASTER_ADDR`` if set, else the first host of the node list; its port
  ``MASTER_PORT`` if set, else 15000 + the last four digits of ``SLURM_JOB_ID``
  (the same on every task, as PyTorch Lightning derives it).
- env:// (PyTorchJob): ``RANK`` and ``WORLD_SIZE``, with ``MASTER_ADDR`` and
  ``MASTER_PORT``; ``LOCAL_RANK`` if set, else 0 (one worker per pod).

A partial environment (a variable of a set without the others), or Slurm's
and env://'s variables that disagree on the rank or world size, is a
UsageError naming the variables: the job is never guessed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from .core.errors import UsageError

__all__ = ["Worker", "detect", "first_host", "SLURM_PORT_BASE"]

SLURM_PORT_BASE = 15000
_TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_SLURM = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_NODELIST")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Worker:
    """This process's place in a job that a launcher started."""

    launcher: str        # "torchrun", "slurm" or "env" (PyTorchJob and the like)
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    def torch_env(self) -> dict[str, str]:
        """The variables torch.distributed's env:// initialisation reads."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
                "LOCAL_RANK": str(self.local_rank), "MASTER_ADDR": self.master_addr,
                "MASTER_PORT": str(self.master_port)}


def detect(environ: Mapping[str, str]) -> Worker | None:
    """The launcher ``environ`` describes, or None where it names none."""
    if "TORCHELASTIC_RUN_ID" in environ:
        _require(environ, _TORCHRUN, "torchrun (TORCHELASTIC_RUN_ID is set)")
        return _worker("torchrun", environ, "RANK", "WORLD_SIZE", "LOCAL_RANK")
    slurm = _slurm(environ)
    env = _env(environ)
    if slurm and env and (slurm.rank, slurm.world_size) != (env.rank, env.world_size):
        raise UsageError(f"conflicting launcher environments: SLURM_PROCID="
                         f"{slurm.rank} SLURM_NTASKS={slurm.world_size} but RANK={env.rank} "
                         f"WORLD_SIZE={env.world_size}; unset one set (under torchrun, "
                         f"TORCHELASTIC_RUN_ID says whose they are)")
    return slurm or env


def _slurm(environ: Mapping[str, str]) -> Worker | None:
    if "SLURM_STEP_ID" not in environ:
        return None  # not a task of an srun step (a batch script, an salloc shell)
    _require(environ, _SLURM, "srun (SLURM_STEP_ID is set)")
    addr = environ.get("MASTER_ADDR") or first_host(environ["SLURM_JOB_NODELIST"])
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT")
    elif re.fullmatch(r"[0-9]+", environ.get("SLURM_JOB_ID", "")):  # ASCII digits only
        port = SLURM_PORT_BASE + int(environ["SLURM_JOB_ID"][-4:])
    else:
        raise UsageError(f"srun: expected MASTER_PORT, or a numeric SLURM_JOB_ID to derive "
                         f"rank 0's port from, found neither (SLURM_JOB_ID="
                         f"{environ.get('SLURM_JOB_ID')!r})")
    w = _worker("slurm", {**environ, "MASTER_ADDR": addr, "MASTER_PORT": str(port)},
                "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")
    if "LOCAL_RANK" in environ and _int(environ, "LOCAL_RANK") != w.local_rank:
        raise UsageError(f"conflicting launcher environments: SLURM_LOCALID={w.local_rank} "
                         f"but LOCAL_RANK={environ['LOCAL_RANK']}")
    return w


def _env(environ: Mapping[str, str]) -> Worker | None:
    if "RANK" not in environ and "WORLD_SIZE" not in environ:
        return None  # MASTER_ADDR or LOCAL_RANK alone start nothing
    _require(environ, _ENV, "an env:// launcher (RANK or WORLD_SIZE is set)")
    return _worker("env", {"LOCAL_RANK": "0", **environ}, "RANK", "WORLD_SIZE", "LOCAL_RANK")


def _require(environ: Mapping[str, str], names: tuple[str, ...], who: str) -> None:
    missing = [n for n in names if not environ.get(n)]
    if missing:
        raise UsageError(f"{who}: expected {', '.join(names)}; missing or empty: "
                         f"{', '.join(missing)}. Start `pipeline train` from the launcher "
                         f"with its whole environment, or unset the stray variables")


def _int(environ: Mapping[str, str], name: str) -> int:
    value = environ[name]
    if not re.fullmatch(r"[0-9]+", value.strip()):
        raise UsageError(f"{name}: expected a non-negative integer, found {value!r}")
    return int(value)


def _worker(launcher: str, environ: Mapping[str, str], rank: str, size: str,
            local: str) -> Worker:
    w = Worker(launcher, _int(environ, rank), _int(environ, size), _int(environ, local),
               environ["MASTER_ADDR"].strip(), _int(environ, "MASTER_PORT"))
    if not (w.world_size >= 1 and 0 <= w.rank < w.world_size):
        raise UsageError(f"{launcher}: expected 0 <= {rank} < {size}, found {rank}={w.rank} "
                         f"{size}={w.world_size}")
    if not 0 < w.master_port < 65536:
        raise UsageError(f"MASTER_PORT: expected a port 1..65535, found {w.master_port}")
    return w


def first_host(nodelist: str) -> str:
    """The first host of a Slurm node list: ``node[01-04,07],gpu3`` -> ``node01``.
    (What ``scontrol show hostnames`` prints first, without needing Slurm here.)"""
    text = nodelist.strip()
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,\[]*))?", text)
    if (not text or m is None or not m.group(1) or "]" in m.group(1)
            or text[m.end():][:1] not in ("", ",")):
        raise UsageError(f"SLURM_JOB_NODELIST: expected a node list such as "
                         f"'node[01-04,07]', found {nodelist!r}")
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0].strip()
    if not re.fullmatch(r"[0-9]+", first):
        raise UsageError(f"SLURM_JOB_NODELIST: expected numbers inside [...], found "
                         f"{nodelist!r}")
    return prefix + first + suffix  # zero padding kept: node[01-04] -> node01
