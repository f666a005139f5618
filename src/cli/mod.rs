//! Command line: one options struct per subcommand (clap + serde, so YAML recipes use
//! the same names as the flags), parsing, and dispatch into the library.

pub mod tag;

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
    /// Tag images with a DeepDanbooru or WD14 ONNX tagger (needs onnxruntime).
    #[command(
        after_help = "Example:\n  sdkit tag photos/ --model-dir wd-v1-4-convnext-tagger-v2/ --trigger ohwx --existing overwrite\n\n\
ONNX Runtime is loaded at run time: set ORT_DYLIB_PATH, or `pip install onnxruntime==1.31.1`\n\
into ./.venv or the active virtualenv."
    )]
    Tag(tag::TagArgs),
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Tag(a) => tag::run(a),
    }
}
