//! `sdkit tokens`: CLIP token ids and 75-token chunks of a prompt, or the token budget
//! of every caption in a folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::dataset::caption_io::read_caption;
use crate::model::ClipTokenizer;
use crate::model::prompt::{self, CHUNK, ChunkOptions, Pad};

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
#[command(after_help = "Examples:\n  \
    sdkit tokens \"masterpiece, (red hair:1.2), smile BREAK outdoors\"\n  \
    sdkit tokens --json --pad sd2 \"a photo of sks dog\"\n  \
    sdkit tokens --captions dataset/ --caption-ext .txt --strict")]
pub struct TokensArgs {
    /// The prompt (A1111 syntax: (x), (x:1.3), [x], \( \), BREAK).
    #[arg(required_unless_present = "captions", conflicts_with = "captions")]
    pub prompt: Option<String>,
    /// Report the token count of every caption file under this folder instead.
    #[arg(long, value_name = "DIR")]
    pub captions: Option<PathBuf>,
    /// Caption file extension for --captions.
    #[arg(long, default_value = ".txt")]
    pub caption_ext: String,
    /// Padding after EOS: sd1 (EOS 49407, CLIP ViT-L) or sd2 (0, open_clip ViT-H).
    #[arg(long, value_enum, default_value_t = Pad::Sd1)]
    pub pad: Pad,
    /// kohya's max_token_length (75, 150 or 225): captions longer lose their tail.
    #[arg(long, default_value_t = 75, value_parser = super::parse_max_token_length)]
    pub max_token_length: usize,
    /// A1111 "Prompt word wrap length limit": a full chunk moves the text after its last
    /// comma to the next chunk if the comma is within this many tokens (0 = off).
    #[arg(long, default_value_t = 20)]
    pub comma_backtrack: usize,
    /// With --captions: exit 1 when any caption spills past the first 75 tokens.
    #[arg(long)]
    pub strict: bool,
    /// Machine-readable output on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar; with --captions list only the captions that spill.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for TokensArgs {
    fn default() -> Self {
        TokensArgs {
            prompt: None,
            captions: None,
            caption_ext: ".txt".into(),
            pad: Pad::Sd1,
            max_token_length: 75,
            comma_backtrack: 20,
            strict: false,
            json: false,
            quiet: false,
        }
    }
}

pub fn run(args: TokensArgs) -> anyhow::Result<i32> {
    super::parse_max_token_length(&args.max_token_length.to_string())
        .map_err(anyhow::Error::msg)?;
    match (&args.prompt, &args.captions) {
        (_, Some(dir)) => run_captions(&args, dir),
        (Some(p), None) => run_prompt(&args, p),
        (None, None) => bail!("give a prompt or --captions DIR"),
    }
}

#[derive(Serialize)]
struct ChunkReport {
    used: usize,
    tokens: Vec<u32>,
    weights: Vec<f64>,
    pieces: Vec<String>,
}

#[derive(Serialize)]
struct PromptReport<'a> {
    prompt: &'a str,
    pad: Pad,
    /// A1111's count: 75 per chunk before the last, plus the last chunk's tokens.
    token_count: usize,
    /// A1111's "N/target": chunks × 75.
    target: usize,
    fragments: Vec<prompt::Fragment>,
    chunks: Vec<ChunkReport>,
}

fn run_prompt(args: &TokensArgs, text: &str) -> anyhow::Result<i32> {
    let tok = ClipTokenizer::shared();
    let fragments = prompt::parse_attention(text).context("cannot parse the prompt")?;
    let opts = ChunkOptions {
        pad: args.pad,
        comma_backtrack: args.comma_backtrack,
    };
    let (chunks, token_count) = prompt::a1111_chunks(tok, &fragments, opts);
    let report = PromptReport {
        prompt: text,
        pad: args.pad,
        token_count,
        target: chunks.len() * CHUNK,
        fragments,
        chunks: chunks
            .into_iter()
            .map(|c| ChunkReport {
                pieces: c.tokens[1..=c.used]
                    .iter()
                    .map(|&id| tok.piece(id).to_string())
                    .collect(),
                used: c.used,
                tokens: c.tokens,
                weights: c.weights,
            })
            .collect(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(0);
    }
    let n = report.chunks.len();
    println!(
        "{} tokens in {n} chunk{} ({}/{} as A1111 counts)",
        report.chunks.iter().map(|c| c.used).sum::<usize>(),
        if n == 1 { "" } else { "s" },
        report.token_count,
        report.target
    );
    for (k, c) in report.chunks.iter().enumerate() {
        println!(
            "chunk {}/{n}: {} tokens, {} free (sent as BOS {} + 75 + EOS {}, padded with {})",
            k + 1,
            c.used,
            CHUNK - c.used,
            c.tokens[0],
            crate::model::EOS,
            args.pad.id()
        );
        for (i, piece) in c.pieces.iter().enumerate() {
            let w = c.weights[i + 1];
            let weight = if w == 1.0 {
                String::new()
            } else {
                format!("  x{w:.4}")
            };
            println!("  {:>3}  {:>5}  {piece}{weight}", i + 1, c.tokens[i + 1]);
        }
    }
    Ok(0)
}

#[derive(Serialize)]
struct CaptionReport {
    path: PathBuf,
    tokens: usize,
    /// More than 75 tokens: past the first chunk.
    spill: bool,
    /// Tokens kohya drops with the chosen max_token_length.
    dropped: usize,
    /// The text past the first 75 tokens.
    #[serde(skip_serializing_if = "String::is_empty")]
    overflow: String,
}

#[derive(Serialize)]
struct Failure {
    path: PathBuf,
    error: String,
}

#[derive(Serialize, Default)]
struct Summary {
    captions: usize,
    spill: usize,
    truncated: usize,
    failed: usize,
    max_tokens: usize,
    mean_tokens: f64,
    max_token_length: usize,
}

fn caption_files(dir: &Path, ext: &str) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("{}: not a folder", dir.display());
    }
    let want = ext.trim_start_matches('.').to_ascii_lowercase();
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(dir) {
        let entry = entry.with_context(|| format!("{}: cannot list", dir.display()))?;
        let p = entry.path();
        let matches = p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case(&want));
        if entry.file_type().is_file() && matches {
            files.push(p.to_path_buf());
        }
    }
    files.sort();
    Ok(files)
}

fn run_captions(args: &TokensArgs, dir: &Path) -> anyhow::Result<i32> {
    let files = caption_files(dir, &args.caption_ext)?;
    let tok = ClipTokenizer::shared();
    let bar = crate::util::progress::bar(files.len() as u64, "tokens", args.quiet || args.json);
    let results: Vec<Result<CaptionReport, Failure>> = files
        .par_iter()
        .map(|path| {
            let r = caption_report(tok, path, args.max_token_length);
            bar.inc(1);
            r
        })
        .collect();
    bar.finish_and_clear();

    let mut reports = Vec::new();
    let mut failures = Vec::new();
    for r in results {
        match r {
            Ok(c) => reports.push(c),
            Err(f) => failures.push(f),
        }
    }
    let total: usize = reports.iter().map(|c| c.tokens).sum();
    let summary = Summary {
        captions: reports.len(),
        spill: reports.iter().filter(|c| c.spill).count(),
        truncated: reports.iter().filter(|c| c.dropped > 0).count(),
        failed: failures.len(),
        max_tokens: reports.iter().map(|c| c.tokens).max().unwrap_or(0),
        mean_tokens: if reports.is_empty() {
            0.0
        } else {
            total as f64 / reports.len() as f64
        },
        max_token_length: args.max_token_length,
    };
    let rel = |p: &Path| p.strip_prefix(dir).unwrap_or(p).display().to_string();
    if args.json {
        #[derive(Serialize)]
        struct Out<'a> {
            captions: &'a [CaptionReport],
            failures: &'a [Failure],
            summary: &'a Summary,
        }
        let out = Out {
            captions: &reports,
            failures: &failures,
            summary: &summary,
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for f in &failures {
            eprintln!("error: {}", f.error);
        }
        for c in &reports {
            if c.spill {
                let cut = if c.dropped > 0 {
                    format!(", kohya drops {}", c.dropped)
                } else {
                    String::new()
                };
                println!(
                    "{:>5}  {}  SPILL +{}{cut}: {:?}",
                    c.tokens,
                    rel(&c.path),
                    c.tokens - CHUNK,
                    short(&c.overflow, 60)
                );
            } else if !args.quiet {
                println!("{:>5}  {}", c.tokens, rel(&c.path));
            }
        }
        println!(
            "{} captions: {} within 75 tokens, {} spill past the first chunk, {} truncated at \
             max_token_length {}; longest {} tokens, mean {:.1}; {} failed",
            summary.captions,
            summary.captions - summary.spill,
            summary.spill,
            summary.truncated,
            summary.max_token_length,
            summary.max_tokens,
            summary.mean_tokens,
            summary.failed
        );
        if summary.spill > 0 {
            println!(
                "note: kohya (max_token_length 75) trains on the first 75 tokens only; \
                 A1111 would encode a second 75-token chunk"
            );
        }
    }
    let code = if summary.failed > 0 || (args.strict && summary.spill > 0) {
        1
    } else {
        0
    };
    Ok(code)
}

fn caption_report(
    tok: &ClipTokenizer,
    path: &Path,
    max_token_length: usize,
) -> Result<CaptionReport, Failure> {
    let caption = match read_caption(path) {
        Ok(Some(c)) => c,
        Ok(None) => {
            return Err(Failure {
                path: path.into(),
                error: format!("{}: caption file vanished", path.display()),
            });
        }
        Err(e) => {
            return Err(Failure {
                path: path.into(),
                error: e.to_string(),
            });
        }
    };
    let ids = tok.encode(&caption.text);
    let overflow = if ids.len() > CHUNK {
        tok.decode(&ids[CHUNK..]).trim().to_string()
    } else {
        String::new()
    };
    Ok(CaptionReport {
        path: path.into(),
        tokens: ids.len(),
        spill: ids.len() > CHUNK,
        dropped: ids.len().saturating_sub(max_token_length),
        overflow,
    })
}

fn short(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        return s.to_string();
    }
    let mut t: String = s.chars().take(max).collect();
    t.push('…');
    t
}
