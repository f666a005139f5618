//! Inference over the model: the DDPM schedule, samplers, torch-compatible noise and the
//! text-to-image pipeline.

pub mod pipeline;
pub mod rng;
pub mod samplers;
pub mod schedule;
