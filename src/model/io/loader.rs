//! Open a Stable Diffusion checkpoint: a diffusers folder, a single-file LDM
//! `.safetensors`, or a torch `.ckpt` (candle's pickle reader, `state_dict` nested or not).
//!
//! Every format ends as three [`Weights`] in diffusers / HF naming (UNet `down_blocks…`,
//! VAE `encoder…`, text encoder `text_model…`) converted to the compute dtype, plus the
//! [`ModelInfo`] read from configs or tensor shapes. Names are mapped by [`super::keymap`];
//! the resulting key sets are checked against what the configs imply, so one error lists
//! the missing and unexpected tensors.
//!
//! SD2: the OpenCLIP text tower is used up to its penultimate block (diffusers and webui
//! agree), so a single-file SD2 text encoder loses its last block here and matches a
//! diffusers SD2 `text_encoder/` (23 of 24 layers); `clip_skip` 1 is SD2's conditioning.
//!
//! Prediction type: `--prediction` wins; then a sidecar `<name>.yaml` (webui reads the
//! same file: `parameterization: "v"` means v-prediction); a diffusers folder's
//! scheduler config; otherwise SD1 is epsilon and SD2 v-prediction, as diffusers'
//! single-file loader assumes for SD2 (SD2 512-base files need `--prediction epsilon`).

use super::arch::{self, Arch, Prediction, TextParams, UNetParams, VaeParams};
use super::keymap::{self, LDM_CLIP_SD1, LDM_CLIP_SD2, LDM_SDXL, LDM_UNET, LDM_VAE};
use super::weights::Weights;
use crate::model::{ModelError, Result, clip};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// How a checkpoint was stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    Diffusers,
    Safetensors,
    Ckpt,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ModelInfo {
    pub arch: Arch,
    pub format: Format,
    pub prediction: Prediction,
    pub unet: UNetParams,
    pub vae: VaeParams,
    pub text: TextParams,
}

/// A loaded checkpoint: per-component tensors in diffusers / HF naming.
pub struct Checkpoint {
    pub path: PathBuf,
    pub info: ModelInfo,
    pub unet: Weights,
    pub vae: Weights,
    pub text_encoder: Weights,
    /// Tensors of a single file that no component uses but a checkpoint writer puts back,
    /// by their LDM names: SD2's last OpenCLIP block (the conditioning is the penultimate
    /// layer's), its `text_projection` and `logit_scale`.
    pub passthrough: HashMap<String, Tensor>,
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Overrides the detected prediction type.
    pub prediction: Option<Prediction>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            device: Device::Cpu,
            prediction: None,
        }
    }
}

fn fail(path: &Path, reason: impl Into<String>) -> ModelError {
    ModelError::Format {
        file: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Open a checkpoint by path: a folder with `model_index.json`, a `.safetensors`, or a
/// `.ckpt` / `.pt` / `.pth` / `.bin` torch file.
pub fn open(path: &Path, opts: &LoadOptions) -> Result<Checkpoint> {
    if path.is_dir() {
        return open_diffusers(path, opts);
    }
    if !path.is_file() {
        return Err(fail(path, "no such file or folder"));
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let (tensors, format) = match ext.as_str() {
        // Float tensors that anything loads are converted as they are read, in parallel
        // (EMA copies and other ignored keys stay as stored, then are dropped).
        "safetensors" => (
            read_safetensors(path, opts.dtype, keymap::ignored)?,
            Format::Safetensors,
        ),
        "ckpt" | "pt" | "pth" | "bin" => (read_torch(path)?, Format::Ckpt),
        _ => {
            return Err(fail(
                path,
                "not a checkpoint: expected a diffusers folder, .safetensors or .ckpt",
            ));
        }
    };
    from_tensors(path, tensors, format, opts)
}

/// The text encoder's width (768 SD 1.x, 1024 SD 2.x) from a folder's config or a single
/// file's tensor headers, without loading any weights; `None` when it cannot be told that
/// way (loading checks it anyway).
pub fn text_width(path: &Path) -> Option<usize> {
    if path.is_dir() {
        let cfg = read_json(&path.join("text_encoder/config.json")).ok()?;
        return cfg["hidden_size"].as_u64().map(|w| w as usize);
    }
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    let shapes: Vec<(String, Vec<usize>)> = match ext.as_str() {
        "safetensors" => crate::formats::safetensors::shapes(path).ok()?,
        "ckpt" | "pt" | "pth" | "bin" => {
            let infos = |key| {
                candle_core::pickle::PthTensors::new(path, key)
                    .ok()
                    .map(|t| t.tensor_infos().clone())
                    .filter(|t| !t.is_empty())
            };
            infos(Some("state_dict"))
                .or_else(|| infos(None))?
                .into_iter()
                .map(|(k, i)| (k, i.layout.shape().dims().to_vec()))
                .collect()
        }
        _ => return None,
    };
    shapes
        .into_iter()
        .find(|(k, s)| {
            (k.starts_with(LDM_CLIP_SD1) || k.starts_with(LDM_CLIP_SD2))
                && k.ends_with("token_embedding.weight")
                && s.len() == 2
        })
        .map(|(_, s)| s[1])
}

/// Every tensor of a safetensors file; float tensors converted to `dtype` on the reading
/// threads, except those `keep_as_stored` names.
fn read_safetensors(
    path: &Path,
    dtype: DType,
    keep_as_stored: fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    crate::formats::safetensors::read_all_as(path, dtype, keep_as_stored).map_err(|e| fail(path, e))
}

/// A torch zip checkpoint; the tensors of its `state_dict` entry when it has one.
fn read_torch(path: &Path) -> Result<HashMap<String, Tensor>> {
    let read = |key| candle_core::pickle::read_all_with_key(path, key);
    let list = match read(Some("state_dict")) {
        Ok(l) if !l.is_empty() => l,
        _ => read(None).map_err(|e| {
            fail(
                path,
                format!("cannot read torch checkpoint (zip format, torch >= 1.6): {e}"),
            )
        })?,
    };
    Ok(list.into_iter().collect())
}

/// Sidecar LDM config next to a single file (`model.yaml` for `model.safetensors`).
#[derive(Default)]
struct Sidecar {
    found: bool,
    v_prediction: bool,
    num_heads: Option<usize>,
    num_head_channels: Option<usize>,
    scale_factor: Option<f64>,
}

fn read_sidecar(path: &Path) -> Result<Sidecar> {
    let yaml = path.with_extension("yaml");
    let Ok(text) = std::fs::read_to_string(&yaml) else {
        return Ok(Sidecar::default());
    };
    let v: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| fail(&yaml, format!("bad YAML: {e}")))?;
    let params = &v["model"]["params"];
    let unet = &params["unet_config"]["params"];
    let int = |x: &serde_yaml::Value| x.as_u64().map(|n| n as usize).filter(|&n| n > 0);
    Ok(Sidecar {
        found: true,
        v_prediction: params["parameterization"].as_str() == Some("v"),
        num_heads: int(&unet["num_heads"]),
        num_head_channels: int(&unet["num_head_channels"]),
        scale_factor: params["scale_factor"].as_f64(),
    })
}

/// The family of a single-file checkpoint from its keys.
pub fn detect_single_file<'a>(
    keys: impl Iterator<Item = &'a String> + Clone,
) -> std::result::Result<Arch, String> {
    let has = |p: &str| keys.clone().any(|k| k.starts_with(p));
    if has(LDM_SDXL) {
        return Err(
            "SDXL checkpoint (conditioner.embedders.* keys): sdkit loads SD 1.x and \
                    2.x models only for now"
                .into(),
        );
    }
    if !has(&format!("{LDM_UNET}input_blocks.")) {
        return Err("not a Stable Diffusion 1.x/2.x checkpoint (no \
                    model.diffusion_model.input_blocks.* keys)"
            .into());
    }
    if has(LDM_CLIP_SD2) {
        Ok(Arch::Sd2)
    } else if has(LDM_CLIP_SD1) {
        Ok(Arch::Sd1)
    } else {
        Err("no text encoder in the checkpoint (no cond_stage_model.* keys)".into())
    }
}

fn cast(t: Tensor, opts: &LoadOptions) -> Result<Tensor> {
    Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
}

/// Build a checkpoint from the tensors of a single-file LDM checkpoint read from `path`
/// (which also locates the sidecar `.yaml`).
pub fn from_tensors(
    path: &Path,
    tensors: HashMap<String, Tensor>,
    format: Format,
    opts: &LoadOptions,
) -> Result<Checkpoint> {
    let arch = detect_single_file(tensors.keys()).map_err(|r| fail(path, r))?;
    let side = read_sidecar(path)?;
    let unet_layers =
        keymap::ldm_unet_layers_per_block(tensors.keys().filter_map(|k| k.strip_prefix(LDM_UNET)))
            .ok_or_else(|| fail(path, "cannot find the UNet's input blocks"))?;
    let vae_blocks = tensors
        .keys()
        .filter_map(|k| k.strip_prefix(LDM_VAE)?.strip_prefix("encoder.down."))
        .filter_map(|s| s.split('.').next()?.parse::<usize>().ok())
        .max()
        .map_or(0, |i| i + 1);

    let source = path.display().to_string();
    let (mut unet, mut vae, mut text, mut sd2_text) = (
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
        HashMap::new(),
    );
    let mut unknown = Vec::new();
    let mut passthrough = HashMap::new();
    for (key, t) in tensors {
        if arch == Arch::Sd2
            && matches!(
                key.strip_prefix(LDM_CLIP_SD2),
                Some("text_projection" | "logit_scale")
            )
        {
            passthrough.insert(key, cast(t, opts)?);
            continue;
        }
        if keymap::ignored(&key) {
            continue;
        }
        if let Some(k) = key.strip_prefix(LDM_UNET) {
            match keymap::unet_from_ldm(k, unet_layers) {
                Some(n) => drop(unet.insert(n, cast(t, opts)?)),
                None => unknown.push(key),
            }
        } else if let Some(k) = key.strip_prefix(LDM_VAE) {
            match keymap::vae_from_ldm(k, vae_blocks) {
                Some(n) => {
                    // LDM keeps the mid-block attention projections as 1x1 convs
                    let t = if n.contains("mid_block.attentions.0.") && t.rank() > 2 {
                        let (o, i) = (t.dim(0)?, t.dim(1)?);
                        t.reshape((o, i))?
                    } else {
                        t
                    };
                    vae.insert(n, cast(t, opts)?);
                }
                None => unknown.push(key),
            }
        } else if arch == Arch::Sd1 && key.starts_with(LDM_CLIP_SD1) {
            match keymap::clip_from_ldm(&key[LDM_CLIP_SD1.len()..]) {
                Some(n) => drop(text.insert(n, cast(t, opts)?)),
                None => unknown.push(key),
            }
        } else if arch == Arch::Sd2 && key.starts_with(LDM_CLIP_SD2) {
            sd2_text.insert(key, cast(t, opts)?);
        } else {
            unknown.push(key);
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        let n = unknown.len();
        let first = unknown.into_iter().take(4).collect::<Vec<_>>().join(", ");
        return Err(fail(path, format!("{n} unexpected tensors: {first}")));
    }
    let mut text = Weights::new(&source, text, opts.dtype, &opts.device);
    if arch == Arch::Sd2 {
        let blocks = format!("{LDM_CLIP_SD2}transformer.resblocks.");
        let last = sd2_text
            .keys()
            .filter_map(|k| {
                k.strip_prefix(&blocks)?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max();
        if let Some(last) = last {
            let p = format!("{blocks}{last}.");
            for (k, t) in sd2_text.iter().filter(|(k, _)| k.starts_with(&p)) {
                passthrough.insert(k.clone(), t.clone());
            }
        }
        let mut w = Weights::new(&source, sd2_text, opts.dtype, &opts.device);
        clip::map_open_clip_keys(&mut w)?;
        // SD2 conditions on the penultimate block: drop the last one, like diffusers.
        let layers = arch::count_indexed(&w, "text_model.encoder.layers.");
        let last = format!("text_model.encoder.layers.{}.", layers.saturating_sub(1));
        for k in w.keys().cloned().collect::<Vec<_>>() {
            if !k.starts_with(&last) {
                text.insert(k.clone(), w.remove(&k)?);
            }
        }
    }
    let unet = Weights::new(&source, unet, opts.dtype, &opts.device);
    let vae = Weights::new(&source, vae, opts.dtype, &opts.device);

    let heads = match (side.num_heads, side.num_head_channels) {
        (Some(h), _) => Some(vec![h; arch::count_indexed(&unet, "down_blocks.")]),
        (None, Some(c)) => Some(channels(&unet)?.iter().map(|ch| ch / c).collect()),
        _ => None,
    };
    let prediction = opts.prediction.unwrap_or(if side.found {
        if side.v_prediction {
            Prediction::VPrediction
        } else {
            Prediction::Epsilon
        }
    } else {
        match arch {
            Arch::Sd1 => Prediction::Epsilon,
            Arch::Sd2 => Prediction::VPrediction,
        }
    });
    let info = ModelInfo {
        arch,
        format,
        prediction,
        unet: arch::infer_unet(&unet, heads, arch)?,
        vae: arch::infer_vae(&vae, side.scale_factor.unwrap_or(0.18215))?,
        text: arch::infer_text(&text, None)?,
    };
    let mut ck = finish(path, info, unet, vae, text)?;
    ck.passthrough = passthrough;
    Ok(ck)
}

fn channels(unet: &Weights) -> Result<Vec<usize>> {
    (0..arch::count_indexed(unet, "down_blocks."))
        .map(|b| Ok(unet.shape_of(&format!("down_blocks.{b}.resnets.0.conv1.weight"))?[0]))
        .collect()
}

fn finish(
    path: &Path,
    info: ModelInfo,
    unet: Weights,
    vae: Weights,
    text_encoder: Weights,
) -> Result<Checkpoint> {
    arch::check_keys(&unet, "UNet", &arch::unet_keys(&info.unet))?;
    arch::check_keys(&vae, "VAE", &arch::vae_keys(&info.vae))?;
    arch::check_keys(&text_encoder, "text encoder", &arch::text_keys(&info.text))?;
    Ok(Checkpoint {
        path: path.to_path_buf(),
        info,
        unet,
        vae,
        text_encoder,
        passthrough: HashMap::new(),
    })
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let bytes = std::fs::read(path).map_err(|e| fail(path, format!("cannot read: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| fail(path, format!("bad JSON: {e}")))
}

/// Weight files of a diffusers component folder, in the order they are looked for.
pub const COMPONENT_WEIGHTS: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
];

/// The diffusers components sdkit loads (besides `model_index.json`).
pub const COMPONENTS: &[&str] = &["unet", "vae", "text_encoder"];

/// The weights file of a diffusers component folder.
fn component_file(dir: &Path) -> Result<PathBuf> {
    COMPONENT_WEIGHTS
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            fail(
                dir,
                "no weights file (diffusion_pytorch_model.safetensors or model.safetensors)",
            )
        })
}

fn load_component(
    dir: &Path,
    opts: &LoadOptions,
    rename: impl Fn(String) -> Option<String>,
) -> Result<Weights> {
    let file = component_file(dir)?;
    let raw = if file.extension().is_some_and(|e| e == "bin") {
        read_torch(&file)?
    } else {
        read_safetensors(&file, opts.dtype, |_| false)?
    };
    let mut out = HashMap::new();
    for (k, t) in raw {
        if let Some(k) = rename(k) {
            out.insert(k, cast(t, opts)?);
        }
    }
    Ok(Weights::new(
        &file.display().to_string(),
        out,
        opts.dtype,
        &opts.device,
    ))
}

fn open_diffusers(dir: &Path, opts: &LoadOptions) -> Result<Checkpoint> {
    let index = read_json(&dir.join("model_index.json"))?;
    let class = index["_class_name"].as_str().unwrap_or("");
    if class.contains("XL") || index.get("text_encoder_2").is_some() {
        return Err(fail(
            dir,
            format!(
                "SDXL pipeline ({class}, text_encoder_2): sdkit loads SD 1.x and 2.x models only for now"
            ),
        ));
    }
    let unet_cfg = read_json(&dir.join("unet/config.json"))?;
    let vae_cfg = read_json(&dir.join("vae/config.json"))?;
    let te_cfg = read_json(&dir.join("text_encoder/config.json"))?;
    let unet = load_component(&dir.join("unet"), opts, Some)?;
    let vae = load_component(&dir.join("vae"), opts, |k| {
        Some(keymap::vae_legacy_attention(&k).unwrap_or(k))
    })?;
    // transformers >= 5 saves CLIPTextModel without the `text_model.` level
    let text = load_component(&dir.join("text_encoder"), opts, |k| {
        if k.ends_with("position_ids") {
            None
        } else if k.starts_with("text_model.") {
            Some(k)
        } else {
            Some(format!("text_model.{k}"))
        }
    })?;
    let arch = match te_cfg["hidden_act"].as_str() {
        Some("gelu") => Arch::Sd2,
        Some("quick_gelu") => Arch::Sd1,
        other => {
            return Err(fail(
                &dir.join("text_encoder/config.json"),
                format!("unknown text encoder activation {other:?} (SD1 quick_gelu, SD2 gelu)"),
            ));
        }
    };
    let n = arch::count_indexed(&unet, "down_blocks.");
    let heads = match &unet_cfg["attention_head_dim"] {
        serde_json::Value::Number(h) => h.as_u64().map(|h| vec![h as usize; n]),
        serde_json::Value::Array(a) => a.iter().map(|h| h.as_u64().map(|h| h as usize)).collect(),
        _ => None,
    };
    let sched = read_json(&dir.join("scheduler/scheduler_config.json")).ok();
    let folder_prediction = match sched.as_ref().and_then(|s| s["prediction_type"].as_str()) {
        Some("v_prediction") => Prediction::VPrediction,
        _ => Prediction::Epsilon,
    };
    // What the tensor shapes cannot tell: the norm grouping (32 in every SD release).
    let groups = |cfg: &serde_json::Value| cfg["norm_num_groups"].as_u64().map(|g| g as usize);
    let mut unet_params = arch::infer_unet(&unet, heads, arch)?;
    unet_params.norm_groups = groups(&unet_cfg).unwrap_or(unet_params.norm_groups);
    let mut vae_params =
        arch::infer_vae(&vae, vae_cfg["scaling_factor"].as_f64().unwrap_or(0.18215))?;
    vae_params.norm_groups = groups(&vae_cfg).unwrap_or(vae_params.norm_groups);
    let info = ModelInfo {
        arch,
        format: Format::Diffusers,
        prediction: opts.prediction.unwrap_or(folder_prediction),
        unet: unet_params,
        vae: vae_params,
        text: arch::infer_text(
            &text,
            te_cfg["num_attention_heads"].as_u64().map(|h| h as usize),
        )?,
    };
    finish(dir, info, unet, vae, text)
}
