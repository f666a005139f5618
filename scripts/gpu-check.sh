#!/usr/bin/env bash
# GPU check, for a machine with an NVIDIA GPU (the `device` tool's machine, or a user's):
# build with CUDA, run the reference-parity tests on the GPU (SDKIT_TEST_DEVICE=cuda: the
# LoRA gradients against PyTorch, diffusers' LoRA loader outputs and image, the trainer end
# to end), then time LoRA training steps and a 20-step sample on the GPU (and the same on
# the CPU, for the ratio). One script, under 10 minutes once the
# crates are fetched. Needs nvcc (CUDA toolkit) and the driver; prints what it measured.
# Usage: scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader
command -v nvcc >/dev/null || { echo "nvcc not found: install the CUDA toolkit (.ci/install-nvcc.sh on Debian)"; exit 2; }
CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
export CUDA_COMPUTE_CAP
echo "== build (--features cuda, compute cap $CUDA_COMPUTE_CAP)"
cargo build --release --features cuda --bin sdkit --tests --quiet
echo "== reference tests on the GPU"
SDKIT_TEST_DEVICE=cuda cargo test --release --features cuda --quiet \
  --test lora --test train -- --test-threads 1 2>&1 | grep -E "^test |test result|rel err|panicked" || true
echo "== LoRA step timing on the GPU (tiny fixture model, 20 steps)"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in $(cd tests/fixtures/checkpoint && find sd1_diffusers -type f); do
  mkdir -p "$tmp/$(dirname "$f")"
  case $f in *.gz) gunzip -c "tests/fixtures/checkpoint/$f" > "$tmp/${f%.gz}" ;; *) cp "tests/fixtures/checkpoint/$f" "$tmp/$f" ;; esac
done
mkdir -p "$tmp/data/10_x"
first=$(find examples/photos -maxdepth 1 -type f \( -name "*.jpg" -o -name "*.png" \) | sort | head -n 1)
cp "$first" "$tmp/data/10_x/"
for dev in cpu cuda; do
  target/release/sdkit train lora --model "$tmp/sd1_diffusers" --data "$tmp/data" --out "$tmp/out-$dev" \
    --resolution 64 --min-bucket-reso 32 --max-bucket-reso 128 --bucket-reso-steps 32 \
    --max-train-steps 20 --cache-latents --seed 1 --device "$dev" --quiet \
    | sed "s/^/$dev: /"
done
echo "== 20-step sample on the tiny fixture model (attention: tiled with recompute on CUDA)"
for dev in cpu cuda; do
  target/release/sdkit sample --model "$tmp/sd1_diffusers" --prompt "a photo of a cat" --seed 1 \
    --steps 20 --width 64 --height 64 --device "$dev" --out "$tmp/sample-$dev" --json \
    | grep -o '"seconds": *[0-9.e-]*' | sed "s/^/$dev: /"
done
if [ -n "${BENCH_MODEL:-}" ]; then
  echo "== SD1.5 20-step sample at 512 px on the GPU ($BENCH_MODEL)"
  target/release/sdkit sample --model "$BENCH_MODEL" --prompt "a photo of a cat" --seed 1 \
    --steps 20 --device cuda --out "$tmp/sample-bench" --json | grep -o '"seconds": *[0-9.e-]*'
  echo "== SD1.5 LoRA dim 32 step at 512 px on the GPU ($BENCH_MODEL)"
  target/release/sdkit train lora --model "$BENCH_MODEL" --data "${BENCH_DATA:?}" --out "$tmp/bench" \
    --network-dim 32 --network-alpha 16 --learning-rate 1e-4 --max-train-steps 10 \
    --cache-latents --seed 0 --device cuda --quiet
fi
echo "== done in $(( $(date +%s) - start )) s"
