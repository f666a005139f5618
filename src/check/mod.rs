//! `sdkit check`, the dataset doctor: reads a kohya layout (or any folder of images)
//! and reports, per concept folder, what would hurt training, each with a severity and
//! a concrete suggestion. Nothing is written.
//!
//! Images are probed, decoded (JPEGs at reduced size) and perceptually hashed in
//! parallel; captions are read and tokenized with the CLIP tokenizer.

mod emit;
pub mod findings;
pub mod folders;
pub mod phash;
pub mod rules;
pub mod steps;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::bail;
use rayon::prelude::*;
use serde::Serialize;

use crate::cli::check::CheckOptions;
use crate::dataset::bucket::BucketSpec;
use crate::dataset::caption_io::{Caption, caption_path, read_caption_text, split_tags};
use crate::dataset::decode::{self, Rgb8};
use crate::model::ClipTokenizer;
pub use findings::{Code, Counts, Finding, Severity};
use folders::Kind;

/// One folder's numbers.
#[derive(Debug, Serialize)]
pub struct FolderReport {
    /// Relative to the checked folder (`.` for itself).
    pub folder: String,
    pub kind: Kind,
    pub repeats: Option<u32>,
    /// kohya's class tokens: the folder name after `<repeats>_`.
    pub name: String,
    /// Images kohya reads here.
    pub images: usize,
    pub unreadable: usize,
    /// Images with a non-empty caption.
    pub captioned: usize,
    /// Readable images x repeats (1 for a plain folder).
    pub samples: u64,
    /// `samples x epochs / batch size`, rounded up (the usual back-of-envelope count;
    /// see `plan` for kohya's per-bucket count).
    pub steps: Option<u64>,
    /// Distinct images per kohya bucket (`WxH`).
    pub buckets: BTreeMap<String, usize>,
    pub trigger: Option<String>,
    pub trigger_source: Option<rules::TriggerSource>,
}

/// The training run kohya would make of this dataset.
#[derive(Debug, Serialize)]
pub struct Plan {
    pub batch_size: u32,
    /// `--epochs`, or what kohya's default of 1600 steps amounts to.
    pub epochs: u64,
    pub epochs_from_default_steps: bool,
    #[serde(flatten)]
    pub epoch: steps::Epoch,
    /// `epochs x batches per epoch`.
    pub total_steps: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    /// `kohya` (roots with `<n>_<name>` folders), `single` or `plain`.
    pub layout: &'static str,
    pub folders: Vec<FolderReport>,
    pub plan: Plan,
    pub findings: Vec<Finding>,
    pub counts: Counts,
}

/// What one image turned out to be.
struct ImageFacts {
    pub(crate) size: Result<(u32, u32), String>,
    pub(crate) hash: Option<u64>,
    caption: CaptionFacts,
}

enum CaptionFacts {
    Missing,
    Unreadable(String),
    /// The file has no bytes at all: kohya stops with "caption file is empty".
    ZeroBytes,
    Text(String),
}

/// Largest share of memory decoding may hold at once, in bytes.
const DECODE_BUDGET: u64 = 2 << 30;

fn analyse(path: &Path, caption_ext: &str, budget: &crate::util::budget::Budget) -> ImageFacts {
    let caption = match read_caption_text(&caption_path(path, caption_ext)) {
        Ok(None) => CaptionFacts::Missing,
        Ok(Some(s)) if s.is_empty() => CaptionFacts::ZeroBytes,
        Ok(Some(s)) => CaptionFacts::Text(Caption::parse(&s).text.trim().to_string()),
        Err(e) => CaptionFacts::Unreadable(e.to_string()),
    };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) => {
            return ImageFacts {
                size: Err(format!("cannot read: {e}")),
                hash: None,
                caption,
            };
        }
    };
    let size = match decode::probe_size(&bytes) {
        Ok(s) => s,
        Err(e) => {
            return ImageFacts {
                size: Err(e.to_string()),
                hash: None,
                caption,
            };
        }
    };
    let _permit = budget.acquire(size.0 as u64 * size.1 as u64 * 4);
    // JPEGs decode at up to 1/8 size, keeping at least 64 px for the 32 px thumbnail.
    let reduction = (size.0.min(size.1) / 64).clamp(1, 8);
    match decode::decode_bytes_reduced(&bytes, Rgb8::WHITE, reduction) {
        Ok(d) => ImageFacts {
            size: Ok(size),
            hash: Some(phash::phash(&d.image)),
            caption,
        },
        Err(e) => ImageFacts {
            size: Err(e.to_string()),
            hash: None,
            caption,
        },
    }
}

fn rel(root: &Path, p: &Path) -> String {
    let r = p
        .strip_prefix(root)
        .unwrap_or(p)
        .to_string_lossy()
        .replace('\\', "/");
    if r.is_empty() { ".".into() } else { r }
}

/// Checks `opts.dir`. Errors only for a missing or unreadable folder.
pub fn run(opts: &CheckOptions, progress: &indicatif::ProgressBar) -> anyhow::Result<Report> {
    let dir = &opts.dir;
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => bail!("{}: not a folder", dir.display()),
        Err(e) => bail!("{}: {e}", dir.display()),
    }
    let layout = folders::discover(dir)
        .map_err(|e| anyhow::anyhow!("{}: cannot list: {e}", dir.display()))?;
    let spec = BucketSpec {
        resolution: (opts.resolution.w, opts.resolution.h),
        min_bucket: opts.min_bucket,
        max_bucket: opts.max_bucket,
        step: opts.step,
        no_upscale: opts.no_upscale,
    };
    let bucket_list = spec.buckets();

    // Every image of every concept, analysed in parallel.
    let jobs: Vec<(usize, &PathBuf)> = layout
        .concepts
        .iter()
        .enumerate()
        .flat_map(|(ci, c)| c.images.iter().map(move |p| (ci, p)))
        .collect();
    progress.set_length(jobs.len() as u64);
    let budget = crate::util::budget::Budget::new(DECODE_BUDGET);
    let facts: Vec<ImageFacts> = jobs
        .par_iter()
        .map(|(_, p)| {
            let f = analyse(p, &opts.caption_ext, &budget);
            progress.inc(1);
            f
        })
        .collect();
    progress.finish_and_clear();

    let mut out = findings::Collector::default();
    let tok = ClipTokenizer::shared();
    let r = |p: &Path| rel(dir, p);

    for d in &layout.not_concepts {
        let n = layout_images(d);
        if n > 0 {
            out.push(
                Severity::Warn,
                Code::NotAConceptFolder,
                r(d),
                vec![],
                format!(
                    "kohya ignores this folder ({n} images): its name has no `<repeats>_` prefix"
                ),
                format!(
                    "rename it to `10_{}` (10 repeats) or move its images into a concept folder",
                    file_name(d)
                ),
            );
        }
    }
    if !layout.loose.is_empty() {
        let folder = layout.loose[0]
            .parent()
            .map(|p| r(p))
            .unwrap_or_else(|| ".".into());
        out.push(
            Severity::Warn,
            Code::IgnoredFile,
            folder,
            layout.loose.iter().map(|p| r(p)).collect(),
            format!("{} image(s) lie directly in a training root; kohya reads only `<repeats>_<name>` subfolders", layout.loose.len()),
            "move them into a concept folder such as `10_name/`".into(),
        );
    }

    // Per-concept findings.
    let mut reports = Vec::new();
    let mut samples: Vec<steps::Sample> = Vec::new();
    let mut sample_files: Vec<(usize, PathBuf)> = Vec::new();
    let mut triggers: Vec<String> = Vec::new();
    let mut reg_captions: Vec<(usize, Vec<(PathBuf, Vec<String>)>)> = Vec::new();
    let mut idx = 0;
    for (ci, c) in layout.concepts.iter().enumerate() {
        let f = &facts[idx..idx + c.images.len()];
        idx += c.images.len();
        let folder = r(&c.dir);
        let repeats = c.repeats.unwrap_or(1);
        let mut rep = FolderReport {
            folder: folder.clone(),
            kind: c.kind,
            repeats: c.repeats,
            name: c.name.clone(),
            images: c.images.len(),
            unreadable: 0,
            captioned: 0,
            samples: 0,
            steps: None,
            buckets: BTreeMap::new(),
            trigger: None,
            trigger_source: None,
        };
        if c.repeats == Some(0) {
            out.push(
                Severity::Error,
                Code::ZeroRepeats,
                folder.clone(),
                vec![],
                format!(
                    "kohya ignores a folder with 0 repeats ({} images)",
                    c.images.len()
                ),
                format!("rename it to `1_{}` or more repeats", c.name),
            );
            reports.push(rep);
            continue;
        }
        if !c.ignored.is_empty() {
            out.push(
                Severity::Warn,
                Code::IgnoredFile,
                folder.clone(),
                c.ignored.iter().map(|p| r(p)).collect(),
                format!(
                    "kohya does not read {} image(s) here: it reads only .png .jpg .jpeg .webp .bmp (all lower or all upper case) at the top of the folder",
                    c.ignored.len()
                ),
                "convert them (`sdkit prep` writes PNG), rename the extension, or move them up from subfolders".into(),
            );
        }
        if c.images.is_empty() {
            out.push(
                Severity::Warn,
                Code::NoImages,
                folder.clone(),
                vec![],
                "no images kohya can read: the folder is skipped".into(),
                "add images or remove the folder".into(),
            );
        }

        let mut captions: Vec<(PathBuf, Vec<String>)> = Vec::new();
        let (mut missing, mut empty, mut zero) = (Vec::new(), Vec::new(), Vec::new());
        let mut stems: HashMap<PathBuf, usize> = HashMap::new();
        for (p, fact) in c.images.iter().zip(f) {
            *stems.entry(p.with_extension("")).or_default() += 1;
            match &fact.size {
                Err(e) => {
                    rep.unreadable += 1;
                    out.push(
                        Severity::Error,
                        Code::UnreadableImage,
                        folder.clone(),
                        vec![r(p)],
                        format!("{}: {e}", r(p)),
                        "re-export or delete it: kohya stops when it cannot open an image".into(),
                    );
                }
                Ok((w, h)) => {
                    let s = emit::check_size(
                        &spec,
                        &bucket_list,
                        (*w, *h),
                        &folder,
                        &r(p),
                        &mut out,
                        &mut rep,
                    );
                    if let Some(bucket) = s {
                        samples.push(steps::Sample {
                            bucket,
                            repeats,
                            reg: c.kind == Kind::Reg,
                        });
                        sample_files.push((ci, p.clone()));
                    }
                }
            }
            match &fact.caption {
                CaptionFacts::Missing => missing.push(r(p)),
                CaptionFacts::ZeroBytes => zero.push(r(p)),
                CaptionFacts::Unreadable(e) => out.push(
                    Severity::Error,
                    Code::UnreadableCaption,
                    folder.clone(),
                    vec![r(p)],
                    e.clone(),
                    "save the caption as UTF-8: kohya stops on a caption it cannot decode".into(),
                ),
                CaptionFacts::Text(t) if t.is_empty() => empty.push(r(p)),
                CaptionFacts::Text(t) => {
                    rep.captioned += 1;
                    let ids = tok.encode(t);
                    if ids.len() > opts.max_token_length {
                        let tail = tok.decode(&ids[opts.max_token_length..]);
                        out.push(
                            Severity::Warn,
                            Code::LongCaption,
                            folder.clone(),
                            vec![r(p)],
                            format!(
                                "{}: {} CLIP tokens; kohya (max_token_length {}) drops the last {}: \"{}\"",
                                r(p),
                                ids.len(),
                                opts.max_token_length,
                                ids.len() - opts.max_token_length,
                                short(tail.trim(), 60)
                            ),
                            "shorten it (drop tags the trigger should absorb) or train with --max_token_length 150/225".into(),
                        );
                    }
                    captions.push((p.clone(), split_tags(t)));
                }
            }
        }
        let shared: Vec<String> = c
            .images
            .iter()
            .filter(|p| stems.get(&p.with_extension("")).is_some_and(|&n| n > 1))
            .map(|p| r(p))
            .collect();
        if !shared.is_empty() {
            out.push(
                Severity::Warn,
                Code::SharedCaption,
                folder.clone(),
                shared,
                "images with the same name but different extensions share one caption file".into(),
                "rename one of each pair (and give it its own caption)".into(),
            );
        }
        let fallback = if c.name.is_empty() {
            "an empty caption".to_string()
        } else {
            format!("the folder's class tokens \"{}\"", c.name)
        };
        if !missing.is_empty() {
            out.push(
                Severity::Warn,
                Code::MissingCaption,
                folder.clone(),
                missing,
                format!("no caption file: kohya trains these with {fallback}"),
                format!("write captions (`sdkit tag`, or `sdkit caption add {folder} TAG --create-missing`)"),
            );
        }
        if !zero.is_empty() {
            out.push(
                Severity::Error,
                Code::EmptyCaption,
                folder.clone(),
                zero,
                "caption file is empty (0 bytes): kohya stops with \"caption file is empty\""
                    .into(),
                "write a caption into it or delete the file".into(),
            );
        }
        if !empty.is_empty() {
            out.push(
                Severity::Warn,
                Code::EmptyCaption,
                folder.clone(),
                empty,
                "caption's first line is blank: these images train with an empty prompt".into(),
                "write a caption (kohya reads only the first line)".into(),
            );
        }

        rep.samples = (rep.images - rep.unreadable) as u64 * repeats as u64;
        if let Some(e) = opts.epochs {
            rep.steps = Some((rep.samples * e as u64).div_ceil(opts.batch_size.max(1) as u64));
        }
        let tag_lists: Vec<Vec<String>> = captions.iter().map(|(_, t)| t.clone()).collect();
        match c.kind {
            Kind::Reg => reg_captions.push((ci, captions)),
            Kind::Train | Kind::Plain => {
                emit::count_rule(rep.images - rep.unreadable, &folder, &mut out);
                emit::trigger_rules(
                    opts, c, &folder, &captions, &tag_lists, &mut rep, &mut out, &r,
                );
                if let Some(t) = &rep.trigger {
                    triggers.push(t.clone());
                }
            }
        }
        reports.push(rep);
    }

    // Reg captions that hold a training trigger.
    for (ci, caps) in &reg_captions {
        let hits: Vec<String> = caps
            .iter()
            .filter(|(_, t)| t.iter().any(|t| triggers.contains(t)))
            .map(|(p, _)| r(p))
            .collect();
        if !hits.is_empty() {
            out.push(
                Severity::Warn,
                Code::TriggerInReg,
                r(&layout.concepts[*ci].dir),
                hits,
                "regularisation captions hold the training trigger: the trigger then also learns the generic class".into(),
                "remove the trigger from reg captions (`sdkit caption remove DIR TRIGGER`)".into(),
            );
        }
    }

    // Buckets and steps over everything kohya trains on.
    let epoch = steps::epoch(&samples, opts.batch_size);
    let (epochs, from_default) = match opts.epochs {
        Some(e) => (e as u64, false),
        None if epoch.batches > 0 => (steps::KOHYA_DEFAULT_STEPS.div_ceil(epoch.batches), true),
        None => (0, true),
    };
    emit::bucket_rules(
        &samples,
        &sample_files,
        &layout.concepts,
        opts.batch_size,
        &mut out,
        &r,
    );
    emit::reg_rules(&epoch, &layout.concepts, &reports, &mut out, &r);
    emit::near_duplicates(&layout.concepts, &facts, opts.phash_distance, &mut out, &r);
    if jobs.is_empty() {
        out.push(
            Severity::Error,
            Code::NoImages,
            ".".into(),
            vec![],
            "no images found".into(),
            "point sdkit check at a kohya folder (`img/10_name`) or a folder of images".into(),
        );
    }
    let plan = Plan {
        batch_size: opts.batch_size.max(1),
        epochs,
        epochs_from_default_steps: from_default,
        total_steps: epochs * epoch.batches,
        epoch,
    };
    let findings = out.finish();
    Ok(Report {
        dir: dir.clone(),
        layout: layout.style,
        folders: reports,
        plan,
        counts: Counts::of(&findings),
        findings,
    })
}

fn layout_images(d: &Path) -> usize {
    walkdir::WalkDir::new(d)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && crate::caption::select::is_image(e.path()))
        .count()
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}
