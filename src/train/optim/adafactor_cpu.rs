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
                    *s = row.iter().map(|&x| sq(x)).sum();
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
fn ema(old: Option<Vec<f32>>, new: Vec<f32>, beta: f64) -> Vec<f32> {
    let (keep, take) = (beta as f32, (1.0 - beta) as f32);
    let new = new.into_iter().map(move |x| x * take);
    match old {
        Some(old) => old.iter().zip(new).map(|(&o, n)| o * keep + n).collect(),
        None => new.collect(),
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
            .map(|s| s.iter().map(|&x| x * x).sum::<f32>() as f64)
            .sum();
        let lr = a.lr(self.lr, self.t, p_sq.sqrt() / n.sqrt());
        self.applied.set(lr);

        let beta2t = 1.0 - (self.t as f64).powf(a.decay_rate);
        let (row_sum, col_sum) = sums(g, (b, r, c), a.eps1 as f32);
        let mut st = self.state.borrow_mut();
        let row = ema(
            moment(&st.row)?,
            row_sum.iter().map(|&s| s / c as f32).collect(),
            beta2t,
        );
        let col = ema(
            moment(&st.col)?,
            col_sum.iter().map(|&s| s / r as f32).collect(),
            beta2t,
        );
        // rsqrt(row / mean(row)) per matrix, rsqrt(col).
        let mut row_f = vec![0f32; b * r];
        for (f, m) in row_f.chunks_mut(r).zip(row.chunks(r)) {
            let mean = m.iter().sum::<f32>() / r as f32;
            f.iter_mut()
                .zip(m)
                .for_each(|(f, &x)| *f = (x / mean).sqrt().recip());
        }
        let col_f: Vec<f32> = col.iter().map(|&x| x.sqrt().recip()).collect();
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
        let factors = |i: usize| (row_f[i], &col_f[(i / r) * c..][..c]);
        let per = rows_per_task(c);
        let u_sq: f64 = g
            .par_chunks(per * c)
            .enumerate()
            .map(|(task, g)| {
                let mut s = 0f64;
                for (k, row) in g.chunks_exact(c).enumerate() {
                    let (rf, cf) = factors(task * per + k);
                    let row_sum: f32 = row
                        .iter()
                        .zip(cf)
                        .map(|(&x, &cj)| {
                            let v = rf * cj * x;
                            v * v
                        })
                        .sum();
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
                for (k, (prow, grow)) in p.chunks_exact_mut(c).zip(g.chunks_exact(c)).enumerate() {
                    let (rf, cf) = factors(task * per + k);
                    for ((pj, &x), &cj) in prow.iter_mut().zip(grow).zip(cf) {
                        let kept = if wd { *pj + *pj * decay } else { *pj };
                        *pj = kept - rf * cj * x * inv * lr32;
                    }
                }
            });
        Ok(())
    }
}
