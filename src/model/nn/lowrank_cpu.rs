//! A frozen linear layer with its LoRA delta as one f32 CPU op:
//! `y = x W^T + b + scale * (x A^T) B^T`, `A` [r, in] (down) and `B` [out, r] (up).
//!
//! Built from candle's ops the delta is five graph nodes, and the graph then keeps the base
//! output, the up-projection and its scaled copy alive until the backward: two or three
//! activation-sized tensors per adapted layer (+2.5 GB for SD1.5's 192 UNet modules at
//! 512 px) and as many zero-filled gradient buffers in the backward. Here the op keeps
//! only `x A^T` ([rows, r]) and writes, in the backward, `dx = dy W + scale (dy B) A`,
//! `dA = scale (dy B)^T x` and `dB = scale dy^T (x A^T)` with five GEMMs.

use super::fused_cpu::{applies, slice, with_data};
use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;
use std::sync::Mutex;

type CResult<T> = candle_core::Result<T>;

fn err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("LoRA linear: {msg}"))
}

/// A row-major matrix in a slice read through strides: element (i, j) at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst [m, n] (row-major) = (accumulate ? dst : 0) + beta * lhs @ rhs`.
fn matmul(dst: &mut [f32], lhs: View, rhs: View, accumulate: bool, beta: f32) {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    assert!(rhs.rows == k && dst.len() == m * n && lhs.in_bounds() && rhs.in_bounds());
    if m * n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(0.0);
        }
        return;
    }
    let par = match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        t => Parallelism::Rayon(t),
    };
    // SAFETY: the asserts above bound every element the views address; dst is [m, n]
    // row-major and exclusively borrowed.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            par,
        );
    }
}

struct LoraLinearOp {
    w: Tensor,
    b: Option<Tensor>,
    scale: f32,
    /// `x A^T` [rows, r] from the forward.
    h: Mutex<Vec<f32>>,
}

struct Dims {
    rows: usize,
    inp: usize,
    out: usize,
    r: usize,
}

impl LoraLinearOp {
    fn dims(&self, x: &Shape, a: &Shape, b: &Shape) -> CResult<Dims> {
        let (out, inp) = self.w.dims2()?;
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if x.dims().last() != Some(&inp) || a_in != inp || b_out != out || b_r != r {
            return Err(err("input, weight and factor shapes disagree"));
        }
        Ok(Dims {
            rows: x.elem_count() / inp.max(1),
            inp,
            out,
            r,
        })
    }
}

impl CustomOp3 for LoraLinearOp {
    fn name(&self) -> &'static str {
        "lora-linear"
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
        let (x, a, bm) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
        let d = self.dims(l1.shape(), l2.shape(), l3.shape())?;
        let mut y = vec![0f32; d.rows * d.out];
        if let Some(b) = &self.b {
            let bv = b.flatten_all()?.to_vec1::<f32>()?;
            if bv.len() != d.out {
                return Err(err("bias length and weight disagree"));
            }
            y.par_chunks_mut(d.out * 64).for_each(|c| {
                c.chunks_exact_mut(d.out)
                    .for_each(|r| r.copy_from_slice(&bv))
            });
        }
        let xv = View::new(x, d.rows, d.inp);
        with_data(&self.w, |w| {
            matmul(
                &mut y,
                xv,
                View::new(w, d.out, d.inp).t(),
                self.b.is_some(),
                1.0,
            );
            Ok(())
        })?;
        let mut h = vec![0f32; d.rows * d.r];
        matmul(&mut h, xv, View::new(a, d.r, d.inp).t(), false, 1.0);
        matmul(
            &mut y,
            View::new(&h, d.rows, d.r),
            View::new(bm, d.out, d.r).t(),
            true,
            self.scale,
        );
        *self.h.lock().map_err(|_| err("poisoned"))? = h;
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().expect("checked") = d.out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> CResult<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(x.shape(), a.shape(), b.shape())?;
        let h = self.h.lock().map_err(|_| err("poisoned"))?.clone();
        if h.len() != d.rows * d.r {
            return Err(err("backward before forward"));
        }
        let (need_x, need_a, need_b) = (x.track_op(), a.track_op(), b.track_op());
        let (dx, da, db) = with_data(grad, |dy| {
            with_data(a, |av| {
                with_data(b, |bv| {
                    let dyv = View::new(dy, d.rows, d.out);
                    // dh = scale * dy B  [rows, r]
                    let mut dh = vec![0f32; d.rows * d.r];
                    matmul(&mut dh, dyv, View::new(bv, d.out, d.r), false, self.scale);
                    let dhv = View::new(&dh, d.rows, d.r);
                    let db = need_b.then(|| {
                        let mut db = vec![0f32; d.out * d.r];
                        matmul(
                            &mut db,
                            dyv.t(),
                            View::new(&h, d.rows, d.r),
                            false,
                            self.scale,
                        );
                        db
                    });
                    let da = if need_a {
                        with_data(x, |xs| {
                            let mut da = vec![0f32; d.r * d.inp];
                            matmul(&mut da, dhv.t(), View::new(xs, d.rows, d.inp), false, 1.0);
                            Ok(Some(da))
                        })?
                    } else {
                        None
                    };
                    let dx = if need_x {
                        let mut dx = vec![0f32; d.rows * d.inp];
                        with_data(&self.w, |w| {
                            matmul(&mut dx, dyv, View::new(w, d.out, d.inp), false, 1.0);
                            Ok(())
                        })?;
                        matmul(&mut dx, dhv, View::new(av, d.r, d.inp), true, 1.0);
                        Some(dx)
                    } else {
                        None
                    };
                    Ok((dx, da, db))
                })
            })
        })?;
        let t = |v: Option<Vec<f32>>, s: &Shape| -> CResult<Option<Tensor>> {
            v.map(|v| Tensor::from_vec(v, s.clone(), &Device::Cpu))
                .transpose()
        };
        Ok((t(dx, x.shape())?, t(da, a.shape())?, t(db, b.shape())?))
    }
}

/// Whether [`lora_linear`] takes these tensors (f32 on the CPU, 2-D factors).
pub(crate) fn lora_linear_applies(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor) -> bool {
    applies(&[x, w, a, b]) && w.rank() == 2 && a.rank() == 2 && b.rank() == 2
}

/// `x W^T + bias + scale * (x A^T) B^T` with `W`, `bias` frozen; gradients for `x`, `A`
/// and `B` where tracked.
pub(crate) fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> CResult<Tensor> {
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinearOp {
            w: w.contiguous()?,
            b: bias.cloned(),
            scale: scale as f32,
            h: Mutex::new(Vec::new()),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
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

    fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let (a, b) = (
            f(a).to_vec1::<f64>().unwrap(),
            f(b).to_vec1::<f64>().unwrap(),
        );
        let m = b.iter().fold(1f64, |m, v| m.max(v.abs()));
        a.iter()
            .zip(&b)
            .fold(0f64, |e, (x, y)| e.max((x - y).abs()))
            / m
    }

    /// Output and the gradients of x, A and B equal candle's composite
    /// `x W^T + b + scale (x A^T) B^T` and its autograd, with and without a bias, for 2-D
    /// and 3-D inputs.
    #[test]
    fn matches_composite_forward_and_gradients() {
        for (case, (xdims, inp, out, r, with_bias)) in [
            (vec![2, 5, 7], 7, 6, 3, true),
            (vec![9, 4], 4, 11, 2, false),
            (vec![1, 3, 8], 8, 8, 8, true),
        ]
        .into_iter()
        .enumerate()
        {
            let s = case as u64 * 10;
            let x = Var::from_tensor(&randn(&xdims, s + 1)).unwrap();
            let w = randn(&[out, inp], s + 2);
            let bias = with_bias.then(|| randn(&[out], s + 3));
            let a = Var::from_tensor(&randn(&[r, inp], s + 4)).unwrap();
            let b = Var::from_tensor(&randn(&[out, r], s + 5)).unwrap();
            let scale = 0.75;
            let mut odims = xdims.clone();
            *odims.last_mut().unwrap() = out;
            let g = randn(&odims, s + 6);

            let fused = lora_linear(x.as_tensor(), &w, bias.as_ref(), &a, &b, scale).unwrap();
            let mut want = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
            if let Some(bv) = &bias {
                want = want.broadcast_add(bv).unwrap();
            }
            let delta = x
                .as_tensor()
                .broadcast_matmul(&a.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.as_tensor().t().unwrap())
                .unwrap();
            let want = (want + (delta * scale).unwrap()).unwrap();
            assert!(max_rel_err(&fused, &want) < 1e-5, "case {case} forward");

            let loss = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let (gf, gw) = (loss(&fused), loss(&want));
            for (name, v) in [
                ("x", x.as_tensor()),
                ("A", a.as_tensor()),
                ("B", b.as_tensor()),
            ] {
                let e = max_rel_err(gf.get(v).unwrap(), gw.get(v).unwrap());
                assert!(e < 1e-5, "case {case} d{name}: {e}");
            }
        }
    }

    /// Only what is tracked gets a gradient: frozen factors (a Textual Inversion run over a
    /// LoRA-patched model) leave just dx.
    #[test]
    fn untracked_factors_get_no_gradient() {
        let x = Var::from_tensor(&randn(&[3, 4], 1)).unwrap();
        let (w, a, b) = (randn(&[5, 4], 2), randn(&[2, 4], 3), randn(&[5, 2], 4));
        let y = lora_linear(x.as_tensor(), &w, None, &a, &b, 1.0).unwrap();
        let gs = y.sum_all().unwrap().backward().unwrap();
        assert!(gs.get(x.as_tensor()).is_some());
        assert!(gs.get(&a).is_none() && gs.get(&b).is_none());
        assert!(lora_linear(&randn(&[3, 5], 5), &w, None, &a, &b, 1.0).is_err());
    }
}
