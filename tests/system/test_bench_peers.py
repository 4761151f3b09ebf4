"""bench/peers.py without timing anything: its arguments, how it measures
(stub contenders with known costs), its tables and its last line; and, where
the bench extra is missing, its one-line refusal. The real run is a benchmark
(bench/RESULTS.md), never a timed test."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Callable
from types import ModuleType

import pytest

from ..support import ROOT

BENCH = ROOT / "bench"
HAS_LIGHTNING = importlib.util.find_spec("lightning") is not None
LAST_LINE = re.compile(r"pinned/plain=(\d+\.\d\d|n/a) pinned/lightning=(\d+\.\d\d|n/a) "
                       r"exact/plain=(\d+\.\d\d|n/a)")


@pytest.fixture
def peers(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """bench/peers.py as a module, bench/ on sys.path as when it runs (undone after)."""
    monkeypatch.syspath_prepend(str(BENCH))
    spec = importlib.util.spec_from_file_location("peers", BENCH / "peers.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "peers", mod)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _stub(setup: float, per_step: float, calls: list[tuple[str, int]], name: str
          ) -> Callable[[int], float]:
    """A contender whose run of n steps 'takes' setup + per_step * n seconds."""
    def run(n: int) -> float:
        calls.append((name, n))
        return setup + per_step * n
    return run


def test_arguments_default_quick_and_refusals(peers: ModuleType) -> None:
    """Defaults: both models, 5 rounds; --quick 3; unknown models and rounds
    below 1 are usage errors (exit 2) naming the option."""
    a = peers.parse_args([])
    assert (a.quick, a.rounds, a.models) == (False, 5, ["digits", "charlm"])
    q = peers.parse_args(["--quick", "--models", "charlm"])
    assert (q.quick, q.rounds, q.models) == (True, 3, ["charlm"])
    assert peers.parse_args(["--quick", "--rounds", "7"]).rounds == 7
    for bad in (["--models", "digits,resnet"], ["--rounds", "0"], ["--models", ","]):
        with pytest.raises(SystemExit) as e:
            peers.parse_args(bad)
        assert e.value.code == 2, bad


def test_measure_cancels_what_every_run_does_once(peers: ModuleType) -> None:
    """Per step is (long - short) / (long steps - short steps): a contender's
    fixed cost (set-up, final evaluation) cancels, so two contenders with the
    same per-step cost but different set-up compare as equal (control: their
    whole-run times differ)."""
    calls: list[tuple[str, int]] = []
    runners = {"plain": _stub(0.1, 0.002, calls, "plain"),
               "lightning": _stub(2.0, 0.002, calls, "lightning"),
               "pinned": _stub(0.3, 0.005, calls, "pinned")}
    t = peers.measure(runners, 10, 110, rounds=3)
    assert t["plain"].per_step == pytest.approx(0.002)
    assert t["lightning"].per_step == pytest.approx(0.002)
    assert t["pinned"].per_step == pytest.approx(0.005)
    assert t["lightning"].whole == pytest.approx(2.22) and t["plain"].whole == pytest.approx(0.32)
    assert peers.ratio(t, "pinned", "plain") == pytest.approx(2.5)
    assert peers.ratio(t, "exact", "plain") is None


def test_rounds_alternate_and_rotate(peers: ModuleType) -> None:
    """Per round every contender runs short then long, the first contender
    rotating from round to round."""
    calls: list[tuple[str, int]] = []
    runners = {n: _stub(0.0, 1.0, calls, n) for n in ("plain", "lightning", "pinned")}
    peers.measure(runners, 2, 5, rounds=3)
    timed = calls
    assert len(timed) == 18
    assert [n for n, _ in timed[::2]] == ["plain", "lightning", "pinned",
                                          "lightning", "pinned", "plain",
                                          "pinned", "plain", "lightning"]
    assert all(s == 2 and lg == 5 for (_, s), (_, lg) in zip(timed[::2], timed[1::2]))


def test_table_and_last_line(peers: ModuleType) -> None:
    """A model with all four gives four rows and a numeric last line; one
    without exact mode (charlm) says n/a and why, in its table and last line."""
    T = peers.Timing
    full = {"plain": T(0.2, 0.0003), "lightning": T(0.5, 0.0006),
            "pinned": T(0.8, 0.0012), "exact": T(0.7, 0.0009)}
    lines = peers.table("digits MLP", "head", full)
    assert len(lines) == 6 and "n/a" not in "\n".join(lines)
    last = peers.summary(full)
    assert LAST_LINE.fullmatch(last), last
    assert last == "pinned/plain=4.00 pinned/lightning=2.00 exact/plain=3.00"
    no_exact = {k: v for k, v in full.items() if k != "exact"}
    rows = peers.table("a model without an exact config", "head", no_exact)
    assert rows[-1].split()[-1] == "model)" and peers.EXACT_NA in rows[-1]
    assert peers.summary(no_exact).endswith("exact/plain=n/a")


@pytest.mark.process
@pytest.mark.skipif(HAS_LIGHTNING, reason="the bench extra is installed: the tiny real run runs instead")
def test_without_the_bench_extra_it_says_how_to_install() -> None:
    """Without Lightning the script refuses in one line naming the bench lock
    (exit 2), before any training."""
    p = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 2, p.stderr
    assert "bench/requirements-bench.lock" in p.stderr and p.stdout == "", p.stderr


@pytest.mark.process
@pytest.mark.slow
@pytest.mark.skipif(not HAS_LIGHTNING, reason="lightning is not installed (the bench extra: "
                    "pip install --require-hashes -r bench/requirements-bench.lock)")
def test_a_tiny_real_run_ends_with_the_line() -> None:
    """One quick round on the digits MLP (about 10 s): a table with all four
    contenders, the plain loop and Lightning ending with the same weights
    (the same work), and the last line in its format (nothing on the times)."""
    p = subprocess.run([sys.executable, str(BENCH / "peers.py"), "--quick", "--models",
                        "digits", "--rounds", "1"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert LAST_LINE.fullmatch(out[-1]) and "n/a" not in out[-1], out[-1]
    assert sum(line.startswith("  pipeline, exact mode") for line in out) == 1, p.stdout
    assert "plain loop and Lightning after 22 steps: the same weights" in p.stdout, p.stdout
