//! Adapters trained on top of a frozen model: LoRA / LoCon (`lora`, attached to the
//! model's layers through the named-layer walk [`crate::model::nn::walk`]), textual-inversion
//! embeddings (`embedding`, the text encoder's token lookup) and webui hypernetworks
//! (`hypernetwork`, the UNet's attention context hooks). Each owns its f32 Vars.

pub mod embedding;
pub mod hypernetwork;
pub mod lora;
pub mod swap;
