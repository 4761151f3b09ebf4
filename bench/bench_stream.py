"""Benchmark: a 1 GiB npy dataset, memory-mapped: `data verify` cold and warm, and
the memory a short training run takes from the map and from memory.

    .venv/bin/python bench/bench_stream.py [--mib 1024] [--runs 5] [--steps 50]

Not a test: prints tables. Makes a float32 .npy file of ``--mib`` MiB (rows of
1x32x32, labels 0..9) and its manifest in a temporary directory, then

1. cold verify: ``manifest.verify(full=True)`` with no stat cache, the CLI
   ``pipeline data verify`` with an empty cache directory, and ``sha256sum``,
   alternating run by run, medians; all read the file from the page cache
   (it is read once first), so "cold" means "no stat cache", not "disk";
2. warm verify (stat cache filled, the dataset's metadata cache entry
   present): ``verify`` + ``recipe.check_caches`` in this process, and the CLI
   end to end (a fresh interpreter each run), with the interpreter's own start
   and ``import pipeline.cli`` beside it, medians;
3. training ``--steps`` steps of the digits MLP config (batch 64, one thread)
   in a fresh process, once from the mapped file and once with the rows
   materialised in memory first (the array the loop held before npy was
   mapped), after a one-step warm-up: wall time, peak RSS (VmHWM; not
   ru_maxrss, which a child inherits from its parent across fork and exec),
   and anonymous / file-backed RSS at the end (/proc/self/status); the two
   weight hashes must be equal.
Target: warm verify <= 50 ms; cold verify / sha256sum about 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline import recipe  # noqa: E402  (after the path insert)
from pipeline.data import dataset, manifest

_CHILD = """
import dataclasses, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from pipeline.data import dataset, manifest
from pipeline.recipe import train_in_process
from pipeline.core.config import load_config
from pipeline.core.hashing import weights_sha256
m, cache, how, steps = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
ds = dataset.load(manifest.verify(m, stat_cache_dir=cache), "big", cache)
if how == "memory":
    ds = dataclasses.replace(ds, x=ds.x.materialise(), decoded=None)
cfg = load_config(Path(sys.argv[5]), [f"train.max_steps={steps}"])
warm = load_config(Path(sys.argv[5]), ["train.max_steps=1", "data.test_fraction=0.001"])
train_in_process(warm, ds, run_key="warm-up", ckpt_dir=None, quiet=True, threads=1)  # first-op costs
t = time.perf_counter()
r = train_in_process(cfg, ds, run_key="bench", ckpt_dir=None, quiet=True, threads=1)
took = time.perf_counter() - t
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
kb = lambda k: int(status[k].split()[0])
print(json.dumps({"s": took, "maxrss_mb": kb("VmHWM") / 1024,
                  "anon_mb": kb("RssAnon") / 1024, "file_mb": kb("RssFile") / 1024,
                  "hash": weights_sha256(r.params), "acc": r.metrics[-1]["test_accuracy"]}))
"""


# What `data verify` does, in a fresh interpreter that skips pipeline.cli's own imports.
_BARE = ("import sys; from pathlib import Path; from pipeline.data import manifest; from pipeline import recipe; "
         "c = manifest.default_cache_dir(); "
         "recipe.check_caches(manifest.verify(Path(sys.argv[1]), stat_cache_dir=c), c)")


def _make(root: Path, mib: int) -> Path:
    """root/data/{x,y}.npy (float32 rows of 1x32x32, uint8 labels) and the manifest."""
    (root / "data").mkdir(parents=True)
    n = (mib << 20) // 4096
    rng = np.random.default_rng(0)
    x = np.lib.format.open_memmap(root / "data" / "x.npy", "w+", np.float32, (n, 1, 32, 32))
    for i in range(0, n, 16384):
        x[i:i + 16384] = rng.random((min(16384, n - i), 1, 32, 32), np.float32)
    x.flush()
    del x
    np.save(root / "data" / "y.npy", rng.integers(0, 10, n).astype(np.uint8))
    files = {}
    for k in ("x", "y"):
        p = root / "data" / f"{k}.npy"
        with p.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        files[k] = {"path": f"data/{k}.npy", "sha256": digest, "size": p.stat().st_size,
                    "source": "synthetic", "licence": "CC0", "description": "benchmark"}
    spec = {"format": "npy", "x": "x", "y": "y", "divisor": 1, "classes": 10}
    m = root / "data-manifest.json"
    m.write_text(json.dumps({"version": 2, "files": files, "datasets": {
        "big": {"task": "classification", "train": spec}}}))
    return m


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True, env=env).stdout


def _medians(tools: dict[str, Callable[[], object]], runs: int) -> dict[str, float]:
    times: dict[str, list[float]] = {k: [] for k in tools}
    for _ in range(runs):
        for k, fn in tools.items():
            times[k].append(_time(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    py, cli = sys.executable, [sys.executable, "-m", "pipeline"]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t = time.perf_counter()
        m = _make(tmp / "root", args.mib)
        x = m.parent / "data" / "x.npy"
        size = x.stat().st_size
        print(f"made {size / 2**20:.0f} MiB {x.name} in {time.perf_counter() - t:.1f} s")
        want = json.loads(m.read_text())["files"]["x"]["sha256"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        fresh = iter(range(10**6))

        def cold_cli() -> None:
            _run([*cli, "data", "verify", "--manifest", str(m)],
                 {**env, "PIPELINE_CACHE_DIR": str(tmp / f"cold-{next(fresh)}")})

        cold = _medians({
            "verify()": lambda: manifest.verify(m, full=True),
            "pipeline data verify": cold_cli,
            "sha256sum": lambda: want in _run(["sha256sum", str(x)]) or sys.exit("bad hash"),
        }, args.runs)
        cache = tmp / "cache"
        t = time.perf_counter()
        dataset.load(manifest.verify(m, stat_cache_dir=cache), "big", cache)  # fills both
        first = time.perf_counter() - t
        wenv = {**env, "PIPELINE_CACHE_DIR": str(cache)}
        warm = _medians({
            "verify() + check_caches()": lambda: recipe.check_caches(
                manifest.verify(m, stat_cache_dir=cache), cache),
            "pipeline data verify": lambda: _run([*cli, "data", "verify", "--manifest", str(m)],
                                                 wenv),
            "python -c pass": lambda: _run([py, "-c", "pass"], env),
            "python -c 'import pipeline.cli'": lambda: _run([py, "-c", "import pipeline.cli"],
                                                            env),
            "the same work without pipeline.cli": lambda: _run([py, "-c", _BARE, str(m)],
                                                               wenv),
        }, args.runs * 2)
        child = [py, "-c", _CHILD, str(m), str(cache)]
        cfg = str(REPO / "configs" / "digits.toml")
        fit = {how: json.loads(_run([*child, how, str(args.steps), cfg], env))
               for how in ("mapped", "memory")}
    print(f"\ncold verify of {size / 2**20:.0f} MiB (no stat cache; file in the page cache), "
          f"median of {args.runs}:")
    for k, v in cold.items():
        print(f"  {k:<34} {v * 1e3:9.1f} ms  {size / 2**20 / v:7.0f} MiB/s  "
              f"sha256sum / this {cold['sha256sum'] / v:5.2f}")
    print(f"first load after it (maps, one pass: decoded hash + value checks, writes the "
          f"metadata entry): {first:.1f} s")
    print(f"\nwarm verify (stat cache and metadata entry present), median of {args.runs * 2}:")
    for k, v in warm.items():
        print(f"  {k:<34} {v * 1e3:9.1f} ms")
    print(f"\ntraining {args.steps} steps (digits MLP config, batch 64, 1 thread) then the test "
          f"split's accuracy, fresh process each:")
    print(f"  {'':<8} {'train s':>8} {'peak RSS MB':>12} {'anon MB':>9} {'file MB':>9}  weights")
    for how, r in fit.items():
        print(f"  {how:<8} {r['s']:8.2f} {r['maxrss_mb']:12.0f} {r['anon_mb']:9.0f} "
              f"{r['file_mb']:9.0f}  sha256:{r['hash'][:16]}")
    same = fit["mapped"]["hash"] == fit["memory"]["hash"]
    print(f"  weights {'identical' if same else 'DIFFER'}; test accuracy "
          f"{fit['mapped']['acc']:.4f} vs {fit['memory']['acc']:.4f}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
