"""Bench: `pipeline data add DIR`, `data verify` and the first decode on an image
folder of N small PNG files (default 10000, 16x16 RGB, 10 classes).

    python bench/image_folder.py [N]

Prints a table: the add (hash on threads + verify from the stat cache + one
decode), a cold `data verify --full` (every file hashed), a warm `data verify`
(stat cache), and the first training-time decode into the cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "proj"
        rng = np.random.default_rng(0)
        for i in range(n):
            d = root / "pics" / f"c{i % 10}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                d / f"{i:06d}.png")
        past = time.time() - 10  # older than the stat cache's racy window
        for p in (root / "pics").rglob("*.png"):
            os.utime(p, (past, past))
        env = {**os.environ, "PIPELINE_CACHE_DIR": str(Path(tmp) / "cache")}
        py = [sys.executable, "-m", "pipeline"]
        m = str(root / "data-manifest.json")
        rows = []
        for what, args in [
            ("data add DIR", ["data", "add", str(root / "pics"), "--name", "pics",
                              "--manifest", m]),
            ("data verify (warm)", ["data", "verify", "--manifest", m]),
            ("data verify --full", ["data", "verify", "--full", "--manifest", m]),
        ]:
            t = time.perf_counter()
            subprocess.run(py + args, env=env, check=True, stdout=subprocess.DEVNULL)
            rows.append((what, time.perf_counter() - t))
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", (
            "from pathlib import Path; from pipeline.data import manifest, dataset;"
            f"v = manifest.verify(Path({m!r}), stat_cache_dir=manifest.default_cache_dir());"
            "dataset.load(v, 'pics', manifest.default_cache_dir())")], env=env, check=True)
        rows.append(("verify + first decode (load)", time.perf_counter() - t))
        print(f"| {n} PNG files, 16x16 RGB, {os.cpu_count()} cores | seconds | files/s |")
        print("|---|---|---|")
        for what, s in rows:
            print(f"| {what} | {s:.2f} | {n / s:,.0f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10000)
