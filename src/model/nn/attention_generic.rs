//! Tiled attention from candle tensor ops, for any device and dtype: the path on CUDA (and
//! on the CPU for dtypes other than f32, whose fused kernels are f32 only).
//!
//! The forward runs blocks of queries against blocks of keys with an online softmax,
//! outside the autograd graph, and keeps only the output and each query row's log-sum-exp.
//! One custom op on `(q, k, v)` carries them into the graph. Its backward recomputes each
//! tile's probabilities as `exp(scale q k^T - lse)` and builds the gradients tile by tile
//! (FlashAttention's backward written with tensor ops), so no score matrix outlives its
//! tile in either pass: memory grows with one tile, not with queries x keys. Softmax
//! statistics, probabilities and gradient sums are f32 whatever the input dtype (f16 /
//! bf16 only feed the matrix products).

use super::grad::Handover;
use candle_core::{CpuStorage, D, DType, Layout, Result, Shape, Tensor};

/// `softmax(q k^T * scale) v` for q [N, Lq, D], k [N, Lk, D], v [N, Lk, Dv], in tiles of
/// `bq` queries x `bk` keys, with the recomputing backward for every tracked input.
pub fn attention_recompute(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bq: usize,
    bk: usize,
) -> Result<Tensor> {
    let ((n, _, d), (n2, lk, d2), (n3, lk2, _)) = (q.dims3()?, k.dims3()?, v.dims3()?);
    if n != n2 || n != n3 || d != d2 || lk != lk2 {
        candle_core::bail!(
            "attention: incompatible shapes q {:?}, k {:?}, v {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    let tiles = Tiles {
        scale,
        bq: bq.max(1),
        bk: bk.max(1),
    };
    let (out, lse) = tiles.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        Recompute {
            tiles,
            out: Handover::new(out),
            lse,
        },
    )
}

/// Query rows per tile on a GPU so that one tile's f32 scores (`n` batch-heads x rows x
/// `lk` keys) take about 128 MiB; all keys in one tile there.
pub fn query_rows_for(n: usize, lk: usize) -> usize {
    const TILE_BYTES: usize = 128 << 20;
    (TILE_BYTES / (4 * n.max(1) * lk.max(1))).max(16)
}

fn blocks(len: usize, b: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len).step_by(b).map(move |s| (s, b.min(len - s)))
}

#[derive(Clone, Copy)]
struct Tiles {
    scale: f64,
    bq: usize,
    bk: usize,
}

/// `a + b`, or `b` for the first term.
fn add(slot: &mut Option<Tensor>, t: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => t,
        Some(s) => (s + t)?,
    });
    Ok(())
}

impl Tiles {
    /// f32 scores `scale q k^T` of one tile.
    fn scores(&self, qi: &Tensor, kj: &Tensor) -> Result<Tensor> {
        qi.matmul(&kj.t()?)?.to_dtype(DType::F32)? * self.scale
    }

    /// Output [N, Lq, Dv] (input dtype) and row log-sum-exp [N, Lq, 1] (f32).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for (s, len) in blocks(q.dim(1)?, self.bq) {
            let (o, l) = self.forward_block(&q.narrow(1, s, len)?, k, v)?;
            outs.push(o);
            lses.push(l);
        }
        Ok((Tensor::cat(&outs, 1)?, Tensor::cat(&lses, 1)?))
    }

    /// One block of query rows against all keys, key block by key block (online softmax:
    /// running max `m`, running sum `l`, unnormalised output `acc`).
    fn forward_block(&self, qi: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let dt = v.dtype();
        let mut state: Option<(Tensor, Tensor, Tensor)> = None;
        for (s, len) in blocks(k.dim(1)?, self.bk) {
            let (kj, vj) = (k.narrow(1, s, len)?, v.narrow(1, s, len)?);
            let sc = self.scores(qi, &kj)?;
            let block_max = sc.max_keepdim(D::Minus1)?;
            let m_new = match &state {
                Some((m, _, _)) => m.maximum(&block_max)?,
                None => block_max,
            };
            let p = sc.broadcast_sub(&m_new)?.exp()?;
            let (ps, pv) = (
                p.sum_keepdim(D::Minus1)?,
                p.to_dtype(dt)?.matmul(&vj)?.to_dtype(DType::F32)?,
            );
            state = Some(match state {
                None => (m_new, ps, pv),
                Some((m, l, acc)) => {
                    let corr = (m - &m_new)?.exp()?;
                    let l = ((l * &corr)? + ps)?;
                    let acc = (acc.broadcast_mul(&corr)? + pv)?;
                    (m_new, l, acc)
                }
            });
        }
        let (m, l, acc) =
            state.ok_or_else(|| candle_core::Error::Msg("attention: no keys".into()))?;
        let out = acc.broadcast_div(&l)?.to_dtype(dt)?;
        Ok((out, (m + l.log()?)?))
    }

    /// Gradients of q and, when `want_kv`, of k and v, from tiles recomputed with the saved
    /// log-sum-exp: `P = exp(S - lse)`, `dV += P^T dO`, `dS = P (dO V^T - rowsum(dO O))`,
    /// `dQ += scale dS K`, `dK += scale dS^T Q`.
    fn backward(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        o: &Tensor,
        d_o: &Tensor,
        lse: &Tensor,
        want_kv: bool,
    ) -> Result<(Tensor, Option<(Tensor, Tensor)>)> {
        let dt = q.dtype();
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        let delta = (f32(d_o)? * f32(o)?)?.sum_keepdim(D::Minus1)?;
        let kb: Vec<(usize, usize)> = blocks(k.dim(1)?, self.bk).collect();
        let (mut dk, mut dv) = (vec![None; kb.len()], vec![None; kb.len()]);
        let mut dq = Vec::new();
        for (s, len) in blocks(q.dim(1)?, self.bq) {
            let (qi, doi) = (q.narrow(1, s, len)?, d_o.narrow(1, s, len)?);
            let (di, li) = (delta.narrow(1, s, len)?, lse.narrow(1, s, len)?);
            let mut dqi = None;
            for (j, &(ks, kl)) in kb.iter().enumerate() {
                let (kj, vj) = (k.narrow(1, ks, kl)?, v.narrow(1, ks, kl)?);
                let p = self.scores(&qi, &kj)?.broadcast_sub(&li)?.exp()?;
                if want_kv {
                    add(&mut dv[j], f32(&p.to_dtype(dt)?.t()?.matmul(&doi)?)?)?;
                }
                let dp = f32(&doi.matmul(&vj.t()?)?)?;
                let ds = (p * dp.broadcast_sub(&di)?)?.to_dtype(dt)?;
                add(&mut dqi, (f32(&ds.matmul(&kj)?)? * self.scale)?)?;
                if want_kv {
                    add(&mut dk[j], (f32(&ds.t()?.matmul(&qi)?)? * self.scale)?)?;
                }
            }
            dq.push(dqi.ok_or_else(|| candle_core::Error::Msg("attention: no keys".into()))?);
        }
        let cat = |parts: Vec<Option<Tensor>>| -> Result<Tensor> {
            let parts: Option<Vec<Tensor>> = parts.into_iter().collect();
            let parts =
                parts.ok_or_else(|| candle_core::Error::Msg("attention: no rows".into()))?;
            Tensor::cat(&parts, 1)?.to_dtype(dt)
        };
        let dkv = if want_kv {
            Some((cat(dk)?, cat(dv)?))
        } else {
            None
        };
        Ok((Tensor::cat(&dq, 1)?.to_dtype(dt)?, dkv))
    }
}

/// The graph node: hands over the output computed outside, recomputes in the backward.
struct Recompute {
    tiles: Tiles,
    out: Handover,
    lse: Tensor,
}

impl candle_core::CustomOp3 for Recompute {
    fn name(&self) -> &'static str {
        "attention-recompute"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Only what backprop tracks: a frozen operand's gradient would be held for nothing.
        let want_kv = k.track_op() || v.track_op();
        let (dq, dkv) = self.tiles.backward(
            (&q.detach(), &k.detach(), &v.detach()),
            &res.detach(),
            &grad_res.detach(),
            &self.lse,
            want_kv,
        )?;
        let (dk, dv) = match dkv {
            Some((dk, dv)) => (k.track_op().then_some(dk), v.track_op().then_some(dv)),
            None => (None, None),
        };
        Ok((q.track_op().then_some(dq), dk, dv))
    }
}
