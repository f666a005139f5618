//! Layout changes as one recorded op each: attention heads split off and merged back, and
//! images to token sequences and back.
//!
//! Written with candle's view ops, a head split is `reshape -> transpose -> reshape`: three
//! nodes in the backward graph, each of which gets its own full-size gradient buffer
//! (candle accumulates every node's gradient into a fresh zero tensor), one of them added
//! through a strided view. [`swap_axes12`] does the same move as a single copy with a single
//! node whose backward is the inverse copy. Off the CPU it is candle's ops, unchanged.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// `x` read as a contiguous `[a, p, q, r]` block, returned with the middle two axes swapped
/// (`[a, q, p, r]`, contiguous) under the shape `out` (same element count).
pub fn swap_axes12(
    x: &Tensor,
    (a, p, q, r): (usize, usize, usize, usize),
    out: impl Into<Shape>,
) -> candle_core::Result<Tensor> {
    let out = out.into();
    if a * p * q * r != x.elem_count() || out.elem_count() != x.elem_count() {
        return Err(candle_core::Error::Msg(format!(
            "swap_axes12: {:?} is not [{a}, {p}, {q}, {r}] -> {:?}",
            x.shape(),
            out
        )));
    }
    if !x.device().is_cpu() {
        return x
            .reshape((a, p, q, r))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape(out);
    }
    x.contiguous()?.apply_op1(SwapAxes12 {
        dims: (a, p, q, r),
        out,
    })
}

/// `[B, L, H * hd]` (a projection's output) -> `[B * H, L, hd]` (attention's input).
pub fn split_heads(t: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (b, l, width) = t.dims3()?;
    let hd = width / heads.max(1);
    swap_axes12(t, (b, l, heads, hd), (b * heads, l, hd))
}

/// `[B * H, L, hd]` -> `[B, L, H * hd]`, the inverse of [`split_heads`].
pub fn merge_heads(t: &Tensor, batch: usize) -> candle_core::Result<Tensor> {
    let (bh, l, hd) = t.dims3()?;
    let heads = bh / batch.max(1);
    swap_axes12(t, (batch, heads, l, hd), (batch, l, heads * hd))
}

/// `[B, C, H, W]` -> `[B, H * W, C]` (an image as a token sequence).
pub fn to_tokens(x: &Tensor) -> candle_core::Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    swap_axes12(x, (b, c, h * w, 1), (b, h * w, c))
}

/// `[B, H * W, C]` -> `[B, C, H, W]`, the inverse of [`to_tokens`].
pub fn to_image(s: &Tensor, h: usize, w: usize) -> candle_core::Result<Tensor> {
    let (b, hw, c) = s.dims3()?;
    swap_axes12(s, (b, hw, c, 1), (b, c, h, w))
}

struct SwapAxes12 {
    dims: (usize, usize, usize, usize),
    out: Shape,
}

impl CustomOp1 for SwapAxes12 {
    fn name(&self) -> &'static str {
        "swap-axes-12"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("swap_axes12: non-contiguous input".into()))?;
        let d = self.dims;
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(swap(&v[start..end], d)),
            CpuStorage::F16(v) => CpuStorage::F16(swap(&v[start..end], d)),
            CpuStorage::BF16(v) => CpuStorage::BF16(swap(&v[start..end], d)),
            CpuStorage::F64(v) => CpuStorage::F64(swap(&v[start..end], d)),
            CpuStorage::U8(v) => CpuStorage::U8(swap(&v[start..end], d)),
            CpuStorage::U32(v) => CpuStorage::U32(swap(&v[start..end], d)),
            CpuStorage::I64(v) => CpuStorage::I64(swap(&v[start..end], d)),
            _ => {
                return Err(candle_core::Error::Msg(format!(
                    "swap_axes12: unsupported dtype {:?}",
                    s.dtype()
                )));
            }
        };
        Ok((out, self.out.clone()))
    }

    fn bwd(&self, arg: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (a, p, q, r) = self.dims;
        Ok(Some(swap_axes12(grad, (a, q, p, r), arg.shape())?))
    }
}

/// Columns of the output handled together where `r == 1` (a plain transpose): the reads of
/// one block stay within the same cache lines.
const COLS: usize = 16;

/// `src` as `[a, p, q, r]` -> `[a, q, p, r]`.
fn swap<T: Copy + Default + Send + Sync>(
    src: &[T],
    (_, p, q, r): (usize, usize, usize, usize),
) -> Vec<T> {
    let mut out = vec![T::default(); src.len()];
    if src.is_empty() {
        return out;
    }
    let plane = p * q * r;
    if r == 1 {
        // Each task: COLS output rows (input columns) of one plane.
        out.par_chunks_mut(plane)
            .zip(src.par_chunks(plane))
            .flat_map(|(o, s)| {
                o.par_chunks_mut(COLS * p)
                    .enumerate()
                    .map(move |(t, ob)| (s, t, ob))
            })
            .for_each(|(s, t, ob)| {
                let q0 = t * COLS;
                let nq = ob.len() / p;
                for pi in 0..p {
                    let row = &s[pi * q + q0..pi * q + q0 + nq];
                    for (qq, &x) in row.iter().enumerate() {
                        ob[qq * p + pi] = x;
                    }
                }
            });
        return out;
    }
    // Rows of `r` elements: output row (ai, qi, pi) is input row (ai, pi, qi).
    out.par_chunks_mut(p * r).enumerate().for_each(|(row, o)| {
        let (ai, qi) = (row / q, row % q);
        for (pi, dst) in o.chunks_exact_mut(r).enumerate() {
            let at = ((ai * p + pi) * q + qi) * r;
            dst.copy_from_slice(&src[at..at + r]);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn ramp(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .reshape(shape)
            .unwrap()
    }

    fn same(a: &Tensor, b: &Tensor) {
        assert_eq!(a.dims(), b.dims());
        let (a, b) = (
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(a, b);
    }

    /// Each helper against candle's view ops, forward and backward (a weighted sum so
    /// every element's gradient differs), including a transpose whose column count is
    /// not a multiple of the block and a strided input.
    #[test]
    fn matches_candle_views_forward_and_backward() {
        let x = Var::from_tensor(&ramp(&[2, 5, 37])).unwrap();
        let check = |ours: Tensor, theirs: Tensor| {
            same(&ours, &theirs);
            let wr = (ramp(ours.dims()) * 0.37).unwrap().sin().unwrap();
            let g1 = (ours * &wr).unwrap().sum_all().unwrap().backward().unwrap();
            let g2 = (theirs * &wr)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            same(
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
        };
        let t = x.as_tensor();
        // split_heads: [2, 5, 37] is not a head layout; use [2, 5, 36] via narrow (strided).
        let n = t.narrow(2, 0, 36).unwrap();
        check(
            split_heads(&n, 4).unwrap(),
            n.reshape((2, 5, 4, 9))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((8, 5, 9))
                .unwrap(),
        );
        let h = t.narrow(2, 0, 36).unwrap().reshape((8, 5, 9)).unwrap();
        check(
            merge_heads(&h, 2).unwrap(),
            h.reshape((2, 4, 5, 9))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((2, 5, 36))
                .unwrap(),
        );
        let img = t.reshape((2, 5, 1, 37)).unwrap();
        check(
            to_tokens(&img).unwrap(),
            img.permute((0, 2, 3, 1))
                .unwrap()
                .reshape((2, 37, 5))
                .unwrap(),
        );
        let seq = t.reshape((2, 37, 5)).unwrap();
        check(
            to_image(&seq, 1, 37).unwrap(),
            seq.reshape((2, 1, 37, 5))
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap(),
        );
    }

    /// One node per move: the head split's backward graph holds the op and its input only.
    #[test]
    fn one_node_and_no_graph_without_tracking() {
        let x = Var::from_tensor(&ramp(&[1, 3, 8])).unwrap();
        let y = split_heads(x.as_tensor(), 2).unwrap();
        assert_eq!(y.sorted_nodes().len(), 2);
        let plain = split_heads(&ramp(&[1, 3, 8]), 2).unwrap();
        assert!(!plain.track_op());
        let h = split_heads(&ramp(&[1, 3, 8]).to_dtype(DType::F16).unwrap(), 2).unwrap();
        assert_eq!(h.dtype(), DType::F16);
        same(&h.to_dtype(DType::F32).unwrap(), &plain);
        assert!(swap_axes12(&ramp(&[2, 3]), (1, 2, 2, 2), (2, 3)).is_err());
    }
}
