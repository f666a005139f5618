//! Perceptual hash (pHash) for near-duplicate detection, computed the way the Python
//! `imagehash` package's `phash` does (the hash most dataset tools and users compare
//! against): greyscale (PIL "L" weights), Lanczos down to 32x32, 2-D DCT-II, the 8x8
//! lowest frequencies, each bit = coefficient > their median. Bit 63 is coefficient
//! (0, 0), row-major, so `format!("{:016x}")` equals imagehash's hex string.
//! Two images are near duplicates when their hashes differ in few bits (Hamming
//! distance); re-encoded, resized or slightly edited copies stay within a few bits.

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;

/// Side of the greyscale thumbnail the DCT runs on.
const SIDE: usize = 32;
/// Side of the low-frequency block kept.
const LOW: usize = 8;

/// PIL's RGB -> L conversion: ITU-R 601-2 luma in 16-bit fixed point, rounded.
fn luma(img: &RgbImage) -> Vec<u8> {
    img.as_raw()
        .chunks_exact(3)
        .map(|p| {
            ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// Lanczos-3 resize of a greyscale buffer to SIDE x SIDE (Pillow's convolution).
fn thumbnail(grey: &[u8], w: u32, h: u32) -> Vec<u8> {
    if (w, h) == (SIDE as u32, SIDE as u32) {
        return grey.to_vec();
    }
    let src = ImageRef::new(w, h, grey, PixelType::U8).expect("buffer matches its size");
    let mut dst = Image::new(SIDE as u32, SIDE as u32, PixelType::U8);
    let opts = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    Resizer::new()
        .resize(&src, &mut dst, &opts)
        .expect("same pixel type");
    dst.into_vec()
}

/// `cos(pi * k * (2n + 1) / (2 * SIDE))` for the kept frequencies `k < LOW`.
fn dct_table() -> [[f64; SIDE]; LOW] {
    let mut t = [[0.0; SIDE]; LOW];
    for (k, row) in t.iter_mut().enumerate() {
        for (n, v) in row.iter_mut().enumerate() {
            *v = (std::f64::consts::PI * k as f64 * (2 * n + 1) as f64 / (2 * SIDE) as f64).cos();
        }
    }
    t
}

/// The 64-bit perceptual hash of an image (any size of at least 1x1).
pub fn phash(img: &RgbImage) -> u64 {
    hash_thumbnail(&grey_thumbnail(img))
}

/// The 32x32 greyscale thumbnail the hash is taken of (row-major).
pub fn grey_thumbnail(img: &RgbImage) -> Vec<u8> {
    thumbnail(&luma(img), img.width(), img.height())
}

/// The hash of a 32x32 greyscale thumbnail (row-major, 1024 values).
pub fn hash_thumbnail(px: &[u8]) -> u64 {
    assert_eq!(px.len(), SIDE * SIDE, "thumbnail must be 32x32");
    let c = dct_table();
    // Along rows (x) first, keeping LOW frequencies: tmp[y][kx].
    let mut tmp = [[0.0f64; LOW]; SIDE];
    for y in 0..SIDE {
        let row = &px[y * SIDE..(y + 1) * SIDE];
        for kx in 0..LOW {
            tmp[y][kx] = row.iter().zip(&c[kx]).map(|(&p, &w)| p as f64 * w).sum();
        }
    }
    // Then along columns (y): low[ky][kx]. scipy's factor 2 per axis does not change
    // which coefficients exceed the median, so it is left out.
    let mut low = [0.0f64; LOW * LOW];
    for ky in 0..LOW {
        for kx in 0..LOW {
            low[ky * LOW + kx] = (0..SIDE).map(|y| tmp[y][kx] * c[ky][y]).sum();
        }
    }
    let mut sorted = low;
    sorted.sort_by(f64::total_cmp);
    // numpy's median of an even count: the mean of the two middle values.
    let median = (sorted[LOW * LOW / 2 - 1] + sorted[LOW * LOW / 2]) / 2.0;
    low.iter()
        .fold(0u64, |h, &v| (h << 1) | u64::from(v > median))
}

/// Number of differing bits.
pub fn distance(a: u64, b: u64) -> u32 {
    (a ^ b).count_ones()
}

/// All pairs `(i, j, distance)` with `i < j` whose hashes are within `max_distance`,
/// in index order.
pub fn near_pairs(hashes: &[u64], max_distance: u32) -> Vec<(usize, usize, u32)> {
    let mut out = Vec::new();
    for (i, &a) in hashes.iter().enumerate() {
        for (j, &b) in hashes.iter().enumerate().skip(i + 1) {
            let d = distance(a, b);
            if d <= max_distance {
                out.push((i, j, d));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    /// A smooth, seeded pattern: a few random blobs on a gradient.
    fn pattern(w: u32, h: u32, seed: u64) -> RgbImage {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f64 / (1u64 << 31) as f64
        };
        let blobs: Vec<(f64, f64, f64, f64)> = (0..5)
            .map(|_| (next(), next(), 0.05 + 0.2 * next(), next()))
            .collect();
        let tilt = next();
        RgbImage::from_fn(w, h, |x, y| {
            let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
            let mut v = 60.0 * (tilt * fx + (1.0 - tilt) * fy);
            for &(bx, by, r, a) in &blobs {
                let d2 = (fx - bx).powi(2) + (fy - by).powi(2);
                v += 190.0 * a * (-d2 / (r * r)).exp();
            }
            let v = v.clamp(0.0, 255.0) as u8;
            Rgb([v, v / 2 + 40, 255 - v])
        })
    }

    #[test]
    fn same_picture_resized_or_recompressed_stays_close() {
        let a = pattern(640, 480, 1);
        let small = image::imageops::resize(&a, 320, 240, image::imageops::FilterType::Triangle);
        let mut jpg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 60)
            .encode_image(&a)
            .unwrap();
        let re = image::load_from_memory(&jpg).unwrap().into_rgb8();
        let ha = phash(&a);
        // Coefficients near the median may flip; different pictures are ~32 apart.
        assert!(distance(ha, phash(&small)) <= 6, "resized");
        assert!(distance(ha, phash(&re)) <= 6, "recompressed");
        assert_eq!(ha, phash(&a), "deterministic");
    }

    #[test]
    fn different_pictures_are_far_apart() {
        let hashes: Vec<u64> = (0..12)
            .map(|s| phash(&pattern(256, 256, 100 + s)))
            .collect();
        assert!(near_pairs(&hashes, 8).is_empty(), "{hashes:x?}");
        // Half of the bits are set by construction (median split).
        for h in hashes {
            assert!((28..=36).contains(&h.count_ones()), "{h:016x}");
        }
    }

    #[test]
    fn mirrored_picture_is_not_a_near_duplicate() {
        let a = pattern(300, 200, 7);
        let m = image::imageops::flip_horizontal(&a);
        assert!(distance(phash(&a), phash(&m)) > 8);
    }

    #[test]
    fn pairs_are_listed_in_order() {
        let h = [0u64, 0b111, u64::MAX, 0b1];
        assert_eq!(near_pairs(&h, 3), vec![(0, 1, 3), (0, 3, 1), (1, 3, 2)]);
    }
}
