//! `Transformer2DModel` (continuous input, one `BasicTransformerBlock`), as in SD1.x/SD2.x:
//! GroupNorm(eps 1e-6) -> proj_in (1x1 conv, or Linear for SD2) -> self-attention,
//! cross-attention, GEGLU feed-forward (each pre-LayerNorm, residual) -> proj_out -> + x.

use super::super::Result;
use super::super::attention::attention;
use super::super::nn::layout::{merge_heads, split_heads, to_image, to_tokens};
use super::super::nn::{Conv2d, GroupNorm, LayerNorm, Linear, geglu};
use super::super::weights::Weights;
use super::hooks::ContextHooks;
use candle_core::{DType, Tensor};

/// diffusers `Attention` (`to_q`, `to_k`, `to_v` without bias, `to_out.0` with bias).
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Linear,
    pub heads: usize,
    /// Run the attention itself in f32 when the weights are f16/bf16.
    pub upcast: bool,
}

impl Attention {
    /// `dim` query width, `ctx_dim` context width, `heads` x `dim / heads`.
    pub fn load(
        w: &mut Weights,
        path: &str,
        (dim, ctx_dim, heads): (usize, usize, usize),
        upcast: bool,
    ) -> Result<Self> {
        let p = |n: &str| format!("{path}.{n}");
        Ok(Self {
            to_q: Linear::load(w, &p("to_q"), dim, dim, false)?,
            to_k: Linear::load(w, &p("to_k"), ctx_dim, dim, false)?,
            to_v: Linear::load(w, &p("to_v"), ctx_dim, dim, false)?,
            to_out: Linear::load(w, &p("to_out.0"), dim, dim, true)?,
            heads,
            upcast,
        })
    }

    /// `x` [B, L, dim]; `ctx` [B, Lc, ctx_dim] or `None` for self-attention.
    pub fn forward(
        &self,
        x: &Tensor,
        ctx: Option<&Tensor>,
        hooks: &ContextHooks,
    ) -> Result<Tensor> {
        let (b, _, dim) = x.dims3()?;
        let hd = dim / self.heads;
        let (ck, cv) = hooks.apply(ctx.unwrap_or(x))?;
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(&ck)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(&cv)?, self.heads)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let dt = q.dtype();
        let o = if self.upcast && dt != DType::F32 && dt != DType::F64 {
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            attention(&f(&q)?, &f(&k)?, &f(&v)?, scale)?.to_dtype(dt)?
        } else {
            attention(&q, &k, &v, scale)?
        };
        self.to_out.forward(&merge_heads(&o, b)?)
    }
}

/// `ff`: `net.0` GEGLU (`net.0.proj`: dim -> 2 x 4dim; `a * gelu(gate)`), `net.2` 4dim -> dim.
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub proj: Linear,
    pub out: Linear,
}

impl FeedForward {
    pub fn load(w: &mut Weights, path: &str, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj: Linear::load(w, &format!("{path}.net.0.proj"), dim, 2 * inner, true)?,
            out: Linear::load(w, &format!("{path}.net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.out.forward(&geglu(&self.proj.forward(x)?)?)
    }
}

#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(
        w: &mut Weights,
        path: &str,
        (dim, ctx_dim, heads): (usize, usize, usize),
        upcast: bool,
    ) -> Result<Self> {
        let p = |n: &str| format!("{path}.{n}");
        Ok(Self {
            norm1: LayerNorm::load(w, &p("norm1"), dim, 1e-5)?,
            attn1: Attention::load(w, &p("attn1"), (dim, dim, heads), upcast)?,
            norm2: LayerNorm::load(w, &p("norm2"), dim, 1e-5)?,
            attn2: Attention::load(w, &p("attn2"), (dim, ctx_dim, heads), upcast)?,
            norm3: LayerNorm::load(w, &p("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(w, &p("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: &Tensor, ctx: &Tensor, hooks: &ContextHooks) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, hooks)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(ctx), hooks)?
            + x)?;
        Ok((self.ff.forward(&self.norm3.forward(&x)?)? + x)?)
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv on [B, C, H, W] (SD1) or a Linear on [B, HW, C] (SD2).
#[derive(Clone, Debug)]
pub enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

impl Proj {
    fn load(w: &mut Weights, path: &str, i: usize, o: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Proj::Linear(Linear::load(w, path, i, o, true)?)
        } else {
            Proj::Conv(Conv2d::load(w, path, (i, o, 1), 1, 0)?)
        })
    }
}

#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Proj,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Proj,
}

/// Shape of one transformer: channels, context width, heads, norm groups, and the
/// projection and upcast choices.
#[derive(Clone, Copy, Debug)]
pub struct TransformerDims {
    pub channels: usize,
    pub ctx_dim: usize,
    pub heads: usize,
    pub groups: usize,
    pub linear_proj: bool,
    pub upcast: bool,
}

impl Transformer2DModel {
    pub fn load(w: &mut Weights, path: &str, d: TransformerDims) -> Result<Self> {
        let p = |n: &str| format!("{path}.{n}");
        let c = d.channels;
        Ok(Self {
            norm: GroupNorm::load(w, &p("norm"), c, d.groups, 1e-6)?,
            proj_in: Proj::load(w, &p("proj_in"), c, c, d.linear_proj)?,
            transformer_blocks: vec![BasicTransformerBlock::load(
                w,
                &p("transformer_blocks.0"),
                (c, d.ctx_dim, d.heads),
                d.upcast,
            )?],
            proj_out: Proj::load(w, &p("proj_out"), c, c, d.linear_proj)?,
        })
    }

    /// `x` [B, C, H, W], `ctx` [B, L, ctx_dim].
    pub fn forward(&self, x: &Tensor, ctx: &Tensor, hooks: &ContextHooks) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let mut s = match &self.proj_in {
            Proj::Conv(p) => to_tokens(&p.forward(&n)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(&n)?)?,
        };
        for block in &self.transformer_blocks {
            s = block.forward(&s, ctx, hooks)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_image(&s, h, w)?)?,
            Proj::Linear(p) => to_image(&p.forward(&s)?, h, w)?,
        };
        Ok((out + x)?)
    }
}
