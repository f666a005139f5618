//! `--grid-prompt`: when a run ends, a grid of its saves is rendered into OUT/grid/ by
//! the grid library (`crate::grid`), the files `sdkit grid` writes. Columns: the
//! reference (no adapter, or the base model for DreamBooth), then every save of the run
//! in order, the final one last; rows: the adapter's weights (LoRA) or strengths
//! (hypernetwork), one row for textual inversion and DreamBooth. The options are checked
//! before the model loads; what the method adds (weights, the embedding's word in the
//! prompt) before training starts.

use super::options::TrainOptions;
use crate::grid::axes::{self, Axis, AxisKind, Value};
use crate::grid::plan::{self, Settings};
use crate::model::samplers::SamplerKind;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What the columns of a method's grid vary.
#[derive(Clone, Debug, PartialEq)]
pub enum Columns {
    Lora,
    Hypernetwork,
    /// Embedding files, attached under this word.
    Embedding(String),
    /// Checkpoints (DreamBooth); the reference column is the base model.
    Model,
}

impl Columns {
    fn kind(&self) -> AxisKind {
        match self {
            Self::Lora => AxisKind::Lora,
            Self::Hypernetwork => AxisKind::Hypernetwork,
            Self::Embedding(_) => AxisKind::Embedding,
            Self::Model => AxisKind::Model,
        }
    }
}

/// The rows of an adapter's grid when `--grid-weights` is not given.
pub const DEFAULT_WEIGHTS: [f64; 3] = [0.4, 0.7, 1.0];
pub const DEFAULT_STEPS: usize = 20;
pub const DEFAULT_CFG: f64 = 7.0;

/// The checked `--grid-*` options of a run.
#[derive(Clone, Debug)]
pub struct Spec {
    pub columns: Columns,
    pub prompt: String,
    pub negative: String,
    /// The Y axis; `None`: one row (no weight).
    pub weights: Option<Vec<f64>>,
    /// `None`: the run's seed.
    pub seed: Option<u64>,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: SamplerKind,
    pub width: usize,
    pub height: usize,
}

/// What `--dry-run` shows of the grid (and `--json` reports in the plan).
#[derive(Clone, Debug, Serialize)]
pub struct Preview {
    pub out: PathBuf,
    pub columns: Vec<String>,
    pub rows: Vec<String>,
    pub cells: usize,
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: String,
    pub width: usize,
    pub height: usize,
}

/// Where the grid goes.
pub fn out_dir(o: &TrainOptions) -> PathBuf {
    o.out.join("grid")
}

/// The options as given (no method yet): `None` without `--grid-prompt`. Errors name the
/// option; `resolution` is the training one (the default cell size).
fn parse(o: &TrainOptions, resolution: (u32, u32)) -> Result<Option<Spec>, String> {
    let Some(prompt) = &o.grid_prompt else {
        let given = [
            ("--grid-negative", o.grid_negative.is_some()),
            ("--grid-weights", o.grid_weights.is_some()),
            ("--grid-seed", o.grid_seed.is_some()),
            ("--grid-steps", o.grid_steps.is_some()),
            ("--grid-cfg", o.grid_cfg.is_some()),
            ("--grid-sampler", o.grid_sampler.is_some()),
            ("--grid-width", o.grid_width.is_some()),
            ("--grid-height", o.grid_height.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(format!(
                "{flag}: there is no grid without --grid-prompt (the prompt of its cells)"
            ));
        }
        return Ok(None);
    };
    if prompt.trim().is_empty() {
        return Err("--grid-prompt is empty".into());
    }
    let weights = match &o.grid_weights {
        Some(w) => {
            let bad = |e: String| format!("--grid-weights {w:?}: {e}");
            let items = axes::split_values(w).map_err(bad)?;
            if items.is_empty() {
                return Err(bad("no values".into()));
            }
            Some(axes::expand_floats(&items).map_err(bad)?)
        }
        None => None,
    };
    let steps = o.grid_steps.unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err("--grid-steps must be at least 1".into());
    }
    let cfg = o.grid_cfg.unwrap_or(DEFAULT_CFG);
    if !cfg.is_finite() {
        return Err(format!("--grid-cfg {cfg}: not a number"));
    }
    let size = |flag: &str, v: Option<usize>, train: u32| match v {
        Some(v) if v == 0 || !v.is_multiple_of(8) => Err(format!("{flag} {v}: a multiple of 8")),
        Some(v) => Ok(v),
        None if !train.is_multiple_of(8) => Err(format!(
            "{flag}: the training resolution {train} (the default) is not a multiple of 8; give {flag}"
        )),
        None => Ok(train as usize),
    };
    Ok(Some(Spec {
        // The method's columns are set by `spec`.
        columns: Columns::Lora,
        prompt: prompt.clone(),
        negative: o.grid_negative.clone().unwrap_or_default(),
        weights,
        seed: o.grid_seed,
        steps,
        cfg,
        sampler: super::run::sampler_kind(o.grid_sampler.unwrap_or(DEFAULT_SAMPLER)),
        width: size("--grid-width", o.grid_width, resolution.0)?,
        height: size("--grid-height", o.grid_height, resolution.1)?,
    }))
}

/// `--grid-sampler`'s default.
pub const DEFAULT_SAMPLER: super::options::SampleSampler = super::options::SampleSampler::EulerA;

/// Checks the options that need no method (part of [`TrainOptions::validate`]).
pub fn check(o: &TrainOptions) -> Result<(), String> {
    let res = o.resolution()?;
    parse(o, res).map(|_| ())
}

/// The grid of a run of the method whose saves `columns` vary; `None` without
/// `--grid-prompt`.
pub fn spec(
    o: &TrainOptions,
    columns: Columns,
    resolution: (u32, u32),
) -> Result<Option<Spec>, String> {
    let Some(mut s) = parse(o, resolution)? else {
        return Ok(None);
    };
    match &columns {
        Columns::Lora | Columns::Hypernetwork => {
            s.weights.get_or_insert_with(|| DEFAULT_WEIGHTS.to_vec());
        }
        Columns::Embedding(name) => {
            if s.weights.is_some() {
                return Err(
                    "--grid-weights: an embedding has no weight (its grid has one row)".into(),
                );
            }
            let tok = crate::model::tokenizer::ClipTokenizer::shared();
            let mentions =
                |p: &str| crate::model::placeholders::Placeholders::mentions(tok, p, name);
            if !mentions(&s.prompt) && !mentions(&s.negative) {
                return Err(format!(
                    "--grid-prompt {:?}: the prompt never uses `{name}`, the word that calls the embedding",
                    s.prompt
                ));
            }
        }
        Columns::Model => {
            if s.weights.is_some() {
                return Err(
                    "--grid-weights: a DreamBooth checkpoint has no weight (its grid has one row)"
                        .into(),
                );
            }
        }
    }
    s.columns = columns;
    Ok(Some(s))
}

/// The files a run will save, in order (periodic saves, then the final one), left after
/// `--save-last-n`: what the columns of `--dry-run`'s grid show.
pub fn planned_saves(
    o: &TrainOptions,
    ext: &str,
    steps_per_epoch: u64,
    total_steps: u64,
) -> Vec<PathBuf> {
    let name = &o.output_name;
    // (step, epoch file after a step file at the same step, file)
    let mut steps: Vec<(u64, u8, String)> = Vec::new();
    let mut epochs: Vec<(u64, u8, String)> = Vec::new();
    if let Some(n) = o.save_every_n_steps.filter(|&n| n > 0) {
        let mut s = n;
        while s < total_steps {
            steps.push((s, 0, format!("{name}-step{s:08}")));
            s += n;
        }
    }
    if let Some(n) = o.save_every_n_epochs.filter(|&n| n > 0)
        && steps_per_epoch > 0
    {
        let mut e = n;
        while e * steps_per_epoch < total_steps {
            epochs.push((e * steps_per_epoch, 1, format!("{name}-{e:06}")));
            e += n;
        }
    }
    if let Some(keep) = o.save_last_n {
        for v in [&mut steps, &mut epochs] {
            let cut = v.len().saturating_sub(keep);
            v.drain(..cut);
        }
    }
    steps.extend(epochs);
    steps.sort();
    steps
        .into_iter()
        .map(|(_, _, stem)| stem)
        .chain(std::iter::once(name.clone()))
        .map(|stem| o.out.join(format!("{stem}{ext}")))
        .collect()
}

/// The X axis (the reference, then `saves`) and the Y axis.
fn axes_of(o: &TrainOptions, s: &Spec, saves: &[PathBuf]) -> (Axis, Option<Axis>) {
    let reference = match s.columns {
        Columns::Model => Some(o.model.clone()),
        _ => None,
    };
    let values = std::iter::once(reference)
        .chain(saves.iter().cloned().map(Some))
        .map(Value::File)
        .collect();
    let x = Axis {
        kind: s.columns.kind(),
        values,
    };
    let y = s.weights.as_ref().map(|w| Axis {
        kind: AxisKind::Weight,
        values: w.iter().copied().map(Value::Float).collect(),
    });
    (x, y)
}

/// What the dry run shows: the grid of the planned saves.
pub fn preview(o: &TrainOptions, s: &Spec, saves: &[PathBuf], seed: u64) -> Preview {
    let (x, y) = axes_of(o, s, saves);
    let labels = |a: &Axis| (0..a.values.len()).map(|i| a.label(i)).collect::<Vec<_>>();
    let rows = y.as_ref().map(labels).unwrap_or_default();
    Preview {
        out: out_dir(o),
        cells: x.values.len() * rows.len().max(1),
        columns: labels(&x),
        rows,
        prompt: s.prompt.clone(),
        negative: s.negative.clone(),
        seed: s.seed.unwrap_or(seed),
        steps: s.steps,
        cfg: s.cfg,
        sampler: s.sampler.a1111_name().into(),
        width: s.width,
        height: s.height,
    }
}

/// The grid job over `saves` (files that exist), rendered into OUT/grid/.
pub fn job(
    o: &TrainOptions,
    s: &Spec,
    saves: &[PathBuf],
    seed: u64,
    engine: crate::grid::engine::EngineOptions,
) -> Result<crate::grid::Job, String> {
    let (x, y) = axes_of(o, s, saves);
    let base = Settings {
        model: o.model.clone(),
        lora: None,
        weight: 1.0,
        embedding: None,
        embedding_name: match &s.columns {
            Columns::Embedding(name) => Some(name.clone()),
            _ => None,
        },
        embeddings: None,
        hypernetwork: None,
        strength: 1.0,
        prompt: s.prompt.clone(),
        negative: s.negative.clone(),
        steps: s.steps,
        cfg: s.cfg,
        sampler: s.sampler,
        seed: s.seed.unwrap_or(seed),
        clip_skip: o.clip_skip.unwrap_or(1),
        width: s.width,
        height: s.height,
    };
    let plan = plan::build(&base, Some(x), y, None)?;
    Ok(crate::grid::Job {
        plan,
        out: out_dir(o),
        engine,
        hidden: o.quiet || o.json,
    })
}

/// The saves of `saved` still there (`--save-last-n` removes old ones), in order.
pub fn existing(saved: &[PathBuf]) -> Vec<PathBuf> {
    saved
        .iter()
        .filter(|p| Path::new(p).is_file())
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        o: TrainOptions,
    }

    fn opts(extra: &[&str]) -> TrainOptions {
        let mut args = vec![
            "x",
            "--model",
            "m",
            "--data",
            "d",
            "--out",
            "o",
            "--output-name",
            "n",
        ];
        args.extend_from_slice(extra);
        Cli::parse_from(args).o
    }

    fn stems(v: Vec<PathBuf>) -> Vec<String> {
        v.iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn planned_saves_follow_the_loop() {
        // 4 steps an epoch, 10 steps: epoch saves after epochs 1 and 2 (the run ends
        // inside epoch 3), step saves at 4 and 8 before the epoch saves there.
        let o = opts(&["--save-every-n-epochs", "1", "--save-every-n-steps", "4"]);
        assert_eq!(
            stems(planned_saves(&o, ".safetensors", 4, 10)),
            [
                "n-step00000004.safetensors",
                "n-000001.safetensors",
                "n-step00000008.safetensors",
                "n-000002.safetensors",
                "n.safetensors"
            ]
        );
        // A save that would fall on the last step is the final save only.
        let o = opts(&["--save-every-n-epochs", "2"]);
        assert_eq!(
            stems(planned_saves(&o, ".pt", 5, 20)),
            ["n-000002.pt", "n.pt"]
        );
        // --save-last-n keeps the newest of each kind.
        let o = opts(&["--save-every-n-steps", "3", "--save-last-n", "2"]);
        assert_eq!(
            stems(planned_saves(&o, ".pt", 100, 10)),
            ["n-step00000006.pt", "n-step00000009.pt", "n.pt"]
        );
        assert_eq!(stems(planned_saves(&opts(&[]), ".pt", 4, 10)), ["n.pt"]);
    }

    #[test]
    fn method_checks() {
        let o = opts(&[
            "--grid-prompt",
            "a photo of mycat",
            "--resolution",
            "512,768",
        ]);
        let s = spec(&o, Columns::Lora, (512, 768)).unwrap().unwrap();
        assert_eq!(s.weights.as_deref(), Some(&DEFAULT_WEIGHTS[..]));
        assert_eq!((s.width, s.height, s.steps), (512, 768, 20));
        let s = spec(&o, Columns::Embedding("mycat".into()), (512, 768))
            .unwrap()
            .unwrap();
        assert_eq!(s.weights, None);
        let e = spec(&o, Columns::Embedding("dog".into()), (512, 768)).unwrap_err();
        assert!(e.contains("never uses `dog`"), "{e}");
        let e = spec(&opts(&["--grid-prompt", "x"]), Columns::Lora, (500, 500)).unwrap_err();
        assert!(
            e.contains("--grid-width: the training resolution 500"),
            "{e}"
        );
        assert!(
            spec(&opts(&[]), Columns::Model, (512, 512))
                .unwrap()
                .is_none()
        );
    }
}
