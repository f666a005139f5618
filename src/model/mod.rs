//! The Stable Diffusion model side. So far: the CLIP BPE tokenizer and its text cleanup,
//! and prompts (A1111 emphasis, `BREAK`, 75-token chunks; kohya's max_token_length).

mod clean;
mod html;
pub mod prompt;
pub mod tokenizer;

pub use clean::clean as clean_text;
pub use tokenizer::{BOS, ClipTokenizer, EOS};
