//! `sdkit review`: fix captions by hand, image by image, in the terminal.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::caption::select::{self, Filter};
use crate::review::preview::{self, Protocol};
use crate::review::state::{self, Selection, Session};
use crate::review::{ui, vocabulary};

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
#[command(
    after_help = "Example:\n  sdkit review train/img\n  sdkit review train/img --missing\n  \
    sdkit review train/img --where 'red hair' --restart\n\n\
Keys: enter save+next, b back, s skip, r remove tags, a add tags (tab completes), \
o reorder, e edit caption, E edit in $EDITOR, j jump, u undo changes, q quit.\n\
Each caption is saved atomically when you move on; the position is remembered."
)]
pub struct ReviewArgs {
    /// Dataset folder, searched recursively for images.
    pub dir: PathBuf,
    /// Caption file extension.
    #[arg(long, default_value = ".txt")]
    pub caption_ext: String,
    /// Only images whose caption holds this tag (repeatable: all must be present).
    #[arg(long = "where", value_name = "TAG")]
    #[serde(rename = "where")]
    pub where_: Vec<String>,
    /// Only images whose caption lacks this tag (repeatable).
    #[arg(long, value_name = "TAG")]
    pub where_not: Vec<String>,
    /// Read --where/--where-not as regular expressions matching whole tags.
    #[arg(long)]
    pub regex: bool,
    /// Only images without a caption file.
    #[arg(long)]
    pub missing: bool,
    /// Start at the first image instead of the remembered position.
    #[arg(long)]
    pub restart: bool,
    /// Inline image preview protocol.
    #[arg(long, value_enum, default_value_t = Protocol::Auto)]
    pub preview: Protocol,
}

impl Default for ReviewArgs {
    fn default() -> ReviewArgs {
        ReviewArgs {
            dir: PathBuf::new(),
            caption_ext: ".txt".into(),
            where_: Vec::new(),
            where_not: Vec::new(),
            regex: false,
            missing: false,
            restart: false,
            preview: Protocol::Auto,
        }
    }
}

pub fn run(a: ReviewArgs) -> anyhow::Result<i32> {
    let term = console::Term::stderr();
    anyhow::ensure!(
        term.is_term(),
        "sdkit review needs a terminal (stderr is not one)"
    );
    let filter = Filter::new(&a.where_, &a.where_not, a.regex)
        .context("invalid --where/--where-not pattern")?;
    let ds = select::load(&a.dir, &a.caption_ext, &|| {})?;
    let sel = Selection {
        filter,
        missing_only: a.missing,
    };
    let (items, errors) = state::select(&ds, &sel);
    for e in &errors {
        eprintln!("error: {e}");
    }
    if items.is_empty() {
        eprintln!("no images to review in {}", a.dir.display());
        return Ok(i32::from(!errors.is_empty()));
    }
    let remembered = if a.restart {
        None
    } else {
        state::load_position(&ds.root)
    };
    let start = state::start_position(&items, remembered.as_ref());
    let mut session = Session::new(items, start);
    let vocab = vocabulary(&ds);
    let note = match errors.len() {
        0 => String::new(),
        n => format!("{n} unreadable caption(s) left out and untouched; listed on exit"),
    };
    let protocol = preview::resolve(a.preview);
    let end = ui::run(&term, &ds.root, &mut session, &vocab, protocol, &note)?;
    term.show_cursor()?;
    let how = match end {
        ui::End::Finished => "reached the last image",
        ui::End::Quit => "stopped",
    };
    eprintln!(
        "{how}: {} captions saved; next run starts at {} ({}/{})",
        session.saves,
        session.current().rel,
        session.position() + 1,
        session.len()
    );
    for e in &errors {
        eprintln!("error: {e}");
    }
    Ok(i32::from(!errors.is_empty()))
}
