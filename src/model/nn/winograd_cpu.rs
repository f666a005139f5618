//! 3x3 stride-1 convolutions with padding 1 by Winograd's minimal filtering F(m x m, 3x3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015).
//!
//! The output is cut into m x m tiles; each reads an a x a input patch `d` (a = m + 2).
//! With the fixed transforms `V = B^T d B` (input), `U = G g G^T` (kernel) and
//! `Y = A^T M A` (output), the tile is `Y = A^T [U . V] A`, where the elementwise product
//! summed over input channels is a*a plain GEMMs, one per position of the transform:
//! `M_xi [Cout, T] = U_xi [Cout, Cin] @ V_xi [Cin, T]` over T tiles. The transforms are a
//! few additions per element; the GEMMs do the work:
//!
//! - F(4x4, 3x3), for images of 32x32 and more: 36 multiply-adds per tile of 16 outputs and channel pair,
//!   where the direct convolution has 144 (4x fewer). Its transforms hold 1/4, 1/6, 1/12,
//!   1/24, 2, 4, 5 and 8, so the result carries a little more rounding than a direct sum:
//!   1.2e-5 to 1.9e-5 of the output's largest magnitude at SD's shapes in f32 (direct
//!   GEMMs: ~1e-6), 2.2e-5 for a whole 512 px VAE decode against diffusers.
//! - F(2x2, 3x3), for 16x16 up to 32x32 (the UNet's 1280-channel level): 16 per tile of
//!   4 outputs (2.25x fewer), transforms of 0, +/-1 and 1/2 only (rounding as a direct
//!   sum). [`set_tile`] can make it (or F(4x4)) the choice for every size.
//!
//! Tiles are processed in chunks of whole tile rows, sized so the transformed input and
//! output of a chunk stay a few tens of MB however large the image (the VAE at 512 px). The
//! input gradient of such a convolution is the same convolution with the kernel transposed
//! and flipped, so it takes this path too (the kernel is read through strides).

use super::conv_cpu::{Kernel, Mat, matmul};
use candle_core::WithDType;
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};

/// Bytes of transformed input plus output per chunk of tiles (the GEMMs' operands).
const CHUNK_BYTES: usize = 24 << 20;
/// At least this many tiles per chunk (the GEMMs' column count), whatever the channels.
const MIN_TILES: usize = 256;
/// Images of at least this many output pixels (SD1.5's UNet at 64x64 and 32x32, the VAE)
/// take F(4x4, 3x3).
const F43_PIXELS: usize = 32 * 32;
/// Images of at least this many (the UNet's 16x16 level: 16 tiles of 4x4 would make the
/// GEMMs 16 columns wide, and the 36 transformed 1280 x 1280 kernels would outweigh them)
/// take F(2x2, 3x3); smaller ones (8x8) keep the direct path, where the kernel is all.
/// Measured (`bench_unet conv`, 1280 channels): at 16x16 direct 0.051 s, F(2x2) 0.036 s,
/// F(4x4) 0.064 s; at 8x8 0.019, 0.027, 0.061 s.
const F23_PIXELS: usize = 16 * 16;
/// Channel counts below this (SD's `conv_in` with 4 latent channels, `conv_out`) make
/// GEMMs too thin to gain.
const MIN_CHANNELS: usize = 32;

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turns the Winograd path off or on for this process (for A/B benchmarks; on by default).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether a 3x3, padding 1, stride 1 convolution of an `h x w` image from `cin` to `cout`
/// channels runs here.
pub(super) fn applies(
    k: usize,
    pad: usize,
    (h, w): (usize, usize),
    cin: usize,
    cout: usize,
) -> bool {
    k == 3
        && pad == 1
        && h * w >= F23_PIXELS
        && cin >= MIN_CHANNELS
        && cout >= MIN_CHANNELS
        && ENABLED.load(Ordering::Relaxed)
}

/// One Winograd variant F(M x M, 3 x 3) by its 1-D transforms (`A = M + 2` points): the
/// input `B^T d`, the kernel `G g` and the output `A^T m`. Applied along columns, then
/// rows, they give the 2-D transforms.
trait Transforms<const M: usize, const A: usize> {
    fn input<T: WithDType>(d: [T; A]) -> [T; A];
    fn kernel<T: WithDType>(g: [T; 3]) -> [T; A];
    fn output<T: WithDType>(m: [T; A]) -> [T; M];
}

/// F(2x2, 3x3): points 0, 1, -1 and infinity; 16 products per tile where the direct
/// convolution has 36.
struct F23;

impl Transforms<2, 4> for F23 {
    fn input<T: WithDType>([d0, d1, d2, d3]: [T; 4]) -> [T; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    fn kernel<T: WithDType>([g0, g1, g2]: [T; 3]) -> [T; 4] {
        let half = T::from_f64(0.5);
        [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2]
    }
    fn output<T: WithDType>([m0, m1, m2, m3]: [T; 4]) -> [T; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
}

/// F(4x4, 3x3): points 0, +/-1, +/-2 and infinity; 36 products per tile of 16 outputs
/// where the direct convolution has 144.
struct F43;

impl Transforms<4, 6> for F43 {
    fn input<T: WithDType>([d0, d1, d2, d3, d4, d5]: [T; 6]) -> [T; 6] {
        let (two, four, five) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(5.0));
        [
            four * d0 - five * d2 + d4,
            d3 + d4 - four * (d1 + d2),
            four * (d1 - d2) - d3 + d4,
            two * (d3 - d1) - d2 + d4,
            two * (d1 - d3) - d2 + d4,
            four * d1 - five * d3 + d5,
        ]
    }
    fn kernel<T: WithDType>([g0, g1, g2]: [T; 3]) -> [T; 6] {
        let f = T::from_f64;
        let (a, b) = (f(1.0 / 6.0) * (g0 + g2), f(1.0 / 6.0) * g1);
        let (c, d) = (f(1.0 / 24.0) * g0 + f(1.0 / 6.0) * g2, f(1.0 / 12.0) * g1);
        [f(0.25) * g0, T::zero() - a - b, b - a, c + d, c - d, g2]
    }
    fn output<T: WithDType>([m0, m1, m2, m3, m4, m5]: [T; 6]) -> [T; 4] {
        let (two, four, eight) = (T::from_f64(2.0), T::from_f64(4.0), T::from_f64(8.0));
        let (p12, n12, p34, n34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + p12 + p34,
            n12 + two * n34,
            p12 + four * p34,
            n12 + eight * n34 + m5,
        ]
    }
}

/// A 2-D transform: `f` along each column, then along each row.
fn both_ways<T: Copy, const R: usize, const C: usize, const S: usize>(
    x: [[T; C]; R],
    f: impl Fn([T; R]) -> [T; S],
    g: impl Fn([T; C]) -> [T; S],
) -> [[T; S]; S] {
    let cols: [[T; S]; C] = std::array::from_fn(|c| f(std::array::from_fn(|r| x[r][c])));
    std::array::from_fn(|r| g(std::array::from_fn(|c| cols[c][r])))
}

/// `U = G g G^T` for every (output, input) channel pair, laid out `[Cout, A*A, Cin]`.
fn kernel_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    kern: &Kernel<T>,
) -> Vec<T> {
    let (cout, cin) = (kern.cout, kern.cin);
    let mut u = vec![T::zero(); cout * A * A * cin];
    // Offsets of every tap of channel pair (0, 0); `Kernel::tap` bounds-checks each.
    let taps: Vec<usize> = (0..9).map(|t| kern.tap(t / 3, t % 3)).collect();
    u.par_chunks_mut(A * A * cin)
        .enumerate()
        .for_each(|(o, uo)| {
            for i in 0..cin {
                let at = o as isize * kern.so + i as isize * kern.si;
                let g: [[T; 3]; 3] = std::array::from_fn(|r| {
                    std::array::from_fn(|c| kern.data[(taps[r * 3 + c] as isize + at) as usize])
                });
                let t = both_ways(g, F::kernel, F::kernel);
                for (r, row) in t.iter().enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        uo[(r * A + c) * cin + i] = v;
                    }
                }
            }
        });
    u
}

/// Geometry of the tiling: batch, image and tile-grid sizes.
#[derive(Clone, Copy)]
struct Tiles {
    b: usize,
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    fn rows(&self) -> usize {
        self.b * self.th
    }
}

/// `V = B^T d B` for the tiles of global tile rows `r0..r1` of channel `ci`'s planes,
/// written to `v [A*A, tc]` (position-major).
fn input_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    (cin, ci): (usize, usize),
    t: Tiles,
    (r0, r1): (usize, usize),
    v: &mut [T],
) {
    let tc = (r1 - r0) * t.tw;
    let (h, w) = (t.h as isize, t.w as isize);
    for gr in r0..r1 {
        let (b, ty) = (gr / t.th, gr % t.th);
        let plane = &x[(b * cin + ci) * t.h * t.w..][..t.h * t.w];
        let y0 = (M * ty) as isize - 1;
        for tx in 0..t.tw {
            let x0 = (M * tx) as isize - 1;
            let mut d = [[T::zero(); A]; A];
            if y0 >= 0 && y0 + A as isize <= h && x0 >= 0 && x0 + A as isize <= w {
                for (r, dr) in d.iter_mut().enumerate() {
                    let at = (y0 as usize + r) * t.w + x0 as usize;
                    dr.copy_from_slice(&plane[at..at + A]);
                }
            } else {
                for (r, dr) in d.iter_mut().enumerate() {
                    let y = y0 + r as isize;
                    if y < 0 || y >= h {
                        continue;
                    }
                    for (c, e) in dr.iter_mut().enumerate() {
                        let xx = x0 + c as isize;
                        if xx >= 0 && xx < w {
                            *e = plane[y as usize * t.w + xx as usize];
                        }
                    }
                }
            }
            let col = (gr - r0) * t.tw + tx;
            let s = both_ways(d, F::input, F::input);
            for (r, row) in s.iter().enumerate() {
                for (c, &val) in row.iter().enumerate() {
                    v[(r * A + c) * tc + col] = val;
                }
            }
        }
    }
}

/// `Y = A^T M A` (+ bias) from `m [A*A, tc]` of output channel `co` into `plane` (image
/// `b`'s `[h, w]` plane of that channel), for the tiles of global tile rows `r0..r1` in
/// image `b`.
fn output_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    m: &[T],
    t: Tiles,
    (b, r0, r1): (usize, usize, usize),
    bias: T,
    plane: &mut [T],
) {
    let tc = (r1 - r0) * t.tw;
    for gr in r0.max(b * t.th)..r1.min((b + 1) * t.th) {
        let ty = gr % t.th;
        for tx in 0..t.tw {
            let col = (gr - r0) * t.tw + tx;
            let e: [[T; A]; A] =
                std::array::from_fn(|r| std::array::from_fn(|c| m[(r * A + c) * tc + col]));
            let y = both_ways(e, F::output, F::output);
            for (r, row) in y.iter().enumerate() {
                let yy = M * ty + r;
                if yy >= t.h {
                    break;
                }
                for (c, &val) in row.iter().enumerate() {
                    let xx = M * tx + c;
                    if xx < t.w {
                        plane[yy * t.w + xx] = val + bias;
                    }
                }
            }
        }
    }
}

/// The 3x3, padding 1, stride 1 convolution of `x [B, Cin, H, W]` with `kern` (+ `bias`):
/// `[B, Cout, H, W]`. Only where [`applies`] said so.
pub(super) fn conv3x3<T: WithDType>(
    x: &[T],
    bhw: (usize, usize, usize),
    kern: &Kernel<T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let f43 = match VARIANT.load(Ordering::Relaxed) {
        2 => false,
        4 => true,
        _ => bhw.1 * bhw.2 >= F43_PIXELS,
    };
    if f43 {
        tiled::<T, 4, 6, F43>(x, bhw, kern, bias)
    } else {
        tiled::<T, 2, 4, F23>(x, bhw, kern, bias)
    }
}

/// 0: by image size (the default); 2 or 4: that output tile for every image.
static VARIANT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The output tile side for this process: 4 for F(4x4, 3x3) on every image, 2 for
/// F(2x2, 3x3) (rounding as a direct convolution, 1.5-1.9x slower at 32x32 and above),
/// anything else for the default choice by image size.
pub fn set_tile(m: usize) {
    VARIANT.store(m, Ordering::Relaxed);
}

fn tiled<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    (b, h, w): (usize, usize, usize),
    kern: &Kernel<T>,
    bias: Option<&[T]>,
) -> Vec<T> {
    let (cin, cout) = (kern.cin, kern.cout);
    let t = Tiles {
        b,
        h,
        w,
        th: h.div_ceil(M),
        tw: w.div_ceil(M),
    };
    let aa = A * A;
    let u = kernel_transform::<T, M, A, F>(kern);
    let per_tile = aa * (cin + cout) * std::mem::size_of::<T>();
    let rows_per_chunk = (CHUNK_BYTES / per_tile)
        .max(MIN_TILES)
        .div_ceil(t.tw)
        .max(1);
    let mut out = vec![T::zero(); b * cout * h * w];
    let mut v = Vec::new();
    let mut m = Vec::new();
    let mut r0 = 0;
    while r0 < t.rows() {
        let r1 = (r0 + rows_per_chunk).min(t.rows());
        let tc = (r1 - r0) * t.tw;
        v.resize(cin * aa * tc, T::zero());
        m.resize(cout * aa * tc, T::zero());
        v[..cin * aa * tc]
            .par_chunks_mut(aa * tc)
            .enumerate()
            .for_each(|(ci, vc)| input_transform::<T, M, A, F>(x, (cin, ci), t, (r0, r1), vc));
        for xi in 0..aa {
            matmul(
                (cout, tc, cin),
                &mut m[xi * tc..cout * aa * tc],
                ((aa * tc) as isize, 1),
                false,
                Mat::new(&u[xi * cin..], (aa * cin) as isize, 1),
                Mat::new(&v[xi * tc..cin * aa * tc], (aa * tc) as isize, 1),
            );
        }
        let (b0, b1) = (r0 / t.th, (r1 - 1) / t.th);
        out.par_chunks_mut(h * w)
            .enumerate()
            .filter(|(bc, _)| (b0..=b1).contains(&(bc / cout)))
            .for_each(|(bc, plane)| {
                let (bi, co) = (bc / cout, bc % cout);
                let bv = bias.map_or(T::zero(), |bv| bv[co]);
                output_transform::<T, M, A, F>(
                    &m[co * aa * tc..][..aa * tc],
                    t,
                    (bi, r0, r1),
                    bv,
                    plane,
                );
            });
        r0 = r1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::conv_cpu::tests::{max_err, randn};
    use super::super::conv_cpu::{conv2d, conv2d_s1_input_grad};
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    fn run(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, flip: bool, m: usize) -> Tensor {
        let (b, cin, h, wd) = x.dims4().unwrap();
        let (o, i, k, _) = w.dims4().unwrap();
        let xs = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ws = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let bs = bias.map(|t| t.to_vec1::<f64>().unwrap());
        let mut kern = Kernel::plain(&ws, o, i, k);
        if flip {
            kern = kern.transposed_flipped();
        }
        assert_eq!(kern.cin, cin);
        let y = if m == 4 {
            tiled::<f64, 4, 6, F43>(&xs, (b, h, wd), &kern, bs.as_deref())
        } else {
            tiled::<f64, 2, 4, F23>(&xs, (b, h, wd), &kern, bs.as_deref())
        };
        Tensor::from_vec(y, (b, kern.cout, h, wd), &Device::Cpu).unwrap()
    }

    /// The tiles against candle's direct convolution in f64 (to rounding): odd and even
    /// sides (half-filled last tiles), one-pixel images, batch 3 (tile rows crossing
    /// images), a bias; and with the kernel read transposed and flipped (the input
    /// gradient) against candle's transposed convolution.
    #[test]
    fn tiles_equal_the_direct_convolution() {
        for (i, &(b, cin, cout, h, w)) in [
            (1, 3, 5, 7, 6),
            (3, 4, 2, 5, 9),
            (2, 2, 3, 1, 1),
            (1, 6, 4, 2, 3),
            (2, 5, 3, 8, 8),
            (1, 3, 2, 13, 10),
        ]
        .iter()
        .enumerate()
        {
            let s = 10 * i as u64;
            let x = randn(&[b, cin, h, w], s + 1);
            let k = randn(&[cout, cin, 3, 3], s + 2);
            let bias = randn(&[cout], s + 3);
            let want = x
                .conv2d(&k, 1, 1, 1, 1)
                .unwrap()
                .broadcast_add(&bias.reshape((1, cout, 1, 1)).unwrap())
                .unwrap();
            let dy = randn(&[b, cout, h, w], s + 4);
            let want_t = dy.conv_transpose2d(&k, 1, 0, 1, 1).unwrap();
            for tile in [2, 4] {
                let (e, m) = max_err(&run(&x, &k, Some(&bias), false, tile), &want);
                assert!(
                    e <= 1e-12 * m.max(1.0),
                    "F({tile}) forward {b}x{cin}x{h}x{w}: {e} of {m}"
                );
                let (e, m) = max_err(&run(&dy, &k, None, true, tile), &want_t);
                assert!(
                    e <= 1e-12 * m.max(1.0),
                    "F({tile}) transposed {b}x{cout}x{h}x{w}: {e} of {m}"
                );
            }
        }
    }

    /// Through the layer entry points in f32, where the path applies (32 channels and
    /// more, odd widths): forward and input gradient within the rounding of the variant
    /// for that size of candle's (F(4x4): 5e-5 of the largest magnitude; F(2x2): 2e-6; a
    /// wrong transform is off by O(1)); below 16x16 pixels or 32 channels, the direct path.
    #[test]
    fn entry_points_take_the_tiles_in_f32() {
        // 32x33: F(4x4, 3x3); 16x17: F(2x2, 3x3), held to a direct sum's rounding.
        for (h, w, tol) in [(32, 33, 5e-5), (16, 17, 2e-6)] {
            let (cin, cout) = (32, 40);
            assert!(applies(3, 1, (h, w), cin, cout) && applies(3, 1, (h, w), cout, cin));
            let f = |t: Tensor| t.to_dtype(DType::F32).unwrap();
            let x = f(randn(&[2, cin, h, w], 7));
            let k = f(randn(&[cout, cin, 3, 3], 8));
            let dy = f(randn(&[2, cout, h, w], 9));
            let (e, m) = max_err(
                &conv2d(&x, &k, 1, 1).unwrap(),
                &x.conv2d(&k, 1, 1, 1, 1).unwrap(),
            );
            assert!(e <= tol * m, "{h}x{w} forward {e} of {m}");
            let xv = Var::from_tensor(&x).unwrap();
            let g = (xv.as_tensor().conv2d(&k, 1, 1, 1, 1).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let want = g.get(xv.as_tensor()).unwrap();
            let ours = conv2d_s1_input_grad(&dy, &k, 1).unwrap().unwrap();
            let (e, m) = max_err(&ours, want);
            assert!(e <= tol * m, "{h}x{w} input gradient {e} of {m}");
        }
        assert!(!applies(3, 1, (15, 16), 32, 32) && !applies(3, 1, (64, 64), 31, 64));
    }
}
