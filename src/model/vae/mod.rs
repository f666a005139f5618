//! AutoencoderKL (the SD VAE) with diffusers parameter paths (`encoder.down_blocks.0.resnets.1
//! .conv2`, `decoder.mid_block.attentions.0.to_q`, `quant_conv`, `post_quant_conv` ...).
//!
//! Images are NCHW in [-1, 1]; [`image_to_tensor`] / [`tensor_to_images`] convert. `encode`
//! gives the posterior ([`DiagonalGaussian`]); the diffusion model's latents are
//! `posterior.sample(noise) * scaling_factor` ([`AutoencoderKL::scale`]) and `decode` takes
//! unscaled latents ([`AutoencoderKL::unscale`] first).

mod blocks;

pub use blocks::{Decoder, Encoder, MidBlock, ResnetBlock2D, SpatialAttention, Stage};

use super::nn::Conv2d;
use super::weights::Weights;
use super::{ModelError, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// The fields of a diffusers `vae/config.json` that shape the model (others are ignored).
/// Defaults are diffusers' `AutoencoderKL` defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub latent_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub force_upcast: bool,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            norm_num_groups: 32,
            sample_size: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    /// The SD 1.x / 2.x VAE (`runwayml/stable-diffusion-v1-5/vae/config.json`).
    pub fn sd() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: 512,
            ..Self::default()
        }
    }

    /// Read a diffusers `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let err = |reason: String| ModelError::Format {
            file: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let cfg: Self =
            serde_json::from_str(&text).map_err(|e| err(format!("not a VAE config: {e}")))?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// The architecture this implementation supports.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(format!(
                "{n} block_out_channels but {} down / {} up block types",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return Err(format!("unsupported down block type {t}"));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return Err(format!("unsupported up block type {t}"));
        }
        if self.act_fn != "silu" {
            return Err(format!("unsupported act_fn {}", self.act_fn));
        }
        let g = self.norm_num_groups;
        if g == 0 || self.block_out_channels.iter().any(|c| c % g != 0) {
            return Err(format!(
                "channels {:?} are not divisible into {g} norm groups",
                self.block_out_channels
            ));
        }
        Ok(())
    }

    /// Spatial downsampling factor between image and latent (8 for SD).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The encoder's posterior: a diagonal Gaussian per latent element.
#[derive(Clone, Debug)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] like diffusers.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `mean + exp(logvar / 2) * noise` (`noise` standard normal, same shape as `mean`).
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        Ok((&self.mean + std.mul(noise)?)?)
    }

    /// The mean (the posterior's mode).
    pub fn mode(&self) -> &Tensor {
        &self.mean
    }
}

pub struct AutoencoderKL {
    pub config: VaeConfig,
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    /// Build from diffusers keys (`encoder.…`, `decoder.…`, `quant_conv.…`).
    pub fn load(w: &mut Weights, cfg: &VaeConfig) -> Result<Self> {
        cfg.validate().map_err(|reason| ModelError::Format {
            file: w.source.clone(),
            reason,
        })?;
        let l = cfg.latent_channels;
        Ok(Self {
            encoder: Encoder::load(w, cfg)?,
            decoder: Decoder::load(w, cfg)?,
            quant_conv: if cfg.use_quant_conv {
                Some(Conv2d::load(w, "quant_conv", (2 * l, 2 * l, 1), 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if cfg.use_post_quant_conv {
                Some(Conv2d::load(w, "post_quant_conv", (l, l, 1), 1, 0)?)
            } else {
                None
            },
            config: cfg.clone(),
        })
    }

    /// The compute dtype (that of the weights).
    pub fn dtype(&self) -> DType {
        self.encoder.conv_in.weight.tensor().dtype()
    }

    /// Load a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`),
    /// or a model folder that has it under `vae/`.
    pub fn from_diffusers(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let dir = if dir.join("vae/config.json").is_file() {
            dir.join("vae")
        } else {
            dir.to_path_buf()
        };
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let mut w = Weights::from_safetensors(
            &dir.join("diffusion_pytorch_model.safetensors"),
            dtype,
            device,
        )?;
        Self::load(&mut w, &cfg)
    }

    /// Image [N, 3, H, W] in [-1, 1] (H, W multiples of [`VaeConfig::downscale`]) to the
    /// posterior over latents [N, latent_channels, H/8, W/8].
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let f = self.config.downscale();
        let (_, _, h, w) = x.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(ModelError::Candle(candle_core::Error::Msg(format!(
                "VAE encode: image size {w}x{h} is not a multiple of {f}"
            ))));
        }
        let mut h = self.encoder.forward(x)?;
        if let Some(q) = &self.quant_conv {
            h = q.forward(&h)?;
        }
        let l = self.config.latent_channels;
        Ok(DiagonalGaussian {
            mean: h.narrow(1, 0, l)?,
            logvar: h.narrow(1, l, l)?.clamp(-30f32, 20f32)?,
        })
    }

    /// Unscaled latents [N, latent_channels, h, w] to images [N, 3, 8h, 8w] (about [-1, 1]).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(q) => q.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// VAE latents to diffusion latents: `(z - shift) * scaling_factor`.
    pub fn scale(&self, z: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok(((z - shift)? * self.config.scaling_factor)?)
    }

    /// Diffusion latents back to VAE latents (the inverse of [`Self::scale`]).
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        let shift = self.config.shift_factor.unwrap_or(0.0);
        Ok(((latents / self.config.scaling_factor)? + shift)?)
    }
}

/// An RGB image as a [1, 3, H, W] f32 tensor in [-1, 1] (`x / 127.5 - 1`).
pub fn image_to_tensor(img: &image::RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut v = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            v[c * h * w + i] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    Ok(Tensor::from_vec(v, (1, 3, h, w), device)?)
}

/// A batch [N, 3, H, W] in [-1, 1] to RGB images, as diffusers' postprocessing:
/// `round(clamp(x / 2 + 0.5, 0, 1) * 255)`.
pub fn tensor_to_images(x: &Tensor) -> Result<Vec<image::RgbImage>> {
    let (n, c, h, w) = x.dims4()?;
    if c != 3 {
        return Err(ModelError::Candle(candle_core::Error::Msg(format!(
            "expected 3 channels, got {c}"
        ))));
    }
    let x = ((x.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let v: Vec<f32> = x.get(i)?.flatten_all()?.to_vec1()?;
        let img = image::RgbImage::from_fn(w as u32, h as u32, |px, py| {
            let at = py as usize * w + px as usize;
            image::Rgb(std::array::from_fn(|ch| {
                (v[ch * h * w + at] * 255.0).round_ties_even() as u8
            }))
        });
        out.push(img);
    }
    Ok(out)
}
