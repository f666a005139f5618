//! `sdkit check`: options, and the human report (grouped per folder, coloured on a
//! terminal) or JSON.

use std::path::PathBuf;

use console::{Style, style};
use serde::{Deserialize, Serialize};

use crate::check::{self, Finding, Report, Severity};
use crate::dataset::plan::Size;

/// Options of `sdkit check`; the same names work as flags and as keys of a YAML recipe.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
#[command(after_help = "Examples:
  sdkit check train/                                   # img/10_name + reg/1_class
  sdkit check train/img/10_ohwx --epochs 10 --batch-size 2 --trigger ohwx
  sdkit check photos/ --resolution 768 --json --quiet
  sdkit check train/ --strict                          # exit 1 when an error is found

Exit status: 0 normally; 1 with --strict when an error is found; 2 when DIR is missing.")]
pub struct CheckOptions {
    /// A kohya training folder (holding img/ and reg/, or <repeats>_<name> folders), one
    /// concept folder, or any folder of images.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,

    /// Training resolution (kohya --resolution): the bucket area.
    #[arg(
        long,
        default_value = "512",
        value_name = "WxH",
        help_heading = "Buckets"
    )]
    pub resolution: Size,
    /// Smallest bucket side (kohya min_bucket_reso).
    #[arg(long, default_value_t = 256, help_heading = "Buckets")]
    pub min_bucket: u32,
    /// Largest bucket side (kohya max_bucket_reso).
    #[arg(long, default_value_t = 1024, help_heading = "Buckets")]
    pub max_bucket: u32,
    /// Bucket step (kohya bucket_reso_steps).
    #[arg(long, default_value_t = 64, help_heading = "Buckets")]
    pub step: u32,
    /// kohya bucket_no_upscale: small images keep their size (no upscale findings).
    #[arg(long, help_heading = "Buckets")]
    pub no_upscale: bool,

    /// Epochs you plan to train (kohya --max_train_epochs); without it, kohya's default of
    /// 1600 steps is shown as epochs.
    #[arg(long, help_heading = "Training")]
    pub epochs: Option<u32>,
    /// Batch size (kohya --train_batch_size).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..), help_heading = "Training")]
    pub batch_size: u32,
    /// The trigger tag every training caption should hold (inferred when not given).
    #[arg(long, value_name = "TAG", help_heading = "Training")]
    pub trigger: Option<String>,
    /// kohya's max_token_length: captions with more CLIP tokens lose their tail.
    #[arg(long, default_value_t = 75, value_parser = super::parse_max_token_length, help_heading = "Training")]
    pub max_token_length: usize,

    /// Caption file extension (kohya --caption_extension).
    #[arg(long, default_value = ".txt")]
    pub caption_ext: String,
    /// Images whose perceptual hashes differ in at most this many of 64 bits are near
    /// duplicates.
    #[arg(long, default_value_t = 8, value_name = "K", value_parser = clap::value_parser!(u32).range(0..=64))]
    pub phash_distance: u32,
    /// Exit 1 when any error is found.
    #[arg(long)]
    pub strict: bool,
    /// Machine-readable report on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar; the human report lists errors and warnings only.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            dir: PathBuf::new(),
            resolution: Size { w: 512, h: 512 },
            min_bucket: 256,
            max_bucket: 1024,
            step: 64,
            no_upscale: false,
            epochs: None,
            batch_size: 1,
            trigger: None,
            max_token_length: 75,
            caption_ext: ".txt".into(),
            phash_distance: 8,
            strict: false,
            json: false,
            quiet: false,
        }
    }
}

pub fn run(opts: CheckOptions) -> anyhow::Result<i32> {
    let bar = crate::util::progress::bar(0, "check", opts.quiet || opts.json);
    let report = check::run(&opts, &bar)?;
    if opts.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, opts.quiet));
    }
    Ok(if opts.strict && report.counts.error > 0 {
        1
    } else {
        0
    })
}

fn sev_style(s: Severity) -> Style {
    match s {
        Severity::Error => Style::new().red().bold(),
        Severity::Warn => Style::new().yellow().bold(),
        Severity::Info => Style::new().cyan(),
    }
}

fn plural(n: impl Into<u64>, one: &str, many: &str) -> String {
    let n = n.into();
    format!("{n} {}", if n == 1 { one } else { many })
}

fn finding(o: &mut String, f: &Finding) {
    use std::fmt::Write;
    let tag = format!("{:<5}", f.severity.as_str().to_uppercase());
    let _ = writeln!(
        o,
        "  {} {} {}",
        sev_style(f.severity).apply_to(tag),
        style(f.code.as_str()).dim(),
        f.message
    );
    // Per-file findings name their file in the message already.
    if f.files.len() > 1 || (f.files.len() == 1 && !f.message.contains(&f.files[0])) {
        const SHOW: usize = 8;
        let mut list = f
            .files
            .iter()
            .take(SHOW)
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        if f.files.len() > SHOW {
            let _ = write!(list, ", ... {} more", f.files.len() - SHOW);
        }
        let _ = writeln!(o, "        {list}");
    }
    let _ = writeln!(o, "        {} {}", style("->").green(), f.suggestion);
}

/// The human report: one block per folder (numbers, buckets, findings), then the plan.
pub fn render(r: &Report, quiet: bool) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let shown = |f: &&Finding| !quiet || f.severity != Severity::Info;
    let _ = writeln!(
        o,
        "{} {} ({} layout)",
        style("check").bold(),
        r.dir.display(),
        r.layout
    );
    let mut done: Vec<&str> = Vec::new();
    for f in &r.folders {
        let kind = match f.kind {
            check::folders::Kind::Train => "train",
            check::folders::Kind::Reg => "reg",
            check::folders::Kind::Plain => "images",
        };
        let mut head = format!(
            "{} x {} = {} per epoch",
            plural(f.images as u64 - f.unreadable as u64, "image", "images"),
            plural(f.repeats.unwrap_or(1), "repeat", "repeats"),
            plural(f.samples, "sample", "samples")
        );
        if let Some(steps) = f.steps {
            let _ = write!(
                head,
                " x {} epochs / batch {} = {steps} steps",
                r.plan.epochs, r.plan.batch_size
            );
        }
        if let Some(t) = &f.trigger {
            let _ = write!(head, "; trigger \"{t}\"");
        }
        let _ = writeln!(o, "\n{} [{kind}] {head}", style(&f.folder).bold());
        if !f.buckets.is_empty() {
            let mut b: Vec<_> = f.buckets.iter().collect();
            b.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            let list = b
                .iter()
                .map(|(k, n)| format!("{k} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(o, "  buckets: {list}");
        }
        for x in r
            .findings
            .iter()
            .filter(|x| x.folder == f.folder)
            .filter(shown)
        {
            finding(&mut o, x);
        }
        done.push(&f.folder);
    }
    let mut rest: Vec<&Finding> = r
        .findings
        .iter()
        .filter(|x| !done.contains(&x.folder.as_str()))
        .filter(shown)
        .collect();
    rest.sort_by(|a, b| a.folder.cmp(&b.folder));
    let mut last: Option<&str> = None;
    for x in rest {
        if last != Some(x.folder.as_str()) {
            let _ = writeln!(o, "\n{}", style(&x.folder).bold());
            last = Some(&x.folder);
        }
        finding(&mut o, x);
    }
    let p = &r.plan;
    let e = &p.epoch;
    let reg = if e.reg_samples > 0 {
        format!(" + {} reg", e.reg_samples)
    } else {
        String::new()
    };
    let epochs = if p.epochs_from_default_steps {
        format!("{} epochs (kohya's default 1600 steps)", p.epochs)
    } else {
        plural(p.epochs, "epoch", "epochs")
    };
    let _ = writeln!(
        o,
        "\n{} {} training{reg} samples per epoch -> {} at batch size {} (per bucket) x {epochs} = {} steps",
        style("plan:").bold(),
        e.train_samples,
        plural(e.batches, "batch", "batches"),
        p.batch_size,
        p.total_steps
    );
    let c = &r.counts;
    let _ = writeln!(
        o,
        "{} {}, {}, {}",
        style("summary:").bold(),
        sev_style(Severity::Error).apply_to(plural(c.error as u64, "error", "errors")),
        sev_style(Severity::Warn).apply_to(plural(c.warn as u64, "warning", "warnings")),
        plural(c.info as u64, "note", "notes")
    );
    o
}
