"""`pipeline audit` and `pipeline exec` on the scripts in tests/audit_scripts/:
divergence found and located (step, parameter, cause), pinning's effect, the
capture's invisibility to the script, and bounded, clear reports for scripts
that cannot be audited. Audits here are small: --steps 5, a few machines."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.audit import report as audit_report
from pipeline.audit.child import REFERENCE, Outcome, Plan, boot_dir, capture_env
from pipeline.audit.machines import MACHINES
from pipeline.core.environment import host_isa_levels, load_profile

from ..support import ROOT, run_pipeline

SCRIPTS = ROOT / "tests" / "audit_scripts"
PROFILE = load_profile()
PINNABLE = PROFILE.requires_isa in host_isa_levels()


def _audit(script: str, machines: str, tmp: Path, *extra: str) -> tuple[int, dict[str, Any]]:
    p = run_pipeline(["audit", "--json", "--steps", "5", "--machines", machines, *extra, "--",
                      sys.executable, str(SCRIPTS / script)], cwd=tmp, timeout=600)
    assert p.returncode in (0, 1, 3), f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.returncode, json.loads(p.stdout)


def _row(rep: dict[str, Any], run: str, pinned: bool = False) -> dict[str, Any]:
    return next(r for r in rep["pinned" if pinned else "stock"] if r["run"] == run)


@pytest.mark.process
def test_plain_loop_isa_divergence_is_found_and_located(tmp_path: Path) -> None:
    """Stock plain loop: the ISA machine without AVX2 differs from this machine,
    and the report names the step, the parameter and the cause (ISA); the
    pinned profile cannot run there, so the verdict sends it to exact mode;
    exit 1. The terminal report says the same in words."""
    code, rep = _audit("plain_loop.py", "isa-default,isa-avx2,threads-2", tmp_path)
    assert code == 1, rep
    assert _row(rep, "run-2")["status"] == "same"
    row = _row(rep, "isa-default")
    assert row["status"] == "differs" and row["kind"] == "ISA", row
    assert isinstance(row["step"], int) and row["parameter"] in ("0.weight", "0.bias",
                                                                 "2.weight", "2.bias"), row
    assert "isa-default" in rep["verdict"]["not_reproducible"], rep["verdict"]
    assert _row(rep, "isa-default", pinned=True)["status"] == "skipped"
    words = audit_report.text(rep)
    assert f"differs at step {row['step']}" in words and row["parameter"] in words, words
    assert "not reproducible across: ISA (isa-default" in words, words


@pytest.mark.process
@pytest.mark.skipif(not PINNABLE, reason="this CPU cannot run the pinned profile")
def test_plain_loop_is_reproducible_pinned_on_capable_machines(tmp_path: Path) -> None:
    """Every machine whose stock run diverged and that can run the profile
    (ISA >= AVX2, other thread counts) agrees with the pinned reference, so
    the verdict says pinning makes the script reproducible there."""
    code, rep = _audit("plain_loop.py", "isa-avx2,isa-avx512,threads-1,threads-7", tmp_path)
    assert code in (0, 1), rep
    diverged = [r["run"] for r in rep["stock"] if r["status"] == "differs"]
    for run in diverged:
        assert _row(rep, run, pinned=True)["status"] == "same", rep["pinned"]
    assert rep["verdict"]["pinning_fixes"] == diverged
    assert rep["verdict"]["not_reproducible"] == []


@pytest.mark.process
def test_unseeded_script_differs_run_to_run_and_exec_seeds_it(tmp_path: Path) -> None:
    """A script that never seeds differs between two plain runs here (cause:
    run-to-run, at step 0: the initial weights), and under the pinned profile,
    which seeds unseeded generators, the two runs agree."""
    code, rep = _audit("unseeded_loop.py", "threads-2", tmp_path)
    assert code == 1
    row = _row(rep, "run-2")
    assert row["status"] == "differs" and row["step"] == 0 and row["kind"] == "run-to-run"
    if PINNABLE:
        assert _row(rep, "run-2", pinned=True)["status"] == "same", rep["pinned"]
        assert "run-2" in rep["verdict"]["pinning_fixes"]


@pytest.mark.process
def test_dataloader_workers_do_not_record_and_the_audit_completes(tmp_path: Path) -> None:
    """DataLoader with shuffle and two forked workers: the reference records
    exactly --steps steps from the main process only, the two plain runs agree
    (the script seeds its generator), and the ISA difference is located."""
    code, rep = _audit("dataloader_loop.py", "isa-default", tmp_path)
    ref = rep["stock"][0]
    assert ref["status"] == "reference" and ref["steps"] == 5, ref
    assert _row(rep, "run-2")["status"] == "same"
    row = _row(rep, "isa-default")
    assert row["status"] == "differs" and "step" in row, row
    assert code == 1


@pytest.mark.process
@pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                    reason="lightning is not installed (the bench extra: pip install "
                           "--require-hashes -r bench/requirements-bench.lock)")
def test_lightning_script_is_captured(tmp_path: Path) -> None:
    """A Lightning Trainer calls optimizer.step through a closure: the capture
    still sees each step, names parameters as the LightningModule does, and the
    ISA difference is located."""
    code, rep = _audit("lightning_loop.py", "isa-default", tmp_path, "--timeout", "300")
    ref = rep["stock"][0]
    assert ref["status"] == "reference" and ref["steps"] == 5, ref
    row = _row(rep, "isa-default")
    assert row["status"] == "differs" and row["parameter"].startswith("net."), row
    assert code == 1


@pytest.mark.process
@pytest.mark.parametrize("script, words", [
    ("no_optimizer.py", "never called torch.optim.Optimizer.step"),
    ("crashes.py", "exited with status 1"),
])
def test_script_that_cannot_be_audited_gets_a_clear_report(script: str, words: str,
                                                           tmp_path: Path) -> None:
    """A script that never steps an optimizer, or crashes, is run once (not once
    per machine) and reported with why and its stderr tail; exit 3."""
    p = run_pipeline(["audit", "--steps", "5", "--", sys.executable, str(SCRIPTS / script)],
                     cwd=tmp_path, timeout=600)
    assert p.returncode == 3, f"{p.stdout}\n{p.stderr}"
    assert words in p.stdout and "could not audit the script" in p.stdout, p.stdout
    if script == "crashes.py":
        assert "the data file went away" in p.stdout, p.stdout
    assert p.stdout.count("run-1") >= 1 and "isa-default" not in p.stdout, p.stdout


@pytest.mark.process
def test_hanging_script_is_killed_at_the_timeout(tmp_path: Path) -> None:
    """A script that never returns is killed at --timeout and reported; the
    audit ends in about that time (exit 3)."""
    started = time.monotonic()
    p = run_pipeline(["audit", "--timeout", "4", "--", sys.executable, str(SCRIPTS / "hangs.py")],
                     cwd=tmp_path, timeout=120)
    took = time.monotonic() - started
    assert p.returncode == 3, f"{p.stdout}\n{p.stderr}"
    assert "did not finish within --timeout 4 s (killed)" in p.stdout, p.stdout
    assert took < 40, took


@pytest.mark.process
@pytest.mark.parametrize("args", [["audit"], ["audit", "--machines", "no-such", "--", "true"],
                                  ["exec"], ["audit", "--steps", "0", "--", "true"]])
def test_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    """No command, an unknown machine or a non-positive --steps is a usage error."""
    p = run_pipeline(args, cwd=tmp_path, timeout=600)
    assert p.returncode == 2, f"{p.stdout}\n{p.stderr}"
    assert "error:" in p.stderr


@pytest.mark.process
@pytest.mark.skipif(not PINNABLE, reason="this CPU cannot run the pinned profile")
def test_exec_gives_one_hash_whatever_the_parents_threads(tmp_path: Path) -> None:
    """`pipeline exec` started with OMP_NUM_THREADS 2 and 7 in the parent records
    the same final weight hash, with the toolchain, the profile (and what torch
    observed: AVX2, 1 thread) and the script's exit status beside it."""
    hashes = []
    for n in ("2", "7"):
        rec = tmp_path / f"exec-{n}.json"
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        p = run_pipeline(["exec", "--record", str(rec), "--", sys.executable,
                          str(SCRIPTS / "plain_loop.py")], env, tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr
        assert "final loss" in p.stdout  # the script's own output, untouched
        r = json.loads(rec.read_text(encoding="utf-8"))
        assert r["exit_status"] == 0 and r["optimizer_steps"] == 20
        assert r["profile"]["name"] == PROFILE.name and r["toolchain"]["torch"]
        assert r["profile"]["observed"] == {"cpu_capability": "AVX2", "threads": 1}
        hashes.append(r["weights_sha256"])
    assert hashes[0] == hashes[1] and len(hashes[0]) == 64


@pytest.mark.process
@pytest.mark.skipif(not PINNABLE, reason="this CPU cannot run the pinned profile")
def test_exec_spawned_workers_record_nothing(tmp_path: Path) -> None:
    """DataLoader workers started with spawn load the capture too but do not
    record: the record (written at exit) counts the main process's 24 steps
    and the hash equals the forked-workers run's."""
    hashes = []
    for ctx in ("fork", "spawn"):
        rec = tmp_path / f"{ctx}.json"
        p = run_pipeline(["exec", "--record", str(rec), "--", sys.executable,
                          str(SCRIPTS / "dataloader_loop.py"), ctx], cwd=tmp_path, timeout=600)
        assert p.returncode == 0, p.stderr
        r = json.loads(rec.read_text(encoding="utf-8"))
        assert r["optimizer_steps"] == 24, r
        hashes.append(r["weights_sha256"])
    assert hashes[0] == hashes[1]


@pytest.mark.process
def test_capture_does_not_change_the_script_numerics(tmp_path: Path) -> None:
    """The plain loop's printed final loss (every digit) is the same with and
    without the capture loaded (the child started the way the audit starts
    it, minus the step limit), and the capture saw step 0 and 20 steps."""
    script = [sys.executable, str(SCRIPTS / "plain_loop.py")]
    env = capture_env(boot_dir(tmp_path / "boot"), tmp_path / "rec.json", os.environ,
                      trail=True)
    with_capture = subprocess.run(script, env=env, capture_output=True, text=True,
                                  check=True, timeout=300).stdout
    plain = subprocess.run(script, capture_output=True, text=True, check=True,
                           timeout=300).stdout
    assert with_capture == plain and "final loss" in plain
    rec = json.loads((tmp_path / "rec.json").read_text(encoding="utf-8"))
    assert rec["steps"] == 20 and len(rec["rows"]) == 21  # step 0 and 20 steps


def _outcome(label: str, rows: list[list[Any]], names: list[str]) -> Outcome:
    record = {"torch_imported": True, "steps": len(rows) - 1, "names": [names],
              "digest_bytes": 8, "rows": rows, "weights_sha256": str(len(rows))}
    return Outcome(Plan(label, REFERENCE), returncode=0, record=record)


def test_compare_names_the_first_step_and_parameter() -> None:
    """compare() finds the first differing row and, within it, the first
    parameter in name order (runs.first_divergence), steps as recorded."""
    names = ["a", "b", "c"]
    base = [[0, 0, "00" * 24], [1, 0, "11" * 24], [2, 0, "22" * 24]]
    other = [base[0], [1, 0, "11" * 8 + "ff" * 8 + "ff" * 8], base[2]]
    got = audit_report.compare(_outcome("r", base, names), _outcome("o", other, names))
    assert (got["status"], got["step"], got["parameter"]) == ("differs", 1, "b")
    assert audit_report.compare(_outcome("r", base, names),
                                _outcome("o", base, names))["status"] == "same"


def test_every_machine_has_a_kind_the_report_knows() -> None:
    """Each shared machine names its kind of difference and what it changes."""
    assert {m.kind for m in MACHINES} <= {"ISA", "threads", "environment", "several"}
    assert all(m.what for m in MACHINES)
