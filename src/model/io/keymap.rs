//! Every rename between single-file LDM checkpoints (CompVis / webui layout) and the
//! diffusers / Hugging Face names the model code uses, in one place.
//!
//! Follows diffusers' `loaders/single_file_utils.py` (`convert_ldm_unet_checkpoint`,
//! `convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`,
//! `convert_open_clip_checkpoint`); ../shared/reference/formats.md summarises it.
//! The functions map one key (without its component prefix) and return `None` for a key
//! they do not know, so the loader can name it.

/// Component prefixes of a single-file checkpoint.
pub const LDM_UNET: &str = "model.diffusion_model.";
pub const LDM_VAE: &str = "first_stage_model.";
pub const LDM_CLIP_SD1: &str = "cond_stage_model.transformer.";
pub const LDM_CLIP_SD2: &str = "cond_stage_model.model.";
pub const LDM_SDXL: &str = "conditioner.embedders.";

/// Tensors a single-file checkpoint may carry that no component uses: the training
/// schedule buffers, EMA copies, OpenCLIP's projection head.
const IGNORED_PREFIXES: &[&str] = &[
    "model_ema.",
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_",
    "logvar",
    "model.diffusion_model.label_emb", // never in SD1/SD2 text-to-image
    "cond_stage_model.model.text_projection",
    "cond_stage_model.model.logit_scale",
    "cond_stage_model.transformer.text_model.embeddings.position_ids",
    "cond_stage_model.transformer.embeddings.position_ids",
    "first_stage_model.loss.",
    "lora_",
];

/// A top-level key nothing loads (see [`IGNORED_PREFIXES`]).
pub fn ignored(key: &str) -> bool {
    IGNORED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// ResnetBlock renames inside `input_blocks.i.0` / `middle_block.{0,2}` / `output_blocks.i.0`.
const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];

/// Whole-module renames outside the blocks.
const UNET_TOP: &[(&str, &str)] = &[
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
];

fn rename(rest: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(from).map(|t| format!("{to}{t}")))
}

/// Split `a.b.rest` into (a, b, rest) with a and b numbers.
fn two_indices(s: &str) -> Option<(usize, usize, &str)> {
    let (a, s) = s.split_once('.')?;
    let (b, rest) = s.split_once('.')?;
    Some((a.parse().ok()?, b.parse().ok()?, rest))
}

/// LDM UNet key (without `model.diffusion_model.`) to its diffusers name.
/// `layers_per_block` is 2 for SD (3 input blocks per level, the last one a downsampler).
pub fn unet_from_ldm(key: &str, layers_per_block: usize) -> Option<String> {
    if let Some(n) = rename(key, UNET_TOP) {
        return Some(n);
    }
    let per = layers_per_block + 1;
    if let Some(s) = key.strip_prefix("input_blocks.") {
        let (i, part, rest) = two_indices(s)?;
        let (b, l) = ((i.checked_sub(1)?) / per, (i - 1) % per);
        return match part {
            0 => match rest.strip_prefix("op.") {
                Some(t) => Some(format!("down_blocks.{b}.downsamplers.0.conv.{t}")),
                None => Some(format!(
                    "down_blocks.{b}.resnets.{l}.{}",
                    rename(rest, UNET_RESNET)?
                )),
            },
            1 => Some(format!("down_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = key.strip_prefix("middle_block.") {
        let (i, rest) = s.split_once('.')?;
        return match i {
            "0" | "2" => Some(format!(
                "mid_block.resnets.{}.{}",
                if i == "0" { 0 } else { 1 },
                rename(rest, UNET_RESNET)?
            )),
            "1" => Some(format!("mid_block.attentions.0.{rest}")),
            _ => None,
        };
    }
    if let Some(s) = key.strip_prefix("output_blocks.") {
        let (i, part, rest) = two_indices(s)?;
        let (b, l) = (i / per, i % per);
        // `.1.conv` (no attention in the block) or `.2.conv` is the upsampler
        if let Some(t) = rest.strip_prefix("conv.").filter(|_| part >= 1) {
            return Some(format!("up_blocks.{b}.upsamplers.0.conv.{t}"));
        }
        return match part {
            0 => Some(format!(
                "up_blocks.{b}.resnets.{l}.{}",
                rename(rest, UNET_RESNET)?
            )),
            1 => Some(format!("up_blocks.{b}.attentions.{l}.{rest}")),
            _ => None,
        };
    }
    None
}

/// Layers per block of an LDM UNet, from its key names: the first downsampler sits at
/// `input_blocks.{layers + 1}.0.op`.
pub fn ldm_unet_layers_per_block<'a>(keys: impl Iterator<Item = &'a str>) -> Option<usize> {
    let mut first_op = None;
    let mut inputs = 0;
    for k in keys {
        let Some(s) = k.strip_prefix("input_blocks.") else {
            continue;
        };
        let Some((i, rest)) = s.split_once('.') else {
            continue;
        };
        let Ok(i) = i.parse::<usize>() else { continue };
        inputs = inputs.max(i);
        if rest.starts_with("0.op.") {
            first_op = Some(first_op.map_or(i, |f: usize| f.min(i)));
        }
    }
    match first_op {
        Some(i) => i.checked_sub(1),
        None if inputs > 0 => Some(inputs),
        None => None,
    }
}

/// VAE mid-block attention renames (LDM `mid.attn_1.*`, and the pre-0.14 diffusers
/// names that old folders still carry).
const VAE_ATTENTION: &[(&str, &str)] = &[
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
    ("query.", "to_q."),
    ("key.", "to_k."),
    ("value.", "to_v."),
    ("proj_attn.", "to_out.0."),
];

/// LDM VAE key (without `first_stage_model.`) to its diffusers name. `n_blocks` is the
/// number of resolution levels (4 for SD): LDM numbers decoder levels bottom-up.
pub fn vae_from_ldm(key: &str, n_blocks: usize) -> Option<String> {
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| key.to_string());
    }
    let body = if let Some(s) = rest.strip_prefix("down.") {
        let (i, rest) = s.split_once('.')?;
        let i: usize = i.parse().ok()?;
        if let Some(t) = rest.strip_prefix("downsample.conv.") {
            format!("down_blocks.{i}.downsamplers.0.conv.{t}")
        } else {
            let (j, t) = rest.strip_prefix("block.")?.split_once('.')?;
            format!("down_blocks.{i}.resnets.{j}.{}", resnet_vae(t))
        }
    } else if let Some(s) = rest.strip_prefix("up.") {
        let (i, rest) = s.split_once('.')?;
        let u = n_blocks.checked_sub(1 + i.parse::<usize>().ok()?)?;
        if let Some(t) = rest.strip_prefix("upsample.conv.") {
            format!("up_blocks.{u}.upsamplers.0.conv.{t}")
        } else {
            let (j, t) = rest.strip_prefix("block.")?.split_once('.')?;
            format!("up_blocks.{u}.resnets.{j}.{}", resnet_vae(t))
        }
    } else if let Some(t) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", resnet_vae(t))
    } else if let Some(t) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", resnet_vae(t))
    } else if let Some(t) = rest.strip_prefix("mid.attn_1.") {
        format!("mid_block.attentions.0.{}", rename(t, VAE_ATTENTION)?)
    } else if let Some(t) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{t}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else {
        return None;
    };
    Some(format!("{side}.{body}"))
}

fn resnet_vae(t: &str) -> String {
    match t.strip_prefix("nin_shortcut.") {
        Some(s) => format!("conv_shortcut.{s}"),
        None => t.to_string(),
    }
}

/// Old diffusers VAE attention names (`query`, `key`, `value`, `proj_attn`) to today's.
pub fn vae_legacy_attention(key: &str) -> Option<String> {
    let (head, tail) = key.split_once("mid_block.attentions.0.")?;
    let t = rename(tail, &VAE_ATTENTION[5..])?;
    Some(format!("{head}mid_block.attentions.0.{t}"))
}

/// SD1 CLIP key (without `cond_stage_model.transformer.`) to the HF name. Old checkpoints
/// lack the `text_model.` level (webui's `checkpoint_dict_replacements_sd1`).
pub fn clip_from_ldm(key: &str) -> Option<String> {
    if key.starts_with("text_model.") {
        return Some(key.to_string());
    }
    ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| key.starts_with(p))
        .then(|| format!("text_model.{key}"))
}

// --- diffusers / HF names back to LDM (writing single-file checkpoints) -------------

/// Inverse of a rename table.
fn unrename(rest: &str, table: &[(&str, &str)]) -> Option<String> {
    table
        .iter()
        .find_map(|(from, to)| rest.strip_prefix(to).map(|t| format!("{from}{t}")))
}

/// Split `a.rest` into (a, rest) with a a number.
fn one_index(s: &str) -> Option<(usize, &str)> {
    let (a, rest) = s.split_once('.')?;
    Some((a.parse().ok()?, rest))
}

/// diffusers UNet key to its LDM name (without `model.diffusion_model.`): the inverse of
/// [`unet_from_ldm`]. `up_attention[b]` tells whether up block `b` has attentions (its
/// upsampler is then the block's third module, `.2.conv`).
pub fn unet_to_ldm(key: &str, layers_per_block: usize, up_attention: &[bool]) -> Option<String> {
    if let Some(n) = unrename(key, UNET_TOP) {
        return Some(n);
    }
    let per = layers_per_block + 1;
    if let Some(s) = key.strip_prefix("down_blocks.") {
        let (b, rest) = one_index(s)?;
        if let Some(t) = rest.strip_prefix("downsamplers.0.conv.") {
            return Some(format!(
                "input_blocks.{}.0.op.{t}",
                1 + b * per + layers_per_block
            ));
        }
        if let Some(r) = rest.strip_prefix("resnets.") {
            let (l, t) = one_index(r)?;
            return Some(format!(
                "input_blocks.{}.0.{}",
                1 + b * per + l,
                unrename(t, UNET_RESNET)?
            ));
        }
        let (l, t) = one_index(rest.strip_prefix("attentions.")?)?;
        return Some(format!("input_blocks.{}.1.{t}", 1 + b * per + l));
    }
    if let Some(s) = key.strip_prefix("mid_block.") {
        if let Some(r) = s.strip_prefix("resnets.") {
            let (l, t) = one_index(r)?;
            let i = match l {
                0 => 0,
                1 => 2,
                _ => return None,
            };
            return Some(format!("middle_block.{i}.{}", unrename(t, UNET_RESNET)?));
        }
        let t = s.strip_prefix("attentions.0.")?;
        return Some(format!("middle_block.1.{t}"));
    }
    if let Some(s) = key.strip_prefix("up_blocks.") {
        let (b, rest) = one_index(s)?;
        if let Some(t) = rest.strip_prefix("upsamplers.0.conv.") {
            let part = if *up_attention.get(b)? { 2 } else { 1 };
            return Some(format!(
                "output_blocks.{}.{part}.conv.{t}",
                b * per + per - 1
            ));
        }
        if let Some(r) = rest.strip_prefix("resnets.") {
            let (l, t) = one_index(r)?;
            return Some(format!(
                "output_blocks.{}.0.{}",
                b * per + l,
                unrename(t, UNET_RESNET)?
            ));
        }
        let (l, t) = one_index(rest.strip_prefix("attentions.")?)?;
        return Some(format!("output_blocks.{}.1.{t}", b * per + l));
    }
    None
}

/// diffusers VAE key to its LDM name (without `first_stage_model.`): the inverse of
/// [`vae_from_ldm`]. The mid-block attention weights must also go back to LDM's 1x1 conv
/// shape ([`vae_ldm_is_conv1x1`]).
pub fn vae_to_ldm(key: &str, n_blocks: usize) -> Option<String> {
    let (side, rest) = key.split_once('.')?;
    if !matches!(side, "encoder" | "decoder") {
        return matches!(side, "quant_conv" | "post_quant_conv").then(|| key.to_string());
    }
    let resnet = |t: &str| match t.strip_prefix("conv_shortcut.") {
        Some(s) => format!("nin_shortcut.{s}"),
        None => t.to_string(),
    };
    let body = if let Some(s) = rest.strip_prefix("down_blocks.") {
        let (i, rest) = one_index(s)?;
        if let Some(t) = rest.strip_prefix("downsamplers.0.conv.") {
            format!("down.{i}.downsample.conv.{t}")
        } else {
            let (j, t) = one_index(rest.strip_prefix("resnets.")?)?;
            format!("down.{i}.block.{j}.{}", resnet(t))
        }
    } else if let Some(s) = rest.strip_prefix("up_blocks.") {
        let (u, rest) = one_index(s)?;
        let i = n_blocks.checked_sub(1 + u)?;
        if let Some(t) = rest.strip_prefix("upsamplers.0.conv.") {
            format!("up.{i}.upsample.conv.{t}")
        } else {
            let (j, t) = one_index(rest.strip_prefix("resnets.")?)?;
            format!("up.{i}.block.{j}.{}", resnet(t))
        }
    } else if let Some(t) = rest.strip_prefix("mid_block.resnets.0.") {
        format!("mid.block_1.{}", resnet(t))
    } else if let Some(t) = rest.strip_prefix("mid_block.resnets.1.") {
        format!("mid.block_2.{}", resnet(t))
    } else if let Some(t) = rest.strip_prefix("mid_block.attentions.0.") {
        format!("mid.attn_1.{}", unrename(t, &VAE_ATTENTION[..5])?)
    } else if let Some(t) = rest.strip_prefix("conv_norm_out.") {
        format!("norm_out.{t}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else {
        return None;
    };
    Some(format!("{side}.{body}"))
}

/// An LDM VAE key whose weight LDM stores as a 1x1 conv (the mid-block attention's
/// q / k / v / proj_out), which diffusers keeps as a linear weight.
pub fn vae_ldm_is_conv1x1(ldm_key: &str) -> bool {
    ldm_key.contains("mid.attn_1.")
        && ["q.weight", "k.weight", "v.weight", "proj_out.weight"]
            .iter()
            .any(|s| ldm_key.ends_with(&format!(".{s}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_names_follow_diffusers() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.proj_in.weight",
                "down_blocks.0.attentions.1.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.11.0.out_layers.3.weight",
                "down_blocks.3.resnets.1.conv2.weight",
            ),
            (
                "middle_block.0.emb_layers.1.weight",
                "mid_block.resnets.0.time_emb_proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.in_layers.2.bias",
                "mid_block.resnets.1.conv1.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.skip_connection.weight",
                "up_blocks.3.resnets.2.conv_shortcut.weight",
            ),
            ("out.0.weight", "conv_norm_out.weight"),
            ("out.2.bias", "conv_out.bias"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_from_ldm(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_from_ldm("input_blocks.1.0.mystery.weight", 2), None);
        assert_eq!(unet_from_ldm("joint_blocks.0.x", 2), None);
    }

    #[test]
    fn vae_names_follow_diffusers() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "encoder.mid.block_2.norm1.bias",
                "encoder.mid_block.resnets.1.norm1.bias",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "decoder.mid.attn_1.norm.bias",
                "decoder.mid_block.attentions.0.group_norm.bias",
            ),
            (
                "decoder.mid.attn_1.q.weight",
                "decoder.mid_block.attentions.0.to_q.weight",
            ),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("decoder.conv_out.bias", "decoder.conv_out.bias"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(vae_from_ldm(ldm, 4).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(vae_from_ldm("decoder.up.4.block.0.conv1.weight", 4), None);
        assert_eq!(
            vae_legacy_attention("decoder.mid_block.attentions.0.proj_attn.bias").as_deref(),
            Some("decoder.mid_block.attentions.0.to_out.0.bias")
        );
    }

    #[test]
    fn layers_per_block_from_names() {
        let keys = [
            "input_blocks.1.0.x",
            "input_blocks.3.0.op.weight",
            "input_blocks.6.0.op.bias",
        ];
        assert_eq!(ldm_unet_layers_per_block(keys.into_iter()), Some(2));
        let keys = ["input_blocks.2.0.op.weight", "input_blocks.4.0.op.weight"];
        assert_eq!(ldm_unet_layers_per_block(keys.into_iter()), Some(1));
        assert_eq!(
            clip_from_ldm("encoder.layers.0.mlp.fc1.weight").as_deref(),
            Some("text_model.encoder.layers.0.mlp.fc1.weight")
        );
    }

    /// Every key of the SD1.5 / SD2.1 UNets and VAE maps back to the LDM name it came
    /// from (the real key lists, tests/fixtures/checkpoint/real_keys.json.gz, are checked
    /// in tests/loader.rs; here the inverse of each forward case).
    #[test]
    fn ldm_names_round_trip() {
        let per_up = [false, true, true, true];
        for ldm in [
            "time_embed.2.bias",
            "input_blocks.0.0.weight",
            "input_blocks.2.1.proj_in.weight",
            "input_blocks.3.0.op.weight",
            "input_blocks.4.0.skip_connection.bias",
            "input_blocks.11.0.out_layers.3.weight",
            "middle_block.0.emb_layers.1.weight",
            "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
            "middle_block.2.in_layers.2.bias",
            "output_blocks.2.1.conv.weight",
            "output_blocks.5.2.conv.bias",
            "output_blocks.5.1.norm.weight",
            "output_blocks.11.0.skip_connection.weight",
            "out.2.bias",
        ] {
            let d = unet_from_ldm(ldm, 2).unwrap();
            assert_eq!(unet_to_ldm(&d, 2, &per_up).as_deref(), Some(ldm), "{d}");
        }
        for ldm in [
            "encoder.down.1.block.0.nin_shortcut.weight",
            "encoder.down.0.downsample.conv.bias",
            "decoder.up.3.block.2.conv1.weight",
            "decoder.up.1.upsample.conv.weight",
            "encoder.mid.block_2.norm1.bias",
            "decoder.mid.attn_1.proj_out.weight",
            "decoder.mid.attn_1.norm.bias",
            "decoder.mid.attn_1.q.weight",
            "encoder.norm_out.weight",
            "decoder.conv_out.bias",
            "post_quant_conv.weight",
        ] {
            let d = vae_from_ldm(ldm, 4).unwrap();
            assert_eq!(vae_to_ldm(&d, 4).as_deref(), Some(ldm), "{d}");
        }
        assert!(vae_ldm_is_conv1x1("decoder.mid.attn_1.q.weight"));
        assert!(!vae_ldm_is_conv1x1("decoder.mid.attn_1.q.bias"));
        assert_eq!(
            unet_to_ldm("down_blocks.0.mystery.weight", 2, &per_up),
            None
        );
    }
}
