//! AVX-512 register tiles for `attention_fast`: the same products, packing and epilogues
//! with 16-lane vectors, taken on CPUs that have AVX-512F (the GEMMs around the attention
//! run 16 lanes wide there, so an 8-lane attention would be most of a step's time).
//!
//! A 16-key panel is one vector, so the panel products (`Q K^T`, `dO V^T`) take three
//! panels side by side (8 rows x 3 vectors). The head-dim-wide products use the head dim as
//! the vector axis as on AVX2; a head dim that is an odd multiple of 8 (40, 120) ends in a
//! half vector, loaded and stored under a lane mask.

use super::attention_fast::{Epi, PANEL, Strided};
use std::arch::x86_64::*;

/// `e^x` on 16 lanes: `fastmath::exp`'s clamp, reduction and polynomial (as `exp8`).
#[inline]
#[target_feature(enable = "avx512f")]
fn exp16(x: __m512) -> __m512 {
    use super::fastmath::{EXP_BIAS, EXP_POLY, EXP_RANGE, LN2_PARTS};
    let x = _mm512_min_ps(
        _mm512_max_ps(x, _mm512_set1_ps(EXP_RANGE.0)),
        _mm512_set1_ps(EXP_RANGE.1),
    );
    // Round toward negative infinity, exceptions suppressed.
    let n = _mm512_roundscale_ps::<0x09>(_mm512_fmadd_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
        _mm512_set1_ps(0.5),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_PARTS.0), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_PARTS.1), r);
    let mut p = _mm512_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let e = _mm512_add_ps(
        _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
        _mm512_set1_ps(1.0),
    );
    let bits = _mm512_slli_epi32::<23>(_mm512_castps_si512(_mm512_add_ps(
        n,
        _mm512_set1_ps(EXP_BIAS),
    )));
    _mm512_mul_ps(e, _mm512_castsi512_ps(bits))
}

/// `C (MR x 16*NV) = epi(A (MR x k) B (k x 16*NV))`; `A(i, kk) = a[i*a_rs + kk*a_cs]`,
/// vector `v` of B's row `kk` at `b[kk*b_rs + v*b_vs]`, `C(i, 16v + l) = c[i*c_rs + 16v + l]`.
/// Only the lanes in `last` of vector `NV - 1` are read and written.
///
/// # Safety
/// AVX-512F, and every element the strides, the mask and the epilogue address is inside
/// its allocation.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const MR: usize, const NV: usize>(
    k: usize,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs, b_vs): (*const f32, usize, usize),
    (c, c_rs): (*mut f32, usize),
    last: __mmask16,
    epi: Epi,
) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let (mut ap, mut bp) = (a, b);
        for _ in 0..k {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm512_maskz_loadu_ps(
                    if v + 1 == NV { last } else { 0xFFFF },
                    bp.add(v * b_vs),
                );
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm512_set1_ps(*ap.add(i * a_rs));
                for (r, y) in row.iter_mut().zip(&bv) {
                    *r = _mm512_fmadd_ps(x, *y, *r);
                }
            }
            ap = ap.add(a_cs);
            bp = bp.add(b_rs);
        }
        // The epilogue reads a copy: where its loops do not unroll fully, it indexes by
        // register, and `acc` itself, indexed that way, would be kept in memory (a store per
        // FMA in the loop above).
        let acc = std::hint::black_box(acc);
        let mask = |v: usize| if v + 1 == NV { last } else { 0xFFFF };
        match epi {
            Epi::Scale { alpha, accumulate } => {
                let al = _mm512_set1_ps(alpha);
                for (i, row) in acc.iter().enumerate() {
                    for (v, r) in row.iter().enumerate() {
                        let (off, m) = (i * c_rs + v * 16, mask(v));
                        let y = if accumulate {
                            _mm512_fmadd_ps(*r, al, _mm512_maskz_loadu_ps(m, c.add(off)))
                        } else {
                            _mm512_mul_ps(*r, al)
                        };
                        _mm512_mask_storeu_ps(c.add(off), m, y);
                    }
                }
            }
            Epi::Max { max } => {
                for (i, row) in acc.iter().enumerate() {
                    let mut t = _mm512_set1_ps(*max.add(i));
                    for (v, r) in row.iter().enumerate() {
                        let m = mask(v);
                        t = _mm512_mask_max_ps(t, m, t, *r);
                        _mm512_mask_storeu_ps(c.add(i * c_rs + v * 16), m, *r);
                    }
                    *max.add(i) = _mm512_reduce_max_ps(t);
                }
            }
            Epi::Exp { scale, lse } => {
                let sc = _mm512_set1_ps(scale);
                for (i, row) in acc.iter().enumerate() {
                    let l = _mm512_set1_ps(*lse.add(i));
                    for (v, r) in row.iter().enumerate() {
                        let y = exp16(_mm512_fmsub_ps(*r, sc, l));
                        _mm512_mask_storeu_ps(c.add(i * c_rs + v * 16), mask(v), y);
                    }
                }
            }
            Epi::DSoftmax { p, delta } => {
                for (i, row) in acc.iter().enumerate() {
                    let dl = _mm512_set1_ps(*delta.add(i));
                    for (v, r) in row.iter().enumerate() {
                        let (off, m) = (i * c_rs + v * 16, mask(v));
                        let y = _mm512_mul_ps(
                            _mm512_maskz_loadu_ps(m, p.add(off)),
                            _mm512_sub_ps(*r, dl),
                        );
                        _mm512_mask_storeu_ps(c.add(off), m, y);
                    }
                }
            }
        }
    }
}

/// All `m` rows of one column chunk of `NV` vectors, `MR` (at most 12) rows per tile;
/// `epi` is for row 0, column 0 of this C.
///
/// # Safety
/// As [`tile`], for rows `0..m`.
#[target_feature(enable = "avx512f")]
unsafe fn rows<const MR: usize, const NV: usize>(
    m: usize,
    k: usize,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    b: (*const f32, usize, usize),
    (c, c_rs): (*mut f32, usize),
    last: __mmask16,
    epi: Epi,
) {
    // SAFETY (whole body): rows i..i+MR (or the remainder) lie within 0..m.
    unsafe {
        let at = |i: usize| {
            let ai = (a.add(i * a_rs), a_rs, a_cs);
            (ai, (c.add(i * c_rs), c_rs), epi.at(i, 0, c_rs))
        };
        let mut i = 0;
        while i + MR <= m {
            let (ai, ci, ei) = at(i);
            tile::<MR, NV>(k, ai, b, ci, last, ei);
            i += MR;
        }
        let (ai, ci, ei) = at(i);
        match m - i {
            0 => {}
            1 => tile::<1, NV>(k, ai, b, ci, last, ei),
            2 => tile::<2, NV>(k, ai, b, ci, last, ei),
            3 => tile::<3, NV>(k, ai, b, ci, last, ei),
            4 => tile::<4, NV>(k, ai, b, ci, last, ei),
            5 => tile::<5, NV>(k, ai, b, ci, last, ei),
            6 => tile::<6, NV>(k, ai, b, ci, last, ei),
            7 => tile::<7, NV>(k, ai, b, ci, last, ei),
            8 => tile::<8, NV>(k, ai, b, ci, last, ei),
            9 => tile::<9, NV>(k, ai, b, ci, last, ei),
            10 => tile::<10, NV>(k, ai, b, ci, last, ei),
            _ => tile::<11, NV>(k, ai, b, ci, last, ei),
        }
    }
}

/// [`attention_fast::gemm_wide`](super::attention_fast) on 16-lane vectors: `C (m x n) =
/// [C +] alpha * A B`, `n` a multiple of 8, after that function's bounds checks.
///
/// # Safety
/// AVX-512F; `a` holds `m x k`, `b` has `k` rows of `n` floats `b_rs` apart, `c` has `m`
/// rows of `n` floats `c_rs` apart.
pub(super) unsafe fn gemm_wide(
    (m, n, k): (usize, usize, usize),
    a: Strided,
    (b, b_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
    epi: Epi,
) {
    let vecs = n.div_ceil(16);
    let tail: __mmask16 = if n.is_multiple_of(16) {
        0xFFFF
    } else {
        (1u16 << (n % 16)) - 1
    };
    // Column chunks of up to 5 vectors (4 where 5 does not divide and there are more).
    let width = if vecs <= 5 || vecs.is_multiple_of(5) {
        5
    } else {
        4
    };
    let av = (a.data.as_ptr(), a.rs, a.cs);
    let mut j = 0;
    while j < vecs {
        let nv = width.min(vecs - j);
        let last = if j + nv == vecs { tail } else { 0xFFFF };
        // SAFETY: the caller's contract; columns 16j.. of this chunk end at n (the mask
        // covers the half vector).
        unsafe {
            let bj = (b.add(j * 16), b_rs, 16);
            let cj = (c.add(j * 16), c_rs);
            match nv {
                1 => rows::<12, 1>(m, k, av, bj, cj, last, epi),
                2 => rows::<12, 2>(m, k, av, bj, cj, last, epi),
                3 => rows::<8, 3>(m, k, av, bj, cj, last, epi),
                4 => rows::<6, 4>(m, k, av, bj, cj, last, epi),
                _ => rows::<4, 5>(m, k, av, bj, cj, last, epi),
            }
        }
        j += nv;
    }
}

/// [`attention_fast::gemm_panels`](super::attention_fast) on 16-lane vectors: `C (m x
/// 16*np) = epi(A (m x d) x^T)`, three panels per tile, after that function's checks.
///
/// # Safety
/// AVX-512F; `a` holds `m x d`, `panels` `np` packed panels of `d x 16`, `c` has `m` rows
/// of `16 * np` floats `c_rs` apart, and the epilogue's arrays cover them.
pub(super) unsafe fn gemm_panels(
    (m, d, np): (usize, usize, usize),
    a: *const f32,
    panels: *const f32,
    (c, c_rs): (*mut f32, usize),
    epi: Epi,
) {
    let mut p = 0;
    while p < np {
        let nv = 3.min(np - p);
        // SAFETY: the caller's contract, for panels p..p+nv.
        unsafe {
            let bp = (panels.add(p * d * PANEL), PANEL, d * PANEL);
            let cp = (c.add(p * PANEL), c_rs);
            let ep = epi.at(0, p * PANEL, c_rs);
            match nv {
                1 => rows::<12, 1>(m, d, (a, d, 1), bp, cp, 0xFFFF, ep),
                2 => rows::<12, 2>(m, d, (a, d, 1), bp, cp, 0xFFFF, ep),
                _ => rows::<8, 3>(m, d, (a, d, 1), bp, cp, 0xFFFF, ep),
            }
        }
        p += nv;
    }
}

/// `x = exp(scale * x - shift)` in place; returns the sum.
#[target_feature(enable = "avx512f")]
pub(super) fn exp_sum(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let (sc, sh) = (_mm512_set1_ps(scale), _mm512_set1_ps(shift));
    let mut acc = _mm512_setzero_ps();
    let mut chunks = x.chunks_exact_mut(16);
    for c in &mut chunks {
        // SAFETY: `c` is 16 floats.
        unsafe {
            let e = exp16(_mm512_fmsub_ps(_mm512_loadu_ps(c.as_ptr()), sc, sh));
            _mm512_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm512_add_ps(acc, e);
        }
    }
    let mut sum = _mm512_reduce_add_ps(acc);
    for v in chunks.into_remainder() {
        *v = super::fastmath::exp(*v * scale - shift);
        sum += *v;
    }
    sum
}
