//! `sdkit prep`: a folder of photos becomes a kohya-ready training set.
//!
//! Scan -> probe (hash + header) -> de-duplicate -> plan outputs -> decode, resize,
//! encode and write in parallel under a memory budget -> manifest and summary.
//! Inputs are only ever read; every output is written atomically; a re-run skips
//! sources whose content and settings are unchanged.

use super::bucket::BucketSpec;
use super::decode::{self, Rgb8};
use super::encode::{self, Format};
use super::layout;
use super::manifest::{Manifest, OutputRecord, SourceRecord};
use super::plan::{self, NoOutput, OutputPlan, Size, Sizing, Split};
use super::resize::{self, Filter, Rect};
use super::scan::{self, SourceFile};
use crate::util::budget::Budget;
use anyhow::{Context, bail};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Where a crop sits when the image is larger than the output.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Focus {
    #[default]
    Center,
    /// The detail-weighted focal point (edges and entropy).
    Focal,
}

/// Options of `sdkit prep`; the same names work as flags and as keys of a YAML recipe.
#[derive(Debug, Clone, clap::Args, Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(after_help = "Examples:
  sdkit prep photos/ --out train --name ron --repeats 10
  sdkit prep photos/ --out train --name ron --reg cats/ --class cat --flip
  sdkit prep photos/ --out set --crop 512x768 --focus focal --format jpg --quality 92
  sdkit prep photos/ --out set --dry-run --json
  sdkit prep photos/ --out train --name ron --matte u2net.onnx --save-masks")]
pub struct PrepOptions {
    /// Image files or folders (folders are scanned recursively).
    #[arg(required = true, value_name = "INPUT")]
    pub inputs: Vec<PathBuf>,
    /// Output folder (created if missing; never inside an input).
    #[arg(short, long, value_name = "DIR")]
    pub out: PathBuf,

    /// Training resolution: bucket area for bucketing, the box for --fit.
    #[arg(
        long,
        default_value = "512",
        value_name = "WxH",
        help_heading = "Sizing"
    )]
    pub resolution: Size,
    /// Smallest bucket side (kohya min_bucket_reso).
    #[arg(long, default_value_t = 256, help_heading = "Sizing")]
    pub min_bucket: u32,
    /// Largest bucket side (kohya max_bucket_reso).
    #[arg(long, default_value_t = 1024, help_heading = "Sizing")]
    pub max_bucket: u32,
    /// Bucket step (kohya bucket_reso_steps); 64 for SD.
    #[arg(long, default_value_t = 64, help_heading = "Sizing")]
    pub step: u32,
    /// kohya bucket_no_upscale: buckets follow each image, nothing is scaled up.
    #[arg(long, help_heading = "Sizing")]
    pub no_upscale: bool,
    /// Instead of buckets: scale to cover WxH, then crop.
    #[arg(long, value_name = "WxH", conflicts_with_all = ["fit", "pad"], help_heading = "Sizing")]
    pub crop: Option<Size>,
    /// Instead of buckets: scale down into the --resolution box, trim sides to multiples of 64.
    #[arg(long, conflicts_with = "pad", help_heading = "Sizing")]
    pub fit: bool,
    /// Instead of buckets: scale to fit WxH and letterbox onto --background.
    #[arg(long, value_name = "WxH", help_heading = "Sizing")]
    pub pad: Option<Size>,
    /// Where crops sit: the centre (kohya) or the detail-weighted focal point.
    #[arg(long, value_enum, default_value_t, help_heading = "Sizing")]
    pub focus: Focus,
    /// Resampling filter.
    #[arg(long, value_enum, default_value_t, help_heading = "Sizing")]
    pub filter: Filter,
    /// Split very wide or tall images into overlapping tiles (A1111 style).
    #[arg(long, help_heading = "Sizing")]
    pub split_oversized: bool,
    /// Split when short side / long side is below this.
    #[arg(long, default_value_t = 0.5, help_heading = "Sizing")]
    pub split_threshold: f64,
    /// Tile overlap share when splitting.
    #[arg(long, default_value_t = 0.2, help_heading = "Sizing")]
    pub split_overlap: f64,
    /// Skip images whose shorter side is below this many pixels.
    #[arg(long, default_value_t = 0, value_name = "PX", help_heading = "Sizing")]
    pub min_size: u32,
    /// Keep images below --min-size and scale them up.
    #[arg(long, help_heading = "Sizing")]
    pub allow_upscale: bool,

    /// Colour that transparency is composited onto (white, black, #rrggbb, r,g,b).
    #[arg(long, default_value = "white", help_heading = "Output")]
    pub background: Rgb8,
    /// Also write a mirrored copy of every output (caption copied).
    #[arg(long, help_heading = "Output")]
    pub flip: bool,
    /// Keep exact duplicates (same bytes) instead of skipping them.
    #[arg(long, help_heading = "Output")]
    pub keep_duplicates: bool,
    /// Output image format (webp is lossless).
    #[arg(long, value_enum, default_value_t, help_heading = "Output")]
    pub format: Format,
    /// JPEG quality, 1-100.
    #[arg(long, default_value_t = 95, value_parser = clap::value_parser!(u8).range(1..=100), help_heading = "Output")]
    pub quality: u8,
    /// Caption sidecar extensions looked for next to each source, in order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = ".txt,.caption",
        help_heading = "Output"
    )]
    pub caption_ext: Vec<String>,
    /// Extension of the caption files written next to outputs.
    #[arg(long, default_value = ".txt", help_heading = "Output")]
    pub out_caption_ext: String,

    /// Concept name: outputs go to OUT/img/<repeats>_<name>/ (kohya layout).
    #[arg(long, help_heading = "Layout")]
    pub name: Option<String>,
    /// Repeats per epoch, the number in the concept folder name.
    #[arg(long, default_value_t = 10, help_heading = "Layout")]
    pub repeats: u32,
    /// Regularisation images, written to OUT/reg/<n>_<class>/ with balancing repeats.
    #[arg(long, value_name = "DIR", requires = "class", help_heading = "Layout")]
    pub reg: Option<PathBuf>,
    /// Class word of the regularisation images (e.g. cat).
    #[arg(long = "class", value_name = "WORD", help_heading = "Layout")]
    pub class: Option<String>,

    /// Cut subjects out with this rembg-compatible ONNX model (u2net, isnet, birefnet; a
    /// file, or a known name fetched on first use: sdkit models list) and composite them
    /// onto --background before resizing (needs onnxruntime).
    #[arg(long, value_name = "MODEL.onnx|NAME", help_heading = "Matting")]
    pub matte: Option<PathBuf>,
    /// The model's family, i.e. its rembg preprocessing contract (models/*.yaml).
    #[arg(long, value_enum, default_value_t, help_heading = "Matting")]
    pub matte_kind: crate::matte::KindArg,
    /// Also write each output's mask (white = subject) to OUT/masks/<output path>.png,
    /// for kohya masked loss (conditioning_data_dir = OUT/masks/img/<repeats>_<name>).
    #[arg(long, requires = "matte", help_heading = "Matting")]
    pub save_masks: bool,
    /// Images per matting model call.
    #[arg(long, default_value_t = 4, help_heading = "Matting")]
    pub matte_batch: usize,
    /// Where the matting model runs.
    #[arg(long, value_enum, default_value_t, help_heading = "Matting")]
    pub matte_device: crate::tag::runtime::Device,

    /// Redo every source, even unchanged ones.
    #[arg(long, help_heading = "Run")]
    pub force: bool,
    /// Show the plan only; write nothing.
    #[arg(long, help_heading = "Run")]
    pub dry_run: bool,
    /// Exit 0 even when some images failed.
    #[arg(long, help_heading = "Run")]
    pub keep_going: bool,
    /// Worker threads (default: all cores).
    #[arg(short, long, help_heading = "Run")]
    pub jobs: Option<usize>,
    /// Memory budget for images being processed at once, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB", help_heading = "Run")]
    pub memory_limit: u64,
    /// No progress bar, summary only.
    #[arg(short, long, help_heading = "Run")]
    pub quiet: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long, help_heading = "Run")]
    pub json: bool,
}

/// A skipped or failed source.
#[derive(Debug, Clone, Serialize)]
pub struct Issue {
    pub source: String,
    pub reason: String,
}

/// What a run did (or, with --dry-run, would do).
#[derive(Debug, Default, Serialize)]
pub struct PrepSummary {
    pub dry_run: bool,
    pub sources: usize,
    /// Output images written this run.
    pub written: usize,
    /// Output images already up to date.
    pub unchanged: usize,
    pub upscaled: usize,
    pub captions: usize,
    pub non_images: usize,
    pub skipped: Vec<Issue>,
    pub failed: Vec<Issue>,
    /// Output size -> count.
    pub buckets: BTreeMap<String, usize>,
    pub train_dir: String,
    pub train_images: usize,
    pub train_samples: u64,
    /// Repeats of the training concept folder (with --name).
    pub repeats: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reg: Option<RegSummary>,
    /// The matting model and contract (with --matte).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matte: Option<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct RegSummary {
    pub dir: String,
    pub images: usize,
    pub repeats: u32,
    pub samples: u64,
}

/// A source ready to process.
struct Job {
    src: SourceFile,
    key: String,
    bytes: u64,
    hash: String,
    dims: (u32, u32),
    plans: Vec<OutputPlan>,
    base: String,
    caption: Option<PathBuf>,
}

enum Outcome {
    Done {
        record: SourceRecord,
        written: usize,
        unchanged: usize,
        upscaled: usize,
        captions: usize,
    },
    Failed(String),
}

struct Ctx<'a> {
    opts: &'a PrepOptions,
    sizing: Sizing,
    buckets: Vec<(u32, u32)>,
    split: Option<Split>,
    settings: String,
    manifest: &'a Manifest,
    budget: Budget,
    disk_full: AtomicBool,
    matte: Option<crate::matte::Matter>,
}

impl PrepOptions {
    fn sizing(&self) -> anyhow::Result<Sizing> {
        let check64 = |s: Size, what: &str| -> anyhow::Result<Size> {
            if s.w % 64 != 0 || s.h % 64 != 0 {
                bail!(
                    "--{what} {s}: both sides must be multiples of 64 (Stable Diffusion needs it)"
                );
            }
            Ok(s)
        };
        Ok(if let Some(s) = self.crop {
            Sizing::Crop(check64(s, "crop")?)
        } else if let Some(s) = self.pad {
            Sizing::Pad(check64(s, "pad")?)
        } else if self.fit {
            Sizing::Fit(self.resolution)
        } else {
            if self.step == 0 || self.step % 8 != 0 {
                bail!(
                    "--step {}: must be a positive multiple of 8 (64 for Stable Diffusion)",
                    self.step
                );
            }
            if self.min_bucket > self.max_bucket {
                bail!(
                    "--min-bucket {} is larger than --max-bucket {}",
                    self.min_bucket,
                    self.max_bucket
                );
            }
            Sizing::Bucket(BucketSpec {
                resolution: (self.resolution.w, self.resolution.h),
                min_bucket: self.min_bucket,
                max_bucket: self.max_bucket,
                step: self.step,
                no_upscale: self.no_upscale,
            })
        })
    }

    /// A fingerprint of everything that shapes output pixels and names.
    fn settings_fingerprint(&self) -> String {
        let s = serde_json::json!({
            "v": 1, "resolution": self.resolution, "min_bucket": self.min_bucket,
            "max_bucket": self.max_bucket, "step": self.step, "no_upscale": self.no_upscale,
            "crop": self.crop, "fit": self.fit, "pad": self.pad, "focus": self.focus,
            "filter": self.filter, "split": self.split_oversized, "split_threshold": self.split_threshold,
            "split_overlap": self.split_overlap, "background": self.background, "flip": self.flip,
            "format": self.format, "quality": self.quality,
        });
        blake3::hash(s.to_string().as_bytes()).to_hex()[..16].to_string()
    }

    /// The fingerprint with the matting model (its content), kind and mask setting
    /// added; without --matte it is [`Self::settings_fingerprint`] unchanged.
    fn settings_with_matte(&self) -> anyhow::Result<String> {
        let base = self.settings_fingerprint();
        let Some(model) = &self.matte else {
            return Ok(base);
        };
        let mut h = blake3::Hasher::new();
        let mut f = std::fs::File::open(model)
            .with_context(|| format!("{}: cannot read the matting model", model.display()))?;
        std::io::copy(&mut f, &mut h)
            .with_context(|| format!("{}: cannot read the matting model", model.display()))?;
        let s = serde_json::json!({
            "base": base, "matte": h.finalize().to_hex().as_str(),
            "kind": self.matte_kind, "masks": self.save_masks,
        });
        Ok(blake3::hash(s.to_string().as_bytes()).to_hex()[..16].to_string())
    }
}

/// Absolute path with `..` resolved as far as the file system allows (the path may
/// not exist yet).
fn absolute(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.clone();
    let mut tail = Vec::new();
    while !existing.exists() {
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                tail.push(name.to_os_string());
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
    let mut out = existing.canonicalize().unwrap_or(existing);
    out.extend(tail.iter().rev());
    out
}

fn check_not_nested(out: &Path, inputs: &[PathBuf]) -> anyhow::Result<()> {
    let out_abs = absolute(out);
    for input in inputs {
        if !input.exists() {
            bail!("{}: no such file or folder", input.display());
        }
        let in_abs = absolute(input);
        if out_abs.starts_with(&in_abs) && input.is_dir() {
            bail!(
                "output {} is inside input {}: choose an output folder outside the photos",
                out.display(),
                input.display()
            );
        }
        if in_abs.starts_with(&out_abs) {
            bail!(
                "input {} is inside output {}: choose another output folder",
                input.display(),
                out.display()
            );
        }
    }
    Ok(())
}

/// Runs prep; `on_progress` is called once per finished source.
pub fn run(opts: &PrepOptions, progress: &indicatif::ProgressBar) -> anyhow::Result<PrepSummary> {
    let sizing = opts.sizing()?;
    if opts.reg.is_some() && opts.name.is_none() {
        bail!("--reg needs --name: the training images go to OUT/img/<repeats>_<name>/");
    }
    if let Some(n) = &opts.name {
        if n.trim().is_empty() || n.contains(['/', '\\']) {
            bail!("--name '{n}': must be a non-empty name without slashes");
        }
    }
    if opts.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let mut all_inputs = opts.inputs.clone();
    all_inputs.extend(opts.reg.iter().cloned());
    check_not_nested(&opts.out, &all_inputs)?;
    if !opts.dry_run {
        crate::util::atomic::create_dir_all(&opts.out)?;
    }
    let buckets = match sizing {
        Sizing::Bucket(spec) => spec.buckets(),
        _ => vec![],
    };
    let split = opts.split_oversized.then_some(Split {
        threshold: opts.split_threshold,
        overlap: opts.split_overlap,
    });
    let settings = opts.settings_with_matte()?;
    let matte = match &opts.matte {
        Some(model) if !opts.dry_run => Some(crate::matte::Matter::open(
            model,
            opts.matte_kind,
            opts.matte_batch,
            0,
            opts.matte_device,
        )?),
        _ => None,
    };
    let manifest = Manifest::load(&opts.out);
    let mb = 1024 * 1024;
    let ctx = Ctx {
        opts,
        sizing,
        buckets,
        split,
        settings,
        manifest: &manifest,
        budget: Budget::new(opts.memory_limit.max(64) * mb),
        disk_full: AtomicBool::new(false),
        matte,
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.jobs.unwrap_or(0))
        .build()
        .context("cannot start worker threads")?;

    let mut summary = PrepSummary {
        dry_run: opts.dry_run,
        matte: ctx.matte.as_ref().map(|m| m.describe()),
        ..Default::default()
    };
    let train_scan = scan::scan(&opts.inputs, &opts.caption_ext);
    let reg_scan = opts
        .reg
        .as_ref()
        .map(|r| scan::scan(std::slice::from_ref(r), &opts.caption_ext));
    summary.sources = train_scan.images.len() + reg_scan.as_ref().map_or(0, |s| s.images.len());
    summary.non_images = train_scan.other_files + reg_scan.as_ref().map_or(0, |s| s.other_files);
    for e in train_scan
        .errors
        .iter()
        .chain(reg_scan.iter().flat_map(|s| s.errors.iter()))
    {
        let (s, r) = e.split_once(": ").unwrap_or((e, "unreadable"));
        summary.failed.push(Issue {
            source: s.into(),
            reason: r.into(),
        });
    }
    progress.set_length(summary.sources as u64);

    let mut seen: HashMap<String, String> = HashMap::new();
    let mut new_records: BTreeMap<String, SourceRecord> = manifest.records.clone();

    // Training images.
    let train_jobs =
        pool.install(|| prepare(&ctx, train_scan.images, &mut seen, &mut summary, progress));
    let train_dir = match &opts.name {
        Some(n) => format!("img/{}", layout::concept_dir(opts.repeats, n)),
        None => String::new(),
    };
    let train_out = pool.install(|| execute(&ctx, &train_jobs, &train_dir, "train", progress));
    let train_images = absorb(train_out, &train_jobs, &mut summary, &mut new_records);
    summary.train_dir = display_dir(&opts.out, &train_dir);
    summary.train_images = train_images;
    summary.train_samples = train_images as u64 * opts.repeats as u64;
    summary.repeats = opts.name.as_ref().map(|_| opts.repeats);

    // Regularisation images, balanced against the training samples.
    if let (Some(scan), Some(class)) = (reg_scan, &opts.class) {
        let reg_jobs =
            pool.install(|| prepare(&ctx, scan.images, &mut seen, &mut summary, progress));
        let planned: usize = reg_jobs.iter().map(|j| j.plans.len()).sum();
        let repeats = layout::reg_repeats(summary.train_samples, planned as u64);
        let reg_dir = format!("reg/{}", layout::concept_dir(repeats, class));
        let reg_out = pool.install(|| execute(&ctx, &reg_jobs, &reg_dir, "reg", progress));
        let reg_images = absorb(reg_out, &reg_jobs, &mut summary, &mut new_records);
        summary.reg = Some(RegSummary {
            dir: display_dir(&opts.out, &reg_dir),
            images: reg_images,
            repeats,
            samples: reg_images as u64 * repeats as u64,
        });
    }
    progress.finish_and_clear();

    if !opts.dry_run {
        let mut m = manifest;
        m.compact(&new_records)
            .with_context(|| format!("cannot write the manifest in {}", opts.out.display()))?;
        remove_empty_concept_dirs(&opts.out);
    }
    Ok(summary)
}

fn display_dir(out: &Path, rel: &str) -> String {
    if rel.is_empty() {
        out.display().to_string()
    } else {
        out.join(rel).display().to_string()
    }
}

/// Hashes and probes sources, drops duplicates and too-small images, plans outputs.
fn prepare(
    ctx: &Ctx,
    images: Vec<SourceFile>,
    seen: &mut HashMap<String, String>,
    summary: &mut PrepSummary,
    progress: &indicatif::ProgressBar,
) -> Vec<Job> {
    let probed: Vec<(SourceFile, Result<(u64, String, (u32, u32)), String>)> = images
        .into_par_iter()
        .map(|src| {
            let r = std::fs::read(&src.path)
                .map_err(|e| format!("cannot read: {e}"))
                .and_then(|bytes| {
                    let hash = blake3::hash(&bytes).to_hex().to_string();
                    let dims = decode::probe_size(&bytes).map_err(|e| e.to_string())?;
                    Ok((bytes.len() as u64, hash, dims))
                });
            (src, r)
        })
        .collect();
    let mut jobs = Vec::new();
    for (src, r) in probed {
        let shown = src.path.display().to_string();
        let (bytes, hash, dims) = match r {
            Ok(v) => v,
            Err(reason) => {
                summary.failed.push(Issue {
                    source: shown,
                    reason,
                });
                progress.inc(1);
                continue;
            }
        };
        if !ctx.opts.keep_duplicates {
            if let Some(first) = seen.get(&hash) {
                summary.skipped.push(Issue {
                    source: shown,
                    reason: format!("duplicate of {first}"),
                });
                progress.inc(1);
                continue;
            }
            seen.insert(hash.clone(), shown.clone());
        }
        if dims.0.min(dims.1) < ctx.opts.min_size && !ctx.opts.allow_upscale {
            let reason = format!(
                "too small: {}x{} is below --min-size {} (use --allow-upscale to keep it)",
                dims.0, dims.1, ctx.opts.min_size
            );
            summary.skipped.push(Issue {
                source: shown,
                reason,
            });
            progress.inc(1);
            continue;
        }
        let plans = match plan::plan_source(dims.0, dims.1, &ctx.sizing, &ctx.buckets, ctx.split) {
            Ok(p) => p,
            Err(NoOutput::TooSmall(why)) => {
                summary.skipped.push(Issue {
                    source: shown,
                    reason: format!("too small: {why}"),
                });
                progress.inc(1);
                continue;
            }
        };
        let plans = if ctx.opts.flip {
            plans
                .into_iter()
                .flat_map(|p| [p.clone(), OutputPlan { flip: true, ..p }])
                .collect()
        } else {
            plans
        };
        let key = absolute(&src.path).to_string_lossy().into_owned();
        let base = layout::output_base(&src.rel);
        let caption = super::caption_io::find_sidecar(&src.path, &ctx.opts.caption_ext);
        jobs.push(Job {
            src,
            key,
            bytes,
            hash,
            dims,
            plans,
            base,
            caption,
        });
    }
    jobs
}

fn absorb(
    out: Vec<Outcome>,
    jobs: &[Job],
    summary: &mut PrepSummary,
    records: &mut BTreeMap<String, SourceRecord>,
) -> usize {
    let mut images = 0;
    for (o, job) in out.into_iter().zip(jobs) {
        match o {
            Outcome::Done {
                record,
                written,
                unchanged,
                upscaled,
                captions,
            } => {
                summary.written += written;
                summary.unchanged += unchanged;
                summary.upscaled += upscaled;
                summary.captions += captions;
                images += record.outputs.len();
                for r in &record.outputs {
                    *summary
                        .buckets
                        .entry(format!("{}x{}", r.size.0, r.size.1))
                        .or_default() += 1;
                }
                records.insert(record.source.clone(), record);
            }
            Outcome::Failed(reason) => summary.failed.push(Issue {
                source: job.src.path.display().to_string(),
                reason,
            }),
        }
    }
    images
}

fn output_name(job: &Job, p: &OutputPlan, ext: &str) -> String {
    let mut s = job.base.clone();
    if let Some(t) = p.tile {
        s.push_str(&format!("-t{t}"));
    }
    if p.flip {
        s.push_str("-flip");
    }
    s.push('.');
    s.push_str(ext.trim_start_matches('.'));
    s
}

fn join_rel(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn execute(
    ctx: &Ctx,
    jobs: &[Job],
    dir: &str,
    group: &str,
    progress: &indicatif::ProgressBar,
) -> Vec<Outcome> {
    if !ctx.opts.dry_run && !dir.is_empty() {
        if let Err(e) = crate::util::atomic::create_dir_all(&ctx.opts.out.join(dir)) {
            return jobs
                .iter()
                .map(|_| Outcome::Failed(e.to_string()))
                .collect();
        }
    }
    jobs.par_iter()
        .map(|job| {
            let r = if ctx.disk_full.load(Ordering::Relaxed) {
                Outcome::Failed("not processed: the output disk is full".into())
            } else {
                process(ctx, job, dir, group)
            };
            progress.inc(1);
            r
        })
        .collect()
}

/// Output records for a job, with the final crop boxes (`focal` moves movable crops).
fn records_for(
    ctx: &Ctx,
    job: &Job,
    dir: &str,
    focal: Option<(f64, f64)>,
) -> Vec<(OutputRecord, OutputPlan)> {
    let ext = ctx.opts.format.extension();
    job.plans
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if let (Some((fx, fy)), true) = (focal, p.movable) {
                p.crop.x = (fx - p.crop.w / 2.0).clamp(0.0, job.dims.0 as f64 - p.crop.w);
                p.crop.y = (fy - p.crop.h / 2.0).clamp(0.0, job.dims.1 as f64 - p.crop.h);
            }
            let path = join_rel(dir, &output_name(job, &p, ext));
            let caption = job
                .caption
                .as_ref()
                .map(|_| join_rel(dir, &output_name(job, &p, &ctx.opts.out_caption_ext)));
            let mask = ctx
                .opts
                .save_masks
                .then(|| crate::matte::masks::mask_path(&path));
            let rec = OutputRecord {
                path,
                size: p.size,
                bucket: p.bucket,
                crop: [p.crop.x, p.crop.y, p.crop.w, p.crop.h],
                flip: p.flip,
                tile: p.tile,
                caption,
                mask,
            };
            (rec, p)
        })
        .collect()
}

fn io_reason(what: &str, path: &Path, e: &std::io::Error, ctx: &Ctx) -> String {
    if e.kind() == std::io::ErrorKind::StorageFull {
        ctx.disk_full.store(true, Ordering::Relaxed);
        return format!("cannot {what} {}: the disk is full", path.display());
    }
    format!("cannot {what} {}: {e}", path.display())
}

fn process(ctx: &Ctx, job: &Job, dir: &str, group: &str) -> Outcome {
    match process_inner(ctx, job, dir, group) {
        Ok(o) => o,
        Err(reason) => Outcome::Failed(reason),
    }
}

fn process_inner(ctx: &Ctx, job: &Job, dir: &str, group: &str) -> Result<Outcome, String> {
    let out = &ctx.opts.out;
    let prev = ctx.manifest.records.get(&job.key);
    let reusable = !ctx.opts.force
        && prev.is_some_and(|r| {
            r.source_hash == job.hash
                && r.settings == ctx.settings
                && r.outputs.len() == job.plans.len()
        });
    let mut record = SourceRecord {
        source: job.key.clone(),
        source_bytes: job.bytes,
        source_hash: job.hash.clone(),
        source_size: job.dims,
        group: group.into(),
        settings: ctx.settings.clone(),
        outputs: vec![],
    };

    // Unchanged source: keep (or move, when the concept folder was renamed) its outputs.
    if let (true, Some(prev)) = (reusable, prev) {
        let mut outputs = Vec::new();
        let mut ok = true;
        for old in &prev.outputs {
            let mut rec = old.clone();
            let name = old.path.rsplit('/').next().unwrap_or(&old.path);
            rec.path = join_rel(dir, name);
            let (from, to) = (out.join(&old.path), out.join(&rec.path));
            if !to.is_file() {
                if from.is_file() && !ctx.opts.dry_run {
                    if std::fs::rename(&from, &to).is_err() {
                        ok = false;
                    }
                } else if !(from.is_file() && ctx.opts.dry_run) {
                    ok = false;
                }
            }
            // The mask (--save-masks) follows its image.
            rec.mask = ctx
                .opts
                .save_masks
                .then(|| crate::matte::masks::mask_path(&rec.path));
            if let Some(new) = &rec.mask {
                ok &= move_mask(out, old.mask.as_deref(), new, ctx.opts.dry_run);
            }
            outputs.push(rec);
        }
        if ok {
            let old_captions: Vec<Option<String>> =
                prev.outputs.iter().map(|o| o.caption.clone()).collect();
            for (rec, old_cap) in outputs.iter_mut().zip(old_captions) {
                rec.caption = job.caption.as_ref().map(|_| {
                    let stem = rec
                        .path
                        .rsplit_once('.')
                        .map(|(s, _)| s)
                        .unwrap_or(&rec.path);
                    format!(
                        "{stem}.{}",
                        ctx.opts.out_caption_ext.trim_start_matches('.')
                    )
                });
                if let (Some(old), false) = (old_cap, ctx.opts.dry_run) {
                    if rec.caption.as_deref() != Some(old.as_str()) {
                        let _ = std::fs::remove_file(out.join(&old));
                    }
                }
            }
            let captions = sync_captions(ctx, job, &outputs)?;
            record.outputs = outputs;
            if !ctx.opts.dry_run && prev.outputs != record.outputs {
                ctx.manifest.append(&record).map_err(|e| {
                    io_reason("write", &out.join(super::manifest::FILE_NAME), &e, ctx)
                })?;
            }
            return Ok(Outcome::Done {
                unchanged: record.outputs.len(),
                written: 0,
                upscaled: 0,
                captions,
                record,
            });
        }
    }

    if ctx.opts.dry_run {
        let recs = records_for(ctx, job, dir, None);
        let upscaled = recs.iter().filter(|(_, p)| p.upscaled()).count();
        record.outputs = recs.into_iter().map(|(r, _)| r).collect();
        let n = record.outputs.len();
        return Ok(Outcome::Done {
            written: n,
            unchanged: 0,
            upscaled,
            captions: 0,
            record,
        });
    }

    // Decode under the memory budget: pixels as decoded (up to 8 bytes each with 16-bit
    // alpha), the RGB result, and the encoded bytes.
    let px = job.dims.0 as u64 * job.dims.1 as u64;
    // Matting also holds the source RGBA, the mask and the composite at full size.
    let per_px = if ctx.matte.is_some() { 19 } else { 11 };
    let _permit = ctx.budget.acquire(px * per_px + job.bytes);
    let bytes = std::fs::read(&job.src.path).map_err(|e| format!("cannot read: {e}"))?;
    if blake3::hash(&bytes).to_hex().as_str() != job.hash {
        return Err("changed while being read; run again".into());
    }
    // JPEG draft decoding: keep at least 2x of real downscaling after the DCT reduction.
    let shrink = job
        .plans
        .iter()
        .map(|p| (p.crop.w / p.scaled.0 as f64).min(p.crop.h / p.scaled.1 as f64))
        .fold(f64::INFINITY, f64::min);
    let reduction = [8u32, 4, 2]
        .into_iter()
        .find(|r| shrink >= 2.0 * *r as f64)
        .unwrap_or(1);
    let (img, alpha) = match &ctx.matte {
        // rembg runs the model on the full-size decode; so does sdkit.
        Some(m) => {
            let any = decode::decode_bytes_any(&bytes).map_err(|e| e.to_string())?;
            drop(bytes);
            let (img, alpha) = m.matte(any.image, ctx.opts.background.0)?;
            (img, Some(alpha))
        }
        None => {
            let decoded = decode::decode_bytes_reduced(&bytes, ctx.opts.background, reduction)
                .map_err(|e| e.to_string())?;
            drop(bytes);
            (decoded.image, None)
        }
    };
    // Plans are in full-size source pixels; the decoded image may be reduced.
    let (kx, ky) = (
        img.width() as f64 / job.dims.0 as f64,
        img.height() as f64 / job.dims.1 as f64,
    );
    if !(0.1..=1.0).contains(&kx)
        || !(0.1..=1.0).contains(&ky)
        || ((reduction == 1 || alpha.is_some()) && img.dimensions() != job.dims)
    {
        return Err(format!(
            "header says {}x{} but pixels are {:?}",
            job.dims.0,
            job.dims.1,
            img.dimensions()
        ));
    }
    let focal = match ctx.opts.focus {
        Focus::Focal => job.plans.iter().find(|p| p.movable).map(|p| {
            let (fx, fy) = super::focal::focal_point(&img, p.crop.w * kx, p.crop.h * ky);
            (fx / kx, fy / ky)
        }),
        Focus::Center => None,
    };
    let recs = records_for(ctx, job, dir, focal);
    let mut upscaled = 0;
    let mut cache: Option<(Rect, (u32, u32), image::RgbImage)> = None;
    for (rec, p) in &recs {
        if p.upscaled() {
            upscaled += 1;
        }
        // A flipped copy reuses the resize of the plain output just before it.
        let scaled = match &cache {
            Some((c, s, im)) if *c == p.crop && *s == p.scaled => im.clone(),
            _ => {
                let im =
                    resize::resize_region(&img, p.crop, p.scaled.0, p.scaled.1, ctx.opts.filter);
                cache = Some((p.crop, p.scaled, im.clone()));
                im
            }
        };
        let mut canvas = if p.size != p.scaled {
            let mut c =
                image::RgbImage::from_pixel(p.size.0, p.size.1, image::Rgb(ctx.opts.background.0));
            image::imageops::replace(&mut c, &scaled, p.offset.0 as i64, p.offset.1 as i64);
            c
        } else {
            scaled
        };
        if p.flip {
            image::imageops::flip_horizontal_in_place(&mut canvas);
        }
        let path = out.join(&rec.path);
        crate::util::write_atomic_with(&path, |w| {
            encode::encode(&canvas, ctx.opts.format, ctx.opts.quality, w)
        })
        .map_err(|e| io_reason("write", &path, &e, ctx))?;
        if let (Some(rel), Some(alpha)) = (&rec.mask, &alpha) {
            let mask = crate::matte::masks::place(alpha, p, ctx.opts.filter);
            let path = out.join(rel);
            crate::matte::masks::write(&path, &mask)
                .map_err(|e| io_reason("write", &path, &e, ctx))?;
        }
    }
    record.outputs = recs.into_iter().map(|(r, _)| r).collect();
    // Outputs of an earlier run of this source that this run no longer produces.
    if let Some(prev) = prev {
        for old in &prev.outputs {
            let extra = old.caption.iter().chain(old.mask.iter());
            for stale in std::iter::once(&old.path).chain(extra) {
                let keep = record.outputs.iter().any(|o| {
                    &o.path == stale
                        || o.caption.as_ref() == Some(stale)
                        || o.mask.as_ref() == Some(stale)
                });
                if !keep {
                    let _ = std::fs::remove_file(out.join(stale));
                }
            }
        }
    }
    let captions = sync_captions(ctx, job, &record.outputs)?;
    ctx.manifest
        .append(&record)
        .map_err(|e| io_reason("write", &out.join(super::manifest::FILE_NAME), &e, ctx))?;
    let written = record.outputs.len();
    Ok(Outcome::Done {
        written,
        unchanged: 0,
        upscaled,
        captions,
        record,
    })
}

/// Copies the source's caption sidecar (verbatim) next to each output, when it differs.
fn sync_captions(ctx: &Ctx, job: &Job, outputs: &[OutputRecord]) -> Result<usize, String> {
    let Some(src) = &job.caption else {
        return Ok(0);
    };
    if ctx.opts.dry_run {
        return Ok(outputs.len());
    }
    let text =
        std::fs::read(src).map_err(|e| format!("cannot read caption {}: {e}", src.display()))?;
    let mut n = 0;
    for o in outputs {
        let Some(rel) = &o.caption else { continue };
        let path = ctx.opts.out.join(rel);
        if std::fs::read(&path).ok().as_deref() != Some(&text[..]) {
            crate::util::write_atomic(&path, &text)
                .map_err(|e| io_reason("write", &path, &e, ctx))?;
        }
        n += 1;
    }
    Ok(n)
}

/// Moves an unchanged output's mask to its new path (`to`, when the concept folder
/// was renamed); false when the mask is missing and must be made again.
fn move_mask(out: &Path, from: Option<&str>, to: &str, dry_run: bool) -> bool {
    let to = out.join(to);
    if to.is_file() {
        return true;
    }
    let Some(from) = from.map(|f| out.join(f)).filter(|f| f.is_file()) else {
        return false;
    };
    if dry_run {
        return true;
    }
    let dir_ok = to
        .parent()
        .is_none_or(|d| crate::util::atomic::create_dir_all(d).is_ok());
    dir_ok && std::fs::rename(&from, &to).is_ok()
}

/// Removes concept folders left empty after a repeat count changed (only empty ones).
fn remove_empty_concept_dirs(out: &Path) {
    for top in ["img", "reg", "masks/img", "masks/reg"] {
        if let Ok(rd) = std::fs::read_dir(out.join(top)) {
            for e in rd.flatten() {
                let _ = std::fs::remove_dir(e.path());
            }
        }
    }
}
