//! Small shared helpers: atomic writes, progress reporting, memory budget.

pub mod alloc;
pub mod atomic;
pub mod budget;
pub mod progress;

pub use atomic::{write_atomic, write_atomic_with};
