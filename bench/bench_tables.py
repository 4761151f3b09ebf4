"""Bench: decoding one table of N rows x 30 real-valued columns and a label
(default 200000) as CSV, Parquet (snappy, and uncompressed) and Arrow IPC
(uncompressed, and lz4), through pipeline.data.formats.decode (the decode
alone: no manifest, no cache). Needs the parquet extra (requirements-parquet.lock).

    python bench/bench_tables.py [N]

Prints a table: file size, best-of-3 decode time, rows per second, and
whether the decoded arrays are bit for bit the CSV's.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq

from pipeline.data import formats

COLS = [f"c{i}" for i in range(30)]


def main(n: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 100, (n, 30)).round(4)
    y = rng.integers(0, 2, n)
    table = pa.table({**{c: x[:, i] for i, c in enumerate(COLS)}, "label": y})
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with open(d / "t.csv", "w") as f:
            f.write(",".join([*COLS, "label"]) + "\n")
            np.savetxt(f, np.column_stack([x, y]), delimiter=",", fmt=["%.17g"] * 30 + ["%d"])
        pq.write_table(table, d / "snappy.parquet")
        pq.write_table(table, d / "plain.parquet", compression="none")
        feather.write_feather(table, str(d / "plain.arrow"), compression="uncompressed")
        feather.write_feather(table, str(d / "lz4.arrow"), compression="lz4")
        big = 1 << 34
        csv = {"format": "csv", "file": "t", "header": True, "features": [0, 30], "label": 30,
               "classes": 2, "max_bytes": big}
        tab = {"file": "t", "features": COLS, "label": "label", "classes": 2, "max_bytes": big}
        cases = [("csv", "t.csv", csv), ("parquet (snappy)", "snappy.parquet",
                                          {**tab, "format": "parquet"}),
                 ("parquet (none)", "plain.parquet", {**tab, "format": "parquet"}),
                 ("arrow (uncompressed)", "plain.arrow", {**tab, "format": "arrow"}),
                 ("arrow (lz4)", "lz4.arrow", {**tab, "format": "arrow"})]
        want = None
        print(f"{n} rows x 30 float64 columns + label; pyarrow {pa.__version__}\n")
        print("| file | size (MB) | decode (s) | rows/s | = csv |")
        print("|---|---|---|---|---|")
        for name, file, spec in cases:
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                got = formats.decode(spec, {"t": d / file})
                best = min(best, time.perf_counter() - t0)
            if want is None:
                want = got
            same = (np.array_equal(np.asarray(got.x).view(np.uint32),
                                   np.asarray(want.x).view(np.uint32))
                    and np.array_equal(got.y, want.y))
            size = (d / file).stat().st_size / 1e6
            print(f"| {name} | {size:.1f} | {best:.3f} | {n / best:,.0f} | {same} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200000)
