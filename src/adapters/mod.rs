//! Adapters trained on top of a frozen model: LoRA / LoCon (`lora`), webui hypernetworks
//! (`hypernetwork`, through the UNet's context hooks). Each owns its f32 Vars.

pub mod hypernetwork;
pub mod lora;
pub mod swap;
