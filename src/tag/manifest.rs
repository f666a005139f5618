//! Tagger family manifests (`models/*.yaml`, embedded at build time): the files a
//! downloaded tagger folder holds and the default selection settings.

use super::preprocess::Kind;
use super::select::SortBy;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Manifest {
    pub family: Kind,
    pub files: Files,
    /// The preprocessing contract, as documentation and for tests.
    pub input: std::collections::BTreeMap<String, String>,
    pub defaults: Defaults,
}

#[derive(Debug, Clone, serde::Deserialize)]
pub struct Files {
    pub model: Vec<String>,
    pub labels: Vec<String>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Defaults {
    pub general_threshold: f32,
    pub character_threshold: f32,
    pub sort: SortBy,
    pub escape_brackets: bool,
    pub keep_kaomoji: bool,
}

const WD14: &str = include_str!("../../models/wd14.yaml");
const DEEPDANBOORU: &str = include_str!("../../models/deepdanbooru.yaml");

/// The manifest of a tagger family.
pub fn manifest(kind: Kind) -> Manifest {
    let text = match kind {
        Kind::Wd14 => WD14,
        Kind::DeepDanbooru => DEEPDANBOORU,
    };
    // The files are part of the build and checked by a unit test.
    serde_yaml::from_str(text).expect("embedded models/*.yaml is valid")
}

/// Finds a model and label file in a tagger folder: the first family (WD14, then
/// DeepDanbooru, or only `kind`) whose manifest names files that are present.
pub fn find_in_dir(dir: &Path, kind: Option<Kind>) -> Option<(PathBuf, PathBuf, Kind)> {
    let kinds = match kind {
        Some(k) => vec![k],
        None => vec![Kind::Wd14, Kind::DeepDanbooru],
    };
    for k in kinds {
        let m = manifest(k);
        let first = |names: &[String]| names.iter().map(|n| dir.join(n)).find(|p| p.is_file());
        if let (Some(model), Some(labels)) = (first(&m.files.model), first(&m.files.labels)) {
            return Some((model, labels, k));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_match_the_code() {
        let w = manifest(Kind::Wd14);
        assert_eq!(w.family, Kind::Wd14);
        assert_eq!(w.input["channels"], "bgr");
        assert_eq!(w.defaults.general_threshold, 0.35);
        let d = manifest(Kind::DeepDanbooru);
        assert_eq!(d.family, Kind::DeepDanbooru);
        assert_eq!(d.input["channels"], "rgb");
        assert_eq!(d.defaults.sort, SortBy::Alphabet);
    }

    #[test]
    fn finds_files_in_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert!(find_in_dir(dir.path(), None).is_none());
        std::fs::write(dir.path().join("model.onnx"), b"x").unwrap();
        std::fs::write(dir.path().join("tags.txt"), b"x").unwrap();
        let (_, l, k) = find_in_dir(dir.path(), None).unwrap();
        assert_eq!(k, Kind::DeepDanbooru);
        assert!(l.ends_with("tags.txt"));
    }
}
