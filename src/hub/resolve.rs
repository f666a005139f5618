//! `--model` values to files on disk: a path that exists wins; else a known name
//! ([`super::registry`]); else a hub repo id, `owner/repo[@revision][:file]`.

use super::HubError;
use super::cache::Cache;
use super::download::{self, Client, Expect, HubFile};
use super::registry::{self, Entry, Use};
use std::path::{Path, PathBuf};

/// A parsed `--model` value that is not a local path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoSpec {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

fn id_part_ok(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(['.', '-'])
        && !s.contains("..")
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// `owner/repo[@revision][:file]`, or `None` when `s` is not of that form.
pub fn parse_repo(s: &str) -> Option<RepoSpec> {
    let (id, file) = match s.split_once(':') {
        Some((id, f)) => (id, Some(f.to_string())),
        None => (s, None),
    };
    let (id, revision) = match id.split_once('@') {
        Some((id, r)) => (id, r.to_string()),
        None => (id, "main".to_string()),
    };
    let (owner, name) = id.split_once('/')?;
    let file_ok = file.as_deref().is_none_or(|f| {
        !f.is_empty() && f.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
    });
    (id_part_ok(owner) && id_part_ok(name) && id_part_ok(&revision) && file_ok).then(|| RepoSpec {
        repo: id.to_string(),
        revision,
        file,
    })
}

/// Where a `url:` entry's file lives.
fn url_file_path(e: &Entry, file: &str) -> PathBuf {
    super::sdkit_cache().join("models").join(&e.name).join(file)
}

fn hub_file_of(e: &Entry, repo: &str, file: &str) -> HubFile {
    HubFile {
        repo: repo.into(),
        revision: e.revision.clone(),
        file: file.into(),
        sha256: e.sha256.get(file).cloned(),
    }
}

/// The files of `e` already on disk (`None` for each one missing).
pub fn on_disk(e: &Entry, cache: &Cache) -> Vec<Option<PathBuf>> {
    e.files
        .iter()
        .map(|f| match (&e.repo, &e.url) {
            (Some(repo), _) => cache.lookup(repo, &e.revision, f),
            (None, Some(_)) => Some(url_file_path(e, f)).filter(|p| p.is_file()),
            _ => None,
        })
        .collect()
}

/// The files of `e`, downloaded when missing (in the order of `e.files`).
pub fn fetch_entry(client: &Client, cache: &Cache, e: &Entry) -> Result<Vec<PathBuf>, HubError> {
    let mut out = Vec::new();
    for f in &e.files {
        let p = match (&e.repo, &e.url) {
            (Some(repo), _) => download::hub_file(client, cache, &hub_file_of(e, repo, f))?,
            (None, Some(url)) => {
                let dest = url_file_path(e, f);
                if !dest.is_file() {
                    if super::offline() {
                        return Err(HubError::Offline {
                            what: e.name.clone(),
                            cache: dest.parent().unwrap_or(&dest).to_path_buf(),
                        });
                    }
                    let expect = Expect {
                        sha256: e.sha256.get(f).cloned(),
                        size: None,
                    };
                    download::fetch_url(client, url, None, &dest, &expect, &e.name)?;
                }
                dest
            }
            _ => {
                return Err(HubError::Protocol {
                    what: e.name.clone(),
                    reason: "fetched with `sdkit models fetch onnxruntime`".into(),
                });
            }
        };
        out.push(p);
    }
    Ok(out)
}

/// A diffusers repo: `model_index.json` and, for each component sdkit loads, its
/// `config.json` and the first weights file the loader would pick. Returns the snapshot
/// folder. A complete snapshot in the cache is used without asking the hub.
pub fn diffusers_repo(
    client: &Client,
    cache: &Cache,
    spec: &RepoSpec,
) -> Result<PathBuf, HubError> {
    let what = format!("{}@{}", spec.repo, spec.revision);
    use crate::model::loader::{COMPONENT_WEIGHTS, COMPONENTS};
    if let Some(index) = cache.lookup(&spec.repo, &spec.revision, "model_index.json")
        && let Some(dir) = index.parent()
        && COMPONENTS.iter().all(|c| {
            dir.join(c).join("config.json").is_file()
                && COMPONENT_WEIGHTS
                    .iter()
                    .any(|w| dir.join(c).join(w).is_file())
        })
    {
        return Ok(dir.to_path_buf());
    }
    if super::offline() {
        return Err(HubError::Offline {
            what,
            cache: cache.root.clone(),
        });
    }
    let url = format!(
        "{}/api/models/{}/revision/{}",
        super::endpoint(),
        spec.repo,
        spec.revision
    );
    let info = download::get_json(client, &url, super::token().as_deref(), &what)?;
    let names: Vec<&str> = info["siblings"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["rfilename"].as_str()).collect())
        .unwrap_or_default();
    if !names.contains(&"model_index.json") {
        return Err(HubError::Protocol {
            what,
            reason: "not a diffusers repo (no model_index.json); name one file as owner/repo:file.safetensors".into(),
        });
    }
    let mut files = vec!["model_index.json".to_string()];
    for c in COMPONENTS {
        files.push(format!("{c}/config.json"));
        let w = COMPONENT_WEIGHTS
            .iter()
            .map(|w| format!("{c}/{w}"))
            .find(|w| names.contains(&w.as_str()))
            .ok_or_else(|| HubError::Protocol {
                what: what.clone(),
                reason: format!("no weights file in {c}/"),
            })?;
        files.push(w);
    }
    let mut index = None;
    for f in files {
        let hf = HubFile {
            repo: spec.repo.clone(),
            revision: spec.revision.clone(),
            file: f,
            sha256: None,
        };
        let p = download::hub_file(client, cache, &hf)?;
        index.get_or_insert(p);
    }
    let index = index.unwrap_or_default();
    Ok(index.parent().unwrap_or(Path::new(".")).to_path_buf())
}

/// Whether `value` should be looked up (not a path the user has on disk).
fn remote(value: &Path) -> Option<String> {
    if value.exists() {
        return None;
    }
    value.to_str().map(str::to_string)
}

/// `--model` of `sample`/`train`: a local checkpoint, a known name, `owner/repo`
/// (diffusers) or `owner/repo:file`.
pub fn checkpoint(value: &Path, quiet: bool) -> Result<PathBuf, HubError> {
    let Some(s) = remote(value) else {
        return Ok(value.into());
    };
    let client = Client::new(quiet);
    let cache = Cache::from_env();
    if let Some(spec) = parse_repo(&s) {
        return match &spec.file {
            Some(f) => download::hub_file(
                &client,
                &cache,
                &HubFile {
                    repo: spec.repo.clone(),
                    revision: spec.revision.clone(),
                    file: f.clone(),
                    sha256: None,
                },
            ),
            None => diffusers_repo(&client, &cache, &spec),
        };
    }
    if looks_like_file(&s) {
        return Ok(value.into());
    }
    let e = registry::find(&s, Some(Use::Checkpoint))?;
    Ok(fetch_entry(&client, &cache, &e)?.remove(0))
}

/// A value with a path separator or a file extension is meant as a path: it is left for
/// the loader to report as missing.
fn looks_like_file(s: &str) -> bool {
    s.contains(std::path::MAIN_SEPARATOR) || s.contains('/') || Path::new(s).extension().is_some()
}

/// `--matte` of `prep`: a local ONNX file or a known matting model name.
pub fn matte(value: &Path, quiet: bool) -> Result<PathBuf, HubError> {
    let Some(s) = remote(value) else {
        return Ok(value.into());
    };
    if looks_like_file(&s) {
        return Ok(value.into());
    }
    let e = registry::find(&s, Some(Use::Matte))?;
    Ok(fetch_entry(&Client::new(quiet), &Cache::from_env(), &e)?.remove(0))
}

/// `--model` of `tag` when it is not a file: a known tagger name or a hub repo holding
/// `model.onnx` + `selected_tags.csv`. Returns (model, labels).
pub fn tagger(value: &Path, quiet: bool) -> Result<Option<(PathBuf, PathBuf)>, HubError> {
    let Some(s) = remote(value) else {
        return Ok(None);
    };
    let client = Client::new(quiet);
    let cache = Cache::from_env();
    let e = if let Some(spec) = parse_repo(&s).filter(|s| s.file.is_none()) {
        Entry {
            name: spec.repo.clone(),
            use_: Use::Tagger,
            repo: Some(spec.repo),
            revision: spec.revision,
            url: None,
            pypi: None,
            gpu_package: None,
            version: None,
            files: vec!["model.onnx".into(), "selected_tags.csv".into()],
            sha256: Default::default(),
            licence: String::new(),
            about: String::new(),
        }
    } else if looks_like_file(&s) {
        return Ok(None);
    } else {
        registry::find(&s, Some(Use::Tagger))?
    };
    let mut files = fetch_entry(&client, &cache, &e)?;
    let labels = files.pop().unwrap_or_default();
    let model = files.pop().unwrap_or_default();
    Ok(Some((model, labels)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        let s = parse_repo("stable-diffusion-v1-5/stable-diffusion-v1-5").unwrap();
        assert_eq!(s.repo, "stable-diffusion-v1-5/stable-diffusion-v1-5");
        assert_eq!(s.revision, "main");
        assert_eq!(s.file, None);
        let s = parse_repo("a/b@v2:unet/x.safetensors").unwrap();
        assert_eq!(
            (s.revision.as_str(), s.file.as_deref()),
            ("v2", Some("unet/x.safetensors"))
        );
        assert!(parse_repo("wd14-convnext-v2").is_none());
        assert!(parse_repo("./a/b").is_none());
        assert!(parse_repo("a/b/c").is_none());
        assert!(parse_repo("a/b:../x").is_none());
        assert!(parse_repo("../b").is_none());
    }
}
