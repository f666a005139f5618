//! `sdkit train ... --grid-prompt`: the grid of a run's saves rendered when it ends, on
//! the tiny SD1 pipeline (tests/fixtures/checkpoint): columns = none + every save,
//! rows = weights; the reference column = `sdkit sample`, every cell = `sdkit grid` on
//! the same file and settings (byte for byte), the base model reused (no reload) for
//! adapters, each method's axis, the dry run's plan, bad options refused before training.

mod common;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    common::checkpoints().join("sd1_diffusers")
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// One 64x64 image, `10_ohwx`, "ohwx, red" (ten steps an epoch at batch 1).
fn one_image_set() -> tempfile::TempDir {
    image_set(10)
}

/// One 64x64 image repeated `repeats` times an epoch, "ohwx, red".
fn image_set(repeats: usize) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join(format!("{repeats}_ohwx"));
    std::fs::create_dir_all(&img).unwrap();
    let px = image::RgbImage::from_fn(64, 64, |x, y| {
        image::Rgb([
            ((x * 4 + 120) % 256) as u8,
            ((y * 4 + 30) % 256) as u8,
            (((x + y) * 2) % 256) as u8,
        ])
    });
    px.save(img.join("a.png")).unwrap();
    std::fs::write(img.join("a.txt"), "ohwx, red").unwrap();
    d
}

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sdkit(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The grid settings every test uses (cells as small and quick as the tiny model allows).
const GRID: &[&str] = &[
    "--grid-negative",
    "lowres",
    "--grid-seed",
    "7",
    "--grid-steps",
    "2",
    "--grid-sampler",
    "ddim",
    "--grid-width",
    "32",
    "--grid-height",
    "32",
];

/// `sdkit train METHOD` on the tiny model with tiny buckets, output name `t`.
fn train(method: &str, data: &Path, out: &Path, extra: &[&str]) -> Run {
    let m = s(&model());
    let (data, out) = (s(data), s(out));
    let dev = common::device_arg();
    let mut args = vec![
        "train",
        method,
        "--model",
        &m,
        "--data",
        &data,
        "--out",
        &out,
        "--output-name",
        "t",
        "--resolution",
        "64",
        "--min-bucket-reso",
        "32",
        "--max-bucket-reso",
        "128",
        "--bucket-reso-steps",
        "32",
        "--seed",
        "1",
        "--device",
        &dev,
    ];
    args.extend_from_slice(extra);
    sdkit(&args)
}

fn train_ok(method: &str, data: &Path, out: &Path, extra: &[&str]) -> Value {
    let mut args = extra.to_vec();
    args.extend_from_slice(GRID);
    args.push("--json");
    let r = train(method, data, out, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

/// `sdkit grid` with the settings of GRID over `x` (and `y`) into `out`.
fn grid(x: &str, y: Option<&str>, out: &Path, extra: &[&str]) -> Value {
    let (m, o, dev) = (s(&model()), s(out), common::device_arg());
    let mut args = vec![
        "grid",
        "--model",
        &m,
        "--negative",
        "lowres",
        "--seed",
        "7",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--width",
        "32",
        "--height",
        "32",
        "--device",
        &dev,
        "--json",
        "--out",
        &o,
        "--x",
        x,
    ];
    if let Some(y) = y {
        args.extend(["--y", y]);
    }
    args.extend_from_slice(extra);
    let r = sdkit(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    serde_json::from_str(&r.stdout).unwrap()
}

fn index(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("grid.json")).unwrap()).unwrap()
}

fn labels(ix: &Value, axis: &str) -> Vec<String> {
    ix[axis]["labels"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

fn cell_file(dir: &Path, x: usize, y: usize) -> PathBuf {
    dir.join(format!("cells/z0-y{y}-x{x}.png"))
}

fn pixels(p: &Path) -> Vec<u8> {
    image::open(p).unwrap().to_rgb8().into_raw()
}

/// The grid image is the layout's size: the label bands plus `nx` x `ny` cells of 32 px,
/// and each cell PNG sits in it at its place.
fn check_geometry(dir: &Path, nx: usize, ny: usize) {
    let ix = index(dir);
    let l = &ix["layout"];
    let (left, top) = (l["left"].as_u64().unwrap(), l["top"].as_u64().unwrap());
    assert_eq!(
        (l["cell_width"].as_u64(), l["cell_height"].as_u64()),
        (Some(32), Some(32))
    );
    assert!(top > 0, "column labels: {l}");
    assert_eq!(left > 0, ny > 1 || ix["y"].is_object(), "row labels: {l}");
    let g = image::open(dir.join("grid.png")).unwrap().to_rgb8();
    assert_eq!(
        g.dimensions(),
        (
            (left + 32 * nx as u64) as u32,
            (top + 32 * ny as u64) as u32
        )
    );
    assert_eq!(ix["cells"].as_array().unwrap().len(), nx * ny);
    for c in ix["cells"].as_array().unwrap() {
        let (x, y) = (c["x"].as_u64().unwrap(), c["y"].as_u64().unwrap());
        let img = image::open(dir.join(c["file"].as_str().unwrap()))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (32, 32));
        let (x0, y0) = ((left + 32 * x) as u32, (top + 32 * y) as u32);
        for (px, py, p) in img.enumerate_pixels() {
            assert_eq!(g.get_pixel(x0 + px, y0 + py), p, "cell {x},{y}");
        }
    }
}

/// A LoRA run's grid: (saves + 1) columns x 3 weights, the reference column is `sdkit
/// sample`, every cell is what `sdkit grid` renders for the same file (byte-equal PNGs),
/// and the base model the run loaded is reused (no load).
#[test]
fn lora_run_renders_the_grid_of_its_saves() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let rep = train_ok(
        "lora",
        d.path(),
        out.path(),
        &[
            "--max-train-steps",
            "2",
            "--save-every-n-steps",
            "1",
            "--learning-rate",
            "1e-2",
            "--grid-prompt",
            "ohwx, red",
        ],
    );
    let gdir = out.path().join("grid");
    let g = &rep["grid"];
    assert_eq!(g["grids"][0].as_str().unwrap(), s(&gdir.join("grid.png")));
    assert_eq!(g["rendered"], 9);
    // The model the run trained on renders the grid: no checkpoint load; one merge per
    // save and weight.
    assert_eq!(g["work"]["model_loads"], 0);
    assert_eq!(g["work"]["adapter_merges"], 6);
    let ix = index(&gdir);
    assert_eq!(
        labels(&ix, "x"),
        ["lora: none", "lora: t-step00000001", "lora: t"]
    );
    assert_eq!(
        labels(&ix, "y"),
        ["weight: 0.4", "weight: 0.7", "weight: 1"]
    );
    check_geometry(&gdir, 3, 3);

    // The reference column is the base model: `sdkit sample` with the same settings.
    let sample = out.path().join("sample-none");
    let dev = common::device_arg();
    let r = sdkit(&[
        "sample",
        "--model",
        &s(&model()),
        "--prompt",
        "ohwx, red",
        "--negative",
        "lowres",
        "--seed",
        "7",
        "--steps",
        "2",
        "--sampler",
        "ddim",
        "--width",
        "32",
        "--height",
        "32",
        "--device",
        &dev,
        "--quiet",
        "--out",
        &s(&sample),
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let none = pixels(&sample.join("00000-7.png"));
    for y in 0..3 {
        assert!(
            pixels(&cell_file(&gdir, 0, y)) == none,
            "none column, row {y}: not the base model's image"
        );
    }
    assert!(
        pixels(&cell_file(&gdir, 2, 2)) != none,
        "the trained LoRA at weight 1 changes the image"
    );

    // `sdkit grid` over the same files and settings writes the same cell files.
    let other = out.path().join("sdkit-grid");
    let x = format!(
        "lora=none,{},{}",
        s(&out.path().join("t-step00000001.safetensors")),
        s(&out.path().join("t.safetensors"))
    );
    let rep2 = grid(
        &x,
        Some("weight=0.4,0.7,1.0"),
        &other,
        &["--prompt", "ohwx, red"],
    );
    assert_eq!(rep2["rendered"], 9);
    for y in 0..3 {
        for x in 0..3 {
            assert!(
                std::fs::read(cell_file(&gdir, x, y)).unwrap()
                    == std::fs::read(cell_file(&other, x, y)).unwrap(),
                "cell {x},{y} differs from sdkit grid's"
            );
        }
    }
}

/// Textual inversion: the embedding's saves as columns (attached under its word), one
/// row; the cells equal `sdkit grid`'s. A hypernetwork: none + its save, the strengths
/// as rows.
#[test]
fn embedding_and_hypernetwork_runs_render_their_grids() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let rep = train_ok(
        "textual-inversion",
        d.path(),
        out.path(),
        &[
            "--max-train-steps",
            "2",
            "--save-every-n-steps",
            "1",
            "--learning-rate",
            "5e-2",
            "--init-word",
            "red",
            "--token-string",
            "ohwx",
            "--grid-prompt",
            "a photo of ohwx",
        ],
    );
    let gdir = out.path().join("grid");
    assert_eq!(rep["grid"]["rendered"], 3);
    assert_eq!(rep["grid"]["work"]["model_loads"], 0);
    let ix = index(&gdir);
    assert_eq!(
        labels(&ix, "x"),
        [
            "embedding: none",
            "embedding: t-step00000001",
            "embedding: t"
        ]
    );
    assert!(ix["y"].is_null());
    check_geometry(&gdir, 3, 1);
    assert!(
        pixels(&cell_file(&gdir, 2, 0)) != pixels(&cell_file(&gdir, 0, 0)),
        "the embedding changes the image"
    );
    let other = out.path().join("sdkit-grid");
    let x = format!(
        "embedding=none,{},{}",
        s(&out.path().join("t-step00000001.safetensors")),
        s(&out.path().join("t.safetensors"))
    );
    grid(
        &x,
        None,
        &other,
        &["--prompt", "a photo of ohwx", "--embedding-name", "ohwx"],
    );
    for x in 0..3 {
        assert!(
            std::fs::read(cell_file(&gdir, x, 0)).unwrap()
                == std::fs::read(cell_file(&other, x, 0)).unwrap(),
            "cell {x} differs from sdkit grid's"
        );
    }

    let out = tempfile::tempdir().unwrap();
    let rep = train_ok(
        "hypernetwork",
        d.path(),
        out.path(),
        &[
            "--max-train-steps",
            "2",
            "--learning-rate",
            "5e-2",
            "--activation-func",
            "relu",
            "--grid-prompt",
            "ohwx, red",
            "--grid-weights",
            "0.5-1 [2]",
        ],
    );
    let gdir = out.path().join("grid");
    assert_eq!(rep["grid"]["rendered"], 4);
    assert_eq!(rep["grid"]["work"]["model_loads"], 0);
    let ix = index(&gdir);
    assert_eq!(labels(&ix, "x"), ["hypernetwork: none", "hypernetwork: t"]);
    assert_eq!(labels(&ix, "y"), ["weight: 0.5", "weight: 1"]);
    check_geometry(&gdir, 2, 2);
    assert!(
        pixels(&cell_file(&gdir, 1, 1)) != pixels(&cell_file(&gdir, 0, 1)),
        "the hypernetwork changes the image"
    );
}

/// DreamBooth: the base model, then each saved checkpoint (each loaded), one row.
#[test]
fn dreambooth_run_renders_its_checkpoints() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let rep = train_ok(
        "dreambooth",
        d.path(),
        out.path(),
        &[
            "--max-train-steps",
            "1",
            "--learning-rate",
            "1e-3",
            "--grid-prompt",
            "ohwx, red",
        ],
    );
    let gdir = out.path().join("grid");
    assert_eq!(rep["grid"]["rendered"], 2);
    assert_eq!(rep["grid"]["work"]["model_loads"], 2);
    let ix = index(&gdir);
    assert_eq!(labels(&ix, "x"), ["model: sd1_diffusers", "model: t"]);
    check_geometry(&gdir, 2, 1);
}

/// `--dry-run` shows the columns of the saves the run will write (step and epoch saves
/// in order, `--save-last-n` applied), the rows and the settings; the real run's grid
/// has exactly those columns.
#[test]
fn dry_run_shows_the_grid_the_run_renders() {
    // Two steps an epoch: step saves at 2 and 4, epoch saves after epochs 1 and 2.
    let d = image_set(2);
    let out = tempfile::tempdir().unwrap();
    let extra = [
        "--max-train-steps",
        "5",
        "--save-every-n-steps",
        "2",
        "--save-every-n-epochs",
        "1",
        "--save-last-n",
        "1",
        "--grid-prompt",
        "ohwx, red",
        "--grid-weights",
        "1",
    ];
    let mut args = extra.to_vec();
    args.extend_from_slice(GRID);
    args.extend(["--dry-run", "--json"]);
    let r = train("lora", d.path(), out.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let plan: Value = serde_json::from_str(&r.stdout).unwrap();
    let g = &plan["grid"];
    let columns = [
        "lora: none",
        "lora: t-step00000004",
        "lora: t-000002",
        "lora: t",
    ];
    assert_eq!(g["columns"], serde_json::json!(columns));
    assert_eq!(g["rows"], serde_json::json!(["weight: 1"]));
    assert_eq!(g["cells"], 4);
    assert_eq!(
        (g["seed"].as_u64(), g["sampler"].as_str()),
        (Some(7), Some("DDIM"))
    );
    assert_eq!(g["out"].as_str().unwrap(), s(&out.path().join("grid")));
    assert!(
        !out.path().join("grid").exists(),
        "a dry run renders nothing"
    );

    let mut args = extra.to_vec();
    args.extend_from_slice(GRID);
    args.push("--dry-run");
    let r = train("lora", d.path(), out.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("grid at the end: 4 cells")
            && r.stdout.contains("lora: t-000002")
            && r.stdout.contains("seed 7"),
        "{}",
        r.stdout
    );

    let rep = train_ok("lora", d.path(), out.path(), &extra);
    assert_eq!(labels(&index(&out.path().join("grid")), "x"), columns);
    assert_eq!(rep["grid"]["rendered"], 4);
}

/// Bad grid options are one-line errors (exit 2) before the model loads or training
/// starts; nothing is written.
#[test]
fn bad_grid_options_fail_before_training() {
    let d = one_image_set();
    let cases: &[(&str, &[&str], &str)] = &[
        (
            "lora",
            &["--grid-prompt", "x", "--grid-weights", "abc"],
            "--grid-weights \"abc\": `abc` is not a number",
        ),
        (
            "lora",
            &["--grid-weights", "0.5"],
            "--grid-weights: there is no grid without --grid-prompt",
        ),
        (
            "lora",
            &["--grid-prompt", "x", "--grid-width", "30"],
            "--grid-width 30: a multiple of 8",
        ),
        ("lora", &["--grid-prompt", " "], "--grid-prompt is empty"),
        (
            "lora",
            &["--grid-prompt", "x", "--grid-steps", "0"],
            "--grid-steps must be at least 1",
        ),
        (
            "textual-inversion",
            &["--grid-prompt", "a photo of t", "--grid-weights", "1"],
            "an embedding has no weight",
        ),
        (
            "textual-inversion",
            &["--grid-prompt", "a photo of a cat"],
            "never uses `t`",
        ),
        (
            "dreambooth",
            &["--grid-prompt", "x", "--grid-weights", "1"],
            "DreamBooth checkpoint has no weight",
        ),
    ];
    for (method, extra, want) in cases {
        let out = tempfile::tempdir().unwrap();
        let mut args = extra.to_vec();
        args.extend(["--max-train-steps", "1"]);
        let r = train(method, d.path(), out.path(), &args);
        assert_eq!(r.code, 2, "{method} {extra:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{method} {extra:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
        let written: Vec<_> = std::fs::read_dir(out.path()).unwrap().collect();
        assert!(written.is_empty(), "{method} {extra:?} wrote {written:?}");
    }
}
