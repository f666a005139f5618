//! Finding source images: recursive, sorted, hidden and temporary files skipped.
//! Images are recognised by extension here; the decoder sniffs the real format.

use std::path::{Path, PathBuf};
use walkdir::WalkDir;

pub const IMAGE_EXTENSIONS: &[&str] = &[
    "jpg", "jpeg", "jpe", "jfif", "png", "webp", "bmp", "gif", "tif", "tiff",
];

/// One source image and a stable name for it relative to the input it came from.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    /// `<input folder name>/<path inside it>`; stable across runs and machines.
    pub rel: String,
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Scan {
    pub images: Vec<SourceFile>,
    /// Files that are not images (captions excluded), skipped quietly.
    pub other_files: usize,
    /// Directory entries that could not be read: `path: reason`.
    pub errors: Vec<String>,
}

pub fn is_image_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_string_lossy().starts_with('.')
}

/// Scans files and folders (recursively). `caption_exts` are not counted as other files.
pub fn scan(inputs: &[PathBuf], caption_exts: &[String]) -> Scan {
    let mut out = Scan::default();
    for input in inputs {
        let root_name = input
            .canonicalize()
            .ok()
            .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| input.to_string_lossy().into_owned());
        let base = if input.is_dir() {
            input.as_path()
        } else {
            input.parent().unwrap_or(Path::new(""))
        };
        let walker = WalkDir::new(input)
            .follow_links(true)
            .sort_by_file_name()
            .into_iter();
        for entry in walker.filter_entry(|e| e.depth() == 0 || !is_hidden(e.file_name())) {
            let entry = match entry {
                Ok(e) => e,
                Err(e) => {
                    let p = e
                        .path()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| input.display().to_string());
                    out.errors.push(format!(
                        "{p}: {}",
                        e.io_error().map(|i| i.to_string()).unwrap_or(e.to_string())
                    ));
                    continue;
                }
            };
            if !entry.file_type().is_file() {
                continue;
            }
            let path = entry.path();
            if is_image_path(path) {
                let inner = path
                    .strip_prefix(base)
                    .unwrap_or(path)
                    .to_string_lossy()
                    .replace('\\', "/");
                let rel = if input.is_dir() {
                    format!("{root_name}/{inner}")
                } else {
                    inner
                };
                out.images.push(SourceFile {
                    path: path.to_path_buf(),
                    rel,
                });
            } else {
                let ext = path
                    .extension()
                    .map(|e| e.to_string_lossy().to_ascii_lowercase());
                let is_caption = ext
                    .is_some_and(|e| caption_exts.iter().any(|c| c.trim_start_matches('.') == e));
                if !is_caption {
                    out.other_files += 1;
                }
            }
        }
    }
    out
}
