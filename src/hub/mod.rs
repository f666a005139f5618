//! Models on demand: a small Hugging Face Hub client ([`cache`], [`download`]), the
//! known model names ([`registry`]) and the ONNX Runtime wheel from PyPI ([`wheel`]).
//!
//! Why not the `hf-hub` crate: its blocking API (0.4) reads `HF_HOME` and `HF_ENDPOINT`
//! but not `HF_HUB_CACHE`, `HF_TOKEN` or `HF_HUB_OFFLINE`, checks no sha256 and cannot
//! tell a 401 (gated repo) from other failures in a way we can explain. What we need of
//! the hub is one documented URL (`{endpoint}/{repo}/resolve/{revision}/{file}`), three
//! response headers and the cache layout, so this module does it over `ureq` (blocking,
//! rustls), which also serves the PyPI download.
//!
//! Environment (as `huggingface_hub` reads it): `HF_HUB_CACHE`, else `$HF_HOME/hub`, else
//! `~/.cache/huggingface/hub` (`XDG_CACHE_HOME` moves `~/.cache`); `HF_ENDPOINT`;
//! `HF_TOKEN`, else the token file `huggingface-cli login` saved (`HF_TOKEN_PATH`, else
//! `$HF_HOME/token`); `HF_HUB_OFFLINE=1` (no request at all). sdkit's own files (the
//! onnxruntime library, models that do not live on the hub) go to `SDKIT_CACHE`, else
//! `~/.cache/sdkit`.

pub mod cache;
pub mod download;
pub mod registry;
pub mod resolve;
pub mod wheel;

use std::path::{Path, PathBuf};

/// Why a model could not be had.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{what}: not in the cache ({}) and HF_HUB_OFFLINE is set; run once without HF_HUB_OFFLINE, or download it by hand and pass its path",
        cache.display()
    )]
    Offline { what: String, cache: PathBuf },
    #[error(
        "{what}: {status} from {url}: the repo is gated or private (or does not exist). Accept its terms on the model page and set HF_TOKEN to a read token{}, or download the file by hand and pass its path",
        if *token { " (the token given was refused)" } else { "" }
    )]
    Unauthorized {
        what: String,
        url: String,
        status: u16,
        token: bool,
    },
    #[error("{what}: not found (404) at {url}; check the repo id, file name and revision")]
    NotFound { what: String, url: String },
    #[error("{what}: HTTP {status} from {url}")]
    Http {
        what: String,
        url: String,
        status: u16,
    },
    #[error("{what}: cannot reach {url}: {reason}")]
    Network {
        what: String,
        url: String,
        reason: String,
    },
    #[error(
        "{what}: sha256 {got} does not match the expected {want}; the download was removed and not used"
    )]
    Checksum {
        what: String,
        want: String,
        got: String,
    },
    #[error("{what}: got {got} bytes, expected {want}; the download was removed and not used")]
    Size { what: String, want: u64, got: u64 },
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
    #[error(
        "cannot write the model cache {}: {source} (set HF_HUB_CACHE / SDKIT_CACHE to a writable folder)",
        path.display()
    )]
    Cache {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Unknown(#[from] registry::UnknownModel),
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `~/.cache` (or `XDG_CACHE_HOME`); `%LOCALAPPDATA%` on Windows.
fn user_cache() -> PathBuf {
    if let Some(p) = env_path("XDG_CACHE_HOME") {
        return p;
    }
    if cfg!(windows)
        && let Some(p) = env_path("LOCALAPPDATA")
    {
        return p;
    }
    let home = env_path("HOME")
        .or_else(|| env_path("USERPROFILE"))
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache")
}

/// `HF_HOME`, else `~/.cache/huggingface`.
pub fn hf_home() -> PathBuf {
    env_path("HF_HOME").unwrap_or_else(|| user_cache().join("huggingface"))
}

/// sdkit's own cache: `SDKIT_CACHE`, else `~/.cache/sdkit`.
pub fn sdkit_cache() -> PathBuf {
    env_path("SDKIT_CACHE").unwrap_or_else(|| user_cache().join("sdkit"))
}

/// `HF_HUB_OFFLINE` set to a true value (`1`, `true`, `yes`, `on`).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| {
        matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "1" | "true" | "yes" | "on"
        )
    })
}

/// `HF_ENDPOINT` without a trailing slash, else `https://huggingface.co`.
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://huggingface.co".into())
}

/// `HF_TOKEN`, else the saved token file.
pub fn token() -> Option<String> {
    if let Ok(t) = std::env::var("HF_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_string());
    }
    let file = env_path("HF_TOKEN_PATH").unwrap_or_else(|| hf_home().join("token"));
    std::fs::read_to_string(file)
        .ok()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// Maps an io error on a cache path to [`HubError::Cache`].
pub(crate) fn cache_err(path: &Path) -> impl Fn(std::io::Error) -> HubError + '_ {
    move |source| HubError::Cache {
        path: path.to_path_buf(),
        source,
    }
}

/// Lowercase hex sha256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut f = std::fs::File::open(path)?;
    std::io::copy(&mut f, &mut h)?;
    Ok(format!("{:x}", h.finalize()))
}
