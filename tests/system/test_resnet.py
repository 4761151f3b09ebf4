"""The ResNet example (examples/resnet: stock BasicBlocks with BatchNorm, a
max-pooling stem, a strided 1x1 projection shortcut, adaptive average
pooling) in exact mode: one hash over ATen's ISA levels (default, AVX2,
AVX-512), --threads 1/2/3, the native kernels on and off, and --nproc 1, 2
and 4 (BatchNorm's statistics per shard, the running statistics combined in
the fixed tree); the control: another seed gives other weights. Pinned mode
trains it too, and at world size 2 gives its world size 1 weights; the full
runs of both modes end within 2% of each other's training loss."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ..support import build_once, run_pipeline
from ..support.machines import TRAIN_TIMEOUT_S

pytestmark = [pytest.mark.process]

CONFIG = "examples/resnet/config.toml"
SHORT = ["mode=exact", "train.max_steps=4"]
ONE = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _train(args: list[str], env: dict[str, str], extra_env: dict[str, str] | None = None
           ) -> dict[str, Any]:
    p = run_pipeline(["train", *args, "--json", "--quiet"], {**env, **(extra_env or {})},
                     timeout=TRAIN_TIMEOUT_S)
    assert p.returncode == 0, f"{args}: exit {p.returncode}\n{p.stderr[-3000:]}"
    return dict(json.loads(p.stdout))


@pytest.fixture(scope="session")
def resnet_exact(shared_dir: Path, suite_env: dict[str, str]) -> dict[str, Any]:
    """The short exact ResNet run at 1 thread, trained once per session."""
    return build_once(shared_dir, "resnet-exact", lambda: _train(
        [CONFIG, *SHORT, "--threads", "1", "--runs-dir", str(shared_dir / "resnet-exact")],
        suite_env, ONE))


def _has_avx512() -> bool:
    try:
        return "avx512f" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


VARIANTS = [("default", 3, "0"), ("avx2", 2, "1"), ("avx512", 1, "0")]


@pytest.mark.determinism
@pytest.mark.parametrize("isa,threads,native", VARIANTS,
                         ids=[f"{i}-threads{t}-native{n}" for i, t, n in VARIANTS])
def test_resnet_exact_is_the_same_over_isa_threads_and_kernels(
        resnet_exact: dict[str, Any], suite_env: dict[str, str], tmp_path: Path, isa: str,
        threads: int, native: str) -> None:
    """`mode=exact` trains the ResNet with the reference's hash and metrics
    (bit for bit) under ATen's ISA level ``isa`` (the record shows it took
    effect), ``threads`` intra-op threads and the native kernels on or off."""
    if isa == "avx512" and not _has_avx512():
        pytest.skip("this CPU has no AVX-512")
    rec = resnet_exact
    assert rec["config"]["mode"] == "exact" and rec["metrics"]["steps"] == 4
    other = _train([CONFIG, *SHORT, "--threads", str(threads), "--runs-dir",
                    str(tmp_path / "runs")], suite_env,
                   {"ATEN_CPU_CAPABILITY": isa, "PIPELINE_EXACT_NATIVE": native})
    assert other["profile"]["observed"]["cpu_capability"] == isa.upper()
    assert other["threads"]["op_threads"] == threads
    assert (native == "0") == other["threads"]["exact_kernels"].startswith("off")
    assert other["weights_sha256"] == rec["weights_sha256"]
    assert other["metrics"] == rec["metrics"] and other["run_key"] == rec["run_key"]


@pytest.mark.determinism
@pytest.mark.distributed
@pytest.mark.parametrize("nproc", [2, 4])
def test_resnet_exact_world_sizes_agree(resnet_exact: dict[str, Any], suite_env: dict[str, str],
                                        tmp_path: Path, nproc: int) -> None:
    """--nproc 2 and 4 give world size 1's exact weights, running statistics
    included (every shard normalises by its own 16 rows; the shards' running
    statistics meet in the same tree whichever rank holds them)."""
    rec = _train([CONFIG, *SHORT, "--runs-dir", str(tmp_path / "runs"), "--nproc", str(nproc)],
                 suite_env)
    assert rec["world_size"] == nproc and rec["weights_sha256"] == resnet_exact["weights_sha256"]


def test_resnet_exact_control_another_seed_differs(resnet_exact: dict[str, Any],
                                                   suite_env: dict[str, str],
                                                   tmp_path: Path) -> None:
    """The control: seed 1 gives other weights (the hash above can fail)."""
    rec = _train([CONFIG, *SHORT, "seed=1", "--threads", "1", "--runs-dir",
                  str(tmp_path / "runs")], suite_env, ONE)
    assert rec["weights_sha256"] != resnet_exact["weights_sha256"]


@pytest.mark.distributed
def test_resnet_pinned_world_size_2_agrees(suite_env: dict[str, str], tmp_path: Path) -> None:
    """Pinned mode: the stock ResNet's BatchNorm "ghost batches" give --nproc 2
    world size 1's weights."""
    short = ["train.max_steps=4"]
    one = _train([CONFIG, *short, "--runs-dir", str(tmp_path / "a")], suite_env)
    two = _train([CONFIG, *short, "--runs-dir", str(tmp_path / "b"), "--nproc", "2"], suite_env)
    assert one["weights_sha256"] == two["weights_sha256"] and two["world_size"] == 2


@pytest.mark.slow
def test_resnet_full_runs_of_both_modes_end_within_2_percent(suite_env: dict[str, str],
                                                             tmp_path: Path) -> None:
    """The example's whole run (4 epochs, 88 steps) in pinned and in exact
    mode: both learn (test accuracy above 0.9) and the exact run's last
    epoch training loss is within 2% of pinned mode's."""
    env = {**suite_env, **ONE}
    pinned = _train([CONFIG, "--threads", "1", "--runs-dir", str(tmp_path / "p")], env)
    exact = _train([CONFIG, "mode=exact", "--threads", "1", "--runs-dir", str(tmp_path / "e")],
                   env)
    lp, le = pinned["metrics"]["train_loss"], exact["metrics"]["train_loss"]
    assert pinned["metrics"]["test_accuracy"] > 0.9 and exact["metrics"]["test_accuracy"] > 0.9
    assert abs(le - lp) <= 0.02 * lp, (lp, le)
