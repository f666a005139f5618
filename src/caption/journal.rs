//! Undo journal for bulk caption edits. Before an edit touches any file, the previous
//! content of every file it will change (or the fact that it did not exist) is written
//! atomically to `DIR/.sdkit/caption-journal/NNNNNN.json`, with a hash of the content
//! the edit writes. `undo` restores the newest entry and removes it; a file changed
//! since the edit is not overwritten unless forced.

use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// How many edits are kept; older entries are deleted when a new one is recorded.
pub const KEEP: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: damaged journal entry: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: journal names a path outside the dataset: {file}", path.display())]
    Escapes { path: PathBuf, file: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One changed file: where, what it held before, what the edit wrote.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileRecord {
    /// Relative to the dataset folder, `/`-separated.
    pub path: String,
    /// The previous content; `None` when the file did not exist. Captions that sdkit
    /// edits are valid UTF-8, so the exact bytes fit in a JSON string.
    pub before: Option<String>,
    /// blake3 of the content the edit wrote; `None` when it deleted the file.
    pub after_blake3: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// The edit, in words (`remove "smile"`).
    pub edit: String,
    /// Seconds since the Unix epoch.
    pub created: u64,
    pub files: Vec<FileRecord>,
}

impl Entry {
    pub fn new(edit: impl Into<String>, files: Vec<FileRecord>) -> Entry {
        let created = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        Entry {
            edit: edit.into(),
            created,
            files,
        }
    }
}

pub fn hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

pub fn journal_dir(root: &Path) -> PathBuf {
    root.join(".sdkit").join("caption-journal")
}

fn entries(root: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let dir = journal_dir(root);
    let rd = match std::fs::read_dir(&dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&dir)(e)),
    };
    let mut v = Vec::new();
    for e in rd {
        let e = e.map_err(io(&dir))?;
        let name = e.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".json")) else {
            continue;
        };
        if let Ok(seq) = n.parse::<u64>() {
            v.push((seq, e.path()));
        }
    }
    v.sort();
    Ok(v)
}

/// Writes `entry` as the newest journal entry (atomically) and drops entries beyond
/// [`KEEP`]. Returns the entry's path.
pub fn record(root: &Path, entry: &Entry) -> Result<PathBuf, JournalError> {
    let dir = journal_dir(root);
    crate::util::atomic::create_dir_all(&dir).map_err(io(&dir))?;
    let existing = entries(root)?;
    let seq = existing.last().map(|(s, _)| s + 1).unwrap_or(1);
    let path = dir.join(format!("{seq:06}.json"));
    let json = serde_json::to_vec(entry).map_err(|e| JournalError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    crate::util::write_atomic(&path, &json).map_err(io(&path))?;
    let total = existing.len() + 1;
    for (_, old) in existing.iter().take(total.saturating_sub(KEEP)) {
        let _ = std::fs::remove_file(old);
    }
    Ok(path)
}

/// The newest entry, if any.
pub fn last(root: &Path) -> Result<Option<(PathBuf, Entry)>, JournalError> {
    let Some((_, path)) = entries(root)?.pop() else {
        return Ok(None);
    };
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let entry = serde_json::from_slice(&bytes).map_err(|source| JournalError::Parse {
        path: path.clone(),
        source,
    })?;
    Ok(Some((path, entry)))
}

/// What `undo` did.
#[derive(Debug, Default, Serialize)]
pub struct UndoReport {
    pub edit: String,
    /// Files put back as they were.
    pub restored: Vec<String>,
    /// Files that already held their previous content.
    pub unchanged: Vec<String>,
    /// Files changed after the edit; left alone unless forced.
    pub conflicts: Vec<String>,
    /// Entries still in the journal after this undo.
    pub remaining: usize,
}

enum State {
    AsWritten,
    AsBefore,
    Changed,
}

fn state(path: &Path, rec: &FileRecord) -> Result<State, JournalError> {
    let now = match std::fs::read(path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(path)(e)),
    };
    let now_hash = now.as_deref().map(hash);
    Ok(
        if now.as_deref() == rec.before.as_deref().map(str::as_bytes) {
            State::AsBefore
        } else if now_hash == rec.after_blake3 {
            State::AsWritten
        } else {
            State::Changed
        },
    )
}

fn resolve(root: &Path, journal: &Path, rel: &str) -> Result<PathBuf, JournalError> {
    let p = Path::new(rel);
    let safe = p
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !safe {
        return Err(JournalError::Escapes {
            path: journal.to_path_buf(),
            file: rel.to_string(),
        });
    }
    Ok(root.join(p))
}

fn restore(path: &Path, rec: &FileRecord) -> Result<(), JournalError> {
    match &rec.before {
        Some(text) => crate::util::write_atomic(path, text.as_bytes()).map_err(io(path)),
        None => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(path)(e)),
        },
    }
}

/// Restores the files of the newest entry and removes it. With conflicts (files edited
/// since) and no `force`, nothing is written and the entry stays. `Ok(None)`: the
/// journal is empty.
pub fn undo(root: &Path, force: bool) -> Result<Option<UndoReport>, JournalError> {
    let Some((jpath, entry)) = last(root)? else {
        return Ok(None);
    };
    let mut report = UndoReport {
        edit: entry.edit.clone(),
        ..UndoReport::default()
    };
    let paths = entry
        .files
        .iter()
        .map(|rec| resolve(root, &jpath, &rec.path))
        .collect::<Result<Vec<_>, _>>()?;
    let states = super::with_io_pool(|| {
        paths
            .par_iter()
            .zip(&entry.files)
            .map(|(path, rec)| state(path, rec))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let mut todo = Vec::new();
    for ((path, rec), st) in paths.into_iter().zip(&entry.files).zip(states) {
        match st {
            State::AsBefore => report.unchanged.push(rec.path.clone()),
            State::AsWritten => todo.push((path, rec)),
            State::Changed => {
                report.conflicts.push(rec.path.clone());
                todo.push((path, rec));
            }
        }
    }
    if !report.conflicts.is_empty() && !force {
        report.remaining = entries(root)?.len();
        return Ok(Some(report));
    }
    super::with_io_pool(|| {
        todo.par_iter()
            .map(|(path, rec)| restore(path, rec))
            .collect::<Result<Vec<()>, _>>()
    })?;
    report.restored = todo.iter().map(|(_, rec)| rec.path.clone()).collect();
    std::fs::remove_file(&jpath).map_err(io(&jpath))?;
    report.remaining = entries(root)?.len();
    Ok(Some(report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(root: &Path, rel: &str, after: Option<&str>) -> FileRecord {
        let before = std::fs::read_to_string(root.join(rel)).ok();
        if let Some(a) = after {
            std::fs::write(root.join(rel), a).unwrap();
        } else {
            let _ = std::fs::remove_file(root.join(rel));
        }
        FileRecord {
            path: rel.into(),
            before,
            after_blake3: after.map(|a| hash(a.as_bytes())),
        }
    }

    #[test]
    fn undo_restores_exact_bytes_and_absence_then_pops() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("a.txt"), "\u{feff}x, y\r\nmore\r\n").unwrap();
        assert!(undo(root, false).unwrap().is_none());
        let files = vec![
            rec(root, "a.txt", Some("y")),
            rec(root, "new.txt", Some("t")),
        ];
        record(root, &Entry::new("first", files)).unwrap();
        let files = vec![rec(root, "a.txt", Some("z"))];
        record(root, &Entry::new("second", files)).unwrap();

        let r = undo(root, false).unwrap().unwrap();
        assert_eq!((r.edit.as_str(), r.remaining), ("second", 1));
        assert_eq!(std::fs::read_to_string(root.join("a.txt")).unwrap(), "y");
        let r = undo(root, false).unwrap().unwrap();
        assert_eq!(r.restored, ["a.txt", "new.txt"]);
        assert_eq!(
            std::fs::read(root.join("a.txt")).unwrap(),
            "\u{feff}x, y\r\nmore\r\n".as_bytes()
        );
        assert!(!root.join("new.txt").exists());
        assert!(undo(root, false).unwrap().is_none());
    }

    #[test]
    fn conflicts_block_undo_unless_forced_and_undo_is_rerunnable() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::write(root.join("a.txt"), "a").unwrap();
        std::fs::write(root.join("b.txt"), "b").unwrap();
        let files = vec![rec(root, "a.txt", Some("A")), rec(root, "b.txt", Some("B"))];
        record(root, &Entry::new("edit", files)).unwrap();
        std::fs::write(root.join("b.txt"), "by hand").unwrap();
        let r = undo(root, false).unwrap().unwrap();
        assert_eq!(r.conflicts, ["b.txt"]);
        assert!(r.restored.is_empty());
        assert_eq!(std::fs::read_to_string(root.join("a.txt")).unwrap(), "A");
        // A file already back to its old content counts as unchanged.
        std::fs::write(root.join("a.txt"), "a").unwrap();
        let r = undo(root, true).unwrap().unwrap();
        assert_eq!((r.unchanged.len(), r.restored.len()), (1, 1));
        assert_eq!(std::fs::read_to_string(root.join("b.txt")).unwrap(), "b");
    }

    #[test]
    fn keeps_the_newest_entries_and_rejects_escaping_paths() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        for i in 0..KEEP + 3 {
            record(root, &Entry::new(format!("e{i}"), vec![])).unwrap();
        }
        assert_eq!(entries(root).unwrap().len(), KEEP);
        assert_eq!(
            last(root).unwrap().unwrap().1.edit,
            format!("e{}", KEEP + 2)
        );
        let bad = FileRecord {
            path: "../x.txt".into(),
            before: None,
            after_blake3: None,
        };
        record(root, &Entry::new("bad", vec![bad])).unwrap();
        assert!(matches!(
            undo(root, false),
            Err(JournalError::Escapes { .. })
        ));
    }
}
