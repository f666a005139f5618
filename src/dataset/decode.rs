//! Decoding any supported image file into upright 8-bit RGB.
//!
//! EXIF orientation is applied; alpha is composited onto a background colour;
//! greyscale, 16-bit, float, palette and CMYK sources all become 8-bit RGB. The
//! format is sniffed from the content, so a PNG named `.jpg` still decodes.

use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
use std::io::Cursor;
use std::path::Path;

/// Largest image accepted, in pixels (a 40000 x 10000 panorama fits).
pub const MAX_PIXELS: u64 = 400_000_000;

/// Why a file could not be decoded. The messages are what users see after `file: `.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty file")]
    Empty,
    #[error("not a recognised image format")]
    UnknownFormat,
    #[error("image is {w}x{h}, larger than the {MAX_PIXELS} pixel limit")]
    TooLarge { w: u32, h: u32 },
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
}

/// An upright RGB image and facts about its source.
#[derive(Debug)]
pub struct Decoded {
    pub image: RgbImage,
    /// EXIF orientation tag value (1 = as stored) that was applied.
    pub orientation: u8,
    /// Whether the source carried an alpha channel that was composited.
    pub had_alpha: bool,
}

/// A background colour for alpha compositing and letterboxing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Rgb8(pub [u8; 3]);

impl Rgb8 {
    pub const WHITE: Rgb8 = Rgb8([255, 255, 255]);
}

impl std::str::FromStr for Rgb8 {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        let named = match t.as_str() {
            "white" => Some([255, 255, 255]),
            "black" => Some([0, 0, 0]),
            "gray" | "grey" => Some([128, 128, 128]),
            _ => None,
        };
        if let Some(c) = named {
            return Ok(Rgb8(c));
        }
        let hex = t.strip_prefix('#').unwrap_or(&t);
        if hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
            let v = u32::from_str_radix(hex, 16).map_err(|e| e.to_string())?;
            return Ok(Rgb8([(v >> 16) as u8, (v >> 8) as u8, v as u8]));
        }
        let parts: Vec<_> = t.split(',').map(|p| p.trim().parse::<u8>()).collect();
        if parts.len() == 3 && parts.iter().all(|p| p.is_ok()) {
            let p: Vec<u8> = parts.into_iter().map(|p| p.unwrap_or(0)).collect();
            return Ok(Rgb8([p[0], p[1], p[2]]));
        }
        Err(format!(
            "'{s}' is not a colour: use white, black, grey, #rrggbb or r,g,b"
        ))
    }
}

impl TryFrom<String> for Rgb8 {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Rgb8> for String {
    fn from(c: Rgb8) -> String {
        format!("#{:02x}{:02x}{:02x}", c.0[0], c.0[1], c.0[2])
    }
}

impl std::fmt::Display for Rgb8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from(*self))
    }
}

/// Reads the upright (orientation-applied) size without decoding pixels.
pub fn probe_size(bytes: &[u8]) -> Result<(u32, u32), DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let reader = reader(bytes)?;
    let mut dec = reader.into_decoder().map_err(classify)?;
    let (w, h) = dec.dimensions();
    let o = dec.orientation().map(|o| o.to_exif()).unwrap_or(1);
    Ok(if (5..=8).contains(&o) { (h, w) } else { (w, h) })
}

/// Decodes a file. See [`decode_bytes`].
pub fn decode_file(path: &Path, background: Rgb8) -> Result<Decoded, DecodeError> {
    let bytes = std::fs::read(path)?;
    decode_bytes(&bytes, background)
}

/// Decodes encoded image bytes into upright 8-bit RGB.
pub fn decode_bytes(bytes: &[u8], background: Rgb8) -> Result<Decoded, DecodeError> {
    let DecodedAny { image, orientation } = decode_bytes_any(bytes)?;
    let had_alpha = image.color().has_alpha();
    Ok(Decoded {
        image: to_rgb8(image, background),
        orientation,
        had_alpha,
    })
}

/// Like [`decode_bytes`], but a JPEG may be decoded at 1/2, 1/4 or 1/8 of its size (at
/// most `1/max_reduction`) by scaling in the DCT domain, as PIL's `draft` mode does.
/// Much faster for photos that are scaled down a lot anyway; callers keep a margin
/// (sdkit keeps at least 2x of Lanczos downscaling after it). Anything this path does
/// not handle (CMYK, 16-bit, errors) goes through the full decoder.
pub fn decode_bytes_reduced(
    bytes: &[u8],
    background: Rgb8,
    max_reduction: u32,
) -> Result<Decoded, DecodeError> {
    if max_reduction >= 2 && bytes.starts_with(&[0xFF, 0xD8]) {
        if let Some(d) = decode_jpeg_reduced(bytes, max_reduction.min(8)) {
            return Ok(d);
        }
    }
    decode_bytes(bytes, background)
}

fn decode_jpeg_reduced(bytes: &[u8], reduction: u32) -> Option<Decoded> {
    let mut dec = image::codecs::jpeg::JpegDecoder::new(Cursor::new(bytes)).ok()?;
    let (w, h) = dec.dimensions();
    if (w as u64) * (h as u64) > MAX_PIXELS {
        return None;
    }
    let orientation = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    // libjpeg scales by 1/2, 1/4 or 1/8 here (what PIL's draft() picks).
    let scale = [8u32, 4, 2].into_iter().find(|&s| s <= reduction)?;
    let super::jpeg::Jpeg::Image(mut img) = super::jpeg::decode(bytes, (8 / scale) as u8).ok()?
    else {
        return None;
    };
    img.apply_orientation(orientation);
    Some(Decoded {
        image: img.into_rgb8(),
        orientation: orientation.to_exif(),
        had_alpha: false,
    })
}

/// An upright image in its decoded colour type, alpha kept as stored (not composited).
#[derive(Debug)]
pub struct DecodedAny {
    pub image: DynamicImage,
    /// EXIF orientation tag value (1 = as stored) that was applied.
    pub orientation: u8,
}

/// Decodes a file keeping its colour type and alpha. See [`decode_bytes_any`].
pub fn decode_file_any(path: &Path) -> Result<DecodedAny, DecodeError> {
    let bytes = std::fs::read(path)?;
    decode_bytes_any(&bytes)
}

/// Decodes encoded image bytes into an upright image without converting or
/// compositing, for callers that must treat alpha exactly as a reference tool does
/// (drop it, or blend it in a particular way).
pub fn decode_bytes_any(bytes: &[u8]) -> Result<DecodedAny, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    let r = reader(bytes)?;
    let is_jpeg = r.format() == Some(image::ImageFormat::Jpeg);
    let mut dec = r.into_decoder().map_err(classify)?;
    let (w, h) = dec.dimensions();
    if w as u64 * h as u64 > MAX_PIXELS {
        return Err(DecodeError::TooLarge { w, h });
    }
    let orientation = dec
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    // JPEG pixels come from libjpeg-turbo, as in Pillow, so taggers see the same input
    // as the Python reference; colour models it leaves alone fall through.
    let jpeg = if is_jpeg {
        match super::jpeg::decode(bytes, 8) {
            Ok(super::jpeg::Jpeg::Image(img)) => Some(img),
            Ok(super::jpeg::Jpeg::Unsupported) => None,
            Err(e) => return Err(DecodeError::Corrupt(e)),
        }
    } else {
        None
    };
    let mut image = match jpeg {
        Some(img) => img,
        None => DynamicImage::from_decoder(dec).map_err(classify)?,
    };
    image.apply_orientation(orientation);
    Ok(DecodedAny {
        image,
        orientation: orientation.to_exif(),
    })
}

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, DecodeError> {
    let mut r = ImageReader::new(Cursor::new(bytes)).with_guessed_format()?;
    if r.format().is_none() {
        return Err(DecodeError::UnknownFormat);
    }
    let mut limits = Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    r.limits(limits);
    Ok(r)
}

fn classify(e: image::ImageError) -> DecodeError {
    match e {
        image::ImageError::IoError(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            DecodeError::Corrupt("unexpected end of file".into())
        }
        image::ImageError::IoError(io) => DecodeError::Io(io),
        image::ImageError::Unsupported(u) => DecodeError::Corrupt(u.to_string()),
        other => DecodeError::Corrupt(other.to_string()),
    }
}

/// Converts any colour type to 8-bit RGB, compositing alpha onto `bg`.
pub fn to_rgb8(img: DynamicImage, bg: Rgb8) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(i) => i,
        DynamicImage::ImageRgba8(i) => composite(i.width(), i.height(), i.as_raw(), 255.0, bg),
        DynamicImage::ImageLumaA8(_) => {
            let i = img.into_rgba8();
            composite(i.width(), i.height(), i.as_raw(), 255.0, bg)
        }
        DynamicImage::ImageRgba16(i) => composite(i.width(), i.height(), i.as_raw(), 65535.0, bg),
        DynamicImage::ImageLumaA16(_) => {
            let i = img.into_rgba16();
            composite(i.width(), i.height(), i.as_raw(), 65535.0, bg)
        }
        DynamicImage::ImageRgba32F(i) => composite(i.width(), i.height(), i.as_raw(), 1.0, bg),
        other => other.into_rgb8(),
    }
}

/// Source channel values that can be read as f32.
trait Channel: Copy {
    fn f(self) -> f32;
}
impl Channel for u8 {
    fn f(self) -> f32 {
        self as f32
    }
}
impl Channel for u16 {
    fn f(self) -> f32 {
        self as f32
    }
}
impl Channel for f32 {
    fn f(self) -> f32 {
        self
    }
}

/// `out = src * a + bg * (1 - a)` per channel, in the source's precision, rounded.
fn composite<T: Channel>(w: u32, h: u32, rgba: &[T], max: f32, bg: Rgb8) -> RgbImage {
    let mut out = Vec::with_capacity(w as usize * h as usize * 3);
    let bgf = [bg.0[0] as f32, bg.0[1] as f32, bg.0[2] as f32];
    let to8 = 255.0 / max;
    for px in rgba.chunks_exact(4) {
        let a = (px[3].f() / max).clamp(0.0, 1.0);
        for c in 0..3 {
            let v = px[c].f() * to8 * a + bgf[c] * (1.0 - a);
            out.push(v.round().clamp(0.0, 255.0) as u8);
        }
    }
    RgbImage::from_raw(w, h, out).expect("buffer size matches dimensions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_colours() {
        assert_eq!("white".parse::<Rgb8>().unwrap(), Rgb8([255, 255, 255]));
        assert_eq!("#102030".parse::<Rgb8>().unwrap(), Rgb8([16, 32, 48]));
        assert_eq!("1, 2,3".parse::<Rgb8>().unwrap(), Rgb8([1, 2, 3]));
        assert!("blue-ish".parse::<Rgb8>().is_err());
    }

    #[test]
    fn composites_half_alpha() {
        let px = [200u8, 0, 100, 128];
        let out = composite(1, 1, &px, 255.0, Rgb8([0, 0, 0]));
        assert_eq!(out.as_raw(), &[100, 0, 50]);
        let out = composite(1, 1, &[0u16, 0, 0, 0], 65535.0, Rgb8::WHITE);
        assert_eq!(out.as_raw(), &[255, 255, 255]);
    }

    #[test]
    fn reduced_jpeg_decode_is_close_to_full_decode_scaled() {
        let img = RgbImage::from_fn(640, 480, |x, y| {
            image::Rgb([(x / 3) as u8, (y / 2) as u8, 128])
        });
        let mut buf = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95)
            .encode_image(&img)
            .unwrap();
        let small = decode_bytes_reduced(&buf, Rgb8::WHITE, 4).unwrap().image;
        assert_eq!(small.dimensions(), (160, 120));
        let full = decode_bytes(&buf, Rgb8::WHITE).unwrap().image;
        let full_small = crate::dataset::resize::resize_region(
            &full,
            crate::dataset::resize::Rect::full(640, 480),
            160,
            120,
            crate::dataset::resize::Filter::Area,
        );
        let diff: f64 = small
            .as_raw()
            .iter()
            .zip(full_small.as_raw())
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / small.as_raw().len() as f64;
        assert!(diff < 2.0, "mean abs difference {diff}");
    }

    #[test]
    fn empty_and_garbage_are_errors() {
        assert!(matches!(
            decode_bytes(&[], Rgb8::WHITE),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            decode_bytes(b"hello world, not an image", Rgb8::WHITE),
            Err(DecodeError::UnknownFormat)
        ));
    }
}
