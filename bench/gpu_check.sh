#!/usr/bin/env bash
# Exact mode on a GPU must reproduce the CPU golden hash, bit for bit.
# Run on a CUDA host with the project's environment (any torch with CUDA):
#   bash bench/gpu_check.sh [CONFIG [KEY=VALUE ...]]
# Default: the exact digits MLP (configs/digits-exact.toml), then the charlm
# transformer in exact mode, the suite's short run (tests/system/test_charlm.py's
# EXACT_LM: 8 steps, a small test split). Exit 0: every CUDA-trained run equals
# tests/golden/weights.json's exact entry for its config (recorded on CPU).
# Exit 1: one differs (both hashes printed).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
"$py" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "NO GPU"); sys.exit(0 if ok else 2)'
work=$(mktemp -d)
export PIPELINE_CACHE_DIR="$work/cache"
check() {  # CONFIG [KEY=VALUE ...]: train on cuda, then the golden check
  local runs="$work/runs-$RANDOM" start
  start=$(date +%s)
  "$py" -m pipeline train "$@" --device cuda --runs-dir "$runs" --quiet | tee "$work/out.txt"
  echo "trained $* on cuda in $(( $(date +%s) - start )) s"
  "$py" -m pipeline golden check "$(ls -d "$runs"/*/ | head -1)" | tee "$work/golden.txt"
  grep -q "^golden match" "$work/golden.txt"
}
if [ "$#" -gt 0 ]; then
  check "$@"
else
  check configs/digits-exact.toml
  check examples/charlm/config.toml mode=exact train.max_steps=8 train.checkpoint_every=4 \
    data.test_fraction=0.002
fi
echo "gpu_check: every run equals its CPU golden hash"
