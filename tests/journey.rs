//! The whole journey of the README on the bundled photos (examples/photos) with the tiny
//! fixture models, through the real `sdkit` binary: tag (the tiny WD14 tagger of
//! tests/tag.rs), prep, caption edits, check, the four training methods on the tiny SD1
//! pipeline (tests/fixtures/checkpoint), sample with each adapter, and a grid over the
//! LoRA's saves. Each step's artefacts are checked (files, keys, sizes, captions), and
//! each trained adapter must change the rendered image.
//!
//! Tagging needs ONNX Runtime (docs/tag.md): without it the tag step prints a notice and
//! the journey goes on with the photos' own captions; under CI (`CI` set) it fails, as in
//! tests/tag.rs.

mod common;

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Mean absolute difference (8-bit levels) an adapter must make to the image. Other
/// CPUs' kernels move a few pixels by one level at most (mean < 0.01); measured: LoRA
/// 3.7, DreamBooth 4.7, hypernetwork 5.9, embedding 6.4.
const MIN_CHANGE: f64 = 0.25;

/// Sample size: not square, so a swapped width and height shows.
const W: u32 = 48;
const H: u32 = 32;

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// Runs `sdkit ARGS --json`; asserts exit 0 and returns the JSON summary.
fn sdkit(args: &[String]) -> Value {
    let started = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .arg("--json")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sdkit {}: {err}", args.join(" "));
    let secs = started.elapsed().as_secs_f64();
    let what = match args[1].contains('/') {
        true => args[0].clone(),
        false => format!("{} {}", args[0], args[1]),
    };
    eprintln!("sdkit {what}: {secs:.1}s");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("sdkit {}: {e}: {err}", args.join(" ")))
}

fn argv(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The tags of a caption file's first line.
fn tags(p: &Path) -> Vec<String> {
    let t = std::fs::read_to_string(p).unwrap();
    let line = t.lines().next().unwrap_or("");
    line.split(',')
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Caption tags by image stem (images without a caption map to `None`).
fn captions(dir: &Path) -> BTreeMap<String, Option<Vec<String>>> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if matches!(p.extension().and_then(|e| e.to_str()), Some("png" | "jpg")) {
            let txt = p.with_extension("txt");
            let stem = p.file_stem().unwrap().to_string_lossy().into_owned();
            m.insert(stem, txt.is_file().then(|| tags(&txt)));
        }
    }
    m
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .to_rgb8()
}

fn mean_abs_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y) as u64)
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

/// Whether onnxruntime can be found; in CI its absence is a failure (tests/tag.rs).
fn have_runtime() -> bool {
    match sdkit::tag::runtime::find_dylib() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI must run the tagging step: {e}");
            }
            eprintln!("NOTICE: skipping the tag step (no ONNX Runtime): {e}");
            false
        }
    }
}

/// Step 1: tag the photos that have no caption (`--existing skip` keeps the two that do).
fn tag(photos: &Path) {
    if !have_runtime() {
        return;
    }
    let model_dir = repo("tests/fixtures/tag/wd14");
    let rep = sdkit(&argv(&[
        "tag",
        &s(photos),
        "--model-dir",
        &s(&model_dir),
        "--quiet",
    ]));
    assert_eq!(
        (rep["tagged"].as_u64(), rep["skipped"].as_u64()),
        (Some(3), Some(2))
    );
    // Every tag written is a label of the model (underscores become spaces).
    let labels: Vec<String> = std::fs::read_to_string(model_dir.join("selected_tags.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.split(',').nth(1).unwrap().replace('_', " "))
        .collect();
    for stem in ["astronaut", "camera", "rocket"] {
        let t = tags(&photos.join(format!("{stem}.txt")));
        assert!(!t.is_empty(), "{stem}: no tags");
        for tag in &t {
            assert!(labels.contains(&tag.replace('_', " ")), "{stem}: {tag}");
        }
    }
}

/// Step 2: `sdkit prep`: every photo sized to the one 64x64 bucket of `--resolution 64`, its
/// caption carried verbatim. Returns the concept folder.
fn prep(photos: &Path, set: &Path) -> PathBuf {
    let rep = sdkit(&argv(&[
        "prep",
        &s(photos),
        "--out",
        &s(set),
        "--name",
        "ohwx",
        "--repeats",
        "2",
        "--resolution",
        "64",
        "--min-bucket",
        "64",
        "--max-bucket",
        "128",
        "--quiet",
    ]));
    assert_eq!(rep["written"], 5, "{rep}");
    assert_eq!(rep["buckets"], serde_json::json!({"64x64": 5}));
    assert_eq!(rep["train_samples"], 10);
    let concept = set.join("img/2_ohwx");
    let out = captions(&concept);
    assert_eq!(out.len(), 5, "{out:?}");
    let text = |p: PathBuf| std::fs::read(p).ok();
    for name in out.keys() {
        assert_eq!(
            rgb(&concept.join(format!("{name}.png"))).dimensions(),
            (64, 64)
        );
        // `stem-xxxxxx`: the source's stem and six hex digits of its path.
        let (stem, hash) = name.rsplit_once('-').unwrap();
        assert_eq!(hash.len(), 6, "{name}");
        assert_eq!(
            text(concept.join(format!("{name}.txt"))),
            text(photos.join(format!("{stem}.txt"))),
            "{name}: caption not carried"
        );
    }
    concept
}

/// Step 3: trigger word first (and a caption for any image without one), then two removals:
/// a tag and, by pattern, every `... background` tag.
fn edit_captions(set: &Path, concept: &Path) {
    let before = captions(concept);
    let img = s(&set.join("img"));
    let add = sdkit(&argv(&[
        "caption",
        "add",
        &img,
        "ohwx",
        "--position",
        "first",
        "--create-missing",
        "--quiet",
    ]));
    assert_eq!(add["written"], 5);
    sdkit(&argv(&[
        "caption",
        "remove",
        &img,
        "looking at viewer",
        "--quiet",
    ]));
    sdkit(&argv(&[
        "caption",
        "remove",
        &img,
        "--regex",
        ".* background",
        "--quiet",
    ]));
    let after = captions(concept);
    for (name, old) in before {
        let mut want = vec!["ohwx".to_string()];
        want.extend(
            old.unwrap_or_default()
                .into_iter()
                .filter(|t| t != "looking at viewer" && !t.ends_with(" background")),
        );
        assert_eq!(after[&name].as_ref(), Some(&want), "{name}");
    }
    let chelsea = after
        .iter()
        .find(|(k, _)| k.starts_with("chelsea-"))
        .unwrap();
    assert_eq!(
        chelsea.1.as_ref().unwrap().join(", "),
        "ohwx, cat, tabby cat, orange fur"
    );
}

/// Step 4: `sdkit check --strict`: no error, every image captioned, the trigger found; the
/// planned step count (returned) is the one training will run.
fn check(set: &Path) -> u64 {
    let rep = sdkit(&argv(&[
        "check",
        &s(set),
        "--resolution",
        "64",
        "--min-bucket",
        "64",
        "--max-bucket",
        "128",
        "--trigger",
        "ohwx",
        "--epochs",
        "1",
        "--batch-size",
        "2",
        "--strict",
        "--quiet",
    ]));
    assert_eq!(rep["counts"]["error"], 0, "{rep}");
    let codes: Vec<&str> = rep["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    // Five photos are few for a LoRA; nothing else is wrong with the set.
    assert_eq!(codes, ["few-images"], "{rep}");
    let f = &rep["folders"][0];
    assert_eq!(
        (f["images"].as_u64(), f["captioned"].as_u64()),
        (Some(5), Some(5))
    );
    assert_eq!(f["trigger"], "ohwx");
    rep["plan"]["total_steps"].as_u64().unwrap()
}

/// `sdkit train METHOD` on the tiny model at the set's 64x64 bucket.
fn train(method: &str, set: &Path, out: &Path, extra: &[&str]) -> Value {
    let model = common::checkpoints().join("sd1_diffusers");
    let mut a = argv(&["train", method, "--model", &s(&model), "--data", &s(set)]);
    a.extend(argv(&[
        "--out",
        &s(out),
        "--output-name",
        "ohwx",
        "--quiet",
    ]));
    a.extend(argv(&["--resolution", "64", "--min-bucket-reso", "32"]));
    a.extend(argv(&[
        "--max-bucket-reso",
        "128",
        "--bucket-reso-steps",
        "32",
    ]));
    a.extend(argv(&["--seed", "1"]));
    a.extend(argv(&["--device", &common::device_arg()]));
    a.extend(argv(extra));
    sdkit(&a)
}

fn read_st(
    p: &Path,
) -> (
    BTreeMap<String, candle_core::Tensor>,
    BTreeMap<String, String>,
) {
    sdkit::formats::safetensors::read_with_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Step 5: the four methods, each a short run; returns the adapter files (LoRA folder, the
/// DreamBooth checkpoint, the embeddings folder, the hypernetwork).
fn train_all(set: &Path, root: &Path, planned_steps: u64) -> [PathBuf; 4] {
    let lora = root.join("lora");
    let rep = train(
        "lora",
        set,
        &lora,
        &[
            "--max-train-epochs",
            "1",
            "--batch-size",
            "2",
            "--save-every-n-steps",
            "3",
            "--learning-rate",
            "5e-3",
            "--network-dim",
            "4",
            "--network-alpha",
            "4",
        ],
    );
    assert_eq!(rep["steps"].as_u64(), Some(planned_steps), "check's plan");
    assert!(lora.join("ohwx-step00000003.safetensors").is_file());
    let (t, meta) = read_st(&lora.join("ohwx.safetensors"));
    assert!(
        t.keys().any(|k| k.starts_with("lora_unet_")),
        "{:?}",
        t.keys()
    );
    assert!(
        t.keys()
            .all(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_"))
    );
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_num_train_images"], "10");
    assert_eq!(meta["ss_epoch"], "1");
    assert_eq!(meta["ss_steps"], planned_steps.to_string());
    let freq: Value = serde_json::from_str(&meta["ss_tag_frequency"]).unwrap();
    assert_eq!(freq["2_ohwx"]["ohwx"], 5, "{freq}");

    let db = root.join("db");
    train(
        "dreambooth",
        set,
        &db,
        &["--max-train-steps", "4", "--learning-rate", "2e-4"],
    );
    let db_file = db.join("ohwx.safetensors");
    let (t, meta) = read_st(&db_file);
    assert_eq!(meta["ss_training_method"], "dreambooth");
    for prefix in [
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.",
    ] {
        assert!(t.keys().any(|k| k.starts_with(prefix)), "no {prefix} keys");
    }

    // Vectors start as the init word's ("cat" twice) and learn fast at this rate: the
    // tiny UNet hardly reads its text, so only large moves show in the image.
    let ti = root.join("ti");
    train(
        "textual-inversion",
        set,
        &ti,
        &[
            "--max-train-steps",
            "6",
            "--learning-rate",
            "5",
            "--init-word",
            "cat",
            "--num-vectors-per-token",
            "2",
        ],
    );
    let (t, _) = read_st(&ti.join("ohwx.safetensors"));
    assert_eq!(t["emb_params"].dims(), &[2, 32]);

    let hn = root.join("hn");
    train(
        "hypernetwork",
        set,
        &hn,
        &[
            "--max-train-steps",
            "6",
            "--learning-rate",
            "2e-2",
            "--activation-func",
            "relu",
        ],
    );
    let hn_file = hn.join("ohwx.pt");
    let net =
        sdkit::adapters::hypernetwork::Hypernetwork::load(&hn_file, &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!((net.meta.name.as_str(), net.meta.step), ("ohwx", 6));
    [lora, db_file, ti, hn_file]
}

/// The sample settings of every render (the grid's too).
fn settings() -> Vec<String> {
    let (w, h) = (W.to_string(), H.to_string());
    argv(&[
        "--seed",
        "3",
        "--steps",
        "3",
        "--sampler",
        "ddim",
        "--cfg",
        "12",
        "--width",
        &w,
        "--height",
        &h,
        "--quiet",
    ])
    .into_iter()
    .chain(argv(&["--device", &common::device_arg()]))
    .collect()
}

/// `sdkit sample` of one image; returns it and the summary.
fn sample(model: &Path, prompt: &str, extra: &[String], out: &Path) -> (PathBuf, Value) {
    let mut a = argv(&["sample", "--model", &s(model), "--prompt", prompt]);
    a.extend(argv(&["--out", &s(out)]));
    a.extend(settings());
    a.extend_from_slice(extra);
    let rep = sdkit(&a);
    let img = PathBuf::from(rep["images"][0].as_str().unwrap());
    assert_eq!(rgb(&img).dimensions(), (W, H), "{}", img.display());
    (img, rep)
}

fn changed(what: &str, img: &Path, reference: &Path) {
    let d = mean_abs_diff(&rgb(img), &rgb(reference));
    eprintln!("{what}: mean difference {d:.3} levels (at least {MIN_CHANGE})");
    assert!(d > MIN_CHANGE, "{what} does not change the image ({d:.3})");
}

#[test]
fn photos_to_trained_adapters_samples_and_grid() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let photos = root.join("photos");
    std::fs::create_dir(&photos).unwrap();
    for e in std::fs::read_dir(repo("examples/photos")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, photos.join(p.file_name().unwrap())).unwrap();
    }
    tag(&photos);
    let set = root.join("set");
    let concept = prep(&photos, &set);
    edit_captions(&set, &concept);
    let steps = check(&set);
    let [lora, db, ti, hn] = train_all(&set, root, steps);

    // Step 6: samples: the base model, then each adapter.
    let base_model = common::checkpoints().join("sd1_diffusers");
    let prompt = "ohwx, cat";
    let smp = root.join("samples");
    let (base, _) = sample(&base_model, prompt, &[], &smp.join("base"));
    let lora_file = lora.join("ohwx.safetensors");
    let (with_lora, rep) = sample(
        &base_model,
        prompt,
        &argv(&["--lora", &s(&lora_file)]),
        &smp.join("lora"),
    );
    assert_eq!(rep["loras"].as_array().map(|l| l.len()), Some(1), "{rep}");
    changed("LoRA", &with_lora, &base);
    let (with_db, _) = sample(&db, prompt, &[], &smp.join("db"));
    changed("DreamBooth checkpoint", &with_db, &base);
    let (with_hn, rep) = sample(
        &base_model,
        prompt,
        &argv(&["--hypernetwork", &s(&hn)]),
        &smp.join("hn"),
    );
    assert!(!rep["hypernetwork"].is_null(), "{rep}");
    changed("hypernetwork", &with_hn, &base);
    // The embedding against its starting point: "ohwx" as the init vectors is the
    // prompt with "cat cat" in its place (the same token embeddings, pixel for pixel).
    let (with_ti, rep) = sample(
        &base_model,
        prompt,
        &argv(&["--embeddings", &s(&ti)]),
        &smp.join("ti"),
    );
    assert!(rep["embeddings_used"].to_string().contains("ohwx"), "{rep}");
    let (init, _) = sample(&base_model, "cat cat, cat", &[], &smp.join("ti-init"));
    changed("embedding", &with_ti, &init);

    // Step 7: the grid over the LoRA's saves (and none) at two weights.
    grid(root, &base_model, &lora, &base, &with_lora);
}

fn grid(root: &Path, model: &Path, lora: &Path, base: &Path, with_lora: &Path) {
    let out = root.join("grid");
    let x = format!(
        "lora=none,{},{}",
        s(&lora.join("ohwx-*.safetensors")),
        s(&lora.join("ohwx.safetensors"))
    );
    let mut a = argv(&["grid", "--model", &s(model), "--prompt", "ohwx, cat"]);
    a.extend(argv(&["--x", &x, "--y", "weight=0.5,1", "--out", &s(&out)]));
    a.extend(settings());
    let rep = sdkit(&a);
    assert_eq!(rep["rendered"], 6, "{rep}");
    assert!(out.join("index.html").is_file());
    let ix: Value = serde_json::from_slice(&std::fs::read(out.join("grid.json")).unwrap()).unwrap();
    let labels = &ix["x"]["labels"];
    assert_eq!(labels.as_array().unwrap().len(), 3, "{labels}");
    assert_eq!(labels[1], "lora: ohwx-step00000003");
    let l = &ix["layout"];
    let (left, top) = (l["left"].as_u64().unwrap(), l["top"].as_u64().unwrap());
    let g = rgb(&out.join("grid.png"));
    assert_eq!(g.dimensions(), (left as u32 + 3 * W, top as u32 + 2 * H));
    let cells = ix["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 6);
    let cell = |x: u64, y: u64| {
        let c = cells.iter().find(|c| c["x"] == x && c["y"] == y).unwrap();
        rgb(&out.join(c["file"].as_str().unwrap()))
    };
    for (x, y) in [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)] {
        assert_eq!(cell(x, y).dimensions(), (W, H));
    }
    // The reference column is the base sample; the last save at weight 1 is the LoRA
    // sample; the step-3 save at weight 1 is an image of its own.
    assert_eq!(cell(0, 1).into_raw(), rgb(base).into_raw());
    assert_eq!(cell(2, 1).into_raw(), rgb(with_lora).into_raw());
    assert_ne!(cell(1, 1).into_raw(), cell(2, 1).into_raw());
}
