//! The trainer: one loop for every method over the model core and the adapters.
//!
//! `options` (kohya's names and defaults), `data` (folders, repeats, reg balance,
//! buckets, batches, caption pipeline), `latents` (encode + cache), `objective` (noise,
//! targets, losses, weights), `optim` (optimizers with saveable state, clipping), `fused` (the
//! fused backward pass), `lr` (schedules), `rng` (named random streams: exact resume), `state` (save / resume),
//! `metadata` (kohya's `ss_*` header), `samples` (prompt file images), `templates` (textual-inversion prompts), `grid` (the
//! grid of a run's saves), `run`
//! (the loop).

pub mod data;
pub mod dreambooth;
pub mod fused;
pub mod grid;
pub mod latents;
pub mod lr;
pub mod metadata;
pub mod method;
pub mod objective;
pub mod optim;
pub mod options;
pub mod rng;
pub mod run;
pub mod samples;
pub mod state;
pub mod templates;
