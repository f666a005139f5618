//! CLIP text encoders: SD1 (HF `CLIPTextModel`, ViT-L/14, quick_gelu) and SD2 (OpenCLIP
//! ViT-H text tower, GELU, used at the penultimate layer). Both run as one module tree with
//! the HF paths (`text_model.encoder.layers.N.self_attn.q_proj` ...); SD2 checkpoints are
//! mapped to those paths on load ([`map_open_clip_keys`]).
//!
//! Output is every hidden state; `clip_skip = n` means `final_layer_norm(hidden[-n])`.
//! The token-embedding output can take extra vectors (textual inversion): ids at or above
//! the vocabulary size index an extra table.

use crate::model::arch::count_indexed;
use crate::model::grad::add_frozen;
use crate::model::nn::layout::{merge_heads, split_heads};
use crate::model::nn::{LayerNorm, Linear, gelu, quick_gelu, softmax_last_dim};
use crate::model::text::placeholders::Placeholders;
use crate::model::weights::{Param, Weights};
use crate::model::{ModelError, Result};
use candle_core::{DType, Device, Tensor};

const HF: &str = "text_model.";
const SD1_SINGLE_FILE: &str = "cond_stage_model.transformer.text_model.";
const SD2_SINGLE_FILE: &str = "cond_stage_model.model.";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClipKind {
    /// HF CLIPTextModel layout, quick_gelu (SD1.x).
    Sd1,
    /// OpenCLIP text tower, GELU (SD2.x).
    Sd2,
}

impl ClipKind {
    /// The clip_skip the base model was trained with (SD2 uses the penultimate layer).
    pub fn default_clip_skip(self) -> usize {
        match self {
            ClipKind::Sd1 => 1,
            ClipKind::Sd2 => 2,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ClipConfig {
    pub kind: ClipKind,
    pub vocab: usize,
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub max_positions: usize,
    pub eps: f64,
}

/// Which text encoder a tensor map holds, from its keys (HF, SD1 or SD2 single-file).
pub fn detect(w: &Weights) -> Option<ClipKind> {
    if w.contains(&format!("{SD2_SINGLE_FILE}token_embedding.weight")) {
        Some(ClipKind::Sd2)
    } else if w.contains(&format!("{HF}embeddings.token_embedding.weight"))
        || w.contains(&format!(
            "{SD1_SINGLE_FILE}embeddings.token_embedding.weight"
        ))
    {
        Some(ClipKind::Sd1)
    } else {
        None
    }
}

/// Rewrite OpenCLIP keys (`cond_stage_model.model.…`) to the HF paths, splitting the fused
/// `in_proj` into q/k/v. Unused tensors (`text_projection`, `logit_scale`) are left alone.
pub fn map_open_clip_keys(w: &mut Weights) -> Result<()> {
    let p = SD2_SINGLE_FILE;
    let layers = count_indexed(w, &format!("{p}transformer.resblocks."));
    let mv = |w: &mut Weights, from: String, to: String| -> Result<()> {
        let t = w.remove(&from)?;
        w.insert(to, t);
        Ok(())
    };
    mv(
        w,
        format!("{p}token_embedding.weight"),
        format!("{HF}embeddings.token_embedding.weight"),
    )?;
    mv(
        w,
        format!("{p}positional_embedding"),
        format!("{HF}embeddings.position_embedding.weight"),
    )?;
    for s in ["weight", "bias"] {
        mv(
            w,
            format!("{p}ln_final.{s}"),
            format!("{HF}final_layer_norm.{s}"),
        )?;
    }
    for i in 0..layers {
        let from = format!("{p}transformer.resblocks.{i}.");
        let to = format!("{HF}encoder.layers.{i}.");
        for s in ["weight", "bias"] {
            mv(w, format!("{from}ln_1.{s}"), format!("{to}layer_norm1.{s}"))?;
            mv(w, format!("{from}ln_2.{s}"), format!("{to}layer_norm2.{s}"))?;
            mv(w, format!("{from}mlp.c_fc.{s}"), format!("{to}mlp.fc1.{s}"))?;
            mv(
                w,
                format!("{from}mlp.c_proj.{s}"),
                format!("{to}mlp.fc2.{s}"),
            )?;
            mv(
                w,
                format!("{from}attn.out_proj.{s}"),
                format!("{to}self_attn.out_proj.{s}"),
            )?;
            let fused = w.remove(&format!("{from}attn.in_proj_{s}"))?;
            let n = fused.dim(0)? / 3;
            for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                let part = fused.narrow(0, j * n, n)?.contiguous()?;
                w.insert(format!("{to}self_attn.{name}.{s}"), part);
            }
        }
    }
    Ok(())
}

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub heads: usize,
}

impl Attention {
    /// Causal self-attention; `mask` is [L, L] additive (0 / -inf).
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (b, _, width) = x.dims3()?;
        let hd = width / self.heads;
        let q = split_heads(&self.q_proj.forward(x)?, self.heads)?;
        let k = split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = split_heads(&self.v_proj.forward(x)?, self.heads)?;
        let scores = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
        let p = softmax_last_dim(&add_frozen(&scores, mask)?)?;
        let o = merge_heads(&p.matmul(&v)?, b)?;
        self.out_proj.forward(&o)
    }
}

pub struct EncoderLayer {
    pub layer_norm1: LayerNorm,
    pub self_attn: Attention,
    pub layer_norm2: LayerNorm,
    pub fc1: Linear,
    pub fc2: Linear,
    pub kind: ClipKind,
}

impl EncoderLayer {
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = match self.kind {
            ClipKind::Sd1 => quick_gelu(&h)?,
            ClipKind::Sd2 => gelu(&h)?,
        };
        Ok((x + self.fc2.forward(&h)?)?)
    }
}

pub struct ClipTextModel {
    pub config: ClipConfig,
    pub token_embedding: Param,
    pub position_embedding: Param,
    /// Extra token-embedding rows for ids `vocab..vocab + n` (textual inversion).
    pub extra_embeddings: Option<Param>,
    /// The names those rows stand for in prompts (set together with the rows by
    /// [`ClipTextModel::set_extra`]).
    pub placeholders: Placeholders,
    pub layers: Vec<EncoderLayer>,
    pub final_layer_norm: LayerNorm,
}

impl ClipTextModel {
    /// Load a text encoder from HF keys (`text_model.…`), an SD1 single-file checkpoint
    /// (`cond_stage_model.transformer.…`) or an SD2 one (`cond_stage_model.model.…`).
    /// `heads` defaults to width / 64 (ViT-L/14 and ViT-H/14 both use 64-wide heads).
    pub fn load(w: &mut Weights, heads: Option<usize>) -> Result<Self> {
        let kind = detect(w).ok_or_else(|| ModelError::Format {
            file: w.source.clone(),
            reason: "no CLIP text encoder found (no token_embedding key)".into(),
        })?;
        match kind {
            ClipKind::Sd2 => map_open_clip_keys(w)?,
            ClipKind::Sd1 => w.rename_prefix(SD1_SINGLE_FILE, HF),
        }
        Self::load_hf(w, kind, heads)
    }

    /// Load from HF keys (`text_model.…`) with the activation of `kind` (a diffusers SD2
    /// `text_encoder/` has HF keys but OpenCLIP's GELU).
    pub fn load_hf(w: &mut Weights, kind: ClipKind, heads: Option<usize>) -> Result<Self> {
        let tok = w.shape_of(&format!("{HF}embeddings.token_embedding.weight"))?;
        let pos = w.shape_of(&format!("{HF}embeddings.position_embedding.weight"))?;
        let fc1 = w.shape_of(&format!("{HF}encoder.layers.0.mlp.fc1.weight"))?;
        let (vocab, width) = (tok[0], tok[1]);
        let heads = heads.unwrap_or(width / 64);
        if heads == 0 || width % heads != 0 {
            return Err(ModelError::Format {
                file: w.source.clone(),
                reason: format!("width {width} is not divisible into {heads} attention heads"),
            });
        }
        let config = ClipConfig {
            kind,
            vocab,
            width,
            layers: count_indexed(w, &format!("{HF}encoder.layers.")),
            heads,
            intermediate: fc1[0],
            max_positions: pos[0],
            eps: 1e-5,
        };
        let c = &config;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let p = format!("{HF}encoder.layers.{i}.");
            let lin = |w: &mut Weights, name: &str, i: usize, o: usize| {
                Linear::load(w, &format!("{p}{name}"), i, o, true)
            };
            layers.push(EncoderLayer {
                layer_norm1: LayerNorm::load(w, &format!("{p}layer_norm1"), width, c.eps)?,
                self_attn: Attention {
                    q_proj: lin(w, "self_attn.q_proj", width, width)?,
                    k_proj: lin(w, "self_attn.k_proj", width, width)?,
                    v_proj: lin(w, "self_attn.v_proj", width, width)?,
                    out_proj: lin(w, "self_attn.out_proj", width, width)?,
                    heads,
                },
                layer_norm2: LayerNorm::load(w, &format!("{p}layer_norm2"), width, c.eps)?,
                fc1: lin(w, "mlp.fc1", width, c.intermediate)?,
                fc2: lin(w, "mlp.fc2", c.intermediate, width)?,
                kind,
            });
        }
        Ok(Self {
            token_embedding: w.param(
                &format!("{HF}embeddings.token_embedding.weight"),
                &[vocab, width],
            )?,
            position_embedding: w.param(
                &format!("{HF}embeddings.position_embedding.weight"),
                &[c.max_positions, width],
            )?,
            extra_embeddings: None,
            placeholders: Placeholders::new(vocab),
            final_layer_norm: LayerNorm::load(w, &format!("{HF}final_layer_norm"), width, c.eps)?,
            layers,
            config,
        })
    }

    /// Textual-inversion vectors: `table` [placeholders.total(), width] holds the rows of
    /// the ids `placeholders` hands out (an empty registry removes the extra table).
    pub fn set_extra(&mut self, placeholders: Placeholders, table: Option<Param>) -> Result<()> {
        let rows = placeholders.total();
        let shape = table.as_ref().map(|t| t.tensor().dims().to_vec());
        let fits = match &shape {
            None => rows == 0,
            Some(s) => s.as_slice() == [rows, self.config.width],
        };
        if !fits || placeholders.base() != self.config.vocab {
            return Err(ModelError::Shape {
                file: "textual inversion".into(),
                key: "extra_embeddings".into(),
                found: shape.unwrap_or_default(),
                expected: vec![rows, self.config.width],
            });
        }
        self.extra_embeddings = table;
        self.placeholders = placeholders;
        Ok(())
    }

    /// Token embeddings plus position embeddings for `ids` [B, L] (u32).
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let (vocab, width) = (self.config.vocab, self.config.width);
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let table = self.token_embedding.value();
        let tok = match &self.extra_embeddings {
            None => table.index_select(&flat, 0)?,
            Some(extra) => {
                let is_extra = flat.ge(vocab as u32)?;
                let base_ids = is_extra.where_cond(&flat.zeros_like()?, &flat)?;
                let extra_ids = is_extra.where_cond(
                    &(flat.to_dtype(DType::I64)? - vocab as f64)?.to_dtype(DType::U32)?,
                    &flat.zeros_like()?,
                )?;
                let mask = is_extra.unsqueeze(1)?.broadcast_as((b * l, width))?;
                // An f32 trainable table on an f16 model: the cast is differentiable.
                let extra = extra.value().to_dtype(table.dtype())?;
                mask.where_cond(
                    &extra.index_select(&extra_ids, 0)?,
                    &table.index_select(&base_ids, 0)?,
                )?
            }
        };
        let pos = self.position_embedding.value().narrow(0, 0, l)?;
        Ok(add_frozen(&tok.reshape((b, l, width))?, &pos)?)
    }

    /// Hidden states after the embeddings and after each of the first `n_layers` layers.
    pub fn hidden_states_upto(&self, ids: &Tensor, n_layers: usize) -> Result<Vec<Tensor>> {
        let mut x = self.embed(ids)?;
        let mask = causal_mask(ids.dim(1)?, x.dtype(), x.device())?;
        let mut out = vec![x.clone()];
        for layer in &self.layers[..n_layers.min(self.layers.len())] {
            x = layer.forward(&x, &mask)?;
            out.push(x.clone());
        }
        Ok(out)
    }

    /// All hidden states: embeddings output, then one per layer (`layers + 1` tensors).
    pub fn hidden_states(&self, ids: &Tensor) -> Result<Vec<Tensor>> {
        self.hidden_states_upto(ids, self.layers.len())
    }

    /// The conditioning: `final_layer_norm(hidden[-clip_skip])`, computing only the layers
    /// needed. clip_skip 1 is the last layer.
    pub fn encode(&self, ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let skip = clip_skip.clamp(1, self.layers.len());
        let hs = self.hidden_states_upto(ids, self.layers.len() + 1 - skip)?;
        self.final_layer_norm
            .forward(hs.last().expect("embeddings output"))
    }
}

/// Additive causal mask [L, L]: 0 on and below the diagonal, -inf above.
pub fn causal_mask(l: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..l * l)
        .map(|i| {
            if i % l > i / l {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (l, l), device)?.to_dtype(dtype)?)
}
