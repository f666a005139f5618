//! Renders cells on one loaded model: a checkpoint is loaded when a cell needs another
//! one, a LoRA is merged into the weights and taken out again by restoring the remembered
//! weights (exact), and the guidance conditioning of a prompt pair is computed once per
//! text-encoder state.

use super::plan::Settings;
use crate::adapters::swap::WeightSnapshot;
use crate::formats::png_params::{self, GenParams};
use crate::model::loader::{self, LoadOptions};
use crate::model::pipeline::{self, Models, Request, SeededNoise};
use crate::model::schedule::Prediction;
use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How models are loaded.
#[derive(Clone, Debug)]
pub struct EngineOptions {
    pub dtype: DType,
    pub device: Device,
    pub prediction: Option<Prediction>,
}

/// What the infotext of a cell needs to know about its files.
#[derive(Clone, Debug)]
pub struct FileFacts {
    /// Checkpoint path -> (webui short hash, name).
    pub models: HashMap<PathBuf, (Option<String>, String)>,
    /// LoRA path -> `name: hash12` (webui's `Lora hashes` entry).
    pub loras: HashMap<PathBuf, String>,
}

/// Hash every checkpoint and check and hash every LoRA of the cells, before rendering:
/// a missing, unreadable or non-safetensors file is an error naming it.
pub fn file_facts<'a>(cells: impl Iterator<Item = &'a Settings>) -> anyhow::Result<FileFacts> {
    let mut f = FileFacts {
        models: HashMap::new(),
        loras: HashMap::new(),
    };
    for s in cells {
        if !f.models.contains_key(&s.model) {
            let h = png_params::model_hash_and_name(&s.model)
                .with_context(|| format!("{}: cannot read", s.model.display()))?;
            f.models.insert(s.model.clone(), h);
        }
        if let Some(l) = &s.lora
            && !f.loras.contains_key(l)
        {
            f.loras.insert(l.clone(), lora_hash(l)?);
        }
    }
    Ok(f)
}

fn lora_hash(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if let Err(e) = safetensors::SafeTensors::read_metadata(&bytes) {
        bail!("{}: not a safetensors file: {e}", path.display());
    }
    let (h, _) = crate::formats::kohya_lora::addnet_hashes(&bytes);
    Ok(format!("{}: {}", stem(path), &h[..12]))
}

fn stem(p: &Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// webui's infotext of a cell: the prompt carries `<lora:name:weight>` as webui's own
/// would, and `Lora hashes` names the file.
pub fn cell_params(s: &Settings, facts: &FileFacts) -> GenParams {
    let (hash, name) = facts.models.get(&s.model).cloned().unwrap_or_default();
    let mut prompt = s.prompt.clone();
    let mut extra = vec![];
    if let Some(l) = &s.lora {
        let w = super::axes::fmt_float(s.weight);
        prompt = format!("{prompt} <lora:{}:{w}>", stem(l));
        if let Some(h) = facts.loras.get(l) {
            extra.push(("Lora hashes".to_string(), h.clone()));
        }
    }
    GenParams {
        prompt,
        negative: s.negative.clone(),
        steps: s.steps,
        sampler: s.sampler.a1111_name().to_string(),
        cfg_scale: s.cfg,
        seed: s.seed,
        width: s.width,
        height: s.height,
        model_hash: hash,
        model: Some(name),
        clip_skip: s.clip_skip,
        extra,
    }
}

struct Loaded {
    path: PathBuf,
    models: Models,
    snapshot: WeightSnapshot,
    /// The merged adapter and its weight.
    adapter: Option<(PathBuf, f64)>,
}

/// Counters of the work done (how much loading and encoding the grid saved).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Work {
    pub model_loads: usize,
    pub adapter_merges: usize,
    pub prompt_encodes: usize,
    pub cells: usize,
}

/// The renderer.
pub struct Engine {
    opts: EngineOptions,
    loaded: Option<Loaded>,
    contexts: HashMap<String, Tensor>,
    pub work: Work,
    /// Files whose keys did not all match the model (told once per file).
    pub warnings: Vec<String>,
    warned: std::collections::HashSet<PathBuf>,
}

/// Cached conditionings kept at most (each is small: 2 x 77 x width floats per chunk).
const MAX_CONTEXTS: usize = 256;

impl Engine {
    pub fn new(opts: EngineOptions) -> Self {
        Self {
            opts,
            loaded: None,
            contexts: HashMap::new(),
            work: Work::default(),
            warnings: Vec::new(),
            warned: Default::default(),
        }
    }

    /// The checkpoint of `s`, loaded if another one (or none) is.
    fn model(&mut self, path: &Path) -> anyhow::Result<&mut Loaded> {
        if self.loaded.as_ref().is_none_or(|l| l.path != path) {
            // Free the old model before loading the next.
            self.loaded = None;
            self.contexts.clear();
            let opts = LoadOptions {
                dtype: self.opts.dtype,
                device: self.opts.device.clone(),
                prediction: self.opts.prediction,
            };
            let ck = loader::open(path, &opts)?;
            let mut models = Models::new(ck)?;
            let snapshot = WeightSnapshot::take(&mut models.unet, &mut models.clip);
            self.work.model_loads += 1;
            self.loaded = Some(Loaded {
                path: path.to_path_buf(),
                models,
                snapshot,
                adapter: None,
            });
        }
        Ok(self.loaded.as_mut().expect("loaded above"))
    }

    /// Load the model of `s` and merge its adapter (or none) at its weight.
    pub fn prepare(&mut self, s: &Settings) -> anyhow::Result<()> {
        self.model(&s.model)?;
        let l = self.loaded.as_mut().expect("loaded above");
        let want = s.lora.clone().map(|p| (p, s.weight));
        if l.adapter == want {
            return Ok(());
        }
        if l.adapter.is_some() {
            l.snapshot.restore(&mut l.models.unet, &mut l.models.clip);
            l.adapter = None;
        }
        if let Some((file, weight)) = &want {
            let (tensors, _) = crate::formats::safetensors::read_with_metadata(file)
                .map_err(anyhow::Error::msg)?;
            let m = &mut l.models;
            let r = crate::adapters::lora::merge_into(&tensors, &mut m.unet, &mut m.clip, *weight)
                .with_context(|| format!("{}: cannot apply", file.display()));
            let r = match r {
                Ok(r) if r.modules > 0 => r,
                Ok(_) => {
                    l.snapshot.restore(&mut m.unet, &mut m.clip);
                    bail!(
                        "{}: no module of this file matches {} (not a kohya LoRA for SD 1.x / 2.x?)",
                        file.display(),
                        s.model.display()
                    )
                }
                Err(e) => {
                    l.snapshot.restore(&mut m.unet, &mut m.clip);
                    return Err(e);
                }
            };
            if !r.unknown.is_empty() && self.warned.insert(file.clone()) {
                self.warnings.push(format!(
                    "{}: {} key(s) not applied, e.g. {}",
                    file.display(),
                    r.unknown.len(),
                    r.unknown[0]
                ));
            }
            l.adapter = want;
            self.work.adapter_merges += 1;
        }
        Ok(())
    }

    /// Time one guided UNet step and one VAE decode at the size of `s` (seconds), for an
    /// estimate; the model is loaded first.
    pub fn time_step(&mut self, s: &Settings) -> anyhow::Result<(f64, f64)> {
        let mut one = s.clone();
        one.steps = 1;
        self.prepare(&one)?;
        let t = std::time::Instant::now();
        self.render(&one, &mut || {})?;
        let total = t.elapsed().as_secs_f64();
        let m = &self.loaded.as_ref().expect("prepared").models;
        let shape = m.latent_shape(s.width, s.height)?;
        let z = Tensor::zeros(shape, DType::F32, &self.opts.device)?;
        let t = std::time::Instant::now();
        let _ = m.vae.decode(&z.to_dtype(m.unet.dtype())?)?;
        let decode = t.elapsed().as_secs_f64();
        Ok(((total - decode).max(0.0), decode))
    }

    /// Render one cell as 8-bit RGB; `on_step` after every UNet step.
    pub fn render(&mut self, s: &Settings, on_step: &mut dyn FnMut()) -> anyhow::Result<Vec<u8>> {
        self.prepare(s)?;
        let req = Request {
            prompt: s.prompt.clone(),
            negative: s.negative.clone(),
            steps: s.steps,
            cfg: s.cfg,
            sampler: s.sampler,
            width: s.width,
            height: s.height,
            clip_skip: s.clip_skip,
        };
        let l = self.loaded.as_ref().expect("prepared");
        let key = serde_json::to_string(&(&l.adapter, &s.prompt, &s.negative, s.clip_skip))?;
        let ctx = match self.contexts.get(&key) {
            Some(c) => c.clone(),
            None => {
                let c = pipeline::guidance_context(&l.models, &req)?;
                self.work.prompt_encodes += 1;
                if self.contexts.len() >= MAX_CONTEXTS {
                    self.contexts.clear();
                }
                self.contexts.insert(key, c.clone());
                c
            }
        };
        let m = &l.models;
        let shape = m.latent_shape(s.width, s.height)?;
        let mut rng = SeededNoise::new(s.seed);
        let noise = rng
            .latent(shape, &Device::Cpu)?
            .to_device(&self.opts.device)?;
        let img = pipeline::generate_with_context(m, &req, &ctx, &noise, &mut rng, on_step)?;
        self.work.cells += 1;
        Ok(pipeline::to_rgb8(&img)?)
    }
}
