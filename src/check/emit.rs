//! Findings that look at one folder's numbers, its captions as a whole, or the whole
//! dataset: image size against the bucket, image count, trigger and tags, buckets, reg
//! balance, near duplicates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::findings::{Code, Collector, Severity};
use super::folders::{Concept, Kind};
use super::{FolderReport, ImageFacts, phash, rules, steps};
use crate::cli::check::CheckOptions;
use crate::dataset::bucket::BucketSpec;

/// The bucket of one readable image; a finding when kohya would scale it up.
pub(super) fn check_size(
    spec: &BucketSpec,
    buckets: &[(u32, u32)],
    (w, h): (u32, u32),
    folder: &str,
    file: &str,
    out: &mut Collector,
    rep: &mut FolderReport,
) -> Option<(u32, u32)> {
    let Some(choice) = spec.select(w, h, buckets) else {
        out.push(
            Severity::Error,
            Code::SmallImage,
            folder.into(),
            vec![file.into()],
            format!(
                "{file}: {w}x{h} is smaller than one {}-pixel bucket step",
                spec.step
            ),
            "replace it with a larger picture or delete it".into(),
        );
        return None;
    };
    let (bw, bh) = choice.bucket;
    *rep.buckets.entry(format!("{bw}x{bh}")).or_default() += 1;
    let scale = choice.resized.0 as f64 / w as f64;
    if !spec.no_upscale && scale > 1.0 {
        let sev = if scale >= 1.5 {
            Severity::Warn
        } else {
            Severity::Info
        };
        out.push(
            sev,
            Code::SmallImage,
            folder.into(),
            vec![file.into()],
            format!("{file}: {w}x{h} is below its {bw}x{bh} bucket: kohya scales it up {scale:.2}x (soft detail)"),
            "use a larger original, or accept the blur (`sdkit prep --no-upscale` / kohya --bucket_no_upscale keeps it small)".into(),
        );
    }
    Some(choice.bucket)
}

pub(super) fn count_rule(n: usize, folder: &str, out: &mut Collector) {
    if n == 0 {
        return;
    }
    if n < rules::FEW_IMAGES_NOTE {
        let sev = if n < rules::FEW_IMAGES_WARN {
            Severity::Warn
        } else {
            Severity::Info
        };
        out.push(
            sev,
            Code::FewImages,
            folder.into(),
            vec![],
            format!("{n} images: character/person LoRAs usually use 15-50 varied images"),
            "add varied pictures (poses, framing, lighting, backgrounds); with fewer, raise repeats rather than epochs".into(),
        );
    } else if n > rules::MANY_IMAGES_NOTE {
        out.push(
            Severity::Info,
            Code::ManyImages,
            folder.into(),
            vec![],
            format!("{n} images: plenty for a style; for one character 15-50 well-chosen ones usually suffice"),
            "keep repeats low (1-3) so an epoch stays short; prune near-duplicates and weak shots".into(),
        );
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) fn trigger_rules(
    opts: &CheckOptions,
    c: &Concept,
    folder: &str,
    captions: &[(PathBuf, Vec<String>)],
    tag_lists: &[Vec<String>],
    rep: &mut FolderReport,
    out: &mut Collector,
    r: &dyn Fn(&Path) -> String,
) {
    if captions.is_empty() {
        return;
    }
    let trigger = rules::find_trigger(opts.trigger.as_deref(), &c.name, tag_lists);
    if let Some((t, src)) = &trigger {
        rep.trigger = Some(t.clone());
        rep.trigger_source = Some(*src);
        let miss = rules::missing_trigger(t, tag_lists);
        if !miss.is_empty() {
            let how = match src {
                rules::TriggerSource::Option => "--trigger",
                rules::TriggerSource::FolderName => "the folder name",
                rules::TriggerSource::Captions => "the first tag of most captions",
            };
            let sev = if miss.len() == captions.len() {
                Severity::Error
            } else {
                Severity::Warn
            };
            out.push(
                sev,
                Code::TriggerMissing,
                folder.into(),
                miss.iter().map(|&i| r(&captions[i].0)).collect(),
                format!(
                    "trigger \"{t}\" (from {how}) is missing from {} of {} captions",
                    miss.len(),
                    captions.len()
                ),
                format!("sdkit caption add {folder} \"{t}\" --position first"),
            );
        }
    } else if c.kind == Kind::Train {
        out.push(
            Severity::Info,
            Code::NoTrigger,
            folder.into(),
            vec![],
            "no trigger tag found: no tag opens most captions and the folder name is not a tag".into(),
            format!("add a rare token as the first tag: sdkit caption add {folder} ohwx --position first (or pass --trigger)"),
        );
    }
    let except: Vec<&str> = trigger
        .iter()
        .map(|(t, _)| t.as_str())
        .chain([c.name.as_str()])
        .collect();
    let every = rules::in_every_caption(tag_lists, &except);
    if !every.is_empty() {
        let list = every
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let what = if trigger.is_some() {
            "the trigger absorbs traits that are always present, so these tags teach nothing and become required in prompts"
        } else {
            "a tag in every caption acts as the trigger"
        };
        out.push(
            Severity::Info,
            Code::TagInEveryCaption,
            folder.into(),
            vec![],
            format!("{list} in all {} captions: {what}", captions.len()),
            format!(
                "prune them (sdkit caption remove {folder} {}) or make one the trigger (--trigger)",
                every
                    .iter()
                    .map(|t| format!("'{t}'"))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        );
    }
}

/// Buckets with 1-2 distinct images when there are at least 10 images in all.
pub(super) fn bucket_rules(
    samples: &[steps::Sample],
    files: &[(usize, PathBuf)],
    concepts: &[Concept],
    batch_size: u32,
    out: &mut Collector,
    r: &dyn Fn(&Path) -> String,
) {
    if samples.len() < 10 {
        return;
    }
    let mut by_bucket: BTreeMap<(u32, u32), Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        by_bucket.entry(s.bucket).or_default().push(i);
    }
    for ((w, h), members) in by_bucket {
        if members.len() > 2 {
            continue;
        }
        let ci = files[members[0]].0;
        let sev = if batch_size > 1 {
            Severity::Warn
        } else {
            Severity::Info
        };
        out.push(
            sev,
            Code::TinyBucket,
            r(&concepts[ci].dir),
            members.iter().map(|&i| r(&files[i].1)).collect(),
            format!(
                "bucket {w}x{h} holds only {} image(s){}",
                members.len(),
                if batch_size > 1 { ": its batches stay short of the batch size" } else { ": that shape is rarely seen" }
            ),
            "crop these to a common aspect ratio (`sdkit prep --crop 512x512`) or add more pictures of that shape".into(),
        );
    }
}

pub(super) fn reg_rules(
    e: &steps::Epoch,
    concepts: &[Concept],
    reports: &[FolderReport],
    out: &mut Collector,
    r: &dyn Fn(&Path) -> String,
) {
    let reg: Vec<(&Concept, &FolderReport)> = concepts
        .iter()
        .zip(reports)
        .filter(|(c, _)| c.kind == Kind::Reg && c.repeats != Some(0))
        .collect();
    if reg.is_empty() || e.train_samples == 0 {
        return;
    }
    let reg_images: usize = reg.iter().map(|(_, f)| f.images - f.unreadable).sum();
    let folder = r(&reg[0].0.dir);
    let t = e.train_samples;
    if e.reg_unused > 0 {
        out.push(
            Severity::Warn,
            Code::RegBalance,
            folder,
            vec![],
            format!(
                "{} of {reg_images} reg images are never used: kohya registers reg samples only up to the {t} training samples per epoch",
                e.reg_unused
            ),
            format!(
                "keep about {t} reg images at 1 repeat, or raise the training repeats; `sdkit prep --reg` balances this"
            ),
        );
    } else if e.reg_samples_on_disk < t {
        let per = t as f64 / reg_images.max(1) as f64;
        out.push(
            Severity::Info,
            Code::RegBalance,
            folder,
            vec![],
            format!(
                "{reg_images} reg images for {t} training samples: kohya repeats each reg image about {per:.1} times per epoch"
            ),
            format!("{t} reg images or more would each be seen once per epoch (more variety for the class)"),
        );
    }
}

pub(super) fn near_duplicates(
    concepts: &[Concept],
    facts: &[ImageFacts],
    max: u32,
    out: &mut Collector,
    r: &dyn Fn(&Path) -> String,
) {
    let files: Vec<(&Concept, &PathBuf)> = concepts
        .iter()
        .flat_map(|c| c.images.iter().map(move |p| (c, p)))
        .collect();
    let hashed: Vec<(usize, u64)> = facts
        .iter()
        .enumerate()
        .filter_map(|(i, f)| f.hash.map(|h| (i, h)))
        .collect();
    let hashes: Vec<u64> = hashed.iter().map(|(_, h)| *h).collect();
    for (a, b, d) in phash::near_pairs(&hashes, max) {
        let (ca, pa) = files[hashed[a].0];
        let (_, pb) = files[hashed[b].0];
        let what = if d == 0 {
            "look identical"
        } else {
            "look alike"
        };
        out.push(
            Severity::Warn,
            Code::NearDuplicate,
            r(&ca.dir),
            vec![r(pa), r(pb)],
            format!("{} and {} {what} (pHash distance {d} of 64)", r(pa), r(pb)),
            "keep the better one: duplicates weigh one shot double and the LoRA copies it".into(),
        );
    }
}
