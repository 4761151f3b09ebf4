"""Benchmark: checkpoint cost as a share of training time at the default policy.

    .venv/bin/python bench/bench_checkpoint.py [--runs 5] [--dir DIR]

Not a test: prints a table. configs/digits.toml as shipped (pinned, 30 epochs;
the default policy: a checkpoint at a multiple of checkpoint_every=100 or an
epoch end once checkpoint_seconds=60 have passed since the last one), and the
same with checkpoint_seconds=0 (every such point: the policy before, 35
checkpoints), trained in this process under the pinned profile (the script re-executes itself with the profile's environment,
like ``pipeline train``). The same run is timed with checkpoints (into a fresh
directory under DIR, default the system temp dir) and with ``ckpt_dir=None``,
alternating run by run (and, for comparison, with every write in the loop's
thread, as before the background writer); after one warm-up run of each,
``--runs`` rounds.
"share" is (median with - median without) / median without; the target is
at most 5%. A second table splits one synchronous checkpoint write into its
parts, to show where the time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

sys.path.insert(0, str(REPO / "bench"))
from loops import pin  # noqa: E402  (bench/loops.py: the pinned process)


def _timed_train(cfg: Any, ds: Any, ckpt_dir: Path | None,
                 sync: bool = False) -> tuple[float, float, int]:
    """(wall seconds of train(), seconds the loop spent inside Writer.save,
    saves); ``sync``: every write in the loop's thread (save, then wait), as
    before the background writer."""
    from pipeline.recipe import train_in_process
    from pipeline.train import checkpoint

    real_save = checkpoint.Writer.save
    spent: list[float] = []

    def timed(self: Any, *args: Any) -> None:
        t = time.perf_counter()
        real_save(self, *args)
        if sync:
            self.wait()
        spent.append(time.perf_counter() - t)

    checkpoint.Writer.save = timed  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        train_in_process(cfg, ds, run_key="bench", ckpt_dir=ckpt_dir, quiet=True)
        wall = time.perf_counter() - t0
    finally:
        checkpoint.Writer.save = real_save  # type: ignore[method-assign]
    return wall, sum(spent), len(spent)


def _parts(cfg: Any, ds: Any, where: Path) -> list[tuple[str, float]]:
    """One checkpoint's state (from a short run), written synchronously part by
    part: median seconds of each part over 20 writes."""
    import torch
    from safetensors.torch import save

    from pipeline.core import atomic
    from pipeline.core.hashing import weights_sha256
    from pipeline.train import checkpoint

    d = where / "parts"
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=2))
    from pipeline.recipe import train_in_process
    train_in_process(short, ds, run_key="bench", ckpt_dir=d, quiet=True)  # writes all
    _, src = max((int(p.name[5:14]), p) for p in d.glob("ckpt-*.safetensors"))
    tensors, meta = checkpoint.load_checkpoint(src)
    # The default run's last checkpoint carries a trail 30x this one's.
    tensors["trail"] = torch.zeros(660 * 4 * 8, dtype=torch.uint8)
    out = d / "ckpt-000000999.safetensors"
    steps: list[tuple[str, Callable[[], Any]]] = [
        ("snapshot (clone tensors)", lambda: {k: v.clone() for k, v in tensors.items()}),
        ("metadata JSON", lambda: json.dumps(meta, sort_keys=True)),
        ("content hash", lambda: weights_sha256(tensors)),
        ("serialise (safetensors)", lambda: save(tensors, metadata={"meta": "x"})),
    ]
    blob = save(tensors, metadata={"meta": json.dumps(meta)})
    steps += [
        ("write + fsync file + rename", lambda: _write_no_dirsync(out, blob)),
        ("fsync directory", lambda: atomic.fsync_dir(d)),
        ("prune (list + unlink)", lambda: checkpoint.prune(d, 999, keep=2)),
    ]
    rows = []
    for name, fn in steps:
        times = []
        for _ in range(20):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rows.append((name, statistics.median(times)))
    return rows


def _write_no_dirsync(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.bench.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="timed pairs (>= 5)")
    ap.add_argument("--dir", type=Path, default=None, help="where checkpoints are written")
    args = ap.parse_args()
    profile = pin().name

    from pipeline.core.config import load_config
    from pipeline.data import dataset, manifest

    cfg = load_config(REPO / "configs" / "digits.toml")
    cache = manifest.default_cache_dir()
    verified = manifest.verify(REPO / "data-manifest.json", stat_cache_dir=cache)
    ds = dataset.load(verified, cfg.data.dataset, cache)
    base = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.dir))
    try:
        every = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train,
                                                                   checkpoint_seconds=0.0))
        with_ck: list[tuple[float, float, int]] = []
        dflt: list[tuple[float, float, int]] = []
        in_loop: list[tuple[float, float, int]] = []
        without: list[float] = []
        for i in range(args.runs + 1):  # run 0 of each is the warm-up
            a = _timed_train(every, ds, base / f"ckpt-{i}")
            b = _timed_train(cfg, ds, None)
            c = _timed_train(every, ds, base / f"sync-{i}", sync=True)
            d = _timed_train(cfg, ds, base / f"dflt-{i}")
            shutil.rmtree(base / f"dflt-{i}", ignore_errors=True)
            shutil.rmtree(base / f"ckpt-{i}", ignore_errors=True)
            shutil.rmtree(base / f"sync-{i}", ignore_errors=True)
            if i:
                with_ck.append(a)
                without.append(b[0])
                in_loop.append(c)
                dflt.append(d)
        m_with = statistics.median(w for w, _, _ in with_ck)
        m_without = statistics.median(without)
        m_in_save = statistics.median(s for _, s, _ in with_ck)
        n_saves = with_ck[0][2]
        share = (m_with - m_without) / m_without
        m_dflt = statistics.median(w for w, _, _ in dflt)
        s_dflt = (m_dflt - m_without) / m_without
        m_sync_save = statistics.median(s for _, s, _ in in_loop)
        per = m_sync_save / n_saves  # one checkpoint written in the loop's thread
        bound = per / cfg.train.checkpoint_seconds
        print(f"config configs/digits.toml ({cfg.mode}, profile {profile}), "
              f"{cfg.train.epochs} epochs; median of {args.runs} rounds")
        print(f"default policy (checkpoint_every={cfg.train.checkpoint_every} or an epoch end, "
              f"checkpoint_seconds={cfg.train.checkpoint_seconds:g}): {dflt[0][2]} checkpoints "
              f"per run, share {s_dflt * 100:.1f}%; at most one write "
              f"({per * 1e3:.2f} ms) per {cfg.train.checkpoint_seconds:g} s of training, "
              f"{bound * 100:.3f}% in any run: target <= 5% "
              f"{'met' if max(bound, s_dflt) <= 0.05 else 'NOT met'}")
        print(f"every point (checkpoint_seconds=0): {n_saves} checkpoints per run")
        print(f"{'':34}{'seconds':>10}")
        print(f"{'train, ckpt_dir=None':34}{m_without:10.3f}")
        print(f"{'train, with checkpoints':34}{m_with:10.3f}")
        print(f"{'  of which inside _save (loop)':34}{m_in_save:10.3f}"
              f"   ({m_in_save / n_saves * 1e3:.2f} ms per checkpoint)")
        print(f"{'share (with - without) / without':34}{share * 100:9.1f}%"
              f"   (every point; the default policy writes far fewer)")
        print(f"{'share inside _save / without':34}{m_in_save / m_without * 100:9.1f}%")
        m_sync = statistics.median(w for w, _, _ in in_loop)
        print(f"{'writes in the loop (no writer)':34}{m_sync:10.3f}"
              f"   share {(m_sync - m_without) / m_without * 100:.1f}%, inside _save "
              f"{m_sync_save / n_saves * 1e3:.2f} ms per checkpoint")
        print(f"{'minimum: without / with':34}{min(without):10.3f} / "
              f"{min(w for w, _, _ in with_ck):.3f}")
        print()
        print(f"{'one synchronous checkpoint write':34}{'ms':>10}")
        for name, sec in _parts(every, ds, base):
            print(f"{'  ' + name:34}{sec * 1e3:10.2f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
