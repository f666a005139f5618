#!/usr/bin/env python3
"""A random-initialised ConvNeXt-like tagger with the WD14 contract (about 97M
parameters, like wd-v1-4-convnext-tagger-v2): input [N, 448, 448, 3] float32 BGR
0..255, output [N, 9083] sigmoid scores, plus a matching selected_tags.csv.
Not committed (hundreds of MB): bench/tag/run.sh makes it under bench/out/.

    "$REFPY" bench/tag/make_model.py bench/out/wd14-bench
"""
import csv
import os
import sys

import torch
from torch import nn

N_RATING, N_GENERAL, N_CHAR = 4, 8579, 500


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.1))

    def forward(self, x):  # NCHW
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Tagger(nn.Module):
    def __init__(self, depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)):
        super().__init__()
        layers = [nn.Conv2d(3, dims[0], 4, stride=4), LayerNorm2d(dims[0], eps=1e-6)]
        for i, (n, d) in enumerate(zip(depths, dims)):
            if i > 0:
                layers += [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, stride=2)]
            layers += [Block(d) for _ in range(n)]
        self.body = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], N_RATING + N_GENERAL + N_CHAR)

    def forward(self, x):  # NHWC BGR 0..255, as the WD14 exports take it
        x = (x / 127.5 - 1.0).permute(0, 3, 1, 2)
        x = self.body(x).mean(dim=(2, 3))
        return torch.sigmoid(self.head(self.norm(x)))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(0)
    m = Tagger().eval()
    with torch.no_grad():
        m.head.weight.mul_(4.0)
        m.head.bias.fill_(-6.9)  # about 30 tags above 0.35 per image
    print("parameters:", sum(p.numel() for p in m.parameters()))
    x = torch.rand(1, 448, 448, 3) * 255
    torch.onnx.export(m, (x,), os.path.join(out, "model.onnx"), input_names=["input_1:0"],
                      output_names=["predictions_sigmoid"], opset_version=17,
                      dynamic_axes={"input_1:0": {0: "batch"}, "predictions_sigmoid": {0: "batch"}},
                      dynamo=False)
    with open(os.path.join(out, "selected_tags.csv"), "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["tag_id", "name", "category", "count"])
        for i, n in enumerate(["general", "sensitive", "questionable", "explicit"]):
            w.writerow([i, n, 9, 0])
        for i in range(N_GENERAL):
            w.writerow([10 + i, f"general_tag_{i:04d}", 0, 0])
        for i in range(N_CHAR):
            w.writerow([20000 + i, f"character_{i:03d}_(series)", 4, 0])


if __name__ == "__main__":
    main()
