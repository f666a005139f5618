//! Output image encoding: PNG (fast deflate), JPEG with quality, lossless WebP.

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, RgbImage};
use std::io::Write;

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
pub enum Format {
    #[default]
    Png,
    Jpg,
    /// Lossless WebP.
    Webp,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Jpg => "jpg",
            Format::Webp => "webp",
        }
    }
}

/// Encodes `img` into `w`. `quality` (1-100) applies to JPEG.
pub fn encode(
    img: &RgbImage,
    format: Format,
    quality: u8,
    w: &mut dyn Write,
) -> std::io::Result<()> {
    let (width, height) = img.dimensions();
    let r = match format {
        Format::Png => PngEncoder::new_with_quality(w, CompressionType::Fast, FilterType::Adaptive)
            .write_image(img.as_raw(), width, height, ExtendedColorType::Rgb8),
        Format::Jpg => JpegEncoder::new_with_quality(w, quality.clamp(1, 100)).write_image(
            img.as_raw(),
            width,
            height,
            ExtendedColorType::Rgb8,
        ),
        Format::Webp => WebPEncoder::new_lossless(w).write_image(
            img.as_raw(),
            width,
            height,
            ExtendedColorType::Rgb8,
        ),
    };
    r.map_err(|e| match e {
        image::ImageError::IoError(io) => io,
        other => std::io::Error::other(other.to_string()),
    })
}
