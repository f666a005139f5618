//! `sdkit grid`: an X/Y/Z plot of adapters, weights and sampling settings.

use std::path::PathBuf;

use anyhow::bail;
use serde::{Deserialize, Serialize};

use super::sample::Precision;
use crate::grid::axes::{self, parse_axis};
use crate::grid::engine::EngineOptions;
use crate::grid::plan::{self, Settings};
use crate::grid::{Job, cell_files, estimate};
use crate::model::arch::Prediction;
use crate::train::options::DeviceArg;

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case")]
#[command(after_help = "Examples:\n  \
    sdkit grid --model model.safetensors --prompt \"ohwx, portrait\" --seed 1 \\\n    \
    --x \"lora=none,lora/ron-*.safetensors\" --y weight=0.4,0.7,1.0 --out grids/\n  \
    sdkit grid --model model.safetensors --prompt \"a red car\" --lora ron.safetensors \\\n    \
    --x \"cfg=4-10 (+3)\" --y prompt=red,blue --z seed=1,2 --dry-run\n  \
    sdkit grid --model model.safetensors --prompt \"a photo of mycat\" --seed 1 \\\n    \
    --x \"embedding=none,ti/mycat-*.safetensors\"\n  \
    sdkit grid --model model.safetensors --prompt \"a castle\" --seed 1 \\\n    \
    --x \"hypernetwork=none,hn/ink-*.pt\" --y weight=0.5,1\n\n\
Axes are KIND=VALUES: lora, embedding, hypernetwork (files, globs, `none` = without),\n\
weight (of the LoRA or hypernetwork), prompt (webui's S/R: the first value is searched\n\
for and replaced by each value), cfg, steps, sampler, seed, clip_skip, model\n\
(checkpoints, loaded per value). An embedding axis attaches each file under the word the\n\
prompt uses (--embedding-name). Values are comma separated;\n\
numbers take webui's ranges: 1-5, 1-5 (+2), 0.4-1.0 [4].\n\
Files: OUT/cells/z*-y*-x*.png (webui parameters), OUT/grid.png (grid-zN.png per Z value),\n\
OUT/grid.json, OUT/index.html. A re-run keeps cells rendered with identical settings.")]
pub struct GridArgs {
    /// Checkpoint: diffusers folder, .safetensors or .ckpt.
    #[arg(long, value_name = "CKPT")]
    pub model: Option<PathBuf>,
    /// Prompt (webui syntax).
    #[arg(long)]
    pub prompt: Option<String>,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    pub negative: String,
    /// Columns: KIND=VALUES.
    #[arg(long, value_name = "KIND=VALUES")]
    pub x: Option<String>,
    /// Rows: KIND=VALUES.
    #[arg(long, value_name = "KIND=VALUES")]
    pub y: Option<String>,
    /// One grid image per value: KIND=VALUES.
    #[arg(long, value_name = "KIND=VALUES")]
    pub z: Option<String>,
    /// A LoRA for every cell (when no lora axis), e.g. to vary its weight.
    #[arg(long, value_name = "FILE")]
    pub lora: Option<PathBuf>,
    /// Adapter weight when there is no weight axis: the LoRA's, and the hypernetwork's
    /// strength unless `--hypernetwork` gives one.
    #[arg(long, default_value_t = 1.0)]
    pub weight: f64,
    /// A webui hypernetwork `.pt` for every cell (when no hypernetwork axis), with an
    /// optional strength (default `--weight`).
    #[arg(long, value_name = "FILE[:STRENGTH]")]
    pub hypernetwork: Option<String>,
    /// A folder of textual-inversion embeddings for every cell (webui's `embeddings/`):
    /// each file is called by writing its file stem in the prompt.
    #[arg(long, value_name = "DIR")]
    pub embeddings: Option<PathBuf>,
    /// The word in the prompt that an embedding axis' files are attached under (default:
    /// the first file's stem without a save suffix: `mycat-000004` -> `mycat`).
    #[arg(long, value_name = "WORD")]
    pub embedding_name: Option<String>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.0)]
    pub cfg: f64,
    /// The seed of every cell (unless an axis varies it); random when not given.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Sampler (DDIM, "Euler a", "DPM++ 2M Karras"; also ddim, euler-a, dpm++2m-karras).
    #[arg(long, default_value = "euler-a")]
    pub sampler: String,
    #[arg(long, default_value_t = 512)]
    pub width: usize,
    #[arg(long, default_value_t = 512)]
    pub height: usize,
    /// webui's "Clip skip".
    #[arg(long, default_value_t = 1)]
    pub clip_skip: usize,
    /// Override the detected prediction type.
    #[arg(long, value_enum)]
    pub prediction: Option<Prediction>,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
    /// Where to compute (`cuda` needs a build with `--features cuda`).
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Output folder.
    #[arg(long, default_value = "grid")]
    pub out: PathBuf,
    /// Print the cells and an estimated time (one step is timed), render nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl Default for GridArgs {
    fn default() -> Self {
        Self {
            model: None,
            prompt: None,
            negative: String::new(),
            x: None,
            y: None,
            z: None,
            lora: None,
            weight: 1.0,
            hypernetwork: None,
            embeddings: None,
            embedding_name: None,
            steps: 20,
            cfg: 7.0,
            seed: None,
            sampler: "euler-a".into(),
            width: 512,
            height: 512,
            clip_skip: 1,
            prediction: None,
            precision: Precision::F32,
            device: DeviceArg::Cpu,
            out: "grid".into(),
            dry_run: false,
            json: false,
            quiet: false,
        }
    }
}

/// `FILE` or `FILE:WEIGHT` (the weight is what follows the last `:` when it is a number).
fn file_weight(arg: &str) -> (PathBuf, Option<f64>) {
    if let Some((f, w)) = arg.rsplit_once(':')
        && let Ok(w) = w.parse::<f64>()
    {
        return (PathBuf::from(f), Some(w));
    }
    (PathBuf::from(arg), None)
}

/// The job of the arguments; every value and file checked.
pub fn job(a: &GridArgs) -> anyhow::Result<Job> {
    let Some(model) = a.model.clone() else {
        bail!("give --model CKPT (a diffusers folder, .safetensors or .ckpt)");
    };
    let Some(prompt) = a.prompt.clone() else {
        bail!("give --prompt TEXT");
    };
    if a.steps == 0 || a.clip_skip == 0 {
        bail!("--steps and --clip-skip must be at least 1");
    }
    if a.width == 0 || a.height == 0 || a.width % 8 != 0 || a.height % 8 != 0 {
        bail!(
            "--width / --height: {}x{} is not a multiple of 8",
            a.width,
            a.height
        );
    }
    let sampler = axes::parse_sampler(&a.sampler).map_err(|e| anyhow::anyhow!("--sampler: {e}"))?;
    let axis = |flag: &str, v: &Option<String>| -> anyhow::Result<Option<axes::Axis>> {
        v.as_deref()
            .map(|s| parse_axis(s).map_err(|e| anyhow::anyhow!("--{flag}: {e}")))
            .transpose()
    };
    let (x, y, z) = (axis("x", &a.x)?, axis("y", &a.y)?, axis("z", &a.z)?);
    let (hypernetwork, strength) = match &a.hypernetwork {
        Some(h) => {
            let (f, st) = file_weight(h);
            (Some(f), st.unwrap_or(a.weight))
        }
        None => (None, a.weight),
    };
    let base = Settings {
        model,
        lora: a.lora.clone(),
        weight: a.weight,
        embedding: None,
        embedding_name: a.embedding_name.clone(),
        embeddings: a.embeddings.clone(),
        hypernetwork,
        strength,
        prompt,
        negative: a.negative.clone(),
        steps: a.steps,
        cfg: a.cfg,
        sampler,
        seed: a.seed.unwrap_or_else(super::sample::random_seed),
        clip_skip: a.clip_skip,
        width: a.width,
        height: a.height,
    };
    let plan = plan::build(&base, x, y, z).map_err(anyhow::Error::msg)?;
    let dtype = match a.precision {
        Precision::F32 => candle_core::DType::F32,
        Precision::F16 => candle_core::DType::F16,
        Precision::Bf16 => candle_core::DType::BF16,
    };
    Ok(Job {
        plan,
        out: a.out.clone(),
        engine: EngineOptions {
            dtype,
            device: crate::train::run::device(a.device)?,
            prediction: a.prediction,
        },
        hidden: a.quiet || a.json,
    })
}

pub fn run(a: GridArgs) -> anyhow::Result<i32> {
    let job = job(&a)?;
    let (nx, ny, nz) = job.plan.dims();
    if a.dry_run {
        let (_, files) = cell_files(&job)?;
        let est = estimate(&job, &files)?;
        if a.json {
            let cells: Vec<serde_json::Value> = job
                .plan
                .cells
                .iter()
                .zip(&files)
                .map(|(c, f)| {
                    serde_json::json!({
                        "x": c.x, "y": c.y, "z": c.z, "file": f.file, "done": f.done,
                        "parameters": f.parameters, "settings": c.settings,
                    })
                })
                .collect();
            let v = serde_json::json!({ "cells": cells, "estimate": est });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            for f in &files {
                let state = if f.done { "done" } else { "render" };
                let one_line = f.parameters.replace('\n', " | ");
                println!("{state:6} {}  {one_line}", f.file);
            }
            println!(
                "{nx}x{ny}x{nz} cells, {} to render ({} UNet steps, {} model load(s)): about {:.0}s \
                 ({:.2}s per step, {:.2}s per decode, {:.1}s per load)",
                est.to_render,
                est.unet_steps,
                est.model_loads,
                est.seconds,
                est.step_seconds,
                est.decode_seconds,
                est.load_seconds
            );
        }
        return Ok(0);
    }
    let o = crate::grid::run(&job)?;
    for w in &o.warnings {
        eprintln!("warning: {w}");
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&o)?);
    } else if !a.quiet {
        for g in &o.grids {
            println!("{}", g.display());
        }
        println!(
            "{nx}x{ny}x{nz} cells: {} rendered, {} kept; {} model load(s), {} adapter merge(s), \
             {} prompt encoding(s); {:.1}s. Index: {}",
            o.rendered,
            o.kept,
            o.work.model_loads,
            o.work.adapter_merges,
            o.work.prompt_encodes,
            o.seconds,
            o.out.join("index.html").display()
        );
    }
    Ok(0)
}
