"""The reference for `sdkit prep --matte`: what users run today, rembg's background
removal (its code, inlined: sessions/base.py normalize, sessions/u2net.py predict,
bg.py putalpha_cutout + apply_background_color onto white) followed by the PIL prep
script's steps (kohya bucket, LANCZOS cover resize, centre crop, PNG save). One
onnxruntime session, images one at a time, as `rembg p` does.

Usage: python rembg_prep.py MODEL.onnx IN_DIR OUT_DIR
"""
import os
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "prep"))
from pil_prep import select  # noqa: E402

MEAN, STD, SIZE = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 320


def remove(sess, img):
    im = img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    a = np.array(im)
    a = a / max(np.max(a), 1e-6)
    t = np.zeros((SIZE, SIZE, 3))
    for c in range(3):
        t[:, :, c] = (a[:, :, c] - MEAN[c]) / STD[c]
    x = np.expand_dims(t.transpose((2, 0, 1)), 0).astype(np.float32)
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0][:, 0, :, :]
    ma, mi = np.max(pred), np.min(pred)
    pred = np.squeeze((pred - mi) / (ma - mi))
    mask = Image.fromarray((pred.clip(0, 1) * 255).astype("uint8"), mode="L")
    mask = mask.resize(img.size, Image.Resampling.LANCZOS)
    cut = img.convert("RGB")
    cut.putalpha(mask)
    back = Image.new("RGBA", img.size, (255, 255, 255, 255))
    return Image.alpha_composite(back, cut).convert("RGB")


def main():
    model, src, dst = sys.argv[1:4]
    os.makedirs(dst, exist_ok=True)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    for name in sorted(os.listdir(src)):
        if not name.lower().endswith((".jpg", ".jpeg", ".png", ".webp")):
            continue
        im = ImageOps.exif_transpose(Image.open(os.path.join(src, name)))
        im = remove(sess, im)
        (bw, bh), (rw, rh) = select(*im.size)
        im = im.resize((rw, rh), Image.LANCZOS)
        x, y = (rw - bw) // 2, (rh - bh) // 2
        im.crop((x, y, x + bw, y + bh)).save(os.path.join(dst, os.path.splitext(name)[0] + ".png"))


if __name__ == "__main__":
    main()
