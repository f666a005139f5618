//! AdamW's and Lion's updates of an f32 parameter on the CPU in one pass over the
//! parameter, its gradient and its moments, all in their own storage, instead of a dozen
//! tensor-sized candle intermediates per parameter. Per element the same operations in the
//! same order as the tensor version in `Optimizer::step` (candle's scalar ops: `x * a`,
//! `x / a` as `x * (1 / a)`, `x + a`, each factor rounded to f32), which stays for other
//! dtypes and devices.

use super::{Hyper, OptimizerKind, UpdateF32};
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Result, Tensor, Var};
use rayon::prelude::*;
use std::sync::Mutex;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// AdamW's or Lion's update of `var` (contiguous f32 on the CPU) in place, its moments
/// `(m, v)` created as zeros on the first update and updated in their own storage.
pub(super) fn step(
    h: Hyper,
    var: &Var,
    g: &Tensor,
    (m, v): (&mut Option<Tensor>, &mut Option<Tensor>),
    lr: f64,
    t: i32,
) -> Result<()> {
    let moment = |s: &mut Option<Tensor>| -> Result<Tensor> {
        match s.take() {
            Some(x) if super::in_place_f32(&x) => Ok(x),
            Some(x) => x.to_dtype(DType::F32)?.to_device(var.device())?.copy(),
            None => var.as_tensor().zeros_like(),
        }
    };
    let m1 = moment(m)?;
    let (m1, v1) = match h.kind {
        OptimizerKind::AdamW => {
            let v1 = moment(v)?;
            with_f32_mut(&m1, |ms| {
                with_f32_mut(&v1, |vs| {
                    let u = AdamW {
                        m: Mutex::new(ms),
                        v: Mutex::new(vs),
                        lr,
                        beta1: h.beta1,
                        beta2: h.beta2,
                        eps: h.eps,
                        weight_decay: h.weight_decay,
                        t,
                    };
                    super::update_in_place(var, g, &u)
                })
            })?;
            (m1, Some(v1))
        }
        _ => {
            with_f32_mut(&m1, |ms| {
                let u = Lion {
                    m: Mutex::new(ms),
                    lr,
                    beta1: h.beta1,
                    beta2: h.beta2,
                    weight_decay: h.weight_decay,
                };
                super::update_in_place(var, g, &u)
            })?;
            (m1, v.take())
        }
    };
    (*m, *v) = (Some(m1), v1);
    Ok(())
}

/// Runs `f` on the elements of the contiguous f32 CPU tensor `t`, in its own storage.
fn with_f32_mut<R: Send>(t: &Tensor, f: impl FnOnce(&mut [f32]) -> Result<R> + Send) -> Result<R> {
    struct Op<F, R>(Mutex<Option<F>>, Mutex<Option<R>>);
    impl<F: FnOnce(&mut [f32]) -> Result<R> + Send, R: Send> InplaceOp1 for Op<F, R> {
        fn name(&self) -> &'static str {
            "f32-in-place"
        }

        fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
            let CpuStorage::F32(v) = s else {
                candle_core::bail!("in-place moment: f32 only")
            };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("in-place moment: contiguous tensors only")
            };
            let f = self.0.lock().ok().and_then(|mut f| f.take());
            let f = f.ok_or_else(|| candle_core::Error::Msg("in-place op run twice".into()))?;
            let r = f(&mut v[a..b])?;
            if let Ok(mut out) = self.1.lock() {
                *out = Some(r);
            }
            Ok(())
        }
    }
    let op = Op(Mutex::new(Some(f)), Mutex::new(None));
    t.inplace_op1(&op)?;
    let r = op.1.lock().ok().and_then(|mut r| r.take());
    r.ok_or_else(|| candle_core::Error::Msg("in-place op: no result".into()))
}

/// AdamW (torch's, `amsgrad=False`) with both moments; `t` is the update's number.
struct AdamW<'a> {
    pub m: Mutex<&'a mut [f32]>,
    pub v: Mutex<&'a mut [f32]>,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub t: i32,
}

/// Lion (lion-pytorch) with its one moment.
struct Lion<'a> {
    pub m: Mutex<&'a mut [f32]>,
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub weight_decay: f64,
}

fn lock<'g, 'a>(m: &'g Mutex<&'a mut [f32]>) -> Result<std::sync::MutexGuard<'g, &'a mut [f32]>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("optimizer moment: poisoned".into()))
}

fn check(name: &str, p: &[f32], m: &[f32]) -> Result<()> {
    if m.len() != p.len() {
        candle_core::bail!("{name}: moment of {} elements for {}", m.len(), p.len())
    }
    Ok(())
}

impl UpdateF32 for AdamW<'_> {
    const NAME: &'static str = "adamw";

    fn update(&self, p: &mut [f32], g: &[f32]) -> Result<()> {
        let (mut m, mut v) = (lock(&self.m)?, lock(&self.v)?);
        check(Self::NAME, p, &m)?;
        check(Self::NAME, p, &v)?;
        let bc1 = 1.0 - self.beta1.powi(self.t);
        let bc2 = 1.0 - self.beta2.powi(self.t);
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let (b1, nb1) = (self.beta1 as f32, (1.0 - self.beta1) as f32);
        let (b2, nb2) = (self.beta2 as f32, (1.0 - self.beta2) as f32);
        let inv_sqrt_bc2 = (1.0 / bc2.sqrt()) as f32;
        let eps = self.eps as f32;
        let step = (self.lr / bc1) as f32;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .zip(v.par_chunks_mut(CHUNK))
            .for_each(|(((p, g), m), v)| {
                for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m).zip(v) {
                    let m1 = *m * b1 + g * nb1;
                    let v1 = *v * b2 + (g * g) * nb2;
                    let denom = v1.sqrt() * inv_sqrt_bc2 + eps;
                    *p = *p * decay - (m1 / denom) * step;
                    (*m, *v) = (m1, v1);
                }
            });
        Ok(())
    }
}

impl UpdateF32 for Lion<'_> {
    const NAME: &'static str = "lion";

    fn update(&self, p: &mut [f32], g: &[f32]) -> Result<()> {
        let mut m = lock(&self.m)?;
        check(Self::NAME, p, &m)?;
        let decay = (1.0 - self.lr * self.weight_decay) as f32;
        let (b1, nb1) = (self.beta1 as f32, (1.0 - self.beta1) as f32);
        let (b2, nb2) = (self.beta2 as f32, (1.0 - self.beta2) as f32);
        let lr = self.lr as f32;
        // candle's `sign`: -1, 0 or 1 (0 for zero and NaN).
        let sign = |x: f32| (x > 0.0) as i32 as f32 - (x < 0.0) as i32 as f32;
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK))
            .for_each(|((p, g), m)| {
                for ((p, &g), m) in p.iter_mut().zip(g).zip(m) {
                    let c = *m * b1 + g * nb1;
                    *p = *p * decay - sign(c) * lr;
                    *m = *m * b2 + g * nb2;
                }
            });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Group, Hyper, Optimizer, OptimizerKind};
    use candle_core::{DType, Device, Tensor, Var};

    /// The in-place AdamW and Lion updates (f32 parameters) give exactly what the tensor
    /// version gives (f64 parameters holding the same values, computed in f32 all the
    /// same) over three updates with weight decay, on a parameter of two parallel chunks;
    /// the moments saved afterwards agree too.
    #[test]
    fn in_place_update_matches_tensor_version() {
        let dims = [300usize, 70];
        let n = dims[0] * dims[1];
        let wave = |a: f64, b: f64| -> Vec<f32> {
            (0..n)
                .map(|k| (0.05 * (a * k as f64 + b).sin()) as f32)
                .collect()
        };
        for kind in [OptimizerKind::AdamW, OptimizerKind::Lion] {
            let mut h = Hyper::defaults(kind);
            h.weight_decay = 0.1;
            let run = |dtype: DType| -> (Vec<f32>, Vec<(String, Vec<f32>)>) {
                let t = Tensor::from_vec(wave(0.7, 0.3), &dims, &Device::Cpu).unwrap();
                let var = Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap();
                let group = Group {
                    name: "unet".into(),
                    vars: vec![var.clone()],
                };
                let mut o = Optimizer::new(h, vec![group]);
                for t in 1..=3 {
                    let g = Tensor::from_vec(wave(0.37, 1.3 * t as f64), &dims, &Device::Cpu);
                    let g = g.unwrap().to_dtype(dtype).unwrap();
                    o.step(&[vec![g]], &[1e-2]).unwrap();
                }
                let flat = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                let state = o.state_tensors().unwrap();
                let state = state.iter().map(|(k, t)| (k.clone(), flat(t))).collect();
                (flat(var.as_tensor()), state)
            };
            let (fused, tensors) = (run(DType::F32), run(DType::F64));
            assert_eq!(fused.0, tensors.0, "{kind:?}");
            assert_eq!(fused.1, tensors.1, "{kind:?}");
            assert_eq!(
                fused.1.len(),
                if kind == OptimizerKind::AdamW { 2 } else { 1 }
            );
            assert!(fused.0 != wave(0.7, 0.3), "{kind:?} did not move");
        }
    }
}
