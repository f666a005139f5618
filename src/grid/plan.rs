//! The cells of a grid: the base settings with each axis value applied, every file and
//! value checked before anything renders, and the order that swaps models and adapters
//! least.

use super::axes::{Axis, AxisKind, Value};
use crate::model::samplers::SamplerKind;
use std::path::PathBuf;

/// Everything one cell is rendered with.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Settings {
    pub model: PathBuf,
    /// The LoRA / LoCon file; `None` = no adapter (the reference).
    pub lora: Option<PathBuf>,
    /// The LoRA's weight.
    pub weight: f64,
    /// The textual-inversion file of an embedding axis; `None` = the reference without it.
    pub embedding: Option<PathBuf>,
    /// The word the prompt calls the embedding axis' files by: each is attached under it
    /// (set with an embedding axis).
    pub embedding_name: Option<String>,
    /// A folder of embeddings for every cell (webui's `embeddings/`).
    pub embeddings: Option<PathBuf>,
    /// The webui hypernetwork `.pt`; `None` = none.
    pub hypernetwork: Option<PathBuf>,
    /// The hypernetwork's strength (webui's `<hypernet:name:STRENGTH>`).
    pub strength: f64,
    pub prompt: String,
    pub negative: String,
    pub steps: usize,
    pub cfg: f64,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub clip_skip: usize,
    pub width: usize,
    pub height: usize,
}

/// Which adapter a weight axis varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightOf {
    Lora,
    Hypernetwork,
}

/// The adapter a weight axis varies: the one on an axis (a lora axis first), else the
/// fixed one (`--lora` first); `None` without an adapter.
pub fn weight_of(axes: &[&Axis], base: &Settings) -> Option<WeightOf> {
    let has = |k: AxisKind| axes.iter().any(|a| a.kind == k);
    if has(AxisKind::Lora) {
        Some(WeightOf::Lora)
    } else if has(AxisKind::Hypernetwork) {
        Some(WeightOf::Hypernetwork)
    } else if base.lora.is_some() {
        Some(WeightOf::Lora)
    } else if base.hypernetwork.is_some() {
        Some(WeightOf::Hypernetwork)
    } else {
        None
    }
}

/// The word an embedding file is called by when `--embedding-name` is not given: its file
/// stem without the suffix of a periodic save (`mycat-000004`, `mycat-step00000100` ->
/// `mycat`).
pub fn default_embedding_name(file: &std::path::Path) -> String {
    let stem = file
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    if let Some((head, tail)) = stem.rsplit_once('-') {
        let digits = |t: &str, n: usize| t.len() == n && t.bytes().all(|b| b.is_ascii_digit());
        let periodic = digits(tail, 6) || tail.strip_prefix("step").is_some_and(|t| digits(t, 8));
        if periodic && !head.is_empty() {
            return head.to_string();
        }
    }
    stem
}

/// One cell: its position and settings.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Cell {
    pub x: usize,
    pub y: usize,
    pub z: usize,
    pub settings: Settings,
}

/// The axes (X, Y, Z; absent ones have one implicit value) and the cells, Z-major, then
/// rows (Y), then columns (X).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Plan {
    pub x: Option<Axis>,
    pub y: Option<Axis>,
    pub z: Option<Axis>,
    pub cells: Vec<Cell>,
}

fn len(a: &Option<Axis>) -> usize {
    a.as_ref().map_or(1, |a| a.values.len())
}

impl Plan {
    /// Columns, rows, grids.
    pub fn dims(&self) -> (usize, usize, usize) {
        (len(&self.x), len(&self.y), len(&self.z))
    }

    /// The cell at (x, y, z).
    pub fn cell(&self, x: usize, y: usize, z: usize) -> &Cell {
        let (nx, ny, _) = self.dims();
        &self.cells[(z * ny + y) * nx + x]
    }

    /// Cell indices in render order: grouped by model, then LoRA, embedding and prompt
    /// (what the conditioning depends on), then weight and hypernetwork, so each
    /// checkpoint loads once and each adapter is merged once per model and prompt.
    pub fn render_order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.cells.len()).collect();
        order.sort_by(|&a, &b| {
            let (a, b) = (&self.cells[a].settings, &self.cells[b].settings);
            (
                &a.model,
                &a.lora,
                &a.embedding,
                &a.prompt,
                &a.negative,
                a.clip_skip,
            )
                .cmp(&(
                    &b.model,
                    &b.lora,
                    &b.embedding,
                    &b.prompt,
                    &b.negative,
                    b.clip_skip,
                ))
                .then(a.weight.total_cmp(&b.weight))
                .then(a.hypernetwork.cmp(&b.hypernetwork))
                .then(a.strength.total_cmp(&b.strength))
        });
        order
    }
}

/// Apply the axes to `base`. Errors: the same kind on two axes, a weight axis with no
/// adapter, a prompt search string missing from the prompts, an embedding name the
/// prompts never use, a file that is not there.
pub fn build(
    base: &Settings,
    x: Option<Axis>,
    y: Option<Axis>,
    z: Option<Axis>,
) -> Result<Plan, String> {
    let axes: Vec<&Axis> = [&x, &y, &z].into_iter().flatten().collect();
    for (i, a) in axes.iter().enumerate() {
        if axes[..i].iter().any(|b| b.kind == a.kind) {
            return Err(format!(
                "`{}` is on two axes; each kind may vary on one",
                a.kind.name()
            ));
        }
    }
    let has = |k: AxisKind| axes.iter().any(|a| a.kind == k);
    let weight = weight_of(&axes, base);
    if has(AxisKind::Weight) && weight.is_none() {
        return Err(
            "a weight axis needs an adapter: a lora or hypernetwork axis, --lora FILE or \
             --hypernetwork FILE"
                .into(),
        );
    }
    let mut base = base.clone();
    if let Some(a) = axes.iter().find(|a| a.kind == AxisKind::Embedding) {
        let Some(first) = a.values.iter().find_map(|v| match v {
            Value::File(Some(p)) => Some(p),
            _ => None,
        }) else {
            return Err("embedding axis: no file, only `none`".into());
        };
        let name = base
            .embedding_name
            .get_or_insert_with(|| default_embedding_name(first));
        let tok = crate::model::tokenizer::ClipTokenizer::shared();
        if tok.encode(name).is_empty() {
            return Err(format!(
                "--embedding-name: `{name}` has no tokens to write in a prompt"
            ));
        }
    } else if let Some(name) = &base.embedding_name {
        return Err(format!(
            "--embedding-name {name}: needs an embedding axis (embedding=FILES)"
        ));
    }
    let base = &base;
    if let Some(a) = axes.iter().find(|a| a.kind == AxisKind::Prompt) {
        let Some(Value::Text(search)) = a.values.first() else {
            return Err("prompt axis: no search string".into());
        };
        if search.is_empty() {
            return Err("prompt axis: the first value (the search string) is empty".into());
        }
        if !base.prompt.contains(search.as_str()) && !base.negative.contains(search.as_str()) {
            return Err(format!(
                "prompt axis: `{search}` (the first value is the search string) is not in --prompt or --negative"
            ));
        }
    }
    if let Some(d) = &base.embeddings
        && !d.is_dir()
    {
        return Err(format!("{}: --embeddings is not a folder", d.display()));
    }
    let mut files: Vec<&PathBuf> = vec![&base.model];
    files.extend(&base.lora);
    files.extend(&base.hypernetwork);
    for a in &axes {
        for v in &a.values {
            if let Value::File(Some(p)) = v {
                files.push(p);
            }
        }
    }
    for f in files {
        if !f.exists() {
            return Err(format!("{}: no such file or folder", f.display()));
        }
    }
    let (nx, ny, nz) = (len(&x), len(&y), len(&z));
    let mut cells = Vec::with_capacity(nx * ny * nz);
    for iz in 0..nz {
        for iy in 0..ny {
            for ix in 0..nx {
                let mut s = base.clone();
                for (axis, i) in [(&x, ix), (&y, iy), (&z, iz)] {
                    if let Some(a) = axis {
                        apply(&mut s, a, i, base, weight);
                    }
                }
                cells.push(Cell {
                    x: ix,
                    y: iy,
                    z: iz,
                    settings: s,
                });
            }
        }
    }
    if let Some(name) = &base.embedding_name {
        let tok = crate::model::tokenizer::ClipTokenizer::shared();
        let mentions = |p: &str| crate::model::placeholders::Placeholders::mentions(tok, p, name);
        let used = cells.iter().any(|c| {
            c.settings.embedding.is_some()
                && (mentions(&c.settings.prompt) || mentions(&c.settings.negative))
        });
        if !used {
            return Err(format!(
                "embedding axis: the prompt never uses `{name}`, the name its files are \
                 attached under (write it in --prompt, or set --embedding-name)"
            ));
        }
    }
    Ok(Plan { x, y, z, cells })
}

fn apply(s: &mut Settings, a: &Axis, i: usize, base: &Settings, weight: Option<WeightOf>) {
    match (&a.values[i], a.kind) {
        (Value::File(f), AxisKind::Lora) => s.lora = f.clone(),
        (Value::File(f), AxisKind::Embedding) => s.embedding = f.clone(),
        (Value::File(f), AxisKind::Hypernetwork) => s.hypernetwork = f.clone(),
        (Value::File(Some(f)), AxisKind::Model) => s.model = f.clone(),
        (Value::Float(w), AxisKind::Weight) => match weight {
            Some(WeightOf::Hypernetwork) => s.strength = *w,
            _ => s.weight = *w,
        },
        (Value::Float(c), AxisKind::Cfg) => s.cfg = *c,
        (Value::Int(n), AxisKind::Steps) => s.steps = *n as usize,
        (Value::Int(n), AxisKind::Seed) => s.seed = *n,
        (Value::Int(n), AxisKind::ClipSkip) => s.clip_skip = *n as usize,
        (Value::Sampler(k), _) => s.sampler = *k,
        (Value::Text(t), AxisKind::Prompt) => {
            // webui's S/R: replace the first value in both prompts (the base ones, so
            // two text axes could not compound; there is one prompt axis at most).
            let Some(Value::Text(search)) = a.values.first() else {
                return;
            };
            s.prompt = base.prompt.replace(search.as_str(), t);
            s.negative = base.negative.replace(search.as_str(), t);
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::axes::parse_axis;

    fn base(dir: &std::path::Path) -> Settings {
        let model = dir.join("m.safetensors");
        std::fs::write(&model, b"x").unwrap();
        Settings {
            model,
            lora: None,
            weight: 1.0,
            embedding: None,
            embedding_name: None,
            embeddings: None,
            hypernetwork: None,
            strength: 1.0,
            prompt: "a red car".into(),
            negative: "blurry, red".into(),
            steps: 20,
            cfg: 7.0,
            sampler: SamplerKind::EulerA,
            seed: 5,
            clip_skip: 1,
            width: 64,
            height: 64,
        }
    }

    #[test]
    fn cells_take_axis_values_in_grid_order() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let p = build(
            &b,
            Some(parse_axis("cfg=3,5").unwrap()),
            Some(parse_axis("prompt=red,blue,green").unwrap()),
            Some(parse_axis("seed=1,2").unwrap()),
        )
        .unwrap();
        assert_eq!(p.dims(), (2, 3, 2));
        assert_eq!(p.cells.len(), 12);
        let c = p.cell(1, 2, 1);
        assert_eq!((c.x, c.y, c.z), (1, 2, 1));
        assert_eq!(c.settings.cfg, 5.0);
        assert_eq!(c.settings.prompt, "a green car");
        assert_eq!(c.settings.negative, "blurry, green");
        assert_eq!(c.settings.seed, 2);
        // no seed axis on a cell's own: every other setting is the base one
        assert_eq!(p.cell(0, 0, 0).settings.prompt, "a red car");
        assert_eq!(p.cell(0, 0, 0).settings.steps, 20);
    }

    #[test]
    fn errors_before_rendering() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let ax = |s: &str| Some(parse_axis(s).unwrap());
        let e = build(&b, ax("cfg=1"), ax("cfg=2"), None).unwrap_err();
        assert!(e.contains("two axes"), "{e}");
        let e = build(&b, ax("weight=0.5,1"), None, None).unwrap_err();
        assert!(e.contains("needs an adapter"), "{e}");
        let e = build(&b, ax("prompt=purple,blue"), None, None).unwrap_err();
        assert!(e.contains("`purple`"), "{e}");
        let missing = d.path().join("gone.safetensors");
        let e = build(
            &b,
            ax(&format!("lora=none,{}", missing.display())),
            None,
            None,
        )
        .unwrap_err();
        assert!(e.contains("gone.safetensors: no such file"), "{e}");
    }

    #[test]
    fn render_order_groups_adapters() {
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let (l1, l2) = (
            d.path().join("a.safetensors"),
            d.path().join("b.safetensors"),
        );
        std::fs::write(&l1, b"").unwrap();
        std::fs::write(&l2, b"").unwrap();
        let p = build(
            &b,
            Some(parse_axis("seed=1,2,3").unwrap()),
            Some(parse_axis(&format!("lora={},none,{}", l1.display(), l2.display())).unwrap()),
            None,
        )
        .unwrap();
        let order = p.render_order();
        let loras: Vec<_> = order
            .iter()
            .map(|&i| p.cells[i].settings.lora.clone())
            .collect();
        let changes = loras.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 2, "{loras:?}");
    }

    #[test]
    fn embedding_names_and_weight_targets() {
        let p = std::path::Path::new;
        assert_eq!(
            default_embedding_name(p("ti/mycat-000004.safetensors")),
            "mycat"
        );
        assert_eq!(default_embedding_name(p("mycat-step00000100.pt")), "mycat");
        assert_eq!(default_embedding_name(p("my-cat.safetensors")), "my-cat");
        assert_eq!(default_embedding_name(p("mycat-0004.pt")), "mycat-0004");
        let d = tempfile::tempdir().unwrap();
        let b = base(d.path());
        let files: Vec<std::path::PathBuf> = ["car-000001.pt", "car-000002.pt", "hn.pt"]
            .iter()
            .map(|n| {
                let f = d.path().join(n);
                std::fs::write(&f, b"").unwrap();
                f
            })
            .collect();
        let ax = |s: String| Some(parse_axis(&s).unwrap());
        let emb = format!("embedding=none,{}/car-*.pt", d.path().display());
        let plan = build(&b, ax(emb.clone()), None, None).unwrap();
        let c = &plan.cell(1, 0, 0).settings;
        assert_eq!(c.embedding.as_ref(), Some(&files[0]));
        assert_eq!(c.embedding_name.as_deref(), Some("car"));
        assert_eq!(plan.cell(0, 0, 0).settings.embedding, None);
        let mut b2 = b.clone();
        b2.embedding_name = Some("truck".into());
        let e = build(&b2, ax(emb), None, None).unwrap_err();
        assert!(e.contains("never uses `truck`"), "{e}");
        let e = build(&b2, None, None, None).unwrap_err();
        assert!(e.contains("needs an embedding axis"), "{e}");
        // a weight axis varies the hypernetwork's strength when it is the adapter on an
        // axis, the LoRA's weight otherwise
        let hn = format!("hypernetwork=none,{}", files[2].display());
        let plan = build(&b, ax(hn), ax("weight=0.25".into()), None).unwrap();
        let c = &plan.cell(1, 0, 0).settings;
        assert_eq!((c.strength, c.weight), (0.25, 1.0));
        let mut b3 = b.clone();
        b3.lora = Some(files[2].clone());
        b3.hypernetwork = Some(files[2].clone());
        let plan = build(&b3, ax("weight=0.25".into()), None, None).unwrap();
        let c = &plan.cell(0, 0, 0).settings;
        assert_eq!((c.strength, c.weight), (1.0, 0.25));
    }
}
