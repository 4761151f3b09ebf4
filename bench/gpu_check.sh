#!/usr/bin/env bash
# Exact mode on a GPU must reproduce the CPU golden hash, bit for bit.
# Run on a CUDA host with the project's environment (any torch with CUDA):
#   bash bench/gpu_check.sh [CONFIG=configs/digits-exact.toml]
# Exit 0: the CUDA-trained weights equal tests/golden/weights.json's exact
# entry for the config (recorded on CPU). Exit 1: they differ (both printed).
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
config=${1:-configs/digits-exact.toml}
"$py" -c 'import torch, sys; ok = torch.cuda.is_available(); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if ok else "NO GPU"); sys.exit(0 if ok else 2)'
work=$(mktemp -d)
export PIPELINE_CACHE_DIR="$work/cache"
start=$(date +%s)
"$py" -m pipeline train "$config" --device cuda --runs-dir "$work/runs" --quiet | tee "$work/out.txt"
echo "trained on cuda in $(( $(date +%s) - start )) s"
run_dir=$(ls -d "$work"/runs/*/ | head -1)
"$py" -m pipeline golden check "$run_dir" | tee "$work/golden.txt"
grep -q "^golden match" "$work/golden.txt"
