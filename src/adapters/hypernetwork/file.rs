//! webui's hypernetwork `.pt`: `{768: (k_state_dict, v_state_dict), 320: ..., "step",
//! "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
//! "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout",
//! "dropout_structure", "last_layer_dropout", "optional_info"}` — every key `Hypernetwork.
//! save` writes, in its order; read with the defaults `Hypernetwork.load` applies to older
//! files (no dropout structure, `linear1` / `linear2` keys, no `activate_output`).

use super::shape::{Activation, HypernetworkShape, WeightInit, parse_dropout_structure};
use super::{HnModule, Hypernetwork};
use crate::formats::torch_pt::{self, Value};
use crate::train::rng::Rng;
use candle_core::{DType, Device, Tensor};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// The facts webui records besides the weights.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PtMeta {
    /// webui shows and selects the network by this name (the file stem when trained).
    pub name: String,
    /// Training steps done.
    pub step: i64,
    /// Short hash of the checkpoint it was trained on.
    pub sd_checkpoint: Option<String>,
    /// That checkpoint's name.
    pub sd_checkpoint_name: Option<String>,
    pub optional_info: Option<String>,
}

fn opt_str(s: &Option<String>) -> Value {
    s.as_ref().map_or(Value::None, |s| Value::str(s.clone()))
}

fn floats(v: &[f64]) -> Value {
    Value::List(v.iter().map(|&x| Value::Float(x)).collect())
}

impl Hypernetwork {
    /// The value `torch.save` would get from webui for this network.
    pub fn to_value(&self, meta: &PtMeta) -> Result<Value, String> {
        let s = &self.shape;
        let mut e = Vec::new();
        for (w, kv) in &self.modules {
            let mut pair = Vec::new();
            for m in kv {
                let mut sd = Vec::new();
                for (n, v) in m.named_vars() {
                    let t = v
                        .as_tensor()
                        .to_device(&Device::Cpu)
                        .and_then(|t| t.to_dtype(DType::F32))
                        .map_err(|e| e.to_string())?;
                    sd.push((Value::str(n), Value::Tensor(t)));
                }
                pair.push(Value::OrderedDict(sd));
            }
            e.push((Value::Int(*w as i64), Value::Tuple(pair)));
        }
        let dropout = s.dropout();
        let kv = |k: &str, v: Value| (Value::str(k), v);
        e.extend([
            kv("step", Value::Int(meta.step)),
            kv("name", Value::str(meta.name.clone())),
            kv("layer_structure", floats(&s.layer_structure)),
            kv("activation_func", Value::str(s.activation_func.name())),
            kv("is_layer_norm", Value::Bool(s.layer_norm)),
            kv("weight_initialization", Value::str(s.weight_init.name())),
            kv("sd_checkpoint", opt_str(&meta.sd_checkpoint)),
            kv("sd_checkpoint_name", opt_str(&meta.sd_checkpoint_name)),
            kv("activate_output", Value::Bool(s.activate_output)),
            kv("use_dropout", Value::Bool(s.uses_dropout())),
            kv("dropout_structure", floats(&dropout)),
            // webui: `dropout_structure[-2] != 0`
            kv(
                "last_layer_dropout",
                Value::Bool(dropout.len() >= 2 && dropout[dropout.len() - 2] != 0.0),
            ),
            kv("optional_info", opt_str(&meta.optional_info)),
        ]);
        Ok(Value::Dict(e))
    }

    /// Write webui's `.pt` (f32 weights) atomically.
    pub fn save_pt(&self, path: &Path, meta: &PtMeta) -> Result<(), String> {
        let v = self
            .to_value(meta)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        torch_pt::save(path, &v).map_err(|e| e.to_string())
    }

    /// Read a webui (or sdkit) hypernetwork `.pt` onto `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self, String> {
        let v = torch_pt::load(path).map_err(|e| e.to_string())?;
        Self::from_value(&v, device).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A network from the value of a webui file.
    pub fn from_value(v: &Value, device: &Device) -> Result<Self, String> {
        if !matches!(v, Value::Dict(_) | Value::OrderedDict(_)) {
            return Err("not a hypernetwork (the file does not hold a dict)".into());
        }
        let get = |k: &str| v.get_str(k).filter(|x| !matches!(x, Value::None));
        let layer_structure: Vec<f64> = match get("layer_structure") {
            Some(ls) => ls
                .items()
                .and_then(|it| it.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                .ok_or("layer_structure is not a list of numbers")?,
            None => vec![1.0, 2.0, 1.0],
        };
        let activation_func = match get("activation_func").map(|a| a.as_str()) {
            None => Activation::Linear,
            Some(Some(name)) => Activation::from_name(name).ok_or_else(|| {
                format!(
                    "activation_func `{name}` is not supported (one of: {})",
                    Activation::ALL.map(|a| a.name()).join(", ")
                )
            })?,
            Some(None) => return Err("activation_func is not a string".into()),
        };
        let weight_init = get("weight_initialization")
            .and_then(Value::as_str)
            .and_then(WeightInit::from_name)
            .unwrap_or(WeightInit::Normal);
        let dropout_structure: Option<Vec<f64>> = match get("dropout_structure") {
            Some(d) => Some(
                d.items()
                    .and_then(|it| it.iter().map(Value::as_f64).collect::<Option<Vec<_>>>())
                    .ok_or("dropout_structure is not a list of numbers")?,
            ),
            None => None,
        };
        let use_dropout = match &dropout_structure {
            Some(d) if d.iter().any(|&p| p != 0.0) => true,
            _ => get("use_dropout").is_some_and(Value::truthy),
        };
        let last_layer_dropout = get("last_layer_dropout").is_some_and(Value::truthy);
        let dropout_structure = dropout_structure.unwrap_or_else(|| {
            parse_dropout_structure(&layer_structure, use_dropout, last_layer_dropout)
        });
        let shape = HypernetworkShape {
            layer_structure,
            activation_func,
            weight_init,
            layer_norm: get("is_layer_norm").is_some_and(Value::truthy),
            use_dropout,
            dropout_structure: Some(dropout_structure),
            last_layer_dropout,
            // webui's default for files written before the key existed
            activate_output: get("activate_output").is_none_or(Value::truthy),
        };
        shape.validate()?;
        let key = Arc::new(AtomicU64::new(0));
        let mut rng = Rng::new(0);
        let mut modules = Vec::new();
        for (k, pair) in v.entries() {
            let Value::Int(w) = k else { continue };
            let w = usize::try_from(*w).map_err(|_| format!("bad context width {w}"))?;
            let sds = pair
                .items()
                .filter(|p| p.len() == 2)
                .ok_or(format!("entry {w} is not a (k, v) pair of state dicts"))?;
            let mut kv = Vec::new();
            for (j, sd) in sds.iter().enumerate() {
                let salt = 2 * modules.len() as u64 + j as u64;
                let m = HnModule::create(w, &shape, &mut rng, &key, salt, device)
                    .map_err(|e| e.to_string())?;
                fill(&m, sd, device).map_err(|e| format!("entry {w}: {e}"))?;
                kv.push(Arc::new(m));
            }
            let v = kv.pop().unwrap();
            let k = kv.pop().unwrap();
            modules.push((w, [k, v]));
        }
        if modules.is_empty() {
            return Err("no modules (no integer context-width keys): not a hypernetwork".into());
        }
        let s = |k: &str| get(k).and_then(Value::as_str).map(str::to_string);
        let meta = PtMeta {
            name: s("name").unwrap_or_default(),
            step: get("step").and_then(Value::as_int).unwrap_or(0),
            sd_checkpoint: s("sd_checkpoint"),
            sd_checkpoint_name: s("sd_checkpoint_name"),
            optional_info: s("optional_info"),
        };
        Ok(Self {
            shape,
            modules,
            dropout_key: key,
            meta,
        })
    }
}

/// webui's `fix_old_state_dict` names.
fn old_name(n: &str) -> Option<&'static str> {
    Some(match n {
        "linear.0.weight" => "linear1.weight",
        "linear.0.bias" => "linear1.bias",
        "linear.1.weight" => "linear2.weight",
        "linear.1.bias" => "linear2.bias",
        _ => return None,
    })
}

/// Set a module's weights from a state dict; missing, misshaped or extra keys are errors
/// (torch's strict `load_state_dict`).
fn fill(m: &HnModule, sd: &Value, device: &Device) -> Result<(), String> {
    let named = m.named_vars();
    for (n, var) in &named {
        let t = sd
            .get_str(n)
            .or_else(|| old_name(n).and_then(|o| sd.get_str(o)));
        let Some(Value::Tensor(t)) = t else {
            return Err(format!(
                "`{n}` missing (does layer_structure / is_layer_norm / activation_func match the weights?)"
            ));
        };
        if t.dims() != var.dims() {
            return Err(format!(
                "`{n}` has shape {:?}, the file's layer_structure gives {:?}",
                t.dims(),
                var.dims()
            ));
        }
        let t: Tensor = t
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(device))
            .map_err(|e| e.to_string())?;
        var.set(&t).map_err(|e| e.to_string())?;
    }
    let tensors = sd
        .entries()
        .iter()
        .filter(|(_, v)| matches!(v, Value::Tensor(_)))
        .count();
    if tensors != named.len() {
        return Err(format!(
            "holds {tensors} tensors, the file's layer_structure gives {}",
            named.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: Vec<f32>, shape: &[usize]) -> Value {
        Value::Tensor(Tensor::from_vec(v, shape, &Device::Cpu).unwrap())
    }

    /// A file from webui's first versions: `linear1` / `linear2` keys, no shape keys.
    fn old_sd() -> Value {
        Value::OrderedDict(vec![
            (
                Value::str("linear1.weight"),
                t(vec![1., 0., 0., 1., 1., 1., 0., 2.], &[4, 2]),
            ),
            (Value::str("linear1.bias"), t(vec![0., 0., 1., 0.], &[4])),
            (
                Value::str("linear2.weight"),
                t(vec![1., 0., 0., 0., 0., 0., 0., 1.], &[2, 4]),
            ),
            (Value::str("linear2.bias"), t(vec![0.5, -0.5], &[2])),
        ])
    }

    #[test]
    fn old_files_read_with_webuis_defaults() {
        let v = Value::Dict(vec![
            (Value::Int(2), Value::Tuple(vec![old_sd(), old_sd()])),
            (Value::str("name"), Value::str("old")),
        ]);
        let hn = Hypernetwork::from_value(&v, &Device::Cpu).unwrap();
        assert_eq!(hn.shape.layer_structure, vec![1.0, 2.0, 1.0]);
        assert_eq!(hn.shape.activation_func, Activation::Linear);
        assert!(
            hn.shape.activate_output,
            "webui's default for files without the key"
        );
        assert_eq!(hn.shape.dropout(), vec![0.0, 0.0, 0.0]);
        assert_eq!(hn.meta.name, "old");
        // x + W2 (W1 x + b1) + b2 for x = [1, 2]: W1 x + b1 = [1, 2, 4, 4],
        // W2 (.) + b2 = [1.5, 3.5], plus x: [2.5, 5.5].
        let x = Tensor::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
        let y = hn.modules[0].1[1].forward(&x, 1.0).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![2.5, 5.5]]);
    }

    #[test]
    fn mismatches_are_named() {
        let v = |extra: (Value, Value)| {
            Value::Dict(vec![
                (Value::Int(2), Value::Tuple(vec![old_sd(), old_sd()])),
                extra,
            ])
        };
        let e = Hypernetwork::from_value(
            &v((Value::str("activation_func"), Value::str("softsign"))),
            &Device::Cpu,
        )
        .unwrap_err();
        assert!(e.contains("activation_func `softsign`"), "{e}");
        let three = Value::List(vec![Value::Int(1), Value::Int(3), Value::Int(1)]);
        let e = Hypernetwork::from_value(&v((Value::str("layer_structure"), three)), &Device::Cpu)
            .unwrap_err();
        assert!(e.contains("has shape [4, 2]"), "{e}");
        let e = Hypernetwork::from_value(&Value::Dict(vec![]), &Device::Cpu).unwrap_err();
        assert!(e.contains("not a hypernetwork"), "{e}");
    }
}
