//! Fused f32 CPU group norm (+SiLU), layer norm and GEGLU: one graph node each, with a
//! hand-written backward.
//!
//! Built from candle's ops, a group norm + SiLU is ~12 graph nodes and a GEGLU's erf-GELU
//! backward ~12 more passes over the activation. candle's backward gives every node a
//! zero-filled gradient buffer plus an add, and the graph keeps every node's inputs alive
//! until it is dropped, so those intermediates were both time (the profile's "gradient
//! accumulation" and "composite-op backward") and memory. Here each layer reads its input
//! once or twice, keeps only per-group / per-row statistics besides the input the graph
//! holds anyway, and its backward writes the input gradient (and, for trainable scale and
//! shift, their gradients) in two passes.
//!
//! Statistics: mean and biased variance in two passes, f32 lanes summed in f64 per 1024
//! elements. GELU is the exact erf form (`torch.nn.GELU()`), erf by Abramowitz & Stegun
//! 7.1.26 as PyTorch's vectorised CPU kernel.

use super::fastmath::{
    avx2_fma, blocked, blocked2, dot_centered, erf, exp, sigmoid, sum, sum_sq_dev,
};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

fn err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused op: {msg}"))
}

/// Whether the fused kernels take these tensors: non-empty f32 tensors on the CPU.
pub(crate) fn applies(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.elem_count() > 0)
}

pub(crate) fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> CResult<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| err("non-contiguous input"))?;
    match s {
        CpuStorage::F32(v) => Ok(&v[a..b]),
        _ => Err(err("expects f32")),
    }
}

/// Runs `f` on the elements of an f32 CPU tensor (made contiguous first).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> CResult<R>) -> CResult<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice(c, l)?),
        _ => Err(err("expects a CPU tensor")),
    }
}

fn tensor(v: Vec<f32>, shape: &Shape) -> CResult<Tensor> {
    Tensor::from_vec(v, shape.clone(), &Device::Cpu)
}

/// `$any` as written (inlined into its callers), `$avx` the same body compiled for
/// AVX2 + FMA, and `$name` choosing between them at run time.
macro_rules! simd_kernel {
    ($(#[$m:meta])* fn $name:ident / $any:ident / $avx:ident ($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        #[inline(always)]
        #[allow(clippy::too_many_arguments)]
        fn $any($($arg: $ty),*) $(-> $ret)? $body

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn $avx($($arg: $ty),*) $(-> $ret)? {
            $any($($arg),*)
        }

        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if avx2_fma() {
                // SAFETY: the CPU supports the features the function is compiled for.
                return unsafe { $avx($($arg),*) };
            }
            $any($($arg),*)
        }
    };
}

// ---------------------------------------------------------------- group norm (+ SiLU)

simd_kernel! {
    /// One (sample, group) block: `cpg` channel rows of `hw` elements; `w`, `b` the group's
    /// channels. Returns (mean, 1 / std).
    fn gn_fwd_block / gn_fwd_block_any / gn_fwd_block_avx2(
        x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], hw: usize, eps: f32, silu: bool,
    ) -> (f32, f32) {
        let m = x.len() as f64;
        let mean = (blocked(x, sum) / m) as f32;
        let var = (blocked(x, |c| sum_sq_dev(c, mean)) / m) as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (j, (xr, yr)) in x.chunks_exact(hw).zip(y.chunks_exact_mut(hw)).enumerate() {
            let (sc, sh) = (rstd * w[j], b[j]);
            if silu {
                for (o, &v) in yr.iter_mut().zip(xr) {
                    let z = (v - mean) * sc + sh;
                    *o = z * sigmoid(z);
                }
            } else {
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = (v - mean) * sc + sh;
                }
            }
        }
        (mean, rstd)
    }
}

simd_kernel! {
    /// Backward of one block: `dx` gets the input gradient, `dwb` the block's [dw | db]
    /// (cpg each) for its sample.
    fn gn_bwd_block / gn_bwd_block_any / gn_bwd_block_avx2(
        x: &[f32], dy: &[f32], dx: &mut [f32], w: &[f32], b: &[f32], hw: usize,
        mean: f32, rstd: f32, silu: bool, dwb: &mut [f32],
    ) {
        let cpg = w.len();
        let (mut s1, mut s2) = (0f64, 0f64);
        for j in 0..cpg {
            let r = j * hw..(j + 1) * hw;
            let (xr, gr, dr) = (&x[r.clone()], &dy[r.clone()], &mut dx[r]);
            // dz: the gradient at the affine output (through SiLU when fused).
            if silu {
                let (sc, sh) = (rstd * w[j], b[j]);
                for ((d, &g), &v) in dr.iter_mut().zip(gr).zip(xr) {
                    let z = (v - mean) * sc + sh;
                    let s = sigmoid(z);
                    *d = g * s * (1.0 + z * (1.0 - s));
                }
            } else {
                dr.copy_from_slice(gr);
            }
            let db = blocked(dr, sum);
            let dw = blocked2(dr, xr, |a, c| dot_centered(a, c, mean)) * rstd as f64;
            dwb[j] = dw as f32;
            dwb[cpg + j] = db as f32;
            s1 += w[j] as f64 * db;
            s2 += w[j] as f64 * dw;
        }
        let m = x.len() as f64;
        let (a, c) = ((s1 / m) as f32, (s2 / m) as f32);
        for j in 0..cpg {
            let r = j * hw..(j + 1) * hw;
            let (xr, dr) = (&x[r.clone()], &mut dx[r]);
            let wj = w[j];
            for (d, &v) in dr.iter_mut().zip(xr) {
                let xh = (v - mean) * rstd;
                *d = rstd * (wj * *d - a - xh * c);
            }
        }
    }
}

struct GroupNormOp {
    groups: usize,
    eps: f32,
    silu: bool,
    /// (mean, 1/std) per (sample, group), from the forward.
    stats: Mutex<Vec<f32>>,
}

struct GnDims {
    n: usize,
    c: usize,
    hw: usize,
}

impl GroupNormOp {
    fn dims(&self, shape: &Shape, w: usize, b: usize) -> CResult<GnDims> {
        let d = shape.dims();
        if d.len() < 2 {
            return Err(err("group norm expects [N, C, ...]"));
        }
        let (n, c) = (d[0], d[1]);
        if c % self.groups != 0 || w != c || b != c {
            return Err(err("group norm: channels, groups and weights disagree"));
        }
        Ok(GnDims {
            n,
            c,
            hw: d[2..].iter().product(),
        })
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let dm = self.dims(l1.shape(), w.len(), b.len())?;
        let cpg = dm.c / self.groups;
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; 2 * dm.n * self.groups];
        y.par_chunks_mut(cpg * dm.hw)
            .zip(x.par_chunks(cpg * dm.hw))
            .zip(stats.par_chunks_mut(2))
            .enumerate()
            .for_each(|(i, ((yb, xb), st))| {
                let ch = (i % self.groups) * cpg..(i % self.groups + 1) * cpg;
                let (m, r) =
                    gn_fwd_block(xb, yb, &w[ch.clone()], &b[ch], dm.hw, self.eps, self.silu);
                st[0] = m;
                st[1] = r;
            });
        *self.stats.lock().map_err(|_| err("poisoned"))? = stats;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().map_err(|_| err("poisoned"))?.clone();
        let dm = self.dims(x.shape(), w.elem_count(), b.elem_count())?;
        let (groups, cpg) = (self.groups, dm.c / self.groups);
        let (dx, dwb) = with_data(x, |xs| {
            with_data(grad, |gs| {
                with_data(w, |ws| {
                    with_data(b, |bs| {
                        let mut dx = vec![0f32; xs.len()];
                        let mut dwb = vec![0f32; dm.n * dm.c * 2];
                        dx.par_chunks_mut(cpg * dm.hw)
                            .zip(xs.par_chunks(cpg * dm.hw))
                            .zip(gs.par_chunks(cpg * dm.hw))
                            .zip(dwb.par_chunks_mut(2 * cpg))
                            .enumerate()
                            .for_each(|(i, (((db, xb), gb), wb))| {
                                let ch = (i % groups) * cpg..(i % groups + 1) * cpg;
                                gn_bwd_block(
                                    xb,
                                    gb,
                                    db,
                                    &ws[ch.clone()],
                                    &bs[ch],
                                    dm.hw,
                                    stats[2 * i],
                                    stats[2 * i + 1],
                                    self.silu,
                                    wb,
                                );
                            });
                        Ok((dx, dwb))
                    })
                })
            })
        })?;
        let dx = if x.track_op() {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        // [dw | db] per (sample, group) block -> per channel, summed over the batch.
        let channel_sums = |second: bool| -> CResult<Tensor> {
            let mut out = vec![0f32; dm.c];
            for (i, blk) in dwb.chunks_exact(2 * cpg).enumerate() {
                let g = i % groups;
                let part = if second { &blk[cpg..] } else { &blk[..cpg] };
                for (o, v) in out[g * cpg..(g + 1) * cpg].iter_mut().zip(part) {
                    *o += v;
                }
            }
            tensor(out, w.shape())
        };
        let dw = if w.track_op() {
            Some(channel_sums(false)?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(channel_sums(true)?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Group norm of f32 CPU `x` [N, C, ...] with scale `w` and shift `b` [C], followed by
/// SiLU when `silu`.
pub(crate) fn group_norm(
    x: &Tensor,
    groups: usize,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    silu: bool,
) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        GroupNormOp {
            groups,
            eps: eps as f32,
            silu,
            stats: Mutex::new(Vec::new()),
        },
    )
}

// ---------------------------------------------------------------- layer norm

simd_kernel! {
    /// Rows of width `d`; `stats` gets (mean, 1/std) per row.
    fn ln_fwd_rows / ln_fwd_rows_any / ln_fwd_rows_avx2(
        x: &[f32], y: &mut [f32], w: &[f32], b: &[f32], eps: f32, stats: &mut [f32],
    ) {
        let d = w.len();
        for ((xr, yr), st) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(stats.chunks_exact_mut(2)) {
            let mean = (blocked(xr, sum) / d as f64) as f32;
            let var = (blocked(xr, |c| sum_sq_dev(c, mean)) / d as f64) as f32;
            let rstd = 1.0 / (var + eps).sqrt();
            for (((o, &v), &wi), &bi) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * wi + bi;
            }
            st[0] = mean;
            st[1] = rstd;
        }
    }
}

simd_kernel! {
    /// Backward of rows: `dx` the input gradient; when `dwb` is not empty, [dw | db]
    /// (d each) accumulated over the rows.
    fn ln_bwd_rows / ln_bwd_rows_any / ln_bwd_rows_avx2(
        x: &[f32], dy: &[f32], dx: &mut [f32], w: &[f32], stats: &[f32], dwb: &mut [f32],
    ) {
        let d = w.len();
        for (((xr, gr), dr), st) in x
            .chunks_exact(d)
            .zip(dy.chunks_exact(d))
            .zip(dx.chunks_exact_mut(d))
            .zip(stats.chunks_exact(2))
        {
            let (mean, rstd) = (st[0], st[1]);
            for ((o, &g), &wi) in dr.iter_mut().zip(gr).zip(w) {
                *o = g * wi;
            }
            let a = (blocked(dr, sum) / d as f64) as f32;
            let c = (blocked2(dr, xr, |p, q| dot_centered(p, q, mean)) * rstd as f64 / d as f64)
                as f32;
            for (o, &v) in dr.iter_mut().zip(xr) {
                let xh = (v - mean) * rstd;
                *o = rstd * (*o - a - xh * c);
            }
            if !dwb.is_empty() {
                let (dw, db) = dwb.split_at_mut(d);
                for (((dwi, dbi), &g), &v) in dw.iter_mut().zip(db.iter_mut()).zip(gr).zip(xr) {
                    *dwi += g * (v - mean) * rstd;
                    *dbi += g;
                }
            }
        }
    }
}

/// Rows per parallel task: about four tasks per thread.
fn rows_per_task(rows: usize) -> usize {
    rows.div_ceil(4 * rayon::current_num_threads()).max(1)
}

struct LayerNormOp {
    eps: f32,
    stats: Mutex<Vec<f32>>,
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> CResult<(CpuStorage, Shape)> {
        let (x, w, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = w.len();
        if l1.dims().last() != Some(&d) || b.len() != d {
            return Err(err("layer norm: last dimension and weights disagree"));
        }
        let rows = x.len() / d;
        let per = rows_per_task(rows);
        let mut y = vec![0f32; x.len()];
        let mut stats = vec![0f32; 2 * rows];
        y.par_chunks_mut(per * d)
            .zip(x.par_chunks(per * d))
            .zip(stats.par_chunks_mut(per * 2))
            .for_each(|((yc, xc), st)| ln_fwd_rows(xc, yc, w, b, self.eps, st));
        *self.stats.lock().map_err(|_| err("poisoned"))? = stats;
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let stats = self.stats.lock().map_err(|_| err("poisoned"))?.clone();
        let d = w.elem_count();
        let affine = w.track_op() || b.track_op();
        let (dx, dwb) = with_data(x, |xs| {
            with_data(grad, |gs| {
                with_data(w, |ws| {
                    let rows = xs.len() / d;
                    let per = rows_per_task(rows);
                    let mut dx = vec![0f32; xs.len()];
                    let parts: Vec<Vec<f32>> = dx
                        .par_chunks_mut(per * d)
                        .zip(xs.par_chunks(per * d))
                        .zip(gs.par_chunks(per * d))
                        .zip(stats.par_chunks(per * 2))
                        .map(|(((dc, xc), gc), st)| {
                            let mut dwb = if affine {
                                vec![0f32; 2 * d]
                            } else {
                                Vec::new()
                            };
                            ln_bwd_rows(xc, gc, dc, ws, st, &mut dwb);
                            dwb
                        })
                        .collect();
                    let mut dwb = vec![0f32; if affine { 2 * d } else { 0 }];
                    for p in parts {
                        for (o, v) in dwb.iter_mut().zip(p) {
                            *o += v;
                        }
                    }
                    Ok((dx, dwb))
                })
            })
        })?;
        let dx = if x.track_op() {
            Some(tensor(dx, x.shape())?)
        } else {
            None
        };
        let dw = if w.track_op() {
            Some(tensor(dwb[..d].to_vec(), w.shape())?)
        } else {
            None
        };
        let db = if b.track_op() {
            Some(tensor(dwb[d..].to_vec(), b.shape())?)
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// Layer norm of f32 CPU `x` over its last dimension (biased variance) with scale `w` and
/// shift `b`.
pub(crate) fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &w.contiguous()?,
        &b.contiguous()?,
        LayerNormOp {
            eps: eps as f32,
            stats: Mutex::new(Vec::new()),
        },
    )
}

// ---------------------------------------------------------------- frozen linear

/// `x W^T + b` for a custom op's forward (f32): `x` [.., in] as the op receives it, `w`
/// [out, in], `b` [out]; the result written straight into a fresh storage, the bias as the
/// GEMM's initial value (no separate add, no hand-over copy).
pub(crate) fn linear_bias_storage(
    x: &CpuStorage,
    l: &Layout,
    w: &Tensor,
    b: Option<&Tensor>,
) -> CResult<(CpuStorage, Shape)> {
    let xs = slice(x, l)?;
    let (out, inp) = w.dims2()?;
    if l.dims().last() != Some(&inp) {
        return Err(err("linear: input width and weight disagree"));
    }
    let rows = xs.len() / inp;
    let mut y = vec![0f32; rows * out];
    if let Some(b) = b {
        let bv = b.flatten_all()?.to_vec1::<f32>()?;
        if bv.len() != out {
            return Err(err("linear: bias length and weight disagree"));
        }
        y.par_chunks_mut(out * 64)
            .for_each(|c| c.chunks_exact_mut(out).for_each(|r| r.copy_from_slice(&bv)));
    }
    with_data(w, |ws| {
        let par = match rayon::current_num_threads() {
            0 | 1 => gemm::Parallelism::None,
            n => gemm::Parallelism::Rayon(n),
        };
        // SAFETY: x is [rows, inp] and w [out, inp] row-major (lengths checked by the
        // slices' construction and the dims above); y is [rows, out], exclusively borrowed.
        unsafe {
            gemm::gemm(
                rows,
                out,
                inp,
                y.as_mut_ptr(),
                1,
                out as isize,
                b.is_some(),
                xs.as_ptr(),
                1,
                inp as isize,
                ws.as_ptr(),
                inp as isize,
                1,
                1.0f32,
                1.0f32,
                false,
                false,
                false,
                par,
            );
        }
        Ok(())
    })?;
    let mut dims = l.dims().to_vec();
    *dims.last_mut().expect("checked") = out;
    Ok((CpuStorage::F32(y), Shape::from(dims)))
}

// ---------------------------------------------------------------- GEGLU

const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
/// 1 / sqrt(2 pi).
const INV_SQRT_2PI: f32 = 0.398_942_3;

simd_kernel! {
    /// Rows of `h` [.., 2d] -> `y` [.., d]: `h[:d] * gelu(h[d:])`.
    fn geglu_fwd_rows / geglu_fwd_rows_any / geglu_fwd_rows_avx2(h: &[f32], y: &mut [f32], d: usize) {
        for (hr, yr) in h.chunks_exact(2 * d).zip(y.chunks_exact_mut(d)) {
            let (a, g) = hr.split_at(d);
            for ((o, &av), &gv) in yr.iter_mut().zip(a).zip(g) {
                *o = av * 0.5 * gv * (1.0 + erf(gv * FRAC_1_SQRT_2));
            }
        }
    }
}

simd_kernel! {
    /// Backward of rows: `dh[:d] = dy * gelu(g)`, `dh[d:] = dy * a * gelu'(g)` with
    /// `gelu'(g) = Phi(g) + g phi(g)`.
    fn geglu_bwd_rows / geglu_bwd_rows_any / geglu_bwd_rows_avx2(
        h: &[f32], dy: &[f32], dh: &mut [f32], d: usize,
    ) {
        for ((hr, gr), dr) in h.chunks_exact(2 * d).zip(dy.chunks_exact(d)).zip(dh.chunks_exact_mut(2 * d)) {
            let (a, g) = hr.split_at(d);
            let (da, dg) = dr.split_at_mut(d);
            for ((((oa, og), &av), &gv), &dv) in da.iter_mut().zip(dg.iter_mut()).zip(a).zip(g).zip(gr) {
                let cdf = 0.5 * (1.0 + erf(gv * FRAC_1_SQRT_2));
                let pdf = INV_SQRT_2PI * exp(-0.5 * gv * gv);
                *oa = dv * gv * cdf;
                *og = dv * av * (cdf + gv * pdf);
            }
        }
    }
}

struct GegluOp;

fn geglu_width(shape: &Shape) -> CResult<usize> {
    match shape.dims().last() {
        Some(&w) if w % 2 == 0 && w > 0 => Ok(w / 2),
        _ => Err(err("GEGLU expects an even last dimension")),
    }
}

impl CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> CResult<(CpuStorage, Shape)> {
        let h = slice(s, l)?;
        let d = geglu_width(l.shape())?;
        let mut dims = l.dims().to_vec();
        *dims.last_mut().expect("checked") = d;
        let rows = h.len() / (2 * d);
        let per = rows_per_task(rows);
        let mut y = vec![0f32; rows * d];
        y.par_chunks_mut(per * d)
            .zip(h.par_chunks(per * 2 * d))
            .for_each(|(yc, hc)| geglu_fwd_rows(hc, yc, d));
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> CResult<Option<Tensor>> {
        let d = geglu_width(h.shape())?;
        let dh = with_data(h, |hs| {
            with_data(grad, |gs| {
                let rows = hs.len() / (2 * d);
                let per = rows_per_task(rows);
                let mut dh = vec![0f32; hs.len()];
                dh.par_chunks_mut(per * 2 * d)
                    .zip(hs.par_chunks(per * 2 * d))
                    .zip(gs.par_chunks(per * d))
                    .for_each(|((dc, hc), gc)| geglu_bwd_rows(hc, gc, dc, d));
                Ok(dh)
            })
        })?;
        Ok(Some(tensor(dh, h.shape())?))
    }
}

/// GEGLU of f32 CPU `h` [.., 2d]: `h[.., :d] * gelu(h[.., d:])` (diffusers' `GEGLU` after
/// its projection).
pub(crate) fn geglu(h: &Tensor) -> CResult<Tensor> {
    h.contiguous()?.apply_op1(GegluOp)
}

#[cfg(test)]
mod tests {
    use super::super::layers::{geglu_composite, group_norm_composite, layer_norm_composite};
    use candle_core::{DType, Device, Tensor, Var};

    fn rand(shape: &[usize], seed: u64, scale: f32, offset: f32) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 2.0 * scale + offset
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .max(1e-12);
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / scale
    }

    type Layer = dyn Fn(&Tensor, &Tensor, &Tensor) -> Tensor;

    /// Output and the gradients of x, w and b (all trainable) of `fused` in f32 against
    /// `reference` computed in f64 from the same values; `r` weights the loss sum(y * r).
    fn check(x: &Tensor, w: &Tensor, b: &Tensor, fused: &Layer, reference: &Layer, tol: f64) {
        let run = |dt: DType, f: &Layer| {
            let (xv, wv, bv) = (
                Var::from_tensor(&x.to_dtype(dt).unwrap()).unwrap(),
                Var::from_tensor(&w.to_dtype(dt).unwrap()).unwrap(),
                Var::from_tensor(&b.to_dtype(dt).unwrap()).unwrap(),
            );
            let y = f(xv.as_tensor(), wv.as_tensor(), bv.as_tensor());
            let r = rand(y.dims(), 99, 1.0, 0.0).to_dtype(dt).unwrap();
            let g = (&y * r).unwrap().sum_all().unwrap().backward().unwrap();
            let grad = |v: &Var| g.get(v.as_tensor()).expect("a gradient").clone();
            (y, grad(&xv), grad(&wv), grad(&bv))
        };
        let (y, dx, dw, db) = run(DType::F32, fused);
        let (yr, dxr, dwr, dbr) = run(DType::F64, reference);
        for (name, a, b) in [
            ("y", &y, &yr),
            ("dx", &dx, &dxr),
            ("dw", &dw, &dwr),
            ("db", &db, &dbr),
        ] {
            let e = max_rel(a, b);
            assert!(e < tol, "{name}: max relative error {e}");
        }
    }

    #[test]
    fn group_norm_and_silu_match_the_composite_in_f64() {
        for &(shape, groups, silu) in &[
            (&[2usize, 6, 5, 7][..], 3usize, true),
            (&[2, 6, 5, 7], 2, false),
            (&[1, 64, 48, 48], 32, true),
            (&[3, 8, 37], 4, true),
        ] {
            let c = shape[1];
            let x = rand(shape, 1, 2.0, 0.7);
            let (w, b) = (rand(&[c], 2, 0.5, 1.0), rand(&[c], 3, 0.5, 0.0));
            let fused: Box<Layer> =
                Box::new(move |x, w, b| super::group_norm(x, groups, w, b, 1e-5, silu).unwrap());
            let reference: Box<Layer> = Box::new(move |x, w, b| {
                let y = group_norm_composite(x, groups, w, b, 1e-5).unwrap();
                if silu { y.silu().unwrap() } else { y }
            });
            check(&x, &w, &b, &*fused, &*reference, 2e-5);
        }
    }

    #[test]
    fn layer_norm_matches_the_composite_in_f64() {
        for shape in [&[3usize, 5, 37][..], &[2, 77, 320]] {
            let d = *shape.last().unwrap();
            let x = rand(shape, 4, 3.0, -0.4);
            let (w, b) = (rand(&[d], 5, 0.5, 1.0), rand(&[d], 6, 0.5, 0.0));
            let fused: Box<Layer> = Box::new(|x, w, b| super::layer_norm(x, w, b, 1e-5).unwrap());
            let reference: Box<Layer> =
                Box::new(|x, w, b| layer_norm_composite(x, w, b, 1e-5).unwrap());
            check(&x, &w, &b, &*fused, &*reference, 2e-5);
        }
    }

    #[test]
    fn geglu_matches_the_composite_in_f64() {
        for shape in [&[2usize, 3, 38][..], &[1, 64, 2560]] {
            let h = rand(shape, 7, 4.0, 0.0);
            let (w, b) = (rand(&[1], 11, 0.2, 1.0), rand(&[1], 12, 0.2, 0.0));
            // A scalar scale and shift after the GEGLU, so the check's w and b are used.
            let tail = |y: Tensor, w: &Tensor, b: &Tensor| {
                y.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
            };
            let fused: Box<Layer> = Box::new(move |h, w, b| tail(super::geglu(h).unwrap(), w, b));
            let reference: Box<Layer> =
                Box::new(move |h, w, b| tail(geglu_composite(h).unwrap(), w, b));
            check(&h, &w, &b, &*fused, &*reference, 2e-5);
        }
    }

    /// Frozen scale and shift get no gradient; an untracked input records nothing.
    #[test]
    fn frozen_affine_gets_no_gradient_and_untracked_input_is_plain() {
        let x = Var::from_tensor(&rand(&[2, 4, 3, 3], 8, 1.0, 0.0)).unwrap();
        let (w, b) = (rand(&[4], 9, 0.5, 1.0), rand(&[4], 10, 0.5, 0.0));
        let y = super::group_norm(x.as_tensor(), 2, &w, &b, 1e-5, true).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(x.as_tensor()).is_some());
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        let plain = super::layer_norm(
            &x.as_tensor().detach(),
            &w.narrow(0, 0, 3).unwrap(),
            &b.narrow(0, 0, 3).unwrap(),
            1e-5,
        )
        .unwrap();
        assert!(!plain.track_op());
    }
}
