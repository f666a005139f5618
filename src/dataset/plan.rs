//! From a source size to the outputs it yields: sizing mode, bucket, crop box,
//! tiles of oversized images, flipped copies. Pure arithmetic, no pixels.

use super::bucket::BucketSpec;
use super::resize::Rect;

/// Width x height, parsed from `512`, `512x768` or `512,768`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Size {
    pub w: u32,
    pub h: u32,
}

impl std::str::FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        let t = s.trim().to_ascii_lowercase();
        let parts: Vec<&str> = t.split(['x', ',', '*']).map(str::trim).collect();
        let nums: Result<Vec<u32>, _> = parts.iter().map(|p| p.parse::<u32>()).collect();
        match nums.as_deref() {
            Ok([n]) if *n > 0 => Ok(Size { w: *n, h: *n }),
            Ok([w, h]) if *w > 0 && *h > 0 => Ok(Size { w: *w, h: *h }),
            _ => Err(format!("'{s}' is not a size: use 512 or 512x768")),
        }
    }
}

impl TryFrom<String> for Size {
    type Error = String;
    fn try_from(s: String) -> Result<Size, String> {
        s.parse()
    }
}

impl From<Size> for String {
    fn from(s: Size) -> String {
        format!("{}x{}", s.w, s.h)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.w, self.h)
    }
}

/// How sources are sized. Every output side is a multiple of 64 (of the bucket step for buckets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sizing {
    /// kohya aspect-ratio buckets.
    Bucket(BucketSpec),
    /// Scale to cover `Size`, then crop.
    Crop(Size),
    /// Scale down to fit inside `Size` (never up), then trim each side to a multiple of 64.
    Fit(Size),
    /// Scale to fit inside `Size`, letterbox onto the background colour.
    Pad(Size),
}

/// Splitting very wide or tall images into overlapping tiles (A1111 "split oversized").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    /// Split when short side / long side is below this.
    pub threshold: f64,
    /// Overlap between neighbouring tiles, as a share of a tile.
    pub overlap: f64,
}

/// One output image of a source.
#[derive(Debug, Clone, PartialEq)]
pub struct OutputPlan {
    /// Region of the upright source, in source pixels.
    pub crop: Rect,
    /// The image the region is scaled to.
    pub scaled: (u32, u32),
    /// Final size (equals `scaled` unless letterboxed).
    pub size: (u32, u32),
    /// Where `scaled` sits inside `size` when letterboxed.
    pub offset: (u32, u32),
    /// The bucket this output belongs to (its size, for every mode).
    pub bucket: (u32, u32),
    pub tile: Option<u32>,
    pub flip: bool,
    /// Whether the crop may move to the focal point (plain crops only).
    pub movable: bool,
}

impl OutputPlan {
    /// The region is magnified (scaled up) to reach the output.
    pub fn upscaled(&self) -> bool {
        self.scaled.0 as f64 > self.crop.w + 0.5 || self.scaled.1 as f64 > self.crop.h + 0.5
    }
}

/// Why a source yields no output.
#[derive(Debug, Clone, PartialEq)]
pub enum NoOutput {
    TooSmall(String),
}

fn floor64(x: u32) -> u32 {
    x - x % 64
}

fn round_u32(x: f64) -> u32 {
    (x + 0.5).floor().max(1.0) as u32
}

/// A centred crop of `cw` x `ch` source pixels.
fn centred(w: u32, h: u32, cw: f64, ch: f64) -> Rect {
    Rect {
        x: (w as f64 - cw) / 2.0,
        y: (h as f64 - ch) / 2.0,
        w: cw,
        h: ch,
    }
}

fn single(crop: Rect, size: (u32, u32), movable: bool) -> OutputPlan {
    OutputPlan {
        crop,
        scaled: size,
        size,
        offset: (0, 0),
        bucket: size,
        tile: None,
        flip: false,
        movable,
    }
}

/// The outputs of a source of `w` x `h` upright pixels (before flipped copies).
pub fn plan_source(
    w: u32,
    h: u32,
    sizing: &Sizing,
    buckets: &[(u32, u32)],
    split: Option<Split>,
) -> Result<Vec<OutputPlan>, NoOutput> {
    if let Some(sp) = split {
        let target = match sizing {
            Sizing::Bucket(b) => {
                let s = ((b.max_area() as f64).sqrt() as u32 / b.step.max(1)) * b.step.max(1);
                Size { w: s, h: s }
            }
            Sizing::Crop(s) | Sizing::Fit(s) | Sizing::Pad(s) => *s,
        };
        if (w.min(h) as f64) / (w.max(h) as f64) < sp.threshold {
            return Ok(tiles(w, h, target, sp.overlap));
        }
    }
    match sizing {
        Sizing::Bucket(spec) => {
            let c = spec.select(w, h, buckets).ok_or_else(|| {
                NoOutput::TooSmall(format!(
                    "{w}x{h} is smaller than one {}px bucket step",
                    spec.step
                ))
            })?;
            let (rw, rh) = c.resized;
            let (bw, bh) = c.bucket;
            // kohya trims the scaled image at (excess // 2); map that box back to the source.
            let (px, py) = (rw.saturating_sub(bw) / 2, rh.saturating_sub(bh) / 2);
            let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
            let crop = Rect {
                x: px as f64 * sx,
                y: py as f64 * sy,
                w: bw.min(rw) as f64 * sx,
                h: bh.min(rh) as f64 * sy,
            };
            Ok(vec![single(crop, (bw, bh), true)])
        }
        Sizing::Crop(s) => {
            let scale = (s.w as f64 / w as f64).max(s.h as f64 / h as f64);
            let crop = centred(
                w,
                h,
                (s.w as f64 / scale).min(w as f64),
                (s.h as f64 / scale).min(h as f64),
            );
            Ok(vec![single(crop, (s.w, s.h), true)])
        }
        Sizing::Fit(s) => {
            let scale = (s.w as f64 / w as f64).min(s.h as f64 / h as f64).min(1.0);
            let (rw, rh) = (round_u32(w as f64 * scale), round_u32(h as f64 * scale));
            let (ow, oh) = (floor64(rw), floor64(rh));
            if ow == 0 || oh == 0 {
                return Err(NoOutput::TooSmall(format!(
                    "{w}x{h} cannot fit a 64px grid"
                )));
            }
            let (sx, sy) = (w as f64 / rw as f64, h as f64 / rh as f64);
            let crop = centred(w, h, ow as f64 * sx, oh as f64 * sy);
            Ok(vec![single(crop, (ow, oh), true)])
        }
        Sizing::Pad(s) => {
            let scale = (s.w as f64 / w as f64).min(s.h as f64 / h as f64);
            let iw = round_u32(w as f64 * scale).min(s.w);
            let ih = round_u32(h as f64 * scale).min(s.h);
            Ok(vec![OutputPlan {
                crop: Rect::full(w, h),
                scaled: (iw, ih),
                size: (s.w, s.h),
                offset: ((s.w - iw) / 2, (s.h - ih) / 2),
                bucket: (s.w, s.h),
                tile: None,
                flip: false,
                movable: false,
            }])
        }
    }
}

/// A1111's split: scale the short side to the target's, cut `n` overlapping tiles
/// along the long side, `n = ceil((L - T*ov) / (T*(1-ov)))`.
fn tiles(w: u32, h: u32, target: Size, overlap: f64) -> Vec<OutputPlan> {
    let tall = h > w;
    // Along the long axis: source length, target tile length; across: target width.
    let (from_across, from_along) = if tall { (w, h) } else { (h, w) };
    let (to_across, to_along) = if tall {
        (target.w, target.h)
    } else {
        (target.h, target.w)
    };
    let scaled_along = (from_along as u64 * to_across as u64 / from_across as u64) as u32;
    if scaled_along <= to_along {
        let crop = Rect::full(w, h);
        let size = (target.w, target.h);
        let scale = (target.w as f64 / w as f64).max(target.h as f64 / h as f64);
        let c = centred(
            w,
            h,
            (target.w as f64 / scale).min(w as f64),
            (target.h as f64 / scale).min(h as f64),
        );
        return vec![single(if c.w > 0.0 { c } else { crop }, size, true)];
    }
    let t = to_along as f64;
    let n = (((scaled_along as f64 - t * overlap) / (t * (1.0 - overlap))).ceil() as u32).max(2);
    let step = (scaled_along - to_along) as f64 / (n - 1) as f64;
    let s = from_along as f64 / scaled_along as f64; // source pixels per scaled pixel (along)
    let sa = from_across as f64 / to_across as f64; // across
    (0..n)
        .map(|i| {
            let pos = (step * i as f64).floor();
            let (x, y, cw, ch) = if tall {
                (0.0, pos * s, to_across as f64 * sa, t * s)
            } else {
                (pos * s, 0.0, t * s, to_across as f64 * sa)
            };
            let mut p = single(Rect { x, y, w: cw, h: ch }, (target.w, target.h), false);
            p.tile = Some(i);
            p
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!("512".parse::<Size>().unwrap(), Size { w: 512, h: 512 });
        assert_eq!("512x768".parse::<Size>().unwrap(), Size { w: 512, h: 768 });
        assert!("0x5".parse::<Size>().is_err());
        assert!("big".parse::<Size>().is_err());
    }

    #[test]
    fn crop_covers_and_centres() {
        let p =
            &plan_source(1000, 500, &Sizing::Crop(Size { w: 512, h: 512 }), &[], None).unwrap()[0];
        assert_eq!(p.size, (512, 512));
        assert!((p.crop.w - 500.0).abs() < 1e-9 && (p.crop.x - 250.0).abs() < 1e-9);
    }

    #[test]
    fn fit_trims_to_64_and_never_upscales() {
        let p =
            &plan_source(1000, 700, &Sizing::Fit(Size { w: 768, h: 768 }), &[], None).unwrap()[0];
        assert_eq!(p.size, (768, 512)); // 768x538 trimmed
        let p =
            &plan_source(300, 200, &Sizing::Fit(Size { w: 768, h: 768 }), &[], None).unwrap()[0];
        assert_eq!(p.size, (256, 192));
        assert!(!p.upscaled());
    }

    #[test]
    fn pad_letterboxes() {
        let p =
            &plan_source(1000, 500, &Sizing::Pad(Size { w: 512, h: 512 }), &[], None).unwrap()[0];
        assert_eq!(
            (p.size, p.scaled, p.offset),
            ((512, 512), (512, 256), (0, 128))
        );
    }

    #[test]
    fn splits_a1111_style() {
        let sp = Some(Split {
            threshold: 0.5,
            overlap: 0.2,
        });
        // 512 wide, 2000 tall -> scaled 512x2000, n = ceil((2000-102.4)/409.6) = 5
        let v = plan_source(512, 2000, &Sizing::Crop(Size { w: 512, h: 512 }), &[], sp).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[0].crop.y, 0.0);
        assert!((v[4].crop.y + v[4].crop.h - 2000.0).abs() < 1.0);
        assert!(v.iter().all(|p| p.size == (512, 512)));
        // Not oversized: a single output.
        assert_eq!(
            plan_source(800, 600, &Sizing::Crop(Size { w: 512, h: 512 }), &[], sp)
                .unwrap()
                .len(),
            1
        );
    }
}
