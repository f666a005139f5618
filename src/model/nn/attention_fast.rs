//! The fused f32 CPU attention on AVX2 + FMA with its own small GEMMs, used instead of
//! `attention_cpu` when the head dims are multiples of 8 (all Stable Diffusion models). On
//! CPUs with AVX-512F ([`Isa::Avx512`]) the same products run on the 16-lane tiles of
//! `attention_avx512`; packing, loop order and epilogues are shared.
//!
//! Every product in attention has one dimension equal to a head dim (40-160 in Stable
//! Diffusion): `Q K^T` and `dO V^T` contract over it, `P V`, `dS K`, `P^T dO` and `dS^T Q`
//! produce it. A general GEMM repacks both operands on every call (per query block: the
//! whole of K or V, and the block of probabilities), which at a head dim of 40 costs about
//! as much memory traffic as the arithmetic. Here K and V are packed once per head into
//! 16-key panels for the two contractions over the head dim, the head dim itself is the
//! vector axis of the other four (rows of V, K, dO and Q are read in place), and the
//! probabilities are read in place through strides. Register tiles: 6 rows x 16 columns
//! for the panel products, up to 5 vectors x 2-6 rows for the head-dim-wide ones.
//!
//! The softmax lives in the tile epilogues: the forward's score product records each row's
//! maximum as it stores, one exp pass then gives unnormalised probabilities and the row
//! log-sum-exp (kept for the backward; the output rows are divided by their sums at the
//! end). The backward's score product stores `exp(scale * s - lse)` directly, and its
//! `dO V^T` product stores `dS = P * (dP - delta)` with `delta = rowsum(dO * O)` (the
//! FlashAttention-2 identity), so it makes no pass of its own over the score blocks.
//!
//! Score blocks are `bq x lkp` with `lkp` = keys rounded up to a panel plus one panel, so
//! that walking a column of a block (`P^T`, `dS^T`) does not hit one cache set per row.

use super::attention_cpu::Dims;
use rayon::prelude::*;
use std::arch::x86_64::*;

/// Keys per packed panel (two 8-lane vectors).
pub(super) const PANEL: usize = 16;

/// Keys per block of the backward's outer loop (a multiple of [`PANEL`]): a block's dK
/// and dV rows (40 KB each at head dim 40) and a 64-query tile of its scores stay in L2.
const KEY_BLOCK: usize = 256;

/// Whether the fast kernels run on this CPU for these sizes.
pub(crate) fn applies(dm: &Dims) -> bool {
    dm.d.is_multiple_of(8)
        && dm.dv.is_multiple_of(8)
        && dm.d > 0
        && dm.dv > 0
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
}

/// Which register tiles run: 8-lane AVX2 + FMA, or 16-lane AVX-512F where the CPU has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Avx2,
    Avx512,
}

impl Isa {
    /// The widest this CPU runs (callers have checked [`applies`]).
    pub(crate) fn best() -> Self {
        if is_x86_feature_detected!("avx512f") {
            Isa::Avx512
        } else {
            Isa::Avx2
        }
    }

    /// Whether this CPU runs these tiles.
    #[cfg(test)]
    pub(crate) fn available(self) -> bool {
        match self {
            Isa::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
            Isa::Avx512 => is_x86_feature_detected!("avx512f"),
        }
    }
}

/// Row stride of a score block: whole panels plus one (see the module docs).
fn padded(lk: usize) -> usize {
    lk.div_ceil(PANEL) * PANEL + PANEL
}

/// What a register tile does with its products `acc` (row `i`, columns `j..j+8`) when it
/// stores them. Pointers are rebased to the tile's first row / column by [`Epi::at`].
#[derive(Clone, Copy)]
pub(super) enum Epi {
    /// `C = [C +] alpha * acc`.
    Scale { alpha: f32, accumulate: bool },
    /// `C = acc`, and `max[i]` raised to the row's largest product.
    Max { max: *mut f32 },
    /// `C = exp(scale * acc - lse[i])`: probabilities from the saved log-sum-exp.
    Exp { scale: f32, lse: *const f32 },
    /// `C = P * (acc - delta[i])` with `P` at the same (i, j) of a buffer laid out like C:
    /// the softmax backward applied to `dP`.
    DSoftmax { p: *const f32, delta: *const f32 },
}

impl Epi {
    /// The same epilogue for the tile at row `i`, column `j` of a C with row stride `rs`.
    ///
    /// # Safety
    /// The offsets stay inside the allocations the pointers came from.
    pub(super) unsafe fn at(self, i: usize, j: usize, rs: usize) -> Self {
        // SAFETY: the caller's contract.
        unsafe {
            match self {
                Epi::Scale { .. } => self,
                Epi::Max { max } => Epi::Max { max: max.add(i) },
                Epi::Exp { scale, lse } => Epi::Exp {
                    scale,
                    lse: lse.add(i),
                },
                Epi::DSoftmax { p, delta } => Epi::DSoftmax {
                    p: p.add(i * rs + j),
                    delta: delta.add(i),
                },
            }
        }
    }
}

/// `e^x` on 8 lanes: the algorithm of `fastmath::exp` (same clamp, reduction and
/// polynomial) in intrinsics, for tile epilogues.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn exp8(x: __m256) -> __m256 {
    use super::fastmath::{EXP_BIAS, EXP_POLY, EXP_RANGE, LN2_PARTS};
    let x = _mm256_min_ps(
        _mm256_max_ps(x, _mm256_set1_ps(EXP_RANGE.0)),
        _mm256_set1_ps(EXP_RANGE.1),
    );
    let n = _mm256_floor_ps(_mm256_fmadd_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
        _mm256_set1_ps(0.5),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_PARTS.0), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_PARTS.1), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let e = _mm256_add_ps(
        _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r),
        _mm256_set1_ps(1.0),
    );
    let bits = _mm256_slli_epi32::<23>(_mm256_castps_si256(_mm256_add_ps(
        n,
        _mm256_set1_ps(EXP_BIAS),
    )));
    _mm256_mul_ps(e, _mm256_castsi256_ps(bits))
}

/// Horizontal maximum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
fn hmax8(x: __m256) -> f32 {
    let m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps::<1>(x));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let m = _mm_max_ss(m, _mm_shuffle_ps::<1>(m, m));
    _mm_cvtss_f32(m)
}

/// `C (MR x 8*NV) = epi(A (MR x k) B (k x 8*NV))`; `A(i, kk) = a[i*a_rs + kk*a_cs]`,
/// `B(kk, j) = b[kk*b_rs + j]`, `C(i, j) = c[i*c_rs + j]`.
///
/// # Safety
/// AVX2 + FMA, and every element the strides and the epilogue address is inside its
/// allocation.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile<const MR: usize, const NV: usize>(
    k: usize,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    (b, b_rs): (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
    epi: Epi,
) {
    // SAFETY (whole body): the caller's contract.
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); NV]; MR];
        let (mut ap, mut bp) = (a, b);
        for _ in 0..k {
            let mut bv = [_mm256_setzero_ps(); NV];
            for (v, x) in bv.iter_mut().enumerate() {
                *x = _mm256_loadu_ps(bp.add(v * 8));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*ap.add(i * a_rs));
                for (r, y) in row.iter_mut().zip(&bv) {
                    *r = _mm256_fmadd_ps(x, *y, *r);
                }
            }
            ap = ap.add(a_cs);
            bp = bp.add(b_rs);
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, r) in row.iter().enumerate() {
                let off = i * c_rs + v * 8;
                let y = match epi {
                    Epi::Scale { alpha, accumulate } => {
                        let al = _mm256_set1_ps(alpha);
                        if accumulate {
                            _mm256_fmadd_ps(*r, al, _mm256_loadu_ps(c.add(off)))
                        } else {
                            _mm256_mul_ps(*r, al)
                        }
                    }
                    Epi::Max { max } => {
                        *max.add(i) = max_f(*max.add(i), hmax8(*r));
                        *r
                    }
                    Epi::Exp { scale, lse } => exp8(_mm256_fmsub_ps(
                        *r,
                        _mm256_set1_ps(scale),
                        _mm256_set1_ps(*lse.add(i)),
                    )),
                    Epi::DSoftmax { p, delta } => _mm256_mul_ps(
                        _mm256_loadu_ps(p.add(off)),
                        _mm256_sub_ps(*r, _mm256_set1_ps(*delta.add(i))),
                    ),
                };
                _mm256_storeu_ps(c.add(off), y);
            }
        }
    }
}

/// The larger of two floats (NaN-free inputs).
#[inline(always)]
fn max_f(a: f32, b: f32) -> f32 {
    if b > a { b } else { a }
}

/// All `m` rows of one column chunk of `NV` vectors, `MR` rows per tile; `epi` is for
/// row 0, column 0 of this C.
///
/// # Safety
/// As [`tile`], for rows `0..m`.
#[target_feature(enable = "avx2,fma")]
unsafe fn rows<const MR: usize, const NV: usize>(
    m: usize,
    k: usize,
    (a, a_rs, a_cs): (*const f32, usize, usize),
    b: (*const f32, usize),
    (c, c_rs): (*mut f32, usize),
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
            tile::<MR, NV>(k, ai, b, ci, ei);
            i += MR;
        }
        let (ai, ci, ei) = at(i);
        match m - i {
            0 => {}
            1 => tile::<1, NV>(k, ai, b, ci, ei),
            2 => tile::<2, NV>(k, ai, b, ci, ei),
            3 => tile::<3, NV>(k, ai, b, ci, ei),
            4 => tile::<4, NV>(k, ai, b, ci, ei),
            _ => tile::<5, NV>(k, ai, b, ci, ei),
        }
    }
}

/// A matrix read through strides: element (i, j) at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub(super) struct Strided<'a> {
    pub(super) data: &'a [f32],
    pub(super) rs: usize,
    pub(super) cs: usize,
}

impl<'a> Strided<'a> {
    /// Rows `stride` apart.
    fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            rs: stride,
            cs: 1,
        }
    }

    /// The transpose of [`Strided::rows`].
    fn cols(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            rs: 1,
            cs: stride,
        }
    }

    fn holds(&self, rows: usize, cols: usize) -> bool {
        rows == 0 || cols == 0 || (rows - 1) * self.rs + (cols - 1) * self.cs < self.data.len()
    }
}

/// `C (m x n) = [C +] alpha * A (m x k) B (k x n)` with B's rows contiguous (`b_rs` apart)
/// and `n` a multiple of 8: the head-dim-wide products.
fn gemm_wide(
    isa: Isa,
    (m, n, k): (usize, usize, usize),
    a: Strided,
    (b, b_rs): (&[f32], usize),
    (c, c_rs): (&mut [f32], usize),
    alpha: f32,
    accumulate: bool,
) {
    assert!(n.is_multiple_of(8) && a.holds(m, k));
    assert!(k == 0 || (k - 1) * b_rs + n <= b.len());
    assert!(m == 0 || (m - 1) * c_rs + n <= c.len());
    if m == 0 || n == 0 {
        return;
    }
    let epi = Epi::Scale { alpha, accumulate };
    if isa == Isa::Avx512 {
        // SAFETY: the asserts bound every operand as that function requires; AVX-512F was
        // checked when `isa` was chosen.
        unsafe {
            let (bp, cp) = ((b.as_ptr(), b_rs), (c.as_mut_ptr(), c_rs));
            super::attention_avx512::gemm_wide((m, n, k), a, bp, cp, epi);
        }
        return;
    }
    let vecs = n / 8;
    // Column chunks of 5 vectors where that divides evenly (head dims 40, 80, 160), else 4.
    let width = if vecs % 5 == 0 || vecs < 4 { 5 } else { 4 };
    let mut j = 0;
    while j < vecs {
        let nv = width.min(vecs - j);
        let av = (a.data.as_ptr(), a.rs, a.cs);
        // SAFETY: the asserts bound rows 0..m, columns j*8..(j+nv)*8 <= n and kk < k of
        // every operand; AVX2 + FMA were checked by `applies` before any caller got here.
        unsafe {
            let bj = (b.as_ptr().add(j * 8), b_rs);
            let cj = (c.as_mut_ptr().add(j * 8), c_rs);
            match nv {
                1 => rows::<6, 1>(m, k, av, bj, cj, epi),
                2 => rows::<6, 2>(m, k, av, bj, cj, epi),
                3 => rows::<4, 3>(m, k, av, bj, cj, epi),
                4 => rows::<3, 4>(m, k, av, bj, cj, epi),
                _ => rows::<2, 5>(m, k, av, bj, cj, epi),
            }
        }
        j += nv;
    }
}

/// Packs the `lk` rows of `x` [lk, d] into 16-row panels, each stored transposed
/// ([d][16], zeros past `lk`): the B operand of `A x^T`.
fn pack_panels(x: &[f32], lk: usize, d: usize) -> Vec<f32> {
    let np = lk.div_ceil(PANEL);
    let mut out = vec![0f32; np * d * PANEL];
    for (p, panel) in out.chunks_exact_mut(d * PANEL).enumerate() {
        for r in 0..PANEL.min(lk - p * PANEL) {
            let row = &x[(p * PANEL + r) * d..(p * PANEL + r + 1) * d];
            for (kk, &v) in row.iter().enumerate() {
                panel[kk * PANEL + r] = v;
            }
        }
    }
    out
}

/// Where a panel product's epilogue reads and writes besides C.
enum PanelEpi<'a> {
    /// Raw products; `max` (m rows) raised to each row's largest.
    Max(&'a mut [f32]),
    /// Probabilities from the row log-sum-exp (m rows).
    Exp { scale: f32, lse: &'a [f32] },
    /// `P * (products - delta)`; P laid out like C.
    DSoftmax { p: &'a [f32], delta: &'a [f32] },
}

/// `C (m x 16*panels, row stride c_rs) = epi(A (m x d) x^T)` with `x` from
/// [`pack_panels`].
fn gemm_panels(
    isa: Isa,
    (m, d): (usize, usize),
    a: &[f32],
    panels: &[f32],
    (c, c_rs): (&mut [f32], usize),
    epi: PanelEpi,
) {
    let np = panels.len() / (d * PANEL).max(1);
    let width = np * PANEL;
    assert!(a.len() >= m * d && panels.len() == np * d * PANEL && d > 0);
    assert!(m == 0 || (m - 1) * c_rs + width <= c.len());
    let epi = match epi {
        PanelEpi::Max(max) => {
            assert!(max.len() >= m);
            Epi::Max {
                max: max.as_mut_ptr(),
            }
        }
        PanelEpi::Exp { scale, lse } => {
            assert!(lse.len() >= m);
            Epi::Exp {
                scale,
                lse: lse.as_ptr(),
            }
        }
        PanelEpi::DSoftmax { p, delta } => {
            assert!(delta.len() >= m && p.len() >= c.len());
            Epi::DSoftmax {
                p: p.as_ptr(),
                delta: delta.as_ptr(),
            }
        }
    };
    if isa == Isa::Avx512 {
        // SAFETY: as below, for all np panels; AVX-512F was checked when `isa` was chosen.
        unsafe {
            let (ap, pp, cp) = (a.as_ptr(), panels.as_ptr(), c.as_mut_ptr());
            super::attention_avx512::gemm_panels((m, d, np), ap, pp, (cp, c_rs), epi);
        }
        return;
    }
    for p in 0..np {
        // SAFETY: panel p holds d x 16 floats; rows 0..m of `a` (d wide), of C and of the
        // epilogue's P (columns 16p..16p+16 <= width) and its per-row arrays are in bounds
        // by the asserts; AVX2 + FMA were checked by `applies`.
        unsafe {
            rows::<6, 2>(
                m,
                d,
                (a.as_ptr(), d, 1),
                (panels.as_ptr().add(p * d * PANEL), PANEL),
                (c.as_mut_ptr().add(p * PANEL), c_rs),
                epi.at(0, p * PANEL, c_rs),
            );
        }
    }
}

/// Unnormalised probabilities `exp(scale * (s - max))` of a score block in place (row
/// stride `lkp`, `lk` keys) and each row's log-sum-exp and sum.
fn exp_rows(
    isa: Isa,
    s: &mut [f32],
    (lk, lkp): (usize, usize),
    max: &[f32],
    scale: f32,
) -> Vec<(f32, f32)> {
    s.chunks_mut(lkp)
        .zip(max)
        .map(|(row, &m)| {
            let sum = exp_sum(isa, &mut row[..lk], scale, m * scale);
            (m * scale + sum.ln(), sum)
        })
        .collect()
}

/// `x = exp(scale * x - shift)` in place; returns the sum.
fn exp_sum(isa: Isa, x: &mut [f32], scale: f32, shift: f32) -> f32 {
    // SAFETY: AVX2 + FMA were checked by `applies` before any caller got here, AVX-512F
    // when `isa` was chosen.
    unsafe {
        match isa {
            Isa::Avx2 => exp_sum_avx2(x, scale, shift),
            Isa::Avx512 => super::attention_avx512::exp_sum(x, scale, shift),
        }
    }
}

#[target_feature(enable = "avx2,fma")]
fn exp_sum_avx2(x: &mut [f32], scale: f32, shift: f32) -> f32 {
    let (sc, sh) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift));
    let mut acc = _mm256_setzero_ps();
    let mut chunks = x.chunks_exact_mut(8);
    for c in &mut chunks {
        // SAFETY: `c` is 8 floats.
        unsafe {
            let e = exp8(_mm256_fmsub_ps(_mm256_loadu_ps(c.as_ptr()), sc, sh));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
    }
    let mut lanes = [0f32; 8];
    // SAFETY: `lanes` is 8 floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = super::fastmath::exp(*v * scale - shift);
        sum += *v;
    }
    sum
}

/// Attention output [N, Lq, Dv] and each query row's log-sum-exp of the scaled scores
/// [N, Lq] (see `attention_cpu::forward`).
pub(crate) fn forward(
    isa: Isa,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    dm: Dims,
    scale: f32,
) -> (Vec<f32>, Vec<f32>) {
    let (bqm, lkp) = (dm.bq.max(1), padded(dm.lk));
    let mut out = vec![0f32; dm.n * dm.lq * dm.dv];
    let mut lse = vec![0f32; dm.n * dm.lq];
    if out.is_empty() || dm.lk == 0 {
        return (out, lse);
    }
    let kp: Vec<Vec<f32>> = (0..dm.n)
        .into_par_iter()
        .map(|h| pack_panels(&k[h * dm.lk * dm.d..(h + 1) * dm.lk * dm.d], dm.lk, dm.d))
        .collect();
    // One task per (head, query block); each writes its own rows of `out` and `lse`.
    let mut tasks: Vec<(usize, usize, &mut [f32], &mut [f32])> = Vec::new();
    for (h, (head_out, head_lse)) in out
        .chunks_mut(dm.lq * dm.dv)
        .zip(lse.chunks_mut(dm.lq))
        .enumerate()
    {
        for (b, (blk, l)) in head_out
            .chunks_mut(bqm * dm.dv)
            .zip(head_lse.chunks_mut(bqm))
            .enumerate()
        {
            tasks.push((h, b, blk, l));
        }
    }
    tasks.into_par_iter().for_each_init(
        || vec![0f32; bqm * lkp],
        |p, (h, b, o_blk, lse_blk)| {
            let bq = lse_blk.len();
            let r0 = h * dm.lq + b * bqm;
            let q_blk = &q[r0 * dm.d..(r0 + bq) * dm.d];
            let vh = &v[h * dm.lk * dm.dv..(h + 1) * dm.lk * dm.dv];
            let mut max = vec![f32::NEG_INFINITY; bq];
            gemm_panels(
                isa,
                (bq, dm.d),
                q_blk,
                &kp[h],
                (p, lkp),
                PanelEpi::Max(&mut max),
            );
            let ls = exp_rows(isa, p, (dm.lk, lkp), &max, scale);
            gemm_wide(
                isa,
                (bq, dm.dv, dm.lk),
                Strided::rows(p, lkp),
                (vh, dm.dv),
                (o_blk, dm.dv),
                1.0,
                false,
            );
            for ((row, l), &(lse_r, sum)) in o_blk.chunks_mut(dm.dv).zip(lse_blk).zip(&ls) {
                let inv = 1.0 / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                *l = lse_r;
            }
        },
    );
    (out, lse)
}

/// q, k, v, the output and its gradient.
type Inputs<'a> = (&'a [f32], &'a [f32], &'a [f32], &'a [f32], &'a [f32]);

/// dk and dv, when asked for.
type KvGrads = Option<(Vec<f32>, Vec<f32>)>;

/// Gradients `(dq, Some((dk, dv)))` from the output `o`, its gradient `d_o` and the
/// forward's row log-sum-exp (recomputed when `lse` is `None`); dk and dv only when
/// `want_kv` (see `attention_cpu::backward`).
///
/// FlashAttention-2's loop order: per head, blocks of [`KEY_BLOCK`] keys outside, query
/// blocks inside, so a key block's dK and dV rows and its score tiles stay in cache while
/// every query block adds to them (dQ rows are revisited once per key block instead).
/// Per tile: `P = exp(scale Q K^T - lse)` and `dS = P * (dO V^T - rowsum(dO * O))` are
/// each one panel product with the softmax in its epilogue, then `dQ += scale dS K`,
/// `dV += P^T dO`, `dK += scale dS^T Q`.
pub(crate) fn backward(
    isa: Isa,
    (q, k, v, o, d_o): Inputs,
    lse: Option<&[f32]>,
    dm: Dims,
    scale: f32,
    want_kv: bool,
) -> (Vec<f32>, KvGrads) {
    let mut dq = vec![0f32; dm.n * dm.lq * dm.d];
    let kv_len = if want_kv { dm.n * dm.lk } else { 0 };
    let mut dk = vec![0f32; kv_len * dm.d];
    let mut dv = vec![0f32; kv_len * dm.dv];
    if dq.is_empty() || dm.lk == 0 {
        return (dq, want_kv.then_some((dk, dv)));
    }
    let lse = lse.filter(|l| l.len() == dm.n * dm.lq);
    let bqm = dm.bq.max(1);
    // Tile row stride: a key block plus one panel (see the module docs).
    let bkp = KEY_BLOCK.min(dm.lk.div_ceil(PANEL) * PANEL) + PANEL;
    let head = |h: usize, dq_h: &mut [f32], mut dkv: Option<(&mut [f32], &mut [f32])>| {
        let kh = &k[h * dm.lk * dm.d..(h + 1) * dm.lk * dm.d];
        let vh = &v[h * dm.lk * dm.dv..(h + 1) * dm.lk * dm.dv];
        let rows = h * dm.lq..(h + 1) * dm.lq;
        let q_h = &q[rows.start * dm.d..rows.end * dm.d];
        let do_h = &d_o[rows.start * dm.dv..rows.end * dm.dv];
        let (kp, vp) = (pack_panels(kh, dm.lk, dm.d), pack_panels(vh, dm.lk, dm.dv));
        let lse_h: Vec<f32> = match lse {
            Some(l) => l[rows.clone()].to_vec(),
            None => head_lse(isa, q_h, &kp, &dm, scale),
        };
        let delta: Vec<f32> = do_h
            .chunks_exact(dm.dv)
            .zip(o[rows.start * dm.dv..rows.end * dm.dv].chunks_exact(dm.dv))
            .map(|(a, b)| a.iter().zip(b).map(|(x, y)| x * y).sum())
            .collect();
        let mut p = vec![0f32; bqm * bkp];
        let mut ds = vec![0f32; bqm * bkp];
        for k0 in (0..dm.lk).step_by(KEY_BLOCK) {
            let kl = KEY_BLOCK.min(dm.lk - k0);
            let (p0, p1) = (k0 / PANEL, (k0 + kl).div_ceil(PANEL));
            let kp_blk = &kp[p0 * dm.d * PANEL..p1 * dm.d * PANEL];
            let vp_blk = &vp[p0 * dm.dv * PANEL..p1 * dm.dv * PANEL];
            let k_blk = &kh[k0 * dm.d..(k0 + kl) * dm.d];
            for (b, dq_blk) in dq_h.chunks_mut(bqm * dm.d).enumerate() {
                let bq = dq_blk.len() / dm.d;
                let r0 = b * bqm;
                let q_blk = &q_h[r0 * dm.d..(r0 + bq) * dm.d];
                let do_blk = &do_h[r0 * dm.dv..(r0 + bq) * dm.dv];
                let exp = PanelEpi::Exp {
                    scale,
                    lse: &lse_h[r0..r0 + bq],
                };
                gemm_panels(isa, (bq, dm.d), q_blk, kp_blk, (&mut p, bkp), exp);
                let dsm = PanelEpi::DSoftmax {
                    p: &p,
                    delta: &delta[r0..r0 + bq],
                };
                gemm_panels(isa, (bq, dm.dv), do_blk, vp_blk, (&mut ds, bkp), dsm);
                let ds_rows = Strided::rows(&ds, bkp);
                let dqc = (&mut dq_blk[..], dm.d);
                gemm_wide(
                    isa,
                    (bq, dm.d, kl),
                    ds_rows,
                    (k_blk, dm.d),
                    dqc,
                    scale,
                    k0 > 0,
                );
                if let Some((dk_h, dv_h)) = dkv.as_mut() {
                    let (p_t, ds_t) = (Strided::cols(&p, bkp), Strided::cols(&ds, bkp));
                    let dvc = (&mut dv_h[k0 * dm.dv..(k0 + kl) * dm.dv], dm.dv);
                    gemm_wide(isa, (kl, dm.dv, bq), p_t, (do_blk, dm.dv), dvc, 1.0, true);
                    let dkc = (&mut dk_h[k0 * dm.d..(k0 + kl) * dm.d], dm.d);
                    gemm_wide(isa, (kl, dm.d, bq), ds_t, (q_blk, dm.d), dkc, scale, true);
                }
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

/// One head's row log-sum-exp of the scaled scores, as the forward computes it.
fn head_lse(isa: Isa, q_h: &[f32], kp: &[f32], dm: &Dims, scale: f32) -> Vec<f32> {
    let (bqm, lkp) = (dm.bq.max(1), padded(dm.lk));
    let mut s = vec![0f32; bqm * lkp];
    let mut out = Vec::with_capacity(dm.lq);
    for q_blk in q_h.chunks(bqm * dm.d) {
        let bq = q_blk.len() / dm.d;
        let mut max = vec![f32::NEG_INFINITY; bq];
        gemm_panels(
            isa,
            (bq, dm.d),
            q_blk,
            kp,
            (&mut s, lkp),
            PanelEpi::Max(&mut max),
        );
        out.extend(
            exp_rows(isa, &mut s, (dm.lk, lkp), &max, scale)
                .iter()
                .map(|&(l, _)| l),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0
            })
            .collect()
    }

    /// The backward without the forward's saved log-sum-exp (recomputed per block) gives
    /// the gradients it gives with it.
    #[test]
    fn backward_recomputes_a_missing_log_sum_exp() {
        let dm = Dims {
            n: 2,
            lq: 13,
            lk: 2 * KEY_BLOCK + 21,
            d: 16,
            dv: 8,
            bq: 5,
        };
        if !applies(&dm) {
            return;
        }
        let (q, k, v) = (
            fill(dm.n * dm.lq * dm.d, 1),
            fill(dm.n * dm.lk * dm.d, 2),
            fill(dm.n * dm.lk * dm.dv, 3),
        );
        let d_o = fill(dm.n * dm.lq * dm.dv, 4);
        for isa in [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.available())
        {
            let (o, lse) = forward(isa, &q, &k, &v, dm, 0.3);
            let saved = backward(isa, (&q, &k, &v, &o, &d_o), Some(&lse), dm, 0.3, true);
            let fresh = backward(isa, (&q, &k, &v, &o, &d_o), None, dm, 0.3, true);
            let (a, b) = (saved.1.unwrap(), fresh.1.unwrap());
            for (x, y) in [(&saved.0, &fresh.0), (&a.0, &b.0), (&a.1, &b.1)] {
                let err = x
                    .iter()
                    .zip(y)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0f32, f32::max);
                assert!(err < 1e-5, "{isa:?}: max abs difference {err}");
            }
            assert!(saved.0.iter().any(|&x| x != 0.0));
        }
    }
}
