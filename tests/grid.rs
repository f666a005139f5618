//! `sdkit grid` end to end on the tiny SD1 checkpoint and the tiny LoRA fixture: grid
//! geometry and labels against the cell PNGs, determinism, weight 0 = the reference
//! column, a cell = `sdkit sample` with the same settings, re-runs keep finished cells,
//! and bad input fails before anything renders.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lora() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/tiny_lora_linear.safetensors")
}

fn model() -> PathBuf {
    common::checkpoints().join("sd1_diffusers")
}

fn sdkit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .output()
        .unwrap()
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// The grid of these tests: columns none | LoRA, rows weight 0 | 0.7.
fn grid(out: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args: Vec<String> = vec!["grid".into(), "--model".into(), s(&model())];
    args.extend(
        [
            "--prompt",
            "a photo of a cat",
            "--negative",
            "lowres",
            "--x",
        ]
        .map(String::from),
    );
    args.push(format!("lora=none,{}", s(&lora())));
    args.extend(
        [
            "--y",
            "weight=0,0.7",
            "--seed",
            "7",
            "--steps",
            "2",
            "--sampler",
            "ddim",
        ]
        .map(String::from),
    );
    args.extend(["--width", "32", "--height", "32", "--json", "--out"].map(String::from));
    args.push(s(out));
    args.extend(extra.iter().map(|a| a.to_string()));
    let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
    let o = sdkit(&argv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

fn index(out: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(out.join("grid.json")).unwrap()).unwrap()
}

fn cell<'a>(ix: &'a serde_json::Value, x: u64, y: u64) -> &'a serde_json::Value {
    ix["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["x"] == x && c["y"] == y && c["z"] == 0)
        .unwrap()
}

#[test]
fn grid_cells_labels_reference_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let rep = grid(&out, &[]);
    assert_eq!(rep["rendered"], 4);
    // one checkpoint load; the LoRA merged at 0 and 0.7 (the none column twice needs no
    // merge); the none column shares one prompt encoding
    assert_eq!(rep["work"]["model_loads"], 1);
    assert_eq!(rep["work"]["adapter_merges"], 2);
    assert_eq!(rep["work"]["prompt_encodes"], 3);

    // Geometry: the grid image is the layout's size and holds each cell PNG at its rect.
    let ix = index(&out);
    let l = &ix["layout"];
    let (left, top) = (l["left"].as_u64().unwrap(), l["top"].as_u64().unwrap());
    assert!(left >= 32 && top > 0, "{l}");
    assert_eq!(l["title"], 0);
    let g = rgb(&out.join("grid.png"));
    assert_eq!(g.dimensions(), (left as u32 + 64, top as u32 + 64));
    for c in ix["cells"].as_array().unwrap() {
        let r: Vec<u32> = c["rect"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(r[0], left as u32 + 32 * c["x"].as_u64().unwrap() as u32);
        assert_eq!(r[1], top as u32 + 32 * c["y"].as_u64().unwrap() as u32);
        let img = rgb(&out.join(c["file"].as_str().unwrap()));
        assert_eq!(img.dimensions(), (32, 32));
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(
                    g.get_pixel(r[0] + x, r[1] + y),
                    img.get_pixel(x, y),
                    "{}",
                    c["file"]
                );
            }
        }
    }
    // Labels: ink above each column and left of each row, white elsewhere in the bands.
    let ink = |x0: u32, y0: u32, w: u32, h: u32| {
        (y0..y0 + h)
            .flat_map(|y| (x0..x0 + w).map(move |x| (x, y)))
            .filter(|&(x, y)| g.get_pixel(x, y)[0] < 128)
            .count()
    };
    for i in 0..2 {
        assert!(
            ink(left as u32 + 32 * i, 0, 32, top as u32) > 5,
            "column label {i}"
        );
        assert!(
            ink(0, top as u32 + 32 * i, left as u32, 32) > 5,
            "row label {i}"
        );
    }
    assert_eq!(ink(0, 0, left as u32, top as u32), 0, "the corner is empty");
    assert_eq!(ix["x"]["labels"][1], "lora: tiny_lora_linear");
    assert_eq!(ix["y"]["labels"][1], "weight: 0.7");

    // Weight 0 is the reference: the LoRA column at 0 equals the none column, byte for byte.
    let px = |x, y| rgb(&out.join(cell(&ix, x, y)["file"].as_str().unwrap())).into_raw();
    assert_eq!(px(1, 0), px(0, 0));
    assert_eq!(px(0, 1), px(0, 0));
    assert_ne!(px(1, 1), px(0, 0), "the LoRA at 0.7 changes the image");

    // A cell is `sdkit sample` with the same settings.
    let sample_out = dir.path().join("s");
    let o = sdkit(&[
        "sample",
        "--model",
        &s(&model()),
        "--prompt",
        "a photo of a cat",
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
        "--lora",
        &format!("{}:0.7", s(&lora())),
        "--quiet",
        "--out",
        &s(&sample_out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(rgb(&sample_out.join("00000-7.png")).into_raw(), px(1, 1));

    // The cell carries webui's parameters, the LoRA as webui writes it.
    let text = sdkit::formats::png_params::read_parameters(
        &out.join(cell(&ix, 1, 1)["file"].as_str().unwrap()),
    )
    .unwrap()
    .unwrap();
    let t = sdkit::formats::png_params::parse(&text);
    assert_eq!(t.prompt, "a photo of a cat <lora:tiny_lora_linear:0.7>");
    assert_eq!(t.negative, "lowres");
    assert_eq!(t.get("Seed"), Some("7"));
    assert_eq!(t.get("Sampler"), Some("DDIM"));
    assert!(
        t.get("Lora hashes")
            .unwrap()
            .starts_with("tiny_lora_linear: ")
    );
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains("src=\"grid.png\"") && html.contains("cells/z0-y1-x1.png"));

    // Re-run: every cell kept, files untouched.
    let before: Vec<Vec<u8>> = (0..4)
        .map(|i| std::fs::read(out.join(format!("cells/z0-y{}-x{}.png", i / 2, i % 2))).unwrap())
        .collect();
    let rep = grid(&out, &[]);
    assert_eq!(
        (rep["rendered"].as_u64(), rep["kept"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(rep["work"]["model_loads"], 0);
    for (i, b) in before.iter().enumerate() {
        let f = out.join(format!("cells/z0-y{}-x{}.png", i / 2, i % 2));
        assert_eq!(&std::fs::read(f).unwrap(), b);
    }
    // Another seed changes the settings: every cell renders again.
    let rep = grid(&out, &["--seed", "8"]);
    assert_eq!(rep["rendered"], 4);

    // Determinism: a fresh folder renders the same bytes for the same seed.
    let again = dir.path().join("g2");
    grid(&again, &[]);
    for i in 0..4 {
        let f = format!("cells/z0-y{}-x{}.png", i / 2, i % 2);
        assert_eq!(
            rgb(&again.join(&f)).into_raw(),
            before_px(&before[i]),
            "{f}"
        );
    }
}

fn before_px(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

#[test]
fn z_axis_makes_one_titled_grid_per_value() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let o = sdkit(&[
        "grid",
        "--model",
        &s(&model()),
        "--prompt",
        "a red car",
        "--x",
        "prompt=red,blue",
        "--z",
        "seed=1-2",
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--quiet",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ix = index(&out);
    let l = &ix["layout"];
    assert!(l["title"].as_u64().unwrap() > 0);
    assert_eq!(l["left"], 0, "no Y axis, no row labels");
    for z in 0..2 {
        let g = rgb(&out.join(format!("grid-z{z}.png")));
        assert_eq!(g.dimensions(), (64, l["height"].as_u64().unwrap() as u32));
        let title_ink = (0..l["title"].as_u64().unwrap() as u32)
            .flat_map(|y| (0..64).map(move |x| (x, y)))
            .filter(|&(x, y)| g.get_pixel(x, y)[0] < 128)
            .count();
        assert!(title_ink > 5, "grid {z} title");
    }
    let t = |f: &str| {
        sdkit::formats::png_params::parse(
            &sdkit::formats::png_params::read_parameters(&out.join(f))
                .unwrap()
                .unwrap(),
        )
    };
    assert_eq!(t("cells/z1-y0-x1.png").prompt, "a blue car");
    assert_eq!(t("cells/z1-y0-x1.png").get("Seed"), Some("2"));
    assert_eq!(t("cells/z0-y0-x0.png").get("Seed"), Some("1"));
    let a = rgb(&out.join("cells/z0-y0-x0.png")).into_raw();
    let b = rgb(&out.join("cells/z1-y0-x0.png")).into_raw();
    assert_ne!(a, b, "seeds 1 and 2 differ");
}

#[test]
fn bad_input_fails_before_rendering() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let m = s(&model());
    let missing = s(&dir.path().join("ron-000009.safetensors"));
    let notlora = dir.path().join("notes.safetensors");
    std::fs::write(&notlora, b"not a safetensors file at all").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--x".into(), "cfg=4,abc".into()], "`abc`"),
        (
            vec!["--x".into(), "colour=1,2".into()],
            "unknown axis `colour`",
        ),
        (vec!["--x".into(), "steps=1-5 (-1)".into()], "never reaches"),
        (
            vec!["--x".into(), format!("lora=none,{missing}")],
            "ron-000009.safetensors: no such file",
        ),
        (
            vec!["--x".into(), format!("lora={}", s(&notlora))],
            "notes.safetensors: not a safetensors file",
        ),
        (vec!["--x".into(), "weight=0,1".into()], "needs an adapter"),
        (vec!["--x".into(), "prompt=dog,cat".into()], "`dog`"),
        (
            vec![
                "--x".into(),
                "seed=1,2".into(),
                "--y".into(),
                "seed=3".into(),
            ],
            "two axes",
        ),
    ];
    for (extra, want) in cases {
        let mut args: Vec<String> = ["grid", "--model", &m, "--prompt", "a cat", "--steps", "1"]
            .map(String::from)
            .to_vec();
        args.extend(["--width", "32", "--height", "32", "--out"].map(String::from));
        args.push(s(&out));
        args.extend(extra);
        let argv: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
        let o = sdkit(&argv);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{argv:?} succeeded");
        assert!(err.contains(want), "{argv:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(!out.exists(), "{argv:?} wrote {}", out.display());
    }
}

#[test]
fn dry_run_lists_cells_and_estimates_without_writing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let x = format!("lora=none,{}", s(&lora()));
    let o = sdkit(&[
        "grid",
        "--model",
        &s(&model()),
        "--prompt",
        "a cat",
        "--x",
        &x,
        "--y",
        "cfg=3-7 [3]",
        "--steps",
        "3",
        "--width",
        "32",
        "--height",
        "32",
        "--seed",
        "1",
        "--dry-run",
        "--json",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["cells"].as_array().unwrap().len(), 6);
    assert_eq!(v["cells"][5]["settings"]["cfg"], 7.0);
    assert_eq!(v["estimate"]["to_render"], 6);
    assert_eq!(v["estimate"]["unet_steps"], 18);
    assert!(v["estimate"]["seconds"].as_f64().unwrap() > 0.0);
    assert!(!out.exists());
}

/// A model axis loads each checkpoint once (cells grouped by model), and its cells are
/// the checkpoints' own images.
#[test]
fn model_axis_loads_each_checkpoint_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let ck = common::checkpoints();
    let x = format!(
        "model={},{}",
        s(&ck.join("sd1_diffusers")),
        s(&ck.join("sd2_diffusers"))
    );
    let o = sdkit(&[
        "grid",
        "--model",
        &s(&model()),
        "--prompt",
        "a cat",
        "--x",
        &x,
        "--y",
        "seed=1,2",
        "--steps",
        "1",
        "--width",
        "32",
        "--height",
        "32",
        "--json",
        "--out",
        &s(&out),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["work"]["model_loads"], 2);
    let ix = index(&out);
    let name = |x, y| {
        let f = out.join(cell(&ix, x, y)["file"].as_str().unwrap());
        let t = sdkit::formats::png_params::read_parameters(&f)
            .unwrap()
            .unwrap();
        sdkit::formats::png_params::parse(&t)
            .get("Model")
            .unwrap()
            .to_string()
    };
    assert_eq!(
        (name(0, 1), name(1, 1)),
        ("sd1_diffusers".into(), "sd2_diffusers".into())
    );
    let px = |x, y| rgb(&out.join(cell(&ix, x, y)["file"].as_str().unwrap())).into_raw();
    assert_ne!(px(0, 0), px(1, 0));
}
