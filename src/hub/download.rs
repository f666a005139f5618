//! Downloads: one resumable, checked, atomic file fetch over HTTP(S), and the hub's
//! `resolve` protocol on top of it.
//!
//! A file is written to `{dest}.incomplete`; an interrupted transfer is continued with a
//! `Range` request (in the same run, up to [`ATTEMPTS`] times, or by the next run), the
//! result is checked against the expected sha256 and size, and only then renamed to its
//! final name. A file that fails the check is removed; if it had been resumed it is fetched
//! once more from scratch, else the error says so. Nothing unchecked is ever renamed.

use super::cache::{Cache, is_commit};
use super::{HubError, cache_err};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Transfers tried per file before giving up (each resumes the previous one).
pub const ATTEMPTS: usize = 3;

/// What a downloaded file must be.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    pub sha256: Option<String>,
    pub size: Option<u64>,
}

/// HTTP agents: one that follows redirects (the hub sends large files to a CDN) and one
/// that does not (to read the hub's own headers).
pub struct Client {
    follow: ureq::Agent,
    head: ureq::Agent,
    pub quiet: bool,
}

fn agent(redirects: u32) -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(redirects)
        .redirect_auth_headers(ureq::config::RedirectAuthHeaders::SameHost)
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_response(Some(Duration::from_secs(60)))
        .user_agent(concat!("sdkit/", env!("CARGO_PKG_VERSION")))
        // The system's trust store (and SSL_CERT_FILE), so a company proxy's CA works.
        .tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::PlatformVerifier)
                .build(),
        )
        .build()
        .into()
}

impl Client {
    pub fn new(quiet: bool) -> Client {
        Client {
            follow: agent(10),
            head: agent(0),
            quiet,
        }
    }
}

fn status_error(what: &str, url: &str, status: u16, token: bool) -> HubError {
    match status {
        401 | 403 => HubError::Unauthorized {
            what: what.into(),
            url: url.into(),
            status,
            token,
        },
        404 => HubError::NotFound {
            what: what.into(),
            url: url.into(),
        },
        _ => HubError::Http {
            what: what.into(),
            url: url.into(),
            status,
        },
    }
}

fn net_error(what: &str, url: &str, e: impl std::fmt::Display) -> HubError {
    HubError::Network {
        what: what.into(),
        url: url.into(),
        reason: e.to_string(),
    }
}

/// Outcome of one transfer attempt.
enum Attempt {
    /// The body arrived in full.
    Done,
    /// The connection broke; the partial file stays for the next attempt.
    Broken(String),
}

/// Fetches `url` into `dest` (see the module docs). `what` names the file in messages
/// and on the progress bar.
pub fn fetch_url(
    client: &Client,
    url: &str,
    token: Option<&str>,
    dest: &Path,
    expect: &Expect,
    what: &str,
) -> Result<(), HubError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(cache_err(dir))?;
    let mut part = dest.as_os_str().to_owned();
    part.push(".incomplete");
    let part = PathBuf::from(part);
    let mut fresh_retry_left = true;
    let mut attempts = 0;
    loop {
        let had = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
        let resumed = had > 0;
        let complete = expect.size.is_some_and(|s| had == s);
        if !complete {
            attempts += 1;
            match transfer(client, url, token, &part, expect, what)? {
                Attempt::Done => {}
                Attempt::Broken(reason) if attempts < ATTEMPTS => {
                    if !client.quiet {
                        eprintln!("{what}: {reason}; resuming");
                    }
                    continue;
                }
                Attempt::Broken(reason) => {
                    return Err(HubError::Network {
                        what: what.into(),
                        url: url.into(),
                        reason: format!(
                            "{reason} ({ATTEMPTS} tries; run again to resume from {})",
                            part.display()
                        ),
                    });
                }
            }
        }
        match verify(&part, expect, what) {
            Ok(()) => {
                std::fs::rename(&part, dest).map_err(cache_err(dest))?;
                return Ok(());
            }
            Err(e) => {
                std::fs::remove_file(&part).map_err(cache_err(&part))?;
                if (resumed || complete) && fresh_retry_left {
                    fresh_retry_left = false;
                    if !client.quiet {
                        eprintln!("{what}: {e}; fetching it again from the start");
                    }
                    continue;
                }
                return Err(e);
            }
        }
    }
}

/// One GET into `part`, continuing it with a Range request when it has bytes.
fn transfer(
    client: &Client,
    url: &str,
    token: Option<&str>,
    part: &Path,
    expect: &Expect,
    what: &str,
) -> Result<Attempt, HubError> {
    let had = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    let mut req = client.follow.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    if had > 0 {
        req = req.header("Range", format!("bytes={had}-"));
    }
    let resp = match req.call() {
        Ok(r) => r,
        Err(e) => return Err(net_error(what, url, e)),
    };
    let status = resp.status().as_u16();
    let append = match status {
        206 => {
            let start = resp
                .headers()
                .get("content-range")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("bytes "))
                .and_then(|v| v.split('-').next())
                .and_then(|v| v.trim().parse::<u64>().ok());
            if start != Some(had) {
                return Err(HubError::Protocol {
                    what: what.into(),
                    reason: format!("asked for bytes from {had}, the server sent {start:?}"),
                });
            }
            true
        }
        200 => false,
        416 => {
            // The partial file is not a prefix of this file: start over.
            std::fs::remove_file(part).map_err(cache_err(part))?;
            return Ok(Attempt::Broken("stale partial download".into()));
        }
        s => return Err(status_error(what, url, s, token.is_some())),
    };
    let body_len = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let start = if append { had } else { 0 };
    let total = expect.size.or(body_len.map(|l| l + start));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(part)
        .map_err(cache_err(part))?;
    let bar = crate::util::progress::bytes_bar(total, what, client.quiet);
    bar.set_position(start);
    let mut reader = resp.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                file.flush().map_err(cache_err(part))?;
                bar.abandon();
                return Ok(Attempt::Broken(format!("connection broke: {e}")));
            }
        };
        file.write_all(&buf[..n]).map_err(cache_err(part))?;
        got += n as u64;
        bar.inc(n as u64);
    }
    file.sync_all().map_err(cache_err(part))?;
    bar.finish_and_clear();
    if body_len.is_some_and(|l| got < l) {
        return Ok(Attempt::Broken(format!(
            "connection closed after {got} of {} bytes",
            body_len.unwrap_or(0)
        )));
    }
    Ok(Attempt::Done)
}

fn verify(part: &Path, expect: &Expect, what: &str) -> Result<(), HubError> {
    let len = std::fs::metadata(part).map_err(cache_err(part))?.len();
    if let Some(want) = expect.size
        && want != len
    {
        return Err(HubError::Size {
            what: what.into(),
            want,
            got: len,
        });
    }
    if let Some(want) = &expect.sha256 {
        let got = super::sha256_file(part).map_err(cache_err(part))?;
        if !got.eq_ignore_ascii_case(want) {
            return Err(HubError::Checksum {
                what: what.into(),
                want: want.clone(),
                got,
            });
        }
    }
    Ok(())
}

/// GETs a small JSON document (an API answer).
pub fn get_json(
    client: &Client,
    url: &str,
    token: Option<&str>,
    what: &str,
) -> Result<serde_json::Value, HubError> {
    let mut req = client.follow.get(url);
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| net_error(what, url, e))?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(status_error(what, url, status, token.is_some()));
    }
    let text = resp
        .into_body()
        .read_to_string()
        .map_err(|e| net_error(what, url, e))?;
    serde_json::from_str(&text).map_err(|e| HubError::Protocol {
        what: what.into(),
        reason: format!("{url}: not JSON: {e}"),
    })
}

/// A file of a hub repo.
#[derive(Debug, Clone)]
pub struct HubFile {
    pub repo: String,
    pub revision: String,
    pub file: String,
    /// Known sha256 (from the registry); else the hub's ETag is used when it is one.
    pub sha256: Option<String>,
}

impl HubFile {
    pub fn what(&self) -> String {
        if self.revision == "main" {
            format!("{}:{}", self.repo, self.file)
        } else {
            format!("{}@{}:{}", self.repo, self.revision, self.file)
        }
    }
}

/// `"abc"`, `W/"abc"` -> `abc`.
fn clean_etag(v: &str) -> String {
    v.trim()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string()
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The cached path of `f`, downloading it first when it is not in the cache.
pub fn hub_file(client: &Client, cache: &Cache, f: &HubFile) -> Result<PathBuf, HubError> {
    let what = f.what();
    if let Some(p) = cache.lookup(&f.repo, &f.revision, &f.file) {
        return Ok(p);
    }
    if super::offline() {
        return Err(HubError::Offline {
            what,
            cache: cache.root.clone(),
        });
    }
    let endpoint = super::endpoint();
    let token = super::token();
    let url = format!("{endpoint}/{}/resolve/{}/{}", f.repo, f.revision, f.file);
    let mut req = client.head.head(&url);
    if let Some(t) = &token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let resp = req.call().map_err(|e| net_error(&what, &url, e))?;
    let status = resp.status().as_u16();
    if !(200..400).contains(&status) {
        return Err(status_error(&what, &url, status, token.is_some()));
    }
    let header = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let commit = header("x-repo-commit")
        .filter(|c| is_commit(c))
        .or_else(|| is_commit(&f.revision).then(|| f.revision.clone()))
        .ok_or_else(|| HubError::Protocol {
            what: what.clone(),
            reason: format!("{url} sent no X-Repo-Commit header; is HF_ENDPOINT ({endpoint}) a Hugging Face hub?"),
        })?;
    let etag = header("x-linked-etag")
        .or_else(|| header("etag"))
        .map(|e| clean_etag(&e))
        .filter(|e| !e.is_empty() && !e.contains(['/', '\\']) && e != "." && e != "..")
        .ok_or_else(|| HubError::Protocol {
            what: what.clone(),
            reason: format!("{url} sent no ETag"),
        })?;
    let size = header("x-linked-size")
        .or_else(|| (status == 200).then(|| header("content-length")).flatten())
        .and_then(|s| s.parse::<u64>().ok());
    let sha256 = match (&f.sha256, is_sha256(&etag)) {
        (Some(want), true) if !want.eq_ignore_ascii_case(&etag) => {
            return Err(HubError::Checksum {
                what,
                want: want.clone(),
                got: format!("{etag} (the hub's ETag: the file changed upstream)"),
            });
        }
        (Some(want), _) => Some(want.to_lowercase()),
        (None, true) => Some(etag.to_lowercase()),
        (None, false) => None,
    };
    let blob = cache.blob_path(&f.repo, &etag);
    if !blob.is_file() {
        let expect = Expect { sha256, size };
        fetch_url(client, &url, token.as_deref(), &blob, &expect, &what)?;
    }
    cache.link(&f.repo, &f.revision, &commit, &f.file, &etag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(clean_etag("W/\"abc\""), "abc");
        assert_eq!(clean_etag("\"abc\""), "abc");
        assert!(is_sha256(&"a".repeat(64)));
        assert!(!is_sha256(&"a".repeat(40)));
    }
}
