#!/usr/bin/env bash
# Benchmark: sdkit prep vs the PIL script on the same generated photos, in one run.
# Usage: bench/prep/run.sh [N=300]. Needs a release build and Python with numpy + Pillow
# ($REFPY from ../shared/scripts/refenv.sh, or PY=python3 with those installed).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-300}
PY=${PY:-${REFPY:-python3}}
WORK=${WORK:-/tmp/sdkit-bench-prep}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/sdkit}
[ -x "$BIN" ] || cargo build --release
"$PY" bench/prep/gen_photos.py "$WORK/photos" "$N"
rm -rf "$WORK/out-pil" "$WORK/out-sdkit" "$WORK/out-sdkit-j1"
sync
measure() { # label, command...
  local label=$1; shift
  /usr/bin/time -f "$label wall_s=%e peak_rss_kb=%M" "$@" 2>&1 >/dev/null | grep "wall_s=" || true
}
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
measure "pil      " "$PY" bench/prep/pil_prep.py "$WORK/photos" "$WORK/out-pil"
measure "sdkit    " "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit" --quiet
measure "sdkit -j1" "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit-j1" --quiet --jobs 1
measure "sdkit rerun (all unchanged)" "$BIN" prep "$WORK/photos" --out "$WORK/out-sdkit" --quiet
echo "outputs: pil $(ls "$WORK/out-pil" | grep -c png) ($(du -sh "$WORK/out-pil" | cut -f1)), sdkit $(find "$WORK/out-sdkit" -name '*.png' | wc -l) ($(du -sh "$WORK/out-sdkit" | cut -f1))"
