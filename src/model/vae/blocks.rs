//! The AutoencoderKL building blocks with diffusers paths: `ResnetBlock2D` (no time
//! embedding), `Downsample2D` (asymmetric zero pad + stride-2 conv), `Upsample2D` (nearest
//! x2 + conv), the mid-block spatial self-attention, `Encoder` and `Decoder`.

use super::VaeConfig;
use crate::model::Result;
use crate::model::attention::attention;
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::weights::Weights;
use candle_core::Tensor;

/// diffusers builds every VAE norm with eps 1e-6.
const EPS: f64 = 1e-6;

pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    /// 1x1 projection of the residual when the channel count changes.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock2D {
    pub fn load(
        w: &mut Weights,
        p: &str,
        in_c: usize,
        out_c: usize,
        groups: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(w, &format!("{p}.norm1"), in_c, groups, EPS)?,
            conv1: Conv2d::load(w, &format!("{p}.conv1"), (in_c, out_c, 3), 1, 1)?,
            norm2: GroupNorm::load(w, &format!("{p}.norm2"), out_c, groups, EPS)?,
            conv2: Conv2d::load(w, &format!("{p}.conv2"), (out_c, out_c, 3), 1, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(Conv2d::load(
                    w,
                    &format!("{p}.conv_shortcut"),
                    (in_c, out_c, 1),
                    1,
                    0,
                )?)
            } else {
                None
            },
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let res = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((res + h)?)
    }
}

/// Single-head self-attention over the H*W positions (diffusers `Attention` with
/// `group_norm`, residual connection, head dim = channels).
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
}

impl SpatialAttention {
    pub fn load(w: &mut Weights, p: &str, c: usize, groups: usize) -> Result<Self> {
        legacy_attention_keys(w, p, c)?;
        let lin = |w: &mut Weights, n: &str| Linear::load(w, &format!("{p}.{n}"), c, c, true);
        Ok(Self {
            group_norm: GroupNorm::load(w, &format!("{p}.group_norm"), c, groups, EPS)?,
            to_q: lin(w, "to_q")?,
            to_k: lin(w, "to_k")?,
            to_v: lin(w, "to_v")?,
            to_out: lin(w, "to_out.0")?,
        })
    }

    /// `x + to_out(attention(norm(x)))`; the attention is the tiled one, so a 64x64 latent
    /// (4096 positions) never holds the 4096 x 4096 score matrix.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let t = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * wd))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&t)?;
        let k = self.to_k.forward(&t)?;
        let v = self.to_v.forward(&t)?;
        let o = attention(&q, &k, &v, 1.0 / (c as f64).sqrt())?;
        let o = self.to_out.forward(&o)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, wd))?;
        Ok((x + o)?)
    }
}

/// Accept the pre-0.14 diffusers names (`query`/`key`/`value`/`proj_attn`) and 1x1-conv
/// shaped projection weights ([C, C, 1, 1], as in LDM checkpoints) for the mid attention.
fn legacy_attention_keys(w: &mut Weights, p: &str, c: usize) -> Result<()> {
    for (old, new) in [
        ("query", "to_q"),
        ("key", "to_k"),
        ("value", "to_v"),
        ("proj_attn", "to_out.0"),
    ] {
        for s in ["weight", "bias"] {
            let (from, to) = (format!("{p}.{old}.{s}"), format!("{p}.{new}.{s}"));
            if !w.contains(&to) && w.contains(&from) {
                let t = w.remove(&from)?;
                w.insert(to, t);
            }
        }
        let key = format!("{p}.{new}.weight");
        if w.contains(&key) && w.shape_of(&key)? == [c, c, 1, 1] {
            let t = w.remove(&key)?.reshape((c, c))?;
            w.insert(key, t);
        }
    }
    Ok(())
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
pub struct MidBlock {
    pub resnets: [ResnetBlock2D; 2],
    pub attention: Option<SpatialAttention>,
}

impl MidBlock {
    fn load(w: &mut Weights, p: &str, c: usize, groups: usize, attn: bool) -> Result<Self> {
        Ok(Self {
            resnets: [
                ResnetBlock2D::load(w, &format!("{p}.resnets.0"), c, c, groups)?,
                ResnetBlock2D::load(w, &format!("{p}.resnets.1"), c, c, groups)?,
            ],
            attention: if attn {
                Some(SpatialAttention::load(
                    w,
                    &format!("{p}.attentions.0"),
                    c,
                    groups,
                )?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnets[0].forward(x)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnets[1].forward(&x)
    }
}

/// One encoder or decoder stage: resnets, then an optional down- or upsampler.
pub struct Stage {
    pub resnets: Vec<ResnetBlock2D>,
    /// `downsamplers.0.conv` (stride 2 after a (0,1,0,1) zero pad) or `upsamplers.0.conv`.
    pub resample: Option<Conv2d>,
    pub up: bool,
}

impl Stage {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for r in &self.resnets {
            x = r.forward(&x)?;
        }
        if let Some(conv) = &self.resample {
            x = if self.up {
                let (_, _, h, w) = x.dims4()?;
                conv.forward_upsampled(&x, 2 * h, 2 * w)?
            } else {
                conv.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?)?
            };
        }
        Ok(x)
    }
}

pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<Stage>,
    pub mid_block: MidBlock,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Encoder {
    pub fn load(w: &mut Weights, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let g = cfg.norm_num_groups;
        let last = *ch.last().expect("validated: at least one block");
        let mut down_blocks = Vec::new();
        let mut in_c = ch[0];
        for (i, &out_c) in ch.iter().enumerate() {
            let p = format!("encoder.down_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    w,
                    &format!("{p}.resnets.{j}"),
                    c,
                    out_c,
                    g,
                )?);
            }
            let resample = if i + 1 < ch.len() {
                let path = format!("{p}.downsamplers.0.conv");
                Some(Conv2d::load(w, &path, (out_c, out_c, 3), 2, 0)?)
            } else {
                None
            };
            down_blocks.push(Stage {
                resnets,
                resample,
                up: false,
            });
            in_c = out_c;
        }
        Ok(Self {
            conv_in: Conv2d::load(w, "encoder.conv_in", (cfg.in_channels, ch[0], 3), 1, 1)?,
            down_blocks,
            mid_block: MidBlock::load(
                w,
                "encoder.mid_block",
                last,
                g,
                cfg.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::load(w, "encoder.conv_norm_out", last, g, EPS)?,
            conv_out: Conv2d::load(
                w,
                "encoder.conv_out",
                (last, 2 * cfg.latent_channels, 3),
                1,
                1,
            )?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for b in &self.down_blocks {
            x = b.forward(&x)?;
        }
        let x = self.mid_block.forward(&x)?;
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}

pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: MidBlock,
    pub up_blocks: Vec<Stage>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

impl Decoder {
    pub fn load(w: &mut Weights, cfg: &VaeConfig) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let g = cfg.norm_num_groups;
        let mut up_blocks = Vec::new();
        let mut in_c = rev[0];
        for (i, &out_c) in rev.iter().enumerate() {
            let p = format!("decoder.up_blocks.{i}");
            let mut resnets = Vec::new();
            for j in 0..cfg.layers_per_block + 1 {
                let c = if j == 0 { in_c } else { out_c };
                resnets.push(ResnetBlock2D::load(
                    w,
                    &format!("{p}.resnets.{j}"),
                    c,
                    out_c,
                    g,
                )?);
            }
            let resample = if i + 1 < rev.len() {
                let path = format!("{p}.upsamplers.0.conv");
                Some(Conv2d::load(w, &path, (out_c, out_c, 3), 1, 1)?)
            } else {
                None
            };
            up_blocks.push(Stage {
                resnets,
                resample,
                up: true,
            });
            in_c = out_c;
        }
        let first = *rev.last().expect("validated: at least one block");
        Ok(Self {
            conv_in: Conv2d::load(w, "decoder.conv_in", (cfg.latent_channels, rev[0], 3), 1, 1)?,
            mid_block: MidBlock::load(
                w,
                "decoder.mid_block",
                rev[0],
                g,
                cfg.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(w, "decoder.conv_norm_out", first, g, EPS)?,
            conv_out: Conv2d::load(w, "decoder.conv_out", (first, cfg.out_channels, 3), 1, 1)?,
        })
    }

    pub fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid_block.forward(&x)?;
        for b in &self.up_blocks {
            x = b.forward(&x)?;
        }
        self.conv_out.forward(&self.conv_norm_out.forward_silu(&x)?)
    }
}
