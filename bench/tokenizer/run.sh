#!/usr/bin/env bash
# Tokenizer benchmark: token counts of a 10,000-caption folder, sdkit vs Python
# (transformers' CLIPTokenizer, open_clip's SimpleTokenizer) in the same run.
# Needs the reference venv: source ../shared/scripts/refenv.sh (sets $REFPY).
# Usage: bench/tokenizer/run.sh [N]   (SDKIT_BIN=path to skip the build)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-10000}
OUT=bench/out/tokenizer
: "${REFPY:?source ../shared/scripts/refenv.sh first}"
# SDKIT_BIN=path uses an already built binary instead of building one.
if [ -z "${SDKIT_BIN:-}" ]; then cargo build --release --quiet; fi
BIN=${SDKIT_BIN:-${CARGO_TARGET_DIR:-target}/release/sdkit}
rm -rf "$OUT" && mkdir -p "$OUT"
python3 bench/tokenizer/make_captions.py "$OUT/captions" "$N"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
# The file cache is warm for everyone: each side reads the files once before timing.
cat "$OUT"/captions/*/*.txt > /dev/null
TIMEFORMAT=%R
for run in 1 2 3; do
  t=$( { time "$BIN" tokens --captions "$OUT/captions" --json --quiet > "$OUT/sdkit.json" || true; } 2>&1 )
  printf 'sdkit tokens --captions, run %d      %8.3f s (whole process)\n' "$run" "$t"
done
t=$( { time RAYON_NUM_THREADS=1 "$BIN" tokens --captions "$OUT/captions" --json --quiet > /dev/null || true; } 2>&1 )
printf 'sdkit, one thread                    %8.3f s (whole process)\n' "$t"
python3 - "$OUT/sdkit.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["summary"]
print(f"sdkit: {s['captions']} captions, {sum(c['tokens'] for c in d['captions'])} tokens, "
      f"{s['spill']} past 75")
PY
"$REFPY" bench/tokenizer/py_tokenize.py "$OUT/captions"
