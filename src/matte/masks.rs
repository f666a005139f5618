//! `--save-masks`: each output's mask, cropped, scaled, padded and flipped exactly as
//! the output image, written as an 8-bit greyscale PNG (white = subject).
//!
//! Layout (kohya masked loss): sd-scripts reads masks from a `conditioning_data_dir`
//! separate from the image folder, one image per training image with the same stem,
//! and uses its red channel (white trains, black is ignored, grey weighs in between).
//! The mask of `OUT/img/10_ron/a-1f2e3d.png` is `OUT/masks/img/10_ron/a-1f2e3d.png`,
//! so `conditioning_data_dir = "OUT/masks/img/10_ron"` pairs every image with its mask.

use crate::dataset::plan::OutputPlan;
use crate::dataset::resize::{self, Filter};
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, GrayImage, ImageEncoder, RgbImage};
use std::path::Path;

/// Top folder of the masks inside the output folder.
pub const DIR: &str = "masks";

/// The mask path (relative to the output folder) of an output image path.
pub fn mask_path(output_rel: &str) -> String {
    let stem = match output_rel.rsplit_once('.') {
        Some((s, ext)) if !ext.contains('/') => s,
        _ => output_rel,
    };
    format!("{DIR}/{stem}.png")
}

/// The source-size `alpha` taken through the same crop, scale, letterbox (0 outside
/// the picture) and flip as the output image of plan `p`.
pub fn place(alpha: &GrayImage, p: &OutputPlan, filter: Filter) -> GrayImage {
    // The resizer works on RGB; grey replicated in three channels scales identically.
    let rgb = RgbImage::from_fn(alpha.width(), alpha.height(), |x, y| {
        let v = alpha.get_pixel(x, y).0[0];
        image::Rgb([v, v, v])
    });
    let scaled = resize::resize_region(&rgb, p.crop, p.scaled.0, p.scaled.1, filter);
    let grey = GrayImage::from_fn(scaled.width(), scaled.height(), |x, y| {
        image::Luma([scaled.get_pixel(x, y).0[0]])
    });
    let mut canvas = if p.size != p.scaled {
        let mut c = GrayImage::new(p.size.0, p.size.1);
        image::imageops::replace(&mut c, &grey, p.offset.0 as i64, p.offset.1 as i64);
        c
    } else {
        grey
    };
    if p.flip {
        image::imageops::flip_horizontal_in_place(&mut canvas);
    }
    canvas
}

/// Writes `mask` as a greyscale PNG, atomically, creating its folder.
pub fn write(path: &Path, mask: &GrayImage) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        crate::util::atomic::create_dir_all(dir)?;
    }
    crate::util::write_atomic_with(path, |w| {
        PngEncoder::new_with_quality(w, CompressionType::Fast, FilterType::Adaptive)
            .write_image(
                mask.as_raw(),
                mask.width(),
                mask.height(),
                ExtendedColorType::L8,
            )
            .map_err(std::io::Error::other)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_paths_mirror_outputs() {
        assert_eq!(
            mask_path("img/10_ron/a-1f2e3d.jpg"),
            "masks/img/10_ron/a-1f2e3d.png"
        );
        assert_eq!(mask_path("a-000001.png"), "masks/a-000001.png");
    }
}
