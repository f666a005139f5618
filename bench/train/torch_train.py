"""diffusers + peft side of bench/train: the same LoRA step sdkit runs, in PyTorch (CPU, f32).

  torch_train.py MODEL_DIR DATA_DIR STEPS

LoRA rank 32, alpha 16 (peft) on kohya's targets: UNet attention / feed-forward linears and
proj_in / proj_out, text-encoder q/k/v/out_proj and fc1/fc2; AdamW lr 1e-4; batch 1 at
512x512 (env RESOLUTION and BATCH change both); per step: caption -> CLIP (grad through the
LoRA) -> noise -> UNet forward + backward -> clip grad norm 1.0 -> AdamW step. Latents are encoded first (the caching rate of
diffusers' VAE encode). Prints seconds per step (mean of steps 2..N), caching rate, peak RSS.
GRADIENT_CHECKPOINTING=1 turns on diffusers' gradient checkpointing of the UNet.
FUSED=1 (dreambooth): kohya's --fused_backward_pass, each parameter clipped to norm 1.0 and
updated by its own optimizer in a post-accumulate-grad hook, its gradient dropped at once.

METHOD selects what trains (default lora), each as the reference scripts set it up:
  dreambooth          every UNet weight (diffusers' train_dreambooth.py, text encoder frozen);
                      OPTIMIZER=adamw (default) | adafactor (transformers, kohya's args
                      scale_parameter=False relative_step=False warmup_init=False, lr 1e-6)
                      | adamw8bit (bitsandbytes, when it runs on this CPU);
  textual_inversion   one new token of 1 vector (diffusers' textual_inversion.py: the token
                      table gets the gradient, the other rows are restored after the step);
  hypernetwork        webui's module (1,2,1, linear, Normal init) on the attention contexts
                      of every attention layer (before to_k and to_v), AdamW lr 5e-6.
"""

import glob
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from transformers import CLIPTextModel

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


class HypernetModule(nn.Module):
    """webui's HypernetworkModule with layer structure 1,2,1, linear activation, no norm."""

    def __init__(self, dim):
        super().__init__()
        self.linear = nn.Sequential(nn.Linear(dim, dim * 2), nn.Linear(dim * 2, dim))
        for m in self.linear:
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            nn.init.zeros_(m.bias)

    def forward(self, x):
        return x + self.linear(x)


class HypernetProcessor:
    """diffusers' attention with webui's hypernetwork on the context of k and v."""

    def __init__(self, nets):
        self.nets = nets

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        k_net, v_net = self.nets[str(ctx.shape[-1])]
        q = attn.to_q(hidden_states)
        k = attn.to_k(k_net(ctx))
        v = attn.to_v(v_net(ctx))
        b = hidden_states.shape[0]
        h = attn.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, -1, h * out.shape[-1])
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


def trainable(method, unet, te):
    """The parameters the method trains (and a hook run after each optimizer step)."""
    if method == "dreambooth":
        unet.requires_grad_(True)
        return list(unet.parameters()), lambda: None
    if method == "textual_inversion":
        table = te.get_input_embeddings().weight
        table.requires_grad_(True)
        keep = table.detach().clone()
        new_row = table.shape[0] - 1

        def restore():
            with torch.no_grad():
                mask = torch.ones(table.shape[0], dtype=torch.bool)
                mask[new_row] = False
                table[mask] = keep[mask]

        return [table], restore
    if method == "hypernetwork":
        widths = {768, 320, 640, 1280}
        nets = nn.ModuleDict({str(w): nn.ModuleList([HypernetModule(w), HypernetModule(w)])
                              for w in widths})
        unet.set_attn_processor(HypernetProcessor(nets))
        return list(nets.parameters()), lambda: None
    raise SystemExit(f"unknown METHOD {method}")


def optimizer(params, method):
    kind = os.environ.get("OPTIMIZER", "adamw")
    lr = {"dreambooth": 1e-6, "textual_inversion": 5e-4, "hypernetwork": 5e-6}.get(method, 1e-4)
    if kind == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False,
                         warmup_init=False), kind
    if kind == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(params, lr=lr), kind
    return torch.optim.AdamW(params, lr=lr), kind


def main():
    model, data, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    # RESOLUTION: square training size (the bench images are 512 px; resized to it, as
    # sdkit's bucketing does); BATCH: latents per step (cycling through the images).
    res, batch = int(os.environ.get("RESOLUTION", 512)), int(os.environ.get("BATCH", 1))
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
            img = Image.open(p).convert("RGB")
            if img.size != (res, res):
                img = img.resize((res, res), Image.LANCZOS)
            x = torch.from_numpy(np.asarray(img)).float()
            x = (x / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(vae.encode(x).latent_dist.sample() * 0.18215)
    rate = len(images) / (time.perf_counter() - t)
    if os.environ.get("GRADIENT_CHECKPOINTING") == "1":
        unet.enable_gradient_checkpointing()
    method = os.environ.get("METHOD", "lora")
    after_step = lambda: None  # noqa: E731
    if method == "lora":
        unet.add_adapter(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                    target_modules=UNET_TARGETS))
        # transformers' own add_adapter wants a newer peft than the pinned one: inject directly.
        te = inject_adapter_in_model(LoraConfig(r=32, lora_alpha=16, init_lora_weights="gaussian",
                                                target_modules=TE_TARGETS), te)
        params = [p for p in list(unet.parameters()) + list(te.parameters()) if p.requires_grad]
        opt, kind = torch.optim.AdamW(params, lr=1e-4), "adamw"
    else:
        if method == "textual_inversion":
            te.resize_token_embeddings(te.get_input_embeddings().weight.shape[0] + 1)
            te.requires_grad_(False)
        params, after_step = trainable(method, unet, te)
        opt, kind = optimizer(params, method)
    fused = os.environ.get("FUSED") == "1"
    if fused:
        # As kohya's sdxl_train.py: the update inside the backward, per parameter.
        per_param = {p: optimizer([p], method)[0] for p in params}

        def hook(p):
            torch.nn.utils.clip_grad_norm_([p], 1.0)
            per_param[p].step()
            p.grad = None

        for p in params:
            p.register_post_accumulate_grad_hook(hook)
        kind += ", fused backward pass"
    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 5921, 267, 4313, 267, 9057, 49407] + [49407] * 66])
    if method == "textual_inversion":
        ids[0, 5] = 49408  # "a photo of a <new token>, ..."
    g = torch.Generator().manual_seed(0)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        x0 = torch.cat([latents[(s * batch + i) % len(latents)] for i in range(batch)])
        noise = torch.randn(x0.shape, generator=g)
        ts = torch.randint(0, 1000, (batch,), generator=g)
        noisy = sched.add_noise(x0, noise, ts)
        ctx = te(ids.repeat(batch, 1))[0]
        pred = unet(noisy, ts, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        if not fused:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
        after_step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        print(f"  pytorch step {s + 1}: {times[-1]:.2f} s, loss {loss.item():.4f}", flush=True)
    mean = sum(times[1:]) / max(1, len(times) - 1) if len(times) > 1 else times[0]
    fastest = min(times[1:]) if len(times) > 1 else times[0]
    n = sum(p.numel() for p in params)
    print(f"pytorch {torch.__version__} ({method}, {kind}): {mean:.2f} s/step "
          f"(fastest {fastest:.2f}), "
          f"latents {rate:.2f} images/s, {n} trained parameters, peak RSS {peak_gb():.2f} GB, "
          f"threads {torch.get_num_threads()}, "
          f"checkpointing {os.environ.get('GRADIENT_CHECKPOINTING') == '1'}")


if __name__ == "__main__":
    main()
