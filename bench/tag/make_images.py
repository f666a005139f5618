#!/usr/bin/env python3
"""Photo-like JPEG test images for the tag benchmark (gradients, shapes, sensor-like
noise), in the sizes of a typical training folder. Not committed.

    "$REFPY" bench/tag/make_images.py bench/out/tag-images 200
"""
import os
import sys

import numpy as np
from PIL import Image

SIZES = [(1024, 1536), (1536, 1024), (1200, 1200), (768, 1024), (2000, 3000), (640, 480)]


def main():
    out, n = sys.argv[1], int(sys.argv[2])
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            a, b, p = rng.uniform(-1, 1, 3)
            img[..., c] = 128 + 90 * np.sin((a * x / w + b * y / h) * 8 + p + c)
        for _ in range(6):
            cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.25) * min(w, h)
            img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.integers(0, 256, 3)
        img += rng.normal(0, 6, img.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            os.path.join(out, f"img_{i:04d}.jpg"), quality=90)


if __name__ == "__main__":
    main()
