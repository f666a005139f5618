//! `sdkit grid`: render the cells of an X/Y/Z plot (LoRA, embedding and hypernetwork
//! files, weights, prompt S/R, cfg, steps, sampler, seed, clip skip, checkpoints) with one loaded model, write each
//! cell as a PNG carrying webui's `parameters`, one labelled grid image per Z value, and
//! an index (`grid.json`, `index.html`).
//!
//! Files in OUT: `cells/z{Z}-y{Y}-x{X}.png`, `grid.png` (or `grid-z{Z}.png` per Z value
//! with a Z axis), `grid.json`, `index.html`. A cell PNG also holds an `sdkit-grid` text
//! chunk with the hash of everything its pixels depend on; a re-run keeps cells whose
//! hash is unchanged and renders the rest.

pub mod axes;
pub mod engine;
pub mod facts;
pub mod index;
pub mod plan;
pub mod render;

use anyhow::Context;
use engine::{Engine, EngineOptions, Work};
use facts::FileFacts;
use index::{AxisEntry, CellEntry, GridEntry, Index};
use plan::Plan;
use std::path::{Path, PathBuf};

/// The PNG text chunk holding a cell's settings hash.
pub const KEY_CHUNK: &str = "sdkit-grid";

/// A grid to render.
pub struct Job {
    pub plan: Plan,
    pub out: PathBuf,
    pub engine: EngineOptions,
    /// No progress bar.
    pub hidden: bool,
}

/// One cell's file, infotext and settings hash.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CellFile {
    pub file: String,
    pub parameters: String,
    pub key: String,
    /// An identical render is already there.
    pub done: bool,
}

fn cell_name(x: usize, y: usize, z: usize) -> String {
    format!("cells/z{z}-y{y}-x{x}.png")
}

fn grid_name(z: usize, nz: usize) -> String {
    if nz == 1 {
        "grid.png".into()
    } else {
        format!("grid-z{z}.png")
    }
}

/// Files, infotexts and hashes of every cell, and whether each is already rendered.
/// Reads (and so checks) every file the cells use first.
pub fn cell_files(job: &Job) -> anyhow::Result<(FileFacts, Vec<CellFile>)> {
    let facts = facts::file_facts(job.plan.cells.iter().map(|c| &c.settings))?;
    let e = &job.engine;
    let device = if e.device.is_cuda() { "cuda" } else { "cpu" };
    let files = job
        .plan
        .cells
        .iter()
        .map(|c| {
            let parameters = facts::cell_params(&c.settings, &facts).to_infotext();
            let files = facts::file_key(&c.settings, &facts);
            let key = blake3::hash(
                format!(
                    "{parameters}\n{files}\n{:?}\n{device}\n{:?}\nsdkit grid 1",
                    e.dtype, e.prediction
                )
                .as_bytes(),
            )
            .to_hex()[..32]
                .to_string();
            let file = cell_name(c.x, c.y, c.z);
            let path = job.out.join(&file);
            let done = path.is_file()
                && crate::formats::png_params::read_text(&path, KEY_CHUNK)
                    .ok()
                    .flatten()
                    .is_some_and(|k| k == key);
            CellFile {
                file,
                parameters,
                key,
                done,
            }
        })
        .collect();
    Ok((facts, files))
}

/// What `--dry-run` reports.
#[derive(Debug, serde::Serialize)]
pub struct Estimate {
    pub cells: usize,
    pub to_render: usize,
    pub unet_steps: usize,
    pub model_loads: usize,
    pub load_seconds: f64,
    pub step_seconds: f64,
    pub decode_seconds: f64,
    pub seconds: f64,
}

/// Load the first model to render with, time one step and one decode, and estimate the
/// whole run (cells already rendered cost nothing).
pub fn estimate(job: &Job, files: &[CellFile]) -> anyhow::Result<Estimate> {
    let todo: Vec<&plan::Cell> = job
        .plan
        .render_order()
        .into_iter()
        .filter(|&i| !files[i].done)
        .map(|i| &job.plan.cells[i])
        .collect();
    let mut est = Estimate {
        cells: files.len(),
        to_render: todo.len(),
        unet_steps: todo.iter().map(|c| c.settings.steps).sum(),
        model_loads: 0,
        load_seconds: 0.0,
        step_seconds: 0.0,
        decode_seconds: 0.0,
        seconds: 0.0,
    };
    let Some(first) = todo.first() else {
        return Ok(est);
    };
    let mut models: Vec<&PathBuf> = todo.iter().map(|c| &c.settings.model).collect();
    models.dedup();
    est.model_loads = models.len();
    let mut engine = Engine::new(job.engine.clone());
    let mut base = first.settings.clone();
    base.lora = None;
    base.hypernetwork = None;
    let t = std::time::Instant::now();
    engine.prepare(&base)?;
    est.load_seconds = t.elapsed().as_secs_f64();
    let (step, decode) = engine.time_step(&first.settings)?;
    est.step_seconds = step;
    est.decode_seconds = decode;
    est.seconds = est.model_loads as f64 * est.load_seconds
        + est.unet_steps as f64 * step
        + todo.len() as f64 * decode;
    Ok(est)
}

/// What a run did.
#[derive(Debug, serde::Serialize)]
pub struct Outcome {
    pub out: PathBuf,
    pub grids: Vec<PathBuf>,
    pub rendered: usize,
    pub kept: usize,
    pub work: Work,
    pub warnings: Vec<String>,
    pub seconds: f64,
}

/// Render the cells that are not done, then the grid images and the index.
pub fn run(job: &Job) -> anyhow::Result<Outcome> {
    run_with(job, &mut Engine::new(job.engine.clone()))
}

/// [`run`] on `engine`, which may already hold a model ([`Engine::adopt`]); its work
/// counters count this run only when it is new.
pub fn run_with(job: &Job, engine: &mut Engine) -> anyhow::Result<Outcome> {
    let started = std::time::Instant::now();
    let (_, files) = cell_files(job)?;
    let out = &job.out;
    crate::util::atomic::create_dir_all(&out.join("cells"))
        .with_context(|| format!("{}: cannot create the output folder", out.display()))?;
    let order: Vec<usize> = job
        .plan
        .render_order()
        .into_iter()
        .filter(|&i| !files[i].done)
        .collect();
    let bar = crate::util::progress::bar(order.len() as u64, "grid", job.hidden);
    for &i in &order {
        let cell = &job.plan.cells[i];
        let s = &cell.settings;
        bar.set_message(files[i].file.clone());
        let rgb = engine.render(s, &mut || bar.tick())?;
        let path = out.join(&files[i].file);
        crate::formats::png_params::write_png_with(
            &path,
            &rgb,
            s.width as u32,
            s.height as u32,
            &[
                (crate::formats::png_params::KEY, &files[i].parameters),
                (KEY_CHUNK, &files[i].key),
            ],
        )
        .with_context(|| format!("{}: cannot write", path.display()))?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let grids = write_grids(job, &files)?;
    Ok(Outcome {
        out: out.clone(),
        grids: grids.iter().map(|g| out.join(g)).collect(),
        rendered: order.len(),
        kept: files.len() - order.len(),
        work: engine.work,
        warnings: engine.warnings.clone(),
        seconds: started.elapsed().as_secs_f64(),
    })
}

fn axis_labels(a: &Option<axes::Axis>) -> Vec<String> {
    a.as_ref()
        .map(|a| (0..a.values.len()).map(|i| a.label(i)).collect())
        .unwrap_or_default()
}

fn entry(a: &Option<axes::Axis>) -> Option<AxisEntry> {
    a.as_ref().map(|ax| AxisEntry {
        kind: ax.kind,
        labels: axis_labels(a),
    })
}

fn read_rgb(path: &Path, w: usize, h: usize) -> anyhow::Result<Vec<u8>> {
    let img = image::open(path)
        .with_context(|| format!("{}: cannot read", path.display()))?
        .to_rgb8();
    if img.width() as usize != w || img.height() as usize != h {
        anyhow::bail!(
            "{}: {}x{}, the grid's cells are {w}x{h}",
            path.display(),
            img.width(),
            img.height()
        );
    }
    Ok(img.into_raw())
}

/// Compose one image per Z value from the cell files and write the index.
fn write_grids(job: &Job, files: &[CellFile]) -> anyhow::Result<Vec<String>> {
    let p = &job.plan;
    let (nx, ny, nz) = p.dims();
    let first = &p.cells[0].settings;
    let (w, h) = (first.width, first.height);
    let (xl, yl, zl) = (axis_labels(&p.x), axis_labels(&p.y), axis_labels(&p.z));
    let mut grids = Vec::new();
    let mut layout = None;
    for z in 0..nz {
        let labels = render::Labels {
            x: &xl,
            y: &yl,
            title: zl.get(z).map(|s| s.as_str()),
        };
        let l = render::layout(w, h, nx, ny, &labels);
        let mut canvas = render::sheet(&l, &labels);
        for y in 0..ny {
            for x in 0..nx {
                let i = (z * ny + y) * nx + x;
                let rgb = read_rgb(&job.out.join(&files[i].file), w, h)?;
                let (x0, y0) = l.cell_origin(x, y);
                canvas.paste(&rgb, w, h, x0, y0);
            }
        }
        let name = grid_name(z, nz);
        let path = job.out.join(&name);
        let first_cell = (z * ny) * nx;
        crate::formats::png_params::write_png(
            &path,
            &canvas.rgb,
            l.width as u32,
            l.height as u32,
            &files[first_cell].parameters,
        )
        .with_context(|| format!("{}: cannot write", path.display()))?;
        grids.push(GridEntry {
            z,
            title: zl.get(z).cloned(),
            file: name.clone(),
        });
        layout = Some(l);
    }
    let layout = layout.expect("at least one grid");
    let cells = p
        .cells
        .iter()
        .zip(files)
        .map(|(c, f)| {
            let (x0, y0) = layout.cell_origin(c.x, c.y);
            CellEntry {
                x: c.x,
                y: c.y,
                z: c.z,
                file: f.file.clone(),
                rect: [x0, y0, w, h],
                rendered: !f.done,
                key: f.key.clone(),
                parameters: f.parameters.clone(),
                settings: c.settings.clone(),
            }
        })
        .collect();
    let ix = Index {
        x: entry(&p.x),
        y: entry(&p.y),
        z: entry(&p.z),
        layout,
        grids: grids.clone(),
        cells,
    };
    index::write(&job.out, &ix)?;
    Ok(grids.into_iter().map(|g| g.file).collect())
}
