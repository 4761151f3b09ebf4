"""The numeric profile, the host check, the re-exec launcher and the fingerprints."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core import _testing
from pipeline.core import environment as env
from pipeline.core.environment import blas_of_torch, cpu_identity
from pipeline.core.errors import ProfileError

from ..support import ROOT, pipeline_env, run_pipeline

# Every knob the docs name as changing which kernel runs (docs/reference/profile.md;
# pipeline/profile.json holds them).
REQUIRED_X86 = ["ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "PYTHONHASHSEED",
                "CUBLAS_WORKSPACE_CONFIG", "OMP_NUM_THREADS", "MKL_NUM_THREADS"]


def test_profile_file_pins_every_named_knob() -> None:
    """The x86_64 profile sets each required variable and asks only for AVX2."""
    p = env.load_profile("x86_64")
    assert all(k in p.env for k in REQUIRED_X86)
    assert p.requires_isa == "avx2" and p.env["ATEN_CPU_CAPABILITY"] == "avx2"
    assert p.threads == 1 and p.env["OMP_NUM_THREADS"] == "1"
    assert env.load_profile("aarch64").name.startswith("aarch64")


def test_unknown_architecture_is_refused() -> None:
    """A CPU architecture without a profile gets a ProfileError naming it."""
    with pytest.raises(ProfileError, match="riscv64"):
        env.load_profile("riscv64")


@pytest.mark.parametrize("level,ok", [("default", False), ("avx2", True), ("avx512", True)])
def test_simulated_isa_levels_decide_refusal(monkeypatch: pytest.MonkeyPatch,
                                             level: str, ok: bool) -> None:
    """A CPU below AVX2 is refused with the missing capability named."""
    monkeypatch.setattr(_testing, "SWITCHES", _testing.Switches(sim_isa=level))
    profile = env.load_profile("x86_64")
    if ok:
        env.check_host(profile)
    else:
        with pytest.raises(ProfileError, match="needs a CPU with AVX2"):
            env.check_host(profile)


def test_needs_reexec_compares_every_variable() -> None:
    """One differing or missing variable is enough to re-exec."""
    p = env.load_profile("x86_64")
    assert not env.needs_reexec(p, dict(p.env))
    assert env.needs_reexec(p, {**p.env, "OMP_NUM_THREADS": "2"})
    assert env.needs_reexec(p, {k: v for k, v in p.env.items() if k != "MKL_CBWR"})


@pytest.mark.process
def test_reexec_sets_the_profile_before_torch_starts(tmp_path: Path) -> None:
    """`pipeline env` in a process with stray values reports the process as
    unpinned, while training re-executes: its run records the pinned profile
    and the observed kernels are AVX2 with one thread."""
    e = pipeline_env(tmp_path, OMP_NUM_THREADS="7", ATEN_CPU_CAPABILITY="default")
    out = run_pipeline(["env"], e, timeout=None, check=True).stdout
    assert json.loads(out)["pinned_now"] is False
    code = ("import os, sys; sys.argv=['pipeline','train','--runs-dir',sys.argv[1],"
            "'train.epochs=1','--json','--quiet'];"
            "from pipeline.cli import main; sys.exit(main())")
    p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "runs")], cwd=ROOT, env=e,
                       capture_output=True, text=True, check=False)
    assert p.returncode == 0, p.stderr
    rec = json.loads(p.stdout)
    observed = rec["profile"]["observed"]
    assert (observed["cpu_capability"], observed["threads"]) == ("AVX2", 1)
    assert observed["cpu"]["vendor"] == cpu_identity()["vendor"]
    assert observed["blas"] == blas_of_torch()


@pytest.mark.process
def test_code_hash_covers_every_source_file(tmp_path: Path) -> None:
    """Editing any file of the package changes the code hash."""
    copy = tmp_path / "pipeline"
    shutil.copytree(ROOT / "pipeline", copy, ignore=shutil.ignore_patterns("__pycache__"))
    code = "import pipeline.core.environment as e; print(e.code_sha256())"
    run = lambda: subprocess.run([sys.executable, "-c", code], cwd=tmp_path,  # noqa: E731
                                 capture_output=True, text=True, check=True).stdout
    before = run()
    assert before.strip() == env.code_sha256()
    with open(copy / "rng.py", "a", encoding="utf-8") as f:
        f.write("\n# a comment is a change\n")
    assert run() != before


def test_toolchain_fingerprint_names_versions_not_the_machine() -> None:
    """The fingerprint holds versions and builds, and no hostname or path."""
    import socket

    fp = env.toolchain_fingerprint()
    assert fp["torch"].startswith("2.13.0") and fp["lock"].startswith(("pip:sha256:", "nix"))
    text = json.dumps(fp)
    assert socket.gethostname() not in text and str(ROOT) not in text
