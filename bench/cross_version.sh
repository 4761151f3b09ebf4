#!/usr/bin/env bash
# Exact mode across torch versions (opt-in; needs the package registry and
# several GB of disk for the second torch: PyPI's Linux x86-64 torch is the
# CUDA build, which also runs on the CPU). Trains the exact-mode config with
# the locked torch (.venv) and with TORCH_VERSION in a separate virtualenv,
# compares the two weight hashes, and checks each against the golden entry
# (`golden check`). Exit 0 only if the hashes agree and neither differs from
# a golden entry (a config with no entry, such as a long charlm run, reports
# "no golden entry" and compares the two hashes alone).
#   bash bench/cross_version.sh TORCH_VERSION [CONFIG=configs/digits-exact.toml [KEY=VALUE ...]]
#   e.g. bash bench/cross_version.sh 2.14.1 examples/charlm/config.toml mode=exact
#   CROSS_VENV=DIR reuses (or creates) the second virtualenv at DIR.
# Proven so far: bench/RESULTS.md and CHANGELOG.md.
set -euo pipefail
shopt -s inherit_errexit  # a failing command inside $(...) fails the script too
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || [ -z "$1" ]; then
  echo "usage: bash bench/cross_version.sh TORCH_VERSION [CONFIG [KEY=VALUE ...]]   (e.g. 2.14.1)" >&2
  exit 2
fi
other=$1
config=${2:-configs/digits-exact.toml}
shift $(( $# > 1 ? 2 : 1 ))
overrides=("$@")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
venv=${CROSS_VENV:-$work/venv-torch-$other}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  # Same pins as pyproject.toml except torch (no --require-hashes: another torch).
  "$venv/bin/pip" install -q "torch==$other" numpy==2.4.6 safetensors==0.8.0 filelock==4.3.1 \
    tqdm==4.70.1 matplotlib==3.11.2 pillow==13.0.0
fi
got=$("$venv/bin/python" -c 'import torch; print(torch.__version__)')
case "$got" in "$other"|"$other"+*) ;; *) echo "error: $venv has torch $got, expected $other" >&2; exit 2;; esac
run() {  # $1 = python, $2 = label: prints "torch sha256 accuracy golden-verdict"
  local runs="$work/runs-$2" rec
  if ! rec=$(PIPELINE_CACHE_DIR="$work/cache" "$1" -m pipeline train "$config" ${overrides[@]+"${overrides[@]}"} --runs-dir "$runs" --json --quiet); then
    echo "error: training with $1 failed (see above)" >&2
    return 1
  fi
  local dir="$runs/$(echo "$rec" | "$1" -c 'import json,sys; print(json.load(sys.stdin)["run_key"])')"
  local verdict
  if verdict=$("$1" -m pipeline golden check "$dir" 2>/dev/null); then :; fi
  echo "$rec" | "$1" -c 'import json,sys; r=json.load(sys.stdin); m=r["metrics"]; print(r["toolchain"]["torch"], r["weights_sha256"], m.get("test_accuracy", m.get("test_loss")), end=" ")'
  echo "${verdict%% sha256*}"
}
a=$(run .venv/bin/python locked) || exit 1
b=$(run "$venv/bin/python" other) || exit 1
for rec in "$a" "$b"; do
  if ! echo "$rec" | cut -d' ' -f2 | grep -Eq '^[0-9a-f]{64}$'; then
    echo "error: no weight hash in a run's record: $rec" >&2; exit 1
  fi
done
echo "config $config ${overrides[*]:-}, on $(uname -m)"
printf '%-22s %-64s %-9s %s\n' "torch" "exact-mode weights sha256" "acc/loss" "golden check"
printf '%s\n%s\n' "$a" "$b" | awk '{v=$4; for (i=5; i<=NF; i++) v=v" "$i; printf "%-22s %-64s %-9s %s\n", $1, $2, $3, v}'
ha=$(echo "$a" | cut -d' ' -f2); hb=$(echo "$b" | cut -d' ' -f2)
if [ "$ha" = "$hb" ] && ! printf '%s\n%s\n' "$a" "$b" | grep -q "golden mismatch"; then
  echo "same exact-mode hash with torch $(echo "$a" | cut -d' ' -f1) and $(echo "$b" | cut -d' ' -f1) ($(echo "$a" | grep -q "golden match" && echo "equal to the golden entry" || echo "no golden entry"))"
else
  echo "DIFFERENT: hashes or golden verdicts disagree"; exit 1
fi
