"""Exact mode refuses a process that flushes subnormals (pipeline.exact.fpenv):
flush-to-zero or denormals-are-zero would change its bits silently."""

from __future__ import annotations

import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.exact import fpenv

from ..support import ROOT, pipeline_env


def test_the_check_constants_are_the_values_they_name() -> None:
    """x * y is the subnormal s, exactly, and 1 is 1 (read with struct in this
    process, which computes as IEEE says)."""
    for dtype, _view, x, y, s, one in fpenv._CASES:
        f, i = ("f", "i") if dtype == torch.float32 else ("d", "q")
        val = [struct.unpack(f, struct.pack(i, b))[0] for b in (x, y, s, one)]
        assert val[0] * val[1] == val[2] and 0 < val[2] and val[3] == 1.0
        assert val[2] < (2.0**-126 if f == "f" else 2.0**-1022) <= min(val[0], val[1])


def test_an_ieee_process_passes_at_any_thread_count() -> None:
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert fpenv.subnormal_problem() is None
    finally:
        torch.set_num_threads(before)


def _python(code: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=pipeline_env(tmp),
                          capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.process
def test_flushing_subnormals_stops_an_exact_run_before_it_trains(tmp_path: Path) -> None:
    """torch.set_flush_denormal(True) before `pipeline train mode=exact`:
    exit 4 with one line saying why, and no run directory. The same process
    without it trains (control: the check is what stops it)."""
    runs = tmp_path / "runs"
    train = ("from pipeline.cli import main; import sys; sys.exit(main(['train', "
             f"'configs/digits-exact.toml', 'train.epochs=1', '--runs-dir', {str(runs)!r}, "
             "'--quiet']))")
    p = _python("import torch; torch.set_flush_denormal(True); " + train, tmp_path)
    assert p.returncode == 4, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "error: exact mode needs IEEE-754 subnormals: this process flushes subnormal "
        "torch.float32 results to zero (flush-to-zero: torch.set_flush_denormal(True), or a "
        "library built with -ffast-math); remove that setting or library"]
    assert not runs.exists() or not [q for q in runs.iterdir() if not q.name.startswith(".")]
    p = _python("import torch; torch.set_flush_denormal(False); " + train, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


@pytest.mark.process
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64") or shutil.which("cc") is None,
                    reason="sets the x86 MXCSR with a C helper (needs cc)")
def test_denormals_are_zero_alone_is_detected(tmp_path: Path) -> None:
    """Only the DAZ bit set (as some -ffast-math start-up code does), no
    flush-to-zero: the operand check reports it."""
    src, lib = tmp_path / "daz.c", tmp_path / "daz.so"
    src.write_text("void set_daz(void) { unsigned m = __builtin_ia32_stmxcsr(); "
                   "__builtin_ia32_ldmxcsr(m | 0x40); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True,
                   timeout=120)
    p = _python(f"import ctypes, torch; ctypes.CDLL({str(lib)!r}).set_daz(); "
                "from pipeline.exact.fpenv import subnormal_problem; print(subnormal_problem())",
                tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("this process reads subnormal torch.float32 operands as zero"), \
        p.stdout
