//! Command line: one options struct per subcommand (clap + serde, so YAML recipes use
//! the same names as the flags), parsing, and dispatch into the library.

pub mod caption;
pub mod review;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "sdkit",
    version,
    about = "A folder of photos to a trained Stable Diffusion adapter, in one binary."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Bulk caption edits (add/remove/replace/dedupe/sort/prune/normalize), stats, undo.
    Caption(caption::CaptionArgs),
    /// Review and fix captions image by image in the terminal.
    Review(review::ReviewArgs),
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Caption(a) => caption::run(a),
        Command::Review(a) => review::run(a),
    }
}
