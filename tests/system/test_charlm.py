"""The example user project (examples/charlm: a factory in its own model.py,
a text dataset) under the determinism suite: a short pinned run is the same
on identical and simulated machines and at world sizes 1, 2 and 4; the
controls: without per-shard generator state world sizes differ, and a
changed line in the user's model changes the run key."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.core.environment import load_profile

from ..support import build_once, run_pipeline
from ..support.machines import MACHINES, ROOT, TRAIN_TIMEOUT_S, Machine, Places, Run, finish, start

pytestmark = [pytest.mark.determinism, pytest.mark.process]

CONFIG = "examples/charlm/config.toml"
# Short: 6 steps of 32 windows of 64 characters, checkpoints at 3 (and resumable).
SHORT_LM = ["train.max_steps=6", "train.checkpoint_every=3",
            "train.checkpoint_seconds=0"]
PROFILE = load_profile()
# A subset of the suite's machines (each run loads the 5 MB text and a transformer):
# the digits MLP runs on every one of them alone (test_determinism.py); here the
# ISA level, which changes the transformer's kernels most, and "everything" (every
# other difference at once).
CHOSEN = ("isa-avx512", "everything")
LM_MACHINES = [Machine("identical"), *(m for m in MACHINES
                                        if m.name in CHOSEN and m.can_run(PROFILE.requires_isa))]


def _train(args: list[str], env: dict[str, str], cwd: Path = ROOT,
           extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    p = run_pipeline(["train", *args, "--json", "--quiet"], {**env, **(extra_env or {})}, cwd,
                     timeout=TRAIN_TIMEOUT_S)
    assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stderr[-3000:]}"
    return dict(json.loads(p.stdout))


@pytest.fixture(scope="session")
def lm_reference(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """The short charlm run, trained once per session."""
    def build() -> dict[str, Any]:
        runs = shared_dir / "charlm-ref"
        return {"record": _train([CONFIG, *SHORT_LM, "--runs-dir", str(runs)], suite_env),
                "runs": str(runs)}

    got = build_once(shared_dir, "charlm-reference", build)
    return Run(Path(got["runs"]) / got["record"]["run_key"], got["record"])


def test_reference_learns_and_records_its_model(lm_reference: Run) -> None:
    """The run reports a validation loss below a uniform guess (ln 84 = 4.43)
    and records the factory and the hash of examples/charlm/model.py."""
    rec = lm_reference.record
    assert rec["data"]["dataset"] == "shakespeare" and rec["metrics"]["steps"] == 6
    assert rec["metrics"]["test_loss"] < 4.43
    assert rec["model"]["factory"] == "model:gpt"


@pytest.mark.parametrize("machine", LM_MACHINES, ids=[m.name for m in LM_MACHINES])
def test_charlm_is_the_same_on_simulated_machines(machine: Machine, lm_reference: Run,
                                                  places: Places, suite_env: dict[str, str],
                                                  tmp_path: Path) -> None:
    """Pinned mode: the user's transformer gives the reference's weights, trail
    and run key in a fresh process on this machine ("identical") and on every
    simulated machine the profile can run on."""
    why = machine.missing_tool()
    if why:
        pytest.skip(f"machine {machine.name} cannot be simulated here: {why}")
    runs = tmp_path / "runs dir é"
    argv = ["train", CONFIG, *SHORT_LM, "--runs-dir", str(runs), "--json", "--quiet"]
    run = finish(start(machine, argv, suite_env, places, tmp_path), runs, machine.name)
    assert run.sha256 == lm_reference.sha256, f"machine {machine.name}"
    assert run.trail == lm_reference.trail
    assert run.record["run_key"] == lm_reference.record["run_key"]


@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_charlm_world_sizes_agree(nproc: int, lm_reference: Run, suite_env: dict[str, str],
                                  tmp_path: Path) -> None:
    """--nproc 2 and 4 give world size 1's weights: the module's dropout draws
    come from a stream per (seed, step, shard), whichever rank runs the shard."""
    rec = _train([CONFIG, *SHORT_LM, "--runs-dir", str(tmp_path / "runs"), "--nproc",
                  str(nproc)], suite_env)
    assert rec["weights_sha256"] == lm_reference.sha256 and rec["world_size"] == nproc


@pytest.mark.distributed
def test_control_without_shard_streams_world_sizes_differ(suite_env: dict[str, str],
                                                          tmp_path: Path) -> None:
    """The control: with per-shard generator state disabled, the module draws
    dropout from each process's own generator, and world sizes 1 and 2 differ."""
    off = {"PIPELINE_TEST_NO_SHARD_STREAMS": "1"}
    one = _train([CONFIG, *SHORT_LM, "--runs-dir", str(tmp_path / "a")], suite_env,
                 extra_env=off)
    two = _train([CONFIG, *SHORT_LM, "--runs-dir", str(tmp_path / "b"), "--nproc", "2"],
                 suite_env, extra_env=off)
    assert one["weights_sha256"] != two["weights_sha256"]


def test_changed_line_in_the_users_model_changes_the_key(lm_reference: Run,
                                                         suite_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """A copy of the example with one comment line added to model.py trains
    under a new run key (the factory's source is keyed); an unchanged copy's
    model.py hashes as the original's."""
    keys = []
    for edit in (False, True):
        project = tmp_path / f"charlm-{edit}"
        shutil.copytree(ROOT / "examples" / "charlm", project)
        if edit:
            with open(project / "model.py", "a", encoding="utf-8") as f:
                f.write("# one more line\n")
        rec = _train([str(project / "config.toml"), *SHORT_LM, "train.max_steps=1",
                      "data.test_fraction=0.002", "--runs-dir", str(tmp_path / f"runs-{edit}")], suite_env)
        keys.append((rec["run_key"], rec["model"]["factory_sha256"]))
    unchanged, changed = keys
    assert unchanged[0] != changed[0] and unchanged[1] != changed[1]
    assert unchanged[1] == lm_reference.record["model"]["factory_sha256"]


def test_rebuild_of_the_example_is_identical(suite_env: dict[str, str], tmp_path: Path) -> None:
    """`--rebuild` retrains the example in a temporary directory and finds the
    same bits (exit 0, "rebuild identical")."""
    p = run_pipeline(["train", CONFIG, *SHORT_LM, "train.max_steps=3",
                      "data.test_fraction=0.002", "--runs-dir",
                      str(tmp_path / "runs"), "--rebuild", "--quiet"], suite_env,
                     timeout=TRAIN_TIMEOUT_S)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rebuild identical" in p.stdout


# Exact mode: the same example converted to exact layers (pipeline.exact.from_torch).
# 8 steps, a small test split so that evaluation stays short. (ATen's default ISA,
# several times slower, is covered by tests/exact/test_convert.py's transformer.)
EXACT_LM = ["mode=exact", "train.max_steps=8", "train.checkpoint_every=4",
            "data.test_fraction=0.002"]


@pytest.fixture(scope="session")
def lm_exact(shared_dir: Path, suite_env: dict[str, str]) -> Run:
    """The short exact charlm run at 1 thread, trained once per session."""
    def build() -> dict[str, Any]:
        runs = shared_dir / "charlm-exact"
        return {"record": _train([CONFIG, *EXACT_LM, "--threads", "1", "--runs-dir", str(runs)],
                                 suite_env,
                                 extra_env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}),
                "runs": str(runs)}

    got = build_once(shared_dir, "charlm-exact", build)
    return Run(Path(got["runs"]) / got["record"]["run_key"], got["record"])


def test_charlm_exact_is_the_same_at_1_and_2_threads(lm_exact: Run, suite_env: dict[str, str],
                                                     tmp_path: Path) -> None:
    """`mode=exact` trains the user's transformer (its loss falls below a
    uniform guess) with one hash at `--threads 1` and `--threads 2` (torch's
    own intra-op threads, where stock kernels would change the bits), with
    the same metrics (the test loss is exact too) bit for bit, and one run key."""
    rec = lm_exact.record
    assert rec["config"]["mode"] == "exact" and rec["metrics"]["steps"] == 8
    assert rec["metrics"]["test_loss"] < 4.43
    assert rec["threads"]["op_threads"] == 1
    two = _train([CONFIG, *EXACT_LM, "--threads", "2", "--runs-dir", str(tmp_path / "runs")],
                 suite_env)
    assert two["threads"]["op_threads"] == 2
    assert two["weights_sha256"] == lm_exact.sha256 and two["run_key"] == rec["run_key"]
    assert two["metrics"] == rec["metrics"]


def test_charlm_exact_is_the_same_without_simd_and_on_mkl_sse(lm_exact: Run,
                                                               suite_env: dict[str, str],
                                                               tmp_path: Path) -> None:
    """Another machine's arithmetic paths: ATen's kernels without SIMD
    (`ATEN_CPU_CAPABILITY=default`), MKL on SSE4.2 in its compatible mode,
    3 intra-op threads, and exact mode's torch implementations instead of its
    native kernels (PIPELINE_EXACT_NATIVE=0; the reference run uses them
    where a C compiler is present): the exact run's hash and metrics are the
    same. The records show each setting took effect."""
    other = _train([CONFIG, *EXACT_LM, "--threads", "3", "--runs-dir", str(tmp_path / "runs")],
                   suite_env, extra_env={"ATEN_CPU_CAPABILITY": "default",
                                         "MKL_ENABLE_INSTRUCTIONS": "SSE4_2",
                                         "MKL_CBWR": "COMPATIBLE", "PIPELINE_EXACT_NATIVE": "0"})
    assert other["profile"]["observed"]["cpu_capability"] == "DEFAULT"
    assert other["threads"]["exact_kernels"] == "off: PIPELINE_EXACT_NATIVE=0"
    if shutil.which("cc"):
        assert lm_exact.record["threads"]["exact_kernels"].startswith("on")
    assert other["threads"]["op_threads"] == 3
    assert other["weights_sha256"] == lm_exact.sha256
    assert other["metrics"] == lm_exact.record["metrics"]


@pytest.mark.distributed
def test_charlm_exact_equals_its_golden_hash(lm_exact: Run, suite_env: dict[str, str]) -> None:
    """Exact mode's bits do not depend on the toolchain or profile, so its golden
    entry (tests/golden/weights.json, recorded with `pipeline golden add`;
    bench/gpu_check.sh checks the same run on CUDA) must be found and match
    on every machine: no entry is a failure here, not a skip."""
    p = run_pipeline(["golden", "check", "--require", str(lm_exact.dir)], suite_env,
                     timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("golden match"), p.stdout + p.stderr


@pytest.mark.parametrize("nproc", [2, 4])
def test_charlm_exact_world_sizes_2_and_4_agree(lm_exact: Run, suite_env: dict[str, str],
                                                tmp_path: Path, nproc: int) -> None:
    """--nproc 2 and 4 give world size 1's exact weights: each shard's dropout
    masks come from (seed, step, site, global row), whichever rank runs it,
    and the ranks' shard gradients meet in the same fixed tree."""
    rec = _train([CONFIG, *EXACT_LM, "--runs-dir", str(tmp_path / "runs"), "--nproc",
                  str(nproc)], suite_env)
    assert rec["weights_sha256"] == lm_exact.sha256 and rec["world_size"] == nproc


def test_charlm_exact_resumes_bit_exactly(lm_exact: Run, suite_env: dict[str, str],
                                          tmp_path: Path) -> None:
    """Killed after step 5 (a checkpoint at step 4), the exact run resumes
    from step 4 and ends with the uninterrupted run's weights: the layers'
    parameters, Adam's state and the step-keyed masks all come back."""
    runs = tmp_path / "runs"
    argv = ["train", CONFIG, *EXACT_LM, "train.checkpoint_seconds=0", "--runs-dir", str(runs),
            "--json", "--quiet"]
    env = {**suite_env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    killed = run_pipeline(argv, {**env, "PIPELINE_TEST_KILL_AT_STEP": "5"},
                          timeout=TRAIN_TIMEOUT_S)
    assert killed.returncode == -9, killed.stderr[-3000:]
    done = run_pipeline(argv, env, timeout=TRAIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    rec = json.loads(done.stdout)
    assert rec["resumed_from_step"] == 4 and rec["weights_sha256"] == lm_exact.sha256
