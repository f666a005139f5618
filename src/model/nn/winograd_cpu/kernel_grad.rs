//! The kernel gradient of a Winograd convolution (DreamBooth, LoCon: a trained 3x3 kernel).
//!
//! The forward gives each tile `Y = A^T [sum_ci U[co, ci] . V[ci]] A` with `U = G g G^T`.
//! Its adjoint in `g` is `dg[co, ci] = G^T [sum_tiles W[co] . V[ci]] G`, where
//! `W = A dY A^T` is the output gradient of the tile carried back through the output
//! transform. So the same input transform `V`, a transform of `dY` into positions, one
//! GEMM per position that sums over the tiles (`[Cout, T] @ [T, Cin]`, the long
//! dimension inside), and a 3x3 transform of each channel pair's `A x A` sums. That is
//! 36 products per tile of 16 outputs for F(4x4, 3x3) where the 9 tap GEMMs of the direct
//! kernel gradient have 144, and 16 for 4 outputs (36) for F(2x2, 3x3).

use super::super::conv_cpu::Mat;
use super::{
    Cut, F23, F43, LANES, Lanes, PLAN, Plan, Tiles, Transforms, VARIANT, applies,
    gemm_per_position, strip_to_positions, takes_f43, transform_chunk,
};
use candle_core::WithDType;
use rayon::prelude::*;
use std::sync::atomic::Ordering;

/// Kernel gradient `[Cout, Cin, 3, 3]` of the `k x k`, padding `pad`, stride 1 convolution
/// of `x [B, Cin, H, W]` given `dy [B, Cout, H, W]`, where it runs here (`None` elsewhere).
/// By default that is F(4x4, 3x3) from 32x32 pixels up, as the forward; at 16x16 the direct
/// path stays, as F(2x2, 3x3)'s sixteen `[Cout, Cin]` sums (105 MB at 1280 channels) cost
/// more than they save (`bench_unet conv` on a 2-core AVX-512 Xeon, 1280 channels at 16x16:
/// kernel gradient 0.053 s direct against 0.067 s). [`super::set_tile`] forces one variant
/// at every size.
pub(crate) fn kernel_grad3x3<T: WithDType>(
    x: &[T],
    dy: &[T],
    bhw: (usize, usize, usize),
    (cin, cout): (usize, usize),
    (k, pad): (usize, usize),
) -> Option<Vec<T>> {
    let hw = (bhw.1, bhw.2);
    if !applies(k, pad, hw, cin, cout) {
        return None;
    }
    match VARIANT.load(Ordering::Relaxed) {
        2 => Some(tiled::<T, 2, 4, F23>(x, dy, bhw, (cin, cout), PLAN)),
        _ if takes_f43(hw, cin, cout) => Some(tiled::<T, 4, 6, F43>(x, dy, bhw, (cin, cout), PLAN)),
        _ => None,
    }
}

/// Chunks of tile rows and blocks of output channels as the forward's `tiled` cuts them;
/// for each block, every chunk's GEMMs add into that block's `M [A*A, nco, Cin]`, which
/// then becomes the block's rows of the gradient. The input transform of a chunk is made
/// once when there is one chunk, else again for each block.
fn tiled<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    dy: &[T],
    (b, h, w): (usize, usize, usize),
    (cin, cout): (usize, usize),
    plan: Plan,
) -> Vec<T> {
    let Cut { t, blocks, chunks } = plan.cut::<T, M, A>((b, h, w), (cin, cout));
    let aa = A * A;
    let mut dw = vec![T::zero(); cout * cin * 9];
    let (mut v, mut wt, mut m) = (Vec::new(), Vec::new(), Vec::new());
    let mut v_holds = None;
    for (o0, o1) in blocks {
        let nco = o1 - o0;
        m.resize(aa * nco * cin, T::zero());
        for (ck, &(r0, r1)) in chunks.iter().enumerate() {
            let tc = (r1 - r0) * t.tw;
            if v_holds != Some(ck) {
                transform_chunk::<T, M, A, F>(x, cin, t, (r0, r1), &mut v);
                v_holds = Some(ck);
            }
            wt.resize(nco * aa * tc, T::zero());
            wt[..nco * aa * tc]
                .par_chunks_mut(aa * tc)
                .enumerate()
                .for_each(|(oo, wc)| {
                    grad_transform::<T, M, A, F>(dy, (cout, o0 + oo), t, (r0, r1), wc)
                });
            // M_xi [nco, Cin] (+)= W_xi [nco, T] @ V_xi^T [T, Cin].
            let operands = |xi: usize| {
                (
                    Mat::new(&wt[xi * tc..nco * aa * tc], (aa * tc) as isize, 1),
                    Mat::new(&v[xi * tc..cin * aa * tc], 1, (aa * tc) as isize),
                )
            };
            gemm_per_position(&mut m, aa, (nco, cin, tc), ck > 0, operands);
        }
        let m = &m[..aa * nco * cin];
        dw[o0 * cin * 9..o1 * cin * 9]
            .par_chunks_mut(cin * 9)
            .enumerate()
            .for_each(|(oo, dwo)| {
                let whole = cin - cin % LANES;
                for i in (0..whole).step_by(LANES) {
                    adjoint_lanes::<T, M, A, F, LANES>(m, (nco, cin), (oo, i), dwo);
                }
                for i in whole..cin {
                    adjoint_lanes::<T, M, A, F, 1>(m, (nco, cin), (oo, i), dwo);
                }
            });
    }
    dw
}

/// `W = A dY A^T` for the tiles of global tile rows `r0..r1` of output channel `co`'s
/// gradient planes, into `w [A*A, tc]` (position-major, as the input transform). Per tile
/// row, its `M` gradient rows are copied into a strip whose columns past the image stay
/// zero (outputs that do not exist have no gradient); the adjoint runs down the strip's
/// columns eight at a time, then along the rows of each tile, eight tiles at a time.
fn grad_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    dy: &[T],
    (cout, co): (usize, usize),
    t: Tiles,
    (r0, r1): (usize, usize),
    w: &mut [T],
) {
    let tc = (r1 - r0) * t.tw;
    let pw = M * t.tw.div_ceil(LANES) * LANES;
    let mut strip = vec![T::zero(); M * pw];
    let mut down = vec![T::zero(); A * pw];
    for gr in r0..r1 {
        let (b, ty) = (gr / t.th, gr % t.th);
        let plane = &dy[(b * cout + co) * t.h * t.w..][..t.h * t.w];
        for (r, row) in strip.chunks_exact_mut(pw).enumerate() {
            let y = M * ty + r;
            match y < t.h {
                true => row[..t.w].copy_from_slice(&plane[y * t.w..][..t.w]),
                false => row.fill(T::zero()),
            }
        }
        strip_to_positions::<T, M, M, A>(
            &strip,
            &mut down,
            (pw, t.tw),
            (gr - r0, tc),
            w,
            F::output_adjoint,
        );
    }
}

/// `dg = G^T M G` for output channel `oo` of the block (`m [A*A, nco, Cin]`) and input
/// channels `i..i + N` into `dwo` (that output channel's `[Cin, 3, 3]` rows of the
/// gradient): the adjoint down each column of positions, then along each row.
fn adjoint_lanes<T: WithDType, const M: usize, const A: usize, F, const N: usize>(
    m: &[T],
    (nco, cin): (usize, usize),
    (oo, i): (usize, usize),
    dwo: &mut [T],
) where
    F: Transforms<M, A>,
{
    let at = |xi: usize| Lanes::<T, N>::load(&m[(xi * nco + oo) * cin + i..]);
    let cols: [[Lanes<T, N>; 3]; A] =
        std::array::from_fn(|c| F::kernel_adjoint(std::array::from_fn(|r| at(r * A + c))));
    for r in 0..3 {
        let row = F::kernel_adjoint(std::array::from_fn(|c| cols[c][r]));
        for (c, v) in row.iter().enumerate() {
            for (l, &g) in v.0.iter().enumerate() {
                dwo[(i + l) * 9 + r * 3 + c] = g;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::super::conv_cpu::conv2d_s1_kernel_grad;
    use super::super::super::conv_cpu::tests::{max_err, randn};
    use super::super::Transforms;
    use super::super::tests::{SHAPES, SMALL};
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    fn dot<const N: usize>(a: [Lanes<f64, 1>; N], b: [Lanes<f64, 1>; N]) -> f64 {
        a.iter().zip(&b).map(|(x, y)| x.0[0] * y.0[0]).sum()
    }

    /// `<kernel(g), u> = <g, kernel_adjoint(u)>` and `<output(m), y> = <m, output_adjoint(y)>`
    /// for random vectors, so each adjoint is the transpose of its transform.
    fn adjoints_are_transposes<const M: usize, const A: usize, F: Transforms<M, A>>(seed: u64) {
        let r = randn(&[3 + A + A + M], seed).to_vec1::<f64>().unwrap();
        let lane = |k: usize| Lanes::<f64, 1>([r[k]]);
        let g: [_; 3] = std::array::from_fn(lane);
        let u: [_; A] = std::array::from_fn(|k| lane(3 + k));
        let m: [_; A] = std::array::from_fn(|k| lane(3 + A + k));
        let y: [_; M] = std::array::from_fn(|k| lane(3 + 2 * A + k));
        let (a, b) = (dot(F::kernel(g), u), dot(g, F::kernel_adjoint(u)));
        assert!(
            (a - b).abs() <= 1e-12 * a.abs().max(1.0),
            "kernel: {a} vs {b}"
        );
        let (a, b) = (dot(F::output(m), y), dot(m, F::output_adjoint(y)));
        assert!(
            (a - b).abs() <= 1e-12 * a.abs().max(1.0),
            "output: {a} vs {b}"
        );
    }

    #[test]
    fn adjoint_transforms_are_the_transposes() {
        for seed in 0..4 {
            adjoints_are_transposes::<2, 4, F23>(seed);
            adjoints_are_transposes::<4, 6, F43>(100 + seed);
        }
    }

    /// Candle's kernel gradient of its convolution, f64.
    fn candle_kernel_grad(x: &Tensor, k: &Tensor, dy: &Tensor) -> Tensor {
        let kv = Var::from_tensor(k).unwrap();
        let g = (x.conv2d(kv.as_tensor(), 1, 1, 1, 1).unwrap() * dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        g.get(kv.as_tensor()).unwrap().clone()
    }

    /// Against candle's kernel gradient in f64 (to rounding) on the forward's test shapes;
    /// in one chunk and one block, and
    /// in chunks of 5 tiles with one output channel per block (the input transform made
    /// again per block, the GEMMs adding up over chunks).
    #[test]
    fn kernel_gradient_equals_the_direct_one() {
        for (i, &(b, cin, cout, h, w)) in SHAPES.iter().enumerate() {
            let s = 10 * i as u64;
            let x = randn(&[b, cin, h, w], s + 1);
            let k = randn(&[cout, cin, 3, 3], s + 2);
            let dy = randn(&[b, cout, h, w], s + 3);
            let want = candle_kernel_grad(&x, &k, &dy);
            let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            let ds = dy.flatten_all().unwrap().to_vec1::<f64>().unwrap();
            for tile in [2, 4] {
                for (p, plan) in [PLAN, SMALL].into_iter().enumerate() {
                    let got = match tile {
                        4 => tiled::<f64, 4, 6, F43>(&xs, &ds, (b, h, w), (cin, cout), plan),
                        _ => tiled::<f64, 2, 4, F23>(&xs, &ds, (b, h, w), (cin, cout), plan),
                    };
                    let got = Tensor::from_vec(got, (cout, cin, 3, 3), &Device::Cpu).unwrap();
                    let (e, m) = max_err(&got, &want);
                    assert!(
                        e <= 1e-12 * m.max(1.0),
                        "F({tile}) plan {p} {b}x{cin}->{cout}x{h}x{w}: {e} of {m}"
                    );
                }
            }
        }
    }

    /// Through the layer's entry point in f32 where the path applies: within the variant's
    /// rounding of candle's kernel gradient (a wrong transform is off by O(1)).
    #[test]
    fn entry_point_takes_the_tiles_in_f32() {
        for (h, w, tol) in [(32, 33, 5e-5), (16, 17, 5e-6)] {
            let (cin, cout) = (32, 40);
            assert!(applies(3, 1, (h, w), cin, cout));
            let ran = |x: &[f32], dy: &[f32]| {
                kernel_grad3x3(x, dy, (2, h, w), (cin, cout), (3, 1)).is_some()
            };
            let n = 2 * h * w;
            assert_eq!(ran(&vec![0.0; n * cin], &vec![0.0; n * cout]), h == 32);
            let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let x = f(randn(&[2, cin, h, w], 17));
            let k = f(randn(&[cout, cin, 3, 3], 18));
            let dy = f(randn(&[2, cout, h, w], 19));
            let want = candle_kernel_grad(&x, &k, &dy);
            let ours = conv2d_s1_kernel_grad(&x, &dy, &k, 1).unwrap().unwrap();
            let (e, m) = max_err(&ours, &want);
            assert!(e <= tol * m, "{h}x{w} kernel gradient {e} of {m}");
        }
    }
}
