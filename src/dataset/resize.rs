//! Resampling with fast_image_resize: crop a box of the source (in source pixel
//! coordinates, sub-pixel allowed) and scale it to the output size in one pass.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// Resampling filter names, as users know them from PIL and webui.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Filter {
    #[default]
    Lanczos3,
    /// Catmull-Rom bicubic.
    Bicubic,
    Mitchell,
    Bilinear,
    Hamming,
    /// Area averaging (box filter).
    Area,
    Nearest,
}

impl Filter {
    fn alg(self) -> ResizeAlg {
        match self {
            Filter::Lanczos3 => ResizeAlg::Convolution(FilterType::Lanczos3),
            Filter::Bicubic => ResizeAlg::Convolution(FilterType::CatmullRom),
            Filter::Mitchell => ResizeAlg::Convolution(FilterType::Mitchell),
            Filter::Bilinear => ResizeAlg::Convolution(FilterType::Bilinear),
            Filter::Hamming => ResizeAlg::Convolution(FilterType::Hamming),
            Filter::Area => ResizeAlg::Convolution(FilterType::Box),
            Filter::Nearest => ResizeAlg::Nearest,
        }
    }
}

/// A rectangle in source pixel coordinates.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Rect {
    pub x: f64,
    pub y: f64,
    pub w: f64,
    pub h: f64,
}

impl Rect {
    pub fn full(w: u32, h: u32) -> Rect {
        Rect {
            x: 0.0,
            y: 0.0,
            w: w as f64,
            h: h as f64,
        }
    }
}

/// Scales the `crop` region of `src` to `out_w` x `out_h`.
pub fn resize_region(
    src: &RgbImage,
    crop: Rect,
    out_w: u32,
    out_h: u32,
    filter: Filter,
) -> RgbImage {
    let full = Rect::full(src.width(), src.height());
    // Clamp to the image: callers compute boxes in floating point.
    let x = crop.x.clamp(0.0, full.w - 1.0);
    let y = crop.y.clamp(0.0, full.h - 1.0);
    let crop = Rect {
        x,
        y,
        w: crop.w.clamp(1.0, full.w - x),
        h: crop.h.clamp(1.0, full.h - y),
    };
    if crop == full && (out_w, out_h) == src.dimensions() {
        return src.clone();
    }
    let view = ImageRef::new(src.width(), src.height(), src.as_raw(), PixelType::U8x3)
        .expect("RgbImage buffer matches its size");
    let mut dst = Image::new(out_w, out_h, PixelType::U8x3);
    let opts = ResizeOptions::new()
        .resize_alg(filter.alg())
        .crop(crop.x, crop.y, crop.w, crop.h);
    Resizer::new()
        .resize(&view, &mut dst, &opts)
        .expect("source and destination have the same pixel type");
    RgbImage::from_raw(out_w, out_h, dst.into_vec()).expect("buffer size matches dimensions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_then_scale_keeps_colours_of_region() {
        // Left half red, right half blue; cropping the right half gives blue only.
        let src = RgbImage::from_fn(200, 100, |x, _| {
            if x < 100 {
                [255, 0, 0].into()
            } else {
                [0, 0, 255].into()
            }
        });
        let out = resize_region(
            &src,
            Rect {
                x: 110.0,
                y: 0.0,
                w: 80.0,
                h: 100.0,
            },
            64,
            64,
            Filter::Lanczos3,
        );
        assert_eq!(out.dimensions(), (64, 64));
        assert!(out.pixels().all(|p| p.0 == [0, 0, 255]));
    }
}
