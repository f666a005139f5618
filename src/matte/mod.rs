//! Background removal with a rembg-compatible segmentation model (U^2-Net, IS-Net,
//! BiRefNet; user-supplied ONNX), for `sdkit prep --matte`.
//!
//! Each family's contract lives in `models/<family>.yaml` ([`manifest`]); the image
//! side follows rembg exactly ([`process`]). Prep workers decode and preprocess in
//! parallel and hand their input tensors to one inference thread, which runs up to
//! `batch` of them per ONNX Runtime call (waiting at most [`BATCH_WAIT`] for a batch
//! to fill); the masks are post-processed and composited back on the workers.

pub mod manifest;
pub mod masks;
pub mod process;

use crate::tag::runtime::{self, Device, RuntimeError};
use image::{DynamicImage, GrayImage, RgbImage};
use manifest::{Family, Manifest};
use ort::session::Session;
use ort::value::Tensor;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long the inference thread waits for more requests before running a batch
/// that is not full.
pub const BATCH_WAIT: Duration = Duration::from_millis(10);

/// `--matte-kind`.
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
pub enum KindArg {
    /// From the file name, the output tensor names, then the input size.
    #[default]
    Auto,
    U2net,
    Isnet,
    Birefnet,
}

impl KindArg {
    fn family(self) -> Option<Family> {
        match self {
            KindArg::Auto => None,
            KindArg::U2net => Some(Family::U2net),
            KindArg::Isnet => Some(Family::Isnet),
            KindArg::Birefnet => Some(Family::Birefnet),
        }
    }
}

/// Problems that stop matting altogether (per-image problems are `String`s).
#[derive(Debug, thiserror::Error)]
pub enum MatteError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("{}: no such model file", .0.display())]
    NotFound(PathBuf),
    #[error("{}: unexpected model shape: {found}; expected one float32 input [N, 3, S, S] and a float32 mask output [N, 1, H, W]", path.display())]
    Contract { path: PathBuf, found: String },
    #[error("{}: cannot tell the model family from its name or shape (input {found}); pass --matte-kind u2net|isnet|birefnet", path.display())]
    Unknown { path: PathBuf, found: String },
}

/// One image's input tensor and where its output map goes.
struct Request {
    data: Vec<f32>,
    reply: mpsc::SyncSender<Result<(Vec<f32>, usize, usize), String>>,
}

/// A loaded matting model and its inference thread.
pub struct Matter {
    pub family: Family,
    pub manifest: Manifest,
    /// Square model input side.
    pub size: usize,
    pub path: PathBuf,
    tx: Option<mpsc::Sender<Request>>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Matter {
    /// Loads `model` (and ONNX Runtime). `kind` `Auto` detects the family.
    pub fn open(
        model: &Path,
        kind: KindArg,
        batch: usize,
        threads: usize,
        device: Device,
    ) -> Result<Matter, MatteError> {
        if !model.is_file() {
            return Err(MatteError::NotFound(model.into()));
        }
        let session = runtime::open_session(model, threads, device)?;
        let bad = |found: String| MatteError::Contract {
            path: model.into(),
            found,
        };
        let f32_ty = Some(ort::value::TensorElementType::Float32);
        let inp = match session.inputs() {
            [one] => one,
            more => return Err(bad(format!("{} inputs", more.len()))),
        };
        let ishape: Vec<i64> = inp
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        let in_text = format!("input {}", runtime::shape_text(inp.dtype()));
        if inp.dtype().tensor_type() != f32_ty
            || ishape.len() != 4
            || (ishape[1] != 3 && ishape[1] > 0)
            || (ishape[2] > 0 && ishape[3] > 0 && ishape[2] != ishape[3])
        {
            return Err(bad(in_text));
        }
        let fixed_size = [ishape[2], ishape[3]]
            .into_iter()
            .find(|&s| s > 0)
            .map(|s| s as u32);
        let out_names: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let file_name = model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let family = match kind.family() {
            Some(f) => f,
            None => manifest::detect(&file_name, &out_names, fixed_size).ok_or_else(|| {
                MatteError::Unknown {
                    path: model.into(),
                    found: in_text.clone(),
                }
            })?,
        };
        let manifest = manifest::manifest(family);
        let size = fixed_size.unwrap_or(manifest.input.size) as usize;
        let index = manifest.output.index;
        let Some(out) = session.outputs().get(index) else {
            return Err(bad(format!(
                "{} outputs, the mask is output {index}",
                out_names.len()
            )));
        };
        let oshape: Vec<i64> = out
            .dtype()
            .tensor_shape()
            .map(|s| s.to_vec())
            .unwrap_or_default();
        if out.dtype().tensor_type() != f32_ty || !(3..=4).contains(&oshape.len()) {
            return Err(bad(format!(
                "output {index} {}",
                runtime::shape_text(out.dtype())
            )));
        }
        let fixed_batch = (ishape[0] > 0).then_some(ishape[0] as usize);
        let batch = fixed_batch.unwrap_or(batch.max(1));
        let input_name = inp.name().to_string();
        let (tx, rx) = mpsc::channel::<Request>();
        let worker = std::thread::Builder::new()
            .name("sdkit-matte".into())
            .spawn(move || {
                serve(
                    session,
                    &input_name,
                    index,
                    size,
                    batch,
                    fixed_batch.is_some(),
                    rx,
                )
            })
            .map_err(|e| RuntimeError::Load(format!("cannot start the matting thread: {e}")))?;
        Ok(Matter {
            family,
            manifest,
            size,
            path: model.into(),
            tx: Some(tx),
            worker: Some(worker),
        })
    }

    /// One line for summaries: which contract the model is run with.
    pub fn describe(&self) -> String {
        let i = &self.manifest.input;
        format!(
            "{}: [N, 3, {s}, {s}] RGB, mean {:?}, std {:?}; mask from output {}{}",
            self.family.name(),
            i.mean,
            i.std,
            self.manifest.output.index,
            if self.manifest.output.activation == manifest::Activation::Sigmoid {
                " (sigmoid)"
            } else {
                ""
            },
            s = self.size
        )
    }

    /// Runs the model on one preprocessed input; returns the mask map and its size.
    pub fn infer(&self, data: Vec<f32>) -> Result<(Vec<f32>, usize, usize), String> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.tx
            .as_ref()
            .ok_or("the matting model is closed")?
            .send(Request { data, reply })
            .map_err(|_| "the matting thread stopped".to_string())?;
        rx.recv()
            .map_err(|_| "the matting thread stopped".to_string())?
    }

    /// The model-size mask of a source (rembg `predict` before the resize back).
    pub fn small_mask(
        &self,
        src: &process::Source,
    ) -> Result<crate::tag::resample::Pixels, String> {
        let small = process::model_image(&src.rgb, self.size);
        let mut t = vec![0f32; 3 * self.size * self.size];
        process::write_tensor(&small, &self.manifest.input, &mut t);
        drop(small);
        let (raw, w, h) = self.infer(t)?;
        process::small_mask(&raw, w, h, &self.manifest.output)
    }

    /// Cuts the subject out of `img` and composites it onto `bg`. Returns the RGB
    /// result and the alpha used (mask times any source alpha), both at source size.
    pub fn matte(&self, img: DynamicImage, bg: [u8; 3]) -> Result<(RgbImage, GrayImage), String> {
        let src = process::Source::new(img);
        let small = self.small_mask(&src)?;
        let (w, h) = src.dims();
        let mask = process::full_mask(&small, w, h);
        Ok(process::composite(&src, mask, bg))
    }
}

impl Drop for Matter {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

/// The inference loop: gathers up to `batch` requests, runs them in one call, and
/// sends each its channel-0 map of output `index`.
fn serve(
    mut session: Session,
    input: &str,
    index: usize,
    size: usize,
    batch: usize,
    fixed: bool,
    rx: mpsc::Receiver<Request>,
) {
    let per = 3 * size * size;
    while let Ok(first) = rx.recv() {
        let mut reqs = vec![first];
        let deadline = Instant::now() + BATCH_WAIT;
        while reqs.len() < batch {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match rx.recv_timeout(deadline - now) {
                Ok(r) => reqs.push(r),
                Err(_) => break,
            }
        }
        let n = reqs.len();
        let run_n = if fixed { batch } else { n };
        let mut data = Vec::with_capacity(per * run_n);
        for r in &mut reqs {
            data.append(&mut r.data);
        }
        data.resize(per * run_n, 0.0);
        let result = run_batch(&mut session, input, index, size, run_n, data);
        match result {
            Ok((maps, w, h)) => {
                for (k, r) in reqs.into_iter().enumerate() {
                    let m = maps[k * w * h..(k + 1) * w * h].to_vec();
                    let _ = r.reply.send(Ok((m, w, h)));
                }
            }
            Err(e) => {
                for r in reqs {
                    let _ = r.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// One ONNX Runtime call; returns channel 0 of output `index` per image.
fn run_batch(
    session: &mut Session,
    input: &str,
    index: usize,
    size: usize,
    n: usize,
    data: Vec<f32>,
) -> Result<(Vec<f32>, usize, usize), String> {
    let s = size as i64;
    let rerr = |e: ort::Error| format!("matting model failed: {e}");
    let t = Tensor::from_array(([n as i64, 3, s, s], data)).map_err(rerr)?;
    let outs = session.run(ort::inputs![input => t]).map_err(rerr)?;
    let (shape, v) = outs[index].try_extract_tensor::<f32>().map_err(rerr)?;
    let dims: Vec<i64> = shape.iter().copied().collect();
    let (c, h, w) = match dims[..] {
        [b, c, h, w] if b == n as i64 && c >= 1 => (c as usize, h as usize, w as usize),
        [b, h, w] if b == n as i64 => (1, h as usize, w as usize),
        _ => {
            return Err(format!(
                "matting model returned shape {dims:?} for a batch of {n}"
            ));
        }
    };
    if h == 0 || w == 0 {
        return Err(format!("matting model returned an empty mask {dims:?}"));
    }
    let mut maps = Vec::with_capacity(n * h * w);
    for k in 0..n {
        let start = k * c * h * w;
        maps.extend_from_slice(&v[start..start + h * w]);
    }
    Ok((maps, w, h))
}
