//! ONNX Runtime without Python: `sdkit models fetch onnxruntime` reads the pinned
//! release from PyPI's JSON API (`{PIP_INDEX or https://pypi.org/pypi}/{package}/
//! {version}/json`: wheel URLs with their sha256), downloads the wheel for this platform
//! (checked against that sha256), and extracts only the shared libraries under
//! `onnxruntime/capi/` into `{sdkit cache}/onnxruntime/{version}-{package}/`, with an
//! `install.json` recording the wheel and each library's sha256. [`installed`] (used by
//! the runtime search) checks the library against that record before it is loaded.

use super::HubError;
use super::download::{self, Client, Expect};
use super::registry::{self, Use};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What the extraction wrote.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub package: String,
    pub version: String,
    pub wheel: String,
    pub wheel_sha256: String,
    /// The library to load (a key of `files`).
    pub library: String,
    /// Extracted file name -> sha256.
    pub files: BTreeMap<String, String>,
}

/// The library in sdkit's cache is missing a piece or does not match its record.
#[derive(Debug)]
pub struct InstalledError {
    pub path: PathBuf,
    pub reason: String,
}

/// The PyPI package and version this build uses (`onnxruntime-gpu` with `--features cuda`).
pub fn package() -> (String, String) {
    let e = registry::find("onnxruntime", Some(Use::Runtime))
        .expect("models/registry/onnxruntime.yaml has the onnxruntime entry");
    let pkg = if cfg!(feature = "cuda") {
        e.gpu_package.or(e.pypi)
    } else {
        e.pypi
    };
    (
        pkg.unwrap_or_else(|| "onnxruntime".into()),
        e.version.unwrap_or_default(),
    )
}

/// `{sdkit cache}/onnxruntime/{version}-{package}`.
pub fn install_dir() -> PathBuf {
    let (pkg, version) = package();
    super::sdkit_cache()
        .join("onnxruntime")
        .join(format!("{version}-{pkg}"))
}

/// The extracted library, checked against its record; `Ok(None)` when nothing was
/// extracted.
pub fn installed() -> Result<Option<PathBuf>, InstalledError> {
    installed_in(&install_dir())
}

pub fn installed_in(dir: &Path) -> Result<Option<PathBuf>, InstalledError> {
    let rec_path = dir.join("install.json");
    let text = match std::fs::read_to_string(&rec_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(InstalledError {
                path: rec_path,
                reason: e.to_string(),
            });
        }
    };
    let bad = |path: &Path, reason: String| InstalledError {
        path: path.into(),
        reason,
    };
    let rec: Record =
        serde_json::from_str(&text).map_err(|e| bad(&rec_path, format!("unreadable: {e}")))?;
    for (name, want) in &rec.files {
        let p = dir.join(name);
        let got = super::sha256_file(&p).map_err(|e| bad(&p, e.to_string()))?;
        if &got != want {
            return Err(bad(
                &p,
                format!("sha256 {got} differs from {want} recorded when it was extracted"),
            ));
        }
    }
    Ok(Some(dir.join(&rec.library)))
}

/// The wheel platform tag wanted for `os`/`arch` (Rust's names).
fn platform_ok(file: &str, os: &str, arch: &str) -> bool {
    let f = file.to_ascii_lowercase();
    match (os, arch) {
        ("linux", "x86_64") => f.contains("manylinux") && f.ends_with("_x86_64.whl"),
        ("linux", "aarch64") => f.contains("manylinux") && f.ends_with("_aarch64.whl"),
        ("macos", "aarch64") => {
            f.contains("macosx") && (f.contains("arm64") || f.contains("universal2"))
        }
        ("macos", "x86_64") => {
            f.contains("macosx") && (f.contains("x86_64") || f.contains("universal2"))
        }
        ("windows", "x86_64") => f.ends_with("win_amd64.whl"),
        ("windows", "aarch64") => f.ends_with("win_arm64.whl"),
        _ => false,
    }
}

/// A wheel of the release for this platform: (file name, url, sha256). The library is
/// the same in every Python version's wheel; the last one by name is taken.
pub fn pick_wheel(
    release: &serde_json::Value,
    os: &str,
    arch: &str,
) -> Option<(String, String, String)> {
    let mut hits: Vec<(String, String, String)> = release["urls"]
        .as_array()?
        .iter()
        .filter(|u| u["packagetype"] == "bdist_wheel")
        .filter_map(|u| {
            Some((
                u["filename"].as_str()?.to_string(),
                u["url"].as_str()?.to_string(),
                u["digests"]["sha256"].as_str()?.to_ascii_lowercase(),
            ))
        })
        .filter(|(f, _, _)| platform_ok(f, os, arch))
        .collect();
    // Free-threaded (`cp314t`) wheels last: the library is the same, the usual one is
    // the better-trodden path.
    hits.sort_by_key(|(f, _, _)| {
        (
            !f.contains("t-manylinux") && !f.contains("t-macosx") && !f.contains("t-win"),
            f.clone(),
        )
    });
    hits.pop()
}

/// `href` made absolute against the document at `base` (PyPI mirrors may answer with
/// relative file URLs).
pub fn join_url(base: &str, href: &str) -> String {
    if href.starts_with("http://") || href.starts_with("https://") {
        return href.into();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("https", base));
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(abs) = href.strip_prefix('/') {
        return format!("{scheme}://{host}/{abs}");
    }
    let mut parts: Vec<&str> = path.split('/').collect();
    parts.pop(); // the document's own name
    for seg in href.split('/') {
        match seg {
            ".." => {
                parts.pop();
            }
            "." => {}
            s => parts.push(s),
        }
    }
    format!("{scheme}://{host}/{}", parts.join("/"))
}

/// Whether a wheel member is one of the libraries to extract.
fn wanted(member: &str) -> Option<&str> {
    let name = member.strip_prefix("onnxruntime/capi/")?;
    let suf = std::env::consts::DLL_SUFFIX;
    let is_lib = name.ends_with(suf) || name.contains(&format!("{suf}."));
    (!name.contains('/') && name.contains("onnxruntime") && !name.contains("pybind") && is_lib)
        .then_some(name)
}

fn extract_err(wheel: &Path, reason: impl std::fmt::Display) -> HubError {
    HubError::Protocol {
        what: wheel.display().to_string(),
        reason: format!("cannot extract: {reason}"),
    }
}

/// Extracts the libraries of `wheel` into `dir` (replacing it); returns the library to load.
pub fn extract(
    wheel: &Path,
    wheel_sha256: &str,
    package: &str,
    version: &str,
    dir: &Path,
) -> Result<PathBuf, HubError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(super::cache_err(parent))?;
    let f = std::fs::File::open(wheel).map_err(super::cache_err(wheel))?;
    let mut zip = zip::ZipArchive::new(f).map_err(|e| extract_err(wheel, e))?;
    let tmp = tempfile::Builder::new()
        .prefix(crate::util::atomic::TEMP_PREFIX)
        .tempdir_in(parent)
        .map_err(super::cache_err(parent))?;
    let mut files = BTreeMap::new();
    let mut library = None;
    for i in 0..zip.len() {
        let mut entry = zip.by_index_raw(i).map_err(|e| extract_err(wheel, e))?;
        let member = entry.name().map_err(|e| extract_err(wheel, e))?.to_string();
        let Some(name) = wanted(&member) else {
            continue;
        };
        let name = name.to_string();
        let out = tmp.path().join(&name);
        let size = entry.size();
        let mut w = std::fs::File::create(&out).map_err(super::cache_err(&out))?;
        // Read raw: the zip crate is built without its decoders (candle pulls it in
        // that way); wheels use stored (0) or deflate (8) members.
        let method = entry.compression();
        let copied = if method == zip::CompressionMethod::STORE {
            std::io::copy(&mut entry, &mut w)
        } else if method == zip::CompressionMethod::DEFLATE {
            std::io::copy(&mut flate2::read::DeflateDecoder::new(&mut entry), &mut w)
        } else {
            return Err(extract_err(
                wheel,
                format!("{member}: compression {method:?}"),
            ));
        }
        .map_err(|e| extract_err(wheel, format!("{member}: {e}")))?;
        if copied != size {
            return Err(extract_err(
                wheel,
                format!("{member}: {copied} of {size} bytes"),
            ));
        }
        w.sync_all().map_err(super::cache_err(&out))?;
        let sha = super::sha256_file(&out).map_err(super::cache_err(&out))?;
        if crate::tag::runtime::lib_name_ok(&name) {
            library = Some(name.clone());
        }
        files.insert(name, sha);
    }
    let library = library.ok_or_else(|| {
        extract_err(
            wheel,
            "no onnxruntime/capi/libonnxruntime library in the wheel",
        )
    })?;
    let rec = Record {
        package: package.into(),
        version: version.into(),
        wheel: wheel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        wheel_sha256: wheel_sha256.into(),
        library: library.clone(),
        files,
    };
    let rec_path = tmp.path().join("install.json");
    let json = serde_json::to_string_pretty(&rec).unwrap_or_default();
    std::fs::write(&rec_path, json).map_err(super::cache_err(&rec_path))?;
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(super::cache_err(dir))?;
    }
    let kept = tmp.keep();
    std::fs::rename(&kept, dir).map_err(super::cache_err(dir))?;
    Ok(dir.join(library))
}

/// `sdkit models fetch onnxruntime`: the library path (already there, or fetched now).
pub fn fetch(client: &Client) -> Result<PathBuf, HubError> {
    let dir = install_dir();
    if let Ok(Some(p)) = installed_in(&dir) {
        return Ok(p);
    }
    let (pkg, version) = package();
    let what = format!("{pkg} {version}");
    if super::offline() {
        return Err(HubError::Offline { what, cache: dir });
    }
    let index = std::env::var("PIP_INDEX")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .map(|v| v.trim().trim_end_matches('/').to_string())
        .unwrap_or_else(|| "https://pypi.org/pypi".into());
    // The release's own document; some mirrors serve only the project's, whose
    // `releases[version]` lists the same files.
    let url = format!("{index}/{pkg}/{version}/json");
    let (doc, release) = match download::get_json(client, &url, None, &what) {
        Err(HubError::NotFound { .. }) => {
            let url = format!("{index}/{pkg}/json");
            let project = download::get_json(client, &url, None, &what)?;
            (
                url,
                serde_json::json!({ "urls": project["releases"][version.as_str()] }),
            )
        }
        r => (url, r?),
    };
    let (os, arch) = (std::env::consts::OS, std::env::consts::ARCH);
    let (file, url, sha) = pick_wheel(&release, os, arch).ok_or_else(|| HubError::Protocol {
        what: what.clone(),
        reason: format!(
            "PyPI has no wheel for {os}-{arch}; install it with pip and set ORT_DYLIB_PATH"
        ),
    })?;
    if file.contains(['/', '\\']) {
        return Err(HubError::Protocol {
            what,
            reason: format!("odd wheel name {file:?}"),
        });
    }
    let wheel = super::sdkit_cache()
        .join("onnxruntime")
        .join("downloads")
        .join(&file);
    let expect = Expect {
        sha256: Some(sha.clone()),
        size: None,
    };
    download::fetch_url(client, &join_url(&doc, &url), None, &wheel, &expect, &file)?;
    let lib = extract(&wheel, &sha, &pkg, &version, &dir)?;
    // The wheel is only a container; the extracted library has its own record.
    let _ = std::fs::remove_file(&wheel);
    Ok(lib)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_platform_wheel() {
        let j = serde_json::json!({"urls": [
            {"packagetype": "sdist", "filename": "onnxruntime-1.31.1.tar.gz", "url": "u0", "digests": {"sha256": "00"}},
            {"packagetype": "bdist_wheel", "filename": "onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", "url": "u1", "digests": {"sha256": "AA"}},
            {"packagetype": "bdist_wheel", "filename": "onnxruntime-1.31.1-cp312-cp312-manylinux_2_27_aarch64.manylinux_2_28_aarch64.whl", "url": "u2", "digests": {"sha256": "bb"}},
            {"packagetype": "bdist_wheel", "filename": "onnxruntime-1.31.1-cp312-cp312-macosx_13_0_universal2.whl", "url": "u3", "digests": {"sha256": "cc"}},
            {"packagetype": "bdist_wheel", "filename": "onnxruntime-1.31.1-cp312-cp312-win_amd64.whl", "url": "u4", "digests": {"sha256": "dd"}}
        ]});
        assert_eq!(pick_wheel(&j, "linux", "x86_64").unwrap().1, "u1");
        assert_eq!(pick_wheel(&j, "linux", "x86_64").unwrap().2, "aa");
        assert_eq!(pick_wheel(&j, "linux", "aarch64").unwrap().1, "u2");
        assert_eq!(pick_wheel(&j, "macos", "aarch64").unwrap().1, "u3");
        assert_eq!(pick_wheel(&j, "windows", "x86_64").unwrap().1, "u4");
        assert!(pick_wheel(&j, "freebsd", "x86_64").is_none());
    }

    #[test]
    fn relative_file_urls() {
        let doc = "https://pypi.example/pypi/onnxruntime/json";
        assert_eq!(
            join_url(doc, "../../packages/a/x.whl"),
            "https://pypi.example/packages/a/x.whl"
        );
        assert_eq!(
            join_url(doc, "/files/x.whl"),
            "https://pypi.example/files/x.whl"
        );
        assert_eq!(join_url(doc, "http://cdn/x.whl"), "http://cdn/x.whl");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn wanted_members() {
        assert_eq!(
            wanted("onnxruntime/capi/libonnxruntime.so.1.31.1"),
            Some("libonnxruntime.so.1.31.1")
        );
        assert_eq!(
            wanted("onnxruntime/capi/libonnxruntime_providers_shared.so"),
            Some("libonnxruntime_providers_shared.so")
        );
        assert_eq!(
            wanted("onnxruntime/capi/onnxruntime_pybind11_state.so"),
            None
        );
        assert_eq!(wanted("onnxruntime/capi/_pybind_state.py"), None);
        assert_eq!(wanted("onnxruntime/capi/x/libonnxruntime.so"), None);
        assert_eq!(wanted("onnxruntime.libs/libonnxruntime.so"), None);
    }
}
