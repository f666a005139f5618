//! The training set as kohya sd-scripts reads it (`library/train_util.py`): `N_name`
//! folders repeated N times an epoch, regularisation images repeated until they match the
//! training samples, aspect-ratio buckets, bucket-pure batches in a seeded order per epoch,
//! and kohya's caption pipeline (keep_tokens, shuffle, dropout, tag dropout).

use super::rng::{Purpose, Rng};
use crate::check::folders::{self, Kind};
use crate::dataset::bucket::{BucketChoice, BucketSpec};
use crate::dataset::caption_io::read_caption_text;
use std::path::{Path, PathBuf};

/// One folder of images (kohya's subset).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Subset {
    pub dir: PathBuf,
    /// The class tokens (folder name after `N_`), the caption of uncaptioned images.
    pub name: String,
    pub is_reg: bool,
    /// The folder's repeat count.
    pub repeats: u32,
    pub images: usize,
}

/// One image and where it trains.
#[derive(Debug, Clone)]
pub struct Item {
    pub path: PathBuf,
    pub caption: String,
    pub subset: usize,
    pub is_reg: bool,
    /// Upright source size.
    pub size: (u32, u32),
    pub bucket: BucketChoice,
    /// Times the image appears per epoch (reg images: after balancing).
    pub repeats: u32,
}

#[derive(Debug, Default)]
pub struct Dataset {
    pub subsets: Vec<Subset>,
    pub items: Vec<Item>,
    /// Images skipped, each `file: reason` (counted warnings).
    pub skipped: Vec<String>,
    /// Training samples per epoch before reg (kohya's `num_train_images`).
    pub train_samples: u64,
    pub reg_samples: u64,
}

/// How images become samples.
#[derive(Debug, Clone)]
pub struct DataOptions {
    pub buckets: BucketSpec,
    pub caption_extension: String,
}

fn first_line(text: &str) -> String {
    let t = text.strip_prefix('\u{feff}').unwrap_or(text);
    t.lines().next().unwrap_or("").trim().to_string()
}

fn add_folder(
    c: &folders::Concept,
    is_reg: bool,
    opts: &DataOptions,
    buckets: &[(u32, u32)],
    ds: &mut Dataset,
) {
    let subset = ds.subsets.len();
    let repeats = c.repeats.unwrap_or(1);
    let mut n = 0;
    for path in &c.images {
        let size = match std::fs::read(path)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::dataset::decode::probe_size(&b).map_err(|e| e.to_string()))
        {
            Ok(s) => s,
            Err(e) => {
                ds.skipped.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        let cap_path = crate::dataset::caption_io::caption_path(path, &opts.caption_extension);
        let caption = match read_caption_text(&cap_path) {
            Ok(Some(t)) => first_line(&t),
            Ok(None) => c.name.clone(),
            Err(e) => {
                ds.skipped.push(e.to_string());
                continue;
            }
        };
        let Some(bucket) = opts.buckets.select(size.0, size.1, buckets) else {
            ds.skipped.push(format!(
                "{}: {}x{} is too small for any bucket",
                path.display(),
                size.0,
                size.1
            ));
            continue;
        };
        ds.items.push(Item {
            path: path.clone(),
            caption,
            subset,
            is_reg,
            size,
            bucket,
            repeats,
        });
        n += 1;
    }
    ds.subsets.push(Subset {
        dir: c.dir.clone(),
        name: c.name.clone(),
        is_reg,
        repeats,
        images: n,
    });
}

/// Read the training folders under `data` (kohya `train_data_dir`, or the root `sdkit
/// prep` writes, whose `reg/` is used too) and `reg` (kohya `reg_data_dir`).
pub fn load(data: &Path, reg: Option<&Path>, opts: &DataOptions) -> std::io::Result<Dataset> {
    let buckets = opts.buckets.buckets();
    let mut ds = Dataset::default();
    let layout = folders::discover(data)?;
    let mut concepts: Vec<(folders::Concept, bool)> = layout
        .concepts
        .into_iter()
        .map(|c| {
            let reg = c.kind == Kind::Reg;
            (c, reg)
        })
        .collect();
    if let Some(r) = reg {
        for mut c in folders::discover(r)?.concepts {
            c.kind = Kind::Reg;
            concepts.push((c, true));
        }
    }
    for (c, is_reg) in &concepts {
        add_folder(c, *is_reg, opts, &buckets, &mut ds);
    }
    balance_reg(&mut ds);
    Ok(ds)
}

/// kohya's balance: reg images are registered with their folder's repeats, then one more
/// repeat at a time in order until reg samples reach the training samples.
fn balance_reg(ds: &mut Dataset) {
    ds.train_samples = ds
        .items
        .iter()
        .filter(|i| !i.is_reg)
        .map(|i| i.repeats as u64)
        .sum();
    let reg: Vec<usize> = (0..ds.items.len())
        .filter(|&i| ds.items[i].is_reg)
        .collect();
    if reg.is_empty() {
        ds.reg_samples = 0;
        return;
    }
    let target = ds.train_samples;
    let mut n = 0u64;
    let mut first = true;
    let mut counts = vec![0u32; reg.len()];
    'outer: while n < target {
        for (k, &i) in reg.iter().enumerate() {
            if first {
                counts[k] = ds.items[i].repeats;
                n += counts[k] as u64;
            } else {
                counts[k] += 1;
                n += 1;
            }
            if n >= target {
                break 'outer;
            }
        }
        first = false;
    }
    for (k, &i) in reg.iter().enumerate() {
        ds.items[i].repeats = counts[k];
    }
    ds.reg_samples = counts.iter().map(|&c| c as u64).sum();
}

impl Dataset {
    /// Samples per epoch (repeats counted, reg included).
    pub fn samples_per_epoch(&self) -> u64 {
        self.items.iter().map(|i| i.repeats as u64).sum()
    }

    /// Buckets in use: (size, samples per epoch), sorted.
    pub fn bucket_counts(&self) -> Vec<((u32, u32), u64)> {
        let mut m = std::collections::BTreeMap::new();
        for i in &self.items {
            *m.entry(i.bucket.bucket).or_insert(0u64) += i.repeats as u64;
        }
        m.into_iter().collect()
    }

    /// Batches per epoch with `batch_size` (each bucket split on its own).
    pub fn batches_per_epoch(&self, batch_size: usize) -> u64 {
        self.bucket_counts()
            .iter()
            .map(|(_, n)| n.div_ceil(batch_size as u64))
            .sum()
    }

    /// The batches of `epoch` (0-based), as item indices: every bucket's samples shuffled
    /// and cut into batches, then the batch order shuffled (kohya's `BucketManager`).
    pub fn epoch_batches(&self, seed: u64, epoch: u64, batch_size: usize) -> Vec<Vec<usize>> {
        let mut rng = Rng::stream(seed, Purpose::DataOrder, epoch);
        let mut by_bucket: std::collections::BTreeMap<(u32, u32), Vec<usize>> = Default::default();
        for (idx, it) in self.items.iter().enumerate() {
            let v = by_bucket.entry(it.bucket.bucket).or_default();
            v.extend(std::iter::repeat_n(idx, it.repeats as usize));
        }
        let mut batches = Vec::new();
        for (_, mut v) in by_bucket {
            rng.shuffle(&mut v);
            batches.extend(v.chunks(batch_size.max(1)).map(|c| c.to_vec()));
        }
        rng.shuffle(&mut batches);
        batches
    }
}

/// kohya's caption options.
#[derive(Debug, Clone, Default)]
pub struct CaptionOptions {
    pub keep_tokens: usize,
    pub shuffle: bool,
    pub dropout_rate: f64,
    pub tag_dropout_rate: f64,
    /// kohya's `keep_tokens_separator` is not supported; `caption_separator` is ",".
    pub separator: String,
}

/// kohya's `process_caption`: the whole caption dropped with `dropout_rate`; otherwise the
/// tags after the first `keep_tokens` shuffled and each dropped with `tag_dropout_rate`.
pub fn process_caption(caption: &str, o: &CaptionOptions, rng: &mut Rng) -> String {
    if o.dropout_rate > 0.0 && rng.uniform() < o.dropout_rate {
        return String::new();
    }
    if !o.shuffle && o.tag_dropout_rate <= 0.0 {
        return caption.to_string();
    }
    let sep = if o.separator.is_empty() {
        ","
    } else {
        &o.separator
    };
    let tokens: Vec<&str> = caption.split(sep).map(str::trim).collect();
    let keep = o.keep_tokens.min(tokens.len());
    let (fixed, flex) = tokens.split_at(keep);
    let mut flex: Vec<&str> = flex.to_vec();
    if o.shuffle {
        rng.shuffle(&mut flex);
    }
    if o.tag_dropout_rate > 0.0 {
        flex.retain(|_| rng.uniform() >= o.tag_dropout_rate);
    }
    let all: Vec<&str> = fixed.iter().copied().chain(flex).collect();
    all.join(&format!("{sep} "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(reg: bool, repeats: u32, bucket: (u32, u32)) -> Item {
        Item {
            path: PathBuf::new(),
            caption: String::new(),
            subset: 0,
            is_reg: reg,
            size: bucket,
            bucket: BucketChoice {
                bucket,
                resized: bucket,
            },
            repeats,
        }
    }

    #[test]
    fn reg_balance_follows_kohya() {
        // 3 train images x 10 repeats = 30 samples; 4 reg images with 1 repeat: first pass
        // 4, then +1 each in turn until 30: 26 more = 6 full rounds (24) + 2.
        let mut ds = Dataset::default();
        ds.items = (0..3).map(|_| item(false, 10, (512, 512))).collect();
        ds.items.extend((0..4).map(|_| item(true, 1, (512, 512))));
        balance_reg(&mut ds);
        let reg: Vec<u32> = ds.items[3..].iter().map(|i| i.repeats).collect();
        assert_eq!(reg, vec![8, 8, 7, 7]);
        assert_eq!(ds.reg_samples, 30);
        // More reg samples than train: kohya stops after the first image that reaches it.
        let mut ds = Dataset::default();
        ds.items = vec![item(false, 2, (512, 512))];
        ds.items.extend((0..5).map(|_| item(true, 1, (512, 512))));
        balance_reg(&mut ds);
        let reg: Vec<u32> = ds.items[1..].iter().map(|i| i.repeats).collect();
        assert_eq!(reg, vec![1, 1, 0, 0, 0]);
    }

    #[test]
    fn batches_are_bucket_pure_and_cover_every_sample() {
        let mut ds = Dataset::default();
        ds.items = vec![
            item(false, 3, (512, 512)),
            item(false, 2, (448, 576)),
            item(false, 2, (512, 512)),
        ];
        let b = ds.epoch_batches(1, 0, 2);
        assert_eq!(b.len() as u64, ds.batches_per_epoch(2));
        let mut seen = vec![0; 3];
        for batch in &b {
            let bk = ds.items[batch[0]].bucket.bucket;
            assert!(batch.iter().all(|&i| ds.items[i].bucket.bucket == bk));
            for &i in batch {
                seen[i] += 1;
            }
        }
        assert_eq!(seen, vec![3, 2, 2]);
        assert_eq!(
            ds.epoch_batches(1, 0, 2),
            b,
            "same seed and epoch, same order"
        );
        assert_ne!(ds.epoch_batches(1, 1, 2), b);
    }

    #[test]
    fn caption_pipeline() {
        let mut rng = Rng::new(5);
        let mut o = CaptionOptions {
            keep_tokens: 1,
            shuffle: true,
            ..Default::default()
        };
        let c = "ohwx, a, b, c, d, e";
        let s = process_caption(c, &o, &mut rng);
        assert!(s.starts_with("ohwx, "), "{s}");
        let mut tags: Vec<&str> = s.split(", ").collect();
        tags.sort();
        assert_eq!(tags, vec!["a", "b", "c", "d", "e", "ohwx"]);
        o.tag_dropout_rate = 1.0;
        assert_eq!(process_caption(c, &o, &mut rng), "ohwx");
        o.dropout_rate = 1.0;
        assert_eq!(process_caption(c, &o, &mut rng), "");
        let plain = CaptionOptions::default();
        assert_eq!(process_caption(c, &plain, &mut rng), c);
    }
}
