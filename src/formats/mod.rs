//! External file formats sdkit writes and reads so other tools accept its output.
//!
//! `png_params`: the AUTOMATIC1111 `parameters` text chunk (PNG Info) of generated images.

pub mod png_params;
