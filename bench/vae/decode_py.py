"""diffusers side of bench/vae/run.sh: a random SD-config AutoencoderKL (f32, CPU), saved
as a diffusers folder for the sdkit side, and the times of decoding one 4x64x64 latent
(512x512 image) and of encoding one 512x512 image (what caching latents does per image).
Usage: decode_py.py OUT_DIR [RUNS]"""

import os
import resource
import sys
import time

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

out = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 3
torch.manual_seed(0)
if os.path.isfile(os.path.join(out, "config.json")):
    vae = AutoencoderKL.from_pretrained(out).float().eval()
else:
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
    ).float().eval()
    vae.save_pretrained(out, safe_serialization=True)
z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(1))
times = []
with torch.no_grad():
    for _ in range(runs):
        t = time.perf_counter()
        img = vae.decode(z).sample
        times.append(time.perf_counter() - t)
x = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(2)) * 2 - 1
enc_times = []
with torch.no_grad():
    for _ in range(runs):
        t = time.perf_counter()
        mean = vae.encode(x).latent_dist.mean
        enc_times.append(time.perf_counter() - t)
save_file({"image": img.contiguous(), "input": x.contiguous(), "latent_mean": mean.contiguous()},
          os.path.join(out, "decoded_py.safetensors"))
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(f"diffusers decode 512x512: best {min(times):.2f} s, runs {[round(x, 2) for x in times]}, "
      f"threads {torch.get_num_threads()}, peak RSS {rss:.0f} MB")
print(f"diffusers encode 512x512: best {min(enc_times):.2f} s, runs {[round(x, 2) for x in enc_times]}")
