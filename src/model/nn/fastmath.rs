//! Branch-free f32 helpers that LLVM vectorises (the fused CPU kernels' inner loops), and
//! the AVX2 + FMA dispatch those kernels share.

/// Whether this CPU runs the `avx2,fma` builds of the kernels (the binary's baseline is
/// SSE2).
#[inline]
pub(crate) fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sum in 8 independent lanes (vectorisable; the order differs from a serial sum only by
/// rounding).
#[inline(always)]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `sum((x - m)^2)` in 8 lanes.
#[inline(always)]
pub(crate) fn sum_sq_dev(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().map(|v| (v - m) * (v - m)).sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += (v - m) * (v - m);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// `sum(a * (x - m))` in 8 lanes.
#[inline(always)]
pub(crate) fn dot_centered(a: &[f32], x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, xc) = (a.chunks_exact(8), x.chunks_exact(8));
    let rest: f32 = ac
        .remainder()
        .iter()
        .zip(xc.remainder())
        .map(|(g, v)| g * (v - m))
        .sum();
    for (a8, x8) in ac.zip(xc) {
        for ((s, g), v) in acc.iter_mut().zip(a8).zip(x8) {
            *s += g * (v - m);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Long reductions: `f` over blocks of 1024 elements (f32 lanes), blocks added in f64, so
/// a 262,144-element VAE row keeps f32-sum accuracy per block only.
#[inline(always)]
pub(crate) fn blocked(x: &[f32], f: impl Fn(&[f32]) -> f32) -> f64 {
    x.chunks(1024).map(|c| f(c) as f64).sum()
}

/// `blocked` over two slices of the same length.
#[inline(always)]
pub(crate) fn blocked2(a: &[f32], b: &[f32], f: impl Fn(&[f32], &[f32]) -> f32) -> f64 {
    a.chunks(1024)
        .zip(b.chunks(1024))
        .map(|(x, y)| f(x, y) as f64)
        .sum()
}

/// [`exp`]'s input range: below, ~1e-38 instead of 0; above, 1.65e38 instead of overflow.
pub(crate) const EXP_RANGE: (f32, f32) = (-87.0, 88.0);
/// ln 2 in two parts for the Cody-Waite reduction (the high part exact in few bits).
pub(crate) const LN2_PARTS: (f32, f32) = (0.693_359_4, -2.121_944_4e-4);
/// The degree-6 polynomial for `e^r` (|r| <= ln2/2): Horner coefficients from the highest
/// down to the `r^2` term's (`e^r ~ p(r) r^2 + r + 1`).
pub(crate) const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_2e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    1.666_666_5e-1,
    0.5,
];
/// 2^23 + 127: added to `n`, it puts `n + 127` in the low mantissa bits of an exact float.
pub(crate) const EXP_BIAS: f32 = 8_388_735.0;

/// `e^x`, branch-free so loops vectorise: Cody-Waite range reduction `x = n ln2 + r` and
/// the classic degree-6 polynomial for `e^r` on |r| <= ln2/2 (about 1 ulp), times `2^n`
/// built in the exponent bits. Inputs are clamped to [`EXP_RANGE`]. The attention kernels'
/// SIMD versions use the same constants.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_RANGE.0, EXP_RANGE.1);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_PARTS.0 - n * LN2_PARTS.1;
    let mut p = EXP_POLY[0];
    for c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let e = p * r * r + r + 1.0;
    // 2^n from the exponent bits. n + 127 is in [1, 254] (x is clamped); adding 2^23
    // puts it in the low mantissa bits of an exact float, and the shift moves it into the
    // exponent field (the float's own exponent bits shift out). A float-to-int `as` cast
    // here would saturate and check NaN per lane, which LLVM leaves scalar.
    e * f32::from_bits((n + EXP_BIAS).to_bits() << 23)
}

/// Maximum in 8 lanes (vectorisable; NaNs are skipped, -inf for an empty slice).
#[inline(always)]
pub(crate) fn max(x: &[f32]) -> f32 {
    let pick = |a: f32, b: f32| if b > a { b } else { a };
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |a, &b| pick(a, b));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = pick(*a, v);
        }
    }
    acc.iter().fold(rest, |a, &b| pick(a, b))
}

/// `sigmoid(x) = 1 / (1 + e^-x)`.
#[inline(always)]
pub(crate) fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `erf(x)` by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, the formula
/// PyTorch's vectorised CPU `erf` uses), branch-free.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let p = 1.061_405_4;
    let p = p * t - 1.453_152_1;
    let p = p * t + 1.421_413_7;
    let p = p * t - 0.284_496_74;
    let p = p * t + 0.254_829_6;
    let r = 1.0 - p * t * exp(-a * a);
    r.copysign(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial exp against the standard library over the softmax range.
    #[test]
    fn exp_is_within_two_ulp_of_std() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 95.0 * i as f32 / 200_000.0;
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a - b).abs() / b);
        }
        assert!(worst < 2.5e-7, "max relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(-1000.0) < 1e-37);
    }

    /// The 8-lane max agrees with a scalar fold at every length and skips NaNs.
    #[test]
    fn max_matches_a_fold_and_skips_nan() {
        for n in 0..40 {
            let x: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.3).collect();
            let want = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            assert_eq!(max(&x), want, "length {n}");
        }
        let mut x = vec![1.0f32; 19];
        x[3] = f32::NAN;
        x[17] = 4.0;
        assert_eq!(max(&x), 4.0);
    }

    /// erf against a high-precision series (f64 Taylor / continued use of std exp).
    #[test]
    fn erf_is_within_1e6_of_f64() {
        // erf by its Maclaurin series in f64 (converges fast for |x| <= 3).
        let erf64 = |x: f64| -> f64 {
            let (mut term, mut s, mut n) = (x, x, 0.0);
            while term.abs() > 1e-17 * s.abs().max(1e-300) {
                n += 1.0;
                term *= -x * x / n;
                s += term / (2.0 * n + 1.0);
                if n > 200.0 {
                    break;
                }
            }
            s * 2.0 / std::f64::consts::PI.sqrt()
        };
        let mut worst = 0f64;
        for i in 0..=6000 {
            let x = -3.0 + 6.0 * i as f64 / 6000.0;
            worst = worst.max((erf(x as f32) as f64 - erf64(x)).abs());
        }
        assert!(worst < 1e-6, "max abs error {worst}");
        assert!(erf(0.0).abs() < 1e-6);
        assert_eq!(erf(10.0), 1.0);
        assert_eq!(erf(-10.0), -1.0);
        assert!((sigmoid(0.0) - 0.5).abs() < 1e-7);
    }

    #[test]
    fn reductions_match_serial_f64() {
        let x: Vec<f32> = (0..5003)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let y: Vec<f32> = (0..5003)
            .map(|i| ((i * 13 % 29) as f32 - 14.0) / 3.0)
            .collect();
        let s64: f64 = x.iter().map(|&v| v as f64).sum();
        let d64: f64 = x.iter().zip(&y).map(|(&a, &b)| a as f64 * b as f64).sum();
        let m = (s64 / x.len() as f64) as f32;
        let v64: f64 = x.iter().map(|&v| (v as f64 - m as f64).powi(2)).sum();
        assert!((blocked(&x, sum) - s64).abs() < 1e-3);
        assert!((blocked2(&y, &x, |a, b| dot_centered(a, b, 0.0)) - d64).abs() < 1e-2);
        assert!((blocked(&x, |c| sum_sq_dev(c, m)) - v64).abs() / v64 < 1e-6);
    }
}
