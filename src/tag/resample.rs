//! Bit-exact re-implementations of the resamplers the reference taggers use, on 8-bit
//! interleaved pixels (any channel count):
//!
//! - Pillow's two-pass convolution (`Image.resize` with LANCZOS or BICUBIC, optional
//!   source box), fixed-point with 22 fraction bits, horizontal pass first, 8-bit
//!   intermediate — as webui's DeepDanbooru "resize and fill" uses it.
//! - OpenCV `INTER_AREA` for shrinking (float area weights; the integer-factor fast
//!   path) and `INTER_LANCZOS4` for enlarging (11-bit fixed-point coefficients,
//!   replicated border) — as the WD14 taggers use them.
//!
//! Written from the algorithms' published behaviour; the fixtures made by
//! tests/fixtures/gen_tag_fixtures.py check the outputs against Pillow and OpenCV.

/// An 8-bit interleaved image: `data.len() == w * h * cn`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub w: usize,
    pub h: usize,
    pub cn: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn new(w: usize, h: usize, cn: usize, fill: u8) -> Pixels {
        Pixels {
            w,
            h,
            cn,
            data: vec![fill; w * h * cn],
        }
    }

    fn row(&self, y: usize) -> &[u8] {
        let s = self.w * self.cn;
        &self.data[y * s..(y + 1) * s]
    }

    /// Copies `src` with its top-left corner at (`x0`, `y0`), clipped to this image.
    pub fn paste(&mut self, src: &Pixels, x0: i64, y0: i64) {
        debug_assert_eq!(self.cn, src.cn);
        let cn = self.cn;
        for sy in 0..src.h {
            let dy = y0 + sy as i64;
            if dy < 0 || dy >= self.h as i64 {
                continue;
            }
            let sx0 = (-x0).max(0) as usize;
            let sx1 = (self.w as i64 - x0).min(src.w as i64);
            if sx1 <= sx0 as i64 {
                continue;
            }
            let sx1 = sx1 as usize;
            let dx0 = (x0 + sx0 as i64) as usize;
            let d = (dy as usize * self.w + dx0) * cn;
            let s = (sy * src.w + sx0) * cn;
            let n = (sx1 - sx0) * cn;
            self.data[d..d + n].copy_from_slice(&src.data[s..s + n]);
        }
    }
}

/// Pillow's resampling filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PilFilter {
    Lanczos,
    Bicubic,
}

impl PilFilter {
    fn support(self) -> f64 {
        match self {
            PilFilter::Lanczos => 3.0,
            PilFilter::Bicubic => 2.0,
        }
    }

    fn eval(self, x: f64) -> f64 {
        match self {
            PilFilter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
            PilFilter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        return 1.0;
    }
    let x = x * std::f64::consts::PI;
    x.sin() / x
}

const PIL_BITS: u32 = 22;

/// Per output index: first source index, tap count, and `ksize` fixed-point weights.
struct PilCoeffs {
    ksize: usize,
    bounds: Vec<(usize, usize)>,
    k: Vec<i32>,
}

fn pil_coeffs(in_size: usize, in0: f64, in1: f64, out: usize, f: PilFilter) -> PilCoeffs {
    let scale = (in1 - in0) / out as f64;
    let filterscale = scale.max(1.0);
    let support = f.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out);
    let mut k = vec![0i32; out * ksize];
    let mut pre = vec![0f64; ksize];
    for xx in 0..out {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C casts truncate toward zero, as `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = xmax.saturating_sub(xmin);
        let mut ww = 0.0;
        for (x, p) in pre.iter_mut().enumerate().take(n) {
            let w = f.eval((x as f64 + xmin as f64 - center + 0.5) * ss);
            *p = w;
            ww += w;
        }
        for (x, p) in pre.iter().enumerate().take(n) {
            let v = if ww != 0.0 { p / ww } else { *p };
            let s = v * (1u32 << PIL_BITS) as f64;
            k[xx * ksize + x] = if v < 0.0 {
                (-0.5 + s) as i32
            } else {
                (0.5 + s) as i32
            };
        }
        bounds.push((xmin, n));
    }
    PilCoeffs { ksize, bounds, k }
}

#[inline]
fn clip8(v: i64) -> u8 {
    (v >> PIL_BITS).clamp(0, 255) as u8
}

/// One separable pass over rows `[0, rows)` of `src`: horizontal (`along_x`) or vertical.
fn pil_pass(
    src: &Pixels,
    out_w: usize,
    out_h: usize,
    c: &PilCoeffs,
    along_x: bool,
    y0: usize,
) -> Pixels {
    let cn = src.cn;
    let mut out = Pixels::new(out_w, out_h, cn, 0);
    let stride = out_w * cn;
    if along_x {
        for y in 0..out_h {
            let s = src.row(y + y0);
            let d = &mut out.data[y * stride..(y + 1) * stride];
            for xx in 0..out_w {
                let (xmin, n) = c.bounds[xx];
                let kk = &c.k[xx * c.ksize..xx * c.ksize + n];
                for ch in 0..cn {
                    let mut ss: i64 = 1 << (PIL_BITS - 1);
                    for (x, &kv) in kk.iter().enumerate() {
                        ss += s[(x + xmin) * cn + ch] as i64 * kv as i64;
                    }
                    d[xx * cn + ch] = clip8(ss);
                }
            }
        }
    } else {
        let mut acc = vec![0i64; stride];
        for yy in 0..out_h {
            let (ymin, n) = c.bounds[yy];
            let kk = &c.k[yy * c.ksize..yy * c.ksize + n];
            acc.fill(1 << (PIL_BITS - 1));
            for (y, &kv) in kk.iter().enumerate() {
                for (a, &p) in acc.iter_mut().zip(src.row(y + ymin)) {
                    *a += p as i64 * kv as i64;
                }
            }
            for (d, &a) in out.data[yy * stride..(yy + 1) * stride]
                .iter_mut()
                .zip(&acc)
            {
                *d = clip8(a);
            }
        }
    }
    out
}

/// Pillow `Image.resize((w, h), filter, box)` for 8-bit images (Pillow 13). `box` is
/// the source rectangle (x0, y0, x1, y1) in pixels; it may be empty in one direction
/// (Pillow then extrapolates from the edge, which webui uses to stretch edges).
pub fn pil_resize(src: &Pixels, w: usize, h: usize, bx: [f64; 4], f: PilFilter) -> Pixels {
    let need_h = w != src.w || bx[0] != 0.0 || bx[2] != w as f64;
    let need_v = h != src.h || bx[1] != 0.0 || bx[3] != h as f64;
    if !need_h && !need_v {
        return src.clone();
    }
    let horiz = pil_coeffs(src.w, bx[0], bx[2], w, f);
    let mut vert = pil_coeffs(src.h, bx[1], bx[3], h, f);
    // Pillow runs the vertical pass first when the height shrinks by more than twice
    // as many pixels as the width; the order changes the rounding of the result.
    let (dh, dw) = (src.h as i64 - h as i64, src.w as i64 - w as i64);
    let horizontal_first = !(dh > 0 && dh > dw * 2);
    if !horizontal_first {
        let tmp = if need_v {
            pil_pass(src, src.w, h, &vert, false, 0)
        } else {
            src.clone()
        };
        return if need_h {
            pil_pass(&tmp, w, h, &horiz, true, 0)
        } else {
            tmp
        };
    }
    if !need_h {
        return pil_pass(src, w, h, &vert, false, 0);
    }
    let y_first = vert.bounds[0].0;
    let (ly, ln) = vert.bounds[h - 1];
    let y_last = ly + ln;
    for b in vert.bounds.iter_mut() {
        b.0 -= y_first;
    }
    let tmp = pil_pass(src, w, y_last - y_first, &horiz, true, y_first);
    if need_v {
        pil_pass(&tmp, w, h, &vert, false, 0)
    } else {
        tmp
    }
}

/// One weighted tap of OpenCV's area tables.
#[derive(Clone, Copy)]
struct AreaTap {
    di: usize,
    si: usize,
    alpha: f32,
}

fn area_tab(ssize: usize, dsize: usize, scale: f64) -> Vec<AreaTap> {
    let mut tab = Vec::with_capacity(ssize * 2);
    for dx in 0..dsize {
        let fsx1 = dx as f64 * scale;
        let fsx2 = fsx1 + scale;
        let cell = scale.min(ssize as f64 - fsx1);
        let mut sx2 = fsx2.floor() as i64;
        sx2 = sx2.min(ssize as i64 - 1);
        let sx1 = (fsx1.ceil() as i64).min(sx2);
        if sx1 as f64 - fsx1 > 1e-3 {
            tab.push(AreaTap {
                di: dx,
                si: (sx1 - 1) as usize,
                alpha: ((sx1 as f64 - fsx1) / cell) as f32,
            });
        }
        for sx in sx1..sx2 {
            tab.push(AreaTap {
                di: dx,
                si: sx as usize,
                alpha: (1.0 / cell) as f32,
            });
        }
        if fsx2 - sx2 as f64 > 1e-3 {
            tab.push(AreaTap {
                di: dx,
                si: sx2 as usize,
                alpha: ((fsx2 - sx2 as f64).min(1.0).min(cell) / cell) as f32,
            });
        }
    }
    tab
}

/// An image placed on a larger canvas of one fill value, without copying it: the
/// white square padding of the WD14 path.
pub struct PadView<'a> {
    pub img: &'a Pixels,
    /// Canvas size.
    pub w: usize,
    pub h: usize,
    /// Where the image's top-left corner sits on the canvas.
    pub left: usize,
    pub top: usize,
    pub fill: u8,
}

impl<'a> PadView<'a> {
    /// The image itself, no padding.
    pub fn of(img: &'a Pixels) -> PadView<'a> {
        PadView {
            img,
            w: img.w,
            h: img.h,
            left: 0,
            top: 0,
            fill: 0,
        }
    }

    /// Canvas row `y` into `out` (`w * cn` bytes).
    fn row_into(&self, y: usize, out: &mut [u8]) {
        let cn = self.img.cn;
        if y < self.top || y >= self.top + self.img.h {
            out.fill(self.fill);
            return;
        }
        let (l, iw) = (self.left * cn, self.img.w * cn);
        out[..l].fill(self.fill);
        out[l..l + iw].copy_from_slice(self.img.row(y - self.top));
        out[l + iw..].fill(self.fill);
    }
}

/// OpenCV `cv2.resize(src, (w, h), interpolation=INTER_AREA)` when shrinking
/// (`w <= src.w`, `h <= src.h`), reading the source through a [`PadView`].
pub fn cv_area(src: &PadView, w: usize, h: usize) -> Pixels {
    // OpenCV's scale is the reciprocal of dst/src, which can differ from src/dst in the
    // last bit.
    let sx = 1.0 / (w as f64 / src.w as f64);
    let sy = 1.0 / (h as f64 / src.h as f64);
    let (ix, iy) = (sx.round(), sy.round());
    if (sx - ix).abs() < f64::EPSILON && (sy - iy).abs() < f64::EPSILON {
        return cv_area_fast(src, w, h, ix as usize, iy as usize);
    }
    let cn = src.img.cn;
    let xtab = area_tab(src.w, w, sx);
    let ytab = area_tab(src.h, h, sy);
    // Taps are grouped by destination column, in order: accumulate per column in
    // registers, in OpenCV's order (0 + first tap + second tap ...), so the floats match.
    let mut ranges = vec![(0usize, 0usize); w];
    for (k, t) in xtab.iter().enumerate() {
        if ranges[t.di].1 == 0 {
            ranges[t.di].0 = k;
        }
        ranges[t.di].1 = k + 1;
    }
    let dw = w * cn;
    let mut out = Pixels::new(w, h, cn, 0);
    let mut row = vec![0u8; src.w * cn];
    let mut buf = vec![0f32; dw];
    let mut sum = vec![0f32; dw];
    let mut buf_row = usize::MAX;
    // Canvas rows of pure fill all give the same horizontal sums, and so do the output
    // columns whose taps all lie in the fill: compute those once.
    let fill_buf = {
        let fill_row = vec![src.fill; src.w * cn];
        hsum(&fill_row, &xtab, &ranges, cn, &mut buf);
        buf.clone()
    };
    let in_img = |x: usize| x >= src.left && x < src.left + src.img.w;
    let fill_cols: Vec<bool> = ranges
        .iter()
        .map(|&(k0, k1)| xtab[k0..k1].iter().all(|t| !in_img(t.si)))
        .collect();
    let is_fill_row = |y: usize| y < src.top || y >= src.top + src.img.h;
    let flush = |out: &mut Pixels, dy: usize, sum: &[f32]| {
        for (d, &s) in out.data[dy * dw..(dy + 1) * dw].iter_mut().zip(sum) {
            *d = s.round_ties_even().clamp(0.0, 255.0) as u8;
        }
    };
    let mut prev_dy = ytab[0].di;
    for t in &ytab {
        if t.si != buf_row {
            if is_fill_row(t.si) {
                buf.copy_from_slice(&fill_buf);
            } else {
                src.row_into(t.si, &mut row);
                hsum_cols(&row, &xtab, &ranges, cn, &mut buf, &fill_cols, &fill_buf);
            }
            buf_row = t.si;
        }
        if t.di != prev_dy {
            flush(&mut out, prev_dy, &sum);
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s = t.alpha * b;
            }
            prev_dy = t.di;
        } else {
            for (s, &b) in sum.iter_mut().zip(&buf) {
                *s += t.alpha * b;
            }
        }
    }
    flush(&mut out, prev_dy, &sum);
    out
}

/// Horizontal area sums of one canvas row into `buf`, per output column in tap order.
fn hsum(row: &[u8], xtab: &[AreaTap], ranges: &[(usize, usize)], cn: usize, buf: &mut [f32]) {
    let all = vec![false; ranges.len()];
    hsum_cols(row, xtab, ranges, cn, buf, &all, &[]);
}

/// [`hsum`], copying the columns flagged in `skip` from `pre` instead.
fn hsum_cols(
    row: &[u8],
    xtab: &[AreaTap],
    ranges: &[(usize, usize)],
    cn: usize,
    buf: &mut [f32],
    skip: &[bool],
    pre: &[f32],
) {
    for (dx, &(k0, k1)) in ranges.iter().enumerate() {
        let b = &mut buf[dx * cn..(dx + 1) * cn];
        if skip[dx] {
            b.copy_from_slice(&pre[dx * cn..(dx + 1) * cn]);
            continue;
        }
        if cn == 3 {
            let (mut a0, mut a1, mut a2) = (0f32, 0f32, 0f32);
            for x in &xtab[k0..k1] {
                let p = &row[x.si * 3..x.si * 3 + 3];
                a0 += p[0] as f32 * x.alpha;
                a1 += p[1] as f32 * x.alpha;
                a2 += p[2] as f32 * x.alpha;
            }
            b.copy_from_slice(&[a0, a1, a2]);
        } else {
            for (c, bc) in b.iter_mut().enumerate() {
                let mut a = 0f32;
                for x in &xtab[k0..k1] {
                    a += row[x.si * cn + c] as f32 * x.alpha;
                }
                *bc = a;
            }
        }
    }
}

/// OpenCV's integer-factor area path: a 2x2 box rounds with `(sum + 2) >> 2`, other
/// factors multiply by `1/area` in float and round half to even.
fn cv_area_fast(src: &PadView, w: usize, h: usize, kx: usize, ky: usize) -> Pixels {
    let cn = src.img.cn;
    let mut out = Pixels::new(w, h, cn, 0);
    let scale = 1.0f32 / (kx * ky) as f32;
    let mut rows = vec![0u8; src.w * cn * ky];
    let mut sums = vec![0u32; w * cn];
    for dy in 0..h {
        for (j, r) in rows.chunks_exact_mut(src.w * cn).enumerate() {
            src.row_into(dy * ky + j, r);
        }
        sums.fill(0);
        for r in rows.chunks_exact(src.w * cn) {
            for dx in 0..w {
                for i in 0..kx {
                    for c in 0..cn {
                        sums[dx * cn + c] += r[(dx * kx + i) * cn + c] as u32;
                    }
                }
            }
        }
        for (d, &sum) in out.data[dy * w * cn..(dy + 1) * w * cn]
            .iter_mut()
            .zip(&sums)
        {
            *d = if kx == 2 && ky == 2 {
                ((sum + 2) >> 2) as u8
            } else {
                (sum as f32 * scale).round_ties_even().clamp(0.0, 255.0) as u8
            };
        }
    }
    out
}

const CV_COEF_BITS: u32 = 11;

fn lanczos4_coeffs(x: f32) -> [f32; 8] {
    let mut c = [0f32; 8];
    if x < f32::EPSILON {
        c[3] = 1.0;
        return c;
    }
    const S45: f64 = std::f64::consts::FRAC_1_SQRT_2;
    const CS: [[f64; 2]; 8] = [
        [1.0, 0.0],
        [-S45, -S45],
        [0.0, 1.0],
        [S45, -S45],
        [-1.0, 0.0],
        [S45, S45],
        [0.0, -1.0],
        [-S45, S45],
    ];
    let pi4 = std::f64::consts::PI * 0.25;
    // `x + 3 - i` is float arithmetic in OpenCV, widened to double afterwards.
    let y0 = -((x + 3.0) as f64) * pi4;
    let (s0, c0) = (y0.sin(), y0.cos());
    let mut sum = 0f32;
    for i in 0..8 {
        let y = -((x + 3.0 - i as f32) as f64) * pi4;
        c[i] = ((CS[i][0] * s0 + CS[i][1] * c0) / (y * y)) as f32;
        sum += c[i];
    }
    let inv = 1.0 / sum;
    for v in c.iter_mut() {
        *v *= inv;
    }
    c
}

/// Source start index and fixed-point taps per output index, as OpenCV computes them.
fn lanczos4_tab(ssize: usize, dsize: usize) -> Vec<(i64, [i32; 8])> {
    let scale = 1.0 / (dsize as f64 / ssize as f64);
    (0..dsize)
        .map(|d| {
            let f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let s = f.floor();
            let c = lanczos4_coeffs(f - s);
            let k = c.map(|v| {
                (v * (1 << CV_COEF_BITS) as f32)
                    .round_ties_even()
                    .clamp(i16::MIN as f32, i16::MAX as f32) as i32
            });
            (s as i64, k)
        })
        .collect()
}

/// OpenCV `cv2.resize(src, (w, h), interpolation=INTER_LANCZOS4)` for 8-bit images.
pub fn cv_lanczos4(src: &Pixels, w: usize, h: usize) -> Pixels {
    let cn = src.cn;
    let xt = lanczos4_tab(src.w, w);
    let yt = lanczos4_tab(src.h, h);
    let clampi = |v: i64, n: usize| v.clamp(0, n as i64 - 1) as usize;
    // Horizontal pass on every source row (images here are small), in i32.
    let dw = w * cn;
    let mut hrows = vec![0i32; src.h * dw];
    for y in 0..src.h {
        let r = src.row(y);
        let d = &mut hrows[y * dw..(y + 1) * dw];
        for (dx, (sx, k)) in xt.iter().enumerate() {
            for c in 0..cn {
                let mut v = 0i32;
                for (j, &kv) in k.iter().enumerate() {
                    let x = clampi(sx - 3 + j as i64, src.w);
                    v += r[x * cn + c] as i32 * kv;
                }
                d[dx * cn + c] = v;
            }
        }
    }
    let mut out = Pixels::new(w, h, cn, 0);
    let shift = CV_COEF_BITS * 2;
    for (dy, (sy, k)) in yt.iter().enumerate() {
        let rows: [usize; 8] = std::array::from_fn(|j| clampi(sy - 3 + j as i64, src.h));
        for x in 0..dw {
            let mut s = 0i64;
            for j in 0..8 {
                s += hrows[rows[j] * dw + x] as i64 * k[j] as i64;
            }
            out.data[dy * dw + x] = ((s + (1 << (shift - 1))) >> shift).clamp(0, 255) as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_sizes_are_unchanged() {
        let mut p = Pixels::new(5, 4, 3, 0);
        for (i, v) in p.data.iter_mut().enumerate() {
            *v = (i * 37 % 251) as u8;
        }
        let r = pil_resize(&p, 5, 4, [0.0, 0.0, 5.0, 4.0], PilFilter::Lanczos);
        assert_eq!(r, p);
        assert_eq!(cv_lanczos4(&p, 5, 4), p);
    }

    #[test]
    fn area_of_flat_image_is_flat() {
        let p = Pixels::new(9, 7, 3, 200);
        assert!(
            cv_area(&PadView::of(&p), 4, 3)
                .data
                .iter()
                .all(|&v| v == 200)
        );
        assert!(
            cv_area(&PadView::of(&Pixels::new(8, 8, 1, 7)), 4, 4)
                .data
                .iter()
                .all(|&v| v == 7)
        );
    }

    #[test]
    fn two_by_two_fast_area_rounds_up_halves() {
        let p = Pixels {
            w: 2,
            h: 2,
            cn: 1,
            data: vec![0, 0, 1, 1],
        };
        // (0+0+1+1+2)>>2 = 1, where float rounding of 0.5 would give 0.
        assert_eq!(cv_area(&PadView::of(&p), 1, 1).data, vec![1]);
    }

    #[test]
    fn pil_edge_extrapolation_overshoots_like_bicubic() {
        // A zero-height box at the top: 1.125 * row0 - 0.125 * row1.
        let p = Pixels {
            w: 1,
            h: 3,
            cn: 1,
            data: vec![100, 180, 0],
        };
        let r = pil_resize(&p, 1, 2, [0.0, 0.0, 1.0, 0.0], PilFilter::Bicubic);
        assert_eq!(r.data, vec![90, 90]);
    }
}
