//! Focal point for crops: where the detail is. Two cues, weighted as A1111's
//! focal-point crop weighs them (edges 0.5, entropy 0.15): the centroid of the
//! strongest edges, and the centre of the crop-sized window with the most entropy.
//! Computed on a small greyscale thumbnail, so it costs little next to the resize.

use super::resize::{Filter, Rect, resize_region};
use image::RgbImage;

const THUMB: u32 = 192;
const EDGE_WEIGHT: f64 = 0.5;
const ENTROPY_WEIGHT: f64 = 0.15;

/// The focal point in source pixel coordinates, for a crop of `crop_w` x `crop_h`
/// source pixels.
pub fn focal_point(img: &RgbImage, crop_w: f64, crop_h: f64) -> (f64, f64) {
    let (w, h) = img.dimensions();
    let s = (THUMB as f64 / w.max(h) as f64).min(1.0);
    let tw = ((w as f64 * s).round() as u32).max(3);
    let th = ((h as f64 * s).round() as u32).max(3);
    let thumb = resize_region(img, Rect::full(w, h), tw, th, Filter::Area);
    let grey: Vec<f32> = thumb
        .pixels()
        .map(|p| 0.299 * p.0[0] as f32 + 0.587 * p.0[1] as f32 + 0.114 * p.0[2] as f32)
        .collect();
    let at = |x: u32, y: u32| grey[(y * tw + x) as usize];
    // Sobel magnitude on the interior.
    let mut mags = Vec::with_capacity((tw * th) as usize);
    for y in 1..th - 1 {
        for x in 1..tw - 1 {
            let gx = at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1)
                - at(x - 1, y - 1)
                - 2.0 * at(x - 1, y)
                - at(x - 1, y + 1);
            let gy = at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1)
                - at(x - 1, y - 1)
                - 2.0 * at(x, y - 1)
                - at(x + 1, y - 1);
            mags.push(((gx * gx + gy * gy).sqrt(), x, y));
        }
    }
    let centre = (tw as f64 / 2.0, th as f64 / 2.0);
    let edge = strongest_centroid(&mut mags).unwrap_or(centre);
    let cw = (crop_w * s).round().clamp(1.0, tw as f64) as u32;
    let ch = (crop_h * s).round().clamp(1.0, th as f64) as u32;
    let ent = best_entropy_window(&grey, tw, th, cw, ch).unwrap_or(centre);
    let fx = (edge.0 * EDGE_WEIGHT + ent.0 * ENTROPY_WEIGHT) / (EDGE_WEIGHT + ENTROPY_WEIGHT);
    let fy = (edge.1 * EDGE_WEIGHT + ent.1 * ENTROPY_WEIGHT) / (EDGE_WEIGHT + ENTROPY_WEIGHT);
    (fx / s, fy / s)
}

/// Centroid of the top 2% edge magnitudes (at least 8 points), in thumbnail pixels.
fn strongest_centroid(mags: &mut [(f32, u32, u32)]) -> Option<(f64, f64)> {
    if mags.is_empty() {
        return None;
    }
    mags.sort_by(|a, b| b.0.total_cmp(&a.0));
    if mags[0].0 <= 0.0 {
        return None;
    }
    let n = (mags.len() / 50).max(8).min(mags.len());
    let (sx, sy) = mags[..n].iter().fold((0.0, 0.0), |(sx, sy), m| {
        (sx + m.1 as f64 + 0.5, sy + m.2 as f64 + 0.5)
    });
    Some((sx / n as f64, sy / n as f64))
}

/// Centre of the window with the highest grey-level entropy, over a coarse grid.
fn best_entropy_window(grey: &[f32], w: u32, h: u32, cw: u32, ch: u32) -> Option<(f64, f64)> {
    let steps = 8;
    let mut best: Option<(f64, (f64, f64))> = None;
    for iy in 0..=steps {
        for ix in 0..=steps {
            let x0 = (w - cw) * ix / steps;
            let y0 = (h - ch) * iy / steps;
            let mut hist = [0u32; 32];
            for y in y0..y0 + ch {
                for x in x0..x0 + cw {
                    hist[(grey[(y * w + x) as usize] as usize / 8).min(31)] += 1;
                }
            }
            let n = (cw * ch) as f64;
            let e: f64 = hist
                .iter()
                .filter(|&&c| c > 0)
                .map(|&c| -(c as f64 / n) * (c as f64 / n).log2())
                .sum();
            let c = (x0 as f64 + cw as f64 / 2.0, y0 as f64 + ch as f64 / 2.0);
            if best.is_none_or(|b| e > b.0 + 1e-9) {
                best = Some((e, c));
            }
        }
    }
    best.map(|b| b.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_detail_on_the_right() {
        // Flat grey on the left, a checkerboard on the right third.
        let img = RgbImage::from_fn(900, 300, |x, y| {
            if x > 600 && ((x / 10) + (y / 10)) % 2 == 0 {
                [0, 0, 0].into()
            } else {
                [128, 128, 128].into()
            }
        });
        let (fx, _) = focal_point(&img, 300.0, 300.0);
        assert!(fx > 600.0, "focal x {fx}");
    }
}
