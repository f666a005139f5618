//! `sdkit grid` end to end on the tiny SD1 checkpoint and the tiny LoRA, embedding and
//! hypernetwork fixtures: grid geometry and labels against the cell PNGs, determinism,
//! weight 0 = the reference column, a cell = `sdkit sample` with the same settings,
//! re-runs keep finished cells, and bad input fails before anything renders.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn lora() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora/tiny_lora_linear.safetensors")
}

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(rel)
}

/// The tiny SD1 model's embedding `myemb` (3 vectors, kohya's format).
fn embedding() -> PathBuf {
    fixture("embedding/kohya/myemb.safetensors")
}

/// A webui hypernetwork for the tiny SD1 UNet (widths 32 and 16).
fn hypernetwork() -> PathBuf {
    fixture("hypernetwork/webui_tiny.pt")
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

fn cell(ix: &serde_json::Value, x: u64, y: u64) -> &serde_json::Value {
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
    for (i, b) in before.iter().enumerate() {
        let f = format!("cells/z0-y{}-x{}.png", i / 2, i % 2);
        assert_eq!(rgb(&again.join(&f)).into_raw(), before_px(b), "{f}");
    }
}

fn before_px(png: &[u8]) -> Vec<u8> {
    image::load_from_memory(png).unwrap().to_rgb8().into_raw()
}

/// `sdkit <args> --json` (or `--quiet` for sample) with the settings of the adapter tests
/// (seed 7, 2 DDIM steps, 32x32); must succeed.
fn run_ok(args: &[&str]) -> Output {
    let mut argv: Vec<&str> = args.to_vec();
    argv.extend([
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
    ]);
    let o = sdkit(&argv);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

fn params(p: &Path) -> String {
    sdkit::formats::png_params::read_parameters(p)
        .unwrap()
        .unwrap()
}

/// An embedding axis [none, an epoch file]: the file is attached under the prompt's name
/// (`myemb`); the none cell is the image without it, the file's cell the image and the
/// infotext of `sdkit sample --embeddings` with the prompt webui would need for that
/// file (its stem in the prompt, `TI hashes`); another file under the same path renders
/// again.
#[test]
fn embedding_axis_reference_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let ti = dir.path().join("ti");
    std::fs::create_dir(&ti).unwrap();
    let epoch = ti.join("myemb-000002.safetensors");
    std::fs::copy(embedding(), &epoch).unwrap();
    let out = dir.path().join("g");
    let m = s(&model());
    let x = format!("embedding=none,{}/myemb-*.safetensors", s(&ti));
    let grid_args = [
        "grid",
        "--model",
        &m,
        "--prompt",
        "a photo of myemb",
        "--negative",
        "lowres",
        "--x",
        &x,
        "--json",
        "--out",
        &s(&out),
    ];
    let rep: serde_json::Value = serde_json::from_slice(&run_ok(&grid_args).stdout).unwrap();
    assert_eq!(rep["rendered"], 2);
    assert_eq!(rep["work"]["model_loads"], 1);
    let ix = index(&out);
    assert_eq!(ix["x"]["labels"][1], "embedding: myemb-000002");
    assert_eq!(cell(&ix, 1, 0)["settings"]["embedding_name"], "myemb");
    let f = |x| out.join(cell(&ix, x, 0)["file"].as_str().unwrap());
    let px = |x| rgb(&f(x)).into_raw();

    // sample without embeddings: the none cell
    let plain = dir.path().join("plain");
    let so = s(&plain);
    run_ok(&[
        "sample",
        "--model",
        &m,
        "--prompt",
        "a photo of myemb",
        "--negative",
        "lowres",
        "--quiet",
        "--out",
        &so,
    ]);
    let plain_png = plain.join("00000-7.png");
    assert_eq!(px(0), rgb(&plain_png).into_raw());
    assert_eq!(params(&f(0)), params(&plain_png));
    assert_ne!(px(1), px(0), "the embedding changes the image");

    // sample with the epoch file in an embeddings folder, called by its stem
    let with = dir.path().join("with");
    let (st, sw) = (s(&ti), s(&with));
    run_ok(&[
        "sample",
        "--model",
        &m,
        "--prompt",
        "a photo of myemb-000002",
        "--negative",
        "lowres",
        "--embeddings",
        &st,
        "--quiet",
        "--out",
        &sw,
    ]);
    let with_png = with.join("00000-7.png");
    assert_eq!(px(1), rgb(&with_png).into_raw());
    assert_eq!(params(&f(1)), params(&with_png));
    let t = sdkit::formats::png_params::parse(&params(&f(1)));
    assert_eq!(t.prompt, "a photo of myemb-000002");
    assert!(t.get("TI hashes").unwrap().starts_with("myemb-000002: "));

    // The same vectors in another file (diffusers' layout) under the same path: the
    // file's hash changed, so its cell renders again; the none cell is kept.
    std::fs::copy(fixture("embedding/diffusers/myemb.safetensors"), &epoch).unwrap();
    let rep: serde_json::Value = serde_json::from_slice(&run_ok(&grid_args).stdout).unwrap();
    assert_eq!(
        (rep["rendered"].as_u64(), rep["kept"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(px(1), rgb(&with_png).into_raw(), "same vectors, same image");

    // --embeddings for every cell: the folder's file of the axis' name is left out (the
    // axis decides what `myemb` means), so the none cell is still the plain image.
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(embedding(), folder.join("myemb.safetensors")).unwrap();
    let out2 = dir.path().join("g2");
    let (sf, so2) = (s(&folder), s(&out2));
    let mut args = grid_args.to_vec();
    let n = args.len();
    args[n - 1] = &so2;
    args.extend(["--embeddings", &sf]);
    run_ok(&args);
    let ix2 = index(&out2);
    let f2 = |x| out2.join(cell(&ix2, x, 0)["file"].as_str().unwrap());
    assert_eq!(rgb(&f2(0)).into_raw(), rgb(&plain_png).into_raw());
    assert_eq!(rgb(&f2(1)).into_raw(), rgb(&with_png).into_raw());
}

/// A hypernetwork axis [none, file] x weight [0, 0.5]: weight 0 and none are the
/// reference, the file at 0.5 is `sdkit sample --hypernetwork FILE:0.5` (pixels and
/// webui's Hypernet entries); `--hypernetwork FILE` with `--weight` gives the same cell.
#[test]
fn hypernetwork_axis_weight_zero_is_reference_and_sample() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("g");
    let (m, h, so) = (s(&model()), s(&hypernetwork()), s(&out));
    let x = format!("hypernetwork=none,{h}");
    let o = run_ok(&[
        "grid",
        "--model",
        &m,
        "--prompt",
        "a photo of a cat",
        "--x",
        &x,
        "--y",
        "weight=0,0.5",
        "--json",
        "--out",
        &so,
    ]);
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["rendered"], 4);
    assert_eq!(rep["work"]["model_loads"], 1);
    assert_eq!(rep["work"]["hypernetwork_attaches"], 2);
    let ix = index(&out);
    assert_eq!(ix["x"]["labels"][1], "hypernetwork: webui_tiny");
    let f = |x, y| out.join(cell(&ix, x, y)["file"].as_str().unwrap());
    let px = |x, y| rgb(&f(x, y)).into_raw();
    assert_eq!(px(1, 0), px(0, 0), "strength 0 is the reference");
    assert_eq!(px(0, 1), px(0, 0));
    assert_ne!(
        px(1, 1),
        px(0, 0),
        "the hypernetwork at 0.5 changes the image"
    );

    let sample_out = dir.path().join("s");
    let (hw, ss) = (format!("{h}:0.5"), s(&sample_out));
    run_ok(&[
        "sample",
        "--model",
        &m,
        "--prompt",
        "a photo of a cat",
        "--hypernetwork",
        &hw,
        "--quiet",
        "--out",
        &ss,
    ]);
    let png = sample_out.join("00000-7.png");
    assert_eq!(px(1, 1), rgb(&png).into_raw());
    let (t, want) = (
        sdkit::formats::png_params::parse(&params(&f(1, 1))),
        sdkit::formats::png_params::parse(&params(&png)),
    );
    assert_eq!(t.prompt, "a photo of a cat <hypernet:webui_tiny:0.5>");
    for k in [
        "Hypernet",
        "Hypernet hash",
        "Hypernet strength",
        "Seed",
        "Model",
    ] {
        assert_eq!(t.get(k), want.get(k), "{k}");
    }
    assert_eq!(t.get("Hypernet strength"), Some("0.5"));

    // A fixed --hypernetwork takes --weight as its strength.
    let out2 = dir.path().join("g2");
    let so2 = s(&out2);
    run_ok(&[
        "grid",
        "--model",
        &m,
        "--prompt",
        "a photo of a cat",
        "--hypernetwork",
        &h,
        "--weight",
        "0.5",
        "--quiet",
        "--out",
        &so2,
    ]);
    assert_eq!(rgb(&out2.join("cells/z0-y0-x0.png")).into_raw(), px(1, 1));
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
    // An SD-like embedding 16 wide: the tiny model's text encoder is 32 wide.
    let wide = dir.path().join("cat.safetensors");
    let t = candle_core::Tensor::zeros((2, 16), candle_core::DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let bytes = sdkit::formats::safetensors::serialize(
        &[("emb_params".to_string(), t)],
        &Default::default(),
    )
    .unwrap();
    std::fs::write(&wide, bytes).unwrap();
    let folder = dir.path().join("embeddings");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(&wide, folder.join("cat.safetensors")).unwrap();
    let emb = s(&embedding());
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
        (
            vec![
                "--x".into(),
                format!("embedding=none,{}", s(&dir.path().join("cat-000002.pt"))),
            ],
            "cat-000002.pt: no such file",
        ),
        (
            vec!["--x".into(), format!("embedding=none,{}", s(&wide))],
            "cat.safetensors: embedding vectors are 16 wide, the model's text encoder is 32 wide",
        ),
        (
            vec!["--embeddings".into(), s(&folder)],
            "cat.safetensors: embedding vectors are 16 wide",
        ),
        (
            vec!["--x".into(), format!("embedding=none,{emb}")],
            "the prompt never uses `myemb`",
        ),
        (
            vec![
                "--x".into(),
                format!("embedding={emb}"),
                "--embedding-name".into(),
                "cat".into(),
                "--embeddings".into(),
                s(&dir.path().join("nowhere")),
            ],
            "nowhere: --embeddings is not a folder",
        ),
        (
            vec!["--embedding-name".into(), "cat".into()],
            "--embedding-name cat: needs an embedding axis",
        ),
        (
            vec!["--x".into(), format!("hypernetwork=none,{}", s(&notlora))],
            "notes.safetensors: not a torch zip file",
        ),
        (
            vec!["--hypernetwork".into(), s(&dir.path().join("ink.pt"))],
            "ink.pt: no such file",
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
