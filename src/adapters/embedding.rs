//! Textual-inversion embeddings: `n` vectors of the text encoder's width used by writing
//! the embedding's name (its file stem) in a prompt.
//!
//! Files, read as webui reads them: a `.safetensors` holding a single tensor (kohya's
//! `{"emb_params": [n, w]}`, diffusers' `{token: [n, w]}` or `{token: [w]}`), webui's
//! `.pt` (`string_to_param` with one entry) and diffusers' `learned_embeds.bin`
//! (`{token: tensor}`) through candle's pickle reader. SDXL files (`clip_l` + `clip_g`)
//! are refused. Written: kohya's `emb_params` with SAI modelspec metadata, diffusers'
//! `learned_embeds.safetensors` and webui's `.pt` ([`Embedding::save_pt`]).
//!
//! Use: [`attach`] gives the text encoder the vectors and the names (inference);
//! [`TrainableEmbedding::attach`] makes one embedding's vectors the only trainable
//! tensor (training).

use crate::formats::safetensors::{read_with_metadata, serialize};
use crate::model::clip::ClipTextModel;
use crate::model::grad::no_grad;
use crate::model::placeholders::Placeholders;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::weights::Param;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Tensor key of kohya's files (and webui's reader of single-tensor files).
pub const KOHYA_KEY: &str = "emb_params";

/// A problem with an embedding file or its use; `Display` is one line naming the file.
#[derive(Debug, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct EmbeddingError {
    pub file: PathBuf,
    pub reason: String,
}

fn err(file: &Path, reason: impl Into<String>) -> EmbeddingError {
    EmbeddingError {
        file: file.to_path_buf(),
        reason: reason.into(),
    }
}

/// How to write an embedding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// kohya sd-scripts: `{"emb_params": [n, w]}` plus metadata (webui reads it).
    Kohya,
    /// diffusers: `{name: [n, w]}` (`learned_embeds.safetensors`).
    Diffusers,
}

#[derive(Debug, Clone)]
pub struct Embedding {
    /// The word that calls it in a prompt (file stem).
    pub name: String,
    /// f32 [n, width] on the CPU.
    pub vectors: Tensor,
    /// Where it was read from.
    pub file: Option<PathBuf>,
}

impl Embedding {
    pub fn n(&self) -> usize {
        self.vectors.dims()[0]
    }

    pub fn width(&self) -> usize {
        self.vectors.dims()[1]
    }

    /// Reads an embedding file; the name is its stem.
    pub fn load(path: &Path) -> Result<Self, EmbeddingError> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_lowercase())
            .unwrap_or_default();
        let tensors: Vec<(String, Tensor)> = match ext.as_str() {
            "safetensors" | "sft" => read_with_metadata(path)
                .map_err(|e| err(path, e.trim_start_matches(&format!("{}: ", path.display()))))?
                .0
                .into_iter()
                .collect(),
            "pt" | "bin" => read_pickle(path)?,
            _ => {
                return Err(err(
                    path,
                    "not an embedding file (.safetensors, .pt or .bin)",
                ));
            }
        };
        let vectors = single_tensor(path, tensors)?;
        Ok(Self {
            name,
            vectors,
            file: Some(path.to_path_buf()),
        })
    }

    /// A new embedding of `n` vectors from `init_word`, webui's rule: the word's token
    /// embeddings (no BOS/EOS) `emb`, `vec[i] = emb[i * len / n]`; zeros for an empty word.
    pub fn init(
        clip: &ClipTextModel,
        tok: &ClipTokenizer,
        init_word: &str,
        n: usize,
        name: &str,
    ) -> Result<Self, EmbeddingError> {
        let here = Path::new(name);
        if n == 0 {
            return Err(err(here, "--num-vectors-per-token must be at least 1"));
        }
        let width = clip.config.width;
        let ids = tok.encode(init_word);
        let vectors = if ids.is_empty() {
            Tensor::zeros((n, width), DType::F32, &Device::Cpu)
        } else {
            let pick: Vec<u32> = (0..n).map(|i| ids[i * ids.len() / n]).collect();
            let table = clip.token_embedding.tensor();
            Tensor::new(pick.as_slice(), table.device())
                .and_then(|idx| table.index_select(&idx, 0))
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_device(&Device::Cpu))
        }
        .map_err(|e| err(here, format!("cannot initialise from {init_word:?}: {e}")))?;
        Ok(Self {
            name: name.into(),
            vectors,
            file: None,
        })
    }

    /// Errors unless the vectors are `width` wide (the text encoder's width: 768 SD1,
    /// 1024 SD2).
    pub fn check_width(&self, width: usize) -> Result<(), EmbeddingError> {
        if self.width() == width {
            return Ok(());
        }
        let family = |w: usize| match w {
            768 => " (SD 1.x)",
            1024 => " (SD 2.x)",
            _ => "",
        };
        Err(err(
            self.file.as_deref().unwrap_or(Path::new(&self.name)),
            format!(
                "embedding vectors are {}{} wide, the model's text encoder is {width}{} wide: \
                 made for another model family",
                self.width(),
                family(self.width()),
                family(width)
            ),
        ))
    }

    /// Writes the vectors in `dtype` (atomically). `meta` goes into the header (kohya's
    /// format; see [`kohya_metadata`]); diffusers' files carry none.
    pub fn save(
        &self,
        path: &Path,
        format: FileFormat,
        dtype: DType,
        meta: &BTreeMap<String, String>,
    ) -> Result<(), EmbeddingError> {
        let t = self
            .vectors
            .to_dtype(dtype)
            .and_then(|t| t.contiguous())
            .map_err(|e| err(path, e.to_string()))?;
        let (key, meta) = match format {
            FileFormat::Kohya => (KOHYA_KEY.to_string(), meta.clone()),
            FileFormat::Diffusers => (self.name.clone(), BTreeMap::new()),
        };
        let bytes = serialize(&[(key, t)], &meta).map_err(|e| err(path, e))?;
        crate::util::atomic::write_atomic(path, &bytes)
            .map_err(|e| err(path, format!("cannot write: {e}")))
    }
}

/// What webui's `.pt` holds besides the vectors.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PtMeta {
    /// webui writes the name the file was saved under (`NAME`, or `NAME-500` for the
    /// saves during training); its loader names an embedding by the file stem.
    pub name: String,
    /// Optimizer steps trained.
    pub step: i64,
    /// Short hash of the base model (first 10 hex of its sha256), None when unknown.
    pub sd_checkpoint: Option<String>,
    /// The base model's name (file name without extension).
    pub sd_checkpoint_name: Option<String>,
}

/// The token webui's files record for `*` (CLIP's id of `*`), in `string_to_token`.
pub const WEBUI_STAR_TOKEN: i64 = 265;

impl Embedding {
    /// webui's `.pt` as its `Embedding.save` writes it: `{"string_to_token": {"*": 265},
    /// "string_to_param": {"*": f32 [n, w]}, "name", "step", "sd_checkpoint",
    /// "sd_checkpoint_name"}` (atomically). The vectors are a plain f32 tensor, which
    /// webui's loader and `torch.load(weights_only=True)` take.
    pub fn save_pt(&self, path: &Path, meta: &PtMeta) -> Result<(), EmbeddingError> {
        use crate::formats::torch_pt::{self, Value};
        let t = self
            .vectors
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.contiguous())
            .map_err(|e| err(path, e.to_string()))?;
        let opt = |s: &Option<String>| s.clone().map_or(Value::None, Value::Str);
        let v = Value::Dict(vec![
            (
                Value::str("string_to_token"),
                Value::Dict(vec![(Value::str("*"), Value::Int(WEBUI_STAR_TOKEN))]),
            ),
            (
                Value::str("string_to_param"),
                Value::Dict(vec![(Value::str("*"), Value::Tensor(t))]),
            ),
            (Value::str("name"), Value::str(meta.name.clone())),
            (Value::str("step"), Value::Int(meta.step)),
            (Value::str("sd_checkpoint"), opt(&meta.sd_checkpoint)),
            (
                Value::str("sd_checkpoint_name"),
                opt(&meta.sd_checkpoint_name),
            ),
        ]);
        torch_pt::save(path, &v).map_err(|e| {
            err(
                path,
                e.to_string()
                    .trim_start_matches(&format!("{}: ", path.display()))
                    .to_string(),
            )
        })
    }
}

/// The tensors of a torch pickle embedding: `string_to_param` (webui) or the top-level
/// dict (diffusers' `learned_embeds.bin`).
fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>, EmbeddingError> {
    use candle_core::pickle::read_all_with_key;
    match read_all_with_key(path, Some("string_to_param")) {
        Ok(t) if !t.is_empty() => Ok(t),
        _ => read_all_with_key(path, None).map_err(|e| {
            err(
                path,
                format!("not a torch zip file with tensors (webui .pt or diffusers .bin): {e}"),
            )
        }),
    }
}

/// webui's rule: one tensor, [w] or [n, w]; SDXL pairs are refused.
fn single_tensor(path: &Path, tensors: Vec<(String, Tensor)>) -> Result<Tensor, EmbeddingError> {
    let keys: Vec<String> = tensors.iter().map(|(k, _)| k.clone()).collect();
    let has = |k: &str| keys.iter().any(|x| x == k);
    if has("clip_l") && has("clip_g") {
        return Err(err(
            path,
            "an SDXL embedding (clip_l + clip_g); sdkit runs SD 1.x / 2.x models",
        ));
    }
    let mut tensors = tensors;
    let (key, t) = match tensors.len() {
        1 => tensors.remove(0),
        0 => return Err(err(path, "holds no tensor")),
        n => {
            return Err(err(
                path,
                format!(
                    "holds {n} tensors ({}); an embedding file holds one",
                    keys.join(", ")
                ),
            ));
        }
    };
    let t = match t.rank() {
        1 => t.unsqueeze(0),
        2 => Ok(t),
        _ => {
            return Err(err(
                path,
                format!(
                    "tensor `{key}` has shape {:?}, expected [vectors, width]",
                    t.dims()
                ),
            ));
        }
    }
    .and_then(|t| t.to_dtype(DType::F32))
    .map_err(|e| err(path, e.to_string()))?;
    if t.dims()[0] == 0 || t.dims()[1] == 0 {
        return Err(err(path, format!("tensor `{key}` is empty {:?}", t.dims())));
    }
    Ok(t)
}

/// What kohya's TI script writes into the header: the SAI model spec with the
/// `/textual-inversion` architecture.
pub fn kohya_metadata(
    title: &str,
    arch: crate::model::arch::Arch,
    prediction: crate::model::schedule::Prediction,
    resolution: (usize, usize),
    unix_time: u64,
) -> BTreeMap<String, String> {
    crate::train::metadata::modelspec(
        Some("textual-inversion"),
        title,
        (arch, prediction),
        resolution,
        unix_time,
    )
}

/// Gives `clip` the vectors of `embeddings` and their names (frozen; replaces what was
/// attached before). Every width must be the text encoder's.
pub fn attach(clip: &mut ClipTextModel, embeddings: &[Embedding]) -> Result<(), EmbeddingError> {
    let tok = ClipTokenizer::shared();
    let mut names = Placeholders::new(clip.config.vocab);
    let mut rows = Vec::with_capacity(embeddings.len());
    for e in embeddings {
        let here = e.file.clone().unwrap_or_else(|| PathBuf::from(&e.name));
        e.check_width(clip.config.width)?;
        names
            .add(tok, &e.name, e.n())
            .map_err(|x| err(&here, x.to_string()))?;
        rows.push(e.vectors.clone());
    }
    let table = if rows.is_empty() {
        None
    } else {
        let t = clip.token_embedding.tensor();
        let cat = Tensor::cat(&rows, 0)
            .and_then(|c| c.to_dtype(t.dtype()))
            .and_then(|c| c.to_device(t.device()))
            .map_err(|x| err(Path::new("textual inversion"), x.to_string()))?;
        Some(Param::Frozen(cat))
    };
    clip.set_extra(names, table)
        .map_err(|x| err(Path::new("textual inversion"), x.to_string()))
}

/// One embedding being trained: its vectors are an f32 `Var` read by the text encoder's
/// token lookup; the base table stays frozen.
pub struct TrainableEmbedding {
    pub name: String,
    pub var: Var,
}

impl TrainableEmbedding {
    /// Makes `emb` the text encoder's only extra embedding, trainable. Its name is
    /// registered, so prompts and captions that contain it use the vectors.
    pub fn attach(clip: &mut ClipTextModel, emb: &Embedding) -> Result<Self, EmbeddingError> {
        let here = emb.file.clone().unwrap_or_else(|| PathBuf::from(&emb.name));
        emb.check_width(clip.config.width)?;
        let mut names = Placeholders::new(clip.config.vocab);
        names
            .add(ClipTokenizer::shared(), &emb.name, emb.n())
            .map_err(|x| err(&here, x.to_string()))?;
        let device = clip.token_embedding.tensor().device().clone();
        let var = emb
            .vectors
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&device))
            .and_then(|t| Var::from_tensor(&t))
            .map_err(|x| err(&here, x.to_string()))?;
        clip.set_extra(names, Some(Param::Trainable(var.clone())))
            .map_err(|x| err(&here, x.to_string()))?;
        Ok(Self {
            name: emb.name.clone(),
            var,
        })
    }

    /// The optimizer's variables (just the vectors).
    pub fn vars(&self) -> Vec<Var> {
        vec![self.var.clone()]
    }

    /// The current vectors as an [`Embedding`] (f32, CPU).
    pub fn embedding(&self) -> candle_core::Result<Embedding> {
        // A copy: on the CPU `to_device` would share the Var's storage, and a saved state
        // must not follow later updates.
        let vectors = no_grad(|| self.var.as_tensor().detach().to_device(&Device::Cpu))?.copy()?;
        Ok(Embedding {
            name: self.name.clone(),
            vectors,
            file: None,
        })
    }

    /// Resume state: the vectors in f32 under kohya's key.
    pub fn tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        Ok(vec![(KOHYA_KEY.to_string(), self.embedding()?.vectors)])
    }

    /// Restores what [`tensors`](Self::tensors) gave.
    pub fn load_tensors(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        super::restore_var(
            &self.var,
            tensors,
            KOHYA_KEY,
            "another --num-vectors-per-token?",
        )
    }

    /// Writes the current vectors as webui's `.pt` (see [`Embedding::save_pt`]).
    pub fn save_pt(&self, path: &Path, meta: &PtMeta) -> Result<(), EmbeddingError> {
        self.embedding()
            .map_err(|e| err(path, e.to_string()))?
            .save_pt(path, meta)
    }

    /// Writes the current vectors (see [`Embedding::save`]).
    pub fn save(
        &self,
        path: &Path,
        format: FileFormat,
        dtype: DType,
        meta: &BTreeMap<String, String>,
    ) -> Result<(), EmbeddingError> {
        self.embedding()
            .map_err(|e| err(path, e.to_string()))?
            .save(path, format, dtype, meta)
    }
}

/// What [`load_dir`] found.
pub struct DirEmbeddings {
    pub embeddings: Vec<Embedding>,
    /// Files left out, with the reason (webui skips them too).
    pub skipped: Vec<EmbeddingError>,
}

/// Every embedding file under `dir` (subfolders too, as webui), named by file stem, for
/// a text encoder of `width`. A file that cannot be used (unreadable, another width, a
/// second file of the same name) is skipped, unless one of `prompts` uses its name:
/// then it is an error, since the image would silently lack the embedding.
pub fn load_dir(
    dir: &Path,
    width: usize,
    prompts: &[&str],
) -> Result<DirEmbeddings, EmbeddingError> {
    scan_dir(dir, Some(width), prompts)
}

/// [`load_dir`] for a text encoder of `width` when known; with `None` every readable
/// file is kept whatever its width.
pub fn scan_dir(
    dir: &Path,
    width: Option<usize>,
    prompts: &[&str],
) -> Result<DirEmbeddings, EmbeddingError> {
    if !dir.is_dir() {
        return Err(err(dir, "not a folder of embeddings"));
    }
    let tok = ClipTokenizer::shared();
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .follow_links(true)
        .into_iter()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .filter(|p| {
            let ext = p.extension().map(|e| e.to_string_lossy().to_lowercase());
            matches!(ext.as_deref(), Some("safetensors" | "sft" | "pt" | "bin"))
                && std::fs::metadata(p).is_ok_and(|m| m.len() > 0)
        })
        .collect();
    files.sort();
    let mut out = DirEmbeddings {
        embeddings: Vec::new(),
        skipped: Vec::new(),
    };
    let mut names = Placeholders::new(crate::model::tokenizer::VOCAB_SIZE);
    for f in files {
        let stem = f
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let loaded = Embedding::load(&f).and_then(|e| {
            if let Some(width) = width {
                e.check_width(width)?;
            }
            names
                .add(tok, &e.name, e.n())
                .map_err(|x| err(&f, x.to_string()))?;
            Ok(e)
        });
        match loaded {
            Ok(e) => out.embeddings.push(e),
            Err(e)
                if prompts
                    .iter()
                    .any(|p| Placeholders::mentions(tok, p, &stem)) =>
            {
                return Err(e);
            }
            Err(e) => out.skipped.push(e),
        }
    }
    Ok(out)
}

/// webui's `TI hashes` infotext value for the embeddings `prompts` use: `name: <first 12
/// hex of the file's sha256>`, comma-separated (`:` and `,` removed from names).
pub fn ti_hashes(clip: &ClipTextModel, embeddings: &[Embedding], prompts: &[&str]) -> String {
    ti_hashes_of(&clip.placeholders, embeddings, prompts)
}

/// [`ti_hashes`] with the names of a registry (what [`attach`] would give a text encoder).
pub fn ti_hashes_of(names: &Placeholders, embeddings: &[Embedding], prompts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let tok = ClipTokenizer::shared();
    let mut seen: Vec<String> = Vec::new();
    let mut parts = Vec::new();
    for p in prompts {
        for used in names.used_in_prompt(tok, p) {
            if seen.contains(&used.name) {
                continue;
            }
            seen.push(used.name.clone());
            let Some(file) = embeddings
                .iter()
                .find(|e| e.name == used.name)
                .and_then(|e| e.file.as_ref())
            else {
                continue;
            };
            let Ok(bytes) = std::fs::read(file) else {
                continue;
            };
            let hex: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let name = used.name.replace([':', ','], "");
            parts.push(format!("{name}: {}", &hex[..12]));
        }
    }
    parts.join(", ")
}
