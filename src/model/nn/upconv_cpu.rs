//! Nearest 2x upsampling followed by a 3x3 convolution with padding 1 (diffusers'
//! `Upsample2D`, in the UNet's up blocks and the VAE decoder), computed from the
//! low-resolution input without building the upsampled image.
//!
//! Output row `2y + py` of the upsampled convolution reads upsampled rows `2y + py - 1 ..=
//! 2y + py + 1`, which are only two distinct input rows: for `py = 0` row `y - 1` (kernel
//! row 0) and row `y` (kernel rows 1 and 2); for `py = 1` row `y` (rows 0 and 1) and row
//! `y + 1` (row 2). The same holds for columns, and the zero padding of the upsampled image
//! is the zero padding of the input. So each of the four output phases `(py, px)` is a 2x2
//! convolution of the input padded by 1 with a kernel whose taps are sums of the 3x3 taps:
//! 4 taps per output pixel instead of 9, the same result up to the rounding of those sums.
//! The phases run as `conv_cpu`'s tap GEMMs (or one im2col GEMM for small images) over the
//! shared padded input, and each phase's wide output is scattered into its rows and
//! columns of the result. The input gradient is the adjoint: each phase's output gradient,
//! padded by 1, convolved with the transposed phase kernel at the mirrored offsets, summed
//! over the phases, again without building the upsampled-size gradient of the input.

use super::conv_cpu::{
    Geom, Mat, StorageConv, conv_storage, matmul, pad_input, small, unwide, with_slice,
};
use candle_core::{DType, Device, Tensor, WithDType};
use rayon::prelude::*;

/// Kernel rows (or columns) summed into tap `a` of phase `p`: `SUMMED[p][a]`.
const SUMMED: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];

/// The four phase kernels of a `[cout, cin, 3, 3]` kernel: `[phase][cout][cin][tap]` with
/// `phase = 2 * py + px` and `tap = 2 * a + b`.
fn phase_kernels<T: WithDType>(w: &[T], cout: usize, cin: usize) -> Vec<T> {
    let per = cout * cin * 4;
    let mut out = vec![T::from_f64(0.0); 4 * per];
    out.par_chunks_mut(cin * 4)
        .enumerate()
        .for_each(|(po, dst)| {
            let (p, o) = (po / cout, po % cout);
            let (py, px) = (p / 2, p % 2);
            for i in 0..cin {
                let k = &w[(o * cin + i) * 9..][..9];
                for (t, d) in dst[i * 4..][..4].iter_mut().enumerate() {
                    let (a, b) = (t / 2, t % 2);
                    let mut s = T::from_f64(0.0);
                    for &ty in SUMMED[py][a] {
                        for &tx in SUMMED[px][b] {
                            s += k[ty * 3 + tx];
                        }
                    }
                    *d = s;
                }
            }
        });
    out
}

/// `wide [m, n] (+)= sum_t K_t [m, kd] @ window_t [kd, n]` for the four taps of a phase:
/// `kern` is `[m][kd][4]`, `src` holds `kd` padded rows of `g.row()` elements and tap `t`
/// reads each row from `offs[t]` on. Small images take one GEMM over the four windows
/// stacked (im2col), so the kernel is read once.
fn phase_gemm<T: WithDType>(
    wide: &mut [T],
    (m, kd): (usize, usize),
    kern: &[T],
    src: &[T],
    g: Geom,
    offs: [usize; 4],
    accumulate: bool,
) {
    let (n, row) = (g.n(), g.row());
    if small(g) {
        let mut cols = vec![T::from_f64(0.0); kd * 4 * n];
        cols.par_chunks_mut(4 * n).enumerate().for_each(|(k, dst)| {
            for (t, &off) in offs.iter().enumerate() {
                dst[t * n..][..n].copy_from_slice(&src[k * row + off..][..n]);
            }
        });
        matmul(
            (m, n, kd * 4),
            wide,
            (n as isize, 1),
            accumulate,
            Mat::new(kern, (kd * 4) as isize, 1),
            Mat::new(&cols, n as isize, 1),
        );
        return;
    }
    for (t, &off) in offs.iter().enumerate() {
        matmul(
            (m, n, kd),
            wide,
            (n as isize, 1),
            accumulate || t > 0,
            Mat::new(&kern[t..], (kd * 4) as isize, 4),
            Mat::new(&src[off..], row as isize, 1),
        );
    }
}

/// The geometry shared by the phases: the low-resolution input padded by 1, windows at
/// offsets 0..=2 (a 3x3 kernel's), `h x w` outputs per phase.
fn geom(b: usize, h: usize, w: usize) -> Geom {
    Geom {
        b,
        h,
        w,
        pad: 1,
        k: 3,
    }
}

/// `conv2d(upsample_nearest_2x(x), w, pad 1) + bias` for `x [b, cin, h, w]` (contiguous)
/// and a `[cout, cin, 3, 3]` kernel: `[b, cout, 2h, 2w]`.
fn forward<T: WithDType>(
    x: &[T],
    (b, cin, h, w): (usize, usize, usize, usize),
    kernel: &[T],
    cout: usize,
    bias: Option<&[T]>,
) -> Vec<T> {
    let g = geom(b, h, w);
    let (n, wp, img) = (g.n(), g.wp(), g.img());
    let xp = pad_input(x, cin, g);
    let pk = phase_kernels(kernel, cout, cin);
    let mut out = vec![T::from_f64(0.0); b * cout * 4 * h * w];
    let mut wide = vec![T::from_f64(0.0); cout * n];
    for p in 0..4 {
        let (py, px) = (p / 2, p % 2);
        let offs = [0, 1, 2, 3].map(|t| (py + t / 2) * wp + px + t % 2);
        let kern = &pk[p * cout * cin * 4..][..cout * cin * 4];
        phase_gemm(&mut wide, (cout, cin), kern, &xp, g, offs, false);
        out.par_chunks_mut(4 * h * w)
            .enumerate()
            .for_each(|(bo, dst)| {
                let (bi, o) = (bo / cout, bo % cout);
                let src = &wide[o * n + bi * img..];
                let add = bias.map_or(T::from_f64(0.0), |bv| bv[o]);
                for y in 0..h {
                    let d = &mut dst[(2 * y + py) * 2 * w..][..2 * w];
                    let s = &src[y * wp..][..w];
                    for (x, &v) in s.iter().enumerate() {
                        d[2 * x + px] = v + add;
                    }
                }
            });
    }
    out
}

/// Phase `(py, px)` of `dy [b, c, 2h, 2w]` padded by 1 into `c` rows of `g.row()`.
fn pad_phase<T: WithDType>(dy: &[T], c: usize, g: Geom, (py, px): (usize, usize)) -> Vec<T> {
    let (h, w, wp, img) = (g.h, g.w, g.wp(), g.img());
    let mut out = vec![T::from_f64(0.0); c * g.row()];
    out.par_chunks_mut(g.row())
        .enumerate()
        .for_each(|(ci, dst)| {
            for bi in 0..g.b {
                let src = &dy[(bi * c + ci) * 4 * h * w..][..4 * h * w];
                let dst = &mut dst[bi * img..];
                for y in 0..h {
                    let s = &src[(2 * y + py) * 2 * w..][..2 * w];
                    let d = &mut dst[(y + 1) * wp + 1..][..w];
                    for (x, v) in d.iter_mut().enumerate() {
                        *v = s[2 * x + px];
                    }
                }
            }
        });
    out
}

/// Input gradient `[b, cin, h, w]` of [`forward`] from `dy [b, cout, 2h, 2w]`: per phase,
/// the transposed phase kernel over the padded phase gradient; tap `(a, b)` of phase
/// `(py, px)` reads it at offset `(2 - py - a, 2 - px - b)`.
fn input_grad<T: WithDType>(
    dy: &[T],
    (b, cout, h, w): (usize, usize, usize, usize),
    kernel: &[T],
    cin: usize,
) -> Vec<T> {
    let g = geom(b, h, w);
    let (n, wp) = (g.n(), g.wp());
    let pk = phase_kernels(kernel, cout, cin);
    let mut wide = vec![T::from_f64(0.0); cin * n];
    let mut kt = vec![T::from_f64(0.0); cin * cout * 4];
    for p in 0..4 {
        let (py, px) = (p / 2, p % 2);
        let kp = &pk[p * cout * cin * 4..][..cout * cin * 4];
        kt.par_chunks_mut(cout * 4)
            .enumerate()
            .for_each(|(i, dst)| {
                for o in 0..cout {
                    dst[o * 4..][..4].copy_from_slice(&kp[(o * cin + i) * 4..][..4]);
                }
            });
        let offs = [0, 1, 2, 3].map(|t| (2 - py - t / 2) * wp + 2 - px - t % 2);
        let src = pad_phase(dy, cout, g, (py, px));
        phase_gemm(&mut wide, (cin, cout), &kt, &src, g, offs, p > 0);
    }
    unwide(&wide, cin, g, None)
}

/// Whether [`upsample2x_conv3x3`] runs the phase kernels: CPU, f32/f64, a `[_, cin, 3, 3]`
/// kernel of the input's dtype, no empty dimension.
pub(crate) fn applies(x: &Tensor, w: &Tensor) -> bool {
    let (Ok((b, c, h, wd)), Ok((o, i, k, k1))) = (x.dims4(), w.dims4()) else {
        return false;
    };
    matches!(x.device(), Device::Cpu)
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.dtype() == w.dtype()
        && (k, k1, i) == (3, 3, c)
        && b * c * h * wd * o > 0
}

/// [`forward`] as a [`StorageConv`] for a custom op's forward.
struct Upsample2x;

impl StorageConv for Upsample2x {
    fn out_hw(&self, h: usize, w: usize, _k: usize) -> (usize, usize) {
        (2 * h, 2 * w)
    }

    fn run<T: WithDType>(
        &self,
        xs: &[T],
        dims: (usize, usize, usize, usize),
        ws: &[T],
        (o, _k): (usize, usize),
        bias: Option<&[T]>,
    ) -> Vec<T> {
        forward(xs, dims, ws, o, bias)
    }
}

/// The input gradient of `conv2d(upsample_nearest_2x(x), w, pad 1)` from the output
/// gradient `dy [b, cout, 2h, 2w]`: `[b, cin, h, w]`.
fn upsample2x_conv3x3_input_grad(dy: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let (b, cout, h2, w2) = dy.dims4()?;
    let (o, cin, _, _) = w.dims4()?;
    if o != cout || h2 % 2 != 0 || w2 % 2 != 0 || dy.dtype() != w.dtype() {
        candle_core::bail!(
            "upsample conv: output gradient {:?} does not fit the kernel {:?}",
            dy.dims(),
            w.dims()
        )
    }
    fn go<T: WithDType>(
        dy: &Tensor,
        w: &Tensor,
        dims: (usize, usize, usize, usize),
        cin: usize,
    ) -> candle_core::Result<Tensor> {
        let dx = with_slice(dy, |ds: &[T]| {
            with_slice(w, |ws: &[T]| Ok(input_grad(ds, dims, ws, cin)))
        })?;
        Tensor::from_vec(dx, (dims.0, cin, dims.2, dims.3), &Device::Cpu)
    }
    let dims = (b, cout, h2 / 2, w2 / 2);
    match dy.dtype() {
        DType::F32 => go::<f32>(dy, w, dims, cin),
        DType::F64 => go::<f64>(dy, w, dims, cin),
        d => candle_core::bail!("upsample conv: the phase kernels take f32 or f64, not {d:?}"),
    }
}

/// `conv2d(upsample_nearest_2x(x), w, pad 1) + bias` where [`applies`] holds, with the
/// gradient for `x` only: `w` and `bias` are frozen (their gradients are not computed).
pub(crate) fn upsample2x_conv3x3(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Tensor> {
    let (wf, bf, w) = (w.clone(), bias.cloned(), w.clone());
    super::grad::input_grad_only_cpu(
        x,
        move |s, l| conv_storage(s, l, &wf, bf.as_ref(), &Upsample2x),
        move |g| upsample2x_conv3x3_input_grad(g, &w),
    )
}

#[cfg(test)]
mod tests {
    use super::super::conv_cpu::tests::{max_err, randn};
    use super::*;
    use candle_core::Var;

    /// (batch, cin, cout, h, w): odd and mixed sizes, a single pixel, one row, batch 3;
    /// the last two are above `SMALL_HW` pixels (tap GEMMs, the others take im2col).
    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        (1, 3, 5, 4, 4),
        (2, 4, 3, 5, 7),
        (3, 2, 2, 3, 1),
        (1, 3, 4, 1, 1),
        (2, 5, 6, 1, 6),
        (1, 3, 4, 33, 34),
        (2, 2, 3, 35, 33),
    ];

    /// The reference: candle's nearest 2x upsampling and convolution.
    fn reference(x: &Tensor, w: &Tensor, bias: &Tensor) -> Tensor {
        let (_, _, h, wd) = x.dims4().unwrap();
        let y = x.upsample_nearest2d(2 * h, 2 * wd).unwrap();
        let y = y.conv2d(w, 1, 1, 1, 1).unwrap();
        y.broadcast_add(&bias.reshape((1, (), 1, 1)).unwrap())
            .unwrap()
    }

    /// Values and input gradient equal upsample-then-convolve and its candle backward:
    /// to rounding in f64, within f32 rounding in f32, on both GEMM paths.
    #[test]
    fn matches_upsample_then_conv_forward_and_input_gradient() {
        for (i, &(b, cin, cout, h, w)) in CASES.iter().enumerate() {
            let seed = 3 * i as u64;
            let x = randn(&[b, cin, h, w], seed + 1);
            let wt = randn(&[cout, cin, 3, 3], seed + 2);
            let bias = randn(&[cout], seed + 3);
            assert!(applies(&x, &wt));
            let xv = Var::from_tensor(&x).unwrap();
            let want = reference(xv.as_tensor(), &wt, &bias);
            let got = upsample2x_conv3x3(xv.as_tensor(), &wt, Some(&bias)).unwrap();
            let (e, m) = max_err(&got, &want);
            assert!(e <= 1e-12 * m.max(1.0), "case {i} f64: {e} of {m}");

            let r = randn(want.dims(), 100 + i as u64);
            let g_want = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g_got = (&got * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let (dx_want, dx_got) = (
                g_want.get(xv.as_tensor()).unwrap(),
                g_got.get(xv.as_tensor()).unwrap(),
            );
            let (e, m) = max_err(dx_got, dx_want);
            assert!(e <= 1e-12 * m.max(1.0), "case {i} dx: {e} of {m}");

            let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
            let got32 = upsample2x_conv3x3(&f32s(&x), &f32s(&wt), Some(&f32s(&bias))).unwrap();
            assert_eq!(got32.dtype(), DType::F32);
            let (e, m) = max_err(&got32, &want);
            assert!(e <= 1e-5 * m.max(1.0), "case {i} f32: {e} of {m}");
            let dx32 = upsample2x_conv3x3_input_grad(&f32s(&r), &f32s(&wt)).unwrap();
            let (e, m) = max_err(&dx32, dx_want);
            assert!(e <= 1e-5 * m.max(1.0), "case {i} f32 dx: {e} of {m}");
        }
    }

    /// A non-contiguous input gives the same result; shapes the kernels do not take are
    /// refused by `applies` or are errors, never a wrong answer.
    #[test]
    fn strided_input_and_mismatched_shapes() {
        let x = randn(&[2, 3, 5, 6], 1);
        let wt = randn(&[4, 3, 3, 3], 2);
        let t = x.transpose(2, 3).unwrap();
        let got = upsample2x_conv3x3(&t, &wt, None).unwrap();
        let want = t
            .upsample_nearest2d(12, 10)
            .unwrap()
            .conv2d(&wt, 1, 1, 1, 1)
            .unwrap();
        let (e, m) = max_err(&got, &want);
        assert!(e <= 1e-12 * m.max(1.0), "{e} of {m}");

        assert!(!applies(&x, &randn(&[4, 2, 3, 3], 3)));
        assert!(!applies(&x, &randn(&[4, 3, 1, 1], 3)));
        assert!(!applies(&x, &wt.to_dtype(DType::F32).unwrap()));
        assert!(!applies(
            &x.to_dtype(DType::BF16).unwrap(),
            &wt.to_dtype(DType::BF16).unwrap()
        ));
        assert!(upsample2x_conv3x3(&x, &randn(&[4, 2, 3, 3], 3), None).is_err());
        let odd = randn(&[2, 4, 5, 6], 4);
        assert!(upsample2x_conv3x3_input_grad(&odd, &wt).is_err());
    }
}
