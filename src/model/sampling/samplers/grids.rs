//! Timestep / sigma grids of the three samplers, computed as diffusers does (numpy float64
//! over the float32 `alphas_cumprod`, results stored as float32 where diffusers stores them).

use crate::model::schedule::DdpmSchedule;

/// DDIM, `timestep_spacing="leading"`, `steps_offset=1`: t_i = (n-1-i) * (T / n) + 1, the
/// grid of the original CompVis DDIM sampler and of A1111 (`range(0, 1000, 1000 // n) + 1`).
pub fn ddim_timesteps(train: usize, n: usize) -> Vec<usize> {
    let ratio = train / n;
    (0..n).rev().map(|i| i * ratio + 1).collect()
}

/// `np.linspace(start, stop, n)` in float64 (last point exact).
fn linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `np.interp(x, arange(len(ys)), ys)`.
fn interp(x: f64, ys: &[f64]) -> f64 {
    if x <= 0.0 {
        return ys[0];
    }
    let last = ys.len() - 1;
    if x >= last as f64 {
        return ys[last];
    }
    let i = x.floor() as usize;
    let w = x - i as f64;
    ys[i] + (ys[i + 1] - ys[i]) * w
}

/// The full-schedule sigmas as diffusers computes them: float64 from float32 `alphas_cumprod`.
fn train_sigmas(s: &DdpmSchedule) -> Vec<f64> {
    s.sigmas()
}

/// Euler a, `timestep_spacing="linspace"`: timesteps `linspace(0, T-1, n)` reversed (float32,
/// fractional), sigmas linearly interpolated between the training sigmas, then 0 appended.
pub fn euler_grid(s: &DdpmSchedule, n: usize) -> (Vec<f64>, Vec<f32>) {
    let train = s.num_train_timesteps();
    let ts: Vec<f64> = linspace(0.0, (train - 1) as f64, n)
        .into_iter()
        .rev()
        .map(|t| t as f32 as f64)
        .collect();
    let full = train_sigmas(s);
    let mut sigmas: Vec<f32> = ts.iter().map(|&t| interp(t, &full) as f32).collect();
    sigmas.push(0.0);
    (ts, sigmas)
}

/// diffusers `_sigma_to_t`: the (fractional) timestep whose log-sigma interpolates to `sigma`.
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    // Last index with log_sigmas[i] <= ls (0 when there is none), at most n - 2.
    let low = log_sigmas
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// DPM++ 2M Karras: Karras et al. sigmas (rho 7) between the training schedule's smallest
/// and largest sigma, timesteps `round(sigma_to_t(sigma))`, final sigma 0.
pub fn karras_grid(s: &DdpmSchedule, n: usize) -> (Vec<f64>, Vec<f32>) {
    let full = train_sigmas(s);
    let log_sigmas: Vec<f64> = full.iter().map(|x| x.ln()).collect();
    let (lo, hi) = (full[0], full[full.len() - 1]);
    let rho = 7.0;
    let (min_inv, max_inv) = (lo.powf(1.0 / rho), hi.powf(1.0 / rho));
    let sig: Vec<f64> = linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect();
    let ts = sig
        .iter()
        .map(|&x| sigma_to_t(x, &log_sigmas).round_ties_even())
        .collect();
    let mut sigmas: Vec<f32> = sig.iter().map(|&x| x as f32).collect();
    sigmas.push(0.0);
    (ts, sigmas)
}
