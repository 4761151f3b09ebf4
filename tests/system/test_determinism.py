# Golden hashes (tests/golden/weights.json, format in pipeline/golden.py):
# regenerate this machine's entries with
#
#   python -m pipeline train configs/digits.toml --runs-dir runs
#   python -m pipeline golden add runs/<run_key> --note "<cpu, os>"
#   python -m pipeline train configs/digits.toml mode=exact train.epochs=2 --runs-dir runs
#   python -m pipeline golden add runs/<run_key> --note "exact mode"
#
# (`train` prints the run directory runs/<run_key>.) An existing entry that
# differs is only replaced with `golden add --force`: that means the arithmetic
# changed, so say why in the commit.
"""The determinism suite: the weights are a pure function of code, toolchain,
data, config and seed (the design note, "The determinism suite").

Every training is a fresh `python -m pipeline train` process, compared with a
reference run built once per session (tests/conftest.py) by weight hash,
per-step trail and run key: on identical machines at once, on simulated
different machines (tests/support/machines.py), against golden hashes from real
machines; and controls that must differ or fail. Run it with `pytest -n auto -m
determinism`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.environment import load_profile

from ..support import run_pipeline
from ..support.machines import (
    EXACT,
    FULL,
    MACHINES,
    ROOT,
    SHORT,
    Machine,
    Places,
    Run,
    finish,
    start,
    train_argv,
)

pytestmark = [pytest.mark.determinism, pytest.mark.process]

GOLDEN = ROOT / "tests" / "golden" / "weights.json"
NO_PIN = {"PIPELINE_TEST_NO_PIN": "1"}  # test-only: no re-exec, no profile (the control)
REFERENCE = Machine("reference")
PROFILE = load_profile()
RUNNABLE = [m for m in MACHINES if m.can_run(PROFILE.requires_isa)]
REFUSED = [m for m in MACHINES if not m.can_run(PROFILE.requires_isa)]
NUMERIC = [m for m in MACHINES if m.numeric]
# One replica per xdist worker (at least two); the load scheduler decides
# which worker runs which, so two may share a worker.
REPLICAS = list(range(max(2, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))))
FRESH_PROCESSES = 4


def _ids(machines: list[Machine]) -> list[str]:
    return [m.name for m in machines]


def _skip_unless_simulable(machine: Machine) -> None:
    why = machine.missing_tool()
    if why:
        pytest.skip(f"machine {machine.name} cannot be simulated here: {why}")


def _train_on(machine: Machine, overrides: list[str], places: Places, env: dict[str, str],
              scratch: Path, extra: dict[str, str] | None = None) -> Run:
    runs = scratch / "runs dir é"
    proc = start(machine, train_argv(overrides, runs), env, places, scratch, extra)
    return finish(proc, runs, f"training on machine {machine.name}")


def _same_run(run: Run, ref: Run, where: str) -> None:
    """Same weights, same trail, same run key, same code hash as ``ref``."""
    assert run.sha256 == ref.sha256, f"{where}: weights sha256:{run.sha256} != reference " \
                                     f"sha256:{ref.sha256}; `pipeline diff {run.dir} {ref.dir}`"
    assert run.trail == ref.trail, f"{where}: same weights but a different trail"
    assert run.record["code_sha256"] == ref.record["code_sha256"], f"{where}: code differs"
    if run.record["mode"] == "pinned":  # the kernels it ran, as recorded
        assert run.record["profile"] == ref.record["profile"], f"{where}: other profile"
    assert run.record["run_key"] == ref.record["run_key"], f"{where}: same inputs, other key"


def _first_divergence(a: Run, b: Run) -> tuple[int, str] | None:
    """(step, tensor) where the trails first differ, read from trail.bin itself."""
    names, width = a.record["trail"]["tensors"], a.record["trail"]["digest_bytes"]
    ta, tb = a.trail, b.trail
    for i in range(min(len(ta), len(tb)) // width):
        if ta[i * width:(i + 1) * width] != tb[i * width:(i + 1) * width]:
            return i // len(names) + 1, names[i % len(names)]
    return None


# --- identical machines -------------------------------------------------------


@pytest.mark.parametrize("replica", REPLICAS)
def test_each_worker_reproduces_the_reference(replica: int, reference_run: Run, places: Places,
                                              suite_env: dict[str, str], tmp_path: Path) -> None:
    """The committed config trained in an xdist worker, into its own runs
    directory, gives the reference's weight hash and trail byte for byte."""
    run = _train_on(REFERENCE, FULL, places, suite_env, tmp_path)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "master")
    _same_run(run, reference_run, f"replica {replica} in worker {worker}")


def test_fresh_processes_started_together_reproduce_the_reference(
        reference_run: Run, places: Places, suite_env: dict[str, str], tmp_path: Path) -> None:
    """Four fresh processes started at once, each with its own runs directory,
    all give the reference's weight hash and trail."""
    dirs = [tmp_path / f"p{i}" for i in range(FRESH_PROCESSES)]
    procs = [start(REFERENCE, train_argv(FULL, d / "runs"), suite_env, places, d)
             for d in dirs]
    runs = [finish(p, d / "runs", f"process {i}") for i, (p, d) in enumerate(zip(procs, dirs))]
    for i, run in enumerate(runs):
        _same_run(run, reference_run, f"process {i} of {FRESH_PROCESSES}")


# --- different machines, pinned mode ---------------------------------------------


@pytest.mark.parametrize("machine", RUNNABLE, ids=_ids(RUNNABLE))
def test_pinned_run_is_the_same_on_every_capable_machine(
        machine: Machine, short_reference: Run, places: Places, suite_env: dict[str, str],
        tmp_path: Path) -> None:
    """A machine that can run the pinned profile gives the reference's weight
    hash, trail, recorded profile and run key."""
    _skip_unless_simulable(machine)
    run = _train_on(machine, SHORT, places, suite_env, tmp_path)
    _same_run(run, short_reference, f"machine {machine.name}")
    assert run.record["profile"]["name"] == PROFILE.name


@pytest.mark.parametrize("machine", REFUSED, ids=_ids(REFUSED))
def test_pinned_run_is_refused_where_the_profile_cannot_run(
        machine: Machine, places: Places, suite_env: dict[str, str], tmp_path: Path) -> None:
    """A CPU below the profile's ISA is refused with exit 4 and a message naming
    the missing capability, before anything is trained or written."""
    runs = tmp_path / "runs"
    proc = start(machine, train_argv(SHORT, runs), suite_env, places, tmp_path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, f"exit {proc.returncode}\n{out}\n{err}"
    assert PROFILE.requires_isa.upper() in err and PROFILE.name in err, err
    assert not runs.exists(), f"a refused run wrote {sorted(runs.rglob('*'))}"


# --- different machines, exact mode and the stock control -----------------------


@pytest.mark.parametrize("machine", MACHINES, ids=_ids(MACHINES))
def test_exact_run_is_the_same_on_every_machine(
        machine: Machine, exact_reference: Run, places: Places, suite_env: dict[str, str],
        tmp_path: Path) -> None:
    """Exact mode gives the reference's weight hash, trail and run key on every
    machine, any ISA or thread count included, with pinning disabled."""
    _skip_unless_simulable(machine)
    run = _train_on(machine, EXACT, places, suite_env, tmp_path, NO_PIN)
    assert run.record["mode"] == "exact"
    _same_run(run, exact_reference, f"exact mode on machine {machine.name}")


def test_unpinned_runs_differ_across_machines(places: Places, suite_env: dict[str, str],
                                              tmp_path: Path) -> None:
    """The control: with pinning disabled (PIPELINE_TEST_NO_PIN=1), stock pinned
    mode gives at least two different hashes over the ISA and thread machines,
    so the pinned and exact tests above compare runs that could differ."""
    hashes = {}
    for machine in NUMERIC:
        _skip_unless_simulable(machine)
        run = _train_on(machine, SHORT, places, suite_env, tmp_path / machine.name, NO_PIN)
        assert run.record["profile"]["name"] == "unpinned", run.record["profile"]
        hashes[machine.name] = run.sha256
    table = "\n".join(f"  {name}: {sha[:16]}" for name, sha in hashes.items())
    assert len(set(hashes.values())) >= 2, f"unpinned runs all agree; is the switch a no-op?\n" \
                                           f"{table}"


# --- controls that must differ or fail ------------------------------------------


def test_another_seed_gives_another_hash(short_reference: Run, seed_run: Run) -> None:
    """seed=1 instead of 0 gives other weights and a trail that differs from step 1."""
    assert seed_run.sha256 != short_reference.sha256
    where = _first_divergence(short_reference, seed_run)
    assert where is not None and where[0] == 1, where


def test_flipped_data_byte_stops_the_run_before_training(suite_env: dict[str, str],
                                                         tmp_path: Path) -> None:
    """One flipped byte in a data file (a copied tree via PIPELINE_ROOT) stops
    the run with exit 3 and a message naming the file, the expected and the
    actual sha256; no run directory is created."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for part in ["data-manifest.json", "requirements.lock", "configs"]:
        (shutil.copytree if (ROOT / part).is_dir() else shutil.copy2)(ROOT / part, tree / part)
    shutil.copytree(ROOT / "data", tree / "data")
    manifest = json.loads((tree / "data-manifest.json").read_text(encoding="utf-8"))
    entry = manifest["files"]["digits"]
    blob = bytearray((tree / entry["path"]).read_bytes())
    blob[len(blob) // 2] ^= 0x01
    (tree / entry["path"]).write_bytes(bytes(blob))
    runs = tmp_path / "runs"
    p = run_pipeline(train_argv(SHORT, runs), {**suite_env, "PIPELINE_ROOT": str(tree)},
                     cwd=tree)  # the project is the one commands stand in
    assert p.returncode == 3, f"exit {p.returncode}\n{p.stderr}"
    assert entry["path"] in p.stderr, p.stderr
    assert entry["sha256"] in p.stderr, p.stderr
    assert hashlib.sha256(blob).hexdigest() in p.stderr, p.stderr
    assert not runs.exists(), f"a refused run wrote {sorted(runs.rglob('*'))}"


def test_checkout_copy_is_the_code_that_runs(places: Places, suite_env: dict[str, str]) -> None:
    """`python -m pipeline` started in the copied checkout imports that copy's
    package (so machine checkout-path really runs code from an odd path)."""
    p = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"],
                       cwd=places.checkout, env=suite_env, capture_output=True, text=True,
                       timeout=60, check=True)
    assert Path(p.stdout.strip()).parent == places.checkout / "pipeline"


# --- golden hashes from real machines --------------------------------------------


@pytest.mark.parametrize("fixture", ["reference_run", "exact_reference"])
def test_golden_hash_matches_this_machine(fixture: str, request: pytest.FixtureRequest,
                                          suite_env: dict[str, str]) -> None:
    """The reference run's hash equals tests/golden/weights.json's entry for its
    key; a machine with no entry is reported as a skip naming the key."""
    run: Run = request.getfixturevalue(fixture)
    p = run_pipeline(["golden", "check", str(run.dir), "--file", str(GOLDEN)], suite_env)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    if p.stdout.startswith("no golden entry"):
        pytest.skip(f"{fixture}: {p.stdout.strip()}; add it with `python -m pipeline golden "
                    f"add RUN_DIR` (see the top of this file)")
    assert p.stdout.startswith("golden match"), p.stdout


def test_golden_add_refuses_to_overwrite_a_differing_entry(
        short_reference: Run, suite_env: dict[str, str], tmp_path: Path) -> None:
    """`golden add` adds an entry, leaves an equal one alone, refuses (exit 1,
    file untouched) to replace a differing one without --force, and replaces
    it with --force."""
    golden = tmp_path / "weights.json"
    if GOLDEN.exists():
        shutil.copy2(GOLDEN, golden)
    add = ["golden", "add", str(short_reference.dir), "--file", str(golden)]
    first = run_pipeline(add, suite_env)
    assert first.returncode == 0 and first.stdout.startswith(("added", "unchanged")), first
    data = json.loads(golden.read_text(encoding="utf-8"))
    entry = next(e for e in data["entries"] if e["weights_sha256"] == short_reference.sha256)
    entry["weights_sha256"] = "0" * 64
    golden.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    before = golden.read_bytes()
    refused = run_pipeline(add, suite_env)
    assert refused.returncode == 1 and "--force" in refused.stderr, refused
    assert golden.read_bytes() == before
    forced = run_pipeline([*add, "--force"], suite_env)
    assert forced.returncode == 0 and forced.stdout.startswith("replaced"), forced
    hashes = [e["weights_sha256"] for e in json.loads(golden.read_text())["entries"]]
    assert short_reference.sha256 in hashes and "0" * 64 not in hashes


# --- trail and diff ----------------------------------------------------------------


def _diff_says(a: Run, b: Run, env: dict[str, str], *differences: str) -> None:
    """`pipeline diff A B` exits 1, names each difference, and names the step
    and tensor where the trails first diverge (read independently here)."""
    p = run_pipeline(["diff", str(a.dir), str(b.dir)], env)
    assert p.returncode == 1, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    for line in differences:
        assert line in p.stdout.splitlines(), p.stdout
    where = _first_divergence(a, b)
    assert where is not None, "weights differ but the trails agree"
    trail = a.record["trail"]
    steps = len(a.trail) // (len(trail["tensors"]) * trail["digest_bytes"])
    expected = f"trails diverge at step {where[0]} (of {steps}), first tensor {where[1]}"
    assert expected in p.stdout.splitlines(), p.stdout
    assert re.search(r"^weights: differ", p.stdout, re.M), p.stdout


def test_diff_names_the_seed_and_where_trails_diverge(short_reference: Run, seed_run: Run,
                                                      suite_env: dict[str, str]) -> None:
    """Runs differing by seed: diff names config.seed and the first diverging step."""
    _diff_says(short_reference, seed_run, suite_env, "config.seed: 0 != 1")


def test_diff_names_the_thread_count_and_where_trails_diverge(
        places: Places, suite_env: dict[str, str], tmp_path: Path) -> None:
    """Unpinned runs on 1 and 2 threads (OMP_NUM_THREADS). Whether they differ is the
    toolchain's: MKL's sgemm (the pip route's torch) rounds a weight gradient differently on
    2 threads, OpenBLAS's sgemm (nixpkgs' torch) gives the same bits at 1, 2 and 4 threads
    for this MLP. Either way diff names the observed thread count; where the weights differ
    it exits 1 and names the first diverging step and tensor (read independently from the
    trails), where they agree it exits 0 and reports the trails identical for every step."""
    one, two = (next(m for m in MACHINES if m.name == n) for n in ["threads-1", "threads-2"])
    procs = [(start(m, train_argv(SHORT, tmp_path / m.name), suite_env, places, tmp_path,
                    NO_PIN), m) for m in (one, two)]
    a, b = (finish(p, tmp_path / m.name, m.name) for p, m in procs)
    threads = "profile.observed.threads: 1 != 2"
    if a.sha256 != b.sha256:  # this BLAS depends on the thread count (MKL)
        _diff_says(a, b, suite_env, threads)
        return
    # Thread-invariant here (OpenBLAS): same weights must mean same trail at every step.
    assert _first_divergence(a, b) is None and a.trail == b.trail, \
        "same weights, but the trails differ"
    p = run_pipeline(["diff", str(a.dir), str(b.dir)], suite_env)
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout}{p.stderr}"
    trail = a.record["trail"]
    steps = len(a.trail) // (len(trail["tensors"]) * trail["digest_bytes"])
    lines = p.stdout.splitlines()
    assert threads in lines, p.stdout
    assert f"trails identical for all {steps} steps" in lines, p.stdout
    assert re.search(r"^weights: identical", p.stdout, re.M), p.stdout
