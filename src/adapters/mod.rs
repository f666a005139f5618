//! Adapters trained on top of a frozen model: LoRA / LoCon (`lora`). Each attaches to the
//! model's layers through the named-layer walk ([`crate::model::nn::walk`]) and owns its
//! f32 Vars.

pub mod lora;
pub mod swap;
