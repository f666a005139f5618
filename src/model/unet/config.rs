//! `UNetConfig`: the fields of a diffusers `unet/config.json` that SD1.x / SD2.x UNets use.
//!
//! Naming quirk kept from diffusers: `attention_head_dim` is the NUMBER OF HEADS per block
//! (diffusers issue 2011: `num_attention_heads = num_attention_heads or attention_head_dim`);
//! the width of one head is `channels / heads`. SD1.x: 8 heads everywhere (40..160 wide);
//! SD2.x: `[5, 10, 20, 20]` heads, 64 wide each. Up blocks use the list reversed, the mid
//! block its last entry.
//!
//! Options this implementation does not have (class / addition embeddings, SDXL's
//! `text_time`, several transformer layers per block, scale-shift time norm, ...) are
//! refused by [`UNetConfig::validate`] with the option named, never silently ignored.

use super::super::{ModelError, Result};
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;

/// An int for every block, or one per block (diffusers accepts both).
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    All(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::All(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }

    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::All(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNetConfig {
    pub sample_size: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Number of heads per down block (see the module docs), an int or a list.
    pub attention_head_dim: PerBlock,
    pub cross_attention_dim: usize,
    /// SD2: Linear `proj_in`/`proj_out` in the transformers instead of 1x1 convs.
    pub use_linear_projection: bool,
    /// Compute attention in f32 when the weights are f16/bf16 (SD2.1 768-v needs it).
    pub upcast_attention: bool,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    /// Every other key of config.json; checked by [`UNetConfig::validate`].
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

impl Default for UNetConfig {
    /// diffusers' `UNet2DConditionModel` defaults.
    fn default() -> Self {
        Self {
            sample_size: 64,
            in_channels: 4,
            out_channels: 4,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            attention_head_dim: PerBlock::All(8),
            cross_attention_dim: 1280,
            use_linear_projection: false,
            upcast_attention: false,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            other: BTreeMap::new(),
        }
    }
}

/// Keys that must hold their diffusers default (JSON null counts as the default too).
const MUST_BE_DEFAULT: &[(&str, &str)] = &[
    ("act_fn", "\"silu\""),
    ("addition_embed_type", "null"),
    ("addition_time_embed_dim", "null"),
    ("attention_type", "\"default\""),
    ("center_input_sample", "false"),
    ("class_embed_type", "null"),
    ("class_embeddings_concat", "false"),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("cross_attention_norm", "null"),
    ("downsample_padding", "1"),
    ("dual_cross_attention", "false"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("mid_block_only_cross_attention", "false"),
    ("mid_block_scale_factor", "1"),
    ("mid_block_type", "\"UNetMidBlock2DCrossAttn\""),
    ("num_attention_heads", "null"),
    ("num_class_embeds", "null"),
    ("only_cross_attention", "false"),
    ("projection_class_embeddings_input_dim", "null"),
    ("resnet_out_scale_factor", "1"),
    ("resnet_skip_time_act", "false"),
    ("resnet_time_scale_shift", "\"default\""),
    ("reverse_transformer_layers_per_block", "null"),
    ("time_cond_proj_dim", "null"),
    ("time_embedding_act_fn", "null"),
    ("time_embedding_dim", "null"),
    ("time_embedding_type", "\"positional\""),
    ("timestep_post_act", "null"),
    ("transformer_layers_per_block", "1"),
];

/// Keys that change nothing at inference or in this trainer (dropout is 0 in every SD config
/// and the trainer does not use it), or that only describe the file.
const IGNORED: &[&str] = &["dropout", "addition_embed_type_num_heads"];

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

impl UNetConfig {
    /// Stable Diffusion 1.x (runwayml/stable-diffusion-v1-5 `unet/config.json`).
    pub fn sd15() -> Self {
        Self {
            sample_size: 64,
            attention_head_dim: PerBlock::All(8),
            cross_attention_dim: 768,
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1 768-v (stabilityai/stable-diffusion-2-1 `unet/config.json`):
    /// 5/10/20/20 heads of 64, OpenCLIP ViT-H context (1024), linear projections, attention
    /// upcast to f32.
    pub fn sd21() -> Self {
        Self {
            sample_size: 96,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            cross_attention_dim: 1024,
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::default()
        }
    }

    /// Parse a diffusers `unet/config.json` and [`validate`](Self::validate) it.
    pub fn from_file(path: &Path) -> Result<Self> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Format {
            file: file.clone(),
            reason: format!("cannot read: {e}"),
        })?;
        Self::from_json(&text, &file)
    }

    /// Parse config.json text; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let cfg: Self = serde_json::from_str(text).map_err(|e| ModelError::Format {
            file: file.to_string(),
            reason: format!("not a UNet config: {e}"),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Number of down blocks (= up blocks).
    pub fn blocks(&self) -> usize {
        self.block_out_channels.len()
    }

    /// Attention heads of down block `i` (up block `j` uses `heads(blocks - 1 - j)`).
    pub fn heads(&self, i: usize) -> usize {
        self.attention_head_dim.get(i)
    }

    /// Width of the timestep embedding (`4 x block_out_channels[0]`).
    pub fn time_embed_dim(&self) -> usize {
        self.block_out_channels[0] * 4
    }

    /// Refuse configurations this implementation does not compute exactly.
    pub fn validate(&self, file: &str) -> Result<()> {
        let bad = |reason: String| {
            Err(ModelError::Format {
                file: file.to_string(),
                reason,
            })
        };
        if self
            .other
            .get("addition_embed_type")
            .and_then(Value::as_str)
            == Some("text_time")
        {
            return bad(
                "SDXL UNet (addition_embed_type text_time) is not supported yet; \
                        sdkit runs SD1.x and SD2.x"
                    .into(),
            );
        }
        for (key, want) in MUST_BE_DEFAULT {
            let Some(v) = self.other.get(*key) else {
                continue;
            };
            let want: Value = serde_json::from_str(want).expect("valid JSON literal");
            if !v.is_null() && !same(v, &want) {
                return bad(format!(
                    "unsupported UNet option {key} = {v} (sdkit supports {want}, as in SD1.x/SD2.x)"
                ));
            }
        }
        for key in self.other.keys() {
            let known = key.starts_with('_')
                || IGNORED.contains(&key.as_str())
                || MUST_BE_DEFAULT.iter().any(|(k, _)| k == key);
            if !known {
                return bad(format!("unknown UNet option `{key}`"));
            }
        }
        if let Some(d) = self.other.get("dropout").and_then(Value::as_f64)
            && d != 0.0
        {
            return bad(format!("unsupported UNet option dropout = {d} (must be 0)"));
        }
        let n = self.blocks();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} down and {} up block types for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if !self.attention_head_dim.len_ok(n) {
            return bad(format!(
                "attention_head_dim needs one entry per block ({n})"
            ));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return bad(format!("unsupported down block type {t}"));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return bad(format!("unsupported up block type {t}"));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            let h = self.heads(i);
            if c == 0 || h == 0 || c % h != 0 {
                return bad(format!(
                    "block {i}: {c} channels do not split into {h} heads"
                ));
            }
            if self.norm_num_groups == 0 || c % self.norm_num_groups != 0 {
                return bad(format!(
                    "block {i}: {c} channels do not split into {} groups",
                    self.norm_num_groups
                ));
            }
        }
        if self.block_out_channels[0] % 2 != 0 {
            return bad("block_out_channels[0] must be even (sinusoidal time embedding)".into());
        }
        if self.layers_per_block == 0 || self.cross_attention_dim == 0 {
            return bad("layers_per_block and cross_attention_dim must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_configs_validate_and_parse_like_diffusers_files() {
        UNetConfig::sd15().validate("sd15").unwrap();
        UNetConfig::sd21().validate("sd21").unwrap();
        // The SD1.5 file as published (diffusers 0.6 era keys).
        let sd15 = r#"{"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0",
            "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "center_input_sample": false, "cross_attention_dim": 768,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
            "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
            "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;
        let c = UNetConfig::from_json(sd15, "x").unwrap();
        assert_eq!(
            UNetConfig {
                other: BTreeMap::new(),
                ..c.clone()
            },
            UNetConfig::sd15()
        );
        let sd21 = r#"{"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
            "use_linear_projection": true, "upcast_attention": true, "sample_size": 96,
            "dual_cross_attention": false, "num_class_embeds": null, "dropout": 0.0}"#;
        let c = UNetConfig::from_json(sd21, "x").unwrap();
        assert_eq!(c.heads(0), 5);
        assert_eq!(c.heads(3), 20);
        assert_eq!(c.block_out_channels[2] / c.heads(2), 64);
    }

    #[test]
    fn unsupported_options_are_named() {
        let err = |j: &str| {
            UNetConfig::from_json(j, "unet/config.json")
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"addition_embed_type": "text_time"}"#).contains("SDXL"));
        assert!(
            err(r#"{"transformer_layers_per_block": [1, 2, 10]}"#)
                .contains("transformer_layers_per_block")
        );
        assert!(err(r#"{"class_embed_type": "timestep"}"#).contains("class_embed_type"));
        assert!(err(r#"{"some_new_option": 3}"#).contains("some_new_option"));
        assert!(err(r#"{"attention_head_dim": [5, 10]}"#).contains("attention_head_dim"));
        assert!(err(r#"{"attention_head_dim": 7}"#).contains("heads"));
        assert!(err(r#"{"block_out_channels": "x"}"#).starts_with("unet/config.json: "));
    }
}
