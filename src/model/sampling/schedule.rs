//! The DDPM training noise schedule of SD 1.x / 2.x, equal to diffusers' `DDPMScheduler`
//! (`beta_schedule="scaled_linear"`, 0.00085..0.012, 1000 steps).
//!
//! betas are computed like `torch.linspace(sqrt(b0), sqrt(b1), n, dtype=float32) ** 2` (f32),
//! `alphas_cumprod` like torch's float32 `cumprod` (accumulated in f64, stored as f32), so the
//! tables match diffusers to the last bit or within one f32 rounding.

use crate::model::Result;
use candle_core::{DType, Tensor};

/// Which quantity the model predicts.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// The added noise (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = sqrt(abar) eps - sqrt(1 - abar) x0 (SD 2.x 768-v).
    #[serde(rename = "v", alias = "v_prediction")]
    #[value(name = "v", alias = "v-prediction")]
    VPrediction,
}

#[derive(Clone, Debug)]
pub struct DdpmSchedule {
    pub betas: Vec<f32>,
    /// abar_t = prod_{s <= t} (1 - beta_s), t = 0..num_train_timesteps.
    pub alphas_cumprod: Vec<f32>,
}

impl Default for DdpmSchedule {
    fn default() -> Self {
        Self::scaled_linear(0.00085, 0.012, 1000)
    }
}

/// `torch.linspace(start, end, n)` in float32: torch fills the first half forward from
/// `start` and the second half backward from `end` with step `(end - start) / (n - 1)`.
fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - 1 - i) as f32
            }
        })
        .collect()
}

impl DdpmSchedule {
    /// betas = linspace(sqrt(beta_start), sqrt(beta_end), n)^2.
    pub fn scaled_linear(beta_start: f64, beta_end: f64, n: usize) -> Self {
        let betas: Vec<f32> = linspace_f32(beta_start.sqrt() as f32, beta_end.sqrt() as f32, n)
            .into_iter()
            .map(|b| b * b)
            .collect();
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0 - b) as f64;
                acc as f32
            })
            .collect();
        Self {
            betas,
            alphas_cumprod,
        }
    }

    pub fn num_train_timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// The k-diffusion / Euler sigma of timestep t: sqrt((1 - abar) / abar), in f64.
    pub fn sigmas(&self) -> Vec<f64> {
        self.alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a as f64) / a as f64).sqrt())
            .collect()
    }

    /// Per-sample coefficient tensor [B, 1, 1, ...] shaped for `like`.
    fn coef(&self, t: &[usize], like: &Tensor, f: impl Fn(f32) -> f32) -> Result<Tensor> {
        let mut shape = vec![t.len()];
        shape.resize(like.rank(), 1);
        let v: Vec<f32> = t.iter().map(|&t| f(self.alphas_cumprod[t])).collect();
        Ok(Tensor::from_vec(v, shape, like.device())?.to_dtype(like.dtype())?)
    }

    /// x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = self.coef(t, x0, |a| a.sqrt())?;
        let s = self.coef(t, x0, |a| (1.0 - a).sqrt())?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// The v-prediction target v = sqrt(abar_t) noise - sqrt(1 - abar_t) x0.
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = self.coef(t, x0, |a| a.sqrt())?;
        let s = self.coef(t, x0, |a| (1.0 - a).sqrt())?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// The training target for a prediction type.
    pub fn target(
        &self,
        prediction: Prediction,
        x0: &Tensor,
        noise: &Tensor,
        t: &[usize],
    ) -> Result<Tensor> {
        match prediction {
            Prediction::Epsilon => Ok(noise.clone()),
            Prediction::VPrediction => self.get_velocity(x0, noise, t),
        }
    }

    /// SNR(t) = abar_t / (1 - abar_t), as diffusers' `training_utils.compute_snr` (f32).
    pub fn snr(&self, t: &[usize]) -> Vec<f32> {
        t.iter()
            .map(|&t| {
                let a = self.alphas_cumprod[t];
                let (sa, s1) = (a.sqrt(), (1.0 - a).sqrt());
                (sa / s1) * (sa / s1)
            })
            .collect()
    }

    /// `alphas_cumprod` as an f32 tensor.
    pub fn alphas_cumprod_tensor(&self, device: &candle_core::Device) -> Result<Tensor> {
        Ok(
            Tensor::from_slice(&self.alphas_cumprod, self.alphas_cumprod.len(), device)?
                .to_dtype(DType::F32)?,
        )
    }
}
