//! kohya's epoch arithmetic (sd-scripts `DreamBoothDataset.__init__`, `make_buckets`,
//! `train_network.py`):
//! - training samples per epoch `T` = sum of images x repeats over training folders;
//! - regularisation images are registered in folder order with their own repeats until
//!   the registered count reaches `T`; if every reg image is registered and the count is
//!   still short, their repeats are raised by one, round-robin, until it equals `T`;
//! - every sample (training and reg) goes into its bucket; each bucket gives
//!   `ceil(samples / batch_size)` batches; an epoch is the sum over buckets;
//! - total steps = epochs x batches per epoch; without `--max_train_epochs` kohya
//!   trains `--max_train_steps` (default 1600) steps.

use std::collections::BTreeMap;

/// kohya's default `--max_train_steps`.
pub const KOHYA_DEFAULT_STEPS: u64 = 1600;

/// One image as the arithmetic sees it.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub bucket: (u32, u32),
    pub repeats: u32,
    pub reg: bool,
}

/// Samples per epoch and batches.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Epoch {
    /// Training images x repeats (kohya's "train images with repeats").
    pub train_samples: u64,
    /// Reg images x their folder repeats, as found on disk.
    pub reg_samples_on_disk: u64,
    /// Reg samples kohya actually registers per epoch (0 or about `train_samples`).
    pub reg_samples: u64,
    /// Reg images that get no sample at all (too many reg images).
    pub reg_unused: usize,
    /// `ceil(samples / batch)` summed over buckets.
    pub batches: u64,
    /// Samples per bucket, training and reg together.
    pub buckets: BTreeMap<String, u64>,
}

/// The reg repeats kohya ends up using, per reg image in registration order (0 = not
/// registered).
pub fn reg_registration(train_samples: u64, reg_repeats: &[u32]) -> Vec<u64> {
    let mut reps = vec![0u64; reg_repeats.len()];
    if reg_repeats.is_empty() || reg_repeats.iter().all(|&r| r == 0) {
        return reps;
    }
    let mut n = 0u64;
    let mut first = true;
    'outer: while n < train_samples {
        for (i, &r) in reg_repeats.iter().enumerate() {
            if first {
                reps[i] = r as u64;
                n += r as u64;
            } else {
                reps[i] += 1;
                n += 1;
            }
            if n >= train_samples {
                break 'outer;
            }
        }
        first = false;
    }
    reps
}

/// One epoch of kohya over `samples` (training and reg images, reg in the order kohya
/// registers them) at `batch_size`.
pub fn epoch(samples: &[Sample], batch_size: u32) -> Epoch {
    let bs = batch_size.max(1) as u64;
    let train_samples: u64 = samples
        .iter()
        .filter(|s| !s.reg)
        .map(|s| s.repeats as u64)
        .sum();
    let reg: Vec<&Sample> = samples.iter().filter(|s| s.reg).collect();
    let reg_reps = reg_registration(
        train_samples,
        &reg.iter().map(|s| s.repeats).collect::<Vec<_>>(),
    );
    let mut buckets: BTreeMap<(u32, u32), u64> = BTreeMap::new();
    for s in samples.iter().filter(|s| !s.reg) {
        *buckets.entry(s.bucket).or_default() += s.repeats as u64;
    }
    for (s, &r) in reg.iter().zip(&reg_reps) {
        if r > 0 {
            *buckets.entry(s.bucket).or_default() += r;
        }
    }
    let batches = buckets.values().map(|&n| n.div_ceil(bs)).sum();
    Epoch {
        train_samples,
        reg_samples_on_disk: reg.iter().map(|s| s.repeats as u64).sum(),
        reg_samples: reg_reps.iter().sum(),
        reg_unused: reg_reps.iter().filter(|&&r| r == 0).count(),
        batches,
        buckets: buckets
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|((w, h), n)| (format!("{w}x{h}"), n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(w: u32, repeats: u32, reg: bool) -> Sample {
        Sample {
            bucket: (w, 512),
            repeats,
            reg,
        }
    }

    #[test]
    fn reg_registration_matches_kohya_loop() {
        // 20 x 10 = 200 training samples, 60 reg images x 1: all registered, then
        // raised round-robin: 200 = 60 + 60 + 60 + 20.
        let r = reg_registration(200, &[1; 60]);
        assert_eq!(r.iter().sum::<u64>(), 200);
        assert_eq!(r.iter().filter(|&&x| x == 4).count(), 20);
        assert_eq!(r.iter().filter(|&&x| x == 3).count(), 40);
        // Too many reg images: the first 150 registered, the rest unused.
        let r = reg_registration(150, &[1; 700]);
        assert_eq!(r.iter().sum::<u64>(), 150);
        assert_eq!(r[149], 1);
        assert_eq!(r[150], 0);
        // Folder repeats overshoot in the first pass: 7 x 3 = 21 >= 20.
        assert_eq!(reg_registration(20, &[3; 10]).iter().sum::<u64>(), 21);
        assert!(reg_registration(0, &[1, 1]).iter().all(|&x| x == 0));
        assert!(reg_registration(10, &[]).is_empty());
    }

    #[test]
    fn batches_are_per_bucket() {
        // 3 images x 10 in bucket A, 1 x 10 in bucket B, batch 4:
        // ceil(30/4) + ceil(10/4) = 8 + 3 = 11 (not ceil(40/4) = 10).
        let e = epoch(
            &[
                s(512, 10, false),
                s(512, 10, false),
                s(512, 10, false),
                s(448, 10, false),
            ],
            4,
        );
        assert_eq!((e.train_samples, e.batches), (40, 11));
        // A reg image per training image doubles the samples.
        let e = epoch(&[s(512, 10, false), s(512, 1, true), s(512, 1, true)], 2);
        assert_eq!((e.train_samples, e.reg_samples, e.batches), (10, 10, 10));
        assert_eq!(e.reg_samples_on_disk, 2);
        assert_eq!(e.buckets["512x512"], 20);
    }
}
