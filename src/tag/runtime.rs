//! ONNX Runtime, loaded at run time: finding `libonnxruntime`, one process-wide
//! environment, and tagger sessions with their input contract read from the model.
//!
//! The library is looked for only where the user put it or chose it, in order:
//! `ORT_DYLIB_PATH`; beside the `sdkit` executable; the `onnxruntime` Python package
//! (`onnxruntime/capi/libonnxruntime.so*`) in the active `$VIRTUAL_ENV`; the copy
//! `sdkit models fetch onnxruntime` extracted into sdkit's cache (its sha256 checked
//! against the record written at extraction); the site-packages of `python3` on `PATH`
//! (asked in isolated mode, `python3 -I`, so no file of the current folder is imported).
//!
//! Never the working folder or its parents: a `.venv` inside a downloaded dataset is
//! whatever its author put there, and loading a library runs its code.

use super::preprocess::{Contract, Kind, Layout};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::{Tensor, ValueType};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The onnxruntime release the CI setup installs and the docs point to.
pub const PINNED_ORT: &str = "1.31.1";

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "ONNX Runtime not found (looked in ORT_DYLIB_PATH, beside the sdkit binary, $VIRTUAL_ENV, sdkit's cache and python3's site-packages). \
Get it with `sdkit models fetch onnxruntime` (no Python needed), or: python3 -m venv .venv && .venv/bin/pip install onnxruntime=={PINNED_ORT} \
&& export ORT_DYLIB_PATH=$(ls $PWD/.venv/lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*)"
    )]
    NotFound,
    #[error("{}: {reason}; fetch it again with `sdkit models fetch onnxruntime`", path.display())]
    Cached { path: PathBuf, reason: String },
    #[error("ORT_DYLIB_PATH={0} does not exist")]
    BadEnvPath(PathBuf),
    #[error("cannot load ONNX Runtime: {0}")]
    Load(String),
    #[error("{}: cannot load model: {reason}", path.display())]
    Model { path: PathBuf, reason: String },
    #[error("{}: unexpected model shape: {found}; expected {expected}", path.display())]
    Contract {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("CUDA execution provider unavailable: {0}")]
    Cuda(String),
    #[error("inference failed: {0}")]
    Run(String),
}

pub(crate) fn lib_name_ok(name: &str) -> bool {
    let (pre, suf) = (std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    let base = format!("{pre}onnxruntime{suf}");
    // Linux packages ship libonnxruntime.so.1.31.1; macOS libonnxruntime.1.31.1.dylib.
    name == base
        || name.starts_with(&format!("{base}."))
        || (name.starts_with(&format!("{pre}onnxruntime.")) && name.ends_with(suf))
}

/// The first file in `dir` that looks like the onnxruntime library.
fn lib_in(dir: &Path) -> Option<PathBuf> {
    let mut hits: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(lib_name_ok))
        .map(|e| e.path())
        .collect();
    hits.sort();
    hits.into_iter().next()
}

fn in_site_packages(site: &Path) -> Option<PathBuf> {
    lib_in(&site.join("onnxruntime").join("capi"))
}

/// site-packages folders of a virtual environment (`lib/python3.*/site-packages`).
fn venv_sites(venv: &Path) -> Vec<PathBuf> {
    let mut out = vec![venv.join("Lib").join("site-packages")];
    for lib in ["lib", "lib64"] {
        if let Ok(rd) = std::fs::read_dir(venv.join(lib)) {
            let mut v: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("python"))
                .map(|e| e.path().join("site-packages"))
                .collect();
            v.sort();
            out.extend(v);
        }
    }
    out
}

/// site-packages of `python3`. `-I` (isolated): without it `-c` puts the current folder
/// first on `sys.path`, so a `sysconfig.py` lying in it would run.
fn python_sites() -> Vec<PathBuf> {
    let code = "import site,sysconfig\nfor p in [sysconfig.get_paths()['purelib'],sysconfig.get_paths()['platlib']]+site.getsitepackages()+[site.getusersitepackages()]: print(p)";
    let Ok(out) = std::process::Command::new("python3")
        .args(["-I", "-c", code])
        .current_dir(std::env::temp_dir())
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(PathBuf::from)
        .collect()
}

/// Finds libonnxruntime; see the module docs for the order.
pub fn find_dylib() -> Result<PathBuf, RuntimeError> {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(RuntimeError::BadEnvPath(p))
        };
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
        && let Some(p) = lib_in(&dir)
    {
        return Ok(p);
    }
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|v| !v.is_empty())
        && let Some(p) = venv_sites(Path::new(&v))
            .iter()
            .find_map(|s| in_site_packages(s))
    {
        return Ok(p);
    }
    match crate::hub::wheel::installed() {
        Ok(Some(p)) => return Ok(p),
        Ok(None) => {}
        Err(e) => {
            return Err(RuntimeError::Cached {
                path: e.path,
                reason: e.reason,
            });
        }
    }
    python_sites()
        .iter()
        .find_map(|s| in_site_packages(s))
        .ok_or(RuntimeError::NotFound)
}

static ENV: OnceLock<Result<(ort::environment::Environment, PathBuf), String>> = OnceLock::new();

/// Loads onnxruntime once per process; returns the library path it came from.
pub fn init() -> Result<PathBuf, RuntimeError> {
    let path = match ENV.get() {
        Some(r) => r.clone(),
        None => {
            let path = find_dylib()?;
            ENV.get_or_init(|| {
                let b = ort::init_from(&path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .with_name("sdkit")
                    .with_telemetry(false);
                b.build()
                    .map(|e| (e, path.clone()))
                    .map_err(|e| format!("{}: {e}", path.display()))
            })
            .clone()
        }
    };
    path.map(|(_, p)| p).map_err(RuntimeError::Load)
}

/// Where inference runs.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

/// Opens an ONNX Runtime session for `model` (loading the runtime first).
pub fn open_session(model: &Path, threads: usize, device: Device) -> Result<Session, RuntimeError> {
    init()?;
    let merr = |e: ort::Error| RuntimeError::Model {
        path: model.into(),
        reason: e.to_string(),
    };
    let env = ENV
        .get()
        .and_then(|r| r.as_ref().ok())
        .map(|(e, _)| e.clone())
        .ok_or(RuntimeError::NotFound)?;
    let mut b = Session::builder(&env)
        .map_err(merr)?
        .with_optimization_level(GraphOptimizationLevel::All)
        .map_err(|e| merr(e.into()))?;
    if threads > 0 {
        b = b.with_intra_threads(threads).map_err(|e| merr(e.into()))?;
    }
    if device == Device::Cuda {
        b = with_cuda(b)?;
    }
    b.commit_from_file(model).map_err(merr)
}

/// A loaded tagger model.
pub struct Tagger {
    session: Session,
    input: String,
    pub contract: Contract,
    /// Fixed batch size of the model, or `None` when the batch dimension is dynamic.
    pub fixed_batch: Option<usize>,
    /// Number of scores per image.
    pub outputs: usize,
    pub path: PathBuf,
}

pub(crate) fn shape_text(t: &ValueType) -> String {
    match t.tensor_shape() {
        Some(s) => format!(
            "{:?} {}",
            s.iter().collect::<Vec<_>>(),
            t.tensor_type().map(|t| t.to_string()).unwrap_or_default()
        ),
        None => "not a tensor".into(),
    }
}

impl Tagger {
    /// Opens `model` for `kind` (`None` = decide from the input size: 512 is
    /// DeepDanbooru, otherwise WD14).
    pub fn open(
        model: &Path,
        kind: Option<Kind>,
        threads: usize,
        device: Device,
    ) -> Result<Tagger, RuntimeError> {
        let session = open_session(model, threads, device)?;
        Self::from_session(session, model, kind)
    }

    fn from_session(
        session: Session,
        model: &Path,
        kind: Option<Kind>,
    ) -> Result<Tagger, RuntimeError> {
        let expected = "one float32 image input [N, H, W, 3] (or [N, 3, H, W]) with H == W, \
and one float32 score output [N, tags]";
        let bad = |found: String| RuntimeError::Contract {
            path: model.into(),
            found,
            expected: expected.into(),
        };
        let (Some(inp), Some(out)) = (session.inputs().first(), session.outputs().first()) else {
            return Err(bad("no inputs or outputs".into()));
        };
        let f32_ty = Some(ort::value::TensorElementType::Float32);
        let ishape: Vec<i64> = inp
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        if session.inputs().len() != 1 || inp.dtype().tensor_type() != f32_ty || ishape.len() != 4 {
            return Err(bad(format!("input {}", shape_text(inp.dtype()))));
        }
        let (layout, h, w) = match (ishape[1], ishape[3]) {
            (_, 3) => (Layout::Nhwc, ishape[1], ishape[2]),
            (3, _) => (Layout::Nchw, ishape[2], ishape[3]),
            _ => return Err(bad(format!("input {}", shape_text(inp.dtype())))),
        };
        if h != w || h <= 0 {
            return Err(bad(format!("input {}", shape_text(inp.dtype()))));
        }
        let oshape: Vec<i64> = out
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        if out.dtype().tensor_type() != f32_ty || oshape.len() != 2 || oshape[1] <= 0 {
            return Err(bad(format!("output {}", shape_text(out.dtype()))));
        }
        let kind = kind.unwrap_or(if h == 512 {
            Kind::DeepDanbooru
        } else {
            Kind::Wd14
        });
        Ok(Tagger {
            input: inp.name().to_string(),
            contract: Contract {
                kind,
                size: h as u32,
                layout,
            },
            fixed_batch: (ishape[0] > 0).then_some(ishape[0] as usize),
            outputs: oshape[1] as usize,
            path: model.into(),
            session,
        })
    }

    /// Runs `n` images laid out back to back in `data`; returns `n * outputs` scores.
    pub fn run(&mut self, data: Vec<f32>, n: usize) -> Result<Vec<f32>, RuntimeError> {
        let s = self.contract.size as i64;
        let shape = match self.contract.layout {
            Layout::Nhwc => [n as i64, s, s, 3],
            Layout::Nchw => [n as i64, 3, s, s],
        };
        let rerr = |e: ort::Error| RuntimeError::Run(e.to_string());
        let t = Tensor::from_array((shape, data)).map_err(rerr)?;
        let outs = self
            .session
            .run(ort::inputs![self.input.as_str() => t])
            .map_err(rerr)?;
        let (oshape, v) = outs[0].try_extract_tensor::<f32>().map_err(rerr)?;
        if oshape.len() != 2 || oshape[0] != n as i64 || oshape[1] != self.outputs as i64 {
            return Err(RuntimeError::Run(format!(
                "model returned shape {:?} for a batch of {n}",
                oshape.iter().collect::<Vec<_>>()
            )));
        }
        Ok(v.to_vec())
    }
}

#[cfg(feature = "cuda")]
fn with_cuda(
    b: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    use ort::ep::{CUDA, ExecutionProvider};
    let ep = CUDA::default();
    match CUDA::is_available() {
        Ok(true) => {}
        Ok(false) => {
            return Err(RuntimeError::Cuda(
                "this onnxruntime build has no CUDA provider; install onnxruntime-gpu and point ORT_DYLIB_PATH at its library".into(),
            ));
        }
        Err(e) => return Err(RuntimeError::Cuda(e.to_string())),
    }
    b.with_execution_providers([ep.build().error_on_failure()])
        .map_err(|e| RuntimeError::Cuda(ort::Error::<()>::from(e).to_string()))
}

#[cfg(not(feature = "cuda"))]
fn with_cuda(
    _b: ort::session::builder::SessionBuilder,
) -> Result<ort::session::builder::SessionBuilder, RuntimeError> {
    Err(RuntimeError::Cuda(
        "this sdkit was built without the `cuda` feature (cargo build --release --features cuda)"
            .into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        if cfg!(target_os = "linux") {
            assert!(lib_name_ok("libonnxruntime.so"));
            assert!(lib_name_ok("libonnxruntime.so.1.31.1"));
            assert!(!lib_name_ok("libonnxruntime_providers_shared.so"));
            assert!(!lib_name_ok("libonnxruntime_providers_cuda.so"));
        }
    }

    #[test]
    fn finds_library_in_a_venv_layout() {
        let d = tempfile::tempdir().unwrap();
        let capi = d
            .path()
            .join("lib/python3.12/site-packages/onnxruntime/capi");
        std::fs::create_dir_all(&capi).unwrap();
        let name = format!(
            "{}onnxruntime{}.1.31.1",
            std::env::consts::DLL_PREFIX,
            std::env::consts::DLL_SUFFIX
        );
        std::fs::write(capi.join(&name), b"").unwrap();
        let found = venv_sites(d.path())
            .iter()
            .find_map(|s| in_site_packages(s));
        assert_eq!(found, Some(capi.join(name)));
    }
}
