//! Adafactor's update of a factored f32 parameter on the CPU in its own storage, in a few
//! passes (the parameter's sum of squares; row and column sums of `g^2 + eps1`, one read of
//! the gradient for many small matrices, two for few large ones; the update's sum of
//! squares; the step) instead of a dozen tensor-sized intermediates. The same operations in the same order per element as the tensor version
//! in `adafactor` (which stays for other devices and dtypes, unfactored parameters and a
//! first moment); only the sums add up in another order.

use super::adafactor::{AdafactorArgs, State};
use candle_core::{Device, Tensor};
use rayon::prelude::*;
use std::cell::{Cell, RefCell};

/// One parameter's update: `(batch, rows, cols)` views the parameter as `batch` matrices
/// over its last two dimensions, as transformers factors it.
pub(super) struct InPlace<'a> {
    pub state: RefCell<&'a mut State>,
    pub args: AdafactorArgs,
    pub weight_decay: f64,
    /// The group's learning rate (unused under `relative_step`) and the update's number.
    pub lr: f64,
    pub t: u64,
    pub shape: (usize, usize, usize),
    pub row_dims: Vec<usize>,
    pub col_dims: Vec<usize>,
    /// The rate the update took (the parameter's scale times the relative step).
    pub applied: Cell<f64>,
}

/// Columns per task of the column sums when few matrices make up the parameter.
const COL_CHUNK: usize = 256;

/// Rows of `cols` elements per parallel task: about 4096 elements (3x3 kernels have rows
/// of three).
fn rows_per_task(cols: usize) -> usize {
    (4096 / cols).max(1)
}

/// The sum of `f(x)` over `xs` (with `ys` beside it) in eight interleaved partial sums:
/// LLVM vectorises this where a left fold of f32 additions stays one add at a time.
#[inline]
fn lane_sum2(xs: &[f32], ys: &[f32], f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let (xc, yc) = (xs.chunks_exact(8), ys.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (x, y) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += f(x[k], y[k]);
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (&x, &y) in xr.iter().zip(yr) {
        s += f(x, y);
    }
    s
}

/// [`lane_sum2`] over one slice.
#[inline]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    lane_sum2(xs, xs, |x, _| f(x))
}

/// Row sums `[batch * rows]` and column sums `[batch * cols]` of `g^2 + eps1`.
fn sums(g: &[f32], (b, r, c): (usize, usize, usize), eps1: f32) -> (Vec<f32>, Vec<f32>) {
    let sq = |x: f32| x * x + eps1;
    let mut rows = vec![0f32; b * r];
    let mut cols = vec![0f32; b * c];
    if b >= 64 {
        // Many matrices (3x3 kernels, one per in/out channel pair): both sums of a matrix
        // in one read of it.
        rows.par_chunks_mut(r)
            .zip(cols.par_chunks_mut(c))
            .zip(g.par_chunks(r * c))
            .for_each(|((rs, acc), m)| {
                for (s, row) in rs.iter_mut().zip(m.chunks_exact(c)) {
                    let mut t = 0f32;
                    for (a, &x) in acc.iter_mut().zip(row) {
                        let q = sq(x);
                        *a += q;
                        t += q;
                    }
                    *s = t;
                }
            });
    } else {
        // Few large matrices: rows in parallel, then columns in parallel strips.
        let per = rows_per_task(c);
        rows.par_chunks_mut(per)
            .zip(g.par_chunks(per * c))
            .for_each(|(sums, g)| {
                for (s, row) in sums.iter_mut().zip(g.chunks_exact(c)) {
                    *s = lane_sum(row, sq);
                }
            });
        for (acc, m) in cols.chunks_mut(c).zip(g.chunks(r * c)) {
            acc.par_chunks_mut(COL_CHUNK)
                .enumerate()
                .for_each(|(k, acc)| {
                    for row in m.chunks_exact(c) {
                        let row = &row[k * COL_CHUNK..][..acc.len()];
                        acc.iter_mut().zip(row).for_each(|(a, &x)| *a += sq(x));
                    }
                });
        }
    }
    (rows, cols)
}

/// `old * beta + new * (1 - beta)` (the first update: `new * (1 - beta)`), as `ema` (candle
/// takes the factors in f64 and multiplies in f32).
/// `new` is `sums / div`; in parallel (for 3x3 kernels the moments are 2/3 the
/// parameter's size).
fn ema(old: Option<Vec<f32>>, sums: &[f32], div: f32, beta: f64) -> Vec<f32> {
    let (keep, take) = (beta as f32, (1.0 - beta) as f32);
    match old {
        Some(mut o) => {
            o.par_chunks_mut(4096)
                .zip(sums.par_chunks(4096))
                .for_each(|(o, s)| {
                    for (o, &s) in o.iter_mut().zip(s) {
                        *o = *o * keep + (s / div) * take;
                    }
                });
            o
        }
        None => sums.par_iter().map(|&s| (s / div) * take).collect(),
    }
}

/// The factors of the rows of the `[batch * rows, cols]` view from row `first` on: each
/// row's factor and its matrix's column factors, walked without a division per row (a 3x3
/// kernel's rows are three elements long).
struct Factors<'a> {
    row_f: &'a [f32],
    col_f: &'a [f32],
    rc: (usize, usize),
    row: usize,
    matrix: usize,
    in_matrix: usize,
}

impl<'a> Factors<'a> {
    fn new(row_f: &'a [f32], col_f: &'a [f32], (r, c): (usize, usize), first: usize) -> Self {
        Self {
            row_f,
            col_f,
            rc: (r, c),
            row: first,
            matrix: first / r,
            in_matrix: first % r,
        }
    }

    #[inline]
    fn next(&mut self) -> (f32, &'a [f32]) {
        let (r, c) = self.rc;
        let f = (self.row_f[self.row], &self.col_f[self.matrix * c..][..c]);
        self.row += 1;
        self.in_matrix += 1;
        if self.in_matrix == r {
            (self.matrix, self.in_matrix) = (self.matrix + 1, 0);
        }
        f
    }
}

fn moment(t: &Option<Tensor>) -> candle_core::Result<Option<Vec<f32>>> {
    t.as_ref()
        .map(|t| t.flatten_all()?.to_vec1::<f32>())
        .transpose()
}

impl super::UpdateF32 for InPlace<'_> {
    const NAME: &'static str = "adafactor";

    fn update(&self, p: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        let (b, r, c) = self.shape;
        if p.len() != b * r * c {
            candle_core::bail!(
                "adafactor: {} elements for a {:?} view",
                p.len(),
                self.shape
            )
        }
        let a = &self.args;
        let n = p.len() as f64;
        let p_sq: f64 = p
            .par_chunks(4096)
            .map(|s| lane_sum(s, |x| x * x) as f64)
            .sum();
        let lr = a.lr(self.lr, self.t, p_sq.sqrt() / n.sqrt());
        self.applied.set(lr);

        let beta2t = 1.0 - (self.t as f64).powf(a.decay_rate);
        let (row_sum, col_sum) = sums(g, (b, r, c), a.eps1 as f32);
        let mut st = self.state.borrow_mut();
        let row = ema(moment(&st.row)?, &row_sum, c as f32, beta2t);
        let col = ema(moment(&st.col)?, &col_sum, r as f32, beta2t);
        // rsqrt(row / mean(row)) per matrix, rsqrt(col).
        let mut row_f = vec![0f32; b * r];
        let per_matrix = |f: &mut [f32], m: &[f32]| {
            let mean = m.iter().sum::<f32>() / r as f32;
            f.iter_mut()
                .zip(m)
                .for_each(|(f, &x)| *f = (x / mean).sqrt().recip());
        };
        let group = r * (4096 / r).max(1);
        row_f
            .par_chunks_mut(group)
            .zip(row.par_chunks(group))
            .for_each(|(f, m)| {
                for (f, m) in f.chunks_mut(r).zip(m.chunks(r)) {
                    per_matrix(f, m);
                }
            });
        let col_f: Vec<f32> = col.par_iter().map(|&x| x.sqrt().recip()).collect();
        st.row = Some(Tensor::from_vec(
            row,
            self.row_dims.as_slice(),
            &Device::Cpu,
        )?);
        st.col = Some(Tensor::from_vec(
            col,
            self.col_dims.as_slice(),
            &Device::Cpu,
        )?);

        // u = (r * c) * g, and its root mean square.
        // Row i of the [batch * rows, cols] view: its factor and its matrix's column factors.
        let factors = |first: usize| Factors::new(&row_f, &col_f, (r, c), first);
        let per = rows_per_task(c);
        let u_sq: f64 = g
            .par_chunks(per * c)
            .enumerate()
            .map(|(task, g)| {
                let mut s = 0f64;
                let mut next = factors(task * per);
                for row in g.chunks_exact(c) {
                    let (rf, cf) = next.next();
                    let row_sum = lane_sum2(row, cf, |x, cj| {
                        let v = rf * cj * x;
                        v * v
                    });
                    s += row_sum as f64;
                }
                s
            })
            .sum();
        let rms = (u_sq / n).sqrt();
        // `u / denom * lr` as tensor ops: multiplications by `1 / denom` and `lr` in f32.
        let inv = (1.0 / (rms / a.clip_threshold).max(1.0)) as f32;
        let (lr32, decay) = (lr as f32, (-self.weight_decay * lr) as f32);
        let wd = self.weight_decay != 0.0;
        p.par_chunks_mut(per * c)
            .zip(g.par_chunks(per * c))
            .enumerate()
            .for_each(|(task, (p, g))| {
                let mut next = factors(task * per);
                for (prow, grow) in p.chunks_exact_mut(c).zip(g.chunks_exact(c)) {
                    let (rf, cf) = next.next();
                    for ((pj, &x), &cj) in prow.iter_mut().zip(grow).zip(cf) {
                        let kept = if wd { *pj + *pj * decay } else { *pj };
                        *pj = kept - rf * cj * x * inv * lr32;
                    }
                }
            });
        Ok(())
    }
}
