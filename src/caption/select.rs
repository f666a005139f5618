//! Finds a dataset's images and their caption files, reads the captions in parallel,
//! and filters them by tags.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use rayon::prelude::*;

use super::ops::{Pattern, any_match};
use crate::dataset::caption_io::{Caption, CaptionError, caption_path, read_caption_text};

/// Image extensions sdkit treats as training images (compared without case).
pub const IMAGE_EXTS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"];

/// One image and its caption file as found on disk.
#[derive(Debug)]
pub struct Item {
    pub image: PathBuf,
    pub caption_path: PathBuf,
    /// `Ok(None)`: no caption file; `Err`: unreadable or invalid UTF-8.
    pub caption: Result<Option<Caption>, CaptionError>,
    /// The file's exact content (the undo journal keeps it byte for byte).
    pub original: Option<String>,
}

impl Item {
    /// The caption's tags; none for a missing or unreadable caption.
    pub fn tags(&self) -> Vec<String> {
        match &self.caption {
            Ok(Some(c)) => c.tags(),
            _ => Vec::new(),
        }
    }
}

/// What a scan found.
#[derive(Debug, Default)]
pub struct Dataset {
    pub root: PathBuf,
    pub items: Vec<Item>,
    /// Images skipped because an earlier image already uses their caption file
    /// (`a.jpg` and `a.png` both map to `a.txt`).
    pub shared_caption: Vec<PathBuf>,
}

pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

fn hidden(entry: &walkdir::DirEntry) -> bool {
    entry.depth() > 0
        && entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with('.'))
}

/// The images under `root`, recursively, in path order; hidden files and folders (such
/// as `.sdkit/`) are skipped.
pub fn find_images(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(root)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", root.display())))?;
    if !meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a folder", root.display()),
        ));
    }
    let mut out = Vec::new();
    let walk = walkdir::WalkDir::new(root)
        .follow_links(true)
        .sort_by_file_name()
        .into_iter()
        .filter_entry(|e| !hidden(e));
    for entry in walk {
        let entry = entry.map_err(std::io::Error::other)?;
        if entry.file_type().is_file() && is_image(entry.path()) {
            out.push(entry.into_path());
        }
    }
    Ok(out)
}

/// Scans `root` and reads every caption (`ext`, e.g. `.txt`) in parallel; `on_read`
/// is called once per caption read (progress).
pub fn load(root: &Path, ext: &str, on_read: &(dyn Fn() + Sync)) -> std::io::Result<Dataset> {
    let images = find_images(root)?;
    let mut seen = HashSet::new();
    let mut pairs = Vec::with_capacity(images.len());
    let mut shared_caption = Vec::new();
    for image in images {
        let cp = caption_path(&image, ext);
        if seen.insert(cp.clone()) {
            pairs.push((image, cp));
        } else {
            shared_caption.push(image);
        }
    }
    let items = super::with_io_pool(|| {
        pairs
            .into_par_iter()
            .map(|(image, caption_path)| {
                let read = read_caption_text(&caption_path);
                on_read();
                let original = read.as_ref().ok().cloned().flatten();
                Item {
                    image,
                    caption_path,
                    caption: read.map(|o| o.map(|t| Caption::parse(&t))),
                    original,
                }
            })
            .collect()
    });
    Ok(Dataset {
        root: root.to_path_buf(),
        items,
        shared_caption,
    })
}

/// Tag filters: every `where` pattern must match some tag, no `where_not` pattern may.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub where_: Vec<Pattern>,
    pub where_not: Vec<Pattern>,
}

impl Filter {
    pub fn new(
        where_: &[String],
        where_not: &[String],
        regex: bool,
    ) -> Result<Filter, regex::Error> {
        let compile = |v: &[String]| -> Result<Vec<Pattern>, regex::Error> {
            v.iter().map(|s| Pattern::new(s, regex)).collect()
        };
        Ok(Filter {
            where_: compile(where_)?,
            where_not: compile(where_not)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.where_.is_empty() && self.where_not.is_empty()
    }

    pub fn matches(&self, tags: &[String]) -> bool {
        self.where_
            .iter()
            .all(|p| tags.iter().any(|t| p.matches(t)))
            && !tags.iter().any(|t| any_match(&self.where_not, t))
    }
}

/// A path relative to the dataset root, for messages and journals.
pub fn relative(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_images_recursively_and_skips_hidden_and_shared() {
        let d = tempfile::tempdir().unwrap();
        let sub = d.path().join("img/10_ohwx");
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::create_dir_all(d.path().join(".sdkit")).unwrap();
        for f in ["a.JPG", "a.png", "b.webp", "notes.txt", "c.tiff"] {
            std::fs::write(sub.join(f), b"x").unwrap();
        }
        std::fs::write(d.path().join(".sdkit/z.png"), b"x").unwrap();
        std::fs::write(sub.join("a.txt"), "red, blue").unwrap();
        std::fs::write(sub.join("b.txt"), b"\xff").unwrap();
        let ds = load(d.path(), ".txt", &|| {}).unwrap();
        let names: Vec<String> = ds
            .items
            .iter()
            .map(|i| relative(d.path(), &i.image))
            .collect();
        assert_eq!(
            names,
            [
                "img/10_ohwx/a.JPG",
                "img/10_ohwx/b.webp",
                "img/10_ohwx/c.tiff"
            ]
        );
        assert_eq!(ds.shared_caption.len(), 1);
        assert_eq!(ds.items[0].tags(), ["red", "blue"]);
        assert!(ds.items[1].caption.is_err());
        assert!(matches!(ds.items[2].caption, Ok(None)));
        assert!(load(&d.path().join("missing"), ".txt", &|| {}).is_err());
    }

    #[test]
    fn filter_where_and_where_not() {
        let tags: Vec<String> = vec!["1girl".into(), "red hair".into()];
        let f = Filter::new(&["1girl".into()], &["smile".into()], false).unwrap();
        assert!(f.matches(&tags));
        let f = Filter::new(&["1girl".into(), "smile".into()], &[], false).unwrap();
        assert!(!f.matches(&tags));
        let f = Filter::new(&[], &[".* hair".into()], true).unwrap();
        assert!(!f.matches(&tags));
        assert!(Filter::default().matches(&[]));
    }
}
