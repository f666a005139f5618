//! Layers with diffusers / HF parameter paths and a backward for every op.
//!
//! candle's fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward: their
//! inputs silently get no gradient. Everything here is built from ops whose backward candle
//! implements (tests in this file prove the gradients flow and match finite differences).

use super::conv_cpu;
use super::conv_cpu::{conv2d, conv2d_s1_input_grad, conv2d_s1_kernel_grad};
use super::fused_cpu;
use super::grad::{input_grad_only, input_grad_only_cpu, param, scale_shift_frozen};
use super::lowrank_cpu;
use super::upconv_cpu;
use super::winograd_cpu;
use crate::model::Result;
use crate::model::weights::{Param, Weights};
use candle_core::{D, DType, Tensor, Var};

/// A low-rank delta `up(down(x)) * scale` added to a layer's output (LoRA / LoCon).
/// Linear: down [r, in], up [out, r]. Conv: down [r, in, kh, kw], up [out, r, 1, 1].
#[derive(Clone, Debug)]
pub struct LowRank {
    pub down: Var,
    pub up: Var,
    pub scale: f64,
    /// kohya's `network_dropout` on `down(x)` while training.
    pub dropout: Option<Dropout>,
}

/// Dropout with a mask drawn from a key the trainer sets per step (0: off, as in
/// inference), mixed with a per-module salt: the same key gives the same mask, so a resumed
/// run drops what the uninterrupted one dropped.
#[derive(Clone, Debug)]
pub struct Dropout {
    pub p: f64,
    pub key: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub salt: u64,
}

impl Dropout {
    /// Whether [`Self::apply`] drops anything now (a key is set and `p > 0`).
    pub fn active(&self) -> bool {
        self.key.load(std::sync::atomic::Ordering::Relaxed) != 0 && self.p > 0.0
    }

    /// `h` with each element zeroed with probability `p` and the rest scaled by 1/(1-p)
    /// (torch's `F.dropout`); `h` unchanged when the key is 0.
    pub fn apply(&self, h: &Tensor) -> candle_core::Result<Tensor> {
        let key = self.key.load(std::sync::atomic::Ordering::Relaxed);
        if key == 0 || self.p <= 0.0 {
            return Ok(h.clone());
        }
        let keep = 1.0 / (1.0 - self.p);
        let base = key ^ self.salt.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mask: Vec<f32> = (0..h.elem_count() as u64)
            .map(|i| {
                let mut z = base.wrapping_add(i.wrapping_mul(0xBF58_476D_1CE4_E5B9));
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                let u = (z >> 11) as f64 / (1u64 << 53) as f64;
                if u < self.p { 0.0 } else { keep as f32 }
            })
            .collect();
        let mask = Tensor::from_vec(mask, h.dims(), h.device())?.to_dtype(h.dtype())?;
        crate::model::grad::mul_frozen(h, &mask)
    }
}

/// `y = x W^T + b (+ delta)`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Param,
    pub bias: Option<Param>,
    pub delta: Option<LowRank>,
}

impl Linear {
    /// Load `{path}.weight` [out, in] and, when `bias`, `{path}.bias` [out].
    pub fn load(
        w: &mut Weights,
        path: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.param(&format!("{path}.weight"), &[out_dim, in_dim])?;
        let bias = if bias {
            Some(w.param(&format!("{path}.bias"), &[out_dim])?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            delta: None,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // Frozen layer + LoRA delta (no active dropout) on f32 CPU tensors: one fused op.
        if let (Param::Frozen(w), true, Some(d)) = (&self.weight, frozen(&self.bias), &self.delta)
            && !d.dropout.as_ref().is_some_and(Dropout::active)
        {
            let (a, b) = (param(&d.down), param(&d.up));
            if lowrank_cpu::lora_linear_applies(x, w, &a, &b) {
                let bias = self.bias.as_ref().map(|b| b.value());
                return Ok(lowrank_cpu::lora_linear(
                    x,
                    w,
                    bias.as_ref(),
                    &a,
                    &b,
                    d.scale,
                )?);
            }
        }
        let base = |x: &Tensor| -> candle_core::Result<Tensor> {
            let y = x.broadcast_matmul(&self.weight.value().t()?)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&b.value()),
                None => Ok(y),
            }
        };
        let mut y = match (&self.weight, frozen(&self.bias)) {
            (Param::Frozen(w), true)
                if fused_cpu::applies(&[x, w]) && w.is_contiguous() && w.rank() == 2 =>
            {
                let (wf, b) = (w.clone(), self.bias.as_ref().map(|b| b.value()));
                let w = w.clone();
                input_grad_only_cpu(
                    x,
                    move |s, l| fused_cpu::linear_bias_storage(s, l, &wf, b.as_ref()),
                    move |g| g.broadcast_matmul(&w),
                )?
            }
            (Param::Frozen(w), true) => {
                let w = w.clone();
                input_grad_only(x, base, move |g| g.broadcast_matmul(&w))?
            }
            _ => base(x)?,
        };
        if let Some(d) = &self.delta {
            // Adapter factors are f32 Vars; they compute in the layer's dtype.
            let dt = x.dtype();
            let h = x.broadcast_matmul(&param(&d.down).to_dtype(dt)?.t()?)?;
            let h = match &d.dropout {
                Some(dr) => dr.apply(&h)?,
                None => h,
            };
            let h = h.broadcast_matmul(&param(&d.up).to_dtype(dt)?.t()?)?;
            y = (y + (h * d.scale)?)?;
        }
        Ok(y)
    }
}

/// 2-D convolution, NCHW, square kernel.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Param,
    pub bias: Option<Param>,
    pub delta: Option<LowRank>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Load `{path}.weight` [out, in, k, k] and `{path}.bias` [out].
    pub fn load(
        w: &mut Weights,
        path: &str,
        (in_ch, out_ch, k): (usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let weight = w.param(&format!("{path}.weight"), &[out_ch, in_ch, k, k])?;
        let bias = Some(w.param(&format!("{path}.bias"), &[out_ch])?);
        Ok(Self {
            weight,
            bias,
            delta: None,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (pad, stride) = (self.padding, self.stride);
        let base = |x: &Tensor| -> candle_core::Result<Tensor> {
            let y = conv2d_trainable(x, &self.weight.value(), pad, stride)?;
            match &self.bias {
                Some(b) => y.broadcast_add(&b.value().reshape((1, (), 1, 1))?),
                None => Ok(y),
            }
        };
        let mut y = match (&self.weight, frozen(&self.bias)) {
            (Param::Frozen(w), true) if conv_cpu::applies(x, w, pad, stride) => {
                let (w, (_, _, h, wd)) = (w.clone(), x.dims4()?);
                let (wf, b) = (w.clone(), self.bias.as_ref().map(|b| b.value()));
                input_grad_only_cpu(
                    x,
                    move |s, l| conv_cpu::conv2d_bias_storage(s, l, &wf, b.as_ref(), pad),
                    move |g| conv2d_input_grad(g, &w, (h, wd), pad, stride),
                )?
            }
            (Param::Frozen(w), true) => {
                let (w, (_, _, h, wd)) = (w.clone(), x.dims4()?);
                input_grad_only(x, base, move |g| {
                    conv2d_input_grad(g, &w, (h, wd), pad, stride)
                })?
            }
            _ => base(x)?,
        };
        if let Some(d) = &self.delta {
            let dt = x.dtype();
            let h = conv2d_trainable(x, &param(&d.down).to_dtype(dt)?, pad, stride)?;
            let h = match &d.dropout {
                Some(dr) => dr.apply(&h)?,
                None => h,
            };
            let h = conv2d_trainable(&h, &param(&d.up).to_dtype(dt)?, 0, 1)?;
            y = (y + (h * d.scale)?)?;
        }
        Ok(y)
    }
}

impl Conv2d {
    /// `self.forward(nearest-upsample x to th x tw)`, diffusers' `Upsample2D`. Where the
    /// size doubles, the kernel is a frozen 3x3 with padding 1 and no adapter, the CPU
    /// computes it from `x` itself (`upconv_cpu`: four 2x2 phase convolutions, 4/9 of the
    /// multiply-adds, and the input gradient likewise), never building the upsampled image;
    /// unless the upsampled convolution takes Winograd's F(4x4, 3x3), which needs fewer
    /// still (the VAE decoder at 128 px and up, the UNet's 32x32 and 64x64 levels).
    pub fn forward_upsampled(&self, x: &Tensor, th: usize, tw: usize) -> Result<Tensor> {
        let (_, cin, h, w) = x.dims4()?;
        if let (Param::Frozen(wt), true, None) = (&self.weight, frozen(&self.bias), &self.delta)
            && (th, tw, self.stride, self.padding) == (2 * h, 2 * w, 1, 1)
            && upconv_cpu::applies(x, wt)
            && !winograd_cpu::takes_f43((th, tw), cin, wt.dim(0)?)
        {
            let b = self.bias.as_ref().map(|b| b.value());
            return Ok(upconv_cpu::upsample2x_conv3x3(x, wt, b.as_ref())?);
        }
        self.forward(&upsample_nearest(x, th, tw)?)
    }
}

fn frozen(p: &Option<Param>) -> bool {
    !matches!(p, Some(Param::Trainable(_)))
}

/// `conv2d(x, w)` (dilation 1, one group) whose backward is right for every input size and
/// fast. Stride 1 on the CPU (f32/f64) runs `conv_cpu`'s tap GEMMs without im2col for the
/// forward and both gradients. Otherwise: candle's conv2d forward, the input gradient
/// through [`conv2d_input_grad`] (candle's own backward takes the transposed convolution's
/// output padding from the height only, which breaks strided convolutions of inputs whose
/// height and width differ in parity, and runs a slow direct loop), the kernel gradient as
/// the correlation of the input with the output gradient (an im2col GEMM), cut to the
/// kernel size.
pub fn conv2d_trainable(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, h, wd) = x.dims4()?;
    crate::model::grad::with_backward2(
        x,
        w,
        |x, w| conv2d(x, w, pad, stride),
        move |x, w, g, need_x, need_w| {
            let dx = match need_x {
                true => Some(conv2d_input_grad(g, w, (h, wd), pad, stride)?),
                false => None,
            };
            let dw = match need_w {
                true if stride == 1 => match conv2d_s1_kernel_grad(x, g, w, pad)? {
                    Some(gw) => Some(gw),
                    None => Some(conv2d_kernel_grad(x, w, g, pad, stride)?),
                },
                true => Some(conv2d_kernel_grad(x, w, g, pad, stride)?),
                false => None,
            };
            Ok((dx, dw))
        },
    )
}

/// Kernel gradient of a conv2d as the correlation of the input with the output gradient
/// (candle's im2col conv), cut to the kernel size.
fn conv2d_kernel_grad(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let (_, _, k0, k1) = w.dims4()?;
    let gw = x
        .transpose(0, 1)?
        .conv2d(&g.transpose(0, 1)?.contiguous()?, pad, 1, stride, 1)?
        .transpose(0, 1)?;
    let gw = if gw.dim(2)? != k0 || gw.dim(3)? != k1 {
        gw.narrow(2, 0, k0)?.narrow(3, 0, k1)?
    } else {
        gw
    };
    gw.contiguous()
}

/// Gradient of a conv2d (dilation 1) w.r.t. its input of spatial size `(h, w)`.
///
/// Stride 1: a plain convolution of the output gradient with the kernel transposed
/// (in <-> out) and flipped, padded by `k - 1 - pad`: the tap-GEMM kernel of `conv_cpu` on
/// the CPU in f32/f64 (the kernel read through strides, no copy), else candle's im2col +
/// GEMM, several times faster than its direct `conv_transpose2d` loop. Strided: on the CPU in
/// f32/f64 one GEMM with the transposed kernel and a strided col2im (`conv_cpu`); elsewhere
/// the transposed convolution, grown by an output padding where the stride dropped input rows or columns
/// and cut back to the input size (height and width may differ in parity).
fn conv2d_input_grad(
    g: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    pad: usize,
    stride: usize,
) -> candle_core::Result<Tensor> {
    let k = w.dim(2)?;
    if stride == 1
        && let Some(dx) = conv2d_s1_input_grad(g, w, pad)?
    {
        return Ok(dx);
    }
    if let Some(dx) = conv_cpu::conv2d_strided_input_grad(g, w, (h, wd), pad, stride)? {
        return Ok(dx);
    }
    if stride == 1 && pad < k {
        let wf = if k == 1 {
            w.transpose(0, 1)?.contiguous()?
        } else {
            let rev: Vec<u32> = (0..k as u32).rev().collect();
            let rev = Tensor::from_vec(rev, k, w.device())?;
            w.transpose(0, 1)?
                .contiguous()?
                .index_select(&rev, 2)?
                .index_select(&rev, 3)?
                .contiguous()?
        };
        return g.conv2d(&wf, k - 1 - pad, 1, 1, 1);
    }
    let (_, _, gh, gw) = g.dims4()?;
    let covered = |n: usize| (n - 1) * stride + k - 2 * pad;
    let out_pad = h
        .saturating_sub(covered(gh))
        .max(wd.saturating_sub(covered(gw)));
    let dx = g.conv_transpose2d(w, pad, out_pad, stride, 1)?;
    if dx.dim(2)? == h && dx.dim(3)? == wd {
        Ok(dx)
    } else {
        dx.narrow(2, 0, h)?.narrow(3, 0, wd)
    }
}

/// Nearest upsampling of [N, C, h, w] to (th, tw) with a backward at every size (candle's
/// own backward only takes one integer factor for both sides; a latent whose size is not
/// a multiple of 8 upsamples 5 -> 9). Source index `floor(dst * in / out)`, as candle's
/// forward and torch's `nearest`; the gradient sums each output's gradient into its source.
pub fn upsample_nearest(x: &Tensor, th: usize, tw: usize) -> candle_core::Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let device = x.device().clone();
    let index = move |out: usize, inp: usize| -> candle_core::Result<Tensor> {
        // The same arithmetic as candle's forward, so every gradient goes where the value came from.
        let scale = inp as f64 / out as f64;
        let v: Vec<u32> = (0..out)
            .map(|i| ((i as f64 * scale) as usize).min(inp - 1) as u32)
            .collect();
        Tensor::from_vec(v, out, &device)
    };
    let (rows, cols) = (index(th, h)?, index(tw, w)?);
    crate::model::grad::input_grad_only(
        x,
        |x| x.upsample_nearest2d(th, tw),
        move |g| {
            let (n, c, _, _) = g.dims4()?;
            let zr = Tensor::zeros((n, c, h, tw), g.dtype(), g.device())?;
            let r = zr.index_add(&rows, &g.contiguous()?, 2)?;
            let zc = Tensor::zeros((n, c, h, w), g.dtype(), g.device())?;
            zc.index_add(&cols, &r.contiguous()?, 3)
        },
    )
}

/// Layer norm over the last dimension with affine weight and bias.
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Param,
    pub bias: Param,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &mut Weights, path: &str, dim: usize, eps: f64) -> Result<Self> {
        let weight = w.param(&format!("{path}.weight"), &[dim])?;
        let bias = w.param(&format!("{path}.bias"), &[dim])?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.weight.value(), &self.bias.value(), self.eps)
    }
}

/// Group norm over NC... input (statistics per sample and group of channels).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub weight: Param,
    pub bias: Param,
    pub groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(
        w: &mut Weights,
        path: &str,
        channels: usize,
        groups: usize,
        eps: f64,
    ) -> Result<Self> {
        let weight = w.param(&format!("{path}.weight"), &[channels])?;
        let bias = w.param(&format!("{path}.bias"), &[channels])?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm(
            x,
            self.groups,
            &self.weight.value(),
            &self.bias.value(),
            self.eps,
        )
    }

    /// `silu(self.forward(x))` in one pass where the fused kernel applies.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_silu(
            x,
            self.groups,
            &self.weight.value(),
            &self.bias.value(),
            self.eps,
        )
    }
}

/// Statistics are computed in f32 at least (f16/bf16 inputs are upcast and cast back).
fn upcast(x: &Tensor) -> Result<(Tensor, DType)> {
    let dt = x.dtype();
    let x = match dt {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32)?,
        _ => x.clone(),
    };
    Ok((x, dt))
}

/// Differentiable layer norm over the last dimension (biased variance, like PyTorch).
/// f32 CPU tensors take the fused kernel (one graph node, hand-written backward).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if fused_cpu::applies(&[x, weight, bias]) {
        return Ok(fused_cpu::layer_norm(x, weight, bias, eps)?);
    }
    layer_norm_composite(x, weight, bias, eps)
}

/// [`layer_norm`] from candle's ops (any device and dtype).
pub(crate) fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let (xf, dt) = upcast(x)?;
    let mean = xf.mean_keepdim(D::Minus1)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dt)?;
    Ok(scale_shift_frozen(&y, weight, bias)?)
}

/// Differentiable group norm for [N, C, ...] input; weight and bias are [C].
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    group_norm_act(x, groups, weight, bias, eps, false)
}

/// `silu(group_norm(x))`, the resnet blocks' pre-activation.
pub fn group_norm_silu(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    group_norm_act(x, groups, weight, bias, eps, true)
}

/// f32 CPU tensors take the fused kernel (one graph node, hand-written backward).
fn group_norm_act(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    if fused_cpu::applies(&[x, weight, bias]) {
        return Ok(fused_cpu::group_norm(x, groups, weight, bias, eps, silu)?);
    }
    let y = group_norm_composite(x, groups, weight, bias, eps)?;
    Ok(if silu { y.silu()? } else { y })
}

/// [`group_norm`] from candle's ops (any device and dtype).
pub(crate) fn group_norm_composite(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (n, c) = (dims[0], dims[1]);
    let (xf, dt) = upcast(x)?;
    let g = xf.reshape((n, groups, ()))?;
    let mean = g.mean_keepdim(D::Minus1)?;
    let gc = g.broadcast_sub(&mean)?;
    let var = gc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = gc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?
        .to_dtype(dt)?;
    let mut shape = vec![1, c];
    shape.resize(dims.len(), 1);
    Ok(scale_shift_frozen(
        &y,
        &weight.reshape(shape.as_slice())?,
        &bias.reshape(shape.as_slice())?,
    )?)
}

/// Differentiable softmax over the last dimension (max-shifted for stability; the shift is
/// a constant for backprop, which is exact because softmax is shift invariant).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

/// `x * sigmoid(1.702 x)` (CLIP ViT-L "quick_gelu").
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    let s = ((x * -1.702)?.exp()? + 1.0)?.recip()?;
    Ok((x * s)?)
}

/// diffusers' GEGLU after its projection: `h[.., :d] * gelu(h[.., d:])` for `h` [.., 2d]
/// (exact erf GELU); f32 CPU tensors take the fused kernel.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if fused_cpu::applies(&[h]) {
        return Ok(fused_cpu::geglu(h)?);
    }
    geglu_composite(h)
}

/// [`geglu`] from candle's ops (any device and dtype).
pub(crate) fn geglu_composite(h: &Tensor) -> Result<Tensor> {
    let inner = h.dim(D::Minus1)? / 2;
    let a = h.narrow(D::Minus1, 0, inner)?;
    let gate = h.narrow(D::Minus1, inner, inner)?;
    Ok((a * gelu(&gate)?)?)
}

/// Exact (erf) GELU, as `torch.nn.GELU()`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    Ok(x.gelu_erf()?)
}

#[cfg(test)]
mod tests {

    /// Trainable conv2d: output, input and kernel gradients equal PyTorch's (f64 fixture,
    /// tests/fixtures/gen_conv_fixtures.py) for stride 1 and 2, even, odd and mixed-parity
    /// inputs (candle's own backward fails on those), 1x1 and batch 2.
    #[test]
    fn trainable_conv2d_gradients_match_pytorch() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/conv/cases.json"
        );
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let dev = candle_core::Device::Cpu;
        let t = |v: &serde_json::Value| {
            let shape: Vec<usize> = serde_json::from_value(v["shape"].clone()).unwrap();
            let data: Vec<f64> = serde_json::from_value(v["data"].clone()).unwrap();
            Tensor::from_vec(data, shape, &dev).unwrap()
        };
        let vals =
            |v: &serde_json::Value| -> Vec<f64> { serde_json::from_value(v.clone()).unwrap() };
        let close = |got: &Tensor, want: Vec<f64>, what: &str| {
            let got = got.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            assert_eq!(got.len(), want.len(), "{what}");
            let m = want.iter().fold(0f64, |a, b| a.max(b.abs()));
            let e = got
                .iter()
                .zip(&want)
                .fold(0f64, |a, (g, w)| a.max((g - w).abs()));
            assert!(e <= 1e-10 * m, "{what}: max err {e} of {m}");
        };
        for (i, c) in cases.as_array().unwrap().iter().enumerate() {
            let (pad, stride) = (
                c["pad"].as_u64().unwrap() as usize,
                c["stride"].as_u64().unwrap() as usize,
            );
            let x = Var::from_tensor(&t(&c["x"])).unwrap();
            let w = Var::from_tensor(&t(&c["w"])).unwrap();
            let y = conv2d_trainable(x.as_tensor(), w.as_tensor(), pad, stride).unwrap();
            close(&y, vals(&c["y"]), &format!("case {i} y"));
            let g = (y * t(&c["r"]))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(
                g.get(x.as_tensor()).unwrap(),
                vals(&c["dx"]),
                &format!("case {i} dx"),
            );
            close(
                g.get(w.as_tensor()).unwrap(),
                vals(&c["dw"]),
                &format!("case {i} dw"),
            );
            // Kernel alone tracked (a LoCon factor on a frozen input): no input gradient.
            let y = conv2d_trainable(&x.as_tensor().detach(), w.as_tensor(), pad, stride).unwrap();
            let g = (y * t(&c["r"]))
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            close(
                g.get(w.as_tensor()).unwrap(),
                vals(&c["dw"]),
                &format!("case {i} dw only"),
            );
        }
    }
    use super::*;

    #[test]
    fn upsample_nearest_backward_at_any_size() {
        let x = Var::from_vec(
            (0..15).map(|v| v as f32).collect::<Vec<_>>(),
            (1, 1, 3, 5),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let (th, tw) = (5, 9);
        let r: Vec<f32> = (0..th * tw).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let rt = Tensor::from_vec(r.clone(), (1, 1, th, tw), &candle_core::Device::Cpu).unwrap();
        let y = upsample_nearest(x.as_tensor(), th, tw).unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            x.as_tensor()
                .upsample_nearest2d(th, tw)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
        let g = (y * rt).unwrap().sum_all().unwrap().backward().unwrap();
        let got: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut want = vec![0f32; 15];
        for i in 0..th {
            for j in 0..tw {
                let (si, sj) = (i * 3 / th, j * 5 / tw);
                want[si * 5 + sj] += r[i * tw + j];
            }
        }
        assert_eq!(got, want);
        // An integer factor gives candle's own gradient.
        let y2 = upsample_nearest(x.as_tensor(), 6, 10).unwrap();
        let y3 = x.as_tensor().upsample_nearest2d(6, 10).unwrap();
        let a = y2.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let b = y3.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            a.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            b.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
    use candle_core::Device;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        // Deterministic pseudo-random values without depending on candle's RNG.
        let n: usize = shape.iter().product();
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// Central finite difference of `f` w.r.t. element `i` of `x` (f64 for accuracy).
    fn fd(f: &dyn Fn(&Tensor) -> f64, x: &Tensor, i: usize) -> f64 {
        let v: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let h = 1e-4;
        let at = |d: f64| {
            let mut w = v.clone();
            w[i] += d;
            f(&Tensor::from_vec(w, x.dims(), &Device::Cpu).unwrap())
        };
        (at(h) - at(-h)) / (2.0 * h)
    }

    fn check_grad(op: &dyn Fn(&Tensor) -> Tensor, shape: &[usize]) {
        check_grad_with(op, shape, &randn(shape, 4).to_dtype(DType::F64).unwrap())
    }

    /// Gradient of sum(op(x) * r) w.r.t. x against central differences.
    fn check_grad_with(op: &dyn Fn(&Tensor) -> Tensor, shape: &[usize], r: &Tensor) {
        let x = randn(shape, 3).to_dtype(DType::F64).unwrap();
        let loss = |x: &Tensor| (op(x) * r).unwrap().sum_all().unwrap();
        let v = Var::from_tensor(&x).unwrap();
        let grads = loss(v.as_tensor()).backward().unwrap();
        let g: Vec<f64> = grads
            .get(v.as_tensor())
            .expect("no gradient")
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let f = |x: &Tensor| loss(x).to_scalar::<f64>().unwrap();
        let all: Vec<usize> = if g.len() <= 200 {
            (0..g.len()).collect()
        } else {
            vec![0, 1, g.len() / 2, g.len() - 1]
        };
        for i in all {
            let num = fd(&f, &x, i);
            assert!(
                (g[i] - num).abs() < 1e-6 * (1.0 + num.abs()),
                "element {i}: {} vs {num}",
                g[i]
            );
        }
    }

    #[test]
    fn softmax_gradient_matches_finite_differences() {
        check_grad(&|x| softmax_last_dim(x).unwrap(), &[3, 7]);
        let x = randn(&[2, 5], 9);
        let ours = softmax_last_dim(&x).unwrap();
        let fused = candle_nn::ops::softmax_last_dim(&x).unwrap();
        let diff = (ours - fused)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn layer_norm_and_group_norm_gradients_match_finite_differences() {
        let w = randn(&[6], 5).to_dtype(DType::F64).unwrap();
        let b = randn(&[6], 6).to_dtype(DType::F64).unwrap();
        check_grad(&|x| layer_norm(x, &w, &b, 1e-5).unwrap(), &[4, 6]);
        check_grad(&|x| group_norm(x, 3, &w, &b, 1e-5).unwrap(), &[2, 6, 2, 3]);
        check_grad(&|x| quick_gelu(x).unwrap(), &[10]);
        check_grad(&|x| gelu(x).unwrap(), &[10]);
    }

    /// Frozen layers (input gradient through the custom op): finite differences, also for
    /// a strided conv over an input whose height and width differ in parity.
    #[test]
    fn frozen_layer_input_gradients_match_finite_differences() {
        let f64t = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F64).unwrap();
        let frozen = |t: Tensor| Param::Frozen(t);
        for (stride, pad, k) in [(2, 1, 3), (1, 1, 3), (1, 0, 1)] {
            let conv = Conv2d {
                weight: frozen(f64t(&[3, 2, k, k], 7)),
                bias: Some(frozen(f64t(&[3], 8))),
                delta: None,
                stride,
                padding: pad,
            };
            let out_shape = conv
                .forward(&f64t(&[1, 2, 7, 6], 1))
                .unwrap()
                .dims()
                .to_vec();
            let r = f64t(&out_shape, 9);
            check_grad_with(&|x| conv.forward(x).unwrap(), &[1, 2, 7, 6], &r);
        }
        let lin = Linear {
            weight: frozen(f64t(&[5, 4], 10)),
            bias: Some(frozen(f64t(&[5], 11))),
            delta: None,
        };
        check_grad_with(
            &|x| lin.forward(x).unwrap(),
            &[2, 3, 4],
            &f64t(&[2, 3, 5], 12),
        );
    }

    /// `forward_upsampled` equals upsample-then-`forward` on every path: the phase kernels
    /// (frozen 3x3), a trainable weight (which must still get its gradient) and a size
    /// that is not a doubling; its input gradient matches finite differences.
    #[test]
    fn forward_upsampled_equals_upsample_then_conv() {
        let f64t = |shape: &[usize], seed| randn(shape, seed).to_dtype(DType::F64).unwrap();
        let (w, b) = (f64t(&[3, 2, 3, 3], 7), f64t(&[3], 8));
        let frozen = Conv2d {
            weight: Param::Frozen(w.clone()),
            bias: Some(Param::Frozen(b.clone())),
            delta: None,
            stride: 1,
            padding: 1,
        };
        let wv = Var::from_tensor(&w).unwrap();
        let trainable = Conv2d {
            weight: Param::Trainable(wv.clone()),
            ..frozen.clone()
        };
        let x = f64t(&[2, 2, 5, 4], 1);
        for (th, tw) in [(10, 8), (7, 9)] {
            let want = frozen
                .forward(&upsample_nearest(&x, th, tw).unwrap())
                .unwrap();
            for conv in [&frozen, &trainable] {
                let got = conv.forward_upsampled(&x, th, tw).unwrap();
                let d = (got - &want).unwrap().abs().unwrap().max_all().unwrap();
                assert!(d.to_scalar::<f64>().unwrap() < 1e-12, "{th}x{tw}");
            }
        }
        let y = trainable.forward_upsampled(&x, 10, 8).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(wv.as_tensor()).is_some());
        let r = f64t(&[1, 3, 10, 8], 9);
        check_grad_with(
            &|x| frozen.forward_upsampled(x, 10, 8).unwrap(),
            &[1, 2, 5, 4],
            &r,
        );
    }

    /// The reason these functions exist: candle's fused ops give the input no gradient.
    #[test]
    fn fused_candle_ops_lose_gradients_ours_do_not() {
        let x = Var::from_tensor(&randn(&[4, 8], 1)).unwrap();
        let r = randn(&[4, 8], 2);
        let w = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap();
        let has_grad = |y: Tensor| {
            let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(x.as_tensor()).is_some()
        };
        assert!(!has_grad(
            candle_nn::ops::softmax_last_dim(x.as_tensor()).unwrap()
        ));
        assert!(!has_grad(
            candle_nn::ops::layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap()
        ));
        assert!(has_grad(softmax_last_dim(x.as_tensor()).unwrap()));
        assert!(has_grad(layer_norm(x.as_tensor(), &w, &b, 1e-5).unwrap()));
    }

    /// A low-rank delta equals merging `scale * up @ down` into the base weight.
    #[test]
    fn low_rank_delta_equals_merged_weight() {
        let dev = Device::Cpu;
        let (out_c, in_c, r, k) = (4, 3, 2, 3);
        let base = randn(&[out_c, in_c, k, k], 1);
        let down = randn(&[r, in_c, k, k], 2);
        let up = randn(&[out_c, r, 1, 1], 3);
        let bias = Param::Frozen(randn(&[out_c], 4));
        let conv = Conv2d {
            weight: Param::Frozen(base.clone()),
            bias: Some(bias.clone()),
            delta: Some(LowRank {
                down: Var::from_tensor(&down).unwrap(),
                up: Var::from_tensor(&up).unwrap(),
                scale: 0.5,
                dropout: None,
            }),
            stride: 1,
            padding: 1,
        };
        let merged_w = (up
            .reshape((out_c, r))
            .unwrap()
            .matmul(&down.reshape((r, ())).unwrap())
            .unwrap()
            * 0.5)
            .unwrap()
            .reshape(base.dims())
            .unwrap();
        let merged = Conv2d {
            weight: Param::Frozen((base + merged_w).unwrap()),
            bias: Some(bias),
            delta: None,
            stride: 1,
            padding: 1,
        };
        let x = randn(&[2, in_c, 5, 5], 5);
        let d = (conv.forward(&x).unwrap() - merged.forward(&x).unwrap()).unwrap();
        assert!(
            d.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );

        let lin_base = randn(&[4, 3], 6);
        let (ld, lu) = (randn(&[2, 3], 7), randn(&[4, 2], 8));
        let lin = Linear {
            weight: Param::Frozen(lin_base.clone()),
            bias: None,
            delta: Some(LowRank {
                down: Var::from_tensor(&ld).unwrap(),
                up: Var::from_tensor(&lu).unwrap(),
                scale: 2.0,
                dropout: None,
            }),
        };
        let merged = Linear {
            weight: Param::Frozen((lin_base + (lu.matmul(&ld).unwrap() * 2.0).unwrap()).unwrap()),
            bias: None,
            delta: None,
        };
        let x = randn(&[2, 5, 3], 9);
        let d = (lin.forward(&x).unwrap() - merged.forward(&x).unwrap()).unwrap();
        assert!(
            d.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                < 1e-5
        );
        let _ = dev;
    }
}
