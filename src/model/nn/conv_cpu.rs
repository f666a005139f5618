//! Stride-1 convolutions on the CPU as k*k GEMMs over a padded input, without im2col.
//!
//! The input is padded once into `[C_in, B, Hp, Wp]` (`Hp = H + 2p`, `Wp = W + 2p`) with
//! `k - 1` spare zeros at the end of each channel, and each channel viewed as one flat row.
//! For the tap `(ty, tx)` of the kernel, the window of that row starting at `ty * Wp + tx`
//! holds, at column `j = b * Hp * Wp + oy * Wp + ox`, exactly the input pixel that tap
//! multiplies for output `(b, oy, ox)`. So the "wide" output `[C_out, N]` is the sum over
//! taps of `W_tap [C_out, C_in] @ window [C_in, N]`: k*k plain GEMMs with contiguous rows
//! (the `gemm` crate, strides instead of copies), where a few columns per row (`ox >= OW`)
//! and rows between images are garbage and simply not copied out.
//!
//! The input gradient of a stride-1 convolution is the same operation with the kernel
//! transposed (in <-> out) and flipped, padded by `k - 1 - p` (strides of the same buffer,
//! no copy of the kernel); the kernel gradient is k*k GEMMs of the wide output gradient
//! (zero in the garbage columns) with the transposed windows.
//!
//! Small images (32x32 and below, where the kernel is by far the larger operand) take one
//! GEMM over an explicit im2col matrix instead, forward and kernel gradient, and the input
//! gradient one GEMM with the transposed kernel followed by a col2im sum: the kernel is read
//! once rather than once per tap.

use candle_core::{CpuStorage, Device, Layout, Shape, Storage, Tensor, WithDType};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// A 4-D kernel seen through strides: element (o, i, ty, tx) is at
/// `base + o * so + i * si + ty * sy + tx * sx` (strides may be negative: a flip).
#[derive(Clone, Copy)]
pub(super) struct Kernel<'a, T> {
    pub(super) data: &'a [T],
    base: isize,
    pub(super) so: isize,
    pub(super) si: isize,
    sy: isize,
    sx: isize,
    pub(super) cout: usize,
    pub(super) cin: usize,
    k: usize,
}

impl<'a, T> Kernel<'a, T> {
    /// A contiguous `[cout, cin, k, k]` kernel as stored.
    pub(super) fn plain(data: &'a [T], cout: usize, cin: usize, k: usize) -> Self {
        let kk = (k * k) as isize;
        Self {
            data,
            base: 0,
            so: cin as isize * kk,
            si: kk,
            sy: k as isize,
            sx: 1,
            cout,
            cin,
            k,
        }
    }

    /// The kernel of the input gradient: in and out swapped, both spatial axes flipped.
    pub(super) fn transposed_flipped(self) -> Self {
        let last = (self.k - 1) as isize;
        Self {
            base: self.base + last * self.sy + last * self.sx,
            so: self.si,
            si: self.so,
            sy: -self.sy,
            sx: -self.sx,
            cout: self.cin,
            cin: self.cout,
            ..self
        }
    }

    /// Where this view is [`Self::transposed_flipped`] of a contiguous kernel: that kernel.
    pub(super) fn unflipped(&self) -> Option<Self> {
        let plain = || Kernel::plain(self.data, self.cin, self.cout, self.k);
        let t = plain().transposed_flipped();
        let same =
            (t.base, t.so, t.si, t.sy, t.sx) == (self.base, self.so, self.si, self.sy, self.sx);
        same.then(plain)
    }

    /// Input channels `i0..i1` of this kernel.
    pub(super) fn input_channels(self, (i0, i1): (usize, usize)) -> Self {
        Self {
            base: self.base + i0 as isize * self.si,
            cin: i1 - i0,
            ..self
        }
    }

    /// Offset of tap (ty, tx) at (o, i) = (0, 0); in bounds for every (o, i) (checked).
    pub(super) fn tap(&self, ty: usize, tx: usize) -> usize {
        let at = |o: usize, i: usize| {
            self.base
                + o as isize * self.so
                + i as isize * self.si
                + ty as isize * self.sy
                + tx as isize * self.sx
        };
        let (lo, hi) = (at(0, 0), at(self.cout - 1, self.cin - 1));
        let (c1, c2) = (at(self.cout - 1, 0), at(0, self.cin - 1));
        let min = lo.min(hi).min(c1).min(c2);
        let max = lo.max(hi).max(c1).max(c2);
        assert!(
            min >= 0 && (max as usize) < self.data.len(),
            "conv kernel view out of bounds"
        );
        lo as usize
    }
}

/// Geometry of one padded stride-1 convolution.
#[derive(Clone, Copy, Debug)]
pub(super) struct Geom {
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) pad: usize,
    pub(super) k: usize,
}

impl Geom {
    fn hp(&self) -> usize {
        self.h + 2 * self.pad
    }
    pub(super) fn wp(&self) -> usize {
        self.w + 2 * self.pad
    }
    fn oh(&self) -> usize {
        self.hp() + 1 - self.k
    }
    fn ow(&self) -> usize {
        self.wp() + 1 - self.k
    }
    pub(super) fn img(&self) -> usize {
        self.hp() * self.wp()
    }
    /// Length of one padded channel row: all images plus the spare the last taps read.
    pub(super) fn row(&self) -> usize {
        self.b * self.img() + self.k - 1
    }
    /// Wide output columns: up to the last valid output of the last image.
    pub(super) fn n(&self) -> usize {
        (self.b - 1) * self.img() + self.oh() * self.wp()
    }
}

fn parallelism() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// A GEMM operand: element (r, c) at `r * rs + c * cs` of `data` (strides non-negative).
#[derive(Clone, Copy)]
pub(super) struct Mat<'a, T> {
    data: &'a [T],
    rs: isize,
    cs: isize,
}

impl<'a, T> Mat<'a, T> {
    pub(super) fn new(data: &'a [T], rs: isize, cs: isize) -> Self {
        Self { data, rs, cs }
    }
}

/// `dst = [dst +] lhs (m x k) @ rhs (k x n)` through the `gemm` crate on all threads, with
/// `dst`'s element (r, c) at `r * drs + c * dcs`. Every index the strides reach is checked
/// against its slice first.
pub(super) fn matmul<T: WithDType>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dstride: (isize, isize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    matmul_on(mnk, dst, dstride, accumulate, (lhs, rhs), parallelism());
}

/// [`matmul`] on the calling thread only (for many small GEMMs run side by side).
pub(super) fn matmul_one_thread<T: WithDType>(
    mnk: (usize, usize, usize),
    dst: &mut [T],
    dstride: (isize, isize),
    accumulate: bool,
    lhs: Mat<T>,
    rhs: Mat<T>,
) {
    matmul_on(mnk, dst, dstride, accumulate, (lhs, rhs), Parallelism::None);
}

fn matmul_on<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: &mut [T],
    (drs, dcs): (isize, isize),
    accumulate: bool,
    (lhs, rhs): (Mat<T>, Mat<T>),
    par: Parallelism,
) {
    // The last index (rows x cols) reaches, or None when the strides are negative.
    let last = |rs: isize, cs: isize, rows: usize, cols: usize| {
        let (rs, cs) = (usize::try_from(rs).ok()?, usize::try_from(cs).ok()?);
        Some((rows - 1) * rs + (cols - 1) * cs)
    };
    if m == 0 || n == 0 {
        return;
    }
    assert!(k > 0, "conv GEMM with an empty inner dimension");
    let fits = |len: usize, at: Option<usize>| at.is_some_and(|i| i < len);
    assert!(
        fits(dst.len(), last(drs, dcs, m, n))
            && fits(lhs.data.len(), last(lhs.rs, lhs.cs, m, k))
            && fits(rhs.data.len(), last(rhs.rs, rhs.cs, k, n)),
        "conv GEMM operand out of bounds"
    );
    let one = T::from_f64(1.0);
    // SAFETY: the assert bounds every element the strides address; `dst` is exclusively
    // borrowed and does not alias the shared operands.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dcs,
            drs,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs,
            lhs.rs,
            rhs.data.as_ptr(),
            rhs.cs,
            rhs.rs,
            one,
            one,
            false,
            false,
            false,
            par,
        );
    }
}

/// `x [B, C, H, W]` (contiguous) padded by `g.pad` into `[C, B, Hp, Wp]` + spare per channel.
pub(super) fn pad_input<T: WithDType>(x: &[T], c: usize, g: Geom) -> Vec<T> {
    let zero = T::from_f64(0.0);
    let (row, img, wp, p) = (g.row(), g.img(), g.wp(), g.pad);
    let mut out = vec![zero; c * row];
    out.par_chunks_mut(row).enumerate().for_each(|(ci, dst)| {
        for b in 0..g.b {
            let src = &x[(b * c + ci) * g.h * g.w..][..g.h * g.w];
            let dst = &mut dst[b * img..];
            for y in 0..g.h {
                dst[(y + p) * wp + p..][..g.w].copy_from_slice(&src[y * g.w..][..g.w]);
            }
        }
    });
    out
}

/// Images of at most this many pixels (SD1.5's 32x32, 16x16 and 8x8 levels: 640-2560
/// channels, a few hundred to a thousand columns) convolve as one GEMM over an explicit
/// im2col matrix instead of k*k tap GEMMs: there the kernel (up to 118 MB) is the large
/// operand, and each tap GEMM packed a strided slice of it, reading it k*k times from
/// memory. The im2col matrix is at most ~75 MB (1920 channels at 32x32). Measured
/// (`bench_unet conv`, 2-core AVX2 EPYC): forward + input gradient 0.073 -> 0.031 s at
/// 1280 ch 8x8, 0.132 -> 0.100 s at 16x16, 0.105 -> 0.094 s at 640 ch 32x32; at 64x64 the
/// tap GEMMs stay ahead (forward 0.045 vs 0.051 s).
const SMALL_HW: usize = 32 * 32;

pub(super) fn small(g: Geom) -> bool {
    g.h * g.w <= SMALL_HW
}

/// Whether `kern` is a stored `[Cout, Cin, k, k]` kernel, i.e. a row-major `[Cout, Cin*k*k]`
/// matrix.
fn is_plain<T>(kern: &Kernel<T>) -> bool {
    let kk = (kern.k * kern.k) as isize;
    kern.base == 0
        && kern.sx == 1
        && kern.sy == kern.k as isize
        && kern.si == kk
        && kern.so == kern.cin as isize * kk
}

/// The im2col matrix `[Cin * k * k, N]` of a padded input: row `(i, ty, tx)` is the window
/// of channel `i` for tap `(ty, tx)` (the tap GEMMs' right-hand sides, stacked).
fn im2col<T: WithDType>(xp: &[T], cin: usize, g: Geom) -> Vec<T> {
    let (n, row, wp, k) = (g.n(), g.row(), g.wp(), g.k);
    let mut out = vec![T::from_f64(0.0); cin * k * k * n];
    out.par_chunks_mut(k * k * n)
        .enumerate()
        .for_each(|(i, dst)| {
            for ty in 0..k {
                for tx in 0..k {
                    dst[(ty * k + tx) * n..][..n]
                        .copy_from_slice(&xp[i * row + ty * wp + tx..][..n]);
                }
            }
        });
    out
}

/// Input gradient `[B, Cin, h, w]` of a convolution with the plain kernel `kern`, padding
/// `pad` and stride `stride` from `dy [B, Cout, OH, OW]`: per image one GEMM
/// `W^T [Cin*k*k, Cout] @ dy [Cout, OH*OW]`, then each input pixel sums the entries of the
/// taps that read it (col2im); pixels no window read (dropped by the stride) stay zero. For
/// small images, where it reads the kernel once, and for strided convolutions.
fn input_grad_col2im<T: WithDType>(
    dy: &[T],
    (b, oh, ow): (usize, usize, usize),
    kern: Kernel<T>,
    (pad, stride): (usize, usize),
    (h, w): (usize, usize),
) -> Vec<T> {
    let (cin, cout, k) = (kern.cin, kern.cout, kern.k);
    let (kk, hw) = (k * k, oh * ow);
    let mut dcols = vec![T::from_f64(0.0); cin * kk * hw];
    let mut dx = vec![T::from_f64(0.0); b * cin * h * w];
    // Input index of output index `o` for tap `t`, where the window reads the input.
    let at = |o: usize, t: usize, n: usize| (o * stride + t).checked_sub(pad).filter(|&i| i < n);
    for (src, dxb) in dy
        .chunks_exact(cout * hw)
        .zip(dx.chunks_exact_mut(cin * h * w))
    {
        matmul(
            (cin * kk, hw, cout),
            &mut dcols,
            (hw as isize, 1),
            false,
            Mat::new(kern.data, 1, (cin * kk) as isize),
            Mat::new(src, hw as isize, 1),
        );
        dxb.par_chunks_mut(h * w).enumerate().for_each(|(i, dst)| {
            let taps = &dcols[i * kk * hw..][..kk * hw];
            for ty in 0..k {
                for tx in 0..k {
                    let src = &taps[(ty * k + tx) * hw..][..hw];
                    // Output columns ox0..ox1 read input columns ix0, ix0 + stride, ...
                    let ox0 = pad.saturating_sub(tx).div_ceil(stride);
                    let ox1 = (w + pad).saturating_sub(tx).div_ceil(stride).min(ow);
                    if ox0 >= ox1 {
                        continue;
                    }
                    let ix0 = ox0 * stride + tx - pad;
                    for oy in 0..oh {
                        let Some(iy) = at(oy, ty, h) else { continue };
                        let s = &src[oy * ow + ox0..oy * ow + ox1];
                        let d = &mut dst[iy * w + ix0..(iy + 1) * w];
                        if stride == 1 {
                            d.iter_mut().zip(s).for_each(|(a, &v)| *a += v);
                        } else {
                            d.iter_mut()
                                .step_by(stride)
                                .zip(s)
                                .for_each(|(a, &v)| *a += v);
                        }
                    }
                }
            }
        });
    }
    dx
}

/// Wide `[C, N]` rows back to `[B, C, OH, OW]`, plus `bias[c]` on every channel when given.
pub(super) fn unwide<T: WithDType>(wide: &[T], c: usize, g: Geom, bias: Option<&[T]>) -> Vec<T> {
    let (oh, ow, wp, n) = (g.oh(), g.ow(), g.wp(), g.n());
    let mut out = vec![T::from_f64(0.0); g.b * c * oh * ow];
    out.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(bc, dst)| {
            let (b, co) = (bc / c, bc % c);
            let src = &wide[co * n + b * g.img()..];
            for y in 0..oh {
                let (d, s) = (&mut dst[y * ow..][..ow], &src[y * wp..][..ow]);
                match bias {
                    Some(bv) => d.iter_mut().zip(s).for_each(|(o, &v)| *o = v + bv[co]),
                    None => d.copy_from_slice(s),
                }
            }
        });
    out
}

/// The stride-1 convolution of `x [B, Cin, H, W]` with `kern`, padding `pad`, plus `bias`
/// per output channel when given: `[B, Cout, OH, OW]`.
fn conv_s1<T: WithDType>(
    x: &[T],
    (b, h, w): (usize, usize, usize),
    kern: Kernel<T>,
    pad: usize,
    bias: Option<&[T]>,
) -> Vec<T> {
    let g = Geom {
        b,
        h,
        w,
        pad,
        k: kern.k,
    };
    let (cin, cout, n, row) = (kern.cin, kern.cout, g.n(), g.row());
    if g.k == 1 && pad == 0 {
        return conv_1x1(x, b, h * w, kern, bias);
    }
    if super::winograd_cpu::applies(g.k, pad, (h, w), cin, cout) {
        return super::winograd_cpu::conv3x3(x, (b, h, w), &kern, bias);
    }
    let xp = pad_input(x, cin, g);
    let mut wide = vec![T::from_f64(0.0); cout * n];
    if small(g) && is_plain(&kern) {
        let cols = im2col(&xp, cin, g);
        drop(xp);
        let kdim = cin * g.k * g.k;
        matmul(
            (cout, n, kdim),
            &mut wide,
            (n as isize, 1),
            false,
            Mat::new(kern.data, kdim as isize, 1),
            Mat::new(&cols, n as isize, 1),
        );
        return unwide(&wide, cout, g, bias);
    }
    for ty in 0..g.k {
        for tx in 0..g.k {
            let off = ty * g.wp() + tx;
            let lhs = &kern.data[kern.tap(ty, tx)..];
            let rhs = &xp[off..];
            matmul(
                (cout, n, cin),
                &mut wide,
                (n as isize, 1),
                ty + tx > 0,
                Mat::new(lhs, kern.so, kern.si),
                Mat::new(rhs, row as isize, 1),
            );
        }
    }
    unwide(&wide, cout, g, bias)
}

/// A 1x1 convolution without padding: per image `W [Cout, Cin] @ x [Cin, HW]` straight
/// into the output (the kernel through its strides; the bias, when given, as the GEMM's
/// initial value).
fn conv_1x1<T: WithDType>(
    x: &[T],
    b: usize,
    hw: usize,
    kern: Kernel<T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let (cin, cout) = (kern.cin, kern.cout);
    let mut out = vec![T::from_f64(0.0); b * cout * hw];
    if let Some(bv) = bias {
        out.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(r, row)| row.fill(bv[r % cout]));
    }
    let lhs = &kern.data[kern.tap(0, 0)..];
    for bi in 0..b {
        let (src, dst) = (
            &x[bi * cin * hw..][..cin * hw],
            &mut out[bi * cout * hw..][..cout * hw],
        );
        matmul(
            (cout, hw, cin),
            dst,
            (hw as isize, 1),
            bias.is_some(),
            Mat::new(lhs, kern.so, kern.si),
            Mat::new(src, hw as isize, 1),
        );
    }
    out
}

/// Kernel gradient `[Cout, Cin, k, k]` of the stride-1 convolution of `x [B, Cin, H, W]`
/// (padding `pad`) given the output gradient `dy [B, Cout, OH, OW]`.
fn conv_s1_kernel_grad<T: WithDType>(
    x: &[T],
    dy: &[T],
    (b, cin, h, w): (usize, usize, usize, usize),
    (cout, k): (usize, usize),
    pad: usize,
) -> Vec<T> {
    if let Some(dw) = super::winograd_cpu::kernel_grad3x3(x, dy, (b, h, w), (cin, cout), (k, pad)) {
        return dw;
    }
    let g = Geom { b, h, w, pad, k };
    if k == 1 && pad == 0 {
        // dW = sum over images of dy [Cout, HW] @ x^T [HW, Cin].
        let hw = h * w;
        let mut dw = vec![T::from_f64(0.0); cout * cin];
        for bi in 0..b {
            let (xs, ds) = (
                &x[bi * cin * hw..][..cin * hw],
                &dy[bi * cout * hw..][..cout * hw],
            );
            matmul(
                (cout, cin, hw),
                &mut dw,
                (cin as isize, 1),
                bi > 0,
                Mat::new(ds, hw as isize, 1),
                Mat::new(xs, 1, hw as isize),
            );
        }
        return dw;
    }
    let (n, row, wp, oh, ow) = (g.n(), g.row(), g.wp(), g.oh(), g.ow());
    let xp = pad_input(x, cin, g);
    // dy in the wide layout, zero in the garbage columns.
    let mut wide = vec![T::from_f64(0.0); cout * n];
    wide.par_chunks_mut(n).enumerate().for_each(|(co, dst)| {
        for bi in 0..b {
            let src = &dy[(bi * cout + co) * oh * ow..];
            for y in 0..oh {
                dst[bi * g.img() + y * wp..][..ow].copy_from_slice(&src[y * ow..][..ow]);
            }
        }
    });
    let mut dw = vec![T::from_f64(0.0); cout * cin * k * k];
    if small(g) {
        // dW [Cout, Cin*k*k] = wide dy [Cout, N] @ im2col^T [N, Cin*k*k], one GEMM.
        let cols = im2col(&xp, cin, g);
        let kdim = cin * k * k;
        matmul(
            (cout, kdim, n),
            &mut dw,
            (kdim as isize, 1),
            false,
            Mat::new(&wide, n as isize, 1),
            Mat::new(&cols, 1, n as isize),
        );
        return dw;
    }
    let kk = (k * k) as isize;
    for ty in 0..k {
        for tx in 0..k {
            let rhs = &xp[ty * wp + tx..];
            let dst = &mut dw[ty * k + tx..];
            matmul(
                (cout, cin, n),
                dst,
                (cin as isize * kk, kk),
                false,
                Mat::new(&wide, n as isize, 1),
                Mat::new(rhs, 1, row as isize),
            );
        }
    }
    dw
}

/// A contiguous CPU tensor's elements (a copy only where it is not contiguous).
pub(super) fn with_slice<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        candle_core::bail!("conv: tensor not on the CPU")
    };
    let v: &[T] = T::cpu_storage_as_slice(c)?;
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("conv: non-contiguous tensor".into()))?;
    f(&v[a..b])
}

/// Whether [`conv2d`] runs the tap-GEMM kernel for these operands (CPU, f32/f64, stride 1,
/// no empty dimension and an output of at least one pixel); otherwise it is candle's
/// `conv2d`.
fn fast(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> candle_core::Result<bool> {
    let (b, c, h, wd) = x.dims4()?;
    let (o, i, k, _) = w.dims4()?;
    Ok(matches!(x.device(), Device::Cpu)
        && b * c * o * i * k > 0
        && matches!(x.dtype(), candle_core::DType::F32 | candle_core::DType::F64)
        && x.dtype() == w.dtype()
        && stride == 1
        && w.dim(3)? == k
        && h + 2 * pad >= k
        && wd + 2 * pad >= k)
}

fn run<T: WithDType>(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    transpose: bool,
) -> candle_core::Result<Tensor> {
    let (b, cin_x, h, wd) = x.dims4()?;
    let (o, i, k, _) = w.dims4()?;
    let winograd = super::winograd_cpu::applies(k, pad, (h, wd), o, i);
    if transpose && pad < k && h * wd <= SMALL_HW && !winograd {
        // x is the output gradient and `pad` the transposed padding k - 1 - p.
        let (dh, dw) = (h + 2 * pad + 1 - k, wd + 2 * pad + 1 - k);
        let dx = with_slice(x, |xs: &[T]| {
            with_slice(w, |ws: &[T]| {
                if o != cin_x {
                    candle_core::bail!("conv: output gradient has {cin_x} channels, kernel {o}")
                }
                Ok(input_grad_col2im(
                    xs,
                    (b, h, wd),
                    Kernel::plain(ws, o, i, k),
                    (k - 1 - pad, 1),
                    (dh, dw),
                ))
            })
        })?;
        return Tensor::from_vec(dx, (b, i, dh, dw), &Device::Cpu);
    }
    let y = with_slice(x, |xs: &[T]| {
        with_slice(w, |ws: &[T]| {
            let mut kern = Kernel::plain(ws, o, i, k);
            if transpose {
                kern = kern.transposed_flipped();
            }
            if kern.cin != cin_x {
                candle_core::bail!("conv: input has {cin_x} channels, kernel {}", kern.cin)
            }
            Ok((conv_s1(xs, (b, h, wd), kern, pad, None), kern.cout))
        })
    })?;
    let (out, cout) = y;
    let g = Geom {
        b,
        h,
        w: wd,
        pad,
        k,
    };
    Tensor::from_vec(out, (b, cout, g.oh(), g.ow()), &Device::Cpu)
}

/// Whether the tap-GEMM kernel runs `conv2d(x, w, pad, stride)`.
pub(crate) fn applies(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> bool {
    fast(x, w, pad, stride).unwrap_or(false)
}

/// A CPU convolution that a custom op's forward runs on its input storage (see
/// [`conv_storage`]).
pub(super) trait StorageConv {
    /// Output height and width for an `h x w` input and a `k x k` kernel.
    fn out_hw(&self, h: usize, w: usize, k: usize) -> (usize, usize);
    /// `[b, o, out_hw]` from the input `xs [b, cin, h, w]` and the kernel `ws [o, cin, k, k]`
    /// (`out_k = (o, k)`), plus `bias [o]`.
    fn run<T: WithDType>(
        &self,
        xs: &[T],
        dims: (usize, usize, usize, usize),
        ws: &[T],
        out_k: (usize, usize),
        bias: Option<&[T]>,
    ) -> Vec<T>;
}

/// The stride-1 convolution of [`conv_s1`] with padding `pad`.
struct PlainConv {
    pad: usize,
}

impl StorageConv for PlainConv {
    fn out_hw(&self, h: usize, w: usize, k: usize) -> (usize, usize) {
        let g = Geom {
            b: 1,
            h,
            w,
            pad: self.pad,
            k,
        };
        (g.oh(), g.ow())
    }

    fn run<T: WithDType>(
        &self,
        xs: &[T],
        (b, cin, h, w): (usize, usize, usize, usize),
        ws: &[T],
        (o, k): (usize, usize),
        bias: Option<&[T]>,
    ) -> Vec<T> {
        conv_s1(xs, (b, h, w), Kernel::plain(ws, o, cin, k), self.pad, bias)
    }
}

/// `conv(x, w) + bias` for a custom op's forward: the input as the op receives it (a
/// contiguous CPU storage), the result as a fresh storage, no copy on either side. Only
/// where the caller's `applies` said so (CPU, f32/f64, the kernel's dtype).
pub(super) fn conv_storage(
    x: &CpuStorage,
    l: &Layout,
    w: &Tensor,
    bias: Option<&Tensor>,
    conv: &impl StorageConv,
) -> candle_core::Result<(CpuStorage, Shape)> {
    fn go<T: WithDType>(
        x: &CpuStorage,
        l: &Layout,
        w: &Tensor,
        bias: Option<&Tensor>,
        conv: &impl StorageConv,
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let (b, cin, h, wd) = l.shape().dims4()?;
        let (o, i, k, _) = w.dims4()?;
        if i != cin {
            candle_core::bail!("conv: input has {cin} channels, kernel {i}")
        }
        let (a, e) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("conv: non-contiguous input".into()))?;
        let xs = &T::cpu_storage_as_slice(x)?[a..e];
        let bias: Option<Vec<T>> = match bias {
            Some(bt) => Some(bt.flatten_all()?.to_vec1::<T>()?),
            None => None,
        };
        let out = with_slice(w, |ws: &[T]| {
            Ok(conv.run(xs, (b, cin, h, wd), ws, (o, k), bias.as_deref()))
        })?;
        let (oh, ow) = conv.out_hw(h, wd, k);
        Ok((out, Shape::from((b, o, oh, ow))))
    }
    Ok(match x {
        CpuStorage::F32(_) => {
            let (v, s) = go::<f32>(x, l, w, bias, conv)?;
            (CpuStorage::F32(v), s)
        }
        CpuStorage::F64(_) => {
            let (v, s) = go::<f64>(x, l, w, bias, conv)?;
            (CpuStorage::F64(v), s)
        }
        _ => candle_core::bail!("conv: the fast kernels take f32 or f64"),
    })
}

/// `conv2d(x, w, pad) + bias` (stride 1) for a custom op's forward, as [`conv_storage`].
/// Only where [`applies`] said so.
pub(crate) fn conv2d_bias_storage(
    x: &CpuStorage,
    l: &Layout,
    w: &Tensor,
    bias: Option<&Tensor>,
    pad: usize,
) -> candle_core::Result<(CpuStorage, Shape)> {
    conv_storage(x, l, w, bias, &PlainConv { pad })
}

/// `x.conv2d(w, pad, stride, 1, 1)`, through the tap-GEMM kernel where it applies.
pub fn conv2d(x: &Tensor, w: &Tensor, pad: usize, stride: usize) -> candle_core::Result<Tensor> {
    if !fast(x, w, pad, stride)? {
        return x.conv2d(w, pad, stride, 1, 1);
    }
    match x.dtype() {
        candle_core::DType::F32 => run::<f32>(x, w, pad, false),
        _ => run::<f64>(x, w, pad, false),
    }
}

/// Input gradient of a stride-1 `conv2d(x, w, pad)` (`pad < k`) from the output gradient
/// `dy`: the convolution of `dy` with `w` transposed and flipped, padded by `k - 1 - pad`.
/// `None` where the fast kernel does not apply.
pub fn conv2d_s1_input_grad(
    dy: &Tensor,
    w: &Tensor,
    pad: usize,
) -> candle_core::Result<Option<Tensor>> {
    let k = w.dim(2)?;
    if pad >= k || !fast(dy, w, k - 1 - pad, 1)? {
        return Ok(None);
    }
    let p = k - 1 - pad;
    Ok(Some(match dy.dtype() {
        candle_core::DType::F32 => run::<f32>(dy, w, p, true)?,
        _ => run::<f64>(dy, w, p, true)?,
    }))
}

/// Kernel gradient of a stride-1 `conv2d(x, w, pad)` from the output gradient `dy`;
/// `None` where the fast kernel does not apply.
pub fn conv2d_s1_kernel_grad(
    x: &Tensor,
    dy: &Tensor,
    w: &Tensor,
    pad: usize,
) -> candle_core::Result<Option<Tensor>> {
    if !fast(x, w, pad, 1)? || dy.dtype() != x.dtype() {
        return Ok(None);
    }
    let (b, cin, h, wd) = x.dims4()?;
    let (cout, _, k, _) = w.dims4()?;
    let g = Geom {
        b,
        h,
        w: wd,
        pad,
        k,
    };
    if dy.dims() != [b, cout, g.oh(), g.ow()] {
        candle_core::bail!(
            "conv: output gradient {:?} does not match the output",
            dy.dims()
        )
    }
    fn go<T: WithDType>(
        x: &Tensor,
        dy: &Tensor,
        dims: (usize, usize, usize, usize),
        ck: (usize, usize),
        pad: usize,
    ) -> candle_core::Result<Tensor> {
        let dw = with_slice(x, |xs: &[T]| {
            with_slice(dy, |ds: &[T]| {
                Ok(conv_s1_kernel_grad(xs, ds, dims, ck, pad))
            })
        })?;
        Tensor::from_vec(dw, (ck.0, dims.1, ck.1, ck.1), &Device::Cpu)
    }
    let dims = (b, cin, h, wd);
    Ok(Some(match x.dtype() {
        candle_core::DType::F32 => go::<f32>(x, dy, dims, (cout, k), pad)?,
        _ => go::<f64>(x, dy, dims, (cout, k), pad)?,
    }))
}

/// Input gradient `[B, Cin, h, w]` of a strided `conv2d(x, w, pad, stride)` (dilation 1,
/// one group) from `dy [B, Cout, OH, OW]`: the GEMM + col2im of the small-image stride-1
/// gradient, with the stride. In place of candle's direct `conv_transpose2d` loop; `None`
/// where these kernels do not apply.
pub fn conv2d_strided_input_grad(
    dy: &Tensor,
    w: &Tensor,
    (h, wd): (usize, usize),
    pad: usize,
    stride: usize,
) -> candle_core::Result<Option<Tensor>> {
    let (b, cout, oh, ow) = dy.dims4()?;
    let (o, cin, k, k1) = w.dims4()?;
    let out = |n: usize| (n + 2 * pad).checked_sub(k).map(|v| v / stride.max(1) + 1);
    if !matches!(dy.device(), Device::Cpu)
        || !matches!(
            dy.dtype(),
            candle_core::DType::F32 | candle_core::DType::F64
        )
        || dy.dtype() != w.dtype()
        || o != cout
        || k != k1
        || stride < 2
        || b * cout * cin * k * oh * ow == 0
        || out(h) != Some(oh)
        || out(wd) != Some(ow)
    {
        return Ok(None);
    }
    fn go<T: WithDType>(
        dy: &Tensor,
        w: &Tensor,
        (b, cin, h, wd): (usize, usize, usize, usize),
        (pad, stride): (usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (_, cout, oh, ow) = dy.dims4()?;
        let k = w.dim(2)?;
        let dx = with_slice(dy, |ds: &[T]| {
            with_slice(w, |ws: &[T]| {
                let kern = Kernel::plain(ws, cout, cin, k);
                Ok(input_grad_col2im(
                    ds,
                    (b, oh, ow),
                    kern,
                    (pad, stride),
                    (h, wd),
                ))
            })
        })?;
        Tensor::from_vec(dx, (b, cin, h, wd), &Device::Cpu)
    }
    let dims = (b, cin, h, wd);
    Ok(Some(match dy.dtype() {
        candle_core::DType::F32 => go::<f32>(dy, w, dims, (pad, stride))?,
        _ => go::<f64>(dy, w, dims, (pad, stride))?,
    }))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::{DType, Var};

    /// Deterministic values in [-1, 1) (f64), independent of candle's RNG.
    pub(in crate::model::nn) fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f64> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f64 / (1u64 << 24) as f64) * 2.0 - 1.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    /// (largest absolute difference, largest magnitude of `b`).
    pub(in crate::model::nn) fn max_err(a: &Tensor, b: &Tensor) -> (f64, f64) {
        assert_eq!(a.dims(), b.dims());
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let (a, b) = (a.to_vec1::<f64>().unwrap(), b.to_vec1::<f64>().unwrap());
        let m = b.iter().fold(0f64, |m, v| m.max(v.abs()));
        let e = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        (e, m)
    }

    /// (batch, cin, cout, h, w, k, pad): odd and mixed sizes, 1x1, padding 0..k-1 and more,
    /// a kernel as wide as the padded input (one output column), batch 3.
    const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (1, 3, 5, 7, 6, 3, 1),
        (3, 4, 2, 5, 9, 3, 1),
        (2, 3, 4, 6, 5, 3, 0),
        (2, 5, 3, 4, 4, 3, 2),
        (3, 6, 7, 5, 3, 1, 0),
        (1, 2, 3, 3, 5, 5, 1),
        (2, 3, 2, 1, 1, 3, 1),
        (1, 4, 4, 2, 7, 1, 1),
        // Above SMALL_HW pixels: the tap GEMMs (the cases above take im2col).
        (1, 3, 4, 33, 34, 3, 1),
        (2, 2, 3, 36, 33, 3, 0),
        (1, 2, 2, 34, 35, 5, 2),
    ];

    /// Forward, input and kernel gradients equal candle's conv2d and its backward
    /// (f64: to rounding) and the forward stays within f32 rounding in f32, on both paths
    /// (im2col for small images, tap GEMMs above `SMALL_HW`).
    #[test]
    fn matches_candle_conv2d_forward_and_gradients() {
        for (i, &(b, cin, cout, h, w, k, pad)) in CASES.iter().enumerate() {
            let x = randn(&[b, cin, h, w], 2 * i as u64 + 1);
            let wt = randn(&[cout, cin, k, k], 2 * i as u64 + 2);
            let want = x.conv2d(&wt, pad, 1, 1, 1).unwrap();
            let got = conv2d(&x, &wt, pad, 1).unwrap();
            let (e, m) = max_err(&got, &want);
            assert!(e <= 1e-12 * m.max(1.0), "case {i} f64: {e} of {m}");
            let (x32, w32) = (
                x.to_dtype(DType::F32).unwrap(),
                wt.to_dtype(DType::F32).unwrap(),
            );
            let (e, m) = max_err(&conv2d(&x32, &w32, pad, 1).unwrap(), &want);
            assert!(e <= 1e-5 * m.max(1.0), "case {i} f32: {e} of {m}");

            // Gradients of sum(y * r) from candle's own conv backward.
            let r = randn(want.dims(), 100 + i as u64);
            let (xv, wv) = (
                Var::from_tensor(&x).unwrap(),
                Var::from_tensor(&wt).unwrap(),
            );
            let y = xv.as_tensor().conv2d(wv.as_tensor(), pad, 1, 1, 1).unwrap();
            let gs = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx, dw) = (
                gs.get(xv.as_tensor()).unwrap(),
                gs.get(wv.as_tensor()).unwrap(),
            );
            if pad < k {
                let ours = conv2d_s1_input_grad(&r, &wt, pad).unwrap().unwrap();
                let (e, m) = max_err(&ours, dx);
                assert!(e <= 1e-12 * m.max(1.0), "case {i} dx: {e} of {m}");
            }
            let ours = conv2d_s1_kernel_grad(&x, &r, &wt, pad).unwrap().unwrap();
            let (e, m) = max_err(&ours, dw);
            assert!(e <= 1e-12 * m.max(1.0), "case {i} dw: {e} of {m}");
        }
    }

    /// Where the kernel does not apply it is candle's conv2d; bad shapes are errors.
    #[test]
    fn falls_back_and_rejects_mismatched_shapes() {
        let x = randn(&[1, 3, 6, 6], 1).to_dtype(DType::F32).unwrap();
        let w = randn(&[4, 3, 3, 3], 2).to_dtype(DType::F32).unwrap();
        let strided = conv2d(&x, &w, 1, 2).unwrap();
        let want = x.conv2d(&w, 1, 2, 1, 1).unwrap();
        assert_eq!(max_err(&strided, &want).0, 0.0);
        let bad = randn(&[4, 2, 3, 3], 3).to_dtype(DType::F32).unwrap();
        assert!(conv2d(&x, &bad, 1, 1).is_err());
        let dy = randn(&[1, 4, 5, 5], 4).to_dtype(DType::F32).unwrap();
        assert!(conv2d_s1_kernel_grad(&x, &dy, &w, 1).is_err());
        assert!(conv2d_s1_input_grad(&dy, &w, 3).unwrap().is_none());
    }

    /// The strided input gradient against a direct sum over outputs and taps: stride 2
    /// and 3, padding 0-2, odd / even / mixed sizes (rows or columns the stride never
    /// reads), 1x1 and 4x4 kernels, batch 2, f32 and f64.
    #[test]
    fn strided_input_grad_matches_direct_sum() {
        for &(b, cin, cout, h, w, k, pad, stride) in &[
            (2, 3, 4, 9, 8, 3, 1, 2),
            (1, 2, 5, 8, 8, 3, 1, 2),
            (1, 4, 3, 7, 10, 3, 0, 2),
            (2, 2, 2, 11, 6, 4, 2, 3),
            (1, 3, 2, 5, 7, 1, 0, 2),
        ] {
            let (oh, ow) = (
                (h + 2 * pad - k) / stride + 1,
                (w + 2 * pad - k) / stride + 1,
            );
            let wt = randn(&[cout, cin, k, k], 1);
            let dy = randn(&[b, cout, oh, ow], 2);
            let (wv, dv) = (
                wt.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                dy.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            );
            let mut want = vec![0f64; b * cin * h * w];
            for bi in 0..b {
                for co in 0..cout {
                    for oy in 0..oh {
                        for ox in 0..ow {
                            let g = dv[((bi * cout + co) * oh + oy) * ow + ox];
                            for i in 0..cin {
                                for ty in 0..k {
                                    for tx in 0..k {
                                        let (iy, ix) = (oy * stride + ty, ox * stride + tx);
                                        if iy < pad || ix < pad || iy - pad >= h || ix - pad >= w {
                                            continue;
                                        }
                                        want[((bi * cin + i) * h + iy - pad) * w + ix - pad] +=
                                            g * wv[((co * cin + i) * k + ty) * k + tx];
                                    }
                                }
                            }
                        }
                    }
                }
            }
            let want = Tensor::from_vec(want, (b, cin, h, w), &Device::Cpu).unwrap();
            for dt in [DType::F64, DType::F32] {
                let (dyd, wd) = (dy.to_dtype(dt).unwrap(), wt.to_dtype(dt).unwrap());
                let got = conv2d_strided_input_grad(&dyd, &wd, (h, w), pad, stride)
                    .unwrap()
                    .expect("applies");
                let (e, m) = max_err(&got, &want);
                let tol = if dt == DType::F64 { 1e-12 } else { 1e-5 };
                assert!(
                    e <= tol * m.max(1.0),
                    "{dt:?} {h}x{w} k{k} p{pad} s{stride}: {e}"
                );
            }
        }
        // Stride 1 and sizes that do not match the output are not for this kernel.
        let (dy, wt) = (randn(&[1, 2, 4, 4], 3), randn(&[2, 2, 3, 3], 4));
        assert!(
            conv2d_strided_input_grad(&dy, &wt, (4, 4), 1, 1)
                .unwrap()
                .is_none()
        );
        assert!(
            conv2d_strided_input_grad(&dy, &wt, (12, 8), 1, 2)
                .unwrap()
                .is_none()
        );
    }
}
