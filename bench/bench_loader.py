"""The loader alone (gather + augmentation, pipeline/data/loader.py) against the
training step, on examples/images (1797 8x8 PNG digits, a small CNN, padded crop,
brightness, contrast; 64 images a batch). Prints a table:

    .venv/bin/python bench/bench_loader.py [--steps 60] [--workers 0,1,3]

Rows: images/s of the loader alone at each worker count (batches made and
taken, no training); then the training time per step without augmentation,
and with augmentation at each worker count (one thread for the step), with
the weights' hash (the same at every worker count: checked). The loader is
not the bottleneck when its time per batch is below the step's; then with
workers > 0 the step time approaches the one without augmentation.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import loops  # noqa: E402  (bench/loops.py: the pinned process, a loaded config)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--workers", default="0,1,3")
    a = ap.parse_args()
    loops.pin()
    import torch

    from pipeline import modes
    from pipeline.core.hashing import weights_sha256
    from pipeline.data.augment import augmenter
    from pipeline.data.loader import Loader
    from pipeline.data.sampling import split
    from pipeline.train.loop import _batch_maker, examples_of, train

    run = loops.load(REPO / "examples" / "images" / "config.toml", [f"train.max_steps={a.steps}"])
    cfg, ds, bsz = run.cfg, run.ds, run.cfg.train.batch_size
    train_ids, _ = split(ds, cfg.seed, cfg.data.test_fraction)
    spe = len(train_ids) // bsz
    aug = augmenter(cfg.data.augment, cfg.seed)
    workers = [int(w) for w in a.workers.split(",")]
    print(f"| examples/images, {bsz} images a batch, {a.steps} steps | s per batch | images/s | weights |")
    print("|---|---|---|---|")
    for w in workers:
        make = _batch_maker(examples_of(ds, 0, torch.device("cpu")), aug, train_ids, cfg.seed,
                            bsz, spe)
        loader = Loader(make, 0, a.steps, w)
        t = time.perf_counter()
        for s in range(a.steps):
            loader.get(s)
        dt = (time.perf_counter() - t) / a.steps
        loader.close()
        print(f"| loader alone, {w} workers | {dt:.4f} | {bsz / dt:,.0f} | |")
    plain = dataclasses.replace(cfg, data=dataclasses.replace(
        cfg.data, augment=type(cfg.data.augment)()))
    hashes = set()
    for label, c, w in [("step, no augmentation", plain, 0),
                        *[(f"step + augmentation, {w} workers", cfg, w) for w in workers]]:
        r = train(c, ds, modes.of(c.mode), run.parts, run_key="bench", ckpt_dir=None,
                  quiet=True, threads=1, loader_workers=w)
        h = weights_sha256(r.params)
        if c is cfg:
            hashes.add(h)
        dt = r.loop_s / r.steps
        print(f"| {label} | {dt:.4f} | {bsz / dt:,.0f} | {h[:16]} |")
    assert len(hashes) == 1, f"weights differ across loader workers: {hashes}"


if __name__ == "__main__":
    main()
