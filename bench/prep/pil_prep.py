"""The reference: what users run today, a Python/PIL script doing prep's default job:
decode, EXIF transpose, RGB, kohya bucket choice (same algorithm as sd-scripts),
LANCZOS resize to cover the bucket, centre crop, PNG save (PIL defaults), caption copy.

Usage: python pil_prep.py IN_DIR OUT_DIR
"""
import math
import os
import shutil
import sys

from PIL import Image, ImageOps


def buckets(reso=512, lo=256, hi=1024, step=64):
    area = reso * reso
    out = {(int(math.sqrt(area) // step) * step,) * 2}
    w = lo
    while w <= hi:
        h = min(hi, int((area // w) // step) * step)
        if h >= lo:
            out.add((w, h))
            out.add((h, w))
        w += step
    return sorted(out)


BUCKETS = buckets()


def select(w, h):
    ar = w / h
    if (w, h) in BUCKETS:
        b = (w, h)
    else:
        b = min(BUCKETS, key=lambda r: abs(r[0] / r[1] - ar))
    scale = b[1] / h if ar > b[0] / b[1] else b[0] / w
    return b, (int(w * scale + 0.5), int(h * scale + 0.5))


def main():
    src, dst = sys.argv[1], sys.argv[2]
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if not name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
            continue
        path = os.path.join(src, name)
        try:
            im = Image.open(path)
            im = ImageOps.exif_transpose(im).convert("RGB")
        except Exception as e:  # noqa: BLE001
            print(f"{path}: {e}", file=sys.stderr)
            continue
        (bw, bh), (rw, rh) = select(*im.size)
        im = im.resize((rw, rh), Image.LANCZOS)
        x, y = (rw - bw) // 2, (rh - bh) // 2
        im = im.crop((x, y, x + bw, y + bh))
        stem = os.path.splitext(name)[0]
        im.save(os.path.join(dst, stem + ".png"))
        cap = os.path.splitext(path)[0] + ".txt"
        if os.path.exists(cap):
            shutil.copyfile(cap, os.path.join(dst, stem + ".txt"))


if __name__ == "__main__":
    main()
