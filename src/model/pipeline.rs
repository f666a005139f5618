//! Text to image: prompt -> CLIP conditioning -> sampler with classifier-free guidance over
//! the UNet -> VAE decode -> 8-bit RGB.
//!
//! Conditioning follows webui (`sd_hijack_clip.py`): the prompt is parsed for emphasis and
//! `BREAK`, cut into 75-token chunks, each chunk encoded on its own (clip_skip applied),
//! scaled by its token weights and rescaled to its original mean, then the chunks are
//! concatenated. When prompt and negative prompt need different numbers of chunks the
//! shorter one is padded with the encoding of the empty prompt, as webui's CFG denoiser
//! does.

use super::arch::Arch;
use super::clip::ClipTextModel;
use super::prompt::{ChunkOptions, Pad, a1111_prompt};
use super::tokenizer::ClipTokenizer;
use super::{ModelError, Result};
use candle_core::{D, DType, Tensor};

fn prompt_err(reason: String) -> ModelError {
    ModelError::Format {
        file: "prompt".into(),
        reason,
    }
}

/// Token padding of the family's tokenizer.
pub fn pad_for(arch: Arch) -> Pad {
    match arch {
        Arch::Sd1 => Pad::Sd1,
        Arch::Sd2 => Pad::Sd2,
    }
}

/// One prompt's conditioning [1, 77 * chunks, width] and its token ids per chunk.
pub struct Conditioning {
    pub hidden: Tensor,
    pub ids: Vec<Vec<u32>>,
}

/// Encode a prompt the webui way. `clip_skip` 1 uses the text encoder's last layer (for
/// SD2 that is already the penultimate OpenCLIP block, see `loader`).
pub fn encode_prompt(
    clip: &ClipTextModel,
    arch: Arch,
    prompt: &str,
    clip_skip: usize,
) -> Result<Conditioning> {
    let opts = ChunkOptions {
        pad: pad_for(arch),
        ..ChunkOptions::default()
    };
    let (chunks, _) = a1111_prompt(ClipTokenizer::shared(), prompt, opts)
        .map_err(|e| prompt_err(format!("{e} in {prompt:?}")))?;
    let device = clip.token_embedding.tensor().device().clone();
    let dtype = clip.token_embedding.tensor().dtype();
    let mut parts = Vec::with_capacity(chunks.len());
    for c in &chunks {
        let ids = Tensor::new(c.tokens.as_slice(), &device)?.unsqueeze(0)?;
        let z = clip.encode(&ids, clip_skip)?;
        parts.push(apply_emphasis(&z, &c.weights)?.to_dtype(dtype)?);
    }
    Ok(Conditioning {
        hidden: Tensor::cat(&parts, 1)?,
        ids: chunks.into_iter().map(|c| c.tokens).collect(),
    })
}

/// webui's "Original" emphasis: `z *= w` per token, then `z *= mean_before / mean_after`
/// (computed in f32). All-ones weights leave `z` unchanged.
pub fn apply_emphasis(z: &Tensor, weights: &[f64]) -> Result<Tensor> {
    if weights.iter().all(|&w| w == 1.0) {
        return Ok(z.clone());
    }
    let z32 = z.to_dtype(DType::F32)?;
    let w: Vec<f32> = weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::new(w.as_slice(), z.device())?.reshape((1, weights.len(), 1))?;
    let before = z32.mean_all()?.to_scalar::<f32>()?;
    let scaled = z32.broadcast_mul(&w)?;
    let after = scaled.mean_all()?.to_scalar::<f32>()?;
    Ok((scaled * (before / after) as f64)?)
}

/// Pad the shorter of two conditionings with repeats of `empty` [1, 77, W] so both have
/// the same length (webui's CFG denoiser).
pub fn match_lengths(a: Tensor, b: Tensor, empty: &Tensor) -> Result<(Tensor, Tensor)> {
    let (la, lb) = (a.dim(1)?, b.dim(1)?);
    let pad = |t: Tensor, n: usize| -> Result<Tensor> {
        if n == 0 {
            return Ok(t);
        }
        let reps = empty.repeat((1, n / empty.dim(D::Minus2)?, 1))?;
        Ok(Tensor::cat(&[&t, &reps], 1)?)
    };
    Ok(if la < lb {
        (pad(a, lb - la)?, b)
    } else {
        let d = la - lb;
        (a, pad(b, d)?)
    })
}
