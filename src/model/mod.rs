//! Stable Diffusion model core on candle.
//!
//! Module and parameter paths follow the diffusers / Hugging Face names so adapter keys map
//! one to one. `tokenizer`/`prompt` turn text into CLIP ids (A1111 emphasis, `BREAK`,
//! 75-token chunks; kohya's max_token_length); `nn` holds the layers (frozen or trainable
//! weights, low-rank delta slots, differentiable norms and softmax), `weights` the tensor
//! map they load from, `clip` the SD1 / SD2 text encoders, `attention` the tiled attention.

pub mod io;
pub mod nn;
pub mod sampling;
pub mod text;
pub mod unet;
pub mod vae;

// The parts by their short names (`model::clip`, `model::loader`, ...).
pub use io::{arch, keymap, loader, weights};
pub use nn::{attention, grad};
pub use sampling::{pipeline, rng, samplers, schedule};
pub use text::{clip, placeholders, prompt, tokenizer};

pub use text::clean as clean_text;
pub use tokenizer::{BOS, ClipTokenizer, EOS};
pub use weights::Weights;

/// Errors from loading or running the model core.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{file}: missing tensor `{key}`")]
    MissingKey { file: String, key: String },
    #[error("{file}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    Shape {
        file: String,
        key: String,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("{file}: {reason}")]
    Format { file: String, reason: String },
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// For closures that candle calls (custom ops): candle errors pass through unchanged.
impl From<ModelError> for candle_core::Error {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Candle(c) => c,
            e => candle_core::Error::Msg(e.to_string()),
        }
    }
}
