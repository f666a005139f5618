#!/usr/bin/env bash
# LoRA step time against resolution and batch, sdkit and PyTorch back to back for each
# setting (bench/train/run.sh per row). Heavy: about an hour on 2 cores for the default grid.
# Usage: bench/train/table.sh [STEPS] [SETTINGS...]   settings as RESxBATCH (default grid:
# 256x1 256x2 256x4 512x1 512x2 512x4 768x1 768x2). Needs $REFPY (refenv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
STEPS=${1:-3}; shift || true
SETTINGS=("$@")
[ ${#SETTINGS[@]} -gt 0 ] || SETTINGS=(256x1 256x2 256x4 512x1 512x2 512x4 768x1 768x2)
for s in "${SETTINGS[@]}"; do
  r=${s%x*}; b=${s#*x}
  echo "=== resolution $r, batch $b"
  RESOLUTION=$r BATCH=$b SDKIT_ARGS="--resolution $r --train-batch-size $b" \
    bench/train/run.sh "$STEPS" 2>&1 | grep -E "machine|s/step|peak|images/s|load average"
done
