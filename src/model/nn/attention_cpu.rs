//! Fused f32 CPU kernels for [`super::attention`]: forward and backward of
//! `softmax(q k^T * scale) v` over blocks of `bq` query rows, on plain slices.
//!
//! One block's scores (`bq x Lk`, 1 MB at 64 x 4096) are the only N x Lq x Lk-shaped memory;
//! the products run through the `gemm` crate (candle's GEMM, strides instead of transposed
//! copies) and the softmax is one pass over the block. Forward parallelises over batch-heads
//! x query blocks, backward over batch-heads (each owns its dk / dv rows).
//! Layouts are contiguous row-major: q [N, Lq, D], k [N, Lk, D], v [N, Lk, Dv].

use super::fastmath::{exp, max};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

/// Problem sizes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Dims {
    pub n: usize,
    pub lq: usize,
    pub lk: usize,
    pub d: usize,
    pub dv: usize,
    /// Query rows per block.
    pub bq: usize,
}

/// A row-major or transposed view of a matrix in a slice: element (r, c) is at
/// `r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Mat<'a> {
    data: &'a [f32],
    rs: isize,
    cs: isize,
}

fn rows(data: &[f32], width: usize) -> Mat<'_> {
    Mat {
        data,
        rs: width as isize,
        cs: 1,
    }
}

fn transposed(data: &[f32], width: usize) -> Mat<'_> {
    Mat {
        data,
        rs: 1,
        cs: width as isize,
    }
}

/// `dst (m x n, row-major) = [dst +] beta * a (m x k) * b (k x n)`, single-threaded.
fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: &mut [f32],
    accumulate: bool,
    a: Mat,
    b: Mat,
    beta: f32,
) {
    let last = |x: &Mat, r: usize, c: usize| {
        (r.saturating_sub(1) as isize * x.rs + c.saturating_sub(1) as isize * x.cs) as usize
    };
    assert!(dst.len() >= m * n, "attention: output block too small");
    assert!(a.data.len() > last(&a, m, k) || m * k == 0);
    assert!(b.data.len() > last(&b, k, n) || k * n == 0);
    // SAFETY: the asserts above keep every index the strides reach inside the slices,
    // `dst` is exclusively borrowed and does not alias `a` or `b`.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs,
            a.rs,
            b.data.as_ptr(),
            b.cs,
            b.rs,
            1.0,
            beta,
            false,
            false,
            false,
            Parallelism::None,
        )
    }
}

/// Row-wise softmax of `scale * s` in place (`s` is `rows x width`).
fn softmax_rows(s: &mut [f32], width: usize, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { softmax_rows_avx2(s, width, scale) };
        return;
    }
    softmax_rows_any(s, width, scale)
}

/// The same loops compiled for AVX2 + FMA (8 lanes; the binary's baseline is SSE2).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(s: &mut [f32], width: usize, scale: f32) {
    softmax_rows_any(s, width, scale)
}

#[inline(always)]
fn softmax_rows_any(s: &mut [f32], width: usize, scale: f32) {
    for row in s.chunks_exact_mut(width) {
        let m = max(row) * scale;
        // exp and its sum in one pass, the sum in 8 lanes.
        let mut acc = [0f32; 8];
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x * scale - m);
                *a += *x;
            }
        }
        let mut rest = 0f32;
        for x in chunks.into_remainder() {
            *x = exp(*x * scale - m);
            rest += *x;
        }
        let inv = 1.0 / (acc.iter().sum::<f32>() + rest);
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

/// Probabilities `P = softmax(scale * q_blk k^T)` for `bq` query rows into `p`.
fn probs(q_blk: &[f32], k: &[f32], dm: Dims, bq: usize, scale: f32, p: &mut [f32]) {
    let p = &mut p[..bq * dm.lk];
    matmul(
        (bq, dm.lk, dm.d),
        p,
        false,
        rows(q_blk, dm.d),
        transposed(k, dm.d),
        1.0,
    );
    softmax_rows(p, dm.lk, scale);
}

/// Attention output [N, Lq, Dv].
pub(crate) fn forward(q: &[f32], k: &[f32], v: &[f32], dm: Dims, scale: f32) -> Vec<f32> {
    let bqm = dm.bq.max(1);
    let mut out = vec![0f32; dm.n * dm.lq * dm.dv];
    if out.is_empty() {
        return out;
    }
    // One task per (head, query block); each writes its own rows of `out`.
    let mut tasks: Vec<(usize, usize, &mut [f32])> = Vec::new();
    for (h, head_out) in out.chunks_mut(dm.lq * dm.dv).enumerate() {
        for (b, blk) in head_out.chunks_mut(bqm * dm.dv).enumerate() {
            tasks.push((h, b, blk));
        }
    }
    tasks.into_par_iter().for_each_init(
        || vec![0f32; bqm * dm.lk],
        |p, (h, b, o_blk)| {
            let bq = o_blk.len() / dm.dv;
            let s = b * bqm;
            let q_blk = &q[(h * dm.lq + s) * dm.d..(h * dm.lq + s + bq) * dm.d];
            let kh = &k[h * dm.lk * dm.d..(h + 1) * dm.lk * dm.d];
            let vh = &v[h * dm.lk * dm.dv..(h + 1) * dm.lk * dm.dv];
            probs(q_blk, kh, dm, bq, scale, p);
            matmul(
                (bq, dm.dv, dm.lk),
                o_blk,
                false,
                rows(&p[..bq * dm.lk], dm.lk),
                rows(vh, dm.dv),
                1.0,
            );
        },
    );
    out
}

/// Gradients `(dq, Some((dk, dv)))` from the output gradient `d_o` [N, Lq, Dv]; dk and dv
/// only when `want_kv`.
pub(crate) fn backward(
    (q, k, v, d_o): (&[f32], &[f32], &[f32], &[f32]),
    dm: Dims,
    scale: f32,
    want_kv: bool,
) -> (Vec<f32>, Option<(Vec<f32>, Vec<f32>)>) {
    let mut dq = vec![0f32; dm.n * dm.lq * dm.d];
    let kv_len = if want_kv { dm.n * dm.lk } else { 0 };
    let mut dk = vec![0f32; kv_len * dm.d];
    let mut dv = vec![0f32; kv_len * dm.dv];
    if dq.is_empty() || dm.lk == 0 {
        let kv = want_kv.then_some((dk, dv));
        return (dq, kv);
    }
    let bqm = dm.bq.max(1);
    let head = |h: usize, dq_h: &mut [f32], mut dkv: Option<(&mut [f32], &mut [f32])>| {
        let kh = &k[h * dm.lk * dm.d..(h + 1) * dm.lk * dm.d];
        let vh = &v[h * dm.lk * dm.dv..(h + 1) * dm.lk * dm.dv];
        let mut p = vec![0f32; bqm * dm.lk];
        let mut ds = vec![0f32; bqm * dm.lk];
        for (b, dq_blk) in dq_h.chunks_mut(bqm * dm.d).enumerate() {
            let bq = dq_blk.len() / dm.d;
            let r0 = h * dm.lq + b * bqm;
            let q_blk = &q[r0 * dm.d..(r0 + bq) * dm.d];
            let do_blk = &d_o[r0 * dm.dv..(r0 + bq) * dm.dv];
            probs(q_blk, kh, dm, bq, scale, &mut p);
            let (p, ds) = (&p[..bq * dm.lk], &mut ds[..bq * dm.lk]);
            // dP = dO V^T, then dS = P * (dP - rowsum(P * dP)).
            matmul(
                (bq, dm.lk, dm.dv),
                ds,
                false,
                rows(do_blk, dm.dv),
                transposed(vh, dm.dv),
                1.0,
            );
            softmax_grad(p, ds, dm.lk);
            matmul(
                (bq, dm.d, dm.lk),
                dq_blk,
                false,
                rows(ds, dm.lk),
                rows(kh, dm.d),
                scale,
            );
            if let Some((dk_h, dv_h)) = dkv.as_mut() {
                // dV += P^T dO, dK += scale * dS^T Q.
                matmul(
                    (dm.lk, dm.dv, bq),
                    dv_h,
                    true,
                    transposed(p, dm.lk),
                    rows(do_blk, dm.dv),
                    1.0,
                );
                matmul(
                    (dm.lk, dm.d, bq),
                    dk_h,
                    true,
                    transposed(ds, dm.lk),
                    rows(q_blk, dm.d),
                    scale,
                );
            }
        }
    };
    if want_kv {
        dq.par_chunks_mut(dm.lq * dm.d)
            .zip(dk.par_chunks_mut(dm.lk * dm.d))
            .zip(dv.par_chunks_mut(dm.lk * dm.dv))
            .enumerate()
            .for_each(|(h, ((dq_h, dk_h), dv_h))| head(h, dq_h, Some((dk_h, dv_h))));
        (dq, Some((dk, dv)))
    } else {
        dq.par_chunks_mut(dm.lq * dm.d)
            .enumerate()
            .for_each(|(h, dq_h)| head(h, dq_h, None));
        (dq, None)
    }
}

/// `ds = p * (ds - rowsum(p * ds))` per row (softmax backward; `ds` holds dP on entry).
fn softmax_grad(p: &[f32], ds: &mut [f32], width: usize) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU supports the features the function is compiled for.
        unsafe { softmax_grad_avx2(p, ds, width) };
        return;
    }
    softmax_grad_any(p, ds, width)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_grad_avx2(p: &[f32], ds: &mut [f32], width: usize) {
    softmax_grad_any(p, ds, width)
}

#[inline(always)]
fn softmax_grad_any(p: &[f32], ds: &mut [f32], width: usize) {
    for (pr, dr) in p.chunks_exact(width).zip(ds.chunks_exact_mut(width)) {
        let mut acc = [0f32; 8];
        let (pc, dc) = (pr.chunks_exact(8), dr.chunks_exact(8));
        let rest: f32 = pc
            .remainder()
            .iter()
            .zip(dc.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a8, b8) in pc.zip(dc) {
            for ((acc, a), b) in acc.iter_mut().zip(a8).zip(b8) {
                *acc += a * b;
            }
        }
        let delta = acc.iter().sum::<f32>() + rest;
        for (d, &pv) in dr.iter_mut().zip(pr) {
            *d = pv * (*d - delta);
        }
    }
}
