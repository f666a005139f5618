//! `UNet2DConditionModel` for SD1.x / SD2.x, with diffusers' module and parameter paths
//! (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, ...) so adapter
//! keys map one to one. Every Linear / Conv2d is the project's layer (`nn`), with its
//! low-rank slot; norms and softmax are differentiable; attention is tiled
//! ([`crate::model::attention`]) so heads x L x L is never held.
//!
//! Dtypes: the compute dtype is the weights' dtype ([`Weights::dtype`]); inputs are cast to
//! it, the output comes back in it. Group norms compute their statistics in f32; with
//! `upcast_attention` the attention runs in f32 for f16/bf16 weights.
//!
//! Hypernetworks: [`UNet2DConditionModel::hooks`] holds context transforms by width
//! ([`ContextHooks`]); see [`hooks`] for where they apply.

pub mod blocks;
pub mod config;
pub mod embeddings;
pub mod hooks;
pub mod resnet;
pub mod transformer;

use super::nn::{Conv2d, GroupNorm};
use super::weights::Weights;
use super::{ModelError, Result};
use blocks::{BlockInput, DownBlock, MidBlock, UpBlock, UpChannels};
use candle_core::{DType, Device, Tensor};
pub use config::UNetConfig;
use embeddings::{TimestepEmbedding, timestep_embedding};
pub use hooks::{ContextFn, ContextHooks};
use resnet::ResnetDims;
use std::path::Path;
use transformer::TransformerDims;

#[derive(Clone, Debug)]
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<UpBlock>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    /// Key / value context transforms (hypernetworks); empty by default.
    pub hooks: ContextHooks,
    /// Set by a trainer for gradient checkpointing (see [`crate::model::nn::checkpoint`]).
    pub checkpointing: Option<std::sync::Arc<crate::model::nn::checkpoint::Checkpointing>>,
    dtype: DType,
}

impl UNet2DConditionModel {
    /// Build the model from diffusers-named tensors (`conv_in.weight`, ...). The config is
    /// validated first; a missing or mis-shaped tensor is named in the error.
    pub fn load(w: &mut Weights, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate(&w.source)?;
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let temb = cfg.time_embed_dim();
        let groups = cfg.norm_num_groups;
        let res = |in_ch, out_ch| ResnetDims {
            in_ch,
            out_ch,
            temb,
            groups,
            eps: cfg.norm_eps,
        };
        let tr = |channels, heads| TransformerDims {
            channels,
            ctx_dim: cfg.cross_attention_dim,
            heads,
            groups,
            linear_proj: cfg.use_linear_projection,
            upcast: cfg.upcast_attention,
        };
        let conv_in = Conv2d::load(w, "conv_in", (cfg.in_channels, ch[0], 3), 1, 1)?;
        let time_embedding = TimestepEmbedding::load(w, "time_embedding", ch[0], temb)?;

        let mut down_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let in_ch = if i == 0 { ch[0] } else { ch[i - 1] };
            let t = (cfg.down_block_types[i] == "CrossAttnDownBlock2D")
                .then(|| tr(ch[i], cfg.heads(i)));
            down_blocks.push(DownBlock::load(
                w,
                &format!("down_blocks.{i}"),
                cfg.layers_per_block,
                res(in_ch, ch[i]),
                t,
                i + 1 < n,
            )?);
        }
        let mid_block = MidBlock::load(
            w,
            "mid_block",
            res(ch[n - 1], ch[n - 1]),
            tr(ch[n - 1], cfg.heads(n - 1)),
        )?;
        let mut up_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let r = n - 1 - i; // the down block this one mirrors
            let t =
                (cfg.up_block_types[i] == "CrossAttnUpBlock2D").then(|| tr(ch[r], cfg.heads(r)));
            let chans = UpChannels {
                prev: if i == 0 { ch[n - 1] } else { ch[r + 1] },
                out: ch[r],
                skip_in: ch[r.saturating_sub(1)],
            };
            up_blocks.push(UpBlock::load(
                w,
                &format!("up_blocks.{i}"),
                cfg.layers_per_block + 1,
                chans,
                res(0, 0),
                t,
                i + 1 < n,
            )?);
        }
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(w, "conv_norm_out", ch[0], groups, cfg.norm_eps)?,
            conv_out: Conv2d::load(w, "conv_out", (ch[0], cfg.out_channels, 3), 1, 1)?,
            hooks: ContextHooks::default(),
            checkpointing: None,
            dtype: w.dtype(),
            config: cfg.clone(),
        })
    }

    /// Load a diffusers `unet/` folder: `config.json` and `diffusion_pytorch_model.safetensors`
    /// (or its `.fp16` variant), computing in `dtype` on `device`.
    pub fn load_diffusers(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let cfg = UNetConfig::from_file(&dir.join("config.json"))?;
        let file = [
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.fp16.safetensors",
        ]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.exists())
        .ok_or_else(|| ModelError::Format {
            file: dir.display().to_string(),
            reason: "no diffusion_pytorch_model[.fp16].safetensors in this UNet folder".into(),
        })?;
        let mut w = Weights::from_safetensors(&file, dtype, device)?;
        Self::load(&mut w, &cfg)
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Noise (or v) prediction [B, out_channels, H, W] in the model dtype.
    /// `sample` [B, in_channels, H, W]; `timestep` [B] or a single value (any float dtype,
    /// used as f32); `encoder_hidden_states` [B, L, cross_attention_dim].
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let b = sample.dim(0)?;
        let t = timestep.to_dtype(DType::F32)?.flatten_all()?;
        let t = match t.dim(0)? {
            1 if b != 1 => t.broadcast_as(b)?.contiguous()?,
            n if n == b => t,
            n => {
                return Err(candle_core::Error::Msg(format!(
                    "UNet: {n} timesteps for a batch of {b}"
                ))
                .into());
            }
        };
        let t_emb = timestep_embedding(
            &t,
            cfg.block_out_channels[0],
            cfg.flip_sin_to_cos,
            cfg.freq_shift,
        )?
        .to_dtype(self.dtype)?;
        let temb_act = self.time_embedding.forward(&t_emb)?.silu()?;
        let ctx = encoder_hidden_states.to_dtype(self.dtype)?;
        let inp = BlockInput {
            temb_act: &temb_act,
            ctx: &ctx,
            hooks: &self.hooks,
            checkpointing: self.checkpointing.as_ref(),
        };
        let mut x = self.conv_in.forward(&sample.to_dtype(self.dtype)?)?;
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(&x, &inp, &mut skips)?;
        }
        x = self.mid_block.forward(&x, &inp)?;
        for block in &self.up_blocks {
            x = block.forward(&x, &inp, &mut skips)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}
