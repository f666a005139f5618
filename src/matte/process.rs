//! The image side of matting, as rembg does it: the model input (Pillow
//! `convert("RGB")` + LANCZOS resize, divide by the maximum, mean/std, NCHW), the mask
//! from the model output (optional sigmoid, min-max, optional clip, truncation to
//! 8 bits, LANCZOS back to the source size), and the cut-out composited onto the
//! background (Pillow `putalpha` + `Image.alpha_composite`, integer arithmetic).

use super::manifest::{Activation, Input, Output};
use crate::tag::resample::{PilFilter, Pixels, pil_resize};
use image::{DynamicImage, GrayImage, RgbImage};

/// A decoded source split the way rembg sees it: RGB with alpha dropped (Pillow
/// `convert("RGB")`; grey replicated), and the alpha channel when the source has one.
pub struct Source {
    pub rgb: Pixels,
    pub alpha: Option<Vec<u8>>,
}

impl Source {
    pub fn new(img: DynamicImage) -> Source {
        if img.color().has_alpha() {
            let rgba = img.into_rgba8();
            let (w, h) = (rgba.width() as usize, rgba.height() as usize);
            let raw = rgba.into_raw();
            let mut rgb = Vec::with_capacity(w * h * 3);
            let mut alpha = Vec::with_capacity(w * h);
            for p in raw.chunks_exact(4) {
                rgb.extend_from_slice(&p[..3]);
                alpha.push(p[3]);
            }
            let rgb = Pixels {
                w,
                h,
                cn: 3,
                data: rgb,
            };
            Source {
                rgb,
                alpha: Some(alpha),
            }
        } else {
            let rgb = img.into_rgb8();
            let (w, h) = (rgb.width() as usize, rgb.height() as usize);
            Source {
                rgb: Pixels {
                    w,
                    h,
                    cn: 3,
                    data: rgb.into_raw(),
                },
                alpha: None,
            }
        }
    }

    pub fn dims(&self) -> (u32, u32) {
        (self.rgb.w as u32, self.rgb.h as u32)
    }
}

/// The 8-bit image the model sees: the source stretched to `size` x `size` with
/// Pillow LANCZOS (rembg does not keep the aspect ratio).
pub fn model_image(rgb: &Pixels, size: usize) -> Pixels {
    pil_resize(
        rgb,
        size,
        size,
        [0.0, 0.0, rgb.w as f64, rgb.h as f64],
        PilFilter::Lanczos,
    )
}

/// rembg `normalize`: `x / max(x.max(), 1e-6)` (when the manifest says so), then
/// `(x - mean) / std` per channel in float64, stored as float32 NCHW into `out`.
pub fn write_tensor(p: &Pixels, input: &Input, out: &mut [f32]) {
    let n = p.w * p.h;
    debug_assert_eq!(out.len(), n * 3);
    let max = if input.divide_by_max {
        (p.data.iter().copied().max().unwrap_or(0) as f64).max(1e-6)
    } else {
        1.0
    };
    for (i, px) in p.data.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let v = px[c] as f64 / max;
            out[c * n + i] = ((v - input.mean[c]) / input.std[c]) as f32;
        }
    }
}

/// The model-size mask from one image's output map (`w * h` floats), as rembg's
/// `predict` makes it. A constant map (nothing found; rembg would divide by zero)
/// is an error.
pub fn small_mask(raw: &[f32], w: usize, h: usize, out: &Output) -> Result<Pixels, String> {
    let act: Vec<f32> = match out.activation {
        Activation::None => raw.to_vec(),
        Activation::Sigmoid => raw.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect(),
    };
    let (mut mi, mut ma) = (f32::INFINITY, f32::NEG_INFINITY);
    for &v in &act {
        if !v.is_finite() {
            return Err("the matting model returned NaN or infinite values".into());
        }
        mi = mi.min(v);
        ma = ma.max(v);
    }
    if act.is_empty() || ma <= mi {
        return Err("the matting model returned a constant mask (no subject found)".into());
    }
    let d = ma - mi;
    let data = act
        .iter()
        .map(|&v| {
            let mut p = (v - mi) / d;
            if out.clip {
                p = p.clamp(0.0, 1.0);
            }
            // numpy astype("uint8") truncates; p is within 0..1 after min-max.
            (p * 255.0) as u8
        })
        .collect();
    Ok(Pixels { w, h, cn: 1, data })
}

/// The mask at the source size (Pillow LANCZOS, as rembg resizes it back).
pub fn full_mask(small: &Pixels, w: u32, h: u32) -> Vec<u8> {
    let (w, h) = (w as usize, h as usize);
    if (small.w, small.h) == (w, h) {
        return small.data.clone();
    }
    pil_resize(
        small,
        w,
        h,
        [0.0, 0.0, small.w as f64, small.h as f64],
        PilFilter::Lanczos,
    )
    .data
}

/// Composites the source onto `bg` with the mask as its alpha; a source alpha is
/// kept (multiplied with the mask as Pillow `ImageChops.multiply` does). Returns the
/// RGB result and the alpha that was used (the mask `--save-masks` writes).
pub fn composite(src: &Source, mask: Vec<u8>, bg: [u8; 3]) -> (RgbImage, GrayImage) {
    let (w, h) = src.dims();
    let alpha: Vec<u8> = match &src.alpha {
        Some(a) => a
            .iter()
            .zip(&mask)
            .map(|(&a, &m)| (a as u32 * m as u32 / 255) as u8)
            .collect(),
        None => mask,
    };
    let mut out = Vec::with_capacity(alpha.len() * 3);
    for (px, &a) in src.rgb.data.chunks_exact(3).zip(&alpha) {
        for c in 0..3 {
            out.push(alpha_over(px[c], a, bg[c]));
        }
    }
    (
        RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions"),
        GrayImage::from_raw(w, h, alpha).expect("buffer size matches dimensions"),
    )
}

/// One channel of Pillow's `ImagingAlphaComposite` with an opaque destination.
#[inline]
fn alpha_over(src: u8, src_a: u8, dst: u8) -> u8 {
    const PRECISION_BITS: u32 = 7;
    if src_a == 0 {
        return dst;
    }
    let (sa, da) = (src_a as u32, 255u32);
    let blend = da * (255 - sa);
    let outa255 = sa * 255 + blend;
    let coef1 = sa * 255 * 255 * (1 << PRECISION_BITS) / outa255;
    let coef2 = 255 * (1 << PRECISION_BITS) - coef1;
    let tmp = src as u32 * coef1 + dst as u32 * coef2 + (0x80 << PRECISION_BITS);
    ((((tmp >> 8) + tmp) >> 8) >> PRECISION_BITS) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matte::manifest::{Family, manifest};

    #[test]
    fn alpha_over_limits() {
        for c in [0u8, 17, 255] {
            assert_eq!(alpha_over(c, 255, 99), c);
            assert_eq!(alpha_over(c, 0, 99), 99);
        }
        // (200 * 128 + 0 * 127) / 255 = 100.4 -> 100
        assert_eq!(alpha_over(200, 128, 0), 100);
    }

    #[test]
    fn small_mask_min_max_and_truncation() {
        let out = manifest(Family::U2net).output;
        let m = small_mask(&[0.25, 0.5, 0.75, 0.6], 2, 2, &out).unwrap();
        // (0.6 - 0.25) / 0.5 * 255 = 178.5 -> 178 (truncated)
        assert_eq!(m.data, vec![0, 127, 255, 178]);
        assert!(small_mask(&[0.3; 4], 2, 2, &out).is_err());
        assert!(small_mask(&[0.3, f32::NAN, 0.1, 0.2], 2, 2, &out).is_err());
        let bo = manifest(Family::Birefnet).output;
        let m = small_mask(&[-10.0, 0.0, 10.0, 0.0], 2, 2, &bo).unwrap();
        assert_eq!(m.data, vec![0, 127, 255, 127]);
    }

    #[test]
    fn tensor_divides_by_max_then_mean_std() {
        let p = Pixels {
            w: 2,
            h: 1,
            cn: 3,
            data: vec![100, 0, 50, 200, 10, 0],
        };
        let inp = manifest(Family::U2net).input;
        let mut t = vec![0f32; 6];
        write_tensor(&p, &inp, &mut t);
        assert_eq!(t[0], ((0.5 - 0.485) / 0.229) as f32);
        assert_eq!(t[1], ((1.0 - 0.485) / 0.229) as f32);
        assert_eq!(t[2], ((0.0 - 0.456) / 0.224) as f32);
        assert_eq!(t[5], ((0.0 - 0.406) / 0.225) as f32);
    }

    #[test]
    fn source_alpha_is_multiplied() {
        let img = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 255, 40, 50, 60, 100]).unwrap();
        let src = Source::new(DynamicImage::ImageRgba8(img));
        assert_eq!(src.rgb.data, vec![10, 20, 30, 40, 50, 60]);
        let (rgb, a) = composite(&src, vec![128, 255], [255, 255, 255]);
        // 255 * 128 / 255 = 128; 100 * 255 / 255 = 100
        assert_eq!(a.as_raw(), &vec![128, 100]);
        assert_eq!(rgb.get_pixel(0, 0).0[0], alpha_over(10, 128, 255));
    }
}
