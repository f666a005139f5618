//! LoRA / LoCon as kohya sd-scripts builds it (`networks/lora.py`): which layers get a
//! module, their names, ranks, alphas and initialisation; attaching the modules to the
//! model's layers through the named-layer walk; merging other tools' files for inference.
//!
//! Targets: every Linear and 1x1 Conv2d inside UNet `Transformer2DModel`s (SD1.5: 192) and
//! text-encoder `CLIPAttention` / `CLIPMLP` (72); with a conv dim (LoCon, kohya's
//! "C3Lier"), also the layers of `ResnetBlock2D` / `Downsample2D` / `Upsample2D`: 3x3 convs
//! at the conv dim, their Linear (`time_emb_proj`) and 1x1 `conv_shortcut` at the network
//! dim. Name = `lora_unet_` / `lora_te_` + diffusers path with `.` -> `_`.

use crate::model::Result;
use crate::model::clip::ClipTextModel;
use crate::model::nn::walk::{LayerMut, Parent};
use crate::model::nn::{Dropout, LowRank};
use crate::model::unet::UNet2DConditionModel;
use crate::model::weights::Param;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;

pub const UNET_PREFIX: &str = "lora_unet";
pub const TE_PREFIX: &str = "lora_te";

/// Ranks and alphas of a network (kohya's `network_dim`, `network_alpha`, `conv_dim`,
/// `conv_alpha`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraShape {
    pub dim: usize,
    pub alpha: f64,
    /// LoCon: rank of the 3x3 convs in resnets and resamplers; `None` = no LoCon.
    pub conv_dim: Option<usize>,
    pub conv_alpha: f64,
    /// kohya's `network_dropout`: dropout on `down(x)` while training (0 = off).
    pub dropout: f64,
}

/// Which part of the model a module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Part {
    Unet,
    TextEncoder,
}

/// kohya's module key for a diffusers / HF path.
pub fn kohya_name(part: Part, path: &str) -> String {
    let prefix = match part {
        Part::Unet => UNET_PREFIX,
        Part::TextEncoder => TE_PREFIX,
    };
    format!("{prefix}_{}", path.replace('.', "_"))
}

/// kohya's rule: (rank, alpha) for a layer, or `None` when it gets no module.
pub fn target(parent: Parent, kernel: usize, s: &LoraShape) -> Option<(usize, f64)> {
    let rank = match parent {
        Parent::Transformer | Parent::ClipAttention | Parent::ClipMlp if kernel == 1 => {
            Some((s.dim, s.alpha))
        }
        Parent::Resnet | Parent::Downsample | Parent::Upsample => match s.conv_dim {
            None => None,
            Some(_) if kernel == 1 => Some((s.dim, s.alpha)),
            Some(c) => Some((c, s.conv_alpha)),
        },
        _ => None,
    };
    rank.filter(|(r, _)| *r > 0)
}

/// One trained module: kohya's name, the layer path, its factors (f32 Vars) and alpha.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub name: String,
    pub part: Part,
    pub path: String,
    /// [r, in] (conv: [r, in, k, k]).
    pub down: Var,
    /// [out, r] (conv: [out, r, 1, 1]).
    pub up: Var,
    pub alpha: f64,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dim(0).unwrap_or(0)
    }
}

/// A network of modules attached to a UNet and (optionally) a text encoder.
#[derive(Clone, Debug, Default)]
pub struct LoraNetwork {
    pub modules: Vec<LoraModule>,
    /// The dropout key every module reads (see [`LoraNetwork::set_dropout_key`]).
    pub dropout_key: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// Samples kaiming-uniform(a = sqrt 5) values: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), as
/// torch's default init of the `lora_down` layer.
pub trait UniformSource {
    fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32>;
}

fn new_factors(
    layer: &LayerMut,
    rank: usize,
    rng: &mut dyn UniformSource,
    device: &Device,
) -> Result<(Var, Var)> {
    let (out, inp, k) = layer.shape();
    let fan_in = inp * k * k;
    let bound = 1.0 / (fan_in as f32).sqrt();
    let (down_shape, up_shape): (Vec<usize>, Vec<usize>) = match layer {
        LayerMut::Linear(_) => (vec![rank, inp], vec![out, rank]),
        LayerMut::Conv(_) => (vec![rank, inp, k, k], vec![out, rank, 1, 1]),
    };
    let down = Tensor::from_vec(rng.uniform(fan_in * rank, bound), down_shape, device)?;
    let up = Tensor::zeros(up_shape, DType::F32, device)?;
    Ok((Var::from_tensor(&down)?, Var::from_tensor(&up)?))
}

fn set_delta(layer: LayerMut, delta: Option<LowRank>) {
    match layer {
        LayerMut::Linear(l) => l.delta = delta,
        LayerMut::Conv(c) => c.delta = delta,
    }
}

impl LoraNetwork {
    /// Create kohya's modules for the UNet (when `unet`) and the text encoder (when
    /// `te` is given) and attach them to the layers; `down` drawn from `rng`, `up` zero.
    pub fn create(
        unet: Option<&mut UNet2DConditionModel>,
        te: Option<&mut ClipTextModel>,
        shape: &LoraShape,
        rng: &mut dyn UniformSource,
        device: &Device,
    ) -> Result<Self> {
        let mut modules = Vec::new();
        let mut err = None;
        let key = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut handle = |part: Part, path: &str, parent: Parent, layer: LayerMut| {
            if err.is_some() {
                return;
            }
            let Some((rank, alpha)) = target(parent, layer.shape().2, shape) else {
                return;
            };
            match new_factors(&layer, rank, rng, device) {
                Ok((down, up)) => {
                    let scale = alpha / rank as f64;
                    let dropout = (shape.dropout > 0.0).then(|| Dropout {
                        p: shape.dropout,
                        key: key.clone(),
                        salt: modules.len() as u64 + 1,
                    });
                    set_delta(
                        layer,
                        Some(LowRank {
                            down: down.clone(),
                            up: up.clone(),
                            scale,
                            dropout,
                        }),
                    );
                    modules.push(LoraModule {
                        name: kohya_name(part, path),
                        part,
                        path: path.to_string(),
                        down,
                        up,
                        alpha,
                    });
                }
                Err(e) => err = Some(e),
            }
        };
        if let Some(te) = te {
            te.walk_mut(&mut |p, par, l| handle(Part::TextEncoder, p, par, l));
        }
        if let Some(unet) = unet {
            unet.walk_mut(&mut |p, par, l| handle(Part::Unet, p, par, l));
        }
        if let Some(e) = err {
            return Err(e);
        }
        Ok(Self {
            modules,
            dropout_key: key,
        })
    }

    /// The dropout masks of the next forward passes: a non-zero key per training step
    /// (the same key draws the same masks), 0 for none (inference, sample images).
    pub fn set_dropout_key(&self, key: u64) {
        self.dropout_key
            .store(key, std::sync::atomic::Ordering::Relaxed);
    }

    /// The trainable Vars of one part, down then up per module.
    pub fn vars(&self, part: Part) -> Vec<Var> {
        self.modules
            .iter()
            .filter(|m| m.part == part)
            .flat_map(|m| [m.down.clone(), m.up.clone()])
            .collect()
    }

    /// Number of trainable values.
    pub fn num_params(&self) -> usize {
        self.modules
            .iter()
            .map(|m| m.down.elem_count() + m.up.elem_count())
            .sum()
    }

    /// kohya's tensors: `<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha`
    /// (0-dim), in `dtype`.
    pub fn tensors(&self, dtype: DType) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::with_capacity(self.modules.len() * 3);
        for m in &self.modules {
            let n = &m.name;
            let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(dtype);
            out.push((format!("{n}.lora_down.weight"), cpu(m.down.as_tensor())?));
            out.push((format!("{n}.lora_up.weight"), cpu(m.up.as_tensor())?));
            let alpha = Tensor::new(m.alpha as f32, &Device::Cpu)?.to_dtype(dtype)?;
            out.push((format!("{n}.alpha"), alpha));
        }
        Ok(out)
    }

    /// Set the factors from kohya tensors (a resumed run). Every module must be present
    /// with the same shapes; extra keys are an error too.
    pub fn load_tensors(
        &self,
        tensors: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let mut used = 0;
        for m in &self.modules {
            for (suffix, var) in [("lora_down.weight", &m.down), ("lora_up.weight", &m.up)] {
                let key = format!("{}.{suffix}", m.name);
                super::restore_var(
                    var,
                    tensors,
                    &key,
                    "another network shape or --network-dim?",
                )?;
                used += 1;
            }
            used += tensors.contains_key(&format!("{}.alpha", m.name)) as usize;
        }
        if used != tensors.len() {
            let known: std::collections::HashSet<&str> =
                self.modules.iter().map(|m| m.name.as_str()).collect();
            let extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !known.contains(k.split('.').next().unwrap_or("")))
                .take(3)
                .collect();
            return Err(format!(
                "holds modules this network does not have (another --conv-dim or model?): {extra:?}"
            ));
        }
        Ok(())
    }
}

/// What applying a LoRA file did.
#[derive(Debug, Default)]
pub struct Applied {
    pub modules: usize,
    /// Keys that match no layer of the model, or whose kind is not supported.
    pub unknown: Vec<String>,
}

/// One module of a file: factors and alpha (kohya / LyCORIS LoCon).
#[derive(Default)]
struct FileModule {
    down: Option<Tensor>,
    up: Option<Tensor>,
    mid: Option<Tensor>,
    alpha: Option<f64>,
}

/// The merged weight delta `up @ down * alpha / rank` in the layer's weight shape.
fn delta_weight(m: &FileModule, weight_dims: &[usize]) -> candle_core::Result<Option<Tensor>> {
    let (Some(down), Some(up)) = (&m.down, &m.up) else {
        return Ok(None);
    };
    let f32 = |t: &Tensor| t.to_dtype(DType::F32);
    let (down, up) = (f32(down)?, f32(up)?);
    let rank = down.dim(0)?;
    let scale = m.alpha.unwrap_or(rank as f64) / rank as f64;
    let out = up.dim(0)?;
    let up2 = up.reshape((out, rank))?;
    let d = match &m.mid {
        None => up2.matmul(&down.reshape((rank, ()))?)?,
        // Tucker (LyCORIS): W = up . mid . down over the kernel positions.
        Some(mid) => {
            let mid = f32(mid)?; // [r, r, k, k]
            let (_, _, kh, kw) = mid.dims4()?;
            let inp = down.dim(1)?;
            let down2 = down.reshape((rank, inp))?;
            // [k*k, r, r] x [r, in] -> [k*k, r, in]; then up: [out, r] -> [k*k, out, in]
            let m = mid.permute((2, 3, 0, 1))?.reshape((kh * kw, rank, rank))?;
            let x = m.broadcast_matmul(&down2)?;
            let y = up2.broadcast_matmul(&x)?; // [k*k, out, in]
            y.permute((1, 2, 0))?.reshape((out, inp, kh, kw))?
        }
    };
    let numel: usize = weight_dims.iter().product();
    if d.elem_count() != numel {
        return Ok(None);
    }
    Ok(Some((d.reshape(weight_dims)? * scale)?))
}

/// Merge a kohya / LoCon file's modules into the model's weights with `multiplier`
/// (webui's `<lora:name:weight>`). Returns the modules merged and every key that was not
/// used (unknown layer, unsupported LyCORIS kind, shape mismatch).
pub fn merge_into(
    tensors: &BTreeMap<String, Tensor>,
    unet: &mut UNet2DConditionModel,
    te: &mut ClipTextModel,
    multiplier: f64,
) -> Result<Applied> {
    let mut modules: BTreeMap<String, FileModule> = BTreeMap::new();
    let mut unknown = Vec::new();
    for (k, t) in tensors {
        let Some((name, suffix)) = k.split_once('.') else {
            unknown.push(k.clone());
            continue;
        };
        let m = modules.entry(name.to_string()).or_default();
        match suffix {
            "lora_down.weight" => m.down = Some(t.clone()),
            "lora_up.weight" => m.up = Some(t.clone()),
            "lora_mid.weight" => m.mid = Some(t.clone()),
            "alpha" => {
                m.alpha = t
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
            }
            _ => unknown.push(k.clone()),
        }
    }
    let mut applied = Applied::default();
    let mut used = std::collections::HashSet::new();
    let mut err = None;
    let mut handle = |part: Part, path: &str, layer: LayerMut| {
        let name = kohya_name(part, path);
        let Some(m) = modules.get(&name) else { return };
        let res = match layer {
            LayerMut::Linear(l) => merge(&mut l.weight, m, multiplier),
            LayerMut::Conv(c) => merge(&mut c.weight, m, multiplier),
        };
        match res {
            Ok(true) => {
                used.insert(name);
                applied.modules += 1;
            }
            Ok(false) => {}
            Err(e) => err = Some(e),
        }
    };
    te.walk_mut(&mut |p, _, l| handle(Part::TextEncoder, p, l));
    unet.walk_mut(&mut |p, _, l| handle(Part::Unet, p, l));
    if let Some(e) = err {
        return Err(e.into());
    }
    for (name, m) in &modules {
        if used.contains(name) {
            continue;
        }
        let mut keys: Vec<String> = tensors
            .keys()
            .filter(|k| k.split_once('.').map(|(n, _)| n) == Some(name.as_str()))
            .cloned()
            .collect();
        if keys.is_empty() && (m.down.is_some() || m.up.is_some()) {
            keys.push(name.clone());
        }
        applied.unknown.extend(keys);
    }
    applied.unknown.extend(unknown);
    applied.unknown.sort();
    applied.unknown.dedup();
    Ok(applied)
}

/// Add `multiplier` x the module's delta to a layer weight; `false` when the module's
/// factors do not fit the layer.
fn merge(param: &mut Param, m: &FileModule, mult: f64) -> candle_core::Result<bool> {
    let w = param.tensor();
    let Some(d) = delta_weight(m, w.dims())? else {
        return Ok(false);
    };
    let merged =
        (w.to_dtype(DType::F32)? + (d.to_device(w.device())? * mult)?)?.to_dtype(w.dtype())?;
    *param = Param::Frozen(merged.detach());
    Ok(true)
}
