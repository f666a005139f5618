//! Text to conditioning: tokenizer (CLIP BPE), clean (ftfy-style), prompt (A1111 emphasis,
//! `BREAK`, 75-token chunks) and the CLIP text encoders.

mod clean;
pub mod clip;
mod html;
pub mod placeholders;
pub mod prompt;
pub mod tokenizer;

pub use clean::clean;
