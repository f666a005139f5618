//! Text to image: prompt -> CLIP conditioning -> sampler with classifier-free guidance over
//! the UNet -> VAE decode -> 8-bit RGB.
//!
//! Conditioning follows webui (`sd_hijack_clip.py`): the prompt is parsed for emphasis and
//! `BREAK`, cut into 75-token chunks, each chunk encoded on its own (clip_skip applied),
//! scaled by its token weights and rescaled to its original mean, then the chunks are
//! concatenated. When prompt and negative prompt need different numbers of chunks the
//! shorter one is padded with the encoding of the empty prompt, as webui's CFG denoiser
//! does.

use super::rng::TorchRng;
use super::samplers::{NoiseSource, Sampler, SamplerKind, guided};
use super::schedule::DdpmSchedule;
use crate::model::arch::{Arch, UNetParams, VaeParams};
use crate::model::clip::ClipTextModel;
use crate::model::loader::{Checkpoint, ModelInfo};
use crate::model::prompt::{ChunkOptions, Pad, a1111_prompt_with};
use crate::model::tokenizer::ClipTokenizer;
use crate::model::unet::config::PerBlock;
use crate::model::unet::{UNet2DConditionModel, UNetConfig};
use crate::model::vae::{AutoencoderKL, VaeConfig, tensor_to_images};
use crate::model::{ModelError, Result};
use candle_core::{D, DType, Device, Tensor};

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
    let (chunks, _) = a1111_prompt_with(ClipTokenizer::shared(), prompt, opts, &clip.placeholders)
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
        hidden: Tensor::cat(&parts, 1)?.detach(),
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

/// The three models of a checkpoint, ready to run.
pub struct Models {
    pub info: ModelInfo,
    pub clip: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
}

/// diffusers' UNetConfig for parameters read from a checkpoint.
pub fn unet_config(p: &UNetParams) -> UNetConfig {
    let down = |a: bool| {
        if a {
            "CrossAttnDownBlock2D"
        } else {
            "DownBlock2D"
        }
    };
    let up = |a: bool| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" };
    UNetConfig {
        in_channels: p.in_channels,
        out_channels: p.out_channels,
        down_block_types: p
            .cross_attention
            .iter()
            .map(|&a| down(a).to_string())
            .collect(),
        up_block_types: p
            .cross_attention
            .iter()
            .rev()
            .map(|&a| up(a).to_string())
            .collect(),
        block_out_channels: p.block_out_channels.clone(),
        layers_per_block: p.layers_per_block,
        attention_head_dim: PerBlock::Each(p.heads.clone()),
        cross_attention_dim: p.cross_attention_dim,
        use_linear_projection: p.use_linear_projection,
        norm_num_groups: p.norm_groups,
        ..UNetConfig::default()
    }
}

/// diffusers' VaeConfig for parameters read from a checkpoint.
pub fn vae_config(p: &VaeParams) -> VaeConfig {
    let n = p.block_out_channels.len();
    VaeConfig {
        in_channels: p.in_channels,
        out_channels: p.out_channels,
        latent_channels: p.latent_channels,
        down_block_types: vec!["DownEncoderBlock2D".into(); n],
        up_block_types: vec!["UpDecoderBlock2D".into(); n],
        block_out_channels: p.block_out_channels.clone(),
        layers_per_block: p.layers_per_block,
        norm_num_groups: p.norm_groups,
        scaling_factor: p.scaling_factor,
        ..VaeConfig::default()
    }
}

/// The base weights a checkpoint marked trainable (`Weights::set_trainable`), by
/// diffusers / HF path, as [`Models::new_with_vars`] built them.
#[derive(Default)]
pub struct BaseVars {
    pub unet: Vec<(String, candle_core::Var)>,
    pub text_encoder: Vec<(String, candle_core::Var)>,
}

impl Models {
    /// Build the text encoder, UNet and VAE of a loaded checkpoint.
    pub fn new(ck: Checkpoint) -> Result<Self> {
        Ok(Self::new_with_vars(ck)?.0)
    }

    /// [`Models::new`], also returning the parameters the checkpoint's weights marked
    /// trainable (full fine-tuning).
    pub fn new_with_vars(mut ck: Checkpoint) -> Result<(Self, BaseVars)> {
        let info = ck.info.clone();
        if info.unet.transformer_layers != 1 {
            return Err(ModelError::Format {
                file: ck.path.display().to_string(),
                reason: format!(
                    "{} transformer layers per block (SD 1.x/2.x have 1)",
                    info.unet.transformer_layers
                ),
            });
        }
        let clip = ClipTextModel::load_hf(
            &mut ck.text_encoder,
            info.arch.clip_kind(),
            Some(info.text.heads),
        )?;
        let unet = UNet2DConditionModel::load(&mut ck.unet, &unet_config(&info.unet))?;
        let vae = AutoencoderKL::load(&mut ck.vae, &vae_config(&info.vae))?;
        let vars = BaseVars {
            unet: ck.unet.vars().to_vec(),
            text_encoder: ck.text_encoder.vars().to_vec(),
        };
        Ok((
            Self {
                info,
                clip,
                unet,
                vae,
            },
            vars,
        ))
    }
}

/// What to generate (one image).
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: String,
    pub negative: String,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: SamplerKind,
    pub width: usize,
    pub height: usize,
    pub clip_skip: usize,
}

/// Text to image from a given initial latent `noise` (standard normal, [1, C, h/f, w/f]);
/// `ancestral` feeds Euler a; `on_step` is called after every UNet step. Returns the
/// decoded image in [-1, 1], [1, 3, H, W], f32.
pub fn generate(
    m: &Models,
    req: &Request,
    noise: &Tensor,
    ancestral: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(),
) -> Result<Tensor> {
    let ctx = guidance_context(m, req)?;
    generate_with_context(m, req, &ctx, noise, ancestral, on_step)
}

/// The UNet's cross-attention input for classifier-free guidance: the negative and the
/// positive prompt's conditioning stacked [2, 77 * chunks, width]. It depends only on the
/// text encoder, the two prompts and `clip_skip`, so callers may reuse it.
pub fn guidance_context(m: &Models, req: &Request) -> Result<Tensor> {
    let arch = m.info.arch;
    let cond = encode_prompt(&m.clip, arch, &req.prompt, req.clip_skip)?.hidden;
    let uncond = encode_prompt(&m.clip, arch, &req.negative, req.clip_skip)?.hidden;
    let (uncond, cond) = if uncond.dim(1)? != cond.dim(1)? {
        let empty = encode_prompt(&m.clip, arch, "", req.clip_skip)?.hidden;
        match_lengths(uncond, cond, &empty)?
    } else {
        (uncond, cond)
    };
    Ok(Tensor::cat(&[&uncond, &cond], 0)?)
}

/// [`generate`] with a [`guidance_context`] computed before (`req`'s prompts and clip skip
/// are not read again).
pub fn generate_with_context(
    m: &Models,
    req: &Request,
    ctx: &Tensor,
    noise: &Tensor,
    ancestral: &mut dyn NoiseSource,
    on_step: &mut dyn FnMut(),
) -> Result<Tensor> {
    let sampler = Sampler::new(
        req.sampler,
        req.steps,
        m.info.prediction,
        &DdpmSchedule::default(),
    )?;
    let unet = &m.unet;
    let dtype = unet.dtype();
    let device = noise.device().clone();
    let denoise = guided(
        |x: &Tensor, t: f64| {
            let ts = Tensor::new(&[t as f32], &device)?;
            let out = unet.forward(&x.to_dtype(dtype)?, &ts, ctx)?;
            on_step();
            // Inference: no graph kept across steps (adapter Vars would track one).
            Ok(out.to_dtype(DType::F32)?.detach())
        },
        req.cfg,
    );
    let latents = sampler.sample(&noise.to_dtype(DType::F32)?, denoise, ancestral)?;
    let z = m.vae.unscale(&latents)?.to_dtype(m.vae_dtype())?;
    Ok(m.vae.decode(&z)?.to_dtype(DType::F32)?)
}

impl Models {
    fn vae_dtype(&self) -> DType {
        self.unet.dtype()
    }

    /// Latent shape for an image size.
    pub fn latent_shape(
        &self,
        width: usize,
        height: usize,
    ) -> Result<(usize, usize, usize, usize)> {
        let f = self.info.vae.scale_factor();
        if width == 0 || height == 0 || width % f != 0 || height % f != 0 {
            return Err(ModelError::Format {
                file: "size".into(),
                reason: format!("{width}x{height} is not a multiple of {f} (the VAE's downscale)"),
            });
        }
        Ok((1, self.info.unet.in_channels, height / f, width / f))
    }
}

/// webui's CPU noise: `torch.manual_seed(seed)` then `torch.randn` for the initial latent
/// and, continuing the same generator, the ancestral noise of Euler a.
pub struct SeededNoise(pub TorchRng);

impl SeededNoise {
    pub fn new(seed: u64) -> Self {
        Self(TorchRng::new(seed))
    }

    pub fn latent(
        &mut self,
        shape: (usize, usize, usize, usize),
        device: &Device,
    ) -> Result<Tensor> {
        self.0.randn(&[shape.0, shape.1, shape.2, shape.3], device)
    }
}

impl NoiseSource for SeededNoise {
    fn noise(&mut self, like: &Tensor) -> Result<Tensor> {
        Ok(self
            .0
            .randn(like.dims(), like.device())?
            .to_dtype(like.dtype())?)
    }
}

/// A decoded image [1, 3, H, W] in [-1, 1] as 8-bit RGB bytes (diffusers' rounding).
pub fn to_rgb8(img: &Tensor) -> Result<Vec<u8>> {
    Ok(tensor_to_images(img)?.remove(0).into_raw())
}
