//! Bulk caption edits (`sdkit caption`): plan an edit over a dataset's caption files,
//! preview it, record an undo journal, then write each changed file atomically.

pub mod journal;
pub mod ops;
pub mod select;
pub mod stats;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::dataset::caption_io::{Caption, join_tags, write_caption};
use ops::{Brackets, Pattern, Position, SortBy, Underscores};
use select::{Dataset, Filter, relative};

/// Threads for file I/O. Caption work is many small reads, writes and fsyncs; with
/// more requests in flight than cores the file system batches them (ext4 commits
/// concurrent fsyncs together), several times faster than one per core.
pub const IO_THREADS: usize = 16;

/// Runs `f` on a pool of [`IO_THREADS`] threads (or the global pool if that fails).
pub fn with_io_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match rayon::ThreadPoolBuilder::new()
        .num_threads(IO_THREADS)
        .build()
    {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// One bulk edit.
#[derive(Debug, Clone)]
pub enum Edit {
    Add {
        tags: Vec<String>,
        position: Position,
        /// Also write a caption for images that have none.
        create_missing: bool,
    },
    Remove(Vec<Pattern>),
    Replace {
        old: Pattern,
        new: String,
    },
    Dedupe {
        subsumed: bool,
    },
    Sort {
        by: SortBy,
        keep_first: usize,
    },
    Prune {
        above: f64,
        keep: Vec<Pattern>,
        keep_first: usize,
    },
    Normalize {
        underscores: Underscores,
        brackets: Brackets,
    },
}

/// One caption file that the edit changes.
#[derive(Debug, Clone)]
pub struct Change {
    pub caption_path: PathBuf,
    /// Relative to the dataset folder.
    pub rel: String,
    /// The file's exact previous content; `None` when it does not exist yet.
    pub original: Option<String>,
    pub before: Vec<String>,
    pub after: Caption,
}

/// What an edit would do.
#[derive(Debug, Default)]
pub struct Plan {
    pub images: usize,
    /// Captions that passed the filter and were considered.
    pub selected: usize,
    pub changes: Vec<Change>,
    /// Images without a caption file that the edit left alone.
    pub missing_skipped: usize,
    /// One line per caption that could not be read (invalid UTF-8, I/O); left untouched.
    pub failed: Vec<String>,
    /// `prune`: the tags dropped, with how many selected captions held them.
    pub pruned: Vec<(String, usize)>,
    pub tags_removed: usize,
    pub tags_added: usize,
}

fn tag_delta(before: &[String], after: &[String]) -> (usize, usize) {
    let mut count: HashMap<&str, i64> = HashMap::new();
    for t in before {
        *count.entry(t).or_default() += 1;
    }
    for t in after {
        *count.entry(t).or_default() -= 1;
    }
    let removed = count
        .values()
        .filter(|c| **c > 0)
        .map(|c| *c as usize)
        .sum();
    let added = count
        .values()
        .filter(|c| **c < 0)
        .map(|c| (-*c) as usize)
        .sum();
    (removed, added)
}

/// Works out the new caption of every selected image.
pub fn plan(ds: &Dataset, filter: &Filter, edit: &Edit) -> Plan {
    let mut p = Plan {
        images: ds.items.len(),
        ..Plan::default()
    };
    let create = matches!(
        edit,
        Edit::Add {
            create_missing: true,
            ..
        }
    );
    // (index, tags) of the captions the edit considers.
    let mut chosen: Vec<(usize, Vec<String>)> = Vec::new();
    for (i, item) in ds.items.iter().enumerate() {
        match &item.caption {
            Err(e) => p.failed.push(e.to_string()),
            Ok(None) if !(create && filter.matches(&[])) => {
                if filter.matches(&[]) {
                    p.missing_skipped += 1;
                }
            }
            _ => {
                let tags = item.tags();
                if filter.matches(&tags) {
                    chosen.push((i, tags));
                }
            }
        }
    }
    p.selected = chosen.len();
    let counts = match edit {
        Edit::Sort { .. } | Edit::Prune { .. } => {
            ops::tag_counts(chosen.iter().map(|(_, t)| t.as_slice()))
        }
        _ => HashMap::new(),
    };
    let mut drop = HashSet::new();
    if let Edit::Prune { above, keep, .. } = edit {
        p.pruned = ops::frequent_tags(&counts, chosen.len(), *above)
            .into_iter()
            .filter(|(t, _)| !ops::any_match(keep, t))
            .collect();
        drop = p.pruned.iter().map(|(t, _)| t.clone()).collect();
    }
    let new_tags = |tags: &[String]| -> Vec<String> {
        match edit {
            Edit::Add {
                tags: new,
                position,
                ..
            } => ops::add(tags, new, *position),
            Edit::Remove(pats) => ops::remove(tags, pats),
            Edit::Replace { old, new } => ops::replace(tags, old, new),
            Edit::Dedupe { subsumed } => ops::dedupe(tags, *subsumed),
            Edit::Sort { by, keep_first } => ops::sort(tags, *by, *keep_first, &counts),
            Edit::Prune { keep_first, .. } => ops::prune(tags, &drop, *keep_first),
            Edit::Normalize {
                underscores,
                brackets,
            } => ops::normalize(tags, *underscores, *brackets),
        }
    };
    let rewrites_text = matches!(edit, Edit::Normalize { .. });
    p.changes = chosen
        .par_iter()
        .filter_map(|(i, tags)| {
            let item = &ds.items[*i];
            let after_tags = new_tags(tags);
            let mut after = match &item.caption {
                Ok(Some(c)) => c.clone(),
                _ => Caption::default(),
            };
            let text = join_tags(&after_tags);
            let changed = match &item.caption {
                Ok(Some(c)) => after_tags != *tags || (rewrites_text && c.text != text),
                _ => !after_tags.is_empty(),
            };
            if !changed {
                return None;
            }
            after.text = text;
            Some(Change {
                caption_path: item.caption_path.clone(),
                rel: relative(&ds.root, &item.caption_path),
                original: item.original.clone(),
                before: tags.clone(),
                after,
            })
        })
        .collect();
    for c in &p.changes {
        let (r, a) = tag_delta(&c.before, &c.after.tags());
        p.tags_removed += r;
        p.tags_added += a;
    }
    p
}

/// The preview printed before an edit is written: counts and a few before/after lines.
pub fn preview(p: &Plan, examples: usize) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    if !p.pruned.is_empty() {
        let _ = writeln!(
            o,
            "tags held by more than the threshold share ({} captions):",
            p.selected
        );
        for (t, c) in &p.pruned {
            let _ = writeln!(
                o,
                "  {:>5.1}%  {t}",
                100.0 * *c as f64 / p.selected.max(1) as f64
            );
        }
    }
    for c in p.changes.iter().take(examples) {
        let before = if c.original.is_some() {
            join_tags(&c.before)
        } else {
            "(no caption file)".into()
        };
        let _ = writeln!(o, "{}\n  - {before}\n  + {}", c.rel, c.after.text);
    }
    if p.changes.len() > examples {
        let _ = writeln!(o, "... and {} more", p.changes.len() - examples);
    }
    let _ = write!(
        o,
        "{} of {} selected captions change ({} tags removed, {} added; {} images scanned)",
        p.changes.len(),
        p.selected,
        p.tags_removed,
        p.tags_added,
        p.images
    );
    if p.missing_skipped > 0 {
        let _ = write!(
            o,
            "; {} images without caption left alone",
            p.missing_skipped
        );
    }
    if !p.failed.is_empty() {
        let _ = write!(o, "; {} unreadable captions left untouched", p.failed.len());
    }
    o.push('\n');
    o
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    #[error("{0}: path is not valid UTF-8; the undo journal cannot record it")]
    Path(String),
}

/// What writing an edit did.
#[derive(Debug, Default, Serialize)]
pub struct Applied {
    pub journal: Option<PathBuf>,
    pub written: usize,
    /// One line per file that could not be written.
    pub failed: Vec<String>,
}

/// Records the journal entry, then writes every change atomically (in parallel).
/// `on_write` is called once per file (progress). Nothing is written when the journal
/// cannot be recorded.
pub fn apply(
    root: &Path,
    p: &Plan,
    description: &str,
    on_write: &(dyn Fn() + Sync),
) -> Result<Applied, ApplyError> {
    if p.changes.is_empty() {
        return Ok(Applied::default());
    }
    let rendered: Vec<String> = p.changes.iter().map(|c| c.after.render()).collect();
    let mut files = Vec::with_capacity(p.changes.len());
    for (c, r) in p.changes.iter().zip(&rendered) {
        let rel = c.caption_path.strip_prefix(root).unwrap_or(&c.caption_path);
        let Some(rel) = rel.to_str() else {
            return Err(ApplyError::Path(c.caption_path.display().to_string()));
        };
        files.push(journal::FileRecord {
            path: rel.replace(std::path::MAIN_SEPARATOR, "/"),
            before: c.original.clone(),
            after_blake3: Some(journal::hash(r.as_bytes())),
        });
    }
    let path = journal::record(root, &journal::Entry::new(description, files))?;
    let failed: Vec<String> = with_io_pool(|| {
        p.changes
            .par_iter()
            .filter_map(|c| {
                let r = write_caption(&c.caption_path, &c.after);
                on_write();
                r.err().map(|e| e.to_string())
            })
            .collect()
    });
    Ok(Applied {
        journal: Some(path),
        written: p.changes.len() - failed.len(),
        failed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(files: &[(&str, Option<&[u8]>)]) -> (tempfile::TempDir, Dataset) {
        let d = tempfile::tempdir().unwrap();
        for (name, cap) in files {
            std::fs::write(d.path().join(format!("{name}.png")), b"x").unwrap();
            if let Some(c) = cap {
                std::fs::write(d.path().join(format!("{name}.txt")), c).unwrap();
            }
        }
        let ds = select::load(d.path(), ".txt", &|| {}).unwrap();
        (d, ds)
    }

    #[test]
    fn plan_changes_only_what_differs_and_reports_failures() {
        let (_d, ds) = dataset(&[
            ("a", Some(b"ohwx, smile")),
            ("b", Some(b"smile,red")),
            ("c", Some(b"\xffbad")),
            ("d", None),
        ]);
        let edit = Edit::Add {
            tags: vec!["ohwx".into()],
            position: Position::First,
            create_missing: false,
        };
        let p = plan(&ds, &Filter::default(), &edit);
        assert_eq!((p.selected, p.changes.len(), p.missing_skipped), (2, 1, 1));
        assert_eq!(p.failed.len(), 1);
        assert!(p.failed[0].contains("c.txt"), "{:?}", p.failed);
        assert_eq!(p.changes[0].after.text, "ohwx, smile, red");
        assert_eq!((p.tags_added, p.tags_removed), (1, 0));
        let text = preview(&p, 3);
        assert!(
            text.contains("b.txt\n  - smile, red\n  + ohwx, smile, red"),
            "{text}"
        );

        let create = Edit::Add {
            tags: vec!["ohwx".into()],
            position: Position::First,
            create_missing: true,
        };
        let p = plan(&ds, &Filter::default(), &create);
        assert_eq!(p.changes.len(), 2);
        assert!(
            p.changes
                .iter()
                .any(|c| c.original.is_none() && c.after.text == "ohwx")
        );
    }

    #[test]
    fn filter_limits_the_edit_and_normalize_rewrites_separators() {
        let (_d, ds) = dataset(&[("a", Some(b"x,y")), ("b", Some(b"z,y"))]);
        let f = Filter::new(&["x".into()], &[], false).unwrap();
        let edit = Edit::Normalize {
            underscores: Underscores::Space,
            brackets: Brackets::Keep,
        };
        let p = plan(&ds, &f, &edit);
        assert_eq!(p.changes.len(), 1);
        assert_eq!(p.changes[0].after.text, "x, y");
        // Removing nothing leaves the file as written, odd separators included.
        let none = Edit::Remove(vec![Pattern::new("q", false).unwrap()]);
        assert!(plan(&ds, &Filter::default(), &none).changes.is_empty());
    }

    #[test]
    fn prune_reports_shares_and_respects_keep() {
        let (_d, ds) = dataset(&[
            ("a", Some(b"ohwx, 1girl, smile")),
            ("b", Some(b"ohwx, 1girl")),
            ("c", Some(b"ohwx, 1girl, hat")),
        ]);
        let edit = Edit::Prune {
            above: 0.9,
            keep: vec![Pattern::new("ohwx", false).unwrap()],
            keep_first: 0,
        };
        let p = plan(&ds, &Filter::default(), &edit);
        assert_eq!(p.pruned, vec![("1girl".to_string(), 3)]);
        assert_eq!(p.changes.len(), 3);
        assert!(p.changes.iter().all(|c| !c.after.text.contains("1girl")));
    }

    #[test]
    fn apply_writes_journal_first_and_undo_restores() {
        let (d, ds) = dataset(&[
            ("a", Some("\u{feff}x, y\r\nkeep\r\n".as_bytes())),
            ("b", None),
        ]);
        let edit = Edit::Add {
            tags: vec!["t".into()],
            position: Position::Last,
            create_missing: true,
        };
        let p = plan(&ds, &Filter::default(), &edit);
        let a = apply(d.path(), &p, "add t", &|| {}).unwrap();
        assert_eq!(a.written, 2);
        assert_eq!(
            std::fs::read_to_string(d.path().join("a.txt")).unwrap(),
            "\u{feff}x, y, t\r\nkeep\r\n"
        );
        assert_eq!(
            std::fs::read_to_string(d.path().join("b.txt")).unwrap(),
            "t"
        );
        let r = journal::undo(d.path(), false).unwrap().unwrap();
        assert_eq!(r.restored.len(), 2);
        assert_eq!(
            std::fs::read(d.path().join("a.txt")).unwrap(),
            "\u{feff}x, y\r\nkeep\r\n".as_bytes()
        );
        assert!(!d.path().join("b.txt").exists());
    }
}
