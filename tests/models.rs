//! `sdkit models` and models by name, against a tiny HTTP server on 127.0.0.1 that the
//! tests run (no real network): the hub's resolve protocol and cache layout, resume,
//! checksums, 401/404, offline mode, a cache written by Python's huggingface_hub, the
//! onnxruntime wheel from a PyPI-style JSON index, and the runtime search.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// A request as the server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    headers: HashMap<String, String>,
}

/// A response; `cut` sends only that many body bytes, then closes the connection.
#[derive(Default)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    cut: Option<usize>,
}

type Handler = dyn Fn(&Req, usize) -> Resp + Send + Sync;

struct Server {
    base: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    /// Serves `handler(request, index of the request)` on a free port.
    fn start(handler: Box<Handler>) -> Server {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let _ = serve(s, &*handler, &log2);
            }
        });
        Server { base, log }
    }

    fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }
}

fn serve(s: TcpStream, handler: &Handler, log: &Mutex<Vec<Req>>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let path = parts.next().unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let req = Req {
        method,
        path,
        headers,
    };
    let n = {
        let mut l = log.lock().unwrap();
        l.push(req.clone());
        l.len() - 1
    };
    let resp = handler(&req, n);
    let mut out = s;
    let reason = match resp.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        _ => "Other",
    };
    write!(out, "HTTP/1.1 {} {reason}\r\n", resp.status)?;
    for (k, v) in &resp.headers {
        write!(out, "{k}: {v}\r\n")?;
    }
    write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        resp.body.len()
    )?;
    if req.method != "HEAD" {
        let n = resp.cut.unwrap_or(resp.body.len());
        out.write_all(&resp.body[..n])?;
    }
    out.flush()
}

fn sha256(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    format!("{:x}", Sha256::digest(b))
}

/// A file body, honouring `Range: bytes=N-`.
fn file_resp(req: &Req, body: &[u8]) -> Resp {
    match req
        .headers
        .get("range")
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.trim_end_matches('-').parse::<usize>().ok())
    {
        Some(start) if start < body.len() => Resp {
            status: 206,
            headers: vec![(
                "Content-Range".into(),
                format!("bytes {start}-{}/{}", body.len() - 1, body.len()),
            )],
            body: body[start..].to_vec(),
            cut: None,
        },
        _ => Resp {
            status: 200,
            body: body.to_vec(),
            ..Resp::default()
        },
    }
}

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// The hub's answer for an LFS file: a redirect to the CDN with the sha256 as ETag.
fn lfs_redirect(base: &str, file: &str, content: &[u8], etag_sha: &str) -> Resp {
    Resp {
        status: 302,
        headers: vec![
            ("Location".into(), format!("{base}/cdn/{file}")),
            ("X-Repo-Commit".into(), COMMIT.into()),
            ("X-Linked-Etag".into(), format!("\"{etag_sha}\"")),
            ("X-Linked-Size".into(), content.len().to_string()),
        ],
        ..Resp::default()
    }
}

/// The hub's answer for a small git file (ETag is a git hash).
fn git_file(req: &Req, content: &[u8]) -> Resp {
    let mut r = file_resp(req, content);
    r.headers.push(("X-Repo-Commit".into(), COMMIT.into()));
    r.headers.push((
        "ETag".into(),
        "\"89abcdef0123456789abcdef0123456789abcdef\"".into(),
    ));
    r
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

struct Env {
    home: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            home: tempfile::tempdir().unwrap(),
        }
    }
    fn hub(&self) -> PathBuf {
        self.home.path().join("hf/hub")
    }
    fn sdkit_cache(&self) -> PathBuf {
        self.home.path().join("sdkit")
    }
    fn run(&self, base: &str, args: &[&str], extra: &[(&str, &str)]) -> Run {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"));
        c.args(args)
            .env("HF_HOME", self.home.path().join("hf"))
            .env("SDKIT_CACHE", self.sdkit_cache())
            .env("HF_ENDPOINT", base)
            .env("PIP_INDEX", format!("{base}/pypi"))
            .env_remove("HF_HUB_CACHE")
            .env_remove("HF_TOKEN")
            .env_remove("HF_HUB_OFFLINE")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("ALL_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy");
        for (k, v) in extra {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }
}

const TAGGER: &str = "/SmilingWolf/wd-v1-4-convnext-tagger-v2/resolve/main";
const CSV: &[u8] = b"tag_id,name,category,count\n1,1girl,0,10\n";

/// A hub with the wd14-convnext-v2 files; `cut_first` breaks the first CDN transfer.
fn tagger_hub(model: Vec<u8>, etag: String, cut_first: Option<usize>) -> Server {
    let base = Arc::new(Mutex::new(String::new()));
    let b2 = base.clone();
    let cut_done = Arc::new(Mutex::new(false));
    let s = Server::start(Box::new(move |req, _| {
        let base = b2.lock().unwrap().clone();
        match req.path.as_str() {
            p if p == format!("{TAGGER}/model.onnx") => {
                lfs_redirect(&base, "model.onnx", &model, &etag)
            }
            p if p == format!("{TAGGER}/selected_tags.csv") => git_file(req, CSV),
            "/cdn/model.onnx" => {
                let mut r = file_resp(req, &model);
                let mut done = cut_done.lock().unwrap();
                if req.method == "GET" && !*done {
                    *done = true;
                    r.cut = cut_first;
                }
                r
            }
            _ => Resp {
                status: 404,
                ..Resp::default()
            },
        }
    }));
    *base.lock().unwrap() = s.base.clone();
    s
}

#[test]
fn fetch_writes_the_hub_layout_and_reuses_it() {
    let model: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
    let sha = sha256(&model);
    let hub = tagger_hub(model.clone(), sha.clone(), None);
    let env = Env::new();
    let r = env.run(
        &hub.base,
        &["models", "fetch", "wd14-convnext-v2", "--json"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let repo = env
        .hub()
        .join("models--SmilingWolf--wd-v1-4-convnext-tagger-v2");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let blob = repo.join("blobs").join(&sha);
    assert_eq!(std::fs::read(&blob).unwrap(), model);
    let snap = repo.join("snapshots").join(COMMIT);
    assert_eq!(
        std::fs::read_link(snap.join("model.onnx")).unwrap(),
        PathBuf::from(format!("../../blobs/{sha}"))
    );
    assert_eq!(std::fs::read(snap.join("selected_tags.csv")).unwrap(), CSV);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        json[0]["paths"][0].as_str().unwrap(),
        snap.join("model.onnx").to_str().unwrap()
    );
    let leftovers: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".incomplete"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Fetched again: answered from the cache, no request.
    let before = hub.requests().len();
    let r = env.run(
        &hub.base,
        &["models", "fetch", "wd14-convnext-v2", "--quiet"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(hub.requests().len(), before);
    let r = env.run(&hub.base, &["models", "list", "--json"], &[]);
    let list: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "wd14-convnext-v2")
        .unwrap();
    assert_eq!(row["on_disk"], serde_json::json!([2, 2]));
}

#[test]
fn an_interrupted_download_resumes_with_a_range_request() {
    let model: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let sha = sha256(&model);
    let hub = tagger_hub(model.clone(), sha.clone(), Some(80_000));
    let env = Env::new();
    let r = env.run(
        &hub.base,
        &["models", "fetch", "wd14-convnext-v2", "--quiet"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let cdn: Vec<Req> = hub
        .requests()
        .into_iter()
        .filter(|q| q.path == "/cdn/model.onnx")
        .collect();
    assert_eq!(cdn.len(), 2, "{cdn:?}");
    assert_eq!(cdn[0].headers.get("range"), None);
    assert_eq!(
        cdn[1].headers.get("range").map(String::as_str),
        Some("bytes=80000-")
    );
    let blob = env
        .hub()
        .join("models--SmilingWolf--wd-v1-4-convnext-tagger-v2/blobs")
        .join(&sha);
    assert_eq!(std::fs::read(blob).unwrap(), model);
}

#[test]
fn a_checksum_mismatch_is_removed_and_not_used() {
    let model = b"not the file the hub announced".to_vec();
    let announced = sha256(b"something else");
    let hub = tagger_hub(model, announced.clone(), None);
    let env = Env::new();
    let r = env.run(&hub.base, &["models", "fetch", "wd14-convnext-v2"], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("sha256") && r.stderr.contains("removed"),
        "{}",
        r.stderr
    );
    let repo = env
        .hub()
        .join("models--SmilingWolf--wd-v1-4-convnext-tagger-v2");
    let blobs: Vec<_> = std::fs::read_dir(repo.join("blobs"))
        .map(|d| d.map(|e| e.unwrap().file_name()).collect())
        .unwrap_or_default();
    assert!(blobs.is_empty(), "{blobs:?}");
    assert!(
        !repo
            .join("snapshots")
            .join(COMMIT)
            .join("model.onnx")
            .exists()
    );
}

#[test]
fn unauthorized_and_missing_files_say_what_to_do() {
    let hub = Server::start(Box::new(|req, _| match req.path.as_str() {
        "/gated/repo/resolve/main/model.safetensors" => Resp {
            status: 401,
            ..Resp::default()
        },
        _ => Resp {
            status: 404,
            ..Resp::default()
        },
    }));
    let env = Env::new();
    let r = env.run(
        &hub.base,
        &["models", "fetch", "gated/repo:model.safetensors"],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("HF_TOKEN") && r.stderr.contains("401"),
        "{}",
        r.stderr
    );
    let r = env.run(
        &hub.base,
        &["models", "fetch", "gated/repo:model.safetensors"],
        &[("HF_TOKEN", "hf_test")],
    );
    assert!(r.stderr.contains("token given was refused"), "{}", r.stderr);
    let sent = hub.requests();
    assert_eq!(
        sent.last()
            .unwrap()
            .headers
            .get("authorization")
            .map(String::as_str),
        Some("Bearer hf_test")
    );
    let r = env.run(
        &hub.base,
        &["models", "fetch", "some/repo:nope.safetensors"],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("not found (404)"), "{}", r.stderr);
}

#[test]
fn offline_mode_never_connects() {
    let hub = tagger_hub(b"x".to_vec(), sha256(b"x"), None);
    let env = Env::new();
    let r = env.run(
        &hub.base,
        &["models", "fetch", "wd14-convnext-v2"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("HF_HUB_OFFLINE"), "{}", r.stderr);
    let r = env.run(
        &hub.base,
        &["models", "fetch", "onnxruntime"],
        &[("HF_HUB_OFFLINE", "1")],
    );
    assert_eq!(r.code, 2);
    assert!(hub.requests().is_empty(), "{:?}", hub.requests());
}

#[cfg(unix)]
#[test]
fn a_cache_written_by_huggingface_hub_is_read_as_is() {
    let env = Env::new();
    // As huggingface_hub lays it out: blob named by its etag, refs/main, relative link.
    let repo = env.hub().join("models--someone--ckpt");
    let weights = b"safetensors bytes".to_vec();
    let etag = sha256(&weights);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots").join(COMMIT)).unwrap();
    std::fs::write(repo.join("blobs").join(&etag), &weights).unwrap();
    std::fs::write(repo.join("refs/main"), COMMIT).unwrap();
    let link = repo
        .join("snapshots")
        .join(COMMIT)
        .join("model.safetensors");
    std::os::unix::fs::symlink(format!("../../blobs/{etag}"), &link).unwrap();

    let hub = Server::start(Box::new(|_, _| Resp {
        status: 500,
        ..Resp::default()
    }));
    for offline in ["0", "1"] {
        let r = env.run(
            &hub.base,
            &[
                "models",
                "fetch",
                "someone/ckpt:model.safetensors",
                "--json",
            ],
            &[("HF_HUB_OFFLINE", offline)],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        assert_eq!(
            json[0]["paths"][0].as_str().unwrap(),
            link.to_str().unwrap()
        );
    }
    assert!(hub.requests().is_empty());
    assert_eq!(std::fs::read(&link).unwrap(), weights);
}

#[test]
fn unknown_names_list_the_known_ones() {
    let env = Env::new();
    let r = env.run(
        "http://127.0.0.1:9",
        &["models", "fetch", "wd14-convnxt-v2"],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("did you mean wd14-convnext-v2?"),
        "{}",
        r.stderr
    );
    assert!(r.stderr.contains("wd-eva02-large-v3"), "{}", r.stderr);
    let dir = tempfile::tempdir().unwrap();
    let r = env.run(
        "http://127.0.0.1:9",
        &["tag", dir.path().to_str().unwrap(), "--model", "u2net"],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown model \"u2net\""), "{}", r.stderr);
}

/// CRC-32 (IEEE) for the zip headers.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(feature = "cuda")
))]
fn crc32(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0xEDB8_8320
            } else {
                c >> 1
            };
        }
    }
    !c
}

/// A zip (what a wheel is) of `(name, data, deflate)` members.
#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(feature = "cuda")
))]
fn zip_bytes(members: &[(&str, &[u8], bool)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data, deflate) in members {
        let packed = if *deflate {
            let mut e =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(data).unwrap();
            e.finish().unwrap()
        } else {
            data.to_vec()
        };
        let method: u16 = if *deflate { 8 } else { 0 };
        let offset = out.len() as u32;
        let crc = crc32(data);
        let mut common = Vec::new();
        common.extend(20u16.to_le_bytes()); // version needed
        common.extend(0u16.to_le_bytes()); // flags
        common.extend(method.to_le_bytes());
        common.extend([0u8; 4]); // time, date
        common.extend(crc.to_le_bytes());
        common.extend((packed.len() as u32).to_le_bytes());
        common.extend((data.len() as u32).to_le_bytes());
        common.extend((name.len() as u16).to_le_bytes());
        common.extend(0u16.to_le_bytes()); // extra
        out.extend(0x0403_4b50u32.to_le_bytes());
        out.extend(&common);
        out.extend(name.as_bytes());
        out.extend(&packed);
        central.extend(0x0201_4b50u32.to_le_bytes());
        central.extend(20u16.to_le_bytes()); // version made by
        central.extend(&common);
        central.extend([0u8; 6]); // comment len, disk, internal attrs
        central.extend(0u32.to_le_bytes()); // external attrs
        central.extend(offset.to_le_bytes());
        central.extend(name.as_bytes());
    }
    let cd_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]);
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((members.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(cd_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

#[cfg(all(
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64"),
    not(feature = "cuda")
))]
#[test]
fn the_onnxruntime_wheel_gives_only_its_library() {
    let arch = std::env::consts::ARCH;
    let lib: Vec<u8> = (0..30_000u32).map(|i| (i % 13) as u8).collect();
    let shared = b"providers shared".to_vec();
    let wheel = zip_bytes(&[
        ("onnxruntime/__init__.py", b"# python", false),
        ("onnxruntime/capi/libonnxruntime.so.1.31.1", &lib, true),
        (
            "onnxruntime/capi/libonnxruntime_providers_shared.so",
            &shared,
            false,
        ),
        (
            "onnxruntime/capi/onnxruntime_pybind11_state.so",
            b"pybind",
            true,
        ),
    ]);
    let name =
        format!("onnxruntime-1.31.1-cp312-cp312-manylinux_2_27_{arch}.manylinux_2_28_{arch}.whl");
    let other = "onnxruntime-1.31.1-cp312-cp312-win_amd64.whl";
    let (wheel_sha, good) = (sha256(&wheel), Arc::new(Mutex::new(true)));
    let good2 = good.clone();
    let base = Arc::new(Mutex::new(String::new()));
    let b2 = base.clone();
    let name2 = name.clone();
    let hub = Server::start(Box::new(move |req, _| {
        let base = b2.lock().unwrap().clone();
        let digest = if *good2.lock().unwrap() {
            wheel_sha.clone()
        } else {
            "0".repeat(64)
        };
        match req.path.as_str() {
            "/pypi/onnxruntime/1.31.1/json" => Resp {
                status: 200,
                body: serde_json::json!({"urls": [
                    {"packagetype": "bdist_wheel", "filename": other, "url": format!("{base}/files/{other}"), "digests": {"sha256": "1".repeat(64)}},
                    {"packagetype": "bdist_wheel", "filename": name2, "url": format!("{base}/files/{name2}"), "digests": {"sha256": digest}},
                ]})
                .to_string()
                .into_bytes(),
                ..Resp::default()
            },
            p if p == format!("/files/{name2}") => file_resp(req, &wheel),
            _ => Resp {
                status: 404,
                ..Resp::default()
            },
        }
    }));
    *base.lock().unwrap() = hub.base.clone();
    let env = Env::new();
    let dir = env.sdkit_cache().join("onnxruntime/1.31.1-onnxruntime");

    // A wheel whose sha256 differs from the index: nothing extracted, nothing kept.
    *good.lock().unwrap() = false;
    let r = env.run(&hub.base, &["models", "fetch", "onnxruntime"], &[]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("sha256"), "{}", r.stderr);
    assert!(!dir.exists());

    *good.lock().unwrap() = true;
    let r = env.run(
        &hub.base,
        &["models", "fetch", "onnxruntime", "--json"],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let json: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let got = PathBuf::from(json[0]["paths"][0].as_str().unwrap());
    assert_eq!(got, dir.join("libonnxruntime.so.1.31.1"));
    assert_eq!(std::fs::read(&got).unwrap(), lib);
    assert_eq!(
        std::fs::read(dir.join("libonnxruntime_providers_shared.so")).unwrap(),
        shared
    );
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "install.json",
            "libonnxruntime.so.1.31.1",
            "libonnxruntime_providers_shared.so"
        ]
    );
    assert!(
        !env.sdkit_cache()
            .join("onnxruntime/downloads")
            .join(&name)
            .exists()
    );

    // The runtime search checks the extracted library against its record before loading:
    // a changed file is refused with what to do.
    std::fs::write(&got, b"tampered").unwrap();
    let imgs = tempfile::tempdir().unwrap();
    let tagger = tempfile::tempdir().unwrap();
    std::fs::write(tagger.path().join("model.onnx"), b"x").unwrap();
    std::fs::write(tagger.path().join("selected_tags.csv"), CSV).unwrap();
    let r = env.run(
        &hub.base,
        &[
            "tag",
            imgs.path().to_str().unwrap(),
            "--model-dir",
            tagger.path().to_str().unwrap(),
        ],
        &[("ORT_DYLIB_PATH", ""), ("VIRTUAL_ENV", "")],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(
        r.stderr.contains("sha256") && r.stderr.contains("sdkit models fetch onnxruntime"),
        "{}",
        r.stderr
    );
}

/// A `.venv` in the working folder (say, inside a downloaded dataset) is never loaded.
#[cfg(unix)]
#[test]
fn a_venv_in_the_working_folder_is_not_searched() {
    let env = Env::new();
    let work = tempfile::tempdir().unwrap();
    let capi = work
        .path()
        .join(".venv/lib/python3.12/site-packages/onnxruntime/capi");
    std::fs::create_dir_all(&capi).unwrap();
    std::fs::write(capi.join("libonnxruntime.so.1.31.1"), b"not a library").unwrap();
    std::fs::create_dir_all(work.path().join("imgs")).unwrap();
    let tagger = work.path().join("tagger");
    std::fs::create_dir_all(&tagger).unwrap();
    std::fs::write(tagger.join("model.onnx"), b"x").unwrap();
    std::fs::write(tagger.join("selected_tags.csv"), CSV).unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(["tag", "imgs", "--model-dir", "tagger"])
        .current_dir(work.path())
        .env("SDKIT_CACHE", env.sdkit_cache())
        .env("PATH", "/nonexistent")
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("VIRTUAL_ENV")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("ONNX Runtime not found"), "{stderr}");
    assert!(
        stderr.contains("sdkit models fetch onnxruntime"),
        "{stderr}"
    );
    // Not even tried: a load attempt would name the file.
    assert!(!stderr.contains(work.path().to_str().unwrap()), "{stderr}");
}
