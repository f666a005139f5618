//! The Hugging Face hub cache layout, shared with Python's `huggingface_hub`:
//!
//! ```text
//! {HF_HUB_CACHE}/models--{owner}--{name}/
//!   blobs/{etag}                      file contents, named by the hub's ETag
//!   refs/{revision}                   the commit hash a branch or tag pointed to
//!   snapshots/{commit}/{file}         relative symlink to ../../blobs/{etag}
//! ```
//!
//! Partial downloads are `blobs/{etag}.incomplete` (the name Python uses, so either tool
//! resumes the other's). Where symlinks cannot be made the snapshot gets a copy.

use super::{HubError, cache_err};
use std::path::{Path, PathBuf};

/// One hub cache folder.
#[derive(Debug, Clone)]
pub struct Cache {
    pub root: PathBuf,
}

/// A 40-hex git commit id.
pub fn is_commit(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

impl Cache {
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub fn from_env() -> Cache {
        let root = super::env_path("HF_HUB_CACHE").unwrap_or_else(|| super::hf_home().join("hub"));
        Cache { root }
    }

    /// `models--owner--name`.
    pub fn repo_dir(&self, repo: &str) -> PathBuf {
        self.root
            .join(format!("models--{}", repo.replace('/', "--")))
    }

    /// The commit `revision` resolves to in the cache (a commit id is itself).
    pub fn commit(&self, repo: &str, revision: &str) -> Option<String> {
        if is_commit(revision) {
            return Some(revision.to_string());
        }
        let text = std::fs::read_to_string(self.repo_dir(repo).join("refs").join(revision)).ok()?;
        let c = text.trim();
        is_commit(c).then(|| c.to_string())
    }

    /// The cached `file` of `repo` at `revision`, if there (a dangling link is not).
    pub fn lookup(&self, repo: &str, revision: &str, file: &str) -> Option<PathBuf> {
        let commit = self.commit(repo, revision)?;
        let p = self.snapshot_path(repo, &commit, file);
        p.is_file().then_some(p)
    }

    pub fn snapshot_path(&self, repo: &str, commit: &str, file: &str) -> PathBuf {
        let mut p = self.repo_dir(repo).join("snapshots").join(commit);
        for part in file.split('/') {
            p.push(part);
        }
        p
    }

    pub fn blob_path(&self, repo: &str, etag: &str) -> PathBuf {
        self.repo_dir(repo).join("blobs").join(etag)
    }

    /// Makes `snapshots/{commit}/{file}` point at the blob, and `refs/{revision}` name
    /// `commit` (unless the revision is the commit). Returns the snapshot path.
    pub fn link(
        &self,
        repo: &str,
        revision: &str,
        commit: &str,
        file: &str,
        etag: &str,
    ) -> Result<PathBuf, HubError> {
        let snap = self.snapshot_path(repo, commit, file);
        let dir = snap.parent().unwrap_or(&self.root).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(cache_err(&dir))?;
        // From snapshots/{commit}/{a/b/file}: up one per folder of the file, plus two.
        let depth = file.split('/').count() - 1 + 2;
        let mut target = PathBuf::new();
        for _ in 0..depth {
            target.push("..");
        }
        target.push("blobs");
        target.push(etag);
        if std::fs::symlink_metadata(&snap).is_ok() {
            std::fs::remove_file(&snap).map_err(cache_err(&snap))?;
        }
        if symlink(&target, &snap).is_err() {
            let blob = self.blob_path(repo, etag);
            let tmp = dir.join(format!("{}{}", crate::util::atomic::TEMP_PREFIX, etag));
            std::fs::copy(&blob, &tmp).map_err(cache_err(&tmp))?;
            std::fs::rename(&tmp, &snap).map_err(cache_err(&snap))?;
        }
        if revision != commit {
            let refs = self.repo_dir(repo).join("refs");
            std::fs::create_dir_all(&refs).map_err(cache_err(&refs))?;
            let r = refs.join(revision);
            if let Some(d) = r.parent() {
                std::fs::create_dir_all(d).map_err(cache_err(d))?;
            }
            // No newline, as huggingface_hub writes it.
            crate::util::atomic::write_atomic(&r, commit.as_bytes()).map_err(cache_err(&r))?;
        }
        Ok(snap)
    }
}

#[cfg(unix)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::unix::fs::symlink(target, link)
}

#[cfg(windows)]
fn symlink(target: &Path, link: &Path) -> std::io::Result<()> {
    std::os::windows::fs::symlink_file(target, link)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_names() {
        let c = Cache {
            root: PathBuf::from("/c"),
        };
        assert_eq!(
            c.repo_dir("SmilingWolf/wd-v1-4-convnext-tagger-v2"),
            PathBuf::from("/c/models--SmilingWolf--wd-v1-4-convnext-tagger-v2")
        );
        let c1 = "0123456789abcdef0123456789abcdef01234567";
        assert!(is_commit(c1));
        assert!(!is_commit("main"));
        assert_eq!(
            c.snapshot_path("a/b", c1, "unet/x.safetensors"),
            PathBuf::from(format!("/c/models--a--b/snapshots/{c1}/unet/x.safetensors"))
        );
    }

    #[cfg(unix)]
    #[test]
    fn link_writes_relative_symlink_and_ref() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache {
            root: d.path().into(),
        };
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let blob = c.blob_path("a/b", "e1");
        std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
        std::fs::write(&blob, b"hi").unwrap();
        let snap = c.link("a/b", "main", commit, "sub/f.txt", "e1").unwrap();
        assert_eq!(
            std::fs::read_link(&snap).unwrap(),
            PathBuf::from("../../../blobs/e1")
        );
        assert_eq!(std::fs::read(&snap).unwrap(), b"hi");
        assert_eq!(c.lookup("a/b", "main", "sub/f.txt"), Some(snap));
        assert_eq!(c.lookup("a/b", "v2", "sub/f.txt"), None);
    }
}
