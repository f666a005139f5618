"""Random-weight SD1.5 pipeline for bench/train: a diffusers folder (UNet2DConditionModel,
CLIPTextModel ViT-L/14 text config, AutoencoderKL, DDPM scheduler config; f32 safetensors)
with the real SD1.5 configs, plus a one-image dataset at 512x512.

  make_model.py OUT_DIR
"""

import json
import os
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280), attention_head_dim=8,
    cross_attention_dim=768, norm_num_groups=32, norm_eps=1e-5,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)
SD15_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=512,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, projection_dim=768,
)


def main():
    out = sys.argv[1]
    model = os.path.join(out, "sd15_random")
    torch.manual_seed(0)
    if not os.path.isfile(os.path.join(model, "unet", "diffusion_pytorch_model.safetensors")):
        UNet2DConditionModel(**SD15_UNET).save_pretrained(os.path.join(model, "unet"))
        AutoencoderKL(**SD15_VAE).save_pretrained(os.path.join(model, "vae"))
        CLIPTextModel(CLIPTextConfig(**SD15_TEXT)).save_pretrained(os.path.join(model, "text_encoder"))
        os.makedirs(os.path.join(model, "scheduler"), exist_ok=True)
        with open(os.path.join(model, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump({"_class_name": "DDPMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                       "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                       "prediction_type": "epsilon"}, f)
        with open(os.path.join(model, "model_index.json"), "w") as f:
            json.dump({"_class_name": "StableDiffusionPipeline",
                       "unet": ["diffusers", "UNet2DConditionModel"],
                       "vae": ["diffusers", "AutoencoderKL"],
                       "text_encoder": ["transformers", "CLIPTextModel"],
                       "scheduler": ["diffusers", "DDPMScheduler"]}, f)
    data = os.path.join(out, "data", "1_bench")
    os.makedirs(data, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        px = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
        Image.fromarray(px).save(os.path.join(data, f"img{i}.png"))
        with open(os.path.join(data, f"img{i}.txt"), "w") as f:
            f.write("a photo of a bench, outdoors, wooden")
    print(model)


if __name__ == "__main__":
    main()
