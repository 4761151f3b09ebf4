"""The learning-rate schedule (pipeline/schedule.py, docs/exact-spec.md 9.1):
its values against the float64 formula, the spec's own check values, and the
same bits in processes that differ in thread count."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys

import mpmath
import pytest

from pipeline.core.config import load_config
from pipeline.core.schedule import Schedule, cospi, schedule_of

from ..support import ROOT


def test_cospi_within_three_ulps_of_the_true_cosine() -> None:
    """cospi(y) is within 3 f64 ulps of cos(pi y) (computed to 100 digits) on
    a grid and near both branch ends; exact at 0 and 1/2."""
    mpmath.mp.dps = 100
    ys = [i / 4096 for i in range(2048)] + [0.25, math.nextafter(0.25, 1), 0.5 - 2**-40]
    worst = 0.0
    for y in ys:
        ref = mpmath.cos(mpmath.pi * mpmath.mpf(y))
        worst = max(worst, float(abs(cospi(y) - ref)) / math.ulp(float(ref)))
    assert worst <= 3, worst
    assert cospi(0.0) == 1.0 and cospi(0.5) == 0.0
    with pytest.raises(ValueError, match="0 <= y <= 0.5"):
        cospi(0.6)


def test_schedule_matches_the_float64_formula() -> None:
    """Warm-up then cosine: lr * (t+1)/W, then lr * (1 + cos(pi x)) / 2 by
    math.cos, within 1e-15 relative (abs 1e-18); the first cosine step is lr
    exactly; constant stays lr after its warm-up."""
    lr, W, T = 0.003, 7, 300
    s = Schedule(lr, "cosine", W, T)
    for t in range(T):
        if t < W:
            want = lr * (t + 1) / W
        else:
            want = lr * 0.5 * (1.0 + math.cos(math.pi * (t - W) / (T - W)))
        assert math.isclose(s(t), want, rel_tol=1e-15, abs_tol=1e-18), t
    assert s(W) == lr and s(T - 1) < lr * 1e-3
    c = Schedule(lr, "constant", W, T)
    assert [c(t) for t in (W - 1, W, T - 1, 10 * T)] == [lr, lr, lr, lr]
    assert Schedule(lr)(12345) == lr  # no warm-up: the config's value itself


def test_spec_check_values() -> None:
    """The check values printed in docs/exact-spec.md section 9.1 are this
    implementation's, bit for bit (the spec and the code say the same)."""
    spec = (ROOT / "docs" / "exact-spec.md").read_text(encoding="utf-8")
    section = spec[spec.index("### 9.1"):spec.index("### 9.2")]
    found = re.findall(r"`cospi\(([0-9.]+)\) = (0x[0-9a-fp.+-]+)`", section)
    assert len(found) == 3, found
    for y, hexval in found:
        assert cospi(float(y)).hex() == hexval, y
    listed = re.search(r"`t = 0\.\.9`:\s*`([^`]+)`", section)
    assert listed is not None
    values = [v.strip() for v in listed.group(1).replace("\n", " ").split(",")]
    s = Schedule(0.1, "cosine", 3, 10)
    assert [s(t).hex() for t in range(10)] == values


def test_schedule_refuses_steps_outside_the_run() -> None:
    """A step past the run's total (cosine) or below 0 is an error, not a guess."""
    s = Schedule(0.1, "cosine", 2, 10)
    with pytest.raises(ValueError, match="past the run's 10 steps"):
        s(10)
    with pytest.raises(ValueError, match="t >= 0"):
        s(-1)
    with pytest.raises(ValueError, match="schedule: expected one of"):
        Schedule(0.1, "linear")


def test_schedule_of_reads_the_config() -> None:
    """schedule_of takes lr, schedule and warmup_steps from [optim]."""
    cfg = load_config(None, ["optim.schedule=cosine", "optim.warmup_steps=5", "optim.lr=0.2"])
    assert schedule_of(cfg.optim, 50) == Schedule(0.2, "cosine", 5, 50)


_PRINT = ("from pipeline.core.schedule import Schedule; s = Schedule(0.003, 'cosine', 10, 997); "
          "print(' '.join(s(t).hex() for t in range(997)))")


@pytest.mark.process
def test_schedule_bits_equal_across_thread_counts() -> None:
    """The schedule's values are the same bits in processes started with 1 and
    2 OpenMP/MKL threads (and equal to this process's)."""
    outs = []
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        outs.append(subprocess.run([sys.executable, "-c", _PRINT], cwd=ROOT, env=env,
                                   capture_output=True, text=True, check=True).stdout.split())
    here = Schedule(0.003, "cosine", 10, 997)
    assert outs[0] == outs[1] == [here(t).hex() for t in range(997)]
