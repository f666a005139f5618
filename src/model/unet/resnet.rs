//! `ResnetBlock2D` (diffusers, `time_embedding_norm = "default"`):
//! `x + conv2(silu(norm2(conv1(silu(norm1(x))) + time_emb_proj(silu(temb)))))`, with a 1x1
//! `conv_shortcut` on `x` when the channel count changes.

use super::super::Result;
use super::super::grad::add_frozen;
use super::super::nn::{Conv2d, GroupNorm, Linear};
use super::super::weights::Weights;
use candle_core::Tensor;

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Linear,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
}

/// Shape of one resnet: channels in/out, time embedding width, norm groups and epsilon.
#[derive(Clone, Copy, Debug)]
pub struct ResnetDims {
    pub in_ch: usize,
    pub out_ch: usize,
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn load(w: &mut Weights, path: &str, d: ResnetDims) -> Result<Self> {
        let p = |n: &str| format!("{path}.{n}");
        Ok(Self {
            norm1: GroupNorm::load(w, &p("norm1"), d.in_ch, d.groups, d.eps)?,
            conv1: Conv2d::load(w, &p("conv1"), (d.in_ch, d.out_ch, 3), 1, 1)?,
            time_emb_proj: Linear::load(w, &p("time_emb_proj"), d.temb, d.out_ch, true)?,
            norm2: GroupNorm::load(w, &p("norm2"), d.out_ch, d.groups, d.eps)?,
            conv2: Conv2d::load(w, &p("conv2"), (d.out_ch, d.out_ch, 3), 1, 1)?,
            conv_shortcut: if d.in_ch != d.out_ch {
                Some(Conv2d::load(
                    w,
                    &p("conv_shortcut"),
                    (d.in_ch, d.out_ch, 1),
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    /// `temb_act` is `silu(temb)` [B, temb] (computed once for all blocks).
    pub fn forward(&self, x: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let t = self
            .time_emb_proj
            .forward(temb_act)?
            .unsqueeze(2)?
            .unsqueeze(3)?;
        let h = add_frozen(&h, &t)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((skip + h)?)
    }
}
