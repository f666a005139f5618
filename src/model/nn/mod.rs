//! Layers with diffusers paths and adapter slots (`layers`), the named-layer walk adapters
//! attach through (`walk`), frozen-operand ops whose backward skips weight gradients
//! (`grad`), gradient checkpointing (`checkpoint`), and the tiled / fused attention.

pub mod attention;
#[cfg(target_arch = "x86_64")]
mod attention_avx512;
mod attention_cpu;
#[cfg(target_arch = "x86_64")]
mod attention_fast;
mod attention_generic;
pub mod checkpoint;
mod conv_cpu;
mod fastmath;
mod fused_cpu;
pub mod grad;
mod layers;
pub mod layout;
mod lowrank_cpu;
mod upconv_cpu;
pub mod winograd_cpu;

pub use layers::*;
pub mod walk;
