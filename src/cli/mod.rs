//! Command line: one options struct per subcommand (clap + serde, so YAML recipes use
//! the same names as the flags), parsing, and dispatch into the library.

use clap::{Parser, Subcommand};

pub mod tokens;

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
    /// CLIP token ids and 75-token chunks of a prompt, or the token budget of captions.
    Tokens(tokens::TokensArgs),
}

/// Runs a parsed command line; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Tokens(a) => tokens::run(a),
    }
}
