//! Checkpoint input: the tensor map layers load from (`weights`), architecture detection
//! (`arch`), key mapping between LDM / OpenCLIP / diffusers names (`keymap`) and the
//! loader for diffusers folders, single files and `.ckpt`. The one place that knows
//! external names.

pub mod arch;
pub mod keymap;
pub mod loader;
pub mod weights;
