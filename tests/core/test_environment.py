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
from pipeline.core.environment import (
    blas_from_config,
    blas_of_torch,
    check_blas_core,
    cpu_identity,
    openblas_core,
)
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
    want = env.load_profile().requires_isa.upper()  # AVX2 on x86_64, DEFAULT on aarch64
    assert (observed["cpu_capability"], observed["threads"]) == (want, 1)
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

    import torch

    fp = env.toolchain_fingerprint()
    assert fp["torch"] == torch.__version__ and fp["lock"].startswith(("pip:sha256:", "nix"))
    text = json.dumps(fp)
    assert socket.gethostname() not in text and str(ROOT) not in text


# Build configurations as torch.__config__.show() prints them (abridged): PyPI's x86-64
# wheel (this lock's torch 2.13.0+cpu), an OpenBLAS build (nixpkgs' torch, PyPI's aarch64
# wheels: cmake/Modules/FindBLAS.cmake sets BLAS_INFO "open"), a reference libblas, none.
MKL_CONFIG = ("  - Build settings: BLAS_INFO=mkl, BUILD_TYPE=Release, LAPACK_INFO=mkl, "
              "USE_MKL=ON, USE_MKLDNN=ON,")
OPENBLAS_CONFIG = ("  - Build settings: BLAS_INFO=open, BUILD_TYPE=Release, LAPACK_INFO=open, "
                   "USE_MKL=OFF, USE_MKLDNN=ON,")


@pytest.mark.parametrize(("config", "blas"), [
    (MKL_CONFIG, "mkl"), (OPENBLAS_CONFIG, "open"),
    ("Build settings: BLAS_INFO=generic, LAPACK_INFO=generic,", "generic"),
    ("Build settings: BLAS_INFO=accelerate,", "accelerate"),
    ("Build settings: LAPACK_INFO=mkl, USE_MKL=ON,", "unknown"),  # LAPACK is not BLAS
    ("PyTorch built with:\n  - GCC 13.3\n", "unknown")])
def test_blas_is_read_from_the_build_configuration(config: str, blas: str) -> None:
    """``blas_from_config`` names the BLAS a torch build configuration says it uses
    (BLAS_INFO), and ``unknown`` where the text names none."""
    assert blas_from_config(config) == blas


def test_blas_of_this_torch_is_its_configuration() -> None:
    """This process's torch: the BLAS its own configuration names (the pip lock's
    x86-64 torch is an MKL build; an OpenBLAS torch reports ``open``)."""
    import torch

    assert blas_of_torch() == blas_from_config(torch.__config__.show()) != "unknown"


def test_every_profile_pins_the_openblas_core_type() -> None:
    """Every profile pins OPENBLAS_CORETYPE to a kernel set its ISA requirement can
    run: Haswell (AVX2 + FMA) on x86_64, generic ARMV8 on aarch64."""
    want = {"x86_64": ("Haswell", "avx2"), "aarch64": ("ARMV8", "default")}
    for arch, (core, isa) in want.items():
        p = env.load_profile(arch)
        assert (p.env.get("OPENBLAS_CORETYPE"), p.requires_isa) == (core, isa), p


_CORE_PROBE = ("import numpy; from pipeline.core.environment import openblas_core; "
               "print(openblas_core())")


@pytest.mark.process
@pytest.mark.skipif("avx2" not in env.host_isa_levels(), reason="needs an AVX2 CPU")
def test_openblas_core_reports_the_kernels_the_variable_picks(tmp_path: Path) -> None:
    """``openblas_core`` reads the kernel set a loaded OpenBLAS runs (here NumPy's own
    OpenBLAS, built with DYNAMIC_ARCH like nixpkgs'): OPENBLAS_CORETYPE=Haswell gives
    haswell, and the control Sandybridge gives sandybridge, so the variable really
    chooses the kernels and the record sees which."""
    got = {}
    for core in ("Haswell", "Sandybridge"):
        p = subprocess.run([sys.executable, "-c", _CORE_PROBE], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=120,
                           env=pipeline_env(tmp_path, OPENBLAS_CORETYPE=core))
        got[core] = p.stdout.strip()
    assert got == {"Haswell": "haswell", "Sandybridge": "sandybridge"}, got


def test_openblas_core_without_openblas_is_none() -> None:
    """No BLAS library in the process map: nothing to report."""
    assert openblas_core("7f00-7f01 r-xp 0 08:01 1 /usr/lib/libc.so.6\n") is None


def test_an_openblas_torch_on_other_kernels_is_refused() -> None:
    """A profile's OPENBLAS_CORETYPE that the loaded OpenBLAS did not take (a core type
    the build lacks falls back to detection) is a ProfileError (exit 4) naming the
    variable and profile.json; an MKL torch or the pinned kernels pass."""
    p = env.load_profile("x86_64")
    check_blas_core(p, "open", "haswell")
    check_blas_core(p, "mkl", None)
    with pytest.raises(ProfileError, match="OPENBLAS_CORETYPE=Haswell.*'skylakex'") as e:
        check_blas_core(p, "open", "skylakex")
    assert "profile.json" in str(e.value) and e.value.exit_code == 4
