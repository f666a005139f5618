//! Which folders of a dataset kohya trains on, and which of their files it sees.
//!
//! kohya sd-scripts (`config_util.py`, `train_util.py`): a training root (`img/`,
//! `train_data_dir`) or regularisation root (`reg/`, `reg_data_dir`) holds
//! `<repeats>_<class tokens>` folders; other subfolders and loose files are ignored, a
//! folder with repeats < 1 is ignored. Inside a concept folder only the top level is
//! read, and only `.png .jpg .jpeg .webp .bmp` in all-lower or all-upper case.

use std::path::{Path, PathBuf};

use crate::caption::select::is_image;

/// The extensions kohya's `glob_images` matches (it tries both cases literally).
const KOHYA_EXTS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A `<repeats>_<name>` folder under a training root.
    Train,
    /// A `<repeats>_<class>` folder under a regularisation root.
    Reg,
    /// Any folder of images, not in kohya's layout (repeats taken as 1).
    Plain,
}

/// One folder kohya would treat as a subset.
#[derive(Debug, Clone)]
pub struct Concept {
    pub dir: PathBuf,
    pub kind: Kind,
    /// kohya's `num_repeats`; `None` for a plain folder.
    pub repeats: Option<u32>,
    /// kohya's class tokens (the folder name after `<repeats>_`), used as the caption
    /// of images without a caption file.
    pub name: String,
    /// The images kohya reads, sorted by name.
    pub images: Vec<PathBuf>,
    /// Images kohya skips in this folder (other extensions or case, subfolders).
    pub ignored: Vec<PathBuf>,
}

/// Things in the layout itself that kohya ignores.
#[derive(Debug, Default)]
pub struct Layout {
    pub concepts: Vec<Concept>,
    /// Subfolders of a root without a `<repeats>_` prefix.
    pub not_concepts: Vec<PathBuf>,
    /// Image files lying directly in a root.
    pub loose: Vec<PathBuf>,
    /// `kohya`, `single` (DIR is one concept folder) or `plain`.
    pub style: &'static str,
}

/// kohya's `extract_dreambooth_params`: `10_ron` -> (10, "ron"); `None` without a
/// leading integer.
pub fn parse_concept_name(name: &str) -> Option<(u32, String)> {
    let (head, rest) = match name.split_once('_') {
        Some((h, r)) => (h, r),
        None => (name, ""),
    };
    if head.is_empty() || !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n = head.parse::<u64>().ok()?.min(u32::MAX as u64) as u32;
    Some((n, rest.to_string()))
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

fn kohya_reads(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| {
        let lower = e.to_ascii_lowercase();
        KOHYA_EXTS.contains(&lower.as_str()) && (e == lower || e == e.to_ascii_uppercase())
    })
}

fn entries(dir: &Path) -> std::io::Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut dirs = Vec::new();
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let p = e.path();
        if is_hidden(&p) {
            continue;
        }
        // Follow links, as kohya's glob does.
        if p.is_dir() {
            dirs.push(p);
        } else if p.is_file() {
            files.push(p);
        }
    }
    dirs.sort();
    files.sort();
    Ok((dirs, files))
}

fn images_below(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_entry(|e| e.depth() == 0 || !is_hidden(e.path()))
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file() && is_image(e.path()))
        .map(|e| e.into_path())
        .collect();
    out.sort();
    out
}

fn concept(dir: &Path, kind: Kind, repeats: Option<u32>, name: String) -> std::io::Result<Concept> {
    let (subdirs, files) = entries(dir)?;
    let mut images = Vec::new();
    let mut ignored = Vec::new();
    for f in files {
        if kind != Kind::Plain && kohya_reads(&f) {
            images.push(f);
        } else if kind == Kind::Plain && is_image(&f) {
            images.push(f);
        } else if is_image(&f) {
            ignored.push(f);
        }
    }
    for d in subdirs {
        if kind == Kind::Plain {
            images.extend(images_below(&d));
        } else {
            ignored.extend(images_below(&d));
        }
    }
    Ok(Concept {
        dir: dir.to_path_buf(),
        kind,
        repeats,
        name,
        images,
        ignored,
    })
}

fn is_reg_root(p: &Path) -> bool {
    p.file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().starts_with("reg"))
}

fn concept_children(root: &Path) -> std::io::Result<Vec<(PathBuf, u32, String)>> {
    let (dirs, _) = entries(root)?;
    Ok(dirs
        .into_iter()
        .filter_map(|d| {
            let name = d.file_name()?.to_string_lossy().into_owned();
            parse_concept_name(&name).map(|(n, s)| (d, n, s))
        })
        .collect())
}

/// Reads a root (`img/`, `reg/` or DIR) holding `<repeats>_<name>` folders.
fn read_root(root: &Path, kind: Kind, out: &mut Layout) -> std::io::Result<()> {
    let (dirs, files) = entries(root)?;
    for d in dirs {
        let name = d
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        match parse_concept_name(&name) {
            Some((n, s)) => out.concepts.push(concept(&d, kind, Some(n), s)?),
            None => out.not_concepts.push(d),
        }
    }
    out.loose.extend(files.into_iter().filter(|f| is_image(f)));
    Ok(())
}

/// Works out the layout of `dir`:
/// - `dir` holds `<n>_<name>` folders: a training root (a regularisation root when its
///   own name starts with `reg`);
/// - `dir` holds roots (`img/`, `reg/`, ...) that hold `<n>_<name>` folders;
/// - `dir` itself is named `<n>_<name>`: one training concept;
/// - anything else: one plain folder, images found recursively.
pub fn discover(dir: &Path) -> std::io::Result<Layout> {
    let mut out = Layout::default();
    if !concept_children(dir)?.is_empty() {
        out.style = "kohya";
        let kind = if is_reg_root(dir) {
            Kind::Reg
        } else {
            Kind::Train
        };
        read_root(dir, kind, &mut out)?;
        return Ok(out);
    }
    let (dirs, _) = entries(dir)?;
    let roots: Vec<PathBuf> = dirs
        .into_iter()
        .filter(|d| concept_children(d).is_ok_and(|c| !c.is_empty()))
        .collect();
    if !roots.is_empty() {
        out.style = "kohya";
        for r in roots {
            let kind = if is_reg_root(&r) {
                Kind::Reg
            } else {
                Kind::Train
            };
            read_root(&r, kind, &mut out)?;
        }
        return Ok(out);
    }
    let own = dir
        .canonicalize()
        .ok()
        .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    if let Some((n, s)) = parse_concept_name(&own) {
        out.style = "single";
        out.concepts.push(concept(dir, Kind::Train, Some(n), s)?);
    } else {
        out.style = "plain";
        out.concepts.push(concept(dir, Kind::Plain, None, own)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn concept_names_follow_kohya() {
        assert_eq!(parse_concept_name("10_ron"), Some((10, "ron".into())));
        assert_eq!(
            parse_concept_name("3_ohwx_woman"),
            Some((3, "ohwx_woman".into()))
        );
        assert_eq!(parse_concept_name("5"), Some((5, String::new())));
        assert_eq!(parse_concept_name("ron_10"), None);
        assert_eq!(parse_concept_name("_x"), None);
    }

    #[test]
    fn kohya_reads_lower_or_upper_case_only() {
        assert!(kohya_reads(Path::new("a.png")));
        assert!(kohya_reads(Path::new("a.JPG")));
        assert!(!kohya_reads(Path::new("a.Jpg")));
        assert!(!kohya_reads(Path::new("a.gif")));
        assert!(!kohya_reads(Path::new("a.tiff")));
    }

    #[test]
    fn finds_roots_concepts_and_ignored_files() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        for f in [
            "img/10_ron/a.png",
            "img/10_ron/b.gif",
            "img/10_ron/sub/c.png",
            "img/10_ron/a.txt",
            "img/misc/d.png",
            "img/e.png",
            "reg/1_man/r.jpg",
        ] {
            let f = p.join(f);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, b"x").unwrap();
        }
        let l = discover(p).unwrap();
        assert_eq!(l.style, "kohya");
        assert_eq!(l.concepts.len(), 2);
        let ron = &l.concepts[0];
        assert_eq!(
            (ron.kind, ron.repeats, ron.name.as_str()),
            (Kind::Train, Some(10), "ron")
        );
        assert_eq!(ron.images, [p.join("img/10_ron/a.png")]);
        assert_eq!(
            ron.ignored,
            [p.join("img/10_ron/b.gif"), p.join("img/10_ron/sub/c.png")]
        );
        assert_eq!(l.concepts[1].kind, Kind::Reg);
        assert_eq!(l.not_concepts, [p.join("img/misc")]);
        assert_eq!(l.loose, [p.join("img/e.png")]);
        let single = discover(&p.join("img/10_ron")).unwrap();
        assert_eq!(single.style, "single");
        let plain = discover(&p.join("img/misc")).unwrap();
        assert_eq!(
            (plain.style, plain.concepts[0].kind),
            ("plain", Kind::Plain)
        );
    }
}
