"""Check a checkpoint sdkit wrote (`sdkit train dreambooth`, `formats::sd_checkpoint`) with
diffusers' own loaders (run where the reference venv exists:
source ../shared/scripts/refenv.sh && $REFPY scripts/check_sd_checkpoint.py ...).

  $REFPY scripts/check_sd_checkpoint.py --file OUT/NAME.safetensors --yaml MODEL.yaml \
      --base BASE_DIFFUSERS_DIR [--folder OUT/NAME] [--same-as BASE_DIFFUSERS_DIR]

1. The single file loads with diffusers' single-file loaders, offline:
   `UNet2DConditionModel.from_single_file` and `AutoencoderKL.from_single_file` with the
   model's LDM config (--yaml), `create_diffusers_clip_model_from_ldm` with the base
   model's text-encoder config (--base); SD2's unused last OpenCLIP block is left out as
   diffusers does for the released 24-block tower.
2. --folder (the `--save-diffusers` folder): `StableDiffusionPipeline.from_pretrained`
   loads it offline (tokenizer included; the tokenizer's ids equal CLIP's), and every
   UNet / VAE / text-encoder tensor equals the single file's.
3. The UNet and text-encoder outputs of both on fixed inputs are equal (the UNet's up to
   float reassociation between diffusers' two module builds); with --same-as
   (a run that trained nothing, or a plain round trip), so are the tensors of that folder.
Prints one line per check; exits non-zero on the first failure.
"""

import argparse
import sys

import torch


def state(m):
    return {k: v.float() for k, v in m.state_dict().items() if not k.endswith("position_ids")}


def same(a, b, what):
    sa, sb = state(a), state(b)
    if sa.keys() != sb.keys():
        sys.exit(f"FAIL {what}: key sets differ: {sorted(set(sa) ^ set(sb))[:5]}")
    worst = max((sa[k] - sb[k]).abs().max().item() for k in sa)
    if worst != 0.0:
        sys.exit(f"FAIL {what}: tensors differ by up to {worst}")
    print(f"ok   {what}: {len(sa)} tensors equal")


def outputs(unet, te, cfg):
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70])
    with torch.no_grad():
        ctx = te(ids)[0]
        s = cfg.sample_size
        x = torch.randn(1, cfg.in_channels, min(s, 16), min(s, 16), generator=g)
        return ctx, unet(x, torch.tensor([500]), encoder_hidden_states=ctx).sample


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--file", required=True)
    ap.add_argument("--yaml", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--folder")
    ap.add_argument("--same-as")
    a = ap.parse_args()
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from safetensors.torch import load_file
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_single_file(a.file, original_config=a.yaml).float().eval()
    vae = AutoencoderKL.from_single_file(a.file, original_config=a.yaml).float().eval()
    ck = load_file(a.file)
    if any(k.startswith("cond_stage_model.model.") for k in ck):
        n = CLIPTextConfig.from_pretrained(a.base, subfolder="text_encoder").num_hidden_layers
        ck = {k: v for k, v in ck.items() if f"transformer.resblocks.{n}." not in k}
    te = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, ck, config=a.base, subfolder="text_encoder", local_files_only=True
    ).float().eval()
    print(f"ok   single file: diffusers loads UNet ({len(state(unet))}), VAE ({len(state(vae))}), "
          f"text encoder ({len(state(te))} tensors)")
    ctx, out = outputs(unet, te, unet.config)
    if a.folder:
        pipe = StableDiffusionPipeline.from_pretrained(a.folder, local_files_only=True,
                                                       safety_checker=None)
        ids = pipe.tokenizer("a photo of a cat").input_ids
        if ids != [49406, 320, 1125, 539, 320, 2368, 49407]:
            sys.exit(f"FAIL tokenizer: {ids}")
        print("ok   folder: StableDiffusionPipeline.from_pretrained loads it; tokenizer ids are CLIP's")
        same(pipe.unet, unet, "folder UNet = single file UNet")
        same(pipe.vae, vae, "folder VAE = single file VAE")
        same(pipe.text_encoder, te, "folder text encoder = single file text encoder")
        ctx2, out2 = outputs(pipe.unet.float().eval(), pipe.text_encoder.float().eval(),
                             unet.config)
        # Equal tensors, but diffusers' two loaders build modules whose float order differs
        # (the folder's weights loaded into the single-file module give the same 2e-6 on
        # the tiny model): equal up to float reassociation, not bit for bit.
        dc = (ctx - ctx2).abs().max().item()
        du = (out - out2).abs().max().item()
        tol = 1e-5 * max(1.0, out.abs().max().item())
        if dc != 0.0 or du > tol:
            sys.exit(f"FAIL outputs differ: text encoder by {dc}, UNet by {du} (tolerance {tol:.1e})")
        print(f"ok   folder and single file: text-encoder outputs equal, UNet outputs within {du:.1e}")
    if a.same_as:
        ref = StableDiffusionPipeline.from_pretrained(a.same_as, local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
        same(ref.unet, unet, "reference UNet = single file UNet")
        same(ref.vae, vae, "reference VAE = single file VAE")
        same(ref.text_encoder, te, "reference text encoder = single file text encoder")


if __name__ == "__main__":
    main()
