"""Generates the prep benchmark's photo set: N JPEG "photos" of mixed sizes up to
4000x3000 (smooth shading, shapes and sensor-like noise, so they compress and decode
like camera pictures), some with EXIF orientation 6 like phone portraits.

Usage: python gen_photos.py OUT_DIR [N=300]   (needs numpy and Pillow)
"""
import os
import sys

import numpy as np
from PIL import Image

SIZES = [(4000, 3000), (3000, 4000), (4032, 3024), (1920, 1080), (1080, 1920), (2048, 1536),
         (1280, 960), (3000, 2000), (2000, 3000), (800, 600), (3840, 1600), (1024, 1024)]


def photo(rng, w, h, noise):
    # Shapes and shading at 1/4 size, enlarged (smooth like optics), plus sensor noise.
    sw, sh = max(w // 4, 8), max(h // 4, 8)
    y, x = np.mgrid[0:sh, 0:sw].astype(np.float32)
    img = np.empty((sh, sw, 3), np.float32)
    for c in range(3):
        a, b, p = rng.uniform(-1, 1, 3)
        img[..., c] = 128 + 60 * np.sin(x / sw * 6 * a + p) * np.cos(y / sh * 6 * b)
    for _ in range(8):
        cx, cy, r = rng.uniform(0, sw), rng.uniform(0, sh), rng.uniform(0.05, 0.3) * min(sw, sh)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 255, 3)
    small = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    big = np.asarray(small.resize((w, h), Image.BICUBIC), dtype=np.int16)
    reps = (h // noise.shape[0] + 1, w // noise.shape[1] + 1, 1)
    big = big + np.tile(noise, reps)[:h, :w]
    return Image.fromarray(np.clip(big, 0, 255).astype(np.uint8))


def main():
    out = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 300
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(7)
    noise = rng.normal(0, 5, (509, 511, 1)).astype(np.int16)
    for i in range(n):
        path = os.path.join(out, f"photo{i:04d}.jpg")
        if os.path.exists(path):
            continue
        w, h = SIZES[i % len(SIZES)]
        im = photo(rng, w, h, noise)
        exif = Image.Exif()
        if i % 7 == 3:  # a phone portrait stored sideways
            im = im.transpose(Image.Transpose.ROTATE_90)
            exif[0x0112] = 6
        im.save(path, quality=90, exif=exif.tobytes())
    print(f"{n} photos in {out}")


if __name__ == "__main__":
    main()
