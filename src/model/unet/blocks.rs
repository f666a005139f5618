//! The UNet's down, mid and up blocks (diffusers `CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`) and their resamplers
//! (`downsamplers.0.conv`: 3x3 stride 2 pad 1; `upsamplers.0.conv`: nearest x2, then 3x3).

use super::super::Result;
use super::super::nn::Conv2d;
use super::super::weights::Weights;
use super::hooks::ContextHooks;
use super::resnet::{ResnetBlock2D, ResnetDims};
use super::transformer::{Transformer2DModel, TransformerDims};
use crate::model::nn::checkpoint::Checkpointing;
use candle_core::Tensor;
use std::sync::Arc;

/// What every block's forward needs besides its input.
pub struct BlockInput<'a> {
    /// Recompute resnets and transformers in the backward instead of keeping their
    /// activations (`--gradient-checkpointing`).
    pub checkpointing: Option<&'a Arc<Checkpointing>>,
    /// `silu(time_embedding(t))` [B, temb].
    pub temb_act: &'a Tensor,
    /// `encoder_hidden_states` [B, L, ctx_dim].
    pub ctx: &'a Tensor,
    pub hooks: &'a ContextHooks,
}

impl BlockInput<'_> {
    fn resnet(&self, r: &ResnetBlock2D, x: &Tensor) -> Result<Tensor> {
        match self.checkpointing {
            None => r.forward(x, self.temb_act),
            Some(ck) => {
                let r = r.clone();
                Ok(ck.run2(x, self.temb_act, Arc::new(move |x, t| Ok(r.forward(x, t)?)))?)
            }
        }
    }

    fn attention(&self, a: &Transformer2DModel, x: &Tensor) -> Result<Tensor> {
        match self.checkpointing {
            None => a.forward(x, self.ctx, self.hooks),
            Some(ck) => {
                let (a, hooks) = (a.clone(), self.hooks.clone());
                Ok(ck.run2(
                    x,
                    self.ctx,
                    Arc::new(move |x, c| Ok(a.forward(x, c, &hooks)?)),
                )?)
            }
        }
    }
}

/// Down block: `layers` x (resnet [+ transformer]), then an optional stride-2 conv.
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `DownBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub downsampler: Option<Conv2d>,
}

impl DownBlock {
    /// `t` is `None` for `DownBlock2D`; `r.in_ch` is the block's input channels.
    pub fn load(
        w: &mut Weights,
        path: &str,
        layers: usize,
        r: ResnetDims,
        t: Option<TransformerDims>,
        downsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let in_ch = if i == 0 { r.in_ch } else { r.out_ch };
            let p = format!("{path}.resnets.{i}");
            resnets.push(ResnetBlock2D::load(w, &p, ResnetDims { in_ch, ..r })?);
            if let Some(t) = t {
                let p = format!("{path}.attentions.{i}");
                attentions.push(Transformer2DModel::load(w, &p, t)?);
            }
        }
        let downsampler = if downsample {
            let p = format!("{path}.downsamplers.0.conv");
            Some(Conv2d::load(w, &p, (r.out_ch, r.out_ch, 3), 2, 1)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Pushes every layer's output (and the downsampled one) onto `skips`.
    pub fn forward(&self, x: &Tensor, inp: &BlockInput, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            x = inp.resnet(resnet, &x)?;
            if let Some(attn) = self.attentions.get(i) {
                x = inp.attention(attn, &x)?;
            }
            skips.push(x.clone());
        }
        if let Some(d) = &self.downsampler {
            x = d.forward(&x)?;
            skips.push(x.clone());
        }
        Ok(x)
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(w: &mut Weights, path: &str, r: ResnetDims, t: TransformerDims) -> Result<Self> {
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(w, &format!("{path}.resnets.0"), r)?,
                ResnetBlock2D::load(w, &format!("{path}.resnets.1"), r)?,
            ],
            attentions: vec![Transformer2DModel::load(
                w,
                &format!("{path}.attentions.0"),
                t,
            )?],
        })
    }

    pub fn forward(&self, x: &Tensor, inp: &BlockInput) -> Result<Tensor> {
        let x = inp.resnet(&self.resnets[0], x)?;
        let x = inp.attention(&self.attentions[0], &x)?;
        inp.resnet(&self.resnets[1], &x)
    }
}

/// Up block: `layers` x (concat skip, resnet [+ transformer]), then an optional nearest x2
/// upsample and 3x3 conv.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    /// Empty for `UpBlock2D`.
    pub attentions: Vec<Transformer2DModel>,
    pub upsampler: Option<Conv2d>,
}

/// Channels of an up block: its input (`prev`), its output, and the skip widths it takes
/// (`skip_in` for the last layer, `out` for the others), as diffusers wires them.
#[derive(Clone, Copy, Debug)]
pub struct UpChannels {
    pub prev: usize,
    pub out: usize,
    pub skip_in: usize,
}

impl UpBlock {
    pub fn load(
        w: &mut Weights,
        path: &str,
        layers: usize,
        ch: UpChannels,
        r: ResnetDims,
        t: Option<TransformerDims>,
        upsample: bool,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 { ch.skip_in } else { ch.out };
            let res_in = if i == 0 { ch.prev } else { ch.out };
            let dims = ResnetDims {
                in_ch: res_in + skip,
                out_ch: ch.out,
                ..r
            };
            resnets.push(ResnetBlock2D::load(
                w,
                &format!("{path}.resnets.{i}"),
                dims,
            )?);
            if let Some(t) = t {
                let p = format!("{path}.attentions.{i}");
                attentions.push(Transformer2DModel::load(w, &p, t)?);
            }
        }
        let upsampler = if upsample {
            let p = format!("{path}.upsamplers.0.conv");
            Some(Conv2d::load(w, &p, (ch.out, ch.out, 3), 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Pops one skip per layer from `skips`. The upsampler scales to the spatial size of the
    /// next skip (x2 when the latent divides evenly, like diffusers' `upsample_size`).
    pub fn forward(&self, x: &Tensor, inp: &BlockInput, skips: &mut Vec<Tensor>) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg("UNet up block: no skip connection left".into())
            })?;
            x = Tensor::cat(&[&x, &skip], 1)?;
            x = inp.resnet(resnet, &x)?;
            if let Some(attn) = self.attentions.get(i) {
                x = inp.attention(attn, &x)?;
            }
        }
        if let Some(conv) = &self.upsampler {
            let (_, _, h, w) = x.dims4()?;
            let (th, tw) = match skips.last() {
                Some(s) => (s.dim(2)?, s.dim(3)?),
                None => (2 * h, 2 * w),
            };
            x = conv.forward_upsampled(&x, th, tw)?;
        }
        Ok(x)
    }
}
