#!/usr/bin/env bash
# 512x512 VAE decode and encode (SD config, random weights, f32, CPU): diffusers vs sdkit.
# Usage: bench/vae/run.sh [RUNS]   (needs $REFPY: source /work/shared/scripts/refenv.sh)
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-3}
DIR=${SDKIT_BENCH_VAE:-/tmp/sdkit-bench-vae}
mkdir -p "$DIR"
"${REFPY:-python3}" bench/vae/decode_py.py "$DIR" "$RUNS"
cargo build --locked --release --example bench_unet
target/release/examples/bench_unet vae "$DIR" "$RUNS"
