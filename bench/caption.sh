#!/usr/bin/env bash
# Times `sdkit caption` bulk operations on a generated kohya-style dataset.
# Usage: bench/caption.sh [N images, default 10000] [sdkit binary, default target/release/sdkit]
# Images are placeholder files (caption ops never decode them); captions hold 20-40
# tags drawn from a 2,000-tag vocabulary, some with BOM/CRLF.
set -euo pipefail
N=${1:-10000}
BIN=${2:-${CARGO_TARGET_DIR:-target}/release/sdkit}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
python3 - "$OUT" "$N" <<'PY'
import os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(0)
vocab = [f"tag_{i:04d}" for i in range(2000)]
for i in range(n):
    d = os.path.join(root, "img", f"{1 + i % 4}_set{i % 4}")
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, f"{i:06d}.png"), "wb").write(b"x")
    tags = ["1girl"] + rng.sample(vocab, rng.randint(20, 40))
    text = ", ".join(tags)
    if i % 10 == 0:
        text = "\ufeff" + text + "\r\nsecond line\r\n"
    open(os.path.join(d, f"{i:06d}.txt"), "w", encoding="utf-8", newline="").write(text)
PY
t() {
  local s e
  s=$(date +%s.%N)
  "$BIN" "$@" -q >/dev/null || true
  e=$(date +%s.%N)
  printf '%-45s %6.2f s\n' "$*" "$(echo "$e - $s" | bc)" | sed "s#$OUT#DIR#"
}
echo "$N captions, $(nproc) cores, $BIN"
# Reference: the few lines of Python users write today to put a trigger word first
# (read, split on commas, insert, write in place; no atomic write, no fsync, no undo).
s=$(date +%s.%N)
python3 - "$OUT" <<'PY'
import os, sys
for d, _, files in os.walk(sys.argv[1]):
    for f in files:
        if f.endswith(".txt"):
            p = os.path.join(d, f)
            text = open(p, encoding="utf-8-sig", newline="").read()
            first, sep, rest = text.partition("\n")
            tags = [t.strip() for t in first.rstrip("\r").split(",") if t.strip()]
            tags = ["pyref"] + [t for t in tags if t != "pyref"]
            open(p, "w", encoding="utf-8", newline="").write(", ".join(tags) + sep + rest)
PY
e=$(date +%s.%N)
printf '%-45s %6.2f s\n' "python reference: add trigger first" "$(echo "$e - $s" | bc)"
t caption stats "$OUT"
t caption add "$OUT" ohwx --dry-run
t caption add "$OUT" ohwx
t caption remove "$OUT" --regex 'tag_00.*'
t caption normalize "$OUT"
t caption prune "$OUT" --above 0.9 --keep ohwx
t caption undo "$OUT"
