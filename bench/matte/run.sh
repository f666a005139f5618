#!/usr/bin/env bash
# Benchmark: sdkit prep --matte vs rembg + the PIL prep script, same photos, one run.
# Usage: bench/matte/run.sh [N=60] [MODEL=tests/fixtures/matte/models/a320.onnx].
# The default model is the tiny u2net-contract test model, so this measures everything
# around the network (decode, resizes, mask, composite, encode); with a real u2net.onnx
# both sides spend most of their time in the same onnxruntime.
# Needs a release build, ORT_DYLIB_PATH (or ./.venv) and Python with numpy, Pillow,
# onnxruntime ($REFPY from ../shared/scripts/refenv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-60}
MODEL=${2:-tests/fixtures/matte/models/a320.onnx}
PY=${PY:-${REFPY:-python3}}
WORK=${WORK:-/tmp/sdkit-bench-matte}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/sdkit}
[ -x "$BIN" ] || cargo build --release
"$PY" bench/prep/gen_photos.py "$WORK/photos" "$N"
rm -rf "$WORK/out-rembg" "$WORK/out-sdkit" "$WORK/out-sdkit-j1" "$WORK/out-plain"
sync
measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "$label wall_s=%e peak_rss_kb=%M" "$@" 2>&1 >/dev/null | grep "wall_s=" || true
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), load $(cut -d' ' -f1-3 /proc/loadavg)"
measure "rembg+pil      " "$PY" bench/matte/rembg_prep.py "$MODEL" "$WORK/photos" "$WORK/out-rembg"
measure "sdkit --matte  " "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit" --quiet --matte "$MODEL"
measure "sdkit --matte -j1" "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit-j1" --quiet --matte "$MODEL" --jobs 1 --matte-batch 1
measure "sdkit (no matte)" "$BIN" prep "$WORK/photos" --out "$WORK/out-plain" --quiet
measure "sdkit --matte rerun" "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit" --quiet --matte "$MODEL"
