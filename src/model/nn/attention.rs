//! Memory-efficient attention: the N x Lq x Lk score matrix is never held, with its own
//! backward that recomputes scores (FlashAttention-style).
//!
//! Inputs are [N, L, D] with N = batch x heads. f32 on the CPU runs as a candle CustomOp:
//! head dims that are multiples of 8 on AVX2 through `attention_fast` (own register tiles,
//! 16 lanes wide through `attention_avx512` where the CPU has AVX-512F, softmax in the tile
//! epilogues, the forward's log-sum-exp kept for the backward), other
//! shapes through the fused kernels of `attention_cpu` (one block of query rows x all keys
//! at a time, GEMM + one-pass softmax). Every other device and dtype (CUDA above all) runs
//! `attention_generic`: query x key tiles in tensor ops with an online softmax, the
//! log-sum-exp saved, and the tiles recomputed in the backward.

use super::attention_cpu as fused;
pub use super::attention_generic::attention_recompute;
use super::attention_generic::query_rows_for;
use crate::model::Result;
use crate::model::nn::softmax_last_dim;
use candle_core::{CpuStorage, DType, Device, Layout, Shape, Storage, Tensor};

/// Tile sizes on the CPU: queries and keys per tile.
const BQ: usize = 64;
const BK: usize = 1024;

/// Plain attention `softmax(q k^T * scale) v` (materialises N x Lq x Lk): the reference.
pub fn attention_naive(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let s = (q.matmul(&k.t()?)? * scale)?;
    Ok(softmax_last_dim(&s)?.matmul(v)?)
}

/// Memory-efficient attention with a backward for q, k and v.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    if q.device().is_cpu() {
        return attention_tiled(q, k, v, scale, BQ, BK);
    }
    // A GPU: few, large tiles (each one a handful of kernel launches); all keys at once.
    let (n, lk) = (q.dim(0)?, k.dim(1)?);
    attention_tiled(q, k, v, scale, query_rows_for(n, lk), lk)
}

/// [`attention`] with explicit tile sizes (queries `bq`, keys `bk` per tile; the f32 CPU
/// kernels choose their own key blocks).
pub fn attention_tiled(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bq: usize,
    bk: usize,
) -> Result<Tensor> {
    let f32s = [q, k, v].iter().all(|t| t.dtype() == DType::F32);
    if !(q.device().is_cpu() && f32s) {
        return Ok(attention_recompute(q, k, v, scale, bq, bk)?);
    }
    let op = MemEffAttention::new(scale, bq);
    Ok(q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)?)
}

/// f32 attention on the CPU through the fused kernels.
struct MemEffAttention {
    scale: f64,
    bq: usize,
    /// The forward's row log-sum-exp [N, Lq] where the register-tile kernels ran it (their
    /// backward then recomputes probabilities in one pass).
    lse: std::sync::Mutex<Vec<f32>>,
    /// The register tiles those kernels use: the widest the CPU has.
    #[cfg(target_arch = "x86_64")]
    isa: super::attention_fast::Isa,
}

impl MemEffAttention {
    fn new(scale: f64, bq: usize) -> Self {
        Self {
            scale,
            bq: bq.max(1),
            lse: std::sync::Mutex::new(Vec::new()),
            #[cfg(target_arch = "x86_64")]
            isa: super::attention_fast::Isa::best(),
        }
    }

    /// The same op on narrower register tiles (tests cover each width the CPU has).
    #[cfg(all(test, target_arch = "x86_64"))]
    fn with_isa(self, isa: super::attention_fast::Isa) -> Self {
        Self { isa, ..self }
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
                    self.isa,
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
        Err(candle_core::Error::Msg(
            "attention: the fused CPU kernels take f32 only".into(),
        ))
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
                self.isa,
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
        grads((q, k, v), dq, dkv)
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

    /// The fused kernels with several query blocks (uneven last block) against the naive
    /// version: output and gradients of q, k, v; and the tensor-op tiles agree with them.
    #[test]
    fn tiled_matches_naive_forward_and_backward() {
        let op = || MemEffAttention::new(0.3, 7);
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
            &attention_recompute(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3, 4, 6).unwrap(),
        );
        assert!(e < 1e-5);
    }

    /// The register-tile kernels (head dims multiples of 8, 4- and 5-vector column chunks
    /// with and without a half vector at the end, uneven query blocks and key panels)
    /// against the naive version, with trainable and frozen keys / values, on the widest
    /// tiles this CPU has; on a CPU without AVX2 this checks the portable path instead.
    #[test]
    fn fast_kernels_match_naive() {
        check_fast_kernels(&MemEffAttention::new);
    }

    /// The same on the 8-lane AVX2 tiles, where the CPU also has wider ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_tiles_match_naive() {
        use super::super::attention_fast::Isa;
        if Isa::best() != Isa::Avx2 && Isa::Avx2.available() {
            check_fast_kernels(&|s, bq| MemEffAttention::new(s, bq).with_isa(Isa::Avx2));
        }
    }

    fn check_fast_kernels(make: &dyn Fn(f64, usize) -> MemEffAttention) {
        for (lq, lk, d, dv, bq) in [
            (37, 45, 40, 24, 7),
            (20, 77, 64, 16, 64),
            (9, 16, 8, 80, 4),
            (11, 600, 16, 8, 6),
            (13, 50, 120, 160, 9),
            (70, 33, 96, 40, 64),
        ] {
            let op = || make(0.2, bq);
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
        let op = || MemEffAttention::new(0.3, 7);
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

    /// The tensor-op tiles with recompute (the CUDA path, forced here on the CPU): one tile,
    /// uneven query and key tiles and one-row tiles against naive attention, output and
    /// q / k / v gradients; frozen k / v get none; untracked inputs record no op.
    #[test]
    fn recompute_tiles_match_naive() {
        let (n, lq, lk, d, dv) = (3, 19, 23, 8, 6);
        let q = Var::from_tensor(&randn(&[n, lq, d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[n, lk, d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[n, lk, dv], 3)).unwrap();
        let r = randn(&[n, lq, dv], 4);
        let naive = attention_naive(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3).unwrap();
        let g2 = (&naive * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (bq, bk) in [(64, 64), (7, 5), (1, 1), (19, 4)] {
            let ours =
                attention_recompute(q.as_tensor(), k.as_tensor(), v.as_tensor(), 0.3, bq, bk)
                    .unwrap();
            assert!(max_rel(&ours, &naive) < 1e-5, "tiles {bq}x{bk}: output");
            let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                let e = max_rel(
                    g1.get(x.as_tensor()).unwrap(),
                    g2.get(x.as_tensor()).unwrap(),
                );
                assert!(e < 1e-5, "tiles {bq}x{bk}: {name} rel err {e}");
            }
        }
        let (kf, vf) = (k.as_tensor().detach(), v.as_tensor().detach());
        let ours = attention_recompute(q.as_tensor(), &kf, &vf, 0.3, 7, 5).unwrap();
        let g1 = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g1.get(&kf).is_none() && g1.get(&vf).is_none());
        let e = max_rel(
            g1.get(q.as_tensor()).unwrap(),
            g2.get(q.as_tensor()).unwrap(),
        );
        assert!(e < 1e-5, "frozen k / v: dq rel err {e}");
        let qf = q.as_tensor().detach();
        let out = attention_recompute(&qf, &kf, &vf, 0.3, 7, 5).unwrap();
        assert!(!out.track_op());
    }

    /// Half-precision inputs (as CUDA training in f16 runs them): f32 softmax statistics
    /// keep the output and gradients within f16 rounding of the f32 result; a softmax in
    /// f16 would lose the small probabilities of 600 keys.
    #[test]
    fn recompute_tiles_in_f16() {
        let (n, lq, lk, d) = (2, 33, 600, 16);
        let (q, k, v) = (
            randn(&[n, lq, d], 5),
            randn(&[n, lk, d], 6),
            randn(&[n, lk, d], 7),
        );
        let r = randn(&[n, lq, d], 8);
        let naive = attention_naive(&q, &k, &v, 0.25).unwrap();
        let half = |t: &Tensor| Var::from_tensor(&t.to_dtype(DType::F16).unwrap()).unwrap();
        let (qh, kh, vh) = (half(&q), half(&k), half(&v));
        let out = attention_recompute(
            qh.as_tensor(),
            kh.as_tensor(),
            vh.as_tensor(),
            0.25,
            16,
            128,
        )
        .unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let e = max_rel(&out.to_dtype(DType::F32).unwrap(), &naive);
        assert!(e < 5e-3, "f16 output rel err {e}");
        let g1 = (out * r.to_dtype(DType::F16).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (qv, kv, vv) = (
            Var::from_tensor(&q).unwrap(),
            Var::from_tensor(&k).unwrap(),
            Var::from_tensor(&v).unwrap(),
        );
        let reference =
            attention_naive(qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), 0.25).unwrap();
        let g2 = (reference * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (h, f, name) in [(&qh, &qv, "dq"), (&kh, &kv, "dk"), (&vh, &vv, "dv")] {
            let gh = g1.get(h.as_tensor()).unwrap();
            assert_eq!(gh.dtype(), DType::F16);
            let e = max_rel(
                &gh.to_dtype(DType::F32).unwrap(),
                g2.get(f.as_tensor()).unwrap(),
            );
            assert!(e < 1e-2, "f16 {name} rel err {e}");
        }
    }
}
