//! `sdkit train <method>`: parse, run the trainer, print the plan / summary.

use crate::train::options::{
    DreamBoothOptions, HypernetworkOptions, LoraOptions, TextualInversionOptions,
};
use crate::train::run::{self, Plan, Progress, TrainError};
use crate::util::progress;
use indicatif::ProgressBar;

#[derive(Debug, clap::Args)]
pub struct TrainArgs {
    #[command(subcommand)]
    pub method: Method,
}

#[derive(Debug, clap::Subcommand)]
pub enum Method {
    /// LoRA / LoCon (kohya networks.lora): files webui, ComfyUI, kohya and diffusers load.
    Lora(LoraOptions),
    /// AUTOMATIC1111 hypernetwork: a k and a v network per attention context width, saved
    /// as webui's .pt.
    Hypernetwork(HypernetworkOptions),
    /// Textual inversion: new token vectors called by a word, saved as kohya's emb_params
    /// file, webui's .pt or diffusers' file (webui, ComfyUI and diffusers read them).
    TextualInversion(TextualInversionOptions),
    /// DreamBooth: fine-tune the model itself (UNet, optionally the text encoder) with
    /// prior preservation; saves a single-file checkpoint webui loads.
    Dreambooth(DreamBoothOptions),
}

struct Bar {
    pb: Option<ProgressBar>,
    hidden: bool,
}

impl Progress for Bar {
    fn start(&mut self, total: u64, done: u64) {
        let pb = progress::bar(total, "train", self.hidden);
        pb.set_position(done);
        self.pb = Some(pb);
    }
    fn step(&mut self, _step: u64, loss: f64, lr: f64) {
        if let Some(pb) = &self.pb {
            pb.inc(1);
            pb.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        }
    }
    fn message(&mut self, msg: &str) {
        match &self.pb {
            Some(pb) if !self.hidden => pb.println(msg),
            _ => {}
        }
    }
    fn bar(&mut self, label: &str, total: u64) -> Box<dyn FnMut() + '_> {
        let pb = progress::bar(total, label, self.hidden);
        Box::new(move || {
            pb.inc(1);
            if pb.position() >= total {
                pb.finish_and_clear();
            }
        })
    }
    fn finish(&mut self) {
        if let Some(pb) = &self.pb {
            pb.finish_and_clear();
        }
    }
}

fn print_plan(p: &Plan) {
    println!("model {} ({}, {})", p.model.display(), p.arch, p.prediction);
    for f in &p.folders {
        println!(
            "  {:<5} {} : {} images x {} repeats",
            if f.is_reg { "reg" } else { "train" },
            f.dir.display(),
            f.images,
            f.repeats
        );
    }
    println!(
        "samples per epoch: {} train + {} reg",
        p.train_samples, p.reg_samples
    );
    let b: Vec<String> = p
        .buckets
        .iter()
        .map(|((w, h), n)| format!("{w}x{h}: {n}"))
        .collect();
    println!("buckets: {}", b.join(", "));
    println!(
        "batches per epoch {}, steps per epoch {}, epochs {}, total steps {} (warmup {})",
        p.batches_per_epoch, p.steps_per_epoch, p.epochs, p.total_steps, p.warmup_steps
    );
    if let Some(spans) = &p.learning_rate_steps {
        let parts: Vec<String> = spans
            .iter()
            .map(|(r, a, b)| {
                let r = crate::train::metadata::py_float(*r);
                format!("{r} for steps {a}-{b}")
            })
            .collect();
        println!(
            "learning rate {:?} (webui schedule): {}",
            p.learning_rate,
            parts.join(", ")
        );
    }
    println!(
        "trained modules: {} UNet + {} text encoder, {} trainable parameters",
        p.unet_modules, p.text_encoder_modules, p.trainable_parameters
    );
    println!(
        "memory estimate: {:.1} GB; seed {}",
        p.memory_estimate_gb, p.seed
    );
    if let Some(n) = p.class_images_to_generate {
        println!("class images to generate first: {n} (not counted above)");
    }
    if let Some(g) = &p.grid {
        print_grid(g);
    }
    for s in p.skipped.iter().take(10) {
        println!("skipped: {s}");
    }
}

/// The grid `--grid-prompt` renders at the end.
fn print_grid(g: &crate::train::grid::Preview) {
    let rows = if g.rows.is_empty() {
        "1 row".to_string()
    } else {
        format!("rows: {}", g.rows.join(", "))
    };
    println!(
        "grid at the end: {} cells into {}; columns: {}; {rows}",
        g.cells,
        g.out.display(),
        g.columns.join(", ")
    );
    let negative = if g.negative.is_empty() {
        String::new()
    } else {
        format!(", negative {:?}", g.negative)
    };
    println!(
        "  {:?}{negative}, {}x{}, {} steps, {}, CFG {}, seed {}",
        g.prompt,
        g.width,
        g.height,
        g.steps,
        g.sampler,
        crate::grid::axes::fmt_float(g.cfg),
        g.seed
    );
}

fn exit_for(e: &TrainError) -> i32 {
    match e {
        TrainError::Input(_) => 2,
        TrainError::Run(_) => 1,
    }
}

pub fn run(a: TrainArgs) -> anyhow::Result<i32> {
    match a.method {
        Method::Lora(mut o) => {
            // A hub repo id or known name is fetched into the hub cache; a local path wins.
            o.train.model = crate::hub::resolve::checkpoint(&o.model, o.quiet || o.json)?;
            finish(&o, || run::plan(&o), |bar| run::train_lora(&o, bar))
        }
        Method::TextualInversion(mut o) => {
            o.train.model = crate::hub::resolve::checkpoint(&o.model, o.quiet || o.json)?;
            finish(
                &o,
                || run::plan_textual_inversion(&o),
                |bar| run::train_textual_inversion(&o, bar),
            )
        }
        Method::Dreambooth(mut o) => {
            o.train.model = crate::hub::resolve::checkpoint(&o.model, o.quiet || o.json)?;
            finish(
                &o,
                || run::plan_dreambooth(&o),
                |bar| run::train_dreambooth(&o, bar),
            )
        }
        Method::Hypernetwork(mut o) => {
            o.train.model = crate::hub::resolve::checkpoint(&o.model, o.quiet || o.json)?;
            finish(
                &o,
                || run::plan_hypernetwork(&o),
                |bar| run::train_hypernetwork(&o, bar),
            )
        }
    }
}

/// `--dry-run`: the plan; else the run with a progress bar and its summary.
fn finish(
    o: &crate::train::options::TrainOptions,
    plan: impl FnOnce() -> Result<Plan, TrainError>,
    train: impl FnOnce(&mut dyn Progress) -> Result<run::Report, TrainError>,
) -> anyhow::Result<i32> {
    if o.dry_run {
        return match plan() {
            Ok(p) => {
                if o.json {
                    println!("{}", serde_json::to_string_pretty(&p)?);
                } else {
                    print_plan(&p);
                }
                Ok(0)
            }
            Err(e) => {
                eprintln!("error: {e}");
                Ok(exit_for(&e))
            }
        };
    }
    let mut bar = Bar {
        pb: None,
        hidden: o.quiet || o.json,
    };
    match train(&mut bar) {
        Ok(r) => {
            if o.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else if !o.quiet {
                for s in &r.plan.skipped {
                    eprintln!("warning: skipped {s}");
                }
                println!(
                    "{} steps in {:.1}s ({}), final loss {}",
                    r.steps,
                    r.seconds,
                    r.seconds_per_step
                        .map(|t| format!("{t:.2} s/step"))
                        .unwrap_or("-".into()),
                    r.final_loss
                        .map(|l| format!("{l:.4}"))
                        .unwrap_or("-".into())
                );
                for p in &r.saved {
                    println!("saved {}", p.display());
                }
                if let Some(g) = &r.grid {
                    for w in &g.warnings {
                        eprintln!("warning: {w}");
                    }
                    for p in &g.grids {
                        println!("grid {}", p.display());
                    }
                }
            }
            Ok(if r.plan.skipped.is_empty() { 0 } else { 1 })
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(exit_for(&e))
        }
    }
}
