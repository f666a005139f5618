//! Known model names (`models/registry/*.yaml`, embedded at build time) and what is on
//! disk of each.

use std::collections::BTreeMap;

/// What a model is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Use {
    Tagger,
    Matte,
    Checkpoint,
    Runtime,
}

impl Use {
    pub fn name(self) -> &'static str {
        match self {
            Use::Tagger => "tagger",
            Use::Matte => "matte",
            Use::Checkpoint => "checkpoint",
            Use::Runtime => "runtime",
        }
    }
}

/// One known model.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Entry {
    pub name: String,
    #[serde(rename = "use")]
    pub use_: Use,
    /// Hugging Face repo id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    #[serde(default = "main", skip_serializing_if = "String::is_empty")]
    pub revision: String,
    /// A plain download URL (for one-file models that are not on the hub).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// A PyPI package (the onnxruntime wheel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pypi: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_package: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    #[serde(default)]
    pub files: Vec<String>,
    /// Known sha256 of files, by file name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sha256: BTreeMap<String, String>,
    pub licence: String,
    pub about: String,
}

fn main() -> String {
    "main".into()
}

#[derive(serde::Deserialize)]
struct File {
    models: Vec<Entry>,
}

const FILES: &[(&str, &str)] = &[
    (
        "taggers.yaml",
        include_str!("../../models/registry/taggers.yaml"),
    ),
    (
        "matte.yaml",
        include_str!("../../models/registry/matte.yaml"),
    ),
    (
        "checkpoints.yaml",
        include_str!("../../models/registry/checkpoints.yaml"),
    ),
    (
        "onnxruntime.yaml",
        include_str!("../../models/registry/onnxruntime.yaml"),
    ),
];

/// Every known model, in file order.
pub fn all() -> Vec<Entry> {
    FILES
        .iter()
        .flat_map(|(name, text)| {
            // Part of the build; `registry_parses` checks every file.
            serde_yaml::from_str::<File>(text)
                .unwrap_or_else(|e| panic!("models/registry/{name}: {e}"))
                .models
        })
        .collect()
}

/// A name that is not in the registry.
#[derive(Debug, thiserror::Error)]
#[error("unknown model {name:?}{}; known names: {}. A hub repo works too: owner/repo or owner/repo:file.safetensors", did_you_mean.as_ref().map(|d| format!(" (did you mean {d}?)")).unwrap_or_default(), known.join(", "))]
pub struct UnknownModel {
    pub name: String,
    pub did_you_mean: Option<String>,
    pub known: Vec<String>,
}

/// Levenshtein distance over chars.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known name closest to `name`, when close enough to be a typo.
pub fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    known
        .into_iter()
        .map(|k| (distance(&lower, k), k))
        .filter(|(d, k)| *d <= (k.len() / 3).max(2))
        .min()
        .map(|(_, k)| k.to_string())
}

/// The entry called `name` (of `use_` when given).
pub fn find(name: &str, use_: Option<Use>) -> Result<Entry, UnknownModel> {
    let entries: Vec<Entry> = all()
        .into_iter()
        .filter(|e| use_.is_none_or(|u| e.use_ == u))
        .collect();
    if let Some(e) = entries.iter().find(|e| e.name.eq_ignore_ascii_case(name)) {
        return Ok(e.clone());
    }
    let known: Vec<String> = entries.iter().map(|e| e.name.clone()).collect();
    Err(UnknownModel {
        name: name.into(),
        did_you_mean: closest(name, known.iter().map(String::as_str)),
        known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_parses_and_is_consistent() {
        let all = all();
        let mut names: Vec<&str> = all.iter().map(|e| e.name.as_str()).collect();
        names.sort();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "duplicate names");
        for e in &all {
            let sources = [e.repo.is_some(), e.url.is_some(), e.pypi.is_some()];
            assert_eq!(sources.iter().filter(|s| **s).count(), 1, "{}", e.name);
            assert!(e.pypi.is_some() || !e.files.is_empty(), "{}", e.name);
            for (f, h) in &e.sha256 {
                assert!(e.files.contains(f), "{}: sha256 of unlisted {f}", e.name);
                assert!(h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
            }
            if e.use_ == Use::Tagger {
                assert_eq!(e.files, ["model.onnx", "selected_tags.csv"], "{}", e.name);
            }
        }
        let ort = find("onnxruntime", Some(Use::Runtime)).unwrap();
        assert_eq!(
            ort.version.as_deref(),
            Some(crate::tag::runtime::PINNED_ORT)
        );
        let ci = include_str!("../../.ci/setup.d/10-onnxruntime.sh");
        assert!(ci.contains(&format!("ORT_VERSION={}", crate::tag::runtime::PINNED_ORT)));
    }

    #[test]
    fn unknown_names_suggest_the_closest() {
        let e = find("wd14-convnext-v22", None).unwrap_err();
        assert_eq!(e.did_you_mean.as_deref(), Some("wd14-convnext-v2"));
        let msg = e.to_string();
        assert!(msg.contains("did you mean wd14-convnext-v2?"), "{msg}");
        assert!(msg.contains("wd-eva02-large-v3"), "{msg}");
        let e = find("zzzzzzzzzzzz", None).unwrap_err();
        assert_eq!(e.did_you_mean, None);
        assert!(find("U2NET", Some(Use::Matte)).is_ok());
        assert!(find("u2net", Some(Use::Tagger)).is_err());
    }
}
