//! `sdkit sample`: text to image from a checkpoint, PNGs carrying webui's `parameters`.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::formats::png_params::{self, GenParams};
use crate::model::arch::Prediction;
use crate::model::loader::{self, LoadOptions};
use crate::model::pipeline::{self, Models, Request, SeededNoise};
use crate::model::samplers::SamplerKind;
use crate::train::options::DeviceArg;
use crate::util::progress;

/// Sampler names on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SamplerArg {
    Ddim,
    EulerA,
    #[value(name = "dpm++2m-karras")]
    #[serde(rename = "dpm++2m-karras")]
    DpmPp2mKarras,
}

impl SamplerArg {
    pub fn kind(self) -> SamplerKind {
        match self {
            SamplerArg::Ddim => SamplerKind::Ddim,
            SamplerArg::EulerA => SamplerKind::EulerA,
            SamplerArg::DpmPp2mKarras => SamplerKind::DpmPp2mKarras,
        }
    }
}

/// Compute precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
#[command(after_help = "Examples:\n  \
    sdkit sample --model v1-5-pruned-emaonly.safetensors --prompt \"a photo of a cat\" --seed 1\n  \
    sdkit sample --model sd2-diffusers/ --prompt \"(red hair:1.2), portrait\" --negative lowres \\\n    \
    --sampler dpm++2m-karras --steps 25 --width 768 --height 768 --count 4 --out samples/\n  \
    sdkit sample --model model.safetensors --prompt \"ohwx, portrait\" --lora lora/ron.safetensors:0.8\n  \
    sdkit sample --model model.safetensors --prompt \"a photo of mycat\" --embeddings embeddings/\n  \
    sdkit sample --model model.safetensors --prompt \"a castle\" --hypernetwork hn/ink.pt:0.6\n\n\
Checkpoints: a diffusers folder, a single-file .safetensors or a .ckpt (SD 1.x / 2.x).\n\
A <name>.yaml next to a single file is read like webui does (parameterization: v).")]
pub struct SampleArgs {
    /// Checkpoint: diffusers folder, .safetensors or .ckpt.
    #[arg(long, value_name = "CKPT")]
    pub model: Option<PathBuf>,
    /// Prompt (webui syntax: (x), (x:1.3), [x], BREAK; long prompts use 75-token chunks).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// First seed (image i uses seed + i; the initial latent is torch's CPU randn, as
    /// webui with the CPU RNG source); random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long, value_enum, default_value_t = SamplerArg::EulerA)]
    pub sampler: SamplerArg,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// Number of images.
    #[arg(long, default_value_t = 1)]
    pub count: usize,
    /// Use the output of the n-th last text-encoder layer (webui "Clip skip"; SD2 files
    /// already use the penultimate OpenCLIP block at 1).
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Override the detected prediction type.
    #[arg(long, value_enum)]
    pub prediction: Option<Prediction>,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// A kohya LoRA / LoCon file to apply, with an optional weight (webui's
    /// `<lora:name:weight>`); repeatable. Keys that match no layer are listed.
    #[arg(long, value_name = "FILE[:WEIGHT]")]
    pub lora: Vec<String>,
    /// A folder of textual-inversion embeddings (webui's `embeddings/`): every
    /// .safetensors / .pt / .bin file in it is used by writing its file stem in the prompt.
    #[arg(long, value_name = "DIR")]
    pub embeddings: Option<PathBuf>,
    /// An AUTOMATIC1111 hypernetwork `.pt` (webui's or `sdkit train hypernetwork`'s) with
    /// an optional strength (webui's `<hypernet:name:strength>`, default 1).
    #[arg(long, value_name = "FILE[:STRENGTH]")]
    pub hypernetwork: Option<String>,
    /// Where to compute (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Output folder (PNG files named like webui: 00000-SEED.png).
    #[arg(long, default_value = "samples")]
    pub out: PathBuf,
    /// Machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for SampleArgs {
    fn default() -> Self {
        Self {
            model: None,
            prompt: None,
            negative: String::new(),
            steps: 20,
            cfg: 7.0,
            seed: None,
            sampler: SamplerArg::EulerA,
            width: 512,
            height: 512,
            count: 1,
            clip_skip: 1,
            prediction: None,
            precision: Precision::F32,
            lora: vec![],
            embeddings: None,
            hypernetwork: None,
            device: DeviceArg::Cpu,
            out: "samples".into(),
            json: false,
            quiet: false,
        }
    }
}

#[derive(Serialize)]
struct Report {
    model: PathBuf,
    arch: &'static str,
    prediction: Prediction,
    images: Vec<PathBuf>,
    seeds: Vec<u64>,
    seconds: f64,
    loras: Vec<AppliedLora>,
    /// Embedding names found in the prompts.
    embeddings_used: Vec<String>,
    hypernetwork: Option<AppliedHypernetwork>,
}

#[derive(Serialize)]
struct AppliedHypernetwork {
    file: PathBuf,
    strength: f64,
    /// The file's context widths that this model's attention layers have.
    widths: Vec<usize>,
    /// webui's infotext values: `Hypernet` (file stem), `Hypernet hash`.
    name: String,
    hash: String,
}

#[derive(Serialize)]
struct AppliedLora {
    file: PathBuf,
    weight: f64,
    modules: usize,
    /// Keys of the file that match no layer of this model (or a kind sdkit does not apply).
    unknown: Vec<String>,
}

/// `FILE` or `FILE:WEIGHT` (the weight is what follows the last `:` when it is a number).
fn parse_lora(arg: &str) -> (PathBuf, f64) {
    if let Some((f, w)) = arg.rsplit_once(':')
        && let Ok(w) = w.parse::<f64>()
    {
        return (PathBuf::from(f), w);
    }
    (PathBuf::from(arg), 1.0)
}

/// Merge every `--lora` into the model; webui's `Lora hashes` infotext value.
fn apply_loras(models: &mut Models, args: &[String]) -> anyhow::Result<(Vec<AppliedLora>, String)> {
    let mut applied = Vec::new();
    let mut hashes = Vec::new();
    for a in args {
        let (file, weight) = parse_lora(a);
        let (tensors, _) =
            crate::formats::safetensors::read_with_metadata(&file).map_err(anyhow::Error::msg)?;
        let r =
            crate::adapters::lora::merge_into(&tensors, &mut models.unet, &mut models.clip, weight)
                .with_context(|| format!("{}: cannot apply", file.display()))?;
        if r.modules == 0 {
            bail!(
                "{}: no module of this file matches the model (not a kohya LoRA for SD 1.x / 2.x?)",
                file.display()
            );
        }
        for k in r.unknown.iter().take(20) {
            eprintln!("warning: {}: key not applied: {k}", file.display());
        }
        if r.unknown.len() > 20 {
            eprintln!(
                "warning: {}: {} more keys not applied",
                file.display(),
                r.unknown.len() - 20
            );
        }
        let bytes =
            std::fs::read(&file).with_context(|| format!("{}: cannot read", file.display()))?;
        let (h, _) = crate::formats::kohya_lora::addnet_hashes(&bytes);
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        hashes.push(format!("{name}: {}", &h[..12]));
        applied.push(AppliedLora {
            file,
            weight,
            modules: r.modules,
            unknown: r.unknown,
        });
    }
    Ok((applied, hashes.join(", ")))
}

/// Attach every embedding of `dir` to the text encoder; the names the prompts use and
/// webui's `TI hashes` value.
fn attach_embeddings(
    models: &mut Models,
    dir: &Path,
    prompt: &str,
    negative: &str,
    quiet: bool,
) -> anyhow::Result<(Vec<String>, String)> {
    use crate::adapters::embedding;
    let prompts = [prompt, negative];
    let found = embedding::load_dir(dir, models.clip.config.width, &prompts)?;
    if !quiet {
        for s in &found.skipped {
            eprintln!("warning: skipped: {s}");
        }
    }
    embedding::attach(&mut models.clip, &found.embeddings)?;
    let tok = crate::model::tokenizer::ClipTokenizer::shared();
    let mut used: Vec<String> = Vec::new();
    for p in prompts {
        for e in models.clip.placeholders.used_in_prompt(tok, p) {
            if !used.contains(&e.name) {
                used.push(e.name.clone());
            }
        }
    }
    let hashes = embedding::ti_hashes(&models.clip, &found.embeddings, &prompts);
    Ok((used, hashes))
}

/// Attach `--hypernetwork FILE[:STRENGTH]` to the UNet.
fn apply_hypernetwork(
    models: &mut Models,
    arg: &str,
    device: &Device,
) -> anyhow::Result<AppliedHypernetwork> {
    use crate::adapters::hypernetwork::Hypernetwork;
    let (file, strength) = parse_lora(arg);
    let hn = Hypernetwork::load(&file, device).map_err(anyhow::Error::msg)?;
    let widths = hn
        .fits(&models.unet.config, &file)
        .map_err(anyhow::Error::msg)?;
    hn.attach(&mut models.unet, strength);
    let hash = png_params::short_hash(&file)
        .with_context(|| format!("{}: cannot hash", file.display()))?;
    let name = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(AppliedHypernetwork {
        file,
        strength,
        widths,
        name,
        hash,
    })
}

/// The next free webui-style index in `dir` (files named `NNNNN-…`).
fn next_index(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().into_string().ok()?;
                    name.split('-').next()?.parse::<usize>().ok()
                })
                .map(|i| i + 1)
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

pub(crate) fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    // webui seeds are 32-bit
    (t ^ (std::process::id() as u64).rotate_left(32)) % 4_294_967_295
}

pub fn run(a: SampleArgs) -> anyhow::Result<i32> {
    let Some(model) = a.model.clone() else {
        bail!(
            "give --model CKPT (a diffusers folder, .safetensors, .ckpt or a hub repo owner/repo)"
        );
    };
    let model = crate::hub::resolve::checkpoint(&model, a.quiet || a.json)?;
    let Some(prompt) = a.prompt.clone() else {
        bail!("give --prompt TEXT");
    };
    if a.steps == 0 || a.count == 0 || a.clip_skip == 0 {
        bail!("--steps, --count and --clip-skip must be at least 1");
    }
    let dtype = match a.precision {
        Precision::F32 => DType::F32,
        Precision::F16 => DType::F16,
        Precision::Bf16 => DType::BF16,
    };
    if dtype == DType::BF16 && a.device == DeviceArg::Cpu {
        bail!(
            "--precision bf16 needs --device cuda: candle has no bf16 matrix product on the CPU (use f32 or f16)"
        );
    }
    let started = std::time::Instant::now();
    let device = crate::train::run::device(a.device)?;
    let opts = LoadOptions {
        dtype,
        device: device.clone(),
        prediction: a.prediction,
    };
    let ck = loader::open(&model, &opts)?;
    let mut models = Models::new(ck)?;
    let (loras, lora_hashes) = apply_loras(&mut models, &a.lora)?;
    let (embeddings_used, ti_hashes) = match &a.embeddings {
        Some(dir) => attach_embeddings(&mut models, dir, &prompt, &a.negative, a.quiet)?,
        None => (vec![], String::new()),
    };
    let hypernetwork = match &a.hypernetwork {
        Some(h) => Some(apply_hypernetwork(&mut models, h, &device)?),
        None => None,
    };
    let mut extra = Vec::new();
    if !ti_hashes.is_empty() {
        extra.push(("TI hashes".to_string(), ti_hashes.clone()));
    }
    if !lora_hashes.is_empty() {
        extra.push(("Lora hashes".to_string(), lora_hashes.clone()));
    }
    if let Some(h) = &hypernetwork {
        extra.extend(crate::adapters::hypernetwork::infotext(
            &h.name, &h.hash, h.strength,
        ));
    }
    let shape = models.latent_shape(a.width, a.height)?;
    let (hash, name) = png_params::model_hash_and_name(&model)
        .with_context(|| format!("{}: cannot hash", model.display()))?;
    crate::util::atomic::create_dir_all(&a.out)
        .with_context(|| format!("{}: cannot create the output folder", a.out.display()))?;
    let first_seed = a.seed.unwrap_or_else(random_seed);
    let req = Request {
        prompt: prompt.clone(),
        negative: a.negative.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler: a.sampler.kind(),
        width: a.width,
        height: a.height,
        clip_skip: a.clip_skip,
    };
    let hidden = a.quiet || a.json;
    let bar = progress::bar((a.steps * a.count) as u64, "sample", hidden);
    let mut index = next_index(&a.out);
    let (mut images, mut seeds) = (Vec::new(), Vec::new());
    for i in 0..a.count {
        let seed = first_seed.wrapping_add(i as u64);
        let mut rng = SeededNoise::new(seed);
        let noise = rng.latent(shape, &Device::Cpu)?.to_device(&device)?;
        let img = pipeline::generate(&models, &req, &noise, &mut rng, &mut || bar.inc(1))?;
        let rgb = pipeline::to_rgb8(&img)?;
        let params = GenParams {
            prompt: prompt.clone(),
            negative: a.negative.clone(),
            steps: a.steps,
            sampler: req.sampler.a1111_name().to_string(),
            cfg_scale: a.cfg,
            seed,
            width: a.width,
            height: a.height,
            model_hash: hash.clone(),
            model: Some(name.clone()),
            clip_skip: a.clip_skip,
            extra: extra.clone(),
        };
        let path = a.out.join(format!("{index:05}-{seed}.png"));
        index += 1;
        png_params::write_png(
            &path,
            &rgb,
            a.width as u32,
            a.height as u32,
            &params.to_infotext(),
        )
        .with_context(|| format!("{}: cannot write", path.display()))?;
        images.push(path);
        seeds.push(seed);
    }
    bar.finish_and_clear();
    let report = Report {
        model,
        arch: models.info.arch.name(),
        prediction: models.info.prediction,
        images,
        seeds,
        seconds: started.elapsed().as_secs_f64(),
        loras,
        embeddings_used,
        hypernetwork,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else if !a.quiet {
        for p in &report.images {
            println!("{}", p.display());
        }
        println!(
            "{} image(s), {} {:?}, {:.1}s",
            report.images.len(),
            report.arch,
            report.prediction,
            report.seconds
        );
    }
    Ok(0)
}
