"""Tests for pipeline/cluster.py: the launcher a process was started by is read
whole from its environment (torchrun, srun, env:// as a PyTorchJob sets it),
and a partial or conflicting environment is refused (exit 2), never guessed.
The end-to-end runs under each launcher are in tests/train/test_multinode.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cluster import SLURM_PORT_BASE, Worker, detect, first_host
from pipeline.core.errors import UsageError

from .support import cli_main

TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1",
            "MASTER_ADDR": "n0", "MASTER_PORT": "29500"}
SLURM = {"SLURM_STEP_ID": "0", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
         "SLURM_JOB_NODELIST": "node[01-04,07]", "SLURM_JOB_ID": "123456"}
PYTORCHJOB = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "job-master-0",
              "MASTER_PORT": "23456"}


def test_no_launcher_variables_is_no_launcher() -> None:
    """A user's shell (MASTER_ADDR or LOCAL_RANK alone start nothing): None."""
    assert detect({}) is None
    assert detect({"MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "0"}) is None
    # The batch script and an salloc shell: SLURM_* without a step.
    assert detect({k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}) is None


def test_each_launcher_is_read_whole() -> None:
    """torchrun, srun and a PyTorchJob each give their rank, world, local rank
    and rank 0's address; srun's address is its node list's first host and its
    port 15000 + the job id's last four digits unless MASTER_* say otherwise."""
    assert detect(TORCHRUN) == Worker("torchrun", 3, 4, 1, "n0", 29500)
    assert detect(SLURM) == Worker("slurm", 5, 8, 1, "node01", SLURM_PORT_BASE + 3456)
    assert detect({**SLURM, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}) == \
        Worker("slurm", 5, 8, 1, "10.0.0.1", 29400)
    assert detect(PYTORCHJOB) == Worker("env", 1, 2, 0, "job-master-0", 23456)
    assert detect(TORCHRUN).torch_env() == {  # type: ignore[union-attr]
        "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "n0",
        "MASTER_PORT": "29500"}


def test_torchrun_under_srun_is_torchrun() -> None:
    """torchrun started by srun: torchrun is the direct parent, so its
    variables are this worker's and the inherited SLURM_* are not a conflict."""
    assert detect({**SLURM, **TORCHRUN}) == Worker("torchrun", 3, 4, 1, "n0", 29500)


def test_slurm_and_env_that_agree_are_one_job() -> None:
    """RANK/WORLD_SIZE equal to SLURM_PROCID/SLURM_NTASKS (a script that
    exports both): accepted, MASTER_* taken as given."""
    env = {**SLURM, "RANK": "5", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "7"}
    assert detect(env) == Worker("slurm", 5, 8, 1, "a", 7)


@pytest.mark.parametrize(("environ", "names"), [
    ({**TORCHRUN, "LOCAL_RANK": ""}, ["LOCAL_RANK"]),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, ["MASTER_PORT"]),
    ({"RANK": "0"}, ["WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]),
    ({"WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, ["RANK"]),
    ({k: v for k, v in SLURM.items() if k != "SLURM_NTASKS"}, ["SLURM_NTASKS"]),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_NODELIST"}, ["SLURM_JOB_NODELIST"]),
    ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"}, ["MASTER_PORT", "SLURM_JOB_ID"]),
    ({**SLURM, "RANK": "4", "WORLD_SIZE": "8", "MASTER_ADDR": "a", "MASTER_PORT": "7"},
     ["SLURM_PROCID=5", "RANK=4"]),
    ({**SLURM, "LOCAL_RANK": "0"}, ["SLURM_LOCALID=1", "LOCAL_RANK=0"]),
    ({**PYTORCHJOB, "RANK": "2"}, ["RANK=2", "WORLD_SIZE=2"]),
    ({**PYTORCHJOB, "RANK": "one"}, ["RANK", "'one'"]),
    ({**PYTORCHJOB, "MASTER_PORT": "70000"}, ["MASTER_PORT", "70000"]),
    ({**SLURM, "SLURM_JOB_NODELIST": "node[01"}, ["SLURM_JOB_NODELIST", "node[01"]),
])
def test_partial_or_conflicting_environments_are_refused(environ: dict[str, str],
                                                         names: list[str]) -> None:
    """A launcher's variables without the rest, values out of range, or two
    launchers that disagree: a UsageError naming the variables."""
    with pytest.raises(UsageError) as e:
        detect(environ)
    assert all(n in str(e.value) for n in names), str(e.value)


@pytest.mark.parametrize(("nodelist", "first"), [
    ("node[01-04,07]", "node01"), ("gpu3,gpu4", "gpu3"), ("n7", "n7"), ("a[009]", "a009"),
    ("node[1-2]-ib,x[3]", "node1-ib"), ("rack1-[10,12-13]", "rack1-10"),
    ("127.0.0.[1-2]", "127.0.0.1"),
])
def test_first_host_of_a_slurm_node_list(nodelist: str, first: str) -> None:
    """The compressed forms Slurm writes expand to the first host, padding kept."""
    assert first_host(nodelist) == first


@pytest.mark.parametrize("nodelist", ["", "node[01", "[1-2]", "node[a-b]", "x]y"])
def test_a_malformed_node_list_is_refused(nodelist: str) -> None:
    """Not a node list: refused, never a host made up from it."""
    with pytest.raises(UsageError, match="SLURM_JOB_NODELIST"):
        first_host(nodelist)


@pytest.mark.parametrize(("env", "args", "says"), [
    ({"RANK": "0", "WORLD_SIZE": "2"}, [], "MASTER_ADDR, MASTER_PORT"),
    (PYTORCHJOB, ["--nproc", "2"], "--nproc: this process was started by env"),
    (PYTORCHJOB, ["--rdzv-endpoint", "h:1"], "--rdzv-endpoint"),
    ({**PYTORCHJOB, "WORLD_SIZE": "3", "RANK": "0"}, [], "world size 3"),
    (PYTORCHJOB, ["--rebuild"], "--rebuild"),
])
def test_train_refuses_a_launcher_it_cannot_serve(
        env: dict[str, str], args: list[str], says: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`pipeline train` under a partial launcher environment, with options that
    set the world too, a world size the shards do not allow, or --rebuild:
    exit 2 naming it, before anything is prepared or written."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_RUN_ID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    runs = tmp_path / "runs"
    code = cli_main(["train", "configs/digits.toml", "--runs-dir", str(runs), *args],
                    monkeypatch, tmp_path)
    err = capsys.readouterr().err
    assert code == 2 and says in err, err
    assert not runs.exists()


@pytest.mark.parametrize("job_id, nodelist", [("\u00b2", "node[01-04]"), ("123", "n[\u0661-3]")])
def test_non_ascii_digits_are_refused_not_a_crash(job_id: str, nodelist: str) -> None:
    """Hostile review round 2: `'²'.isdigit()` is True and int('²') raises, so
    such a SLURM_JOB_ID was exit 70; any non-ASCII digit is a usage error."""
    env = {**SLURM, "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": nodelist}
    with pytest.raises(UsageError):
        detect(env)


_AGREE = r'''
import sys, torch.distributed as dist
from pathlib import Path
from pipeline.launch import _agree
from pipeline.train.distributed import TorchComm
from pipeline.core.errors import DistributedError
import torch
rank, key = int(sys.argv[1]), sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{sys.argv[3]}", rank=rank, world_size=2)
try:
    _agree(TorchComm(torch.device("cpu")), key, Path(sys.argv[4]))
    print("agreed")
except DistributedError as e:
    print("refused:", e)
'''


@pytest.mark.process
@pytest.mark.parametrize("same", [True, False])
def test_ranks_compare_run_keys_as_tensors_and_refuse_a_disagreement(tmp_path: Path,
                                                                     same: bool) -> None:
    """_agree exchanges the key and step as an int64 tensor (all_gather_object
    unpickled every peer's bytes); two ranks with other keys are refused."""
    import subprocess
    import sys

    keys = ["ab" * 32, "ab" * 32 if same else "cd" * 32]
    procs = [subprocess.Popen([sys.executable, "-c", _AGREE, str(r), keys[r],
                               str(tmp_path / "store"), str(tmp_path)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    if same:
        assert outs == ["agreed\n", "agreed\n"]
    else:
        assert all(o.startswith("refused: ranks disagree on the run key (['abababababababab', "
                                "'cdcdcdcdcdcdcdcd'])") for o in outs), outs
