#!/usr/bin/env bash
# Exact mode across torch versions (opt-in; needs the package registry and
# several GB of disk for the second torch). Trains the exact-mode digits config
# with the locked torch (.venv) and with another torch in a separate
# virtualenv, and compares the weight hashes. Exit 0 if they are equal.
#   bash bench/cross_version.sh [TORCH_VERSION=2.14.1] [CONFIG=configs/digits-exact.toml]
set -euo pipefail
cd "$(dirname "$0")/.."
other=${1:-2.14.1}
config=${2:-configs/digits-exact.toml}
work=$(mktemp -d)
venv=${CROSS_VENV:-$work/venv-torch-$other}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # Same pins as pyproject.toml except torch (no --require-hashes: another torch).
  "$venv/bin/pip" install -q "torch==$other" numpy==2.4.6 safetensors==0.8.0 filelock==4.3.1 \
    tqdm==4.70.1 matplotlib==3.11.2
fi
run() {  # $1 = python
  PIPELINE_CACHE_DIR="$work/cache" "$1" -m pipeline train "$config" --runs-dir "$work/runs-$2" \
    --json --quiet | "$1" -c 'import json,sys; r=json.load(sys.stdin); print(r["toolchain"]["torch"], r["weights_sha256"], r["metrics"]["test_accuracy"])'
}
a=$(run .venv/bin/python locked)
b=$(run "$venv/bin/python" other)
printf '%-28s %-64s %s\n' "torch" "exact-mode weights sha256" "test accuracy"
printf '%s\n%s\n' "$a" "$b" | awk '{printf "%-28s %-64s %s\n", $1, $2, $3}'
if [ "$(echo "$a" | cut -d' ' -f2)" = "$(echo "$b" | cut -d' ' -f2)" ]; then
  echo "same exact-mode hash with torch $(echo "$a" | cut -d' ' -f1) and $(echo "$b" | cut -d' ' -f1)"
else
  echo "DIFFERENT hashes"; exit 1
fi
