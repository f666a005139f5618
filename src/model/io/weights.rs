//! A named tensor map (one checkpoint, or part of one) that layers load from by path.
//!
//! Keys are full diffusers / HF paths (`text_model.encoder.layers.0.self_attn.q_proj.weight`).
//! Parameters whose path the `trainable` predicate accepts become `candle_core::Var`s and
//! are collected, so a trainer can hand them to an optimiser and read their gradients;
//! every other parameter is a plain tensor that backprop never tracks.

use crate::model::{ModelError, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::collections::HashMap;
use std::path::Path;

/// Which parameters are trainable: given a full parameter path.
pub type TrainableFn = Box<dyn Fn(&str) -> bool>;

pub struct Weights {
    /// Where the tensors came from, for error messages.
    pub source: String,
    tensors: HashMap<String, Tensor>,
    dtype: DType,
    device: Device,
    trainable: TrainableFn,
    vars: Vec<(String, Var)>,
}

impl Weights {
    /// Wrap an in-memory map; tensors are converted to `dtype` on `device` when taken.
    pub fn new(
        source: &str,
        tensors: HashMap<String, Tensor>,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            source: source.to_string(),
            tensors,
            dtype,
            device: device.clone(),
            trainable: Box::new(|_| false),
            vars: Vec::new(),
        }
    }

    /// Read every tensor of a `.safetensors` file (any float dtype; float tensors are
    /// converted to `dtype` as they are read, in parallel).
    pub fn from_safetensors(path: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let source = path.display().to_string();
        let tensors =
            crate::formats::safetensors::read_all_as(path, dtype, |_| false).map_err(|reason| {
                ModelError::Format {
                    file: source.clone(),
                    reason,
                }
            })?;
        Ok(Self::new(&source, tensors, dtype, device))
    }

    /// Mark parameters as trainable by path.
    pub fn with_trainable(mut self, f: impl Fn(&str) -> bool + 'static) -> Self {
        self.trainable = Box::new(f);
        self
    }

    /// Mark parameters as trainable by path, in place.
    pub fn set_trainable(&mut self, f: impl Fn(&str) -> bool + 'static) {
        self.trainable = Box::new(f);
    }

    /// Every stored tensor by key (cheap: tensors share their storage). Taken before a
    /// model is built, it keeps the frozen weights at hand for writing a checkpoint.
    pub fn snapshot(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .tensors
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// Shape of a stored tensor, without taking it.
    pub fn shape_of(&self, key: &str) -> Result<Vec<usize>> {
        self.raw(key).map(|t| t.dims().to_vec())
    }

    /// The stored tensor as it is (no dtype/device conversion, not removed).
    pub fn raw(&self, key: &str) -> Result<&Tensor> {
        self.tensors.get(key).ok_or_else(|| ModelError::MissingKey {
            file: self.source.clone(),
            key: key.to_string(),
        })
    }

    /// Replace or add a tensor (used by key-mapping loaders).
    pub fn insert(&mut self, key: String, t: Tensor) {
        self.tensors.insert(key, t);
    }

    /// Remove and return a stored tensor.
    pub fn remove(&mut self, key: &str) -> Result<Tensor> {
        self.tensors
            .remove(key)
            .ok_or_else(|| ModelError::MissingKey {
                file: self.source.clone(),
                key: key.to_string(),
            })
    }

    /// Take a parameter: checks the shape, converts, and makes it a `Var` when trainable.
    /// The stored tensor is removed, so a converted copy (f16 file, f32 compute) does not
    /// live next to the original.
    pub fn param(&mut self, key: &str, shape: &[usize]) -> Result<Param> {
        let found = self.raw(key)?.dims().to_vec();
        if found != shape {
            return Err(ModelError::Shape {
                file: self.source.clone(),
                key: key.to_string(),
                found,
                expected: shape.to_vec(),
            });
        }
        let t = self.remove(key)?;
        let t = t.to_dtype(self.dtype)?.to_device(&self.device)?;
        if (self.trainable)(key) {
            let v = Var::from_tensor(&t)?;
            self.vars.push((key.to_string(), v.clone()));
            Ok(Param::Trainable(v))
        } else {
            Ok(Param::Frozen(t.detach()))
        }
    }

    /// The trainable parameters taken so far, by path.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }
}

/// A weight: frozen (never tracked by backprop) or trainable.
#[derive(Clone, Debug)]
pub enum Param {
    Frozen(Tensor),
    Trainable(Var),
}

impl Param {
    pub fn tensor(&self) -> &Tensor {
        match self {
            Param::Frozen(t) => t,
            Param::Trainable(v) => v.as_tensor(),
        }
    }

    /// The value a forward computes with: a trainable weight is read through
    /// [`crate::model::grad::param`], so it is untracked inside `no_grad`.
    pub fn value(&self) -> Tensor {
        match self {
            Param::Frozen(t) => t.clone(),
            Param::Trainable(v) => crate::model::grad::param(v),
        }
    }

    pub fn var(&self) -> Option<&Var> {
        match self {
            Param::Frozen(_) => None,
            Param::Trainable(v) => Some(v),
        }
    }
}

impl Weights {
    /// Rename every key starting with `from` to start with `to` instead.
    pub fn rename_prefix(&mut self, from: &str, to: &str) {
        let keys: Vec<String> = self
            .tensors
            .keys()
            .filter(|k| k.starts_with(from))
            .cloned()
            .collect();
        for k in keys {
            let t = self.tensors.remove(&k).expect("key listed above");
            self.tensors.insert(format!("{to}{}", &k[from.len()..]), t);
        }
    }
}
