//! Adapters trained on top of a frozen model: LoRA / LoCon (`lora`), textual-inversion
//! embeddings (`embedding`, attached to the text encoder's token lookup). Each owns its
//! f32 Vars; LoRA attaches to the model's layers through the named-layer walk
//! ([`crate::model::nn::walk`]).

pub mod embedding;
pub mod lora;
pub mod swap;
