//! Memory-efficient attention: the N x Lq x Lk score matrix is never held, with its own
//! backward that recomputes scores (FlashAttention-style).
//!
//! Inputs are [N, L, D] with N = batch x heads. On the CPU it runs as a candle CustomOp:
//! f32 with head dims that are multiples of 8 on AVX2 through `attention_fast` (own
//! register tiles, softmax in the tile epilogues, the forward's log-sum-exp kept for the
//! backward), other f32 through the fused kernels of `attention_cpu` (one block of query
//! rows x all keys at a time, GEMM + one-pass softmax); other dtypes tiled over queries and keys with an online
//! softmax in candle tensor ops (one bq x bk tile per batch-head). Other devices use
//! [`attention_chunked`], which bounds memory by query chunks but keeps them for backprop.

use super::attention_cpu as fused;
use super::grad::{cpu_storage, cpu_tensor};
use crate::model::Result;
use crate::model::nn::softmax_last_dim;
use candle_core::{CpuStorage, D, DType, Device, Layout, Shape, Storage, Tensor};

/// Tile sizes: queries and keys per tile.
const BQ: usize = 64;
const BK: usize = 1024;
/// Query rows per chunk of the device-independent fallback.
const CHUNK: usize = 256;

/// Plain attention `softmax(q k^T * scale) v` (materialises N x Lq x Lk): the reference.
pub fn attention_naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * scale)?;
    Ok(softmax_last_dim(&s)?.matmul(v)?)
}

/// Memory-efficient attention with a backward for q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_tiled(q, k, v, scale, BQ, BK)
}

/// [`attention`] with explicit tile sizes (queries `bq`, keys `bk` per tile).
pub fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bq: usize,
    bk: usize,
) -> Result<Tensor> {
    if !q.device().is_cpu() {
        return attention_chunked(q, k, v, scale);
    }
    let op = MemEffAttention::new(scale, bq, bk);
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// Query-chunked attention from differentiable ops (device independent fallback).
pub fn attention_chunked(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let lq = q.dim(1)?;
    let mut outs = Vec::new();
    for s in (0..lq).step_by(CHUNK) {
        let qi = q.narrow(1, s, CHUNK.min(lq - s))?;
        outs.push(attention_naive(&qi, k, v, scale)?);
    }
    Ok(Tensor::cat(&outs, 1)?)
}

struct MemEffAttention {
    scale: f64,
    bq: usize,
    bk: usize,
    /// The forward's row log-sum-exp [N, Lq] where the AVX2 kernels ran it (their
    /// backward then recomputes probabilities in one pass).
    lse: std::sync::Mutex<Vec<f32>>,
}

fn blocks(len: usize, b: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(b).map(move |s| (s, b.min(len - s)))
}

impl MemEffAttention {
    fn new(scale: f64, bq: usize, bk: usize) -> Self {
        Self {
            scale,
            bq: bq.max(1),
            bk: bk.max(1),
            lse: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Sizes for the fused kernel from q [N, Lq, D], k [N, Lk, D], v [N, Lk, Dv].
    fn dims(&self, q: &[usize], k: &[usize], v: &[usize]) -> candle_core::Result<fused::Dims> {
        match (q, k, v) {
            (&[n, lq, d], &[n2, lk, d2], &[n3, lk2, dv])
                if n == n2 && n == n3 && d == d2 && lk == lk2 =>
            {
                Ok(fused::Dims {
                    n,
                    lq,
                    lk,
                    d,
                    dv,
                    bq: self.bq,
                })
            }
            _ => Err(candle_core::Error::Msg(format!(
                "attention: incompatible shapes q {q:?}, k {k:?}, v {v:?}"
            ))),
        }
    }

    /// Output block and its row log-sum-exp for queries `qi` [N, bq, D] (online softmax).
    fn forward_block(&self, qi: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (n, bq, _) = qi.dims3()?;
        let dv = v.dim(2)?;
        let mut m =
            Tensor::full(f32::NEG_INFINITY, (n, bq, 1), qi.device())?.to_dtype(qi.dtype())?;
        let mut l = Tensor::zeros((n, bq, 1), qi.dtype(), qi.device())?;
        let mut acc = Tensor::zeros((n, bq, dv), qi.dtype(), qi.device())?;
        for (s, len) in blocks(k.dim(1)?, self.bk) {
            let kj = k.narrow(1, s, len)?;
            let vj = v.narrow(1, s, len)?;
            let sc = (qi.matmul(&kj.t()?)? * self.scale)?;
            let m_new = m.maximum(&sc.max_keepdim(D::Minus1)?)?;
            let p = sc.broadcast_sub(&m_new)?.exp()?;
            let corr = (m - &m_new)?.exp()?;
            l = (l * &corr)?.add(&p.sum_keepdim(D::Minus1)?)?;
            acc = acc.broadcast_mul(&corr)?.add(&p.matmul(&vj)?)?;
            m = m_new;
        }
        let out = acc.broadcast_div(&l)?;
        let lse = (m + l.log()?)?;
        Ok((out, lse))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mut outs = Vec::new();
        for (s, len) in blocks(q.dim(1)?, self.bq) {
            outs.push(self.forward_block(&q.narrow(1, s, len)?, k, v)?.0);
        }
        Ok(Tensor::cat(&outs, 1)?)
    }

    /// Gradients for q and, when `want_kv`, k and v, from tiles recomputed with the row
    /// log-sum-exp. (Cross-attention over a frozen text encoder needs only dq.)
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        o: &Tensor,
        d_o: &Tensor,
        want_kv: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let delta = (d_o * o)?.sum_keepdim(D::Minus1)?;
        let lk = k.dim(1)?;
        let kb: Vec<(usize, usize)> = blocks(lk, self.bk).collect();
        let mut dk: Vec<Option<Tensor>> = vec![None; kb.len()];
        let mut dv: Vec<Option<Tensor>> = vec![None; kb.len()];
        let mut dq = Vec::new();
        let add = |slot: &mut Option<Tensor>, t: Tensor| -> Result<()> {
            *slot = Some(match slot.take() {
                None => t,
                Some(s) => (s + t)?,
            });
            Ok(())
        };
        for (s, len) in blocks(q.dim(1)?, self.bq) {
            let qi = q.narrow(1, s, len)?;
            let doi = d_o.narrow(1, s, len)?;
            let di = delta.narrow(1, s, len)?;
            let (_, lse) = self.forward_block(&qi, k, v)?;
            let mut dqi: Option<Tensor> = None;
            for (j, &(ks, kl)) in kb.iter().enumerate() {
                let kj = k.narrow(1, ks, kl)?;
                let vj = v.narrow(1, ks, kl)?;
                let p = (qi.matmul(&kj.t()?)? * self.scale)?
                    .broadcast_sub(&lse)?
                    .exp()?;
                if want_kv {
                    add(&mut dv[j], p.t()?.matmul(&doi)?)?;
                }
                let dp = doi.matmul(&vj.t()?)?;
                let ds = (p * dp.broadcast_sub(&di)?)?;
                add(&mut dqi, (ds.matmul(&kj)? * self.scale)?)?;
                if want_kv {
                    add(&mut dk[j], (ds.t()?.matmul(&qi)? * self.scale)?)?;
                }
            }
            dq.push(dqi.expect("at least one key block"));
        }
        let cat = |v: Vec<Option<Tensor>>| -> Result<Tensor> {
            let v: Vec<Tensor> = v.into_iter().map(|t| t.expect("filled")).collect();
            Ok(Tensor::cat(&v, 1)?)
        };
        let dkv = if want_kv {
            Some((cat(dk)?, cat(dv)?))
        } else {
            None
        };
        Ok((Tensor::cat(&dq, 1)?, dkv))
    }
}

/// The elements of a contiguous f32 CPU storage.
fn f32_slice<'a>(v: &'a [f32], l: &Layout) -> candle_core::Result<&'a [f32]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("attention: non-contiguous input".into()))?;
    Ok(&v[a..b])
}

/// The elements of a contiguous f32 tensor's CPU storage.
fn f32_of<'a>(s: &'a Storage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    match s {
        Storage::Cpu(CpuStorage::F32(v)) => f32_slice(v, l),
        _ => Err(candle_core::Error::Msg(
            "attention: expected an f32 CPU tensor".into(),
        )),
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("attention: a thread panicked holding the saved log-sum-exp".into())
}

type Grads = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// Gradient tensors shaped like q, k and v from the kernels' buffers.
fn grads(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    dq: Vec<f32>,
    dkv: Option<(Vec<f32>, Vec<f32>)>,
) -> candle_core::Result<Grads> {
    let cpu = Device::Cpu;
    let dq = Tensor::from_vec(dq, q.shape(), &cpu)?;
    Ok(match dkv {
        Some((dk, dv)) => (
            Some(dq),
            Some(Tensor::from_vec(dk, k.shape(), &cpu)?),
            Some(Tensor::from_vec(dv, v.shape(), &cpu)?),
        ),
        None => (Some(dq), None, None),
    })
}

fn to_candle<T>(r: Result<T>) -> candle_core::Result<T> {
    r.map_err(|e| match e {
        crate::model::ModelError::Candle(e) => e,
        e => candle_core::Error::Msg(e.to_string()),
    })
}

impl candle_core::CustomOp3 for MemEffAttention {
    fn name(&self) -> &'static str {
        "mem-eff-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if let (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) = (s1, s2, s3) {
            let dm = self.dims(l1.dims(), l2.dims(), l3.dims())?;
            #[cfg(target_arch = "x86_64")]
            if super::attention_fast::applies(&dm) {
                let (out, lse) = super::attention_fast::forward(
                    f32_slice(a, l1)?,
                    f32_slice(b, l2)?,
                    f32_slice(c, l3)?,
                    dm,
                    self.scale as f32,
                );
                *self.lse.lock().map_err(|_| poisoned())? = lse;
                return Ok((CpuStorage::F32(out), Shape::from((dm.n, dm.lq, dm.dv))));
            }
            let out = fused::forward(
                f32_slice(a, l1)?,
                f32_slice(b, l2)?,
                f32_slice(c, l3)?,
                dm,
                self.scale as f32,
            );
            return Ok((CpuStorage::F32(out), Shape::from((dm.n, dm.lq, dm.dv))));
        }
        let (q, k, v) = (
            cpu_tensor(s1, l1)?,
            cpu_tensor(s2, l2)?,
            cpu_tensor(s3, l3)?,
        );
        cpu_storage(&to_candle(self.forward(&q, &k, &v))?)
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Gradients only for inputs backprop tracks: a frozen operand's would be computed
        // and then held in the GradStore for nothing.
        let want_kv = k.track_op() || v.track_op();
        if q.dtype() == DType::F32 && q.device().is_cpu() {
            let dm = self.dims(q.dims(), k.dims(), v.dims())?;
            let g = grad_res.contiguous()?;
            let (sq, lq) = q.storage_and_layout();
            let (sk, lk) = k.storage_and_layout();
            let (sv, lv) = v.storage_and_layout();
            let (sg, lg) = g.storage_and_layout();
            #[cfg(target_arch = "x86_64")]
            if super::attention_fast::applies(&dm) {
                let res = res.contiguous()?;
                let (so, lo) = res.storage_and_layout();
                let lse = self.lse.lock().map_err(|_| poisoned())?;
                let (dq, dkv) = super::attention_fast::backward(
                    (
                        f32_of(&sq, lq)?,
                        f32_of(&sk, lk)?,
                        f32_of(&sv, lv)?,
                        f32_of(&so, lo)?,
                        f32_of(&sg, lg)?,
                    ),
                    Some(lse.as_slice()),
                    dm,
                    self.scale as f32,
                    want_kv,
                );
                return grads((q, k, v), dq, dkv);
            }
            let (dq, dkv) = fused::backward(
                (
                    f32_of(&sq, lq)?,
                    f32_of(&sk, lk)?,
                    f32_of(&sv, lv)?,
                    f32_of(&sg, lg)?,
                ),
                dm,
                self.scale as f32,
                want_kv,
            );
            return grads((q, k, v), dq, dkv);
        }
        let (q, k, v, o) = (q.detach(), k.detach(), v.detach(), res.detach());
        let (dq, dkv) = to_candle(self.backward(&q, &k, &v, &o, &grad_res.detach(), want_kv))?;
        let (dk, dv) = match dkv {
            Some((dk, dv)) => (Some(dk), Some(dv)),
            None => (None, None),
        };
        Ok((Some(dq), dk, dv))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let dev = Device::Cpu;
        let n: usize = shape.iter().product();
        let mut s = seed.wrapping_add(0x9E3779B97F4A7C15);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    }

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        d / b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Several query and key tiles (uneven last tiles) against the naive version: output and
    /// gradients of q, k, v.
    #[test]
    fn tiled_matches_naive_forward_and_backward() {
        let op = || MemEffAttention::new(0.3, 7, 5);
        let (n, lq, lk, d) = (3, 19, 23, 8);
        let q = Var::from_tensor(&randn(&[n, lq, d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[n, lk, d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[n, lk, 6], 3)).unwrap();
        let r = randn(&[n, lq, 6], 4);
        let ours = q
            .as_tensor()
            .apply_op3(k.as_tensor(), v.as_tensor(), op())
            .unwrap();
        let naive = attention_naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3).unwrap();
        assert!(max_rel(&ours, &naive) < 1e-5);
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (naive * &r).unwrap().sum_all().unwrap().backward().unwrap();
        for x in [&q, &k, &v] {
            let e = max_rel(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "gradient rel err {e}");
        }
        let e = max_rel(
            &attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3).unwrap(),
            &attention_chunked(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3).unwrap(),
        );
        assert!(e < 1e-5);
    }

    /// The AVX2 kernels (head dims multiples of 8, 5- and 4-vector column chunks, uneven
    /// query blocks and key panels) against the naive version, with trainable and frozen
    /// keys / values; on a CPU without AVX2 this checks the portable path instead.
    #[test]
    fn fast_kernels_match_naive() {
        for (lq, lk, d, dv, bq) in [
            (37, 45, 40, 24, 7),
            (20, 77, 64, 16, 64),
            (9, 16, 8, 80, 4),
            (11, 600, 16, 8, 6),
        ] {
            let op = || MemEffAttention::new(0.2, bq, 5);
            #[cfg(target_arch = "x86_64")]
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                let dm = op().dims(&[2, lq, d], &[2, lk, d], &[2, lk, dv]).unwrap();
                assert!(super::super::attention_fast::applies(&dm));
            }
            let q = Var::from_tensor(&randn(&[2, lq, d], 1)).unwrap();
            let k = Var::from_tensor(&randn(&[2, lk, d], 2)).unwrap();
            let v = Var::from_tensor(&randn(&[2, lk, dv], 3)).unwrap();
            let r = randn(&[2, lq, dv], 4);
            let ours = q
                .as_tensor()
                .apply_op3(k.as_tensor(), v.as_tensor(), op())
                .unwrap();
            let naive = attention_naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.2).unwrap();
            assert!(max_rel(&ours, &naive) < 1e-5, "{lq} {lk} {d} {dv}");
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (naive * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for x in [&q, &k, &v] {
                let e = max_rel(
                    g1.get(x.as_tensor()).unwrap(),
                    g2.get(x.as_tensor()).unwrap(),
                );
                assert!(e < 1e-5, "gradient rel err {e} ({lq} {lk} {d} {dv})");
            }
            let (kf, vf) = (k.as_tensor().detach(), v.as_tensor().detach());
            let ours = q.as_tensor().apply_op3(&kf, &vf, op()).unwrap();
            let naive = attention_naive(q.as_tensor(), &kf, &vf, 0.2).unwrap();
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (naive * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let e = max_rel(
                g1.get(q.as_tensor()).unwrap(),
                g2.get(q.as_tensor()).unwrap(),
            );
            assert!(e < 1e-5, "frozen k/v: query gradient rel err {e}");
            assert!(g1.get(&kf).is_none() && g1.get(&vf).is_none());
        }
    }

    /// Frozen keys and values (cross-attention over a frozen text encoder): the query
    /// gradient is unchanged and no k / v gradient is computed or stored.
    #[test]
    fn frozen_keys_and_values_get_no_gradient() {
        let op = || MemEffAttention::new(0.3, 7, 5);
        let q = Var::from_tensor(&randn(&[2, 11, 8], 1)).unwrap();
        let (k, v) = (randn(&[2, 9, 8], 2), randn(&[2, 9, 6], 3));
        let r = randn(&[2, 11, 6], 4);
        let ours = q.as_tensor().apply_op3(&k, &v, op()).unwrap();
        let naive = attention_naive(q.as_tensor(), &k, &v, 0.3).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (naive * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let e = max_rel(
            g1.get(q.as_tensor()).unwrap(),
            g2.get(q.as_tensor()).unwrap(),
        );
        assert!(e < 1e-5, "gradient rel err {e}");
        assert!(g1.get(&k).is_none() && g1.get(&v).is_none());
    }
}
