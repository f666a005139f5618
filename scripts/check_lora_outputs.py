"""Check what `sdkit train lora` wrote with the reference tools (run where the reference
venv exists: source ../shared/scripts/refenv.sh && $REFPY scripts/check_lora_outputs.py ...).

  $REFPY scripts/check_lora_outputs.py --lora OUT/NAME.safetensors --model MODEL_DIR \
      [--logdir LOGGING_DIR/<run>] [--steps N]

1. The file: every key is kohya's (`lora_unet_*` / `lora_te_*` + `.lora_down.weight`,
   `.lora_up.weight`, `.alpha`), metadata values are strings, `sshs_model_hash` is
   kohya's `addnet_hash_safetensors` of the file as written with only the `ss_*` keys.
2. diffusers: `StableDiffusionPipeline.load_lora_weights` on the diffusers folder MODEL_DIR
   takes every module (peft layers counted against the file's modules, no warning about
   unexpected or missing keys) and changes the UNet / text-encoder output.
3. TensorBoard: its own reader (EventAccumulator) finds `loss/current`, `loss/average`,
   `lr/*` at steps 1..N and `loss/epoch`.
Prints one line per check and exits non-zero on the first failure.
"""

import argparse
import hashlib
import io
import json
import logging
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def check_file(path):
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
        keys = list(f.keys())
    tensors = load_file(path)
    modules = set()
    for k in keys:
        name, _, suffix = k.partition(".")
        if not (name.startswith("lora_unet_") or name.startswith("lora_te_")):
            fail(f"{k}: not a kohya module name")
        if suffix not in ("lora_down.weight", "lora_up.weight", "alpha"):
            fail(f"{k}: not a kohya tensor suffix")
        if suffix == "alpha" and tensors[k].dim() != 0:
            fail(f"{k}: alpha is not 0-dim")
        modules.add(name)
    for k, v in meta.items():
        if not isinstance(v, str):
            fail(f"metadata {k} is not a string")
    ss = {k: v for k, v in meta.items() if k.startswith("ss_")}
    data = save(tensors, ss)
    n = int.from_bytes(data[:8], "little")
    want = hashlib.sha256(data[8 + n:]).hexdigest()
    if meta.get("sshs_model_hash") != want:
        fail(f"sshs_model_hash {meta.get('sshs_model_hash')} != kohya's {want}")
    legacy = hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    if meta.get("sshs_legacy_hash") != legacy:
        fail(f"sshs_legacy_hash {meta.get('sshs_legacy_hash')} != kohya's {legacy}")
    for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "modelspec.architecture"):
        if k not in meta:
            fail(f"metadata {k} missing")
    print(f"ok file: {len(modules)} modules, {len(meta)} metadata keys, hashes match kohya's")
    return modules


def check_diffusers(path, model_dir, modules):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(os.path.join(model_dir, "unet")).float().eval()
    te = CLIPTextModel.from_pretrained(os.path.join(model_dir, "text_encoder")).float().eval()
    pipe = StableDiffusionPipeline(
        vae=None, text_encoder=te, tokenizer=None, unet=unet,
        scheduler=DDIMScheduler(clip_sample=False), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 72])
    g = torch.Generator().manual_seed(0)
    c = unet.config
    x = torch.randn(1, c.in_channels, 8, 8, generator=g)

    def run():
        with torch.no_grad():
            h = te(ids, output_hidden_states=True).hidden_states[-1]
            ctx = getattr(te, "text_model", te).final_layer_norm(h)
            return ctx, unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample

    base_ctx, base_out = run()
    records = []

    class Catch(logging.Handler):
        def emit(self, r):
            records.append(r.getMessage())

    h = Catch()
    logging.getLogger("diffusers").addHandler(h)
    logging.getLogger("peft").addHandler(h)
    pipe.load_lora_weights(path)
    warn = [r for r in records if "unexpected" in r.lower() or "missing" in r.lower() or "not" in r.lower() and "load" in r.lower()]
    if warn:
        fail(f"diffusers warned: {warn[:3]}")
    layers = sum(1 for n, _ in list(unet.named_modules()) + list(te.named_modules()) if n.endswith(".lora_A"))
    if layers != len(modules):
        fail(f"diffusers attached {layers} LoRA layers, the file has {len(modules)} modules")
    ctx, out = run()
    d_te = (ctx - base_ctx).abs().max().item()
    d_unet = (out - base_out).abs().max().item()
    te_mods = any(m.startswith("lora_te_") for m in modules)
    if d_unet == 0 or (te_mods and d_te == 0):
        fail(f"the LoRA does not change the model (te {d_te}, unet {d_unet})")
    print(f"ok diffusers: {layers} layers attached, output change te {d_te:.3g} unet {d_unet:.3g}")


def check_tensorboard(logdir, steps):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(logdir)
    ea.Reload()
    tags = ea.Tags()["scalars"]
    for t in ("loss/current", "loss/average", "loss/epoch"):
        if t not in tags:
            fail(f"tensorboard: no {t} in {tags}")
    got = [e.step for e in ea.Scalars("loss/current")]
    if steps and got != list(range(1, steps + 1)):
        fail(f"tensorboard: loss/current steps {got[:5]}... ({len(got)}), expected 1..{steps}")
    lr = [t for t in tags if t.startswith("lr/")]
    if not lr:
        fail("tensorboard: no lr/* scalars")
    print(f"ok tensorboard: {sorted(tags)}, {len(got)} steps")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lora", required=True)
    ap.add_argument("--model")
    ap.add_argument("--logdir")
    ap.add_argument("--steps", type=int, default=0)
    a = ap.parse_args()
    modules = check_file(a.lora)
    if a.model:
        check_diffusers(a.lora, a.model, modules)
    if a.logdir:
        check_tensorboard(a.logdir, a.steps)
    print("all checks passed")


if __name__ == "__main__":
    main()
