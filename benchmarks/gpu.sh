#!/usr/bin/env bash
# MUSK-large on one GPU, in under 5 minutes on an H100:
#   1. forward throughput in bf16: images (batch 64, 384 px) and texts (benchmarks/gpu_forward.py);
#   2. LoRA training tiles/s and peak memory, short setting (benchmarks/gpu_train.py --bags 32,128 --steps 5);
#   3. one federated round of 3 simulated sites on the GPU with MUSK-large (random weights written as a checkpoint
#      file), cached features, SecAgg+ (benchmarks/gpu_federation.py).
# Writes benchmarks/results/gpu.json and gpu.md (gpu_smoke.* with --smoke).
#
# Usage, from the repository root, with a Python whose torch has CUDA and fedmusk installed (pip install -e .):
#   benchmarks/gpu.sh [--smoke] [PYTHON]          # PYTHON: argument, else $PYTHON, else `python`
# --smoke runs the same three steps on the CPU with the tiny config (a minute or two): it checks the script.
set -euo pipefail

smoke=""
if [[ "${1:-}" == "--smoke" ]]; then
  smoke="--smoke"
  shift
fi
py="${1:-${PYTHON:-python}}"
cd "$(dirname "$0")/.."

# Flower must never install packages at run time; Ray reports nothing.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 RAY_USAGE_STATS_ENABLED=0 FLWR_TELEMETRY_ENABLED=0

parts="$(mktemp -d "${TMPDIR:-/tmp}/fmgpu-parts.XXXXXX")"
trap 'rm -rf "$parts"' EXIT

# step NAME LIMIT_S COMMAND...: run one step under a time limit, record its seconds and exit status, carry on.
step() {
  local name="$1" limit="$2"
  shift 2
  echo "== $name" >&2
  local start status=0
  start=$(date +%s%N)
  timeout --kill-after=10 "$limit" "$@" || status=$?
  printf '%s\t%s\t%s\n' "$name" "$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')" \
    "$status" >> "$parts/steps.tsv"
  [[ $status -eq 0 ]] || echo "!! $name exited with status $status" >&2
}

step "forward throughput (bf16)" 45 \
  "$py" benchmarks/gpu_forward.py $smoke --out "$parts/forward.json"
step "LoRA training (gpu_train.py)" 75 \
  "$py" benchmarks/gpu_train.py $smoke --bags 32,128 --steps 5 --out-dir "$parts"
if compgen -G "$parts/gpu_train*.json" > /dev/null; then
  mv "$parts"/gpu_train*.json "$parts/train.json"
fi
step "one federated round, 3 sites (gpu_federation.py)" 170 \
  "$py" benchmarks/gpu_federation.py $smoke --out "$parts/federation.json"

"$py" benchmarks/gpu_report.py "$parts" --name "gpu${smoke:+_smoke}"
if awk -F'\t' '$3 != 0 { bad = 1 } END { exit !bad }' "$parts/steps.tsv"; then
  echo "some steps failed: see the table above" >&2
  exit 1
fi
