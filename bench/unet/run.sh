#!/usr/bin/env bash
# UNet benchmark: a full-size SD1.5-config UNet (random weights), 64x64 latents (512 px),
# batch 1, f32 on CPU: forward, and forward+backward, time and peak RSS; sdkit
# (examples/bench_unet.rs) against diffusers + PyTorch (bench/unet/torch_unet.py), same run.
# Heavy: ~3.4 GB of weights, several GB of activations; run it when the machine is quiet.
# Needs the reference venv: source ../shared/scripts/refenv.sh (sets $REFPY).
# Usage: bench/unet/run.sh [N]   (N timed repeats of the forward; default 2). The latent-
# gradient forward+backward is best of 2 on each side: the first run faults its memory in.
# PROFILE=dev uses the dev profile (dependencies, i.e. candle and gemm, are opt-level 3 there
# too; only sdkit's own glue code is opt-level 1) when a release build is too slow to make.
# sdkit's forward+backward runs under `ulimit -v` (MEM_LIMIT_GB, default 22) so that running
# out of memory ends the benchmark, not the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-2}
OUT=bench/out/unet
W=$OUT/sd15_random.safetensors
: "${REFPY:?source ../shared/scripts/refenv.sh first}"
mkdir -p "$OUT"
PROFILE=${PROFILE:-release}
cargo build --profile "$PROFILE" --example bench_unet --quiet
DIR=$PROFILE; [ "$PROFILE" = dev ] && DIR=debug
BIN=${CARGO_TARGET_DIR:-target}/$DIR/examples/bench_unet
[ -f "$W" ] || "$REFPY" bench/unet/torch_unet.py save "$W"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
  "$(free -g | awk '/Mem:/{print $2}') GB RAM; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
"$REFPY" bench/unet/torch_unet.py gemm 4096 2>&1 | grep -v -i warn
"$BIN" gemm 4096
"$REFPY" bench/unet/torch_unet.py fwd "$W" "$N" 2>&1 | grep -v -i warn
"$BIN" fwd "$W" "$N"
"$REFPY" bench/unet/torch_unet.py bwd "$W" 2 input 2>&1 | grep -v -i warn
"$REFPY" bench/unet/torch_unet.py bwd "$W" 1 all 2>&1 | grep -v -i warn
( ulimit -v $(( ${MEM_LIMIT_GB:-22} * 1024 * 1024 )); "$BIN" bwd "$W" 2 ) \
  || echo "sdkit forward+backward failed (memory limit ${MEM_LIMIT_GB:-22} GB?)"
echo "-- sdkit profile (one forward, by block; single ops) --"
"$BIN" profile "$W"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
