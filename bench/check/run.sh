#!/usr/bin/env bash
# Times `sdkit check` against the same work in Python (Pillow + imagehash.phash).
# Usage: bench/check/run.sh [N images, default 200] [sdkit binary]
# Needs $REFPY (source shared/scripts/refenv.sh) and imagehash importable by it
# (pip install imagehash==4.3.2, or IMAGEHASH_PATH=dir of the unpacked wheel).
set -euo pipefail
N=${1:-200}
BIN=${2:-${CARGO_TARGET_DIR:-target}/release/sdkit}
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
"$REFPY" "$HERE/../tag/make_images.py" "$OUT/img/10_bench" "$N"
for f in "$OUT"/img/10_bench/*.jpg; do echo "ohwx, 1girl, smile" > "${f%.jpg}.txt"; done
t() { local s e; s=$(date +%s.%N); "$@" >/dev/null; e=$(date +%s.%N); echo "$e - $s" | bc; }
echo "images: $N ($(du -sh "$OUT" | cut -f1)), load: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "sdkit check: $(t "$BIN" check "$OUT" --quiet --json) s"
echo "python:      $(PYTHONPATH=${IMAGEHASH_PATH:-} t "$REFPY" "$HERE/check_python.py" "$OUT" 8) s"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
