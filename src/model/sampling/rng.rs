//! `torch.randn` on the CPU, reproduced: the same seed gives the same initial latent as
//! A1111 webui with "Random number generator source: CPU" (and as `torch.manual_seed(s);
//! torch.randn(shape)` anywhere).
//!
//! PyTorch's CPU generator is MT19937 seeded with the low 32 bits of the seed. `randn` of a
//! float32 tensor with at least 16 elements fills every element with a 24-bit uniform, then
//! runs Box-Muller over blocks of 16 (element j pairs with j + 8); when the count is not a
//! multiple of 16 the last 16 elements are drawn again and transformed again. Fewer than 16
//! elements use the scalar double-precision Box-Muller (53-bit uniforms, `log1p`), which
//! returns the cosine sample and caches the sine sample for the next draw.

use crate::model::Result;
use candle_core::{Device, Tensor};

const N: usize = 624;
const M: usize = 397;

/// MT19937 with PyTorch's seeding and its cached second Box-Muller sample.
#[derive(Clone)]
pub struct TorchRng {
    state: [u32; N],
    next: usize,
    left: usize,
    next_double_normal: Option<f64>,
}

impl TorchRng {
    /// `torch.manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; N];
        state[0] = seed as u32;
        for j in 1..N {
            state[j] = 1812433253u32
                .wrapping_mul(state[j - 1] ^ (state[j - 1] >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: 0,
            left: 1,
            next_double_normal: None,
        }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        let mix = |u: u32, v: u32| -> u32 {
            let y = (u & 0x8000_0000) | (v & 0x7fff_ffff);
            (y >> 1) ^ if v & 1 != 0 { 0x9908_b0df } else { 0 }
        };
        for j in 0..N - M {
            s[j] = s[j + M] ^ mix(s[j], s[j + 1]);
        }
        for j in N - M..N - 1 {
            s[j] = s[j + M - N] ^ mix(s[j], s[j + 1]);
        }
        s[N - 1] = s[M - 1] ^ mix(s[N - 1], s[0]);
        self.left = N;
        self.next = 0;
    }

    /// One 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    fn uniform_f64(&mut self) -> f64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.next_double_normal.take() {
            return v;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal = Some(r * theta.sin());
        r * theta.cos()
    }

    /// `torch.randn(n)` values (float32), continuing this generator's state.
    pub fn randn_vec(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut d: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        let mut i = 0;
        while i + 16 <= n {
            box_muller_16(&mut d[i..i + 16]);
            i += 16;
        }
        if n % 16 != 0 {
            let tail = &mut d[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        d
    }

    /// `torch.randn(shape)` as an f32 tensor on `device`.
    pub fn randn(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = shape.iter().product();
        Ok(Tensor::from_vec(self.randn_vec(n), shape, device)?)
    }
}

/// PyTorch's `normal_fill_16` (scalar float path): u1 = 1 - d[j], u2 = d[j + 8].
fn box_muller_16(d: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - d[j];
        let u2 = d[j + 8];
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = (2.0 * std::f64::consts::PI * u2 as f64) as f32;
        d[j] = radius * theta.cos();
        d[j + 8] = radius * theta.sin();
    }
}

/// `torch.manual_seed(seed); torch.randn(shape)`.
pub fn randn(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    TorchRng::new(seed).randn(shape, device)
}
