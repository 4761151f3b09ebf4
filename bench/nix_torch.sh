#!/usr/bin/env bash
# The Nix route's torch without Nix: nixpkgs 25.11 ships torch 2.9.1 (Python 3.13,
# OpenBLAS); PyPI's torch 2.9.1 is the same version (MKL, Python 3.11 here). Runs, with
# the interpreter of a virtualenv that has it (VENV/bin/python, this checkout installed
# with pip install --no-deps -e .):
#   1. the suite's distributed tests and its torch API check (tests/train/test_distributed.py,
#      test_torch_api.py; world sizes 1, 2, 4 give one hash, pinned and exact);
#   2. exact mode at --nproc 1 and 2 on the golden exact config
#      (configs/digits.toml mode=exact train.epochs=2), each `golden check --require`;
#      configs/digits-exact.toml (1 shard) at --nproc 1, the same;
#   3. pinned mode (the default config) at --nproc 1 and 2: one hash, printed.
# Exit 0 only if every step passes.
#   bash bench/nix_torch.sh VENV          e.g. python3 -m venv /tmp/v && /tmp/v/bin/pip install \
#       torch==2.9.1 numpy==2.4.6 filelock==4.3.1 safetensors==0.8.0 tqdm==4.70.1 pytest==9.2.0 \
#       pytest-xdist==3.8.0 pytest-timeout==2.4.0 hypothesis==6.170.17 setuptools==80.9.0 &&
#       /tmp/v/bin/pip install --no-deps --no-build-isolation -e .
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
if [ $# -ne 1 ] || [ ! -x "$1/bin/python" ]; then
  echo "usage: bash bench/nix_torch.sh VENV   (a virtualenv with torch 2.9.1 and this checkout)" >&2
  exit 2
fi
py=$1/bin/python
got=$("$py" -c 'import torch; print(torch.__version__)')
case "$got" in 2.9.1|2.9.1+*) ;; *) echo "error: $1 has torch $got, expected 2.9.1" >&2; exit 2;; esac
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export PIPELINE_CACHE_DIR=$work/cache
echo "torch $got ($("$py" -c 'from pipeline.core.environment import blas_of_torch; print(blas_of_torch())') BLAS), $(uname -m)"

"$py" -m pytest -p no:cacheprovider -q -n 2 --full tests/train/test_distributed.py tests/train/test_torch_api.py

train() {  # $1 = label, rest: pipeline train arguments; prints the weight hash
  local rec
  rec=$("$py" -m pipeline train "${@:2}" --runs-dir "$work/$1" --json --quiet) || {
    echo "error: $1: training failed" >&2; return 1; }
  echo "$rec" | "$py" -c 'import json,sys; print(json.load(sys.stdin)["weights_sha256"])'
}
check() {  # $1 = label: golden check --require on its run directory
  "$py" -m pipeline golden check --require "$work/$1"/[0-9a-f]*
}
for n in 1 2; do
  h=$(train "exact-nproc$n" configs/digits.toml mode=exact train.epochs=2 --nproc "$n")
  echo "exact  --nproc $n  $h  $(check "exact-nproc$n")"
done
h=$(train exact-1shard configs/digits-exact.toml)
echo "exact  digits-exact.toml  $h  $(check exact-1shard)"
p1=$(train pinned-nproc1 configs/digits.toml --nproc 1)
p2=$(train pinned-nproc2 configs/digits.toml --nproc 2)
echo "pinned --nproc 1  $p1"
echo "pinned --nproc 2  $p2"
[ "$p1" = "$p2" ] || { echo "DIFFERENT: pinned hashes at --nproc 1 and 2" >&2; exit 1; }
echo "torch $got: distributed tests pass; exact hashes equal the golden entries at --nproc 1 and 2; pinned --nproc 1 = 2"
