//! The prep manifest: one JSON line per source, appended as each source finishes (a
//! kill loses at most the line being written; a torn last line is ignored on load),
//! compacted atomically at the end of a run.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub const FILE_NAME: &str = "sdkit-prep.jsonl";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputRecord {
    /// Relative to the output directory, `/`-separated.
    pub path: String,
    pub size: (u32, u32),
    pub bucket: (u32, u32),
    /// Crop box in upright source pixels: x, y, w, h.
    pub crop: [f64; 4],
    pub flip: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tile: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    /// The mask written with `--save-masks`, relative like `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SourceRecord {
    pub source: String,
    pub source_bytes: u64,
    pub source_hash: String,
    pub source_size: (u32, u32),
    /// `train` or `reg`.
    pub group: String,
    /// Fingerprint of the settings that shape outputs.
    pub settings: String,
    pub outputs: Vec<OutputRecord>,
}

/// Records by source path, plus the append handle.
pub struct Manifest {
    path: PathBuf,
    pub records: BTreeMap<String, SourceRecord>,
    appender: Mutex<Option<File>>,
}

impl Manifest {
    /// Loads `dir/sdkit-prep.jsonl` if present. Malformed lines are skipped.
    pub fn load(dir: &Path) -> Manifest {
        let path = dir.join(FILE_NAME);
        let mut records = BTreeMap::new();
        if let Ok(f) = File::open(&path) {
            for line in BufReader::new(f).lines().map_while(Result::ok) {
                if let Ok(r) = serde_json::from_str::<SourceRecord>(&line) {
                    records.insert(r.source.clone(), r);
                }
            }
        }
        Manifest {
            path,
            records,
            appender: Mutex::new(None),
        }
    }

    /// Appends one record (flushed at once).
    pub fn append(&self, rec: &SourceRecord) -> std::io::Result<()> {
        let mut g = self.appender.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?,
            );
        }
        let f = g.as_mut().expect("opened above");
        let mut line = serde_json::to_string(rec).map_err(std::io::Error::other)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
        f.flush()
    }

    /// Rewrites the file with one line per source, atomically.
    pub fn compact(&mut self, records: &BTreeMap<String, SourceRecord>) -> std::io::Result<()> {
        *self.appender.lock().unwrap_or_else(|e| e.into_inner()) = None;
        crate::util::write_atomic_with(&self.path, |w| {
            for r in records.values() {
                serde_json::to_writer(&mut *w, r).map_err(std::io::Error::other)?;
                w.write_all(b"\n")?;
            }
            Ok(())
        })?;
        self.records = records.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torn_last_line_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let m = Manifest::load(dir.path());
        let rec = SourceRecord {
            source: "/a.jpg".into(),
            source_bytes: 3,
            source_hash: "ab".into(),
            source_size: (10, 20),
            group: "train".into(),
            settings: "s".into(),
            outputs: vec![],
        };
        m.append(&rec).unwrap();
        drop(m);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join(FILE_NAME))
            .unwrap();
        f.write_all(b"{\"source\": \"/b.jpg\", \"sour").unwrap();
        let m = Manifest::load(dir.path());
        assert_eq!(m.records.len(), 1);
        assert_eq!(m.records["/a.jpg"], rec);
    }
}
