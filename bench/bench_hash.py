"""Canonical weight hash throughput vs hashlib.sha256 over the same bytes.
Prints a table; the target is a ratio of at least 0.9.

    .venv/bin/python bench/bench_hash.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.core.hashing import tensor_digests, weights_sha256  # noqa: E402

CASES = {
    "digits MLP 64-128-10": [(128, 64), (128,), (10, 128), (10,)],
    "MLP 784-1024-1024-10": [(1024, 784), (1024,), (1024, 1024), (1024,), (10, 1024), (10,)],
    "4 x 64 MiB tensors": [(4096, 4096)] * 4,
}


def _time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"{'weights':24} {'MiB':>8} {'canonical':>10} {'hashlib':>10} {'ratio':>6} "
          f"{'trail':>10}")
    for name, shapes in CASES.items():
        g = torch.Generator().manual_seed(0)
        w = {f"t{i}": torch.randn(s, generator=g) for i, s in enumerate(shapes)}
        blob = b"".join(t.numpy().tobytes() for t in w.values())

        def plain() -> None:
            hashlib.sha256(blob).hexdigest()

        canon = _time(lambda: weights_sha256(w), args.repeats)
        base = _time(plain, args.repeats)
        trail = _time(lambda: tensor_digests(w), args.repeats)
        mib = len(blob) / 2**20
        print(f"{name:24} {mib:8.2f} {canon * 1e3:8.3f}ms {base * 1e3:8.3f}ms "
              f"{base / canon:6.3f} {trail * 1e3:8.3f}ms")
    print("ratio = canonical throughput / hashlib.sha256 throughput (target >= 0.9)")


if __name__ == "__main__":
    main()
