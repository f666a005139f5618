//! `sdkit tag`: DeepDanbooru- and WD14-style ONNX tagging with the reference taggers'
//! preprocessing and caption rules.
//!
//! Images are decoded and preprocessed on the rayon pool one batch ahead of inference
//! (a bounded channel of two batches), so decoding overlaps ONNX Runtime's work.

pub mod labels;
pub mod manifest;
pub mod preprocess;
pub mod resample;
pub mod runtime;
pub mod select;

use crate::dataset::caption_io::{self, Caption};
use labels::{Category, Label};
use preprocess::Kind;
use rayon::prelude::*;
use runtime::{Device, Tagger};
use select::{Picked, RatingPos, Selection, SortBy};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `--kind`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum KindArg {
    /// From the label file (`.csv` = WD14, else DeepDanbooru), else the input size.
    #[default]
    Auto,
    Deepdanbooru,
    Wd14,
}

/// What to do when a caption file already exists.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Existing {
    /// Leave the image alone (not even run through the model).
    #[default]
    Skip,
    /// Replace the caption line with the new tags.
    Overwrite,
    /// Existing tags first, then new ones not already there.
    Append,
    /// New tags first, then existing ones not already there.
    Prepend,
}

/// Options of `sdkit tag` (command line and YAML recipes use the same names).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
#[serde(default, rename_all = "kebab-case")]
pub struct TagOptions {
    /// Folder of images to tag.
    pub dir: PathBuf,
    /// The tagger: an ONNX file, a known name fetched on first use (wd14-convnext-v2; see
    /// `sdkit models list`) or a hub repo with model.onnx + selected_tags.csv (owner/repo).
    #[arg(long, required_unless_present = "model_dir")]
    pub model: Option<PathBuf>,
    /// Label file: tags.txt (DeepDanbooru) or selected_tags.csv (WD14). Default: beside the model.
    #[arg(long)]
    pub labels: Option<PathBuf>,
    /// A downloaded tagger folder holding the model and its label file (see models/*.yaml).
    #[arg(long, conflicts_with = "model")]
    pub model_dir: Option<PathBuf>,
    /// Preprocessing and defaults to follow.
    #[arg(long, value_enum, default_value_t)]
    pub kind: KindArg,
    /// Keep general tags scoring at least this (default: 0.35 WD14, 0.5 DeepDanbooru).
    #[arg(long)]
    pub general_threshold: Option<f32>,
    /// Keep character tags scoring at least this (default: 0.35 WD14).
    #[arg(long)]
    pub character_threshold: Option<f32>,
    /// Pick thresholds per image with MCut (largest score gap) instead.
    #[arg(long)]
    pub mcut: bool,
    /// Add the most likely rating tag.
    #[arg(long, value_enum, default_value_t)]
    pub rating: RatingPos,
    /// Tags never written: comma-separated, or a file of tags (comma or line separated).
    #[arg(long, value_delimiter = ',')]
    pub exclude: Vec<String>,
    /// Tags moved to the front, in this order, when predicted.
    #[arg(long, value_delimiter = ',')]
    pub always_first: Vec<String>,
    /// Character tags before general tags.
    #[arg(long)]
    pub character_first: bool,
    /// Keep underscores in tags (default: spaces, kaomoji such as ^_^ kept).
    #[arg(long)]
    pub keep_underscores: bool,
    /// Escape \ ( ) with a backslash (default: yes for DeepDanbooru, no for WD14).
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub escape: Option<bool>,
    /// Tag order (default: alphabet for DeepDanbooru, model for WD14).
    #[arg(long, value_enum)]
    pub sort: Option<SortBy>,
    /// At most this many predicted tags per image (rating and trigger not counted).
    #[arg(long)]
    pub max_tags: Option<usize>,
    /// Words written first in every caption, e.g. a trigger word.
    #[arg(long, value_delimiter = ',')]
    pub trigger: Vec<String>,
    /// What to do with existing captions.
    #[arg(long, value_enum, default_value_t)]
    pub existing: Existing,
    /// Write captions here (same relative paths) instead of beside the images.
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Caption file extension.
    #[arg(long, default_value = ".txt")]
    pub caption_ext: String,
    /// Also write one JSON line per image with tag scores to this file.
    #[arg(long)]
    pub jsonl: Option<PathBuf>,
    /// Look in subfolders too.
    #[arg(long)]
    pub recursive: bool,
    /// Images per inference call (a fixed-batch model uses its own size).
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// ONNX Runtime intra-op threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Where inference runs.
    #[arg(long, value_enum, default_value_t)]
    pub device: Device,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Default for TagOptions {
    fn default() -> Self {
        TagOptions {
            dir: PathBuf::new(),
            model: None,
            labels: None,
            model_dir: None,
            kind: KindArg::Auto,
            general_threshold: None,
            character_threshold: None,
            mcut: false,
            rating: RatingPos::Off,
            exclude: vec![],
            always_first: vec![],
            character_first: false,
            keep_underscores: false,
            escape: None,
            sort: None,
            max_tags: None,
            trigger: vec![],
            existing: Existing::Skip,
            out_dir: None,
            caption_ext: ".txt".into(),
            jsonl: None,
            recursive: false,
            batch_size: 8,
            threads: 0,
            device: Device::Cpu,
            quiet: false,
            json: false,
        }
    }
}

/// A problem with one image; the run goes on.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Failure {
    pub file: PathBuf,
    pub error: String,
}

/// What a run did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub model: PathBuf,
    pub labels: PathBuf,
    pub runtime: PathBuf,
    pub contract: String,
    pub images: usize,
    pub tagged: usize,
    pub skipped: usize,
    pub failed: usize,
    pub failures: Vec<Failure>,
    /// Written tags (model predictions only) and on how many images, most frequent first.
    pub tag_counts: Vec<(String, usize)>,
    pub seconds: f64,
    pub images_per_second: f64,
}

/// Fatal problems: nothing could be tagged.
#[derive(Debug, thiserror::Error)]
pub enum TagError {
    #[error(transparent)]
    Runtime(#[from] runtime::RuntimeError),
    #[error(transparent)]
    Labels(#[from] labels::LabelError),
    #[error("{}: no tagger found (expected one of the file sets in models/*.yaml, e.g. model.onnx + selected_tags.csv)", .0.display())]
    NoTagger(PathBuf),
    #[error("{}: no label file beside the model (selected_tags.csv or tags.txt); pass --labels", .0.display())]
    NoLabels(PathBuf),
    #[error("{}: {labels} labels but the model {} outputs {outputs} scores", path.display(), model.display())]
    LabelCount {
        path: PathBuf,
        model: PathBuf,
        labels: usize,
        outputs: usize,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--batch-size must be at least 1")]
    Batch,
    #[error(transparent)]
    Hub(#[from] crate::hub::HubError),
}

const IMAGE_EXTS: &[&str] = &[
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif",
];

/// Image files in `dir`, sorted; temporary files of atomic writes are skipped.
pub fn list_images(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>, TagError> {
    let io = |e: walkdir::Error| TagError::Io {
        path: dir.into(),
        source: e.into(),
    };
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(dir).max_depth(if recursive { usize::MAX } else { 1 });
    for e in walk {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy();
        if !e.file_type().is_file() || name.starts_with(crate::util::atomic::TEMP_PREFIX) {
            continue;
        }
        let ext = e
            .path()
            .extension()
            .map(|x| x.to_string_lossy().to_lowercase());
        if ext.is_some_and(|x| IMAGE_EXTS.contains(&x.as_str())) {
            out.push(e.into_path());
        }
    }
    out.sort();
    Ok(out)
}

/// Tags from `--exclude`-style values: an existing file is read (comma or line
/// separated), anything else is a comma-separated list of tags.
pub fn expand_list(values: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for v in values {
        let p = Path::new(v.trim());
        match std::fs::read_to_string(p) {
            Ok(text) if p.is_file() => out.extend(
                text.split([',', '\n'])
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from),
            ),
            _ => out.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(String::from),
            ),
        }
    }
    out
}

/// The selection settings for `kind`, user options over the manifest defaults.
pub fn selection(o: &TagOptions, kind: Kind) -> Selection {
    let d = manifest::manifest(kind).defaults;
    Selection {
        general_threshold: o.general_threshold.unwrap_or(d.general_threshold),
        character_threshold: o.character_threshold.unwrap_or(d.character_threshold),
        mcut: o.mcut,
        rating: o.rating,
        exclude: expand_list(&o.exclude),
        always_first: expand_list(&o.always_first),
        character_first: o.character_first,
        underscores_to_spaces: !o.keep_underscores,
        keep_kaomoji: d.keep_kaomoji,
        escape_brackets: o.escape.unwrap_or(d.escape_brackets),
        sort: o.sort.unwrap_or(d.sort),
        max_tags: o.max_tags,
    }
}

/// Model path, label path and kind (if known) from the options.
fn resolve(o: &TagOptions) -> Result<(PathBuf, PathBuf, Option<Kind>), TagError> {
    let want = match o.kind {
        KindArg::Auto => None,
        KindArg::Deepdanbooru => Some(Kind::DeepDanbooru),
        KindArg::Wd14 => Some(Kind::Wd14),
    };
    let fetched = match &o.model {
        Some(m) => crate::hub::resolve::tagger(m, o.quiet || o.json)?,
        None => None,
    };
    let (model, labels, found) = match (&o.model, &o.model_dir) {
        (Some(_), _) if let Some((m, l)) = fetched => {
            (m, o.labels.clone().unwrap_or(l), Some(Kind::Wd14))
        }
        (Some(m), _) => {
            let labels = match &o.labels {
                Some(l) => l.clone(),
                None => {
                    let dir = m.parent().unwrap_or(Path::new("."));
                    ["selected_tags.csv", "tags.txt"]
                        .iter()
                        .map(|n| dir.join(n))
                        .find(|p| p.is_file())
                        .ok_or_else(|| TagError::NoLabels(m.clone()))?
                }
            };
            (m.clone(), labels, None)
        }
        (None, Some(d)) => {
            let (m, l, k) =
                manifest::find_in_dir(d, want).ok_or_else(|| TagError::NoTagger(d.clone()))?;
            (m, o.labels.clone().unwrap_or(l), Some(k))
        }
        (None, None) => return Err(TagError::NoTagger(o.dir.clone())),
    };
    let by_labels = if labels
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
    {
        Kind::Wd14
    } else {
        Kind::DeepDanbooru
    };
    let kind = want.or(found).or(Some(by_labels));
    Ok((model, labels, kind))
}

/// A batch on its way from the decoders to the model.
struct Batch {
    /// Indices (into the image list) of images in `data`, in order.
    ok: Vec<usize>,
    failed: Vec<(usize, String)>,
    data: Vec<f32>,
}

fn caption_target(o: &TagOptions, image: &Path) -> PathBuf {
    let cap = caption_io::caption_path(image, &o.caption_ext);
    match &o.out_dir {
        Some(out) => match cap.strip_prefix(&o.dir) {
            Ok(rel) => out.join(rel),
            Err(_) => out.join(cap.file_name().unwrap_or_default()),
        },
        None => cap,
    }
}

/// Writes (or merges into) one caption file; returns the caption text.
fn write_one(o: &TagOptions, target: &Path, predicted: &[String]) -> Result<String, String> {
    let old = caption_io::read_caption(target).map_err(|e| e.to_string())?;
    if old.is_some() && o.existing == Existing::Skip {
        return Err("caption appeared during the run; left untouched".into());
    }
    let mut cap = old.clone().unwrap_or_else(|| Caption::new(""));
    let old_tags = match o.existing {
        Existing::Append | Existing::Prepend => old.map(|c| c.tags()).unwrap_or_default(),
        _ => vec![],
    };
    let tags = select::merge(
        &old_tags,
        predicted,
        &o.trigger,
        o.existing == Existing::Prepend,
    );
    cap.set_tags(&tags);
    if let Some(dir) = target.parent() {
        crate::util::atomic::create_dir_all(dir).map_err(|e| e.to_string())?;
    }
    caption_io::write_caption(target, &cap).map_err(|e| e.to_string())?;
    Ok(cap.text)
}

#[derive(serde::Serialize)]
struct JsonLine<'a> {
    image: &'a Path,
    caption: &'a str,
    tags: &'a [Picked],
    ratings: Vec<(&'a str, f32)>,
}

/// Tags every image under `o.dir`. Per-image problems are collected in the report;
/// an `Err` means nothing could run (no runtime, bad model, bad labels).
pub fn run(o: &TagOptions) -> Result<Report, TagError> {
    let start = std::time::Instant::now();
    if o.batch_size == 0 {
        return Err(TagError::Batch);
    }
    let (model, label_path, kind) = resolve(o)?;
    let labels = labels::read_labels(&label_path)?;
    let mut tagger = Tagger::open(&model, kind, o.threads, o.device)?;
    let runtime = runtime::init()?;
    if tagger.outputs != labels.len() {
        return Err(TagError::LabelCount {
            path: label_path,
            model,
            labels: labels.len(),
            outputs: tagger.outputs,
        });
    }
    let contract = tagger.contract;
    let sel = selection(o, contract.kind);
    let all = list_images(&o.dir, o.recursive)?;
    let (todo, skipped): (Vec<PathBuf>, Vec<PathBuf>) = all
        .iter()
        .cloned()
        .partition(|p| o.existing != Existing::Skip || !caption_target(o, p).exists());
    let batch = tagger.fixed_batch.unwrap_or(o.batch_size);
    let pb = crate::util::progress::bar(todo.len() as u64, "tag", o.quiet || o.json);
    let mut failures = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    let mut jsonl: Vec<String> = Vec::new();
    let mut tagged = 0usize;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Batch>(2);
    let per = contract.len();
    std::thread::scope(|s| -> Result<(), TagError> {
        let todo = &todo;
        s.spawn(move || {
            for (ci, chunk) in todo.chunks(batch).enumerate() {
                let prepared: Vec<Result<resample::Pixels, String>> = chunk
                    .par_iter()
                    .map(|p| {
                        crate::dataset::decode::decode_file_any(p)
                            .map(|d| preprocess::prepare(contract.kind, d.image, contract.size))
                            .map_err(|e| e.to_string())
                    })
                    .collect();
                let mut b = Batch {
                    ok: vec![],
                    failed: vec![],
                    data: vec![],
                };
                let mut imgs = Vec::new();
                for (k, r) in prepared.into_iter().enumerate() {
                    match r {
                        Ok(px) => {
                            b.ok.push(ci * batch + k);
                            imgs.push(px);
                        }
                        Err(e) => b.failed.push((ci * batch + k, e)),
                    }
                }
                b.data = vec![0f32; per * imgs.len().max(1)];
                b.data
                    .par_chunks_mut(per)
                    .zip(imgs.par_iter())
                    .for_each(|(out, px)| preprocess::write_tensor(px, &contract, out));
                if tx.send(b).is_err() {
                    return;
                }
            }
        });
        for mut b in rx {
            for (i, e) in b.failed.drain(..) {
                failures.push(Failure {
                    file: todo[i].clone(),
                    error: e,
                });
                pb.inc(1);
            }
            if b.ok.is_empty() {
                continue;
            }
            let n = b.ok.len();
            let run_n = tagger.fixed_batch.unwrap_or(n);
            b.data.resize(per * run_n, 0.0);
            let scores = match tagger.run(b.data, run_n) {
                Ok(s) => s,
                Err(e) => {
                    for &i in &b.ok {
                        failures.push(Failure {
                            file: todo[i].clone(),
                            error: e.to_string(),
                        });
                    }
                    pb.inc(n as u64);
                    continue;
                }
            };
            for (k, &i) in b.ok.iter().enumerate() {
                let sc = &scores[k * labels.len()..(k + 1) * labels.len()];
                let picked = select::select(&labels, sc, &sel);
                let predicted: Vec<String> = picked.iter().map(|p| p.tag.clone()).collect();
                let target = caption_target(o, &todo[i]);
                match write_one(o, &target, &predicted) {
                    Ok(text) => {
                        tagged += 1;
                        for t in &predicted {
                            *counts.entry(t.clone()).or_default() += 1;
                        }
                        if o.jsonl.is_some() {
                            jsonl.push(json_line(&todo[i], &text, &picked, &labels, sc));
                        }
                    }
                    Err(e) => failures.push(Failure {
                        file: target,
                        error: e,
                    }),
                }
                pb.inc(1);
            }
        }
        Ok(())
    })?;
    pb.finish_and_clear();
    if let Some(path) = &o.jsonl {
        crate::util::write_atomic_with(path, |w| {
            for l in &jsonl {
                writeln!(w, "{l}")?;
            }
            Ok(())
        })
        .map_err(|source| TagError::Io {
            path: path.clone(),
            source,
        })?;
    }
    let mut tag_counts: Vec<(String, usize)> = counts.into_iter().collect();
    tag_counts.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    failures.sort_by(|a, b| a.file.cmp(&b.file));
    let seconds = start.elapsed().as_secs_f64();
    Ok(Report {
        model,
        labels: label_path,
        runtime,
        contract: contract.describe(),
        images: all.len(),
        tagged,
        skipped: skipped.len(),
        failed: failures.len(),
        failures,
        tag_counts,
        seconds,
        images_per_second: tagged as f64 / seconds.max(1e-9),
    })
}

fn json_line(
    image: &Path,
    caption: &str,
    picked: &[Picked],
    labels: &[Label],
    sc: &[f32],
) -> String {
    let ratings = labels
        .iter()
        .zip(sc)
        .filter(|(l, _)| l.category == Category::Rating)
        .map(|(l, &s)| (l.name.as_str(), s))
        .collect();
    serde_json::to_string(&JsonLine {
        image,
        caption,
        tags: picked,
        ratings,
    })
    .unwrap_or_default()
}
