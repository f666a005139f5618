"""diffusers + peft side of bench/train: the same LoRA step sdkit runs, in PyTorch (CPU, f32).

  torch_train.py MODEL_DIR DATA_DIR STEPS

LoRA rank 32, alpha 16 (peft) on kohya's targets: UNet attention / feed-forward linears and
proj_in / proj_out, text-encoder q/k/v/out_proj and fc1/fc2; AdamW lr 1e-4; batch 1 at
512x512; per step: caption -> CLIP (grad through the LoRA) -> noise -> UNet forward +
backward -> clip grad norm 1.0 -> AdamW step. Latents are encoded first (the caching rate of
diffusers' VAE encode). Prints seconds per step (mean of steps 2..N), caching rate, peak RSS.
GRADIENT_CHECKPOINTING=1 turns on diffusers' gradient checkpointing of the UNet.
"""

import glob
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from transformers import CLIPTextModel

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main():
    model, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    unet = UNet2DConditionModel.from_pretrained(os.path.join(model, "unet"))
    vae = AutoencoderKL.from_pretrained(os.path.join(model, "vae"))
    te = CLIPTextModel.from_pretrained(os.path.join(model, "text_encoder"))
    for m in (unet, vae, te):
        m.requires_grad_(False)
    images = sorted(glob.glob(os.path.join(data, "*", "*.png")))
    t = time.perf_counter()
    latents = []
    with torch.no_grad():
        for p in images:
            x = torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).float()
            x = (x / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(vae.encode(x).latent_dist.sample() * 0.18215)
    rate = len(images) / (time.perf_counter() - t)
    if os.environ.get("GRADIENT_CHECKPOINTING") == "1":
        unet.enable_gradient_checkpointing()
    unet.add_adapter(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                target_modules=UNET_TARGETS))
    # transformers' own add_adapter wants a newer peft than the pinned one: inject directly.
    te = inject_adapter_in_model(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                            target_modules=TE_TARGETS), te)
    params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 5921, 267, 4313, 267, 9057, 49407] + [49407] * 66])
    g = torch.Generator().manual_seed(0)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        x0 = latents[s % len(latents)]
        noise = torch.randn(x0.shape, generator=g)
        ts = torch.randint(0, 1000, (1,), generator=g)
        noisy = sched.add_noise(x0, noise, ts)
        ctx = te(ids)[0]
        pred = unet(noisy, ts, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"  pytorch step {s + 1}: {times[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
    mean = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    n = sum(p.numel() for p in params)
    print(f"pytorch {torch.__version__} (diffusers + peft): {mean:.2f} s/step, "
          f"latents {rate:.2f} images/s, {n} LoRA parameters, peak RSS {peak_gb():.2f} GB, "
          f"threads {torch.get_num_threads()}, "
          f"checkpointing {os.environ.get('GRADIENT_CHECKPOINTING') == '1'}")


if __name__ == "__main__":
    main()
