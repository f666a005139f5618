//! Command line: one options struct per subcommand (clap + serde, so YAML recipes use
//! the same names as the flags), parsing, and dispatch into the library.

use clap::{CommandFactory, Parser, Subcommand};

pub mod caption;
pub mod check;
pub mod config;
pub mod grid;
pub mod models;
pub mod prep;
pub mod review;
pub mod sample;
pub mod tag;
pub mod tokens;
pub mod train;

#[derive(Debug, Parser)]
#[command(
    name = "sdkit",
    version,
    about = "A folder of photos to a trained Stable Diffusion adapter, in one binary.",
    args_override_self = true,
    after_help = "Every command takes --config RECIPE.yaml: keys are its long option names.\nExample:\n  sdkit prep photos/ --out train --name ron --repeats 10"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Resize, crop and bucket photos into a kohya training folder.
    Prep(crate::dataset::prep::PrepOptions),
    /// Bulk caption edits (add/remove/replace/dedupe/sort/prune/normalize), stats, undo.
    Caption(caption::CaptionArgs),
    /// Review and fix captions image by image in the terminal.
    Review(review::ReviewArgs),
    /// CLIP token ids and 75-token chunks of a prompt, or the token budget of captions.
    Tokens(tokens::TokensArgs),
    /// Tag images with a DeepDanbooru or WD14 ONNX tagger (needs onnxruntime).
    #[command(
        after_help = "Example:\n  sdkit tag photos/ --model wd14-convnext-v2\n  \
sdkit tag photos/ --model-dir wd-v1-4-convnext-tagger-v2/ --trigger ohwx --existing overwrite\n\n\
--model takes a file, a known name (sdkit models list) or a hub repo (owner/repo).\n\
ONNX Runtime is loaded at run time: `sdkit models fetch onnxruntime`, or set ORT_DYLIB_PATH,\n\
or `pip install onnxruntime==1.31.1` into the active virtualenv."
    )]
    Tag(tag::TagArgs),
    /// Text to image from an SD 1.x / 2.x checkpoint; PNGs carry webui's parameters.
    Sample(sample::SampleArgs),
    /// Dataset doctor: image counts, steps, duplicates, small images, captions, trigger, buckets.
    Check(check::CheckOptions),
    /// Train an adapter (LoRA / LoCon) on a kohya-style dataset.
    #[command(
        after_help = "Example:\n  sdkit train lora --model model.safetensors --data train/ --out lora/ --output-name ron --network-dim 32 --network-alpha 16 --learning-rate 1e-4 --max-train-epochs 10"
    )]
    Train(train::TrainArgs),
    /// X/Y/Z plot: adapter files x weights x settings, labelled grid images, cell PNGs, index.
    Grid(grid::GridArgs),
    /// Known models (taggers, matting, checkpoints, onnxruntime): list them, fetch them.
    Models(models::ModelsArgs),
}

/// Parses argv, expanding `--config` recipes first.
/// `--max-token-length` (check, tokens): the values kohya's `max_token_length` accepts.
pub(crate) fn parse_max_token_length(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n @ (75 | 150 | 225)) => Ok(n),
        _ => Err(format!("{s:?}: kohya accepts 75, 150 or 225")),
    }
}

pub fn parse() -> anyhow::Result<Cli> {
    let args = config::expand(std::env::args_os().collect(), &Cli::command())?;
    Ok(Cli::parse_from(args))
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Prep(o) => prep::run(o),
        Command::Caption(a) => caption::run(a),
        Command::Review(a) => review::run(a),
        Command::Tokens(a) => tokens::run(a),
        Command::Tag(a) => tag::run(a),
        Command::Sample(a) => sample::run(a),
        Command::Check(o) => check::run(o),
        Command::Train(a) => train::run(a),
        Command::Grid(a) => grid::run(a),
        Command::Models(a) => models::run(a),
    }
}
