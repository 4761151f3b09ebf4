"""Benchmark: ``verify`` throughput against ``sha256sum``, and the stat-cache fast path.

    .venv/bin/python bench/bench_data.py [--mib 256] [--runs 7]

Not a test: prints a table. Both tools hash the same files, alternating run by
run, from the page cache (the files are read once first); "cold" means
``verify(full=True)`` with no stat cache, "warm" means a repeated
``verify`` that the stat cache answers. Ratios are medians measured side by
side in this one process; the target is verify / sha256sum >= 0.9.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data import (
    manifest as data,  # noqa: E402  (after the path insert, to run from a checkout)
)


def _make_root(tmp: Path, mib: int) -> Path:
    """A data root holding the shipped digits file and ``mib`` MiB of random bytes."""
    (tmp / "data").mkdir()
    shutil.copy(REPO / "data" / "digits.csv.gz", tmp / "data" / "digits.csv.gz")
    manifest = json.loads((REPO / "data-manifest.json").read_text())
    big = tmp / "data" / "big.bin"
    h = hashlib.sha256()
    with big.open("wb") as f:
        for i in range(mib):
            block = hashlib.shake_256(i.to_bytes(8, "little")).digest(1 << 20)
            h.update(block)
            f.write(block)
    manifest["files"] = {"digits": manifest["files"]["digits"],  # not the 5 MB text
                         "big": {**manifest["files"]["digits"], "path": "data/big.bin",
                                 "sha256": h.hexdigest(), "size": big.stat().st_size,
                                 "description": "synthetic benchmark file"}}
    manifest["datasets"] = {"digits": manifest["datasets"]["digits"]}
    (tmp / "data-manifest.json").write_text(json.dumps(manifest))
    return tmp / "data-manifest.json"


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _external(cmd: list[str], path: Path, expected: str) -> None:
    out = subprocess.run([*cmd, str(path)], check=True, capture_output=True, text=True)
    assert expected in out.stdout, out.stdout


def _file_digest(path: Path, expected: str) -> None:
    with path.open("rb") as f:
        assert hashlib.file_digest(f, "sha256").hexdigest() == expected


def _bench_file(manifest: Path, e: data.FileEntry, runs: int,
                cache: Path) -> dict[str, float]:
    """Median seconds per tool, the tools alternating run by run."""
    path = manifest.parent / e.path
    path.read_bytes()  # into the page cache, so every tool reads memory
    tools: dict[str, Callable[[], object]] = {
        "verify": lambda: data.verify(manifest, names=[e.name], full=True),
        "sha256sum": lambda: _external(["sha256sum"], path, e.sha256),
        "openssl": lambda: _external(["openssl", "dgst", "-sha256", "-r"], path, e.sha256),
        "file_digest": lambda: _file_digest(path, e.sha256),
    }
    times: dict[str, list[float]] = {k: [] for k in tools}
    for _ in range(runs):
        for k, fn in tools.items():
            times[k].append(_time(fn))
    data.verify(manifest, names=[e.name], full=True, stat_cache_dir=cache)  # populate
    times["warm"] = [_time(lambda: data.verify(manifest, names=[e.name], stat_cache_dir=cache))
                     for _ in range(runs)]
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ver = subprocess.run(["sha256sum", "--version"], capture_output=True, text=True)
    print(f"python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}; "
          f"{ver.stdout.splitlines()[0]}")
    with tempfile.TemporaryDirectory() as d:
        manifest = _make_root(Path(d), args.mib)
        entries = data.load_manifest(manifest).files
        res = {n: _bench_file(manifest, entries[n], args.runs, Path(d) / "cache")
               for n in ("big", "digits")}
    mib = 1 << 20
    print(f"{'file':<7} {'MiB':>8} | {'verify':>15} | {'sha256sum':>15} | {'openssl dgst':>15} "
          f"| {'file_digest':>15} | {'ratio':>5} {'vs ossl':>7} | {'warm verify':>11}")
    for name, r in res.items():
        size = entries[name].size / mib
        cells = " | ".join(f"{r[k] * 1e3:>7.2f}ms {size / r[k]:>4.0f}/s"
                           for k in ("verify", "sha256sum", "openssl", "file_digest"))
        print(f"{name:<7} {size:>8.3f} | {cells} | {r['sha256sum'] / r['verify']:>5.2f} "
              f"{r['openssl'] / r['verify']:>7.2f} | {r['warm'] * 1e3:>9.3f}ms")
    print(f"medians of {args.runs} alternating runs, MiB/s after each time; ratio = verify "
          "throughput / sha256sum throughput (target >= 0.9), vs ossl the same against "
          "`openssl dgst -sha256`. External tools' times include process start, which "
          "dominates for the 0.05 MiB digits file. warm = repeated verify answered by the "
          "stat cache (no hashing).")


if __name__ == "__main__":
    main()
