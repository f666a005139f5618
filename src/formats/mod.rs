//! External file formats sdkit writes and reads so other tools accept its output.
//!
//! `png_params`: the AUTOMATIC1111 `parameters` text chunk (PNG Info) of generated images.
//! `safetensors`: reading tensors one at a time (peak memory = the tensors, not twice);
//! writing and reading small files with metadata (adapters, states, latents).
//! `kohya_lora`: LoRA files with kohya's metadata and hashes. `tensorboard`: event files.
//! `torch_pt`: torch's zip-pickle `.pt` (webui hypernetworks and embeddings).

pub mod kohya_lora;
pub mod png_params;
pub mod safetensors;
pub mod sd_checkpoint;
pub mod tensorboard;
pub mod torch_pt;
