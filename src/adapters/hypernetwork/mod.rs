//! AUTOMATIC1111 hypernetworks: per context width a pair of small networks (keys, values)
//! that transform the attention context before `to_k` / `to_v`,
//! `ctx + module(ctx) * strength` (webui `modules/hypernetworks/hypernetwork.py`).
//!
//! Attached through the UNet's [`ContextHooks`](crate::model::unet::ContextHooks): for SD1
//! the widths 768 (cross-attention on the text) and 320, 640, 1280 (self-attention, whose
//! context is the hidden states), as webui applies them. Weights are f32 `Var`s read
//! through [`param`](crate::model::grad::param) and cast to the activation dtype. Files are
//! webui's `.pt` ([`file`]).
//!
//! For the training engine (`train::method::Method`): `create` (or `load` to continue a
//! file), `attach(unet, 1.0)` (webui trains at multiplier 1), `vars()` as the one group,
//! `identity()`, `set_dropout_key`, `tensors()` / `load_tensors()` for states, and
//! `save_pt(path, &PtMeta { name, step, sd_checkpoint, .. })` for the output (`.pt`, f32
//! as webui writes it). With gradient checkpointing, pass `vars()` to `Checkpointing::new`.

pub mod file;
pub mod module;
pub mod shape;

pub use module::HnModule;
pub use shape::{Activation, HypernetworkShape, WeightInit};

use crate::model::Result;
use crate::model::unet::{ContextFn, UNet2DConditionModel, UNetConfig};
use crate::train::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The context widths webui creates modules for: the text-encoder width, then the UNet's
/// block widths (SD1: 768, 320, 640, 1280; SD2: 1024, 320, 640, 1280).
pub fn default_widths(cfg: &UNetConfig) -> Vec<usize> {
    let mut w = vec![cfg.cross_attention_dim];
    for &c in &cfg.block_out_channels {
        if !w.contains(&c) {
            w.push(c);
        }
    }
    w
}

/// webui's infotext pairs for a hypernetwork: `Hypernet` (the file stem), `Hypernet hash`
/// (the short SHA-256 of the file) and `Hypernet strength` (only when not 1, as Python
/// prints a float: `0.6`, `2.0`).
pub fn infotext(name: &str, hash: &str, strength: f64) -> Vec<(String, String)> {
    let mut v = vec![
        ("Hypernet".to_string(), name.to_string()),
        ("Hypernet hash".to_string(), hash.to_string()),
    ];
    if strength != 1.0 {
        v.push(("Hypernet strength".to_string(), format!("{strength:?}")));
    }
    v
}

/// A hypernetwork: its shape, its modules by context width, and the file facts webui
/// keeps (name, step, checkpoint).
#[derive(Clone, Debug)]
pub struct Hypernetwork {
    pub shape: HypernetworkShape,
    /// `(width, [keys, values])` in file order.
    pub modules: Vec<(usize, [Arc<HnModule>; 2])>,
    pub dropout_key: Arc<AtomicU64>,
    /// What the file said (kept when a loaded network is saved again).
    pub meta: file::PtMeta,
}

impl Hypernetwork {
    /// New modules for `widths` with weights drawn from `rng` (webui's init for the
    /// shape's `weight_init`; biases zero).
    pub fn create(
        shape: &HypernetworkShape,
        widths: &[usize],
        rng: &mut Rng,
        device: &Device,
    ) -> std::result::Result<Self, String> {
        shape.validate()?;
        let key = Arc::new(AtomicU64::new(0));
        let mut modules = Vec::new();
        for (i, &w) in widths.iter().enumerate() {
            let mk = |j: u64, rng: &mut Rng| {
                HnModule::create(w, shape, rng, &key, 2 * i as u64 + j, device)
                    .map(Arc::new)
                    .map_err(|e| e.to_string())
            };
            let k = mk(0, rng)?;
            let v = mk(1, rng)?;
            modules.push((w, [k, v]));
        }
        Ok(Self {
            shape: shape.clone(),
            modules,
            dropout_key: key,
            meta: file::PtMeta::default(),
        })
    }

    /// The dropout masks of the next forward passes: a non-zero key per training step
    /// (the same key draws the same masks), 0 for none (inference, sample images).
    pub fn set_dropout_key(&self, key: u64) {
        self.dropout_key.store(key, Ordering::Relaxed);
    }

    /// `(name, var)` of every weight: `<width>.<k|v>.linear.<i>.<weight|bias>`.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        for (w, kv) in &self.modules {
            for (tag, m) in ["k", "v"].iter().zip(kv) {
                for (n, v) in m.named_vars() {
                    out.push((format!("{w}.{tag}.{n}"), v.clone()));
                }
            }
        }
        out
    }

    /// The trainable variables.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v).collect()
    }

    pub fn num_params(&self) -> usize {
        self.vars().iter().map(|v| v.elem_count()).sum()
    }

    /// Every weight in f32 on the CPU by [`Hypernetwork::named_vars`] name (resume states).
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.named_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = v
                    .as_tensor()
                    .to_device(&Device::Cpu)?
                    .to_dtype(DType::F32)?;
                Ok((n, t))
            })
            .collect()
    }

    /// Set the weights from [`Hypernetwork::tensors`] (a resumed run): every name must be
    /// present with its shape, and nothing else.
    pub fn load_tensors(
        &self,
        tensors: &BTreeMap<String, Tensor>,
    ) -> std::result::Result<(), String> {
        let named = self.named_vars();
        for (n, var) in &named {
            super::restore_var(
                var,
                tensors,
                n,
                "another hypernetwork shape or --layer-structure?",
            )?;
        }
        if tensors.len() != named.len() {
            let known: std::collections::HashSet<&str> =
                named.iter().map(|(n, _)| n.as_str()).collect();
            let extra: Vec<&String> = tensors
                .keys()
                .filter(|k| !known.contains(k.as_str()))
                .take(3)
                .collect();
            return Err(format!(
                "holds weights this hypernetwork does not have (another shape or model?): {extra:?}"
            ));
        }
        Ok(())
    }

    /// The context transforms of one width at `strength`.
    pub fn transforms(&self, index: usize, strength: f64) -> (ContextFn, ContextFn) {
        let [k, v] = self.modules[index].1.clone();
        let f =
            |m: Arc<HnModule>| -> ContextFn { Arc::new(move |x: &Tensor| m.forward(x, strength)) };
        (f(k), f(v))
    }

    /// The widths of this network that a UNet of `cfg` has attention contexts of; an
    /// error (naming `file`) when there is none: the network was made for another model.
    pub fn fits(
        &self,
        cfg: &UNetConfig,
        file: &std::path::Path,
    ) -> std::result::Result<Vec<usize>, String> {
        let have = default_widths(cfg);
        let mine: Vec<usize> = self.modules.iter().map(|(w, _)| *w).collect();
        let widths: Vec<usize> = mine.iter().copied().filter(|w| have.contains(w)).collect();
        if widths.is_empty() {
            return Err(format!(
                "{}: no context width of this hypernetwork ({mine:?}) is one of this model's \
                 ({have:?}): made for another model",
                file.display()
            ));
        }
        Ok(widths)
    }

    /// Register the transforms in `unet` (replacing any for the same widths). Widths
    /// the UNet has no attention of are simply never called.
    pub fn attach(&self, unet: &mut UNet2DConditionModel, strength: f64) {
        for (i, (w, _)) in self.modules.iter().enumerate() {
            let (k, v) = self.transforms(i, strength);
            unet.hooks.insert(*w, k, v);
        }
    }

    /// Remove this network's widths from `unet`.
    pub fn detach(&self, unet: &mut UNet2DConditionModel) {
        for (w, _) in &self.modules {
            unet.hooks.remove(*w);
        }
    }

    /// What a resume state must match (shape and widths).
    pub fn identity(&self) -> serde_json::Value {
        let s = &self.shape;
        serde_json::json!({
            "layer_structure": s.layer_structure,
            "activation_func": s.activation_func.name(),
            "layer_norm": s.layer_norm,
            "dropout_structure": s.dropout(),
            "activate_output": s.activate_output,
            "widths": self.modules.iter().map(|(w, _)| *w).collect::<Vec<_>>(),
        })
    }
}
