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
//! and flipped, so it takes this path too (the kernel is read through strides; under
//! F(2x2), whose points are closed under `a -> 1/a`, the stored kernel's transform is read
//! transposed at swapped positions instead, see [`Transforms::REVERSED`]). The kernel
//! gradient (a trained kernel) runs the transforms' adjoints ([`kernel_grad`]).

use super::conv_cpu::{Kernel, Mat, matmul, matmul_one_thread};
use candle_core::WithDType;
use rayon::prelude::*;
use std::mem::MaybeUninit;
use std::ops::{Add, Mul, Sub};
use std::sync::atomic::{AtomicBool, Ordering};

mod kernel_grad;
pub(super) use kernel_grad::kernel_grad3x3;

/// Bytes of transformed input plus output per chunk of tiles (the GEMMs' operands).
const CHUNK_BYTES: usize = 24 << 20;
/// At least this many tiles per chunk (the GEMMs' column count), whatever the channels.
const MIN_TILES: usize = 256;
/// Bytes of transformed kernel at once: larger kernels (1280 -> 1280 channels: 105 MB as
/// F(2x2, 3x3), 2560 -> 1280: 210 MB) are transformed in blocks of output channels, each
/// block's GEMMs and output run before the next is made.
const KERNEL_BYTES: usize = 64 << 20;
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

/// Whether a 3x3, padding 1 convolution of an `h x w` image runs here as F(4x4, 3x3), the
/// variant that beats even the upsampler's phase kernels (`upconv_cpu`): 2.25 products per
/// output and channel pair against their 4.
pub(super) fn takes_f43((h, w): (usize, usize), cin: usize, cout: usize) -> bool {
    applies(3, 1, (h, w), cin, cout)
        && match VARIANT.load(Ordering::Relaxed) {
            2 => false,
            4 => true,
            _ => h * w >= F43_PIXELS,
        }
}

/// One Winograd variant F(M x M, 3 x 3) by its 1-D transforms (`A = M + 2` points): the
/// input `B^T d`, the kernel `G g` and the output `A^T m`. Applied along columns, then
/// rows, they give the 2-D transforms; each runs on [`Lanes`], several tiles (or kernel
/// channel pairs) at once.
trait Transforms<const M: usize, const A: usize> {
    fn input<L: Num>(d: [L; A]) -> [L; A];
    fn kernel<L: Num>(g: [L; 3]) -> [L; A];
    fn output<L: Num>(m: [L; A]) -> [L; M];
    /// The adjoint (transpose) of [`Transforms::output`]: where an output gradient enters
    /// `M` (the kernel gradient, `kernel_grad`).
    fn output_adjoint<L: Num>(y: [L; M]) -> [L; A];
    /// The adjoint of [`Transforms::kernel`]: where a gradient of `U` lands on the taps.
    fn kernel_adjoint<L: Num>(u: [L; A]) -> [L; 3];
    /// Where the points are closed under `a -> 1/a`, the kernel transform of the
    /// reversed taps is that of the taps with positions permuted: `G rev(g) = P G g`,
    /// `P` this permutation (`None` for other point sets).
    const REVERSED: Option<[usize; A]>;
}

/// The arithmetic the transforms need: sums, differences and products with constants.
trait Num: Copy + Add<Output = Self> + Sub<Output = Self> + Mul<Output = Self> {
    fn k(v: f64) -> Self;
}

/// `N` values of `T` handled as one: the transforms of `N` tiles (or `N` kernel channel
/// pairs) run together, and the compiler turns the per-lane loops into vector
/// instructions.
#[derive(Clone, Copy)]
struct Lanes<T, const N: usize>([T; N]);

/// Lanes per vector: eight f32 fill an AVX2 register.
const LANES: usize = 8;

impl<T: WithDType, const N: usize> Add for Lanes<T, N> {
    type Output = Self;
    fn add(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] + o.0[l]))
    }
}

impl<T: WithDType, const N: usize> Sub for Lanes<T, N> {
    type Output = Self;
    fn sub(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] - o.0[l]))
    }
}

impl<T: WithDType, const N: usize> Mul for Lanes<T, N> {
    type Output = Self;
    fn mul(self, o: Self) -> Self {
        Self(std::array::from_fn(|l| self.0[l] * o.0[l]))
    }
}

impl<T: WithDType, const N: usize> Num for Lanes<T, N> {
    fn k(v: f64) -> Self {
        Self([T::from_f64(v); N])
    }
}

impl<T: WithDType, const N: usize> Lanes<T, N> {
    /// The first `N` values of `s`, or as many as it has and zeros after them.
    fn load(s: &[T]) -> Self {
        match s.get(..N) {
            Some(full) => Self(std::array::from_fn(|l| full[l])),
            None => Self(std::array::from_fn(|l| {
                s.get(l).copied().unwrap_or(T::zero())
            })),
        }
    }
}

/// F(2x2, 3x3): points 0, 1, -1 and infinity; 16 products per tile where the direct
/// convolution has 36.
struct F23;

impl Transforms<2, 4> for F23 {
    fn input<L: Num>([d0, d1, d2, d3]: [L; 4]) -> [L; 4] {
        [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
    }
    fn kernel<L: Num>([g0, g1, g2]: [L; 3]) -> [L; 4] {
        let half = L::k(0.5);
        [g0, (g0 + g1 + g2) * half, (g0 - g1 + g2) * half, g2]
    }
    fn output<L: Num>([m0, m1, m2, m3]: [L; 4]) -> [L; 2] {
        [m0 + m1 + m2, m1 - m2 - m3]
    }
    fn output_adjoint<L: Num>([y0, y1]: [L; 2]) -> [L; 4] {
        [y0, y0 + y1, y0 - y1, L::k(0.0) - y1]
    }
    fn kernel_adjoint<L: Num>([u0, u1, u2, u3]: [L; 4]) -> [L; 3] {
        let half = L::k(0.5);
        let (s, d) = ((u1 + u2) * half, (u1 - u2) * half);
        [u0 + s, d, s + u3]
    }
    // Points 0 and infinity trade places; 1 and -1 stay.
    const REVERSED: Option<[usize; 4]> = Some([3, 1, 2, 0]);
}

/// F(4x4, 3x3): points 0, +/-1, +/-2 and infinity; 36 products per tile of 16 outputs
/// where the direct convolution has 144.
struct F43;

impl Transforms<4, 6> for F43 {
    fn input<L: Num>([d0, d1, d2, d3, d4, d5]: [L; 6]) -> [L; 6] {
        let (two, four, five) = (L::k(2.0), L::k(4.0), L::k(5.0));
        [
            four * d0 - five * d2 + d4,
            d3 + d4 - four * (d1 + d2),
            four * (d1 - d2) - d3 + d4,
            two * (d3 - d1) - d2 + d4,
            two * (d1 - d3) - d2 + d4,
            four * d1 - five * d3 + d5,
        ]
    }
    fn kernel<L: Num>([g0, g1, g2]: [L; 3]) -> [L; 6] {
        let (a, b) = (L::k(1.0 / 6.0) * (g0 + g2), L::k(1.0 / 6.0) * g1);
        let (c, d) = (
            L::k(1.0 / 24.0) * g0 + L::k(1.0 / 6.0) * g2,
            L::k(1.0 / 12.0) * g1,
        );
        [L::k(0.25) * g0, L::k(0.0) - a - b, b - a, c + d, c - d, g2]
    }
    fn output<L: Num>([m0, m1, m2, m3, m4, m5]: [L; 6]) -> [L; 4] {
        let (two, four, eight) = (L::k(2.0), L::k(4.0), L::k(8.0));
        let (p12, n12, p34, n34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
        [
            m0 + p12 + p34,
            n12 + two * n34,
            p12 + four * p34,
            n12 + eight * n34 + m5,
        ]
    }
    fn output_adjoint<L: Num>([y0, y1, y2, y3]: [L; 4]) -> [L; 6] {
        let (two, four, eight) = (L::k(2.0), L::k(4.0), L::k(8.0));
        let (e, o) = (y0 + y2, y1 + y3);
        let (e4, o8) = (y0 + four * y2, two * y1 + eight * y3);
        [y0, e + o, e - o, e4 + o8, e4 - o8, y3]
    }
    fn kernel_adjoint<L: Num>([u0, u1, u2, u3, u4, u5]: [L; 6]) -> [L; 3] {
        let (s12, d21, s34, d34) = (u1 + u2, u2 - u1, u3 + u4, u3 - u4);
        let sixth = L::k(1.0 / 6.0);
        [
            L::k(0.25) * u0 - sixth * s12 + L::k(1.0 / 24.0) * s34,
            sixth * d21 + L::k(1.0 / 12.0) * d34,
            sixth * (s34 - s12) + u5,
        ]
    }
    // +/-2 would go to +/-1/2, not among the points.
    const REVERSED: Option<[usize; 6]> = None;
}

/// `U = G g G^T` for output channels `o0..o1` and every input channel, laid out
/// `[o1 - o0, A*A, Cin]`.
fn kernel_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    kern: &Kernel<T>,
    (o0, o1): (usize, usize),
) -> Vec<T> {
    let cin = kern.cin;
    let len = (o1 - o0) * A * A * cin;
    // Written once, element by element, without zeroing first (up to 64 MB per call).
    let mut u = Vec::with_capacity(len);
    // Offsets of every tap of channel pair (0, 0); `Kernel::tap` bounds-checks each.
    let taps: [usize; 9] = std::array::from_fn(|t| kern.tap(t / 3, t % 3));
    u.spare_capacity_mut()[..len]
        .par_chunks_mut(A * A * cin)
        .enumerate()
        .for_each(|(oo, uo)| {
            let whole = cin - cin % LANES;
            for i in (0..whole).step_by(LANES) {
                kernel_lanes::<T, M, A, F, LANES>(kern, &taps, (o0 + oo, i), uo);
            }
            for i in whole..cin {
                kernel_lanes::<T, M, A, F, 1>(kern, &taps, (o0 + oo, i), uo);
            }
        });
    // SAFETY: `kernel_lanes` wrote every position of every input channel of each output
    // channel's row, so all `len` elements are initialized.
    unsafe { u.set_len(len) };
    u
}

/// The transforms of output channel `o` with input channels `i..i + N` into `uo`
/// (`[A*A, Cin]`, that output channel's part of `U`): `G g` down each tap column, then
/// along each row of the result.
fn kernel_lanes<T: WithDType, const M: usize, const A: usize, F, const N: usize>(
    kern: &Kernel<T>,
    taps: &[usize; 9],
    (o, i): (usize, usize),
    uo: &mut [MaybeUninit<T>],
) where
    F: Transforms<M, A>,
{
    let at = o as isize * kern.so + i as isize * kern.si;
    let tap = |r: usize, c: usize| {
        let t0 = taps[r * 3 + c] as isize + at;
        Lanes::<T, N>(std::array::from_fn(|l| {
            kern.data[(t0 + l as isize * kern.si) as usize]
        }))
    };
    let mut cols = [[Lanes::<T, N>::k(0.0); A]; 3];
    for (c, col) in cols.iter_mut().enumerate() {
        *col = F::kernel([tap(0, c), tap(1, c), tap(2, c)]);
    }
    let cin = kern.cin;
    for r in 0..A {
        let row = F::kernel([cols[0][r], cols[1][r], cols[2][r]]);
        for (c, v) in row.iter().enumerate() {
            for (dst, &x) in uo[(r * A + c) * cin + i..][..N].iter_mut().zip(&v.0) {
                dst.write(x);
            }
        }
    }
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

/// How a `plan` cuts one convolution (forward or kernel gradient alike): the tile grid,
/// blocks of output channels (each block's transformed kernel or gradient sums within
/// `plan.kernel_bytes`) and chunks of tile rows (transformed input and output of a chunk
/// within `plan.chunk_bytes`, at least `plan.min_tiles`), both as ranges.
struct Cut {
    t: Tiles,
    blocks: Vec<(usize, usize)>,
    chunks: Vec<(usize, usize)>,
}

impl Plan {
    fn cut<T, const M: usize, const A: usize>(
        &self,
        (b, h, w): (usize, usize, usize),
        (cin, cout): (usize, usize),
    ) -> Cut {
        let t = Tiles {
            b,
            h,
            w,
            th: h.div_ceil(M),
            tw: w.div_ceil(M),
        };
        let (aa, size) = (A * A, std::mem::size_of::<T>());
        let per_block = (self.kernel_bytes / (aa * cin * size)).clamp(1, cout);
        let per_tile = aa * (cin + per_block) * size;
        let rows_per_chunk = (self.chunk_bytes / per_tile)
            .max(self.min_tiles)
            .div_ceil(t.tw)
            .max(1);
        let ranges = |n: usize, step: usize| -> Vec<(usize, usize)> {
            (0..n)
                .step_by(step)
                .map(|a| (a, (a + step).min(n)))
                .collect()
        };
        Cut {
            t,
            blocks: ranges(cout, per_block),
            chunks: ranges(t.rows(), rows_per_chunk),
        }
    }
}

/// `V` of tile rows `r0..r1` for every input channel into `v` (`[Cin, A*A, tc]`, resized).
fn transform_chunk<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    cin: usize,
    t: Tiles,
    (r0, r1): (usize, usize),
    v: &mut Vec<T>,
) {
    let len = cin * A * A * (r1 - r0) * t.tw;
    v.resize(len, T::zero());
    v[..len]
        .par_chunks_mut(len / cin)
        .enumerate()
        .for_each(|(ci, vc)| input_transform::<T, M, A, F>(x, (cin, ci), t, (r0, r1), vc));
}

/// One GEMM per position of the transform: `dst` holds `A*A` results of `mnk.0 x mnk.1`
/// (row-major), position `xi` is `operands(xi)`, added to what `dst` holds when `add`.
/// With enough positions to share out whole (2-4 threads), each GEMM runs on one thread
/// with no handover inside; otherwise one after another on all threads.
fn gemm_per_position<'a, T: WithDType>(
    dst: &mut [T],
    aa: usize,
    mnk: (usize, usize, usize),
    add: bool,
    operands: impl Fn(usize) -> (Mat<'a, T>, Mat<'a, T>) + Sync,
) {
    let (per, stride) = (mnk.0 * mnk.1, (mnk.1 as isize, 1));
    let dst = &mut dst[..aa * per];
    if aa >= 4 * rayon::current_num_threads() {
        dst.par_chunks_mut(per).enumerate().for_each(|(xi, d)| {
            let (a, b) = operands(xi);
            matmul_one_thread(mnk, d, stride, add, a, b);
        });
    } else {
        for (xi, d) in dst.chunks_mut(per).enumerate() {
            let (a, b) = operands(xi);
            matmul(mnk, d, stride, add, a, b);
        }
    }
}

/// `V = B^T d B` for the tiles of global tile rows `r0..r1` of channel `ci`'s planes,
/// written to `v [A*A, tc]` (position-major). Per tile row, the `A` image rows it reads
/// are copied into a zero-padded strip; `B^T` runs down the strip's columns, eight
/// neighbouring columns at a time, and `B` along the rows of each tile, eight tiles at a
/// time; border tiles need no tests.
fn input_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    (cin, ci): (usize, usize),
    t: Tiles,
    (r0, r1): (usize, usize),
    v: &mut [T],
) {
    let tc = (r1 - r0) * t.tw;
    // Strip columns: image column x is at x + 1; whole groups of tiles and of lanes.
    let pw = (M * t.tw.div_ceil(LANES) * LANES + A - M).next_multiple_of(LANES);
    let mut strip = vec![T::zero(); A * pw];
    let mut down = vec![T::zero(); A * pw];
    for gr in r0..r1 {
        let (b, ty) = (gr / t.th, gr % t.th);
        let plane = &x[(b * cin + ci) * t.h * t.w..][..t.h * t.w];
        for (r, row) in strip.chunks_exact_mut(pw).enumerate() {
            match (M * ty + r).checked_sub(1).filter(|&y| y < t.h) {
                Some(y) => row[1..1 + t.w].copy_from_slice(&plane[y * t.w..][..t.w]),
                None => row.fill(T::zero()),
            }
        }
        strip_to_positions::<T, M, A, A>(&strip, &mut down, (pw, t.tw), (gr - r0, tc), v, F::input);
    }
}

/// The two passes of a tile row's transform into positions, shared by the input transform
/// and the output gradient's (`kernel_grad`): `f` (`K` points to `A`) down each column of
/// the strip (`K` rows of `pw`), eight neighbouring columns at a time, into `down`; then
/// along each of its `A` rows for tiles `M` columns apart, eight tiles at a time, into
/// `dst [A*A, tc]` at the columns of local tile row `lr` (of `tw` tiles).
fn strip_to_positions<T: WithDType, const M: usize, const K: usize, const A: usize>(
    strip: &[T],
    down: &mut [T],
    (pw, tw): (usize, usize),
    (lr, tc): (usize, usize),
    dst: &mut [T],
    f: impl Fn([Lanes<T, LANES>; K]) -> [Lanes<T, LANES>; A],
) {
    for x0 in (0..pw).step_by(LANES) {
        let d: [Lanes<T, LANES>; K] = std::array::from_fn(|r| Lanes::load(&strip[r * pw + x0..]));
        for (r, e) in f(d).iter().enumerate() {
            down[r * pw + x0..][..LANES].copy_from_slice(&e.0);
        }
    }
    for tx in (0..tw).step_by(LANES) {
        let col = lr * tw + tx;
        let n = LANES.min(tw - tx);
        for r in 0..A {
            let s = &down[r * pw + M * tx..][..M * (LANES - 1) + K];
            let d: [Lanes<T, LANES>; K] =
                std::array::from_fn(|c| Lanes(std::array::from_fn(|l| s[M * l + c])));
            for (c, e) in f(d).iter().enumerate() {
                dst[(r * A + c) * tc + col..][..n].copy_from_slice(&e.0[..n]);
            }
        }
    }
}

/// `Y = A^T M A` (+ bias) from one output channel's `m` (position `p`, tile `i` at
/// `p * ps + i`) into `plane` (image `b`'s `[h, w]` plane of that channel), for the tiles
/// of global tile rows `r0..r1` in image `b`, eight tiles at a time: `A` along each row of
/// positions, then down.
fn output_transform<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    m: &[T],
    (ps, t): (usize, Tiles),
    (b, r0, r1): (usize, usize, usize),
    bias: T,
    plane: &mut [T],
) {
    let bias = Lanes::<T, LANES>([bias; LANES]);
    for gr in r0.max(b * t.th)..r1.min((b + 1) * t.th) {
        let ty = gr % t.th;
        for tx in (0..t.tw).step_by(LANES) {
            let col = (gr - r0) * t.tw + tx;
            let mut across = [[Lanes::<T, LANES>::k(0.0); M]; A];
            for (r, a) in across.iter_mut().enumerate() {
                // Lanes past this row's last tile read the next row's (or zeros); unused.
                let e: [Lanes<T, LANES>; A] =
                    std::array::from_fn(|c| Lanes::load(&m[(r * A + c) * ps + col..]));
                *a = F::output(e);
            }
            // The eight tiles' output rows: rows[r][l][c] is pixel (M ty + r, M (tx + l) + c).
            let mut rows = [[[T::zero(); M]; LANES]; M];
            for c in 0..M {
                let y = F::output(std::array::from_fn(|r| across[r][c]));
                for (r, yr) in y.iter().enumerate() {
                    let s = *yr + bias;
                    for (l, px) in rows[r].iter_mut().enumerate() {
                        px[c] = s.0[l];
                    }
                }
            }
            let x0 = M * tx;
            let xn = (M * LANES).min(t.w - x0);
            for (r, row) in rows.iter().enumerate() {
                let yy = M * ty + r;
                if yy >= t.h {
                    break;
                }
                plane[yy * t.w + x0..][..xn].copy_from_slice(&row.as_flattened()[..xn]);
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
    if takes_f43((bhw.1, bhw.2), kern.cin, kern.cout) {
        tiled::<T, 4, 6, F43>(x, bhw, kern, bias, PLAN)
    } else {
        tiled::<T, 2, 4, F23>(x, bhw, kern, bias, PLAN)
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

/// How `tiled` cuts the work: bytes of transformed input plus output per chunk of tiles,
/// the fewest tiles per chunk, and the most bytes of transformed kernel at once.
#[derive(Clone, Copy)]
struct Plan {
    chunk_bytes: usize,
    min_tiles: usize,
    kernel_bytes: usize,
}

const PLAN: Plan = Plan {
    chunk_bytes: CHUNK_BYTES,
    min_tiles: MIN_TILES,
    kernel_bytes: KERNEL_BYTES,
};

fn tiled<T: WithDType, const M: usize, const A: usize, F: Transforms<M, A>>(
    x: &[T],
    (b, h, w): (usize, usize, usize),
    kern: &Kernel<T>,
    bias: Option<&[T]>,
    plan: Plan,
) -> Vec<T> {
    let (cin, cout) = (kern.cin, kern.cout);
    let Cut { t, blocks, chunks } = plan.cut::<T, M, A>((b, h, w), (cin, cout));
    let aa = A * A;
    // The input gradient's kernel (transposed, flipped) gathers its taps across whole
    // kernel rows. Where the points allow, the contiguous kernel is transformed instead
    // (block `o0..o1` of its input channels, laid out `[cin, A*A, o1 - o0]`) and each
    // GEMM reads it transposed, at the reversed position.
    let reversed = F::REVERSED.and_then(|p| Some((p, kern.unflipped()?)));
    let transform = |(o0, o1)| match reversed {
        Some((_, plain)) => {
            kernel_transform::<T, M, A, F>(&plain.input_channels((o0, o1)), (0, cin))
        }
        None => kernel_transform::<T, M, A, F>(kern, (o0, o1)),
    };
    // One block serves every chunk of tiles; several are transformed again per chunk.
    let whole = (blocks.len() == 1).then(|| transform((0, cout)));
    let mut out = vec![T::zero(); b * cout * h * w];
    let mut v = Vec::new();
    let mut m = Vec::new();
    for (r0, r1) in chunks {
        let tc = (r1 - r0) * t.tw;
        transform_chunk::<T, M, A, F>(x, cin, t, (r0, r1), &mut v);
        let (b0, b1) = (r0 / t.th, (r1 - 1) / t.th);
        for &(o0, o1) in &blocks {
            let block;
            let u = match &whole {
                Some(u) => u,
                None => {
                    block = transform((o0, o1));
                    &block
                }
            };
            let nco = o1 - o0;
            // M [A*A, nco, tc]: one GEMM per position of the transform.
            m.resize(aa * nco * tc, T::zero());
            let operands = |xi: usize| {
                let kernel = match reversed {
                    Some((p, _)) => {
                        let xr = p[xi / A] * A + p[xi % A];
                        Mat::new(&u[xr * nco..], 1, (aa * nco) as isize)
                    }
                    None => Mat::new(&u[xi * cin..], (aa * cin) as isize, 1),
                };
                (
                    kernel,
                    Mat::new(&v[xi * tc..cin * aa * tc], (aa * tc) as isize, 1),
                )
            };
            gemm_per_position(&mut m, aa, (nco, tc, cin), false, operands);
            out.par_chunks_mut(h * w)
                .enumerate()
                .filter(|(bc, _)| {
                    (b0..=b1).contains(&(bc / cout)) && (o0..o1).contains(&(bc % cout))
                })
                .for_each(|(bc, plane)| {
                    let (bi, co) = (bc / cout, bc % cout);
                    let bv = bias.map_or(T::zero(), |bv| bv[co]);
                    output_transform::<T, M, A, F>(
                        &m[(co - o0) * tc..aa * nco * tc],
                        (nco * tc, t),
                        (bi, r0, r1),
                        bv,
                        plane,
                    );
                });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::conv_cpu::tests::{max_err, randn};
    use super::super::conv_cpu::{conv2d, conv2d_s1_input_grad};
    use super::*;
    use candle_core::{DType, Device, Tensor, Var};

    /// Chunks of at least 5 tiles (several per image), kernels transformed one output
    /// channel at a time and again for every chunk.
    /// `(batch, cin, cout, h, w)`: odd and even sides (half-filled last tiles), one-pixel
    /// images, batch 3 (tile rows crossing images), channel counts and widths with whole
    /// and partial groups of lanes.
    pub(super) const SHAPES: [(usize, usize, usize, usize, usize); 8] = [
        (1, 3, 5, 7, 6),
        (3, 4, 2, 5, 9),
        (2, 2, 3, 1, 1),
        (1, 6, 4, 2, 3),
        (2, 5, 3, 8, 8),
        (1, 3, 2, 13, 10),
        (2, 11, 9, 10, 37),
        (1, 17, 16, 19, 70),
    ];

    pub(super) const SMALL: Plan = Plan {
        chunk_bytes: 0,
        min_tiles: 5,
        kernel_bytes: 1,
    };

    fn run(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        flip: bool,
        (m, plan): (usize, Plan),
    ) -> Tensor {
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
            tiled::<f64, 4, 6, F43>(&xs, (b, h, wd), &kern, bs.as_deref(), plan)
        } else {
            tiled::<f64, 2, 4, F23>(&xs, (b, h, wd), &kern, bs.as_deref(), plan)
        };
        Tensor::from_vec(y, (b, kern.cout, h, wd), &Device::Cpu).unwrap()
    }

    /// The tiles against candle's direct convolution in f64 (to rounding) on [`SHAPES`],
    /// with a bias; with the kernel read transposed and flipped (the input gradient) against candle's
    /// transposed convolution; in one chunk and one kernel block, and in many of each.
    #[test]
    fn tiles_equal_the_direct_convolution() {
        for (i, &(b, cin, cout, h, w)) in SHAPES.iter().enumerate() {
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
                for (p, plan) in [PLAN, SMALL].into_iter().enumerate() {
                    let (e, m) = max_err(&run(&x, &k, Some(&bias), false, (tile, plan)), &want);
                    assert!(
                        e <= 1e-12 * m.max(1.0),
                        "F({tile}) plan {p} forward {b}x{cin}x{h}x{w}: {e} of {m}"
                    );
                    let (e, m) = max_err(&run(&dy, &k, None, true, (tile, plan)), &want_t);
                    assert!(
                        e <= 1e-12 * m.max(1.0),
                        "F({tile}) plan {p} transposed {b}x{cout}x{h}x{w}: {e} of {m}"
                    );
                }
            }
        }
    }

    /// With 16 threads (more than a quarter of the transform's positions) the GEMMs run
    /// one after another, each on every thread, instead of one per thread: same result.
    #[test]
    fn many_threads_share_each_gemm() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(16)
            .build()
            .unwrap();
        let x = randn(&[2, 9, 11, 13], 91);
        let k = randn(&[10, 9, 3, 3], 92);
        let want = x.conv2d(&k, 1, 1, 1, 1).unwrap();
        for tile in [2, 4] {
            let got = pool.install(|| run(&x, &k, None, false, (tile, PLAN)));
            let (e, m) = max_err(&got, &want);
            assert!(e <= 1e-12 * m.max(1.0), "F({tile}): {e} of {m}");
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
