//! The diffusion training objective as kohya sd-scripts computes it: uniform timesteps,
//! Gaussian noise (+ `noise_offset`), eps or v targets, l2 / l1 / huber loss per element
//! averaged over C, H, W per sample, then per-sample weights (prior loss weight for reg
//! images, min-SNR-gamma), then the batch mean.

use super::rng::Rng;
use crate::model::schedule::{DdpmSchedule, Prediction};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LossType {
    L2,
    L1,
    Huber,
}

/// kohya's `huber_schedule`: how the huber threshold varies with the timestep.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum HuberSchedule {
    Constant,
    Exponential,
    Snr,
}

#[derive(Debug, Clone, Copy)]
pub struct Objective {
    pub prediction: Prediction,
    pub noise_offset: f64,
    pub min_snr_gamma: Option<f64>,
    pub loss_type: LossType,
    pub huber_c: f64,
    pub huber_schedule: HuberSchedule,
}

/// One batch made ready for the UNet.
pub struct Noised {
    pub noisy: Tensor,
    pub target: Tensor,
    pub timesteps: Vec<usize>,
}

impl Objective {
    /// Draw timesteps and noise for latents `x0` [B, C, H, W] from `rng` and build the
    /// noisy input and the target.
    pub fn noise(
        &self,
        s: &DdpmSchedule,
        x0: &Tensor,
        rng: &mut Rng,
    ) -> candle_core::Result<Noised> {
        let (b, c, h, w) = x0.dims4()?;
        let dev = x0.device();
        let n = s.num_train_timesteps() as u64;
        let timesteps: Vec<usize> = (0..b).map(|_| rng.below(n) as usize).collect();
        let mut noise = Tensor::from_vec(rng.normals(b * c * h * w), (b, c, h, w), dev)?;
        if self.noise_offset != 0.0 {
            let off = Tensor::from_vec(rng.normals(b * c), (b, c, 1, 1), dev)?;
            noise = noise.broadcast_add(&(off * self.noise_offset)?)?;
        }
        let noise = noise.to_dtype(x0.dtype())?;
        let map = |e: crate::model::ModelError| candle_core::Error::Msg(e.to_string());
        let noisy = s.add_noise(x0, &noise, &timesteps).map_err(map)?;
        let target = s
            .target(self.prediction, x0, &noise, &timesteps)
            .map_err(map)?;
        Ok(Noised {
            noisy,
            target,
            timesteps,
        })
    }

    /// Per-sample huber thresholds (kohya's `get_huber_threshold`).
    fn huber_c(&self, s: &DdpmSchedule, t: &[usize]) -> Vec<f32> {
        t.iter()
            .map(|&t| {
                let c = self.huber_c;
                (match self.huber_schedule {
                    HuberSchedule::Constant => c,
                    HuberSchedule::Exponential => {
                        let alpha = -c.ln() / s.num_train_timesteps() as f64;
                        (-alpha * t as f64).exp()
                    }
                    HuberSchedule::Snr => {
                        let a = s.alphas_cumprod[t] as f64;
                        let sigma = ((1.0 - a) / a).sqrt();
                        (1.0 - c) / (1.0 + sigma).powi(2) + c
                    }
                }) as f32
            })
            .collect()
    }

    /// Per-sample loss weights: `sample_weights` (prior loss weight) times min-SNR-gamma.
    pub fn weights(&self, s: &DdpmSchedule, t: &[usize], sample_weights: &[f32]) -> Vec<f32> {
        let snr = s.snr(t);
        sample_weights
            .iter()
            .zip(&snr)
            .map(|(&w, &snr)| match self.min_snr_gamma {
                None => w,
                Some(g) => {
                    let m = snr.min(g as f32);
                    let d = match self.prediction {
                        Prediction::Epsilon => snr,
                        Prediction::VPrediction => snr + 1.0,
                    };
                    w * m / d
                }
            })
            .collect()
    }

    /// The scalar loss for a prediction `pred` against `n.target` (both [B, C, H, W]).
    pub fn loss(
        &self,
        s: &DdpmSchedule,
        pred: &Tensor,
        n: &Noised,
        sample_weights: &[f32],
    ) -> candle_core::Result<Tensor> {
        let pred = pred.to_dtype(DType::F32)?;
        let target = n.target.to_dtype(DType::F32)?;
        let b = pred.dim(0)?;
        let dev: &Device = &pred.device().clone();
        let diff = (pred - target)?;
        let per_elem = match self.loss_type {
            LossType::L2 => diff.sqr()?,
            LossType::L1 => diff.abs()?,
            LossType::Huber => {
                let c = Tensor::from_vec(self.huber_c(s, &n.timesteps), (b, 1, 1, 1), dev)?;
                let c2 = c.sqr()?;
                let r = (diff.sqr()?.broadcast_add(&c2)?.sqrt()?.broadcast_sub(&c))?;
                (r.broadcast_mul(&c)? * 2.0)?
            }
        };
        let per_sample = per_elem.flatten_from(1)?.mean(1)?;
        let w = self.weights(s, &n.timesteps, sample_weights);
        let w = Tensor::from_vec(w, b, dev)?;
        (per_sample * w)?.mean_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(loss_type: LossType, gamma: Option<f64>) -> Objective {
        Objective {
            prediction: Prediction::Epsilon,
            noise_offset: 0.0,
            min_snr_gamma: gamma,
            loss_type,
            huber_c: 0.1,
            huber_schedule: HuberSchedule::Constant,
        }
    }

    #[test]
    fn l2_is_mse_and_weights_apply_per_sample() {
        let s = DdpmSchedule::default();
        let dev = Device::Cpu;
        let pred = Tensor::from_vec(vec![1f32, 1.0, 3.0, 3.0], (2, 1, 1, 2), &dev).unwrap();
        let target = Tensor::zeros((2, 1, 1, 2), DType::F32, &dev).unwrap();
        let n = Noised {
            noisy: target.clone(),
            target,
            timesteps: vec![10, 500],
        };
        let l = obj(LossType::L2, None)
            .loss(&s, &pred, &n, &[1.0, 0.5])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - (1.0 + 9.0 * 0.5) / 2.0).abs() < 1e-6);
        let l1 = obj(LossType::L1, None)
            .loss(&s, &pred, &n, &[1.0, 1.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l1 - 2.0).abs() < 1e-6);
        // Huber with c: 2c (sqrt(d^2 + c^2) - c).
        let h = obj(LossType::Huber, None)
            .loss(&s, &pred, &n, &[1.0, 1.0])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let f = |d: f64| 0.2 * ((d * d + 0.01).sqrt() - 0.1);
        assert!((h as f64 - (f(1.0) + f(3.0)) / 2.0).abs() < 1e-6);
    }

    #[test]
    fn min_snr_gamma_caps_low_noise_steps() {
        let s = DdpmSchedule::default();
        let o = obj(LossType::L2, Some(5.0));
        let w = o.weights(&s, &[0, 999], &[1.0, 1.0]);
        let snr = s.snr(&[0, 999]);
        assert!(
            (w[0] - 5.0 / snr[0]).abs() < 1e-6,
            "t=0 has snr {} > 5",
            snr[0]
        );
        assert_eq!(w[1], 1.0, "t=999 has snr {} < 5", snr[1]);
    }

    #[test]
    fn noise_is_seeded_and_offset_shifts_channels() {
        let s = DdpmSchedule::default();
        let x0 = Tensor::zeros((2, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        let mut o = obj(LossType::L2, None);
        let a = o.noise(&s, &x0, &mut Rng::new(3)).unwrap();
        let b = o.noise(&s, &x0, &mut Rng::new(3)).unwrap();
        assert_eq!(a.timesteps, b.timesteps);
        let d = (&a.target - &b.target)
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
        o.noise_offset = 0.1;
        let c = o.noise(&s, &x0, &mut Rng::new(3)).unwrap();
        assert_ne!(
            c.target.sum_all().unwrap().to_scalar::<f32>().unwrap(),
            a.target.sum_all().unwrap().to_scalar::<f32>().unwrap()
        );
    }
}
