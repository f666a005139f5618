//! Timestep embeddings: diffusers' `get_timestep_embedding` (sinusoidal, `time_proj`) and
//! `TimestepEmbedding` (`time_embedding.linear_1` -> SiLU -> `linear_2`).

use super::super::Result;
use super::super::nn::Linear;
use super::super::weights::Weights;
use candle_core::{DType, Tensor};

/// Sinusoidal embedding [B, dim] (f32) of timesteps [B]: frequencies
/// `exp(-ln(10000) i / (dim/2 - shift))`, `[sin, cos]` (or `[cos, sin]` when `flip`).
pub fn timestep_embedding(t: &Tensor, dim: usize, flip: bool, shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let dev = t.device();
    // Same f32 order of operations as diffusers: exponent, divide, exp, multiply.
    let exponent =
        (Tensor::arange(0u32, half as u32, dev)?.to_dtype(DType::F32)? * -(10000f64.ln()))?;
    let denom = Tensor::new(&[(half as f64 - shift) as f32], dev)?;
    let freqs = exponent.broadcast_div(&denom)?.exp()?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(1, 0, 1)?);
    }
    Ok(emb)
}

/// `time_embedding`: linear_1 (in -> out), SiLU, linear_2 (out -> out).
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &mut Weights, path: &str, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(w, &format!("{path}.linear_1"), in_dim, out_dim, true)?,
            linear_2: Linear::load(w, &format!("{path}.linear_2"), out_dim, out_dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Values from diffusers' get_timestep_embedding(torch.tensor([0., 1., 500.]), 6,
    /// flip_sin_to_cos=True, downscale_freq_shift=0) and with flip False / shift 1.
    #[test]
    fn matches_diffusers_values() {
        let t = Tensor::new(&[0f32, 1.0, 500.0], &Device::Cpu).unwrap();
        let e: Vec<Vec<f32>> = timestep_embedding(&t, 6, true, 0.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // freqs = exp(-ln(1e4) * [0,1,2] / 3) = [1, 0.0464159, 0.00215443]
        let freqs = [1f64, 0.046_415_888_336_127_8, 0.002_154_434_690_031_88];
        for (row, t) in e.iter().zip([0f64, 1.0, 500.0]) {
            for (i, f) in freqs.iter().enumerate() {
                assert!((row[i] as f64 - (t * f).cos()).abs() < 1e-4, "{row:?}");
                assert!((row[3 + i] as f64 - (t * f).sin()).abs() < 1e-4, "{row:?}");
            }
        }
        let e: Vec<Vec<f32>> = timestep_embedding(&t, 7, false, 1.0)
            .unwrap()
            .to_vec2()
            .unwrap();
        // shift 1: freqs = exp(-ln(1e4) * i / 2); [sin, cos], zero pad to odd width
        assert!((e[1][1] as f64 - (0.01f64).sin()).abs() < 1e-6);
        assert!((e[1][4] as f64 - (0.01f64).cos()).abs() < 1e-6);
        assert_eq!(e[2][6], 0.0);
    }
}
