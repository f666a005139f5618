//! The training loop of `sdkit train lora`: load, plan, (resume), cache latents, then per
//! micro-batch: captions -> text conditioning, latents -> noise -> UNet -> loss ->
//! backward, with accumulation, clipping, the optimizer and the schedule at each update;
//! logs, sample images and saves at their cadences; a final save.

use super::data::{self, CaptionOptions, DataOptions, Dataset};
use super::dreambooth::{DreamBoothMethod, Frozen};
use super::latents::{LatentCache, vae_fingerprint};
use super::lr::{Schedule, warmup_steps};
use super::metadata::RunFacts;
use super::method::{EmbeddingMethod, HypernetworkMethod, LoraMethod, Method};
use super::objective::Objective;
use super::optim::{Group, Hyper, Optimizer, clip_grad_norm};
use super::options::{
    DeviceArg, DreamBoothOptions, EmbeddingFormat, HypernetworkOptions, LoraOptions,
    MixedPrecision, SampleSampler, SavePrecision, TextualInversionOptions, TrainOptions,
};
use super::rng::{Purpose, Rng};
use super::samples::{self, SamplePrompt};
use super::state::{self, StateInfo};
use crate::adapters::hypernetwork::Hypernetwork;
use crate::adapters::lora::{LoraNetwork, LoraShape};
use crate::dataset::bucket::BucketSpec;
use crate::formats::tensorboard::EventWriter;
use crate::model::clip::ClipTextModel;
use crate::model::loader::{self, LoadOptions};
use crate::model::pipeline::{BaseVars, Models, pad_for};
use crate::model::prompt::kohya_chunks_with;
use crate::model::samplers::SamplerKind;
use crate::model::schedule::DdpmSchedule;
use crate::model::tokenizer::ClipTokenizer;
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Why a run stopped: bad input found before any work (exit 2) or a failure while
/// training (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Run(String),
}

fn input<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Input(e.to_string())
}

fn run_err<E: std::fmt::Display>(e: E) -> TrainError {
    TrainError::Run(e.to_string())
}

/// What `--dry-run` prints and a finished run reports.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub model: PathBuf,
    pub arch: String,
    pub prediction: String,
    pub folders: Vec<data::Subset>,
    pub skipped: Vec<String>,
    pub train_samples: u64,
    pub reg_samples: u64,
    pub buckets: Vec<((u32, u32), u64)>,
    pub batches_per_epoch: u64,
    pub steps_per_epoch: u64,
    pub epochs: u64,
    pub total_steps: u64,
    pub warmup_steps: u64,
    /// `--learning-rate` as given.
    pub learning_rate: String,
    /// With webui's step schedule: (rate, first step, last step) over the run, 1-based.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate_steps: Option<Vec<(f64, u64, u64)>>,
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    pub trainable_parameters: usize,
    pub memory_estimate_gb: f64,
    pub seed: u64,
    /// DreamBooth with --class-prompt: class images still to generate (not in the
    /// counts above until they exist).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class_images_to_generate: Option<usize>,
    /// The grid `--grid-prompt` renders when the run ends (of the saves planned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grid: Option<super::grid::Preview>,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub plan: Plan,
    pub output: Option<PathBuf>,
    pub saved: Vec<PathBuf>,
    pub samples: Vec<PathBuf>,
    pub steps: u64,
    pub final_loss: Option<f64>,
    pub seconds: f64,
    /// Mean wall time of an optimizer step (the first step, which warms caches, left out
    /// when there are more), sample images and saves excluded.
    pub seconds_per_step: Option<f64>,
    /// Wall time of each optimizer step of this run, in order (same exclusions).
    pub step_seconds: Vec<f64>,
    /// Latent caching rate (images per second), when latents were cached up front.
    pub latent_images_per_second: Option<f64>,
    pub log_dir: Option<PathBuf>,
    /// The grid of the saves (`--grid-prompt`).
    pub grid: Option<crate::grid::Outcome>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The compute device of `--device`.
pub fn device(d: DeviceArg) -> Result<Device, TrainError> {
    match d {
        DeviceArg::Cpu => Ok(Device::Cpu),
        DeviceArg::Cuda => {
            if !cfg!(feature = "cuda") {
                return Err(input(
                    "--device cuda: this sdkit was built without CUDA (cargo build --release --features cuda)",
                ));
            }
            Device::new_cuda(0).map_err(|e| input(format!("--device cuda: {e}")))
        }
    }
}

fn dtype(m: MixedPrecision) -> DType {
    match m {
        MixedPrecision::No => DType::F32,
        MixedPrecision::Fp16 => DType::F16,
        MixedPrecision::Bf16 => DType::BF16,
    }
}

fn save_dtype(o: &TrainOptions) -> DType {
    match o.save_precision {
        Some(SavePrecision::Fp32) => DType::F32,
        Some(SavePrecision::Fp16) => DType::F16,
        Some(SavePrecision::Bf16) => DType::BF16,
        // kohya without --save_precision: the network's own dtype, f32.
        None => DType::F32,
    }
}

pub(super) fn sampler_kind(s: SampleSampler) -> SamplerKind {
    match s {
        SampleSampler::Ddim => SamplerKind::Ddim,
        SampleSampler::EulerA => SamplerKind::EulerA,
        SampleSampler::DpmPp2mKarras => SamplerKind::DpmPp2mKarras,
    }
}

/// Conditioning for captions [B, 77 (or 2 + 75 n), width], kohya's layout for long
/// captions: BOS of the first chunk, the 75 inner states of each chunk, EOS of the last.
pub fn encode_captions(
    clip: &ClipTextModel,
    captions: &[String],
    max_token_length: usize,
    pad: crate::model::prompt::Pad,
    clip_skip: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let tok = ClipTokenizer::shared();
    let mut ids = Vec::new();
    let mut n_chunks = 1;
    for c in captions {
        let chunks = kohya_chunks_with(tok, c, max_token_length, pad, &clip.placeholders);
        n_chunks = chunks.len();
        for ch in chunks {
            ids.extend(ch);
        }
    }
    let b = captions.len();
    let ids = Tensor::from_vec(ids, (b * n_chunks, 77), device)?;
    let z = clip
        .encode(&ids, clip_skip)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let width = z.dim(2)?;
    if n_chunks == 1 {
        return Ok(z);
    }
    let z = z.reshape((b, n_chunks, 77, width))?;
    let mut parts = vec![z.narrow(1, 0, 1)?.narrow(2, 0, 1)?.squeeze(1)?];
    for i in 0..n_chunks {
        parts.push(z.narrow(1, i, 1)?.narrow(2, 1, 75)?.squeeze(1)?);
    }
    parts.push(z.narrow(1, n_chunks - 1, 1)?.narrow(2, 76, 1)?.squeeze(1)?);
    Tensor::cat(&parts, 1)
}

/// Rough peak memory of a step: weights, trained parameters (an adapter's f32 weights and
/// gradients; a base weight, already counted, only its gradient) and the optimizer's
/// `state_bytes`, the run's own overhead, and activations. Calibrated on the SD1.5
/// benchmarks (BENCHMARKS.md, 512 px, batch 1, f32): LoRA peak RSS 11.0 GB, 5.96 GB with
/// gradient checkpointing, i.e. ~5.7 GB of activations per 64x64 latent image (~0.7 GB
/// when recomputed). DreamBooth (Adafactor 13.1 GB, AdamW8bit 12.9 GB measured with the
/// staged backward) comes out at 16.2 / 16.1 GB: gradients grow while activations are
/// freed, so the sum is an upper bound; with the fused backward pass (no gradients held;
/// Adafactor 10.6 GB measured) at 12.7 GB. Scaled by the UNet's width
/// (SD1.5's channels sum to 3520), latent area, batch and element size.
fn memory_estimate(
    models: &Models,
    base_weights: bool,
    fused: bool,
    params: usize,
    state_bytes: u64,
    ds: &Dataset,
    o: &TrainOptions,
) -> f64 {
    let (batch, dt) = (o.batch_size, dtype(o.mixed_precision));
    let w = models.info.unet.block_out_channels.iter().sum::<usize>() as f64 / 3520.0;
    let weights_gb = 4.3 * w * dt.size_in_bytes() as f64 / 4.0;
    // Bytes per trained parameter: its gradient (base weights are counted already; the
    // fused backward pass updates them before their gradients pile up), plus its value.
    let per_param = match (base_weights, fused) {
        (true, true) => 0.0,
        (true, false) => 4.0,
        _ => 8.0,
    };
    let adapter_gb = (params as f64 * per_param + state_bytes as f64) / 1e9;
    let overhead_gb = 0.9 * w;
    let max_area = ds
        .bucket_counts()
        .iter()
        .map(|((bw, bh), _)| (*bw as f64 / 8.0) * (*bh as f64 / 8.0))
        .fold(0.0, f64::max);
    let per_image = if o.gradient_checkpointing { 0.7 } else { 5.7 };
    let act_gb =
        per_image * w * (max_area / 4096.0) * batch as f64 * dt.size_in_bytes() as f64 / 4.0;
    ((weights_gb + adapter_gb + overhead_gb + act_gb) * 10.0).round() / 10.0
}

/// Periodic save files of a run (`NAME-000004.safetensors`, `NAME-step00000100...`),
/// oldest first, each with its number.
fn periodic_saves(out: &Path, name: &str, ext: &str, step_files: bool) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let f = e.file_name().into_string().ok()?;
                    let rest = f.strip_prefix(name)?.strip_prefix('-')?;
                    let num = rest.strip_suffix(ext)?;
                    let num = if step_files {
                        num.strip_prefix("step")?
                    } else {
                        num
                    };
                    let want = if step_files { 8 } else { 6 };
                    if num.len() != want || !num.bytes().all(|b| b.is_ascii_digit()) {
                        return None;
                    }
                    Some((num.parse().ok()?, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

struct Ctx<'a> {
    o: &'a TrainOptions,
    models: Models,
    method: Box<dyn Method + 'a>,
    ds: Dataset,
    plan: Plan,
    started: u64,
    session_id: u64,
    grid: Option<super::grid::Spec>,
}

impl Ctx<'_> {
    fn facts(&self, epoch: u64, steps: u64) -> RunFacts<'_> {
        RunFacts {
            arch: self.models.info.arch,
            prediction: self.models.info.prediction,
            seed: self.plan.seed,
            epoch,
            steps,
            total_steps: self.plan.total_steps,
            epochs: self.plan.epochs,
            batches_per_epoch: self.plan.batches_per_epoch,
            warmup_steps: self.plan.warmup_steps,
            clip_skip: self.clip_skip(),
            started: self.started,
            finished: now_secs(),
            session_id: self.session_id,
            dataset: &self.ds,
        }
    }

    fn clip_skip(&self) -> usize {
        self.o.clip_skip.unwrap_or(1)
    }

    fn save_output(&self, path: &Path, epoch: u64, steps: u64) -> Result<(), TrainError> {
        let facts = self.facts(epoch, steps);
        self.method
            .save(path, &facts, save_dtype(self.o))
            .map_err(run_err)
    }

    fn file(&self, stem: &str) -> PathBuf {
        self.o
            .out
            .join(format!("{stem}{}", self.method.extension()))
    }

    fn model_name(&self) -> String {
        self.o
            .model
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Which of the base model's own weights train (DreamBooth); none for the adapters.
#[derive(Clone, Copy, Default)]
struct BaseTraining {
    unet: bool,
    text_encoder: bool,
}

/// What a full fine-tune gets besides the model: the trainable base weights and the
/// frozen tensors a checkpoint save writes back (empty for the adapters).
#[derive(Default)]
struct Base {
    vars: BaseVars,
    frozen: Frozen,
}

/// Attaches a method's trainable part to the loaded model (seeded init stream given).
type Attach<'a> = dyn FnOnce(&mut Models, Base, &mut Rng, &Device) -> Result<Box<dyn Method + 'a>, TrainError>
    + 'a;

/// Everything a run needs before the first step; `--dry-run` stops after it.
fn prepare<'a>(
    o: &'a TrainOptions,
    attach: Box<Attach<'a>>,
    base: BaseTraining,
) -> Result<Ctx<'a>, TrainError> {
    o.validate().map_err(input)?;
    let (rw, rh) = o.resolution().map_err(input)?;
    if !o.data.is_dir() {
        return Err(input(format!(
            "{}: no such folder (--data expects kohya <repeats>_<name> folders or sdkit prep output)",
            o.data.display()
        )));
    }
    if let Some(r) = &o.reg
        && !r.is_dir()
    {
        return Err(input(format!("{}: no such folder (--reg)", r.display())));
    }
    let dopts = DataOptions {
        buckets: BucketSpec {
            resolution: (rw, rh),
            min_bucket: o.min_bucket_reso,
            max_bucket: o.max_bucket_reso,
            step: o.bucket_reso_steps,
            no_upscale: o.bucket_no_upscale,
        },
        caption_extension: o.caption_extension.clone(),
    };
    let ds = data::load(&o.data, o.reg.as_deref(), &dopts)
        .map_err(|e| input(format!("{}: {e}", o.data.display())))?;
    if ds.train_samples == 0 {
        return Err(input(format!(
            "{}: no training images (expected <repeats>_<name> folders with .png/.jpg/.webp/.bmp images{})",
            o.data.display(),
            if ds.skipped.is_empty() {
                String::new()
            } else {
                format!("; {} skipped, first: {}", ds.skipped.len(), ds.skipped[0])
            }
        )));
    }
    let dev = device(o.device)?;
    let seed = match (&o.resume, o.seed) {
        (Some(_), _) => 0, // taken from the state below
        (None, Some(s)) => s,
        (None, None) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            (t ^ (std::process::id() as u64) << 20) % 4_294_967_295
        }
    };
    let lopts = LoadOptions {
        dtype: dtype(o.mixed_precision),
        device: dev.clone(),
        prediction: o.prediction_override(),
    };
    let mut ck = loader::open(&o.model, &lopts).map_err(input)?;
    let mut frozen = Frozen::default();
    if base.unet || base.text_encoder {
        ck.unet.set_trainable(move |_| base.unet);
        ck.text_encoder.set_trainable(move |_| base.text_encoder);
        frozen = Frozen {
            vae: ck.vae.snapshot(),
            text_encoder: ck.text_encoder.snapshot(),
            passthrough: ck
                .passthrough
                .iter()
                .map(|(k, t)| (k.clone(), t.clone()))
                .collect(),
        };
    }
    let (mut models, vars) = Models::new_with_vars(ck).map_err(input)?;
    let mut init = Rng::stream(seed, Purpose::Init, 0);
    let method = attach(&mut models, Base { vars, frozen }, &mut init, &dev)?;
    let grid = super::grid::spec(o, method.grid_columns(), (rw, rh)).map_err(input)?;
    let batches = ds.batches_per_epoch(o.batch_size);
    let steps_per_epoch = batches.div_ceil(o.gradient_accumulation_steps);
    let max_steps = match o.max_train_epochs {
        Some(e) => e * steps_per_epoch,
        None => o.max_train_steps,
    };
    // webui's schedule ends training at its last rate's step, when that comes first.
    let lr_steps = o.learning_rate.steps();
    let total_steps = lr_steps.map_or(max_steps, |r| r.steps_within(max_steps));
    let epochs = total_steps.div_ceil(steps_per_epoch.max(1));
    let size = method.size();
    let hyper = Hyper::defaults(o.optimizer)
        .with_args(&o.optimizer_args)
        .map_err(input)?;
    let shapes: Vec<Vec<usize>> = method
        .groups()
        .iter()
        .flat_map(|g| g.vars.iter().map(|v| v.dims().to_vec()))
        .collect();
    let state_bytes = hyper.state_bytes(&shapes);
    let plan = Plan {
        model: o.model.clone(),
        arch: models.info.arch.name().into(),
        prediction: format!("{:?}", models.info.prediction),
        folders: ds.subsets.clone(),
        skipped: ds.skipped.clone(),
        train_samples: ds.train_samples,
        reg_samples: ds.reg_samples,
        buckets: ds.bucket_counts(),
        batches_per_epoch: batches,
        steps_per_epoch,
        epochs,
        total_steps,
        warmup_steps: warmup_steps(o.lr_warmup_steps, total_steps),
        learning_rate: o.learning_rate.text().to_string(),
        learning_rate_steps: lr_steps.map(|r| r.spans(total_steps)),
        unet_modules: size.unet_modules,
        text_encoder_modules: size.text_encoder_modules,
        trainable_parameters: size.parameters,
        memory_estimate_gb: memory_estimate(
            &models,
            method.trains_base_weights(),
            method.fused_backward_pass(),
            size.parameters,
            state_bytes,
            &ds,
            o,
        ),
        seed,
        class_images_to_generate: None,
        grid: grid.as_ref().map(|g| {
            let saves =
                super::grid::planned_saves(o, method.extension(), steps_per_epoch, total_steps);
            super::grid::preview(o, g, &saves, seed)
        }),
    };
    Ok(Ctx {
        o,
        models,
        method,
        ds,
        plan,
        started: now_secs(),
        session_id: seed ^ now_secs(),
        grid,
    })
}

/// Progress callbacks for the CLI.
pub trait Progress {
    fn start(&mut self, total_steps: u64, done: u64);
    fn step(&mut self, step: u64, loss: f64, lr: f64);
    fn message(&mut self, msg: &str);
    /// A progress bar labelled `label` over `total` items; call the closure per item.
    fn bar(&mut self, label: &str, total: u64) -> Box<dyn FnMut() + '_>;
    fn finish(&mut self);
}

/// LoRA / LoCon attached as kohya's `networks.lora` does.
fn lora(o: &LoraOptions) -> Result<Box<Attach<'_>>, TrainError> {
    o.validate().map_err(input)?;
    Ok(Box::new(
        move |models: &mut Models, _: Base, init: &mut Rng, dev: &Device| {
            let shape = LoraShape {
                dim: o.network_dim,
                alpha: o.network_alpha,
                conv_dim: o.conv_dim,
                conv_alpha: o.conv_alpha,
                dropout: o.network_dropout.unwrap_or(0.0),
            };
            let unet = (!o.network_train_text_encoder_only).then_some(&mut models.unet);
            let te = (!o.network_train_unet_only).then_some(&mut models.clip);
            let net = LoraNetwork::create(unet, te, &shape, init, dev).map_err(run_err)?;
            Ok(Box::new(LoraMethod { o, net }) as Box<dyn Method>)
        },
    ))
}

/// A webui hypernetwork on every attention context width of the UNet.
fn hypernetwork(o: &HypernetworkOptions) -> Result<Box<Attach<'_>>, TrainError> {
    o.shape.validate().map_err(input)?;
    Ok(Box::new(
        move |models: &mut Models, _: Base, init: &mut Rng, dev: &Device| {
            let widths = crate::adapters::hypernetwork::default_widths(&models.unet.config);
            let net = Hypernetwork::create(&o.shape, &widths, init, dev).map_err(input)?;
            net.attach(&mut models.unet, 1.0);
            let checkpoint = crate::formats::png_params::model_hash_and_name(&o.model)
                .map_err(|e| input(format!("{}: {e}", o.model.display())))?;
            Ok(Box::new(HypernetworkMethod { o, net, checkpoint }) as Box<dyn Method>)
        },
    ))
}

/// New token vectors in CLIP's token lookup, the only trainable tensor.
fn embedding(o: &TextualInversionOptions) -> Result<Box<Attach<'_>>, TrainError> {
    let template = match &o.template {
        Some(t) => Some(super::templates::load_template(t).map_err(input)?),
        None => None,
    };
    let (rw, rh) = o.resolution().map_err(input)?;
    Ok(Box::new(
        move |models: &mut Models, _: Base, _: &mut Rng, _: &Device| {
            use crate::adapters::embedding::{Embedding, TrainableEmbedding};
            let name = o.name();
            let tok = ClipTokenizer::shared();
            let emb = Embedding::init(
                &models.clip,
                tok,
                &o.init_word,
                o.num_vectors_per_token,
                &name,
            )
            .map_err(input)?;
            let te = TrainableEmbedding::attach(&mut models.clip, &emb).map_err(input)?;
            let checkpoint = match o.save_format {
                EmbeddingFormat::Pt => crate::formats::png_params::model_hash_and_name(&o.model)
                    .map_err(|e| input(format!("{}: {e}", o.model.display())))?,
                _ => (None, String::new()),
            };
            Ok(Box::new(EmbeddingMethod {
                o,
                checkpoint,
                te,
                name,
                template,
                resolution: (rw as usize, rh as usize),
            }) as Box<dyn Method>)
        },
    ))
}

/// DreamBooth: the base UNet (and text encoder) weights themselves train.
fn dreambooth(o: &DreamBoothOptions) -> Result<(Box<Attach<'_>>, BaseTraining), TrainError> {
    o.validate().map_err(input)?;
    let base = BaseTraining {
        unet: true,
        text_encoder: o.trains_text_encoder(),
    };
    let attach = Box::new(
        move |models: &mut Models, b: Base, _: &mut Rng, _: &Device| {
            Ok(Box::new(DreamBoothMethod {
                o,
                info: models.info.clone(),
                unet: b.vars.unet,
                text_encoder: b.vars.text_encoder,
                frozen: b.frozen,
            }) as Box<dyn Method>)
        },
    );
    Ok((attach, base))
}

/// Where generated class images go: `--reg`, else OUT/class_images.
fn class_reg(o: &DreamBoothOptions) -> PathBuf {
    o.reg.clone().unwrap_or_else(|| o.out.join("class_images"))
}

/// The options a DreamBooth run trains with: with --class-prompt, the reg folder is the
/// one the class images go to.
fn with_class_reg(o: &DreamBoothOptions) -> DreamBoothOptions {
    let mut o = o.clone();
    if o.class_prompt.is_some() {
        o.train.reg = Some(class_reg(&o));
    }
    o
}

/// Fill the class folder up to --num-class-images with the frozen model.
fn make_class_images(o: &DreamBoothOptions, ui: &mut dyn Progress) -> Result<(), TrainError> {
    let Some(prompt) = &o.class_prompt else {
        return Ok(());
    };
    let dir = super::dreambooth::class_dir(&class_reg(o), prompt);
    if super::dreambooth::missing(&dir, o.num_class_images) == 0 {
        return Ok(());
    }
    let (w, h) = o.resolution().map_err(input)?;
    let lopts = LoadOptions {
        dtype: dtype(o.mixed_precision),
        device: device(o.device)?,
        prediction: o.prediction_override(),
    };
    let ck = loader::open(&o.model, &lopts).map_err(input)?;
    let models = Models::new(ck).map_err(input)?;
    let todo = super::dreambooth::missing(&dir, o.num_class_images) as u64;
    ui.message(&format!(
        "generating {todo} class images of {prompt:?} into {}",
        dir.display()
    ));
    let mut tick = ui.bar("class images", todo);
    let job = super::dreambooth::ClassImages {
        dir: &dir,
        prompt,
        n: o.num_class_images,
        size: (w as usize, h as usize),
        steps: o.class_steps,
        sampler: sampler_kind(o.sample_sampler),
        seed: o.seed.unwrap_or(0),
        caption_extension: &o.caption_extension,
    };
    super::dreambooth::generate_class_images(&models, &job, &mut *tick).map_err(run_err)?;
    Ok(())
}

/// Plan of a DreamBooth run (`--dry-run`); `class_images_to_generate` is set.
pub fn plan_dreambooth(o: &DreamBoothOptions) -> Result<Plan, TrainError> {
    let o = with_class_reg(o);
    if let Some(reg) = &o.reg
        && !reg.is_dir()
        && o.class_prompt.is_some()
    {
        // Nothing generated yet: plan without the reg folder.
        let mut bare = o.clone();
        bare.train.reg = None;
        return plan_dreambooth_in(&bare, &o);
    }
    plan_dreambooth_in(&o, &o)
}

fn plan_dreambooth_in(o: &DreamBoothOptions, full: &DreamBoothOptions) -> Result<Plan, TrainError> {
    let (attach, base) = dreambooth(o)?;
    let mut plan = prepare(o, attach, base)?.plan;
    if let Some(p) = &full.class_prompt {
        let dir = super::dreambooth::class_dir(&class_reg(full), p);
        plan.class_images_to_generate =
            Some(super::dreambooth::missing(&dir, full.num_class_images));
    }
    Ok(plan)
}

/// Generate missing class images, then fine-tune; returns the report.
pub fn train_dreambooth(
    o: &DreamBoothOptions,
    ui: &mut dyn Progress,
) -> Result<Report, TrainError> {
    o.validate().map_err(input)?;
    make_class_images(o, ui)?;
    let o = with_class_reg(o);
    let (attach, base) = dreambooth(&o)?;
    train(&o, attach, base, ui)
}

/// Plan of a textual-inversion run (`--dry-run`).
pub fn plan_textual_inversion(o: &TextualInversionOptions) -> Result<Plan, TrainError> {
    Ok(prepare(o, embedding(o)?, BaseTraining::default())?.plan)
}

/// Train a textual-inversion embedding; returns the report.
pub fn train_textual_inversion(
    o: &TextualInversionOptions,
    ui: &mut dyn Progress,
) -> Result<Report, TrainError> {
    train(o, embedding(o)?, BaseTraining::default(), ui)
}

/// Plan of a hypernetwork run (`--dry-run`).
pub fn plan_hypernetwork(o: &HypernetworkOptions) -> Result<Plan, TrainError> {
    Ok(prepare(o, hypernetwork(o)?, BaseTraining::default())?.plan)
}

/// Train a webui hypernetwork; returns the report.
pub fn train_hypernetwork(
    o: &HypernetworkOptions,
    ui: &mut dyn Progress,
) -> Result<Report, TrainError> {
    train(o, hypernetwork(o)?, BaseTraining::default(), ui)
}

/// Plan only (`--dry-run`).
pub fn plan(o: &LoraOptions) -> Result<Plan, TrainError> {
    Ok(prepare(o, lora(o)?, BaseTraining::default())?.plan)
}

/// Train a LoRA; returns the report.
pub fn train_lora(o: &LoraOptions, ui: &mut dyn Progress) -> Result<Report, TrainError> {
    train(o, lora(o)?, BaseTraining::default(), ui)
}

/// The training loop shared by every method.
fn train<'a>(
    o: &'a TrainOptions,
    attach: Box<Attach<'a>>,
    base: BaseTraining,
    ui: &mut dyn Progress,
) -> Result<Report, TrainError> {
    let t0 = std::time::Instant::now();
    let mut cx = prepare(o, attach, base)?;
    let dev = cx.models.unet.conv_in.weight.tensor().device().clone();
    crate::util::atomic::create_dir_all(&o.out)
        .map_err(|e| input(format!("{}: {e}", o.out.display())))?;

    // Resume.
    let mut pos = StateInfo {
        format: state::FORMAT,
        method: cx.method.kind().into(),
        step: 0,
        epoch: 0,
        batch_in_epoch: 0,
        micro: 0,
        seed: cx.plan.seed,
        model: cx.model_name(),
        arch: cx.models.info.arch.name().into(),
        network: cx.method.identity(),
        optimizer: format!("{:?}", o.optimizer),
        epoch_loss_sum: 0.0,
        epoch_loss_count: 0,
        started: cx.started,
        session_id: cx.session_id,
    };
    let hyper = Hyper::defaults(o.optimizer)
        .with_args(&o.optimizer_args)
        .map_err(input)?;
    let mut groups = Vec::new();
    let mut base_lrs = Vec::new();
    let mut untils = Vec::new();
    // The step from which the text encoder is frozen (--stop-text-encoder-training).
    let mut text_stop = None;
    for g in cx.method.groups() {
        if g.name == "text_encoder" {
            text_stop = g.until;
        }
        groups.push(Group {
            name: g.name,
            vars: g.vars,
        });
        base_lrs.push(g.lr);
        untils.push(g.until);
    }
    if o.optimizer == super::optim::OptimizerKind::Prodigy {
        let rates: Vec<f64> = base_lrs.iter().copied().filter(|&r| r > 0.0).collect();
        if rates.windows(2).any(|w| w[0] != w[1]) {
            return Err(input(
                "--optimizer prodigy takes one learning rate for UNet and text encoder (or 0 for one of them); it is usually run at 1.0",
            ));
        }
    }
    // Recompute blocks with --gradient-checkpointing; when every UNet weight trains, keep
    // each block's graph apart instead, so that the backward frees a block's activations
    // as soon as it is done with them while the weight gradients pile up (same gradients).
    let checkpointing = {
        use crate::model::nn::checkpoint::Checkpointing;
        let vars = || groups.iter().flat_map(|g| g.vars.iter().cloned()).collect();
        if o.gradient_checkpointing {
            Some(Checkpointing::new(vars()))
        } else if cx.method.trains_base_weights() {
            Some(Checkpointing::keep(vars()))
        } else {
            None
        }
    };
    cx.models.unet.checkpointing = checkpointing.clone();
    let fused = match &checkpointing {
        Some(ck) if cx.method.fused_backward_pass() => {
            Some(super::fused::Fused::new(ck.clone(), &groups))
        }
        _ => None,
    };
    let mut opt = Optimizer::new(hyper, groups);
    if let Some(dir) = &o.resume {
        let st = state::load(dir).map_err(input)?;
        let i = &st.info;
        let bad = |what: &str, a: &str, b: &str| {
            input(format!(
                "{}: this state is from {what} {a:?}, the run uses {b:?}",
                dir.display()
            ))
        };
        if i.method != pos.method {
            return Err(bad("method", &i.method, &pos.method));
        }
        if i.model != pos.model || i.arch != pos.arch {
            return Err(bad("model", &i.model, &pos.model));
        }
        if i.network != pos.network {
            return Err(bad(
                "network",
                &i.network.to_string(),
                &pos.network.to_string(),
            ));
        }
        if i.optimizer != pos.optimizer {
            return Err(bad("optimizer", &i.optimizer, &pos.optimizer));
        }
        if o.seed.is_some_and(|s| s != i.seed) {
            return Err(input(format!(
                "{}: this state was trained with --seed {}; leave --seed out or give the same",
                dir.display(),
                i.seed
            )));
        }
        cx.method
            .load_state(&st.adapter)
            .map_err(|e| input(format!("{}: {e}", dir.display())))?;
        opt.load_state(&st.optimizer, i.step)
            .map_err(|e| input(format!("{}: {e}", dir.display())))?;
        pos = st.info.clone();
        cx.plan.seed = pos.seed;
        cx.started = pos.started;
        cx.session_id = pos.session_id;
    }
    let seed = cx.plan.seed;
    let total = cx.plan.total_steps;
    let schedule = Schedule {
        kind: o.lr_scheduler,
        warmup: cx.plan.warmup_steps,
        total,
        num_cycles: o.lr_scheduler_num_cycles,
        power: o.lr_scheduler_power,
    };
    // The rate of optimizer step `s` (0-based) for a group of base rate `base`: webui's
    // step schedule when given (it replaces --lr-scheduler), else kohya's schedule.
    let lr_at = |base: f64, s: u64| match o.learning_rate.steps() {
        Some(r) => r.at(s).unwrap_or(0.0),
        None => schedule.lr(base, s),
    };
    // Every group's rate at step `s` (0 for the text encoder once it stops training).
    let step_lrs = |s: u64| -> Vec<f64> {
        base_lrs
            .iter()
            .zip(&untils)
            .map(|(&b, u)| match u {
                Some(u) if s >= *u => 0.0,
                _ => lr_at(b, s),
            })
            .collect()
    };

    let prompts: Vec<SamplePrompt> = match &o.sample_prompts {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|e| input(format!("{}: {e}", p.display())))?;
            samples::parse(&text, p).map_err(input)?
        }
        None => vec![],
    };

    // Latents.
    let mut latent_rate = None;
    let vae_id = vae_fingerprint(&cx.models.vae, &dev).map_err(run_err)?;
    let cache_dir = o
        .cache_latents_to_disk
        .then(|| o.out.join(".sdkit-cache").join("latents"));
    let cache = LatentCache::new(
        vae_id,
        o.cache_latents || o.cache_latents_to_disk,
        cache_dir,
    );
    if o.cache_latents || o.cache_latents_to_disk {
        let flips: &[bool] = if o.flip_aug { &[false, true] } else { &[false] };
        let jobs: Vec<(usize, bool)> = (0..cx.ds.items.len())
            .filter(|&i| cx.ds.items[i].repeats > 0)
            .flat_map(|i| flips.iter().map(move |&f| (i, f)))
            .collect();
        let n_jobs = jobs.len();
        let t = std::time::Instant::now();
        let mut tick = ui.bar("latents", n_jobs as u64);
        for (i, f) in jobs {
            cache
                .get(&cx.models.vae, i, &cx.ds.items[i], f, &dev)
                .map_err(run_err)?;
            tick();
        }
        latent_rate = Some(n_jobs as f64 / t.elapsed().as_secs_f64().max(1e-9));
    }

    let mut log = match &o.logging_dir {
        Some(d) => {
            let (y, mo, dd, h, mi, s) = super::metadata::civil(now_secs());
            let dir = d.join(format!(
                "{}{y:04}{mo:02}{dd:02}{h:02}{mi:02}{s:02}",
                o.log_prefix
            ));
            Some(EventWriter::create(&dir).map_err(input)?)
        }
        None => None,
    };
    let log_dir = log
        .as_ref()
        .and_then(|w| w.path().parent().map(Path::to_path_buf));

    let objective = Objective {
        prediction: cx.models.info.prediction,
        noise_offset: o.noise_offset,
        min_snr_gamma: o.min_snr_gamma,
        loss_type: o.loss_type,
        huber_c: o.huber_c,
        huber_schedule: o.huber_schedule,
    };
    let sched = DdpmSchedule::default();
    let copts = CaptionOptions {
        keep_tokens: o.keep_tokens,
        shuffle: o.shuffle_caption,
        dropout_rate: o.caption_dropout_rate,
        tag_dropout_rate: o.caption_tag_dropout_rate,
        separator: ",".into(),
    };
    let pad = pad_for(cx.models.info.arch);
    let scaling = cx.models.vae.config.scaling_factor;
    let accum = o.gradient_accumulation_steps;
    let mut saved = Vec::new();
    let mut sample_files = Vec::new();
    let mut last_loss = None;
    let mut acc: Option<Vec<Vec<Tensor>>> = None;

    let mut sampled_at = u64::MAX;
    let mut step_times: Vec<f64> = Vec::new();
    let mut step_clock: Option<std::time::Instant> = None;
    let mut alloc_guard = crate::util::alloc::GrowthGuard::new();
    ui.start(total, pos.step);
    'epochs: while pos.step < total {
        let batches = cx.ds.epoch_batches(seed, pos.epoch, o.batch_size);
        let n_batches = batches.len() as u64;
        for (bi, batch) in batches.iter().enumerate().skip(pos.batch_in_epoch as usize) {
            let bi = bi as u64;
            let step_start = *step_clock.get_or_insert_with(std::time::Instant::now);
            // Latents and captions of the batch.
            let mut lat = Vec::with_capacity(batch.len());
            let mut caps = Vec::with_capacity(batch.len());
            let mut weights = Vec::with_capacity(batch.len());
            for (k, &idx) in batch.iter().enumerate() {
                let item = &cx.ds.items[idx];
                let sample_id = pos.micro * 4096 + k as u64;
                let flip =
                    o.flip_aug && Rng::stream(seed, Purpose::Flip, sample_id).uniform() < 0.5;
                lat.push(
                    cache
                        .get(&cx.models.vae, idx, item, flip, &dev)
                        .map_err(run_err)?,
                );
                let mut r = Rng::stream(seed, Purpose::Caption, sample_id);
                let caption = data::process_caption(&item.caption, &copts, &mut r);
                caps.push(cx.method.prompt(caption, &mut r));
                weights.push(if item.is_reg {
                    o.prior_loss_weight as f32
                } else {
                    1.0
                });
            }
            cx.method
                .set_dropout_key(Rng::stream(seed, Purpose::Dropout, pos.micro).next_u64() | 1);
            let step_result = (|| -> candle_core::Result<(f64, Vec<Vec<Tensor>>)> {
                if let Some(ck) = &checkpointing {
                    ck.clear()?;
                }
                let x0 = (Tensor::cat(&lat, 0)? * scaling)?.to_dtype(cx.models.unet.dtype())?;
                let encode = || {
                    encode_captions(
                        &cx.models.clip,
                        &caps,
                        o.max_token_length,
                        pad,
                        cx.clip_skip(),
                        &dev,
                    )
                };
                let ctx = if text_stop.is_some_and(|u| pos.step >= u) {
                    crate::model::grad::no_grad(encode)?
                } else {
                    encode()?
                };
                let mut rng = Rng::stream(seed, Purpose::Noise, pos.micro);
                let n = objective.noise(&sched, &x0, &mut rng)?;
                let t = Tensor::from_vec(
                    n.timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
                    n.timesteps.len(),
                    &dev,
                )?;
                let pred = cx
                    .models
                    .unet
                    .forward(&n.noisy, &t, &ctx)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                let loss = objective.loss(&sched, &pred, &n, &weights)?;
                let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    return Ok((lv, vec![]));
                }
                if let Some(f) = &fused {
                    // One micro-batch per step (validated): the update is this backward's.
                    f.step(&mut opt, &loss, &step_lrs(pos.step), o.max_grad_norm)?;
                    return Ok((lv, Vec::new()));
                }
                let grads = (loss / accum as f64)?.backward()?;
                let g = opt
                    .groups
                    .iter()
                    .map(|g| {
                        g.vars
                            .iter()
                            // Detached: a gradient computed from tracked tensors carries
                            // their graph, which the optimizer's moments would keep alive.
                            .map(|v| {
                                let outer = grads.get(v.as_tensor()).map(|t| t.detach());
                                let inner = match &checkpointing {
                                    Some(ck) => ck.take(v)?,
                                    None => None,
                                };
                                match (outer, inner) {
                                    (Some(a), Some(b)) => a + b,
                                    (Some(g), None) | (None, Some(g)) => Ok(g),
                                    (None, None) => v.as_tensor().zeros_like(),
                                }
                            })
                            .collect::<candle_core::Result<Vec<_>>>()
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Ok((lv, g))
            })();
            cx.method.set_dropout_key(0);
            let (lv, g) = step_result.map_err(run_err)?;
            if !lv.is_finite() {
                let last = saved
                    .last()
                    .map(|p: &PathBuf| format!("; the last save {} is intact", p.display()))
                    .unwrap_or_default();
                return Err(TrainError::Run(format!(
                    "step {}: the loss is {lv} (learning rate too high, or fp16 overflow: try --mixed-precision no); stopped{last}",
                    pos.step + 1
                )));
            }
            acc = Some(match acc.take() {
                None => g,
                Some(a) => a
                    .into_iter()
                    .zip(g)
                    .map(|(x, y)| x.into_iter().zip(y).map(|(p, q)| p + q).collect())
                    .collect::<candle_core::Result<Vec<Vec<Tensor>>>>()
                    .map_err(run_err)?,
            });
            pos.micro += 1;
            pos.batch_in_epoch = bi + 1;
            pos.epoch_loss_sum += lv;
            pos.epoch_loss_count += 1;
            last_loss = Some(lv);
            let boundary = (bi + 1) % accum == 0 || bi + 1 == n_batches;
            if !boundary {
                continue;
            }
            let mut grads = acc.take().unwrap_or_default();
            if o.max_grad_norm > 0.0 && fused.is_none() {
                clip_grad_norm(&mut grads, o.max_grad_norm).map_err(run_err)?;
            }
            let lrs = step_lrs(pos.step);
            if fused.is_none() {
                opt.step(&grads, &lrs).map_err(run_err)?;
            }
            drop(grads);
            alloc_guard.step_end();
            let lrs = opt.applied_lrs(&lrs);
            pos.step += 1;
            step_times.push(step_start.elapsed().as_secs_f64());
            step_clock = None;
            let avg = pos.epoch_loss_sum / pos.epoch_loss_count.max(1) as f64;
            ui.step(pos.step, lv, *lrs.last().unwrap_or(&0.0));
            if let Some(w) = &mut log {
                let mut vals: Vec<(String, f32)> = vec![
                    ("loss/current".into(), lv as f32),
                    ("loss/average".into(), avg as f32),
                ];
                for (g, lr) in opt.groups.iter().zip(&lrs) {
                    let tag = match g.name.as_str() {
                        "unet" => "lr/unet".to_string(),
                        "text_encoder" => "lr/textencoder".to_string(),
                        other => format!("lr/{other}"),
                    };
                    vals.push((tag, *lr as f32));
                }
                let vals: Vec<(&str, f32)> = vals.iter().map(|(k, v)| (k.as_str(), *v)).collect();
                w.scalars(pos.step, &vals).map_err(run_err)?;
            }
            let last_step = pos.step >= total;
            if let Some(n) = o.save_every_n_steps
                && n > 0
                && pos.step % n == 0
                && !last_step
            {
                let p = cx.file(&format!("{}-step{:08}", o.output_name, pos.step));
                save_point(&cx, &opt, &pos, &p)?;
                ui.message(&format!("saved {}", p.display()));
                saved.push(p);
                prune(o, cx.method.extension(), true)?;
            }
            if let Some(n) = o.sample_every_n_steps
                && n > 0
                && pos.step % n == 0
                && !prompts.is_empty()
            {
                let suffix = format!("{:06}", pos.step);
                sample_files.extend(render(&cx, o, &prompts, &suffix, seed)?);
                sampled_at = pos.step;
            }
            if last_step {
                break;
            }
        }
        let finished = pos.step >= total;
        if pos.batch_in_epoch < n_batches {
            // The run ended inside this epoch.
            break 'epochs;
        }
        // End of an epoch.
        let epoch_no = pos.epoch + 1;
        let avg = pos.epoch_loss_sum / pos.epoch_loss_count.max(1) as f64;
        if let Some(w) = &mut log {
            w.scalars(epoch_no, &[("loss/epoch", avg as f32)])
                .map_err(run_err)?;
        }
        pos.epoch += 1;
        pos.batch_in_epoch = 0;
        pos.epoch_loss_sum = 0.0;
        pos.epoch_loss_count = 0;
        if let Some(n) = o.save_every_n_epochs
            && n > 0
            && epoch_no % n == 0
            && !finished
        {
            let p = cx.file(&format!("{}-{:06}", o.output_name, epoch_no));
            save_point(&cx, &opt, &pos, &p)?;
            ui.message(&format!("saved {}", p.display()));
            saved.push(p);
            prune(o, cx.method.extension(), false)?;
        }
        if let Some(n) = o.sample_every_n_epochs
            && n > 0
            && epoch_no % n == 0
            && !prompts.is_empty()
        {
            let suffix = format!("e{epoch_no:06}");
            sample_files.extend(render(&cx, o, &prompts, &suffix, seed)?);
            sampled_at = pos.step;
        }
    }
    // Sample images of the final weights when sampling was asked for (kohya does too).
    let cadence = o.sample_every_n_epochs.is_some() || o.sample_every_n_steps.is_some();
    if cadence && !prompts.is_empty() && sampled_at != pos.step {
        let suffix = format!("{:06}", pos.step);
        sample_files.extend(render(&cx, o, &prompts, &suffix, seed)?);
    }
    let final_path = cx.file(&o.output_name);
    save_point(&cx, &opt, &pos, &final_path)?;
    cx.method
        .finish(&final_path, &cx.facts(pos.epoch, pos.step), save_dtype(o))
        .map_err(run_err)?;
    saved.push(final_path.clone());
    ui.finish();
    let plan = cx.plan.clone();
    let grid = match cx.grid.take() {
        Some(spec) => {
            // Free the training state first. An adapter's grid renders on the base model
            // already loaded (the adapter taken off); a DreamBooth run's checkpoints load
            // per column.
            drop((opt, cache, checkpointing, fused));
            let Ctx { models, method, .. } = cx;
            drop(method);
            let reuse = (spec.columns != super::grid::Columns::Model).then_some(models);
            Some(render_grid(o, &spec, &saved, seed, reuse, &dev)?)
        }
        None => None,
    };
    Ok(Report {
        plan,
        output: Some(final_path),
        saved,
        samples: sample_files,
        steps: pos.step,
        final_loss: last_loss,
        seconds: t0.elapsed().as_secs_f64(),
        seconds_per_step: {
            let t = if step_times.len() > 1 {
                &step_times[1..]
            } else {
                &step_times[..]
            };
            (!t.is_empty()).then(|| t.iter().sum::<f64>() / t.len() as f64)
        },
        step_seconds: step_times,
        latent_images_per_second: latent_rate,
        log_dir,
        grid,
    })
}

/// The `--grid-prompt` grid of `saved` (those still there), on `models` when given (the
/// base model the run loaded) or loading the model of each column.
fn render_grid(
    o: &TrainOptions,
    spec: &super::grid::Spec,
    saved: &[PathBuf],
    seed: u64,
    models: Option<Models>,
    dev: &Device,
) -> Result<crate::grid::Outcome, TrainError> {
    let failed = |e: String| {
        run_err(format!(
            "grid: {e} (training finished; the saves are written)"
        ))
    };
    let engine = crate::grid::engine::EngineOptions {
        dtype: dtype(o.mixed_precision),
        device: dev.clone(),
        prediction: o.prediction_override(),
    };
    let saves = super::grid::existing(saved);
    let job = super::grid::job(o, spec, &saves, seed, engine.clone()).map_err(failed)?;
    let mut e = crate::grid::engine::Engine::new(engine);
    if let Some(m) = models {
        e.adopt(&o.model, m).map_err(|x| failed(format!("{x:#}")))?;
    }
    crate::grid::run_with(&job, &mut e).map_err(|x| failed(format!("{x:#}")))
}

/// Save the LoRA at `path`, and with `--save-state` its state folder beside it
/// (`NAME-000004-state`, or `NAME-state` for the final save).
fn save_point(cx: &Ctx, opt: &Optimizer, pos: &StateInfo, path: &Path) -> Result<(), TrainError> {
    let o = cx.o;
    // A save inside an epoch reports the epochs finished so far, as kohya does.
    cx.save_output(path, pos.epoch, pos.step)?;
    if o.save_state {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let dir = o.out.join(format!("{stem}-state"));
        let adapter = cx.method.state_tensors().map_err(run_err)?;
        let moments = opt.state_tensors().map_err(run_err)?;
        state::save(&dir, pos, &adapter, &moments).map_err(run_err)?;
    }
    Ok(())
}

/// `--save-last-n`: remove periodic saves (and their states) beyond the newest N, after the
/// new one is complete.
fn prune(o: &TrainOptions, ext: &str, step_files: bool) -> Result<(), TrainError> {
    let Some(keep) = o.save_last_n else {
        return Ok(());
    };
    let all = periodic_saves(&o.out, &o.output_name, ext, step_files);
    if all.len() <= keep {
        return Ok(());
    }
    for (_, p) in &all[..all.len() - keep] {
        std::fs::remove_file(p).map_err(|e| run_err(format!("{}: {e}", p.display())))?;
        if let Some(stem) = p.file_stem() {
            let st = o.out.join(format!("{}-state", stem.to_string_lossy()));
            if st.is_dir() {
                let _ = std::fs::remove_dir_all(st);
            }
        }
    }
    Ok(())
}

fn render(
    cx: &Ctx,
    o: &TrainOptions,
    prompts: &[SamplePrompt],
    suffix: &str,
    seed: u64,
) -> Result<Vec<PathBuf>, TrainError> {
    samples::render(
        &cx.models,
        prompts,
        sampler_kind(o.sample_sampler),
        cx.clip_skip(),
        &o.out.join("sample"),
        &o.output_name,
        suffix,
        seed,
    )
    .map_err(run_err)
}
