//! sdkit: a folder of photos to a trained Stable Diffusion adapter.
//!
//! The modules follow the data: `dataset` (scan, decode, resize, bucket, layout,
//! captions) feeds the later stages. `cli` is a thin layer over the library.

pub mod adapters;
pub mod caption;
pub mod check;
pub mod cli;
pub mod dataset;
pub mod formats;
pub mod grid;
pub mod hub;
pub mod matte;
pub mod model;
pub mod review;
pub mod tag;
pub mod train;
pub mod util;
