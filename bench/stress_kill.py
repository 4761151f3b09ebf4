"""Stress: SIGKILL `pipeline train` at 20 random points, resume each, compare.

    .venv/bin/python bench/stress_kill.py [--kills 20] [--seed 0] [--jobs 2] [--mode pinned]

Not a test: prints one line per kill point and the tally. Trains
configs/digits.toml with train.epochs=3 train.checkpoint_every=7 (66 steps,
11 checkpoints) in a private copy of the checkout (the code is part of the run
key; edits made meanwhile must not change it). One uninterrupted run gives the
reference hash; then each kill point gets a fresh runs dir: one process
killed there, one resuming to the end, whose weights hash must equal the
reference. Kill points, from random.Random(seed):

- step N:        $PIPELINE_TEST_KILL_AT_STEP=N, SIGKILL right after step N;
- checkpoint N:  $PIPELINE_TEST_KILL_IN_CHECKPOINT=N, SIGKILL with checkpoint N's
                 temp file written and synced, before its rename;
- external T ms: SIGKILL sent from here T ms after the first checkpoint file
                 appears (wherever the process is: a step, a write, the run dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PARTS = ["pipeline", "configs", "data", "data-manifest.json", "requirements.lock",
         "pyproject.toml"]
OVERRIDES = ["train.epochs=3", "train.checkpoint_every=7"]
TOTAL = 66
CHECKPOINTS = [7, 14, 21, 22, 28, 35, 42, 44, 49, 56, 63]  # intervals and epoch ends
TIMEOUT_S = 600


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {**env, "PIPELINE_CACHE_DIR": str(cache), **extra}


def _argv(runs: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "train", "configs/digits.toml", *OVERRIDES,
            f"mode={mode}", "--runs-dir", str(runs), "--json", "--quiet"]


def _plan(seed: int, n: int) -> list[tuple[str, float]]:
    """About 40% after a step, 30% inside a checkpoint write, 30% external."""
    rng = random.Random(seed)
    out: list[tuple[str, float]] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.4:
            out.append(("step", rng.randint(1, TOTAL)))
        elif r < 0.7:
            out.append(("checkpoint", rng.choice(CHECKPOINTS)))
        else:
            out.append(("external", round(rng.uniform(0.0, 80.0), 1)))
    return out


def _kill_external(argv: list[str], cwd: Path, env: dict[str, str], runs: Path,
                   delay_ms: float) -> int:
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + TIMEOUT_S
    while not list(runs.glob(".ckpt-*/ckpt-*.safetensors")) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(delay_ms / 1e3)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)  # the same pid after the pinned re-exec
    return proc.wait()


def _one(kind: str, where: float, cwd: Path, cache: Path, base: Path, mode: str,
         i: int) -> tuple[bool, str, str]:
    """(killed, resumed-from note, weights hash) for one kill point."""
    runs = base / f"runs-{i}"
    argv = _argv(runs, mode)
    if kind == "external":
        rc = _kill_external(argv, cwd, _env(cache), runs, where)
    else:
        switch = "PIPELINE_TEST_KILL_AT_STEP" if kind == "step" \
            else "PIPELINE_TEST_KILL_IN_CHECKPOINT"
        rc = subprocess.run(argv, cwd=cwd, env=_env(cache, **{switch: str(int(where))}),
                            capture_output=True, timeout=TIMEOUT_S, check=False).returncode
    p = subprocess.run(argv, cwd=cwd, env=_env(cache), capture_output=True, text=True,
                       timeout=TIMEOUT_S, check=False)
    if p.returncode != 0:
        return rc == -signal.SIGKILL, f"resume failed (exit {p.returncode})", "-"
    m = re.search(r"\(step (\d+)\)", p.stderr)
    note = f"resumed from step {m.group(1)}" if m else "no checkpoint used"
    shutil.rmtree(runs, ignore_errors=True)
    return rc == -signal.SIGKILL, note, json.loads(p.stdout)["weights_sha256"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="kill points run side by side")
    ap.add_argument("--mode", default="pinned", choices=["pinned", "exact"])
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="stress-kill-"))
    try:
        cwd = base / "checkout"
        cwd.mkdir()
        for part in PARTS:
            src = REPO / part
            if src.is_dir():
                shutil.copytree(src, cwd / part, ignore=shutil.ignore_patterns("__pycache__"))
            elif src.exists():
                shutil.copy2(src, cwd / part)
        cache = base / "cache"
        ref = subprocess.run(_argv(base / "reference", args.mode), cwd=cwd, env=_env(cache),
                             capture_output=True, text=True, timeout=TIMEOUT_S, check=True)
        want = json.loads(ref.stdout)["weights_sha256"]
        print(f"uninterrupted ({args.mode}, {' '.join(OVERRIDES)}): sha256:{want}")
        plan = _plan(args.seed, args.kills)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(lambda a: _one(*a[1], cwd, cache, base, args.mode, a[0]),
                                    enumerate(plan)))
        equal = 0
        for i, ((kind, where), (killed, note, got)) in enumerate(zip(plan, results), 1):
            ok = got == want
            equal += ok and killed
            at = f"{where} ms" if kind == "external" else f"{int(where)}"
            print(f"{i:3}  kill {kind:10} {at:>8}  {'killed' if killed else 'NOT KILLED':10}"
                  f"  {note:26}  {'equal' if ok else 'DIFFERS: ' + got}")
        print(f"{equal}/{len(plan)} resumed runs equal the uninterrupted hash")
        return 0 if equal == len(plan) else 1
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
