//! Renders cells on one loaded model: a checkpoint is loaded when a cell needs another
//! one, a LoRA is merged into the weights and taken out again by restoring the remembered
//! weights (exact), embeddings are given to the text encoder and hypernetworks hooked into
//! the UNet's attention and taken off again (no reload), and the guidance conditioning of
//! a prompt pair is computed once per text-encoder state.

use super::facts;
use super::plan::Settings;
use crate::adapters::embedding::{self, DirEmbeddings, Embedding};
use crate::adapters::hypernetwork::Hypernetwork;
use crate::adapters::swap::WeightSnapshot;
use crate::model::loader::{self, LoadOptions};
use crate::model::pipeline::{self, Models, Request, SeededNoise};
use crate::model::placeholders::Placeholders;
use crate::model::schedule::Prediction;
use crate::model::tokenizer::ClipTokenizer;
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

/// The text encoder's embeddings: (`--embeddings` folder, axis file, its name).
type TiState = (Option<PathBuf>, Option<PathBuf>, Option<String>);

struct Loaded {
    path: PathBuf,
    models: Models,
    snapshot: WeightSnapshot,
    /// The merged adapter and its weight.
    adapter: Option<(PathBuf, f64)>,
    /// The attached embeddings (all `None` for none).
    ti: TiState,
    /// The `--embeddings` folder read for this text encoder's width.
    dir: Option<(PathBuf, DirEmbeddings)>,
    /// The hooked hypernetwork and its strength.
    hn: Option<(PathBuf, f64)>,
}

/// Counters of the work done (how much loading and encoding the grid saved).
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Work {
    pub model_loads: usize,
    pub adapter_merges: usize,
    pub prompt_encodes: usize,
    /// Embedding sets given to the text encoder.
    pub embedding_attaches: usize,
    /// Hypernetworks hooked into the UNet (one per file and strength).
    pub hypernetwork_attaches: usize,
    pub cells: usize,
}

/// The renderer.
pub struct Engine {
    opts: EngineOptions,
    loaded: Option<Loaded>,
    contexts: HashMap<String, Tensor>,
    /// Embedding-axis files, read once.
    embeddings: HashMap<PathBuf, Embedding>,
    /// Hypernetworks, read once onto the device.
    hypernetworks: HashMap<PathBuf, Hypernetwork>,
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
            embeddings: HashMap::new(),
            hypernetworks: HashMap::new(),
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
                ti: (None, None, None),
                dir: None,
                hn: None,
            });
        }
        Ok(self.loaded.as_mut().expect("loaded above"))
    }

    /// Render with `models`, loaded from `path` with this engine's options (e.g. the base
    /// model a trainer just used), instead of loading it again. Whatever is attached to it
    /// is taken off first: low-rank deltas, hypernetwork hooks, textual-inversion vectors,
    /// gradient checkpointing; its layer weights must be the checkpoint's own.
    pub fn adopt(&mut self, path: &Path, mut models: Models) -> anyhow::Result<()> {
        self.loaded = None;
        self.contexts.clear();
        crate::adapters::swap::bare(&mut models.unet, &mut models.clip)
            .with_context(|| format!("{}: cannot take the adapters off", path.display()))?;
        let snapshot = WeightSnapshot::take(&mut models.unet, &mut models.clip);
        self.loaded = Some(Loaded {
            path: path.to_path_buf(),
            models,
            snapshot,
            adapter: None,
            ti: (None, None, None),
            dir: None,
            hn: None,
        });
        Ok(())
    }

    /// Load the model of `s`, merge its LoRA (or none) at its weight, give the text
    /// encoder its embeddings and hook its hypernetwork (or none) at its strength.
    pub fn prepare(&mut self, s: &Settings) -> anyhow::Result<()> {
        self.lora(s)?;
        self.text_embeddings(s)?;
        self.hypernetwork(s)
    }

    fn lora(&mut self, s: &Settings) -> anyhow::Result<()> {
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

    /// Give the text encoder the `--embeddings` folder's files and the embedding axis'
    /// file under its name (replacing what it had); a file of the folder that could not
    /// be read for this model is an error when the cell's prompts call it.
    fn text_embeddings(&mut self, s: &Settings) -> anyhow::Result<()> {
        let l = self.loaded.as_mut().expect("loaded by lora()");
        let width = l.models.clip.config.width;
        if let Some(d) = &s.embeddings {
            if l.dir.as_ref().is_none_or(|(p, _)| p != d) {
                l.dir = Some((d.clone(), embedding::scan_dir(d, Some(width), &[])?));
            }
            let (_, found) = l.dir.as_ref().expect("read above");
            let tok = ClipTokenizer::shared();
            for e in &found.skipped {
                let name = facts::stem(&e.file);
                if [&s.prompt, &s.negative]
                    .iter()
                    .any(|p| Placeholders::mentions(tok, p, &name))
                {
                    bail!("{e}");
                }
            }
        }
        let want: TiState = (
            s.embeddings.clone(),
            s.embedding.clone(),
            s.embedding.as_ref().and(s.embedding_name.clone()),
        );
        if l.ti == want {
            return Ok(());
        }
        let axis = match (&s.embedding, &s.embedding_name) {
            (Some(f), Some(name)) => {
                if !self.embeddings.contains_key(f) {
                    self.embeddings.insert(f.clone(), Embedding::load(f)?);
                }
                Some((&self.embeddings[f], name.as_str()))
            }
            _ => None,
        };
        let dir = match (&s.embeddings, &l.dir) {
            (Some(_), Some((_, found))) => found.embeddings.as_slice(),
            _ => &[],
        };
        let list = facts::cell_embeddings(dir, axis, s.embedding_name.as_deref());
        embedding::attach(&mut l.models.clip, &list)?;
        l.ti = want;
        self.work.embedding_attaches += 1;
        Ok(())
    }

    /// Hook the hypernetwork of `s` into the UNet at its strength (taking off the one
    /// there was), or none.
    fn hypernetwork(&mut self, s: &Settings) -> anyhow::Result<()> {
        let l = self.loaded.as_mut().expect("loaded by lora()");
        let want = s.hypernetwork.clone().map(|f| (f, s.strength));
        if l.hn == want {
            return Ok(());
        }
        if let Some((f, _)) = l.hn.take()
            && let Some(h) = self.hypernetworks.get(&f)
        {
            h.detach(&mut l.models.unet);
        }
        if let Some((f, strength)) = &want {
            if !self.hypernetworks.contains_key(f) {
                let h = Hypernetwork::load(f, &self.opts.device).map_err(anyhow::Error::msg)?;
                self.hypernetworks.insert(f.clone(), h);
            }
            let h = &self.hypernetworks[f];
            h.fits(&l.models.unet.config, f)
                .map_err(anyhow::Error::msg)?;
            h.attach(&mut l.models.unet, *strength);
            self.work.hypernetwork_attaches += 1;
        }
        l.hn = want;
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
        // The hypernetwork acts in the UNet: the conditioning does not depend on it.
        let key = serde_json::to_string(&(&l.adapter, &l.ti, &s.prompt, &s.negative, s.clip_skip))?;
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
