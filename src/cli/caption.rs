//! `sdkit caption`: bulk edits over a dataset's caption files, stats, and undo.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};

use crate::caption::ops::{Brackets, Pattern, Position, SortBy, Underscores};
use crate::caption::select::{self, Dataset, Filter};
use crate::caption::{self as cap, Edit, journal, stats};
use crate::util::progress;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[command(
    after_help = "Example:\n  sdkit caption add train/img ohwx --position first\n  \
    sdkit caption prune train/img --above 0.9 --keep ohwx\n  sdkit caption undo train/img"
)]
pub struct CaptionArgs {
    #[command(subcommand)]
    pub op: CaptionOp,
}

#[derive(Debug, Clone, Subcommand, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum CaptionOp {
    /// Add tags (e.g. a trigger word) at a position; a tag already present is moved.
    #[command(after_help = "Example:\n  sdkit caption add train/img ohwx --position first")]
    Add(AddArgs),
    /// Remove tags (exact, or whole-tag regexes with --regex).
    #[command(
        after_help = "Example:\n  sdkit caption remove train/img 'simple background'\n  \
        sdkit caption remove train/img --regex '.* background'"
    )]
    Remove(RemoveArgs),
    /// Replace a tag (with --regex, `$1` groups expand; NEW may hold several tags or none).
    #[command(
        after_help = "Example:\n  sdkit caption replace train/img 'blonde hair' 'yellow hair'\n  \
        sdkit caption replace train/img --regex '(.*)_eyes' '$1 eyes'"
    )]
    Replace(ReplaceArgs),
    /// Remove repeated tags (and with --subsumed, `shirt` next to `white shirt`).
    #[command(after_help = "Example:\n  sdkit caption dedupe train/img --subsumed")]
    Dedupe(DedupeArgs),
    /// Sort tags alphabetically or by dataset frequency, keeping the first N in place.
    #[command(
        after_help = "Example:\n  sdkit caption sort train/img --by frequency --keep-first 1"
    )]
    Sort(SortArgs),
    /// Drop tags held by more than a share of the captions (absorbed by the trigger).
    #[command(after_help = "Example:\n  sdkit caption prune train/img --above 0.9 --keep ohwx")]
    Prune(PruneArgs),
    /// Normalize tags: trim, collapse spaces, underscores, bracket escaping, ", " separator.
    #[command(after_help = "Example:\n  sdkit caption normalize train/img --brackets escape")]
    Normalize(NormalizeArgs),
    /// Tag frequency per folder, images without captions, empty and invalid captions.
    #[command(after_help = "Example:\n  sdkit caption stats train/img --top 30\n  \
        sdkit caption stats train/img --json")]
    Stats(StatsArgs),
    /// Restore the caption files as they were before the last bulk edit.
    #[command(after_help = "Example:\n  sdkit caption undo train/img")]
    Undo(UndoArgs),
}

/// Which captions an operation reads.
#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct Scope {
    /// Dataset folder, searched recursively for images (kohya layouts welcome).
    pub dir: PathBuf,
    /// Caption file extension.
    #[arg(long, default_value = ".txt")]
    pub caption_ext: String,
    /// Only captions holding this tag (repeatable: all must be present).
    #[arg(long = "where", value_name = "TAG")]
    #[serde(rename = "where")]
    pub where_: Vec<String>,
    /// Only captions without this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub where_not: Vec<String>,
    /// Read TAG arguments and filters as regular expressions matching whole tags.
    #[arg(long)]
    pub regex: bool,
}

impl Default for Scope {
    fn default() -> Scope {
        Scope {
            dir: PathBuf::new(),
            caption_ext: ".txt".into(),
            where_: Vec::new(),
            where_not: Vec::new(),
            regex: false,
        }
    }
}

/// Output and safety switches shared by the edits.
#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct EditFlags {
    /// Show what would change and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Print errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// How many before/after examples the preview shows.
    #[arg(long, default_value_t = 5)]
    pub examples: usize,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct AddArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Tags to add.
    #[arg(required = true, value_name = "TAG")]
    pub tags: Vec<String>,
    /// first, last, or N = the number of tags before it.
    #[arg(long, default_value = "first")]
    pub position: String,
    /// Also write a caption file for images that have none.
    #[arg(long)]
    pub create_missing: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RemoveArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Tags (or with --regex, patterns) to remove.
    #[arg(required = true, value_name = "TAG")]
    pub tags: Vec<String>,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct ReplaceArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// The tag (or with --regex, pattern) to replace.
    pub old: String,
    /// The replacement: one tag, several separated by commas, or "" to delete.
    pub new: String,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct DedupeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Also drop a tag that a longer tag ends with (`shirt` next to `white shirt`).
    #[arg(long)]
    pub subsumed: bool,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct SortArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    #[arg(long, value_enum, default_value_t = SortBy::Alphabet)]
    pub by: SortBy,
    /// Leave this many leading tags (the trigger) in place, like kohya's keep_tokens.
    #[arg(long, default_value_t = 0)]
    pub keep_first: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct PruneArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Drop tags held by more than this share (0..1) of the selected captions.
    #[arg(long, default_value_t = 0.9)]
    pub above: f64,
    /// Never drop this tag (repeatable; a regex with --regex). Use it for the trigger.
    #[arg(long, value_name = "TAG")]
    pub keep: Vec<String>,
    /// Never drop the first N tags of a caption.
    #[arg(long, default_value_t = 0)]
    pub keep_first: usize,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

impl Default for PruneArgs {
    fn default() -> PruneArgs {
        PruneArgs {
            scope: Scope::default(),
            above: 0.9,
            keep: Vec::new(),
            keep_first: 0,
            flags: EditFlags::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct NormalizeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Underscores: to spaces (kohya style; kaomoji like ^_^ kept), to underscores, keep.
    #[arg(long, value_enum, default_value_t = Underscores::Space)]
    pub underscores: Underscores,
    /// Brackets: escape `(` as `\(` (webui prompts), unescape, keep.
    #[arg(long, value_enum, default_value_t = Brackets::Keep)]
    pub brackets: Brackets,
    #[command(flatten)]
    #[serde(flatten)]
    pub flags: EditFlags,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct StatsArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub scope: Scope,
    /// Tags listed per folder and overall.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Print errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the full statistics as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

impl Default for StatsArgs {
    fn default() -> StatsArgs {
        StatsArgs {
            scope: Scope::default(),
            top: 20,
            quiet: false,
            json: false,
        }
    }
}

#[derive(Debug, Clone, Default, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct UndoArgs {
    /// Dataset folder of the edit to undo.
    pub dir: PathBuf,
    /// Also overwrite files that were changed after the edit.
    #[arg(long)]
    pub force: bool,
    /// Print errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print a JSON summary on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: CaptionArgs) -> anyhow::Result<i32> {
    let description = describe(&args.op);
    let patterns = |v: &[String], regex: bool| -> anyhow::Result<Vec<Pattern>> {
        v.iter()
            .map(|t| Pattern::new(t, regex).with_context(|| format!("invalid pattern {t:?}")))
            .collect()
    };
    let (scope, flags, edit) = match args.op {
        CaptionOp::Stats(a) => return run_stats(&a),
        CaptionOp::Undo(a) => return run_undo(&a),
        CaptionOp::Add(a) => {
            let position: Position = a.position.parse().map_err(anyhow::Error::msg)?;
            let edit = Edit::Add {
                tags: a.tags.iter().map(|t| t.trim().to_string()).collect(),
                position,
                create_missing: a.create_missing,
            };
            (a.scope, a.flags, edit)
        }
        CaptionOp::Remove(a) => {
            let edit = Edit::Remove(patterns(&a.tags, a.scope.regex)?);
            (a.scope, a.flags, edit)
        }
        CaptionOp::Replace(a) => {
            let old = patterns(std::slice::from_ref(&a.old), a.scope.regex)?.remove(0);
            let edit = Edit::Replace { old, new: a.new };
            (a.scope, a.flags, edit)
        }
        CaptionOp::Dedupe(a) => (
            a.scope,
            a.flags,
            Edit::Dedupe {
                subsumed: a.subsumed,
            },
        ),
        CaptionOp::Sort(a) => {
            let edit = Edit::Sort {
                by: a.by,
                keep_first: a.keep_first,
            };
            (a.scope, a.flags, edit)
        }
        CaptionOp::Prune(a) => {
            anyhow::ensure!(
                (0.0..1.0).contains(&a.above),
                "--above must be a share from 0 to below 1, not {}",
                a.above
            );
            let edit = Edit::Prune {
                above: a.above,
                keep: patterns(&a.keep, a.scope.regex)?,
                keep_first: a.keep_first,
            };
            (a.scope, a.flags, edit)
        }
        CaptionOp::Normalize(a) => {
            let edit = Edit::Normalize {
                underscores: a.underscores,
                brackets: a.brackets,
            };
            (a.scope, a.flags, edit)
        }
    };
    run_edit(&scope, &flags, &edit, &description)
}

/// The edit in words for the journal: the op and the options that matter.
fn describe(op: &CaptionOp) -> String {
    let Ok(serde_json::Value::Object(map)) = serde_json::to_value(op) else {
        return String::new();
    };
    let name = map
        .get("op")
        .and_then(|v| v.as_str())
        .unwrap_or("edit")
        .to_string();
    let parts: Vec<String> = map
        .iter()
        .filter(|(k, v)| {
            ![
                "op",
                "dir",
                "quiet",
                "json",
                "examples",
                "dry-run",
                "caption-ext",
            ]
            .contains(&k.as_str())
                && !matches!(v, serde_json::Value::Bool(false))
                && v.as_array().is_none_or(|a| !a.is_empty())
        })
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    format!("{name} {}", parts.join(" ")).trim_end().to_string()
}

fn load(scope: &Scope, hidden: bool) -> anyhow::Result<(Dataset, Filter)> {
    let filter = Filter::new(&scope.where_, &scope.where_not, scope.regex)
        .context("invalid --where/--where-not pattern")?;
    let images = select::find_images(&scope.dir)?;
    let pb = progress::bar(images.len() as u64, "read", hidden);
    let ds = select::load(&scope.dir, &scope.caption_ext, &|| pb.inc(1))?;
    pb.finish_and_clear();
    Ok((ds, filter))
}

#[derive(Serialize)]
struct EditSummary<'a> {
    dir: &'a Path,
    images: usize,
    selected: usize,
    changed: usize,
    tags_removed: usize,
    tags_added: usize,
    missing_skipped: usize,
    pruned: &'a [(String, usize)],
    dry_run: bool,
    written: usize,
    failed: Vec<String>,
    journal: Option<PathBuf>,
    examples: Vec<Example<'a>>,
}

#[derive(Serialize)]
struct Example<'a> {
    path: &'a str,
    before: Option<String>,
    after: &'a str,
}

fn run_edit(
    scope: &Scope,
    flags: &EditFlags,
    edit: &Edit,
    description: &str,
) -> anyhow::Result<i32> {
    let hidden = flags.quiet || flags.json;
    let (ds, filter) = load(scope, hidden)?;
    let plan = cap::plan(&ds, &filter, edit);
    for f in &plan.failed {
        eprintln!("error: {f}");
    }
    if !hidden {
        print!("{}", cap::preview(&plan, flags.examples));
    }
    let mut failed = plan.failed.clone();
    let mut applied = cap::Applied::default();
    if !flags.dry_run && !plan.changes.is_empty() {
        let pb = progress::bar(plan.changes.len() as u64, "write", hidden);
        applied = cap::apply(&ds.root, &plan, description, &|| pb.inc(1))?;
        pb.finish_and_clear();
        for f in &applied.failed {
            eprintln!("error: {f}");
        }
        failed.extend(applied.failed.iter().cloned());
    }
    if flags.json {
        let summary = EditSummary {
            dir: &ds.root,
            images: plan.images,
            selected: plan.selected,
            changed: plan.changes.len(),
            tags_removed: plan.tags_removed,
            tags_added: plan.tags_added,
            missing_skipped: plan.missing_skipped,
            pruned: &plan.pruned,
            dry_run: flags.dry_run,
            written: applied.written,
            failed: failed.clone(),
            journal: applied.journal.clone(),
            examples: plan
                .changes
                .iter()
                .take(flags.examples)
                .map(|c| Example {
                    path: &c.rel,
                    before: c
                        .original
                        .as_ref()
                        .map(|_| crate::dataset::caption_io::join_tags(&c.before)),
                    after: &c.after.text,
                })
                .collect(),
        };
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else if !flags.quiet {
        if flags.dry_run {
            println!("dry run: nothing written");
        } else if applied.written > 0 {
            println!(
                "wrote {} captions; undo with: sdkit caption undo {}",
                applied.written,
                scope.dir.display()
            );
        } else if plan.changes.is_empty() {
            println!("nothing to change");
        }
        if !failed.is_empty() {
            println!("{} files failed (see errors above)", failed.len());
        }
    }
    Ok(i32::from(!failed.is_empty()))
}

fn run_stats(a: &StatsArgs) -> anyhow::Result<i32> {
    let (ds, filter) = load(&a.scope, a.quiet || a.json)?;
    let s = stats::compute(&ds, &filter);
    for item in &ds.items {
        if let Err(e) = &item.caption {
            eprintln!("error: {e}");
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else if !a.quiet {
        print!("{}", stats::render(&s, a.top));
    }
    Ok(i32::from(!s.invalid.is_empty()))
}

fn run_undo(a: &UndoArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.dir.is_dir(), "{}: not a folder", a.dir.display());
    let Some(r) = journal::undo(&a.dir, a.force)? else {
        eprintln!(
            "error: {}: nothing to undo (no caption edit recorded)",
            a.dir.display()
        );
        return Ok(1);
    };
    let blocked = !r.conflicts.is_empty() && !a.force;
    if blocked {
        for c in &r.conflicts {
            eprintln!(
                "error: {}: changed since the edit; nothing restored (rerun with --force to overwrite)",
                a.dir.join(c).display()
            );
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if !a.quiet && !blocked {
        println!(
            "undid {}: restored {} files ({} already as before); {} earlier edits can still be undone",
            r.edit,
            r.restored.len(),
            r.unchanged.len(),
            r.remaining
        );
    }
    Ok(i32::from(blocked))
}
