#!/usr/bin/env bash
# Times `sdkit tag` against the Python baseline (bench/tag/tag_python.py, kohya's WD14
# flow) on the same images with the same ~97M-parameter WD14-contract model and the
# same onnxruntime library, then checks the captions are identical.
#   bench/tag/run.sh [N_IMAGES=200] [BATCH=8]
# MODEL_DIR=tests/fixtures/tag/wd14 times the pipeline alone (a tiny model with the
# same input contract, so inference costs next to nothing).
# Needs the reference Python environment (../shared/scripts/refenv.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-200}
B=${2:-8}
OUT=bench/out
# shellcheck disable=SC1091
source "${SDKIT_SHARED:-../shared}/scripts/refenv.sh"
"$REFPY" -c "import cv2" 2>/dev/null || "$(dirname "$REFPY")/pip" install -q opencv-python-headless
MODEL_DIR=${MODEL_DIR:-$OUT/wd14-bench}
[ -f "$MODEL_DIR/model.onnx" ] || "$REFPY" bench/tag/make_model.py "$MODEL_DIR"
IMG="$OUT/tag-images-$N"
[ -d "$IMG" ] && [ "$(ls "$IMG" | wc -l)" -eq "$N" ] || "$REFPY" bench/tag/make_images.py "$IMG" "$N"
cargo build --release --quiet
BIN="${CARGO_TARGET_DIR:-target}/release/sdkit"
ORT_DYLIB_PATH=$("$REFPY" -c "import onnxruntime,glob,os; print(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__),'capi','libonnxruntime.so*'))[0])")
export ORT_DYLIB_PATH
rm -rf "$OUT/cap-python" "$OUT/cap-sdkit"
echo "model: $MODEL_DIR, $N images, batch $B"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); load: $(cut -d' ' -f1-3 /proc/loadavg)"
t0=$(date +%s.%N)
"$REFPY" bench/tag/tag_python.py "$MODEL_DIR" "$IMG" "$OUT/cap-python" "$B"
t1=$(date +%s.%N)
"$BIN" tag "$IMG" --model-dir "$MODEL_DIR" --out-dir "$OUT/cap-sdkit" --batch-size "$B" --quiet
t2=$(date +%s.%N)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$REFPY" - "$OUT/cap-python" "$OUT/cap-sdkit" "$N" "$t0" "$t1" "$t2" <<'PY'
import os, sys
a, b, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0, t1, t2 = map(float, sys.argv[4:7])
names = sorted(os.listdir(a))
same = sum(open(os.path.join(a, f)).read().strip() == open(os.path.join(b, f)).read().strip()
           for f in names if os.path.exists(os.path.join(b, f)))
ntags = sum(len(open(os.path.join(a, f)).read().split(", ")) for f in names) / max(1, len(names))
py, rs = n / (t1 - t0), n / (t2 - t1)
print(f"captions identical: {same}/{len(names)} (avg {ntags:.1f} tags)")
print(f"python {t1 - t0:.1f}s {py:.3f} img/s | sdkit {t2 - t1:.1f}s {rs:.3f} img/s | ratio {rs / py:.2f}x")
PY
