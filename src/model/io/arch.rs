//! Which Stable Diffusion a checkpoint holds, and the shapes of its parts.
//!
//! Single-file checkpoints carry no config: the family comes from the key prefixes
//! (`cond_stage_model.transformer.` = SD1 CLIP ViT-L, `cond_stage_model.model.` = SD2
//! OpenCLIP ViT-H, `conditioner.embedders.` = SDXL, refused for now) and the UNet / VAE
//! configs from tensor shapes (channels, layers per block, context width, conv or linear
//! proj_in). What shapes cannot tell, the attention heads, follows the SD configs: SD1 has
//! 8 heads everywhere, SD2 64-wide heads; a sidecar LDM `.yaml` (as webui reads it) wins.
//!
//! [`unet_keys`], [`vae_keys`] and [`text_keys`] list every diffusers / HF parameter a
//! config implies, with its shape, so a loader names all missing and unexpected tensors at
//! once instead of failing on the first.

use super::weights::Weights;
use crate::model::clip::ClipKind;
use crate::model::{ModelError, Result};

/// Stable Diffusion family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Arch {
    /// SD 1.x: CLIP ViT-L/14 (768), conv proj_in/out, 8 heads.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H/14 (1024, penultimate layer), linear proj, 64-wide heads.
    Sd2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Sd1 => "SD1",
            Arch::Sd2 => "SD2",
        }
    }

    pub fn clip_kind(self) -> ClipKind {
        match self {
            Arch::Sd1 => ClipKind::Sd1,
            Arch::Sd2 => ClipKind::Sd2,
        }
    }
}

/// What the UNet predicts: one type shared with the schedule and samplers.
pub use crate::model::schedule::Prediction;

/// UNet2DConditionModel hyper-parameters (diffusers names).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct UNetParams {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Per down block: CrossAttnDownBlock2D (true) or DownBlock2D; up blocks mirror it.
    pub cross_attention: Vec<bool>,
    pub transformer_layers: usize,
    pub cross_attention_dim: usize,
    /// Attention heads per down block (up blocks mirror, mid uses the last).
    pub heads: Vec<usize>,
    pub use_linear_projection: bool,
    pub norm_groups: usize,
}

impl UNetParams {
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }
}

/// AutoencoderKL hyper-parameters.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VaeParams {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub norm_groups: usize,
    pub scaling_factor: f64,
}

impl VaeParams {
    /// Pixels per latent cell (8 for SD).
    pub fn scale_factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Text encoder hyper-parameters (the rest is read from shapes by `ClipTextModel`).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TextParams {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub max_positions: usize,
}

/// Heads per block as the SD configs set them: SD1 8 heads, SD2 64-wide heads.
pub fn default_heads(arch: Arch, channels: &[usize]) -> Vec<usize> {
    match arch {
        Arch::Sd1 => vec![8; channels.len()],
        Arch::Sd2 => channels.iter().map(|c| (c / 64).max(1)).collect(),
    }
}

fn err(w: &Weights, reason: String) -> ModelError {
    ModelError::Format {
        file: w.source.clone(),
        reason,
    }
}

fn dim(w: &Weights, key: &str, i: usize) -> Result<usize> {
    let s = w.shape_of(key)?;
    s.get(i).copied().ok_or_else(|| {
        err(
            w,
            format!("tensor `{key}` has shape {s:?}, expected rank > {i}"),
        )
    })
}

/// Largest `N + 1` over keys `{prefix}N.…`.
pub fn count_indexed(w: &Weights, prefix: &str) -> usize {
    w.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

/// Read a UNet config from diffusers-named tensors.
pub fn infer_unet(w: &Weights, heads: Option<Vec<usize>>, arch: Arch) -> Result<UNetParams> {
    let n = count_indexed(w, "down_blocks.");
    if n == 0 {
        return Err(err(w, "no UNet down_blocks found".into()));
    }
    let block_out_channels = (0..n)
        .map(|b| dim(w, &format!("down_blocks.{b}.resnets.0.conv1.weight"), 0))
        .collect::<Result<Vec<_>>>()?;
    let cross_attention: Vec<bool> = (0..n)
        .map(|b| w.contains(&format!("down_blocks.{b}.attentions.0.norm.weight")))
        .collect();
    let first = format!(
        "{}.attentions.0.",
        match cross_attention.iter().position(|&a| a) {
            Some(b) => format!("down_blocks.{b}"),
            None => "mid_block".into(),
        }
    );
    // conv (4-D) or linear (2-D) projections; any one tells, so a missing one is reported
    // by the key check rather than here
    let use_linear_projection = w
        .keys()
        .find(|k| k.ends_with(".proj_in.weight") || k.ends_with(".proj_out.weight"))
        .map(|k| w.shape_of(k).map(|s| s.len() == 2))
        .transpose()?
        .unwrap_or(false);
    let heads = heads.unwrap_or_else(|| default_heads(arch, &block_out_channels));
    if heads.len() != n || heads.contains(&0) {
        return Err(err(
            w,
            format!("bad attention heads {heads:?} for {n} blocks"),
        ));
    }
    Ok(UNetParams {
        in_channels: dim(w, "conv_in.weight", 1)?,
        out_channels: dim(w, "conv_out.weight", 0)?,
        layers_per_block: count_indexed(w, "down_blocks.0.resnets."),
        transformer_layers: count_indexed(w, &format!("{first}transformer_blocks.")),
        cross_attention_dim: dim(
            w,
            &format!("{first}transformer_blocks.0.attn2.to_k.weight"),
            1,
        )?,
        use_linear_projection,
        heads,
        block_out_channels,
        cross_attention,
        norm_groups: 32,
    })
}

/// Read a VAE config from diffusers-named tensors.
pub fn infer_vae(w: &Weights, scaling_factor: f64) -> Result<VaeParams> {
    let n = count_indexed(w, "encoder.down_blocks.");
    if n == 0 {
        return Err(err(w, "no VAE encoder.down_blocks found".into()));
    }
    let block_out_channels = (0..n)
        .map(|b| {
            dim(
                w,
                &format!("encoder.down_blocks.{b}.resnets.0.conv2.weight"),
                0,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(VaeParams {
        in_channels: dim(w, "encoder.conv_in.weight", 1)?,
        out_channels: dim(w, "decoder.conv_out.weight", 0)?,
        layers_per_block: count_indexed(w, "encoder.down_blocks.0.resnets."),
        latent_channels: dim(w, "decoder.conv_in.weight", 1)?,
        block_out_channels,
        norm_groups: 32,
        scaling_factor,
    })
}

/// Read a text-encoder config from HF-named tensors (`text_model.…`).
pub fn infer_text(w: &Weights, heads: Option<usize>) -> Result<TextParams> {
    let p = "text_model.";
    let tok = w.shape_of(&format!("{p}embeddings.token_embedding.weight"))?;
    let width = tok[1];
    Ok(TextParams {
        width,
        vocab: tok[0],
        layers: count_indexed(w, &format!("{p}encoder.layers.")),
        heads: heads.unwrap_or((width / 64).max(1)),
        intermediate: dim(w, &format!("{p}encoder.layers.0.mlp.fc1.weight"), 0)?,
        max_positions: dim(w, &format!("{p}embeddings.position_embedding.weight"), 0)?,
    })
}

type Keys = Vec<(String, Vec<usize>)>;

fn push_norm(out: &mut Keys, p: &str, c: usize) {
    out.push((format!("{p}.weight"), vec![c]));
    out.push((format!("{p}.bias"), vec![c]));
}

fn push_conv(out: &mut Keys, p: &str, i: usize, o: usize, k: usize) {
    out.push((format!("{p}.weight"), vec![o, i, k, k]));
    out.push((format!("{p}.bias"), vec![o]));
}

fn push_linear(out: &mut Keys, p: &str, i: usize, o: usize, bias: bool) {
    out.push((format!("{p}.weight"), vec![o, i]));
    if bias {
        out.push((format!("{p}.bias"), vec![o]));
    }
}

/// ResnetBlock2D: norm1, conv1, (time_emb_proj), norm2, conv2, (conv_shortcut).
fn push_resnet(out: &mut Keys, p: &str, i: usize, o: usize, temb: Option<usize>) {
    push_norm(out, &format!("{p}.norm1"), i);
    push_conv(out, &format!("{p}.conv1"), i, o, 3);
    if let Some(t) = temb {
        push_linear(out, &format!("{p}.time_emb_proj"), t, o, true);
    }
    push_norm(out, &format!("{p}.norm2"), o);
    push_conv(out, &format!("{p}.conv2"), o, o, 3);
    if i != o {
        push_conv(out, &format!("{p}.conv_shortcut"), i, o, 1);
    }
}

/// Transformer2DModel with `depth` BasicTransformerBlocks (GEGLU feed-forward).
fn push_transformer(out: &mut Keys, p: &str, c: usize, u: &UNetParams) {
    push_norm(out, &format!("{p}.norm"), c);
    for name in ["proj_in", "proj_out"] {
        if u.use_linear_projection {
            push_linear(out, &format!("{p}.{name}"), c, c, true);
        } else {
            push_conv(out, &format!("{p}.{name}"), c, c, 1);
        }
    }
    for t in 0..u.transformer_layers {
        let b = format!("{p}.transformer_blocks.{t}");
        for (attn, kv) in [("attn1", c), ("attn2", u.cross_attention_dim)] {
            push_linear(out, &format!("{b}.{attn}.to_q"), c, c, false);
            push_linear(out, &format!("{b}.{attn}.to_k"), kv, c, false);
            push_linear(out, &format!("{b}.{attn}.to_v"), kv, c, false);
            push_linear(out, &format!("{b}.{attn}.to_out.0"), c, c, true);
        }
        for n in ["norm1", "norm2", "norm3"] {
            push_norm(out, &format!("{b}.{n}"), c);
        }
        push_linear(out, &format!("{b}.ff.net.0.proj"), c, 8 * c, true);
        push_linear(out, &format!("{b}.ff.net.2"), 4 * c, c, true);
    }
}

/// Every UNet parameter (diffusers names) with its shape.
pub fn unet_keys(u: &UNetParams) -> Keys {
    let mut out = Vec::new();
    let ch = &u.block_out_channels;
    let n = ch.len();
    let temb = u.time_embed_dim();
    push_conv(&mut out, "conv_in", u.in_channels, ch[0], 3);
    push_linear(&mut out, "time_embedding.linear_1", ch[0], temb, true);
    push_linear(&mut out, "time_embedding.linear_2", temb, temb, true);
    for b in 0..n {
        let o = ch[b];
        for l in 0..u.layers_per_block {
            let i = if l > 0 {
                o
            } else if b > 0 {
                ch[b - 1]
            } else {
                ch[0]
            };
            push_resnet(
                &mut out,
                &format!("down_blocks.{b}.resnets.{l}"),
                i,
                o,
                Some(temb),
            );
            if u.cross_attention[b] {
                push_transformer(&mut out, &format!("down_blocks.{b}.attentions.{l}"), o, u);
            }
        }
        if b + 1 < n {
            push_conv(
                &mut out,
                &format!("down_blocks.{b}.downsamplers.0.conv"),
                o,
                o,
                3,
            );
        }
    }
    let last = ch[n - 1];
    push_resnet(&mut out, "mid_block.resnets.0", last, last, Some(temb));
    push_transformer(&mut out, "mid_block.attentions.0", last, u);
    push_resnet(&mut out, "mid_block.resnets.1", last, last, Some(temb));
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut o = rev[0];
    for (ub, &out_ch) in rev.iter().enumerate() {
        let prev = o;
        o = out_ch;
        let input = rev[(ub + 1).min(n - 1)];
        for j in 0..=u.layers_per_block {
            let skip = if j == u.layers_per_block { input } else { o };
            let res_in = if j == 0 { prev } else { o };
            let p = format!("up_blocks.{ub}.resnets.{j}");
            push_resnet(&mut out, &p, res_in + skip, o, Some(temb));
            if u.cross_attention[n - 1 - ub] {
                push_transformer(&mut out, &format!("up_blocks.{ub}.attentions.{j}"), o, u);
            }
        }
        if ub + 1 < n {
            push_conv(
                &mut out,
                &format!("up_blocks.{ub}.upsamplers.0.conv"),
                o,
                o,
                3,
            );
        }
    }
    push_norm(&mut out, "conv_norm_out", ch[0]);
    push_conv(&mut out, "conv_out", ch[0], u.out_channels, 3);
    out
}

fn push_vae_mid(out: &mut Keys, p: &str, c: usize) {
    push_resnet(out, &format!("{p}.resnets.0"), c, c, None);
    let a = format!("{p}.attentions.0");
    push_norm(out, &format!("{a}.group_norm"), c);
    for q in ["to_q", "to_k", "to_v", "to_out.0"] {
        push_linear(out, &format!("{a}.{q}"), c, c, true);
    }
    push_resnet(out, &format!("{p}.resnets.1"), c, c, None);
}

/// Every VAE parameter (diffusers names) with its shape.
pub fn vae_keys(v: &VaeParams) -> Keys {
    let mut out = Vec::new();
    let ch = &v.block_out_channels;
    let n = ch.len();
    let (lat, last) = (v.latent_channels, ch[n - 1]);
    push_conv(&mut out, "encoder.conv_in", v.in_channels, ch[0], 3);
    for b in 0..n {
        for l in 0..v.layers_per_block {
            let i = if l > 0 {
                ch[b]
            } else if b > 0 {
                ch[b - 1]
            } else {
                ch[0]
            };
            let p = format!("encoder.down_blocks.{b}.resnets.{l}");
            push_resnet(&mut out, &p, i, ch[b], None);
        }
        if b + 1 < n {
            let p = format!("encoder.down_blocks.{b}.downsamplers.0.conv");
            push_conv(&mut out, &p, ch[b], ch[b], 3);
        }
    }
    push_vae_mid(&mut out, "encoder.mid_block", last);
    push_norm(&mut out, "encoder.conv_norm_out", last);
    push_conv(&mut out, "encoder.conv_out", last, 2 * lat, 3);
    push_conv(&mut out, "quant_conv", 2 * lat, 2 * lat, 1);
    push_conv(&mut out, "post_quant_conv", lat, lat, 1);
    push_conv(&mut out, "decoder.conv_in", lat, last, 3);
    push_vae_mid(&mut out, "decoder.mid_block", last);
    let rev: Vec<usize> = ch.iter().rev().copied().collect();
    let mut o = rev[0];
    for (ub, &out_ch) in rev.iter().enumerate() {
        let prev = o;
        o = out_ch;
        for j in 0..=v.layers_per_block {
            let i = if j == 0 { prev } else { o };
            let p = format!("decoder.up_blocks.{ub}.resnets.{j}");
            push_resnet(&mut out, &p, i, o, None);
        }
        if ub + 1 < n {
            let p = format!("decoder.up_blocks.{ub}.upsamplers.0.conv");
            push_conv(&mut out, &p, o, o, 3);
        }
    }
    push_norm(&mut out, "decoder.conv_norm_out", ch[0]);
    push_conv(&mut out, "decoder.conv_out", ch[0], v.out_channels, 3);
    out
}

/// Every text-encoder parameter (HF names) with its shape.
pub fn text_keys(t: &TextParams) -> Keys {
    let mut out = Vec::new();
    let (w, p) = (t.width, "text_model");
    out.push((
        format!("{p}.embeddings.token_embedding.weight"),
        vec![t.vocab, w],
    ));
    out.push((
        format!("{p}.embeddings.position_embedding.weight"),
        vec![t.max_positions, w],
    ));
    for i in 0..t.layers {
        let l = format!("{p}.encoder.layers.{i}");
        for q in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            push_linear(&mut out, &format!("{l}.self_attn.{q}"), w, w, true);
        }
        push_norm(&mut out, &format!("{l}.layer_norm1"), w);
        push_norm(&mut out, &format!("{l}.layer_norm2"), w);
        push_linear(&mut out, &format!("{l}.mlp.fc1"), w, t.intermediate, true);
        push_linear(&mut out, &format!("{l}.mlp.fc2"), t.intermediate, w, true);
    }
    push_norm(&mut out, &format!("{p}.final_layer_norm"), w);
    out
}

/// Compare a component's tensors with the keys its config implies: one error naming the
/// first few missing, unexpected and mis-shaped tensors with their counts.
pub fn check_keys(w: &Weights, what: &str, expected: &Keys) -> Result<()> {
    let want: std::collections::HashMap<&str, &Vec<usize>> =
        expected.iter().map(|(k, s)| (k.as_str(), s)).collect();
    let mut missing: Vec<&str> = want.keys().copied().filter(|k| !w.contains(k)).collect();
    let mut unexpected: Vec<&String> = w
        .keys()
        .filter(|k| !want.contains_key(k.as_str()))
        .collect();
    let mut shapes: Vec<String> = Vec::new();
    for (k, s) in expected {
        if let Ok(found) = w.shape_of(k) {
            if &found != s {
                shapes.push(format!("{k} {found:?} (expected {s:?})"));
            }
        }
    }
    if missing.is_empty() && unexpected.is_empty() && shapes.is_empty() {
        return Ok(());
    }
    missing.sort();
    unexpected.sort();
    shapes.sort();
    let list = |v: Vec<String>| -> String {
        let n = v.len();
        let mut s = v.into_iter().take(4).collect::<Vec<_>>().join(", ");
        if n > 4 {
            s.push_str(&format!(" … ({} more)", n - 4));
        }
        s
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        let n = missing.len();
        parts.push(format!(
            "{n} missing: {}",
            list(missing.into_iter().map(String::from).collect())
        ));
    }
    if !unexpected.is_empty() {
        let n = unexpected.len();
        parts.push(format!(
            "{n} unexpected: {}",
            list(unexpected.into_iter().cloned().collect())
        ));
    }
    if !shapes.is_empty() {
        parts.push(format!(
            "{} with wrong shape: {}",
            shapes.len(),
            list(shapes)
        ));
    }
    Err(err(
        w,
        format!(
            "{what} tensors do not match its config: {}",
            parts.join("; ")
        ),
    ))
}
