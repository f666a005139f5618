//! Adapters trained on top of a frozen model: LoRA / LoCon (`lora`, attached to the
//! model's layers through the named-layer walk [`crate::model::nn::walk`]), textual-inversion
//! embeddings (`embedding`, the text encoder's token lookup) and webui hypernetworks
//! (`hypernetwork`, the UNet's attention context hooks). Each owns its f32 Vars.

pub mod embedding;
pub mod hypernetwork;
pub mod lora;
pub mod swap;

use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// Sets `var` to the saved tensor `key` of `tensors` (any float dtype and device) for a
/// resume: missing or of another shape is an error that ends with `hint` (what differs).
pub(crate) fn restore_var(
    var: &Var,
    tensors: &BTreeMap<String, Tensor>,
    key: &str,
    hint: &str,
) -> Result<(), String> {
    let t = tensors
        .get(key)
        .ok_or_else(|| format!("missing `{key}` ({hint})"))?;
    if t.dims() != var.dims() {
        return Err(format!(
            "`{key}` has shape {:?}, expected {:?} ({hint})",
            t.dims(),
            var.dims()
        ));
    }
    t.to_dtype(DType::F32)
        .and_then(|t| t.to_device(var.device()))
        .and_then(|t| var.set(&t))
        .map_err(|e| e.to_string())
}
