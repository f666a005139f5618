"""diffusers + PyTorch side of bench/unet: a full-size SD1.5-config UNet2DConditionModel with
random weights, batch 1, f32 on CPU, 64x64 latents (512 px), 77-token context.

  torch_unet.py gemm [M]           time an f32 M x M x M matmul (best of 5)
  torch_unet.py save FILE          write the random weights (safetensors) sdkit then loads
  torch_unet.py fwd FILE [N]       time N forwards (no grad)
  torch_unet.py bwd FILE [N] MODE  time N forward+backward of sum(out * r); MODE `input`
                                   (weights frozen: gradient for the latent only, as in
                                   LoRA training) or `all` (every weight gets a gradient)
Each timing mode prints one line; run each in its own process so peak RSS is its own.
"""

import resource
import sys
import time

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    flip_sin_to_cos=True, freq_shift=0,
)


def inputs(size):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 4, size, size, generator=g), torch.tensor([500.0]),
            torch.randn(1, 77, 768, generator=g), torch.randn(1, 4, size, size, generator=g))


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main():
    mode = sys.argv[1]
    if mode == "gemm":
        m = int(sys.argv[2]) if len(sys.argv) > 2 else 4096
        a, b = torch.randn(m, m), torch.randn(m, m)
        a @ b
        best = float("inf")
        for _ in range(5):
            s = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - s)
        print(f"pytorch {torch.__version__} sgemm {m}^3: best {best:.3f} s, "
              f"{2 * m**3 / best / 1e9:.1f} GFLOP/s, threads {torch.get_num_threads()}")
        return
    path = sys.argv[2]
    if mode == "save":
        torch.manual_seed(0)
        m = UNet2DConditionModel(**SD15)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
        return
    n = int(sys.argv[3]) if len(sys.argv) > 3 else 1
    size = 64
    with torch.device("meta"):
        m = UNet2DConditionModel(**SD15)
    m.load_state_dict(load_file(path), assign=True)
    m = m.float().eval()
    x, t, ctx, r = inputs(size)
    times = []
    if mode == "fwd":
        with torch.no_grad():
            for _ in range(n):
                s = time.perf_counter()
                m(x, t, ctx)
                times.append(time.perf_counter() - s)
        label = "forward"
    else:
        grad_mode = sys.argv[4] if len(sys.argv) > 4 else "input"
        m.requires_grad_(grad_mode == "all")
        for _ in range(n):
            m.zero_grad(set_to_none=True)
            xv = x.clone().requires_grad_(True)
            s = time.perf_counter()
            (m(xv, t, ctx).sample * r).sum().backward()
            times.append(time.perf_counter() - s)
        label = f"forward+backward (grads: {grad_mode})"
    print(f"pytorch {torch.__version__} diffusers {label}: best {min(times):.2f} s of {n}, "
          f"peak RSS {peak_gb():.2f} GB, threads {torch.get_num_threads()}", flush=True)


if __name__ == "__main__":
    main()
