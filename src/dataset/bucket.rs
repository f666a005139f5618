//! kohya's aspect-ratio buckets (`make_bucket_resolutions` and
//! `BucketManager.select_bucket` in sd-scripts' `library/train_util.py`), reproduced
//! exactly so that images prepared here land in the bucket kohya would pick.

/// Bucket settings, in kohya's terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BucketSpec {
    /// Training resolution (width, height); its area is the bucket area.
    pub resolution: (u32, u32),
    pub min_bucket: u32,
    pub max_bucket: u32,
    pub step: u32,
    /// kohya's `bucket_no_upscale`: buckets follow the image, never upscale.
    pub no_upscale: bool,
}

impl Default for BucketSpec {
    fn default() -> Self {
        BucketSpec {
            resolution: (512, 512),
            min_bucket: 256,
            max_bucket: 1024,
            step: 64,
            no_upscale: false,
        }
    }
}

/// Where an image goes: the bucket size and the size it is scaled to before the crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketChoice {
    pub bucket: (u32, u32),
    pub resized: (u32, u32),
}

/// Python's `int(x + 0.5)` for non-negative x.
fn round_half_up(x: f64) -> u32 {
    (x + 0.5).floor().max(0.0) as u32
}

impl BucketSpec {
    pub fn max_area(&self) -> u64 {
        self.resolution.0 as u64 * self.resolution.1 as u64
    }

    /// kohya's min/max rounding: min rounded down, max rounded up to the step.
    fn limits(&self) -> (u32, u32) {
        let s = self.step.max(1);
        let min = self.min_bucket / s * s;
        let max = self.max_bucket.div_ceil(s) * s;
        (min, max)
    }

    /// The predefined buckets, sorted as kohya sorts them (by width, then height).
    pub fn buckets(&self) -> Vec<(u32, u32)> {
        let step = self.step.max(1) as u64;
        let area = self.max_area();
        let (min, max) = self.limits();
        let mut set = std::collections::BTreeSet::new();
        let side = ((area as f64).sqrt() as u64 / step * step) as u32;
        set.insert((side, side));
        let mut w = min as u64;
        while w <= max as u64 {
            let h = ((area / w) / step * step).min(max as u64);
            if h >= min as u64 {
                set.insert((w as u32, h as u32));
                set.insert((h as u32, w as u32));
            }
            w += step;
        }
        set.into_iter().collect()
    }

    /// The bucket for an image of `w` x `h` (upright) pixels. Returns `None` when the
    /// image is too small to give a bucket at least one step wide (no-upscale mode).
    pub fn select(&self, w: u32, h: u32, buckets: &[(u32, u32)]) -> Option<BucketChoice> {
        if w == 0 || h == 0 {
            return None;
        }
        let ar = w as f64 / h as f64;
        let step = self.step.max(1);
        if !self.no_upscale {
            let bucket = if buckets.contains(&(w, h)) {
                (w, h)
            } else {
                // numpy argmin: the first of equal minima in sorted order.
                let mut best = *buckets.first()?;
                let mut best_err = f64::INFINITY;
                for &(bw, bh) in buckets {
                    let err = (bw as f64 / bh as f64 - ar).abs();
                    if err < best_err {
                        best_err = err;
                        best = (bw, bh);
                    }
                }
                best
            };
            let bar = bucket.0 as f64 / bucket.1 as f64;
            let scale = if ar > bar {
                bucket.1 as f64 / h as f64
            } else {
                bucket.0 as f64 / w as f64
            };
            let resized = (
                round_half_up(w as f64 * scale),
                round_half_up(h as f64 * scale),
            );
            return Some(BucketChoice { bucket, resized });
        }
        let round_to_steps = |x: f64| {
            let x = round_half_up(x);
            x - x % step
        };
        let max_area = self.max_area() as f64;
        let resized = if (w as u64 * h as u64) as f64 > max_area {
            let rw = (max_area * ar).sqrt();
            let rh = max_area / rw;
            let bw_r = round_to_steps(rw);
            let bh_in_wr = round_to_steps(bw_r as f64 / ar);
            let bh_r = round_to_steps(rh);
            let bw_in_hr = round_to_steps(bh_r as f64 * ar);
            // kohya divides by these; a zero means the image is degenerate.
            if bh_in_wr == 0 || bh_r == 0 {
                return None;
            }
            let ar_wr = bw_r as f64 / bh_in_wr as f64;
            let ar_hr = bw_in_hr as f64 / bh_r as f64;
            if (ar_wr - ar).abs() < (ar_hr - ar).abs() {
                (bw_r, round_half_up(bw_r as f64 / ar))
            } else {
                (round_half_up(bh_r as f64 * ar), bh_r)
            }
        } else {
            (w, h)
        };
        let bucket = (resized.0 - resized.0 % step, resized.1 - resized.1 % step);
        if bucket.0 == 0 || bucket.1 == 0 {
            return None;
        }
        Some(BucketChoice { bucket, resized })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_512_has_kohya_17_buckets() {
        let b = BucketSpec::default().buckets();
        let expect = [
            (256, 1024),
            (320, 768),
            (384, 640),
            (448, 576),
            (512, 512),
            (576, 448),
            (640, 384),
            (704, 320),
            (768, 320),
            (832, 256),
            (896, 256),
            (960, 256),
            (1024, 256),
            (256, 832),
            (256, 896),
            (256, 960),
            (320, 704),
        ];
        assert_eq!(b.len(), 17, "{b:?}");
        for e in expect {
            assert!(b.contains(&e), "missing {e:?}");
        }
    }
}
