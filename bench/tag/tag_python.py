#!/usr/bin/env python3
"""The Python baseline of the tag benchmark: kohya's WD14 tagger flow
(finetune/tag_images_by_wd14_tagger.py) with onnxruntime: Pillow decode, alpha on
white, BGR, white square pad, cv2 INTER_AREA / INTER_LANCZOS4 to the model size,
batched inference, kohya's caption rules (thresholds 0.35, label order,
--remove_underscore with SmilingWolf's kaomoji kept), one .txt per image.

    "$REFPY" bench/tag/tag_python.py MODEL_DIR IMAGE_DIR OUT_DIR [BATCH]
"""
import csv
import os
import sys
import time

import cv2
import numpy as np
import onnxruntime as ort
from PIL import Image

KAOMOJI = {"0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3",
           "6_9", ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"}


def preprocess(path, size):
    im = Image.open(path)
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, "WHITE")
        bg.paste(im, mask=im)
        im = bg
    im = np.asarray(im.convert("RGB"))[:, :, ::-1]
    side = max(im.shape[:2])
    py, px = side - im.shape[0], side - im.shape[1]
    im = np.pad(im, ((py // 2, py - py // 2), (px // 2, px - px // 2), (0, 0)),
                mode="constant", constant_values=255)
    if side > size:
        im = cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA)
    elif side < size:
        im = cv2.resize(im, (size, size), interpolation=cv2.INTER_LANCZOS4)
    return im.astype(np.float32)


def name(t):
    return t if (len(t) <= 3 or t in KAOMOJI) else t.replace("_", " ")


def main():
    model_dir, img_dir, out_dir = sys.argv[1:4]
    batch = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    t0 = time.time()
    sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"),
                                providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    size = inp.shape[1]
    with open(os.path.join(model_dir, "selected_tags.csv"), encoding="utf-8") as f:
        rows = list(csv.reader(f))[1:]
    general = [name(r[1]) for r in rows if r[2] == "0"]
    chars = [name(r[1]) for r in rows if r[2] == "4"]
    exts = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
    paths = sorted(os.path.join(img_dir, p) for p in os.listdir(img_dir) if p.lower().endswith(exts))
    os.makedirs(out_dir, exist_ok=True)

    def run(batch_items):
        probs = sess.run(None, {inp.name: np.stack([x for _, x in batch_items])})[0]
        for (path, _), prob in zip(batch_items, probs):
            tags = []
            for i, p in enumerate(prob[4:]):
                if i < len(general) and p >= 0.35:
                    tags.append(general[i])
                elif i >= len(general) and p >= 0.35:
                    tags.append(chars[i - len(general)])
            stem = os.path.splitext(os.path.basename(path))[0]
            with open(os.path.join(out_dir, stem + ".txt"), "w", encoding="utf-8") as f:
                f.write(", ".join(tags) + "\n")

    items = []
    for p in paths:
        items.append((p, preprocess(p, size)))
        if len(items) >= batch:
            run(items)
            items = []
    if items:
        run(items)
    dt = time.time() - t0
    print(f"python: {len(paths)} images in {dt:.1f}s, {len(paths) / dt:.3f} images/s")


if __name__ == "__main__":
    main()
