"""Regenerate data/backbone.safetensors: the first two layers of the digits
MLP (64 -> 64 -> 32) trained by this pipeline in exact mode, so that the file
is the same, byte for byte, on every machine.

    python examples/finetune/make_backbone.py   # from the checkout; prints the sha256

Then `pipeline data add examples/finetune/data/backbone.safetensors --name
backbone --manifest examples/finetune/data-manifest.json --force` if it changed.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent / "data" / "backbone.safetensors"
TRAIN = ["configs/digits.toml", "mode=exact", "model.args.hidden=[64,32]",
         "model.args.dropout=0.0", "train.epochs=10"]


def main() -> int:
    with tempfile.TemporaryDirectory() as runs:
        p = subprocess.run([sys.executable, "-m", "pipeline", "train", *TRAIN, "--runs-dir",
                            runs, "--json", "--quiet"], cwd=ROOT, capture_output=True,
                           text=True, check=False)
        if p.returncode != 0:
            print(p.stderr, file=sys.stderr)
            return p.returncode
        record = json.loads(p.stdout)
        weights = load_file(str(Path(runs) / record["run_key"] / "weights.safetensors"))
    keep = {k: weights[k].contiguous() for k in ("fc0.weight", "fc0.bias", "fc1.weight",
                                                   "fc1.bias")}
    blob = save(keep, {"source": f"pipeline train {' '.join(TRAIN)}",
                       "weights_sha256": record["weights_sha256"]})
    OUT.write_bytes(blob)
    print(f"{OUT}: sha256 {hashlib.sha256(blob).hexdigest()}, {len(blob)} bytes; from run "
          f"{record['run_key'][:16]} (weights sha256:{record['weights_sha256']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
