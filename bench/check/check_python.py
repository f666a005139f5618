#!/usr/bin/env python3
"""What a dataset check costs in Python: every image opened with Pillow (size, EXIF
transpose), hashed with imagehash.phash, near-duplicate pairs listed, captions read.
The comparison point for `sdkit check` in bench/check/run.sh.

    PYTHONPATH=<imagehash wheel dir> "$REFPY" bench/check/check_python.py DIR 8
"""
import os
import sys

import imagehash
from PIL import Image, ImageOps


def main():
    root, k = sys.argv[1], int(sys.argv[2])
    hashes = []
    for dirpath, _, files in sorted(os.walk(root)):
        for f in sorted(files):
            if not f.lower().endswith((".png", ".jpg", ".jpeg", ".webp", ".bmp")):
                continue
            p = os.path.join(dirpath, f)
            with Image.open(p) as im:
                im = ImageOps.exif_transpose(im)
                size = im.size
                h = imagehash.phash(im.convert("RGB"))
            cap = os.path.splitext(p)[0] + ".txt"
            text = open(cap, encoding="utf-8").readline() if os.path.exists(cap) else None
            hashes.append((p, h, size, text))
    pairs = [(a[0], b[0]) for i, a in enumerate(hashes) for b in hashes[i + 1:] if a[1] - b[1] <= k]
    print(f"{len(hashes)} images, {len(pairs)} near-duplicate pairs")


if __name__ == "__main__":
    main()
