"""The real-model feature table (issue 21): each feature trained in pinned and
exact mode at (world size, threads) = (1, 1), (1, 2) and (2, 1), from a
project of its own; per cell the outcome (one weight hash, or the refusal and
its exit code) and the test accuracy.

    .venv/bin/python bench/model_features.py            # 12 steps each (about 5 min on 2 cores)
    .venv/bin/python bench/model_features.py --steps 40

The models are tests/system/test_model_features.py's (FEATS), trained on the
shipped digits; ``one hash`` means the three runs gave the same weights.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = [  # (feature, factory, model.args overrides)
    ("tied weights", "feats:tied", []),
    ("frozen layer", "feats:plain", ["model.args.freeze=true"]),
    ("unused parameter", "feats:plain", ["model.args.spare=true"]),
    ("forward hook (zeroes a layer)", "feats:plain", ["model.args.hook=true"]),
    ("BatchNorm1d", "feats:batchnorm", []),
    ("spectral_norm parametrization", "feats:specnorm", []),
    ("plain (control)", "feats:plain", []),
]
VARIANTS = [("--threads", "1"), ("--threads", "2"), ("--nproc", "2")]


def _feats() -> str:
    """FEATS from the test module, read as a literal (the test module is not imported)."""
    tree = ast.parse((ROOT / "tests/system/test_model_features.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "FEATS":
            return ast.literal_eval(node.value)
    raise SystemExit("FEATS not found in tests/system/test_model_features.py")


def _train(project: Path, runs: Path, args: list[str]) -> tuple[int, dict | str]:
    env = {**os.environ, "PIPELINE_CACHE_DIR": str(project / "cache")}
    p = subprocess.run([sys.executable, "-m", "pipeline", "train", str(project / "config.toml"),
                        *args, "--runs-dir", str(runs), "--json", "--quiet"], cwd=project,
                       env=env, capture_output=True, text=True, timeout=900)
    if p.returncode:
        return p.returncode, (p.stderr.strip().splitlines() or ["?"])[-1]
    return 0, json.loads(p.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    steps = ap.parse_args().steps
    print(f"| feature | mode | outcome at (1 proc, 1 thread), (1, 2), (2, 1) | test accuracy |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp)
        (project / "feats.py").write_text(_feats())
        for feature, factory, extra in CASES:
            (project / "config.toml").write_text(f'[model]\nfactory = "{factory}"\n'
                                                 f"[train]\nmax_steps = {steps}\n")
            for mode in ("pinned", "exact"):
                results = [_train(project, project / f"runs-{i}", [f"mode={mode}", *extra, *v])
                           for i, v in enumerate(VARIANTS)]
                codes = {c for c, _ in results}
                if codes == {0}:
                    hashes = {r["weights_sha256"] for _, r in results}  # type: ignore[index]
                    acc = results[0][1]["metrics"]["test_accuracy"]  # type: ignore[index]
                    outcome = (f"one hash `{hashes.pop()[:12]}`" if len(hashes) == 1
                               else f"**{len(hashes)} hashes**")
                    print(f"| {feature} | {mode} | {outcome} | {acc:.4f} |")
                else:
                    why = next(r for c, r in results if c)
                    print(f"| {feature} | {mode} | refused, exit {sorted(codes - {0})}: "
                          f"{str(why)[:140]} | - |")
                sys.stdout.flush()


if __name__ == "__main__":
    main()
