//! `sdkit prep --matte` against rembg, with the fixtures made by
//! tests/fixtures/gen_matte_fixtures.py (tiny ONNX models with the u2net, isnet and
//! birefnet contracts; rembg's preprocessing, mask post-processing and compositing
//! done with Pillow/numpy/onnxruntime).
//!
//! Tolerances. Model input (8-bit, after the LANCZOS resize): bit-exact for PNG
//! sources, and the float32 tensor samples equal numpy's. JPEG source: the decoders
//! differ (libjpeg-turbo vs zune-jpeg) by up to 4 levels in the model input (mean
//! 0.06); the tiny model's steep sigmoid amplifies that to up to 22 levels at a few
//! mask edges (17% of mask values differ, mean 0.31; composites: max 14, mean 0.19)
//! where the fixtures were made; [`JPEG_TOL`] bounds these. Masks and composites from
//! PNG sources (also after bucket crop/resize/flip): at most 1 level apart on at most
//! 0.5% of the values ([`PNG_TOL`]), which allows onnxruntime builds that round the
//! last float bit differently (a truncated mask value then moves by one level); they
//! were bit-identical where the fixtures were made.
//!
//! The inference tests need ONNX Runtime (see README "Tagging"). Without it they
//! print a notice and pass locally; under CI (`CI` set) they fail instead.

use sdkit::dataset::decode::decode_file_any;
use sdkit::dataset::plan::OutputPlan;
use sdkit::dataset::resize::{Filter, Rect, resize_region};
use sdkit::matte::manifest::{Family, manifest};
use sdkit::matte::process::{Source, model_image, write_tensor};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// (largest difference, share of values that differ, mean difference)
type Tol = (u8, f64, f64);
const PNG_TOL: Tol = (1, 0.005, 0.005);
const JPEG_TOL: Tol = (24, 0.20, 0.4);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/matte")
}

fn model(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

fn reference(name: &str) -> image::DynamicImage {
    image::open(fixtures().join("ref").join(name)).unwrap()
}

fn stem_of(image: &str) -> String {
    match image.strip_suffix(".jpg") {
        Some(s) => format!("{s}_jpg"),
        None => image.rsplit_once('.').unwrap().0.to_string(),
    }
}

fn compare(got: &[u8], want: &[u8], tol: Tol, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: sizes differ");
    let (mut max, mut differ, mut sum) = (0u8, 0usize, 0u64);
    for (a, b) in got.iter().zip(want) {
        let d = a.abs_diff(*b);
        max = max.max(d);
        differ += (d != 0) as usize;
        sum += d as u64;
    }
    let n = got.len() as f64;
    let (frac, mean) = (differ as f64 / n, sum as f64 / n);
    eprintln!("{what}: max diff {max}, {differ} differ, mean {mean:.4}");
    assert!(
        max <= tol.0 && frac <= tol.1 && mean <= tol.2,
        "{what}: max diff {max}, {:.3}% differ, mean {mean:.4}",
        frac * 100.0
    );
}

fn tol_for(image: &str) -> Tol {
    if image.ends_with(".jpg") {
        JPEG_TOL
    } else {
        PNG_TOL
    }
}

#[test]
fn model_input_matches_rembg_normalize() {
    let exp: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let input = manifest(Family::U2net).input;
    for name in [
        "photo.png",
        "photo.jpg",
        "alpha.png",
        "grey.png",
        "wide.png",
        "tall.png",
    ] {
        let stem = stem_of(name);
        let img = decode_file_any(&fixtures().join("images").join(name)).unwrap();
        let src = Source::new(img.image);
        let small = model_image(&src.rgb, 320);
        let want = reference(&format!("u2net_{stem}_in.png")).into_rgb8();
        compare(&small.data, want.as_raw(), tol_for(name), name);
        if name.ends_with(".jpg") {
            continue;
        }
        let e = &exp["u2net"][stem.as_str()];
        assert_eq!(
            *small.data.iter().max().unwrap() as u64,
            e["max"].as_u64().unwrap()
        );
        let mut t = vec![0f32; 3 * 320 * 320];
        write_tensor(&small, &input, &mut t);
        for s in e["samples"].as_array().unwrap() {
            let i = s[0].as_u64().unwrap() as usize;
            assert_eq!(t[i], s[1].as_f64().unwrap() as f32, "{name} tensor[{i}]");
        }
    }
}

/// Whether onnxruntime can be found; in CI its absence is a failure.
fn have_runtime() -> bool {
    match sdkit::tag::runtime::find_dylib() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI must run the matting tests: {e}");
            }
            eprintln!("NOTICE: skipping ONNX Runtime tests: {e}");
            false
        }
    }
}

struct Run {
    code: i32,
    json: Value,
    stderr: String,
}

fn prep(args: &[&str], envs: &[(&str, &str)]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .arg("prep")
        .args(args)
        .args(["--json"])
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        json: serde_json::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap_or(Value::Null),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

fn input_dir(images: &[&str]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for n in images {
        std::fs::copy(fixtures().join("images").join(n), d.path().join(n)).unwrap();
    }
    d
}

/// Source file name -> its output records, from the prep manifest.
fn records(out: &Path) -> BTreeMap<String, Vec<Value>> {
    let text = std::fs::read_to_string(out.join("sdkit-prep.jsonl")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .map(|r| {
            let src = Path::new(r["source"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned();
            (src, r["outputs"].as_array().unwrap().clone())
        })
        .collect()
}

fn open_out(out: &Path, rel: &Value) -> image::DynamicImage {
    image::open(out.join(rel.as_str().unwrap())).unwrap()
}

/// Every output (unscaled with `--fit`) and saved mask against the reference.
fn check_unscaled(out: &Path, fam: &str, images: &[&str], bg: &str) {
    let recs = records(out);
    for name in images {
        let stem = stem_of(name);
        let rec = &recs[*name][0];
        let got = open_out(out, &rec["path"]).into_rgb8();
        let want = reference(&format!("{fam}_{stem}_{bg}.png")).into_rgb8();
        assert_eq!(got.dimensions(), want.dimensions(), "{name}");
        compare(
            got.as_raw(),
            want.as_raw(),
            tol_for(name),
            &format!("{fam} {name} composite"),
        );
        let mask = open_out(out, &rec["mask"]);
        assert_eq!(
            mask.color(),
            image::ColorType::L8,
            "{name}: mask is greyscale"
        );
        let alpha_ref = fixtures().join(format!("ref/{fam}_{stem}_alpha.png"));
        let want = if alpha_ref.is_file() {
            image::open(alpha_ref).unwrap()
        } else {
            reference(&format!("{fam}_{stem}_mask.png"))
        };
        compare(
            mask.as_luma8().unwrap().as_raw(),
            want.into_luma8().as_raw(),
            tol_for(name),
            &format!("{fam} {name} mask"),
        );
    }
}

const ALL: [&str; 6] = [
    "photo.png",
    "photo.jpg",
    "alpha.png",
    "grey.png",
    "wide.png",
    "tall.png",
];

#[test]
fn u2net_masks_and_composites_match_rembg_and_reruns_skip() {
    if !have_runtime() {
        return;
    }
    let inp = input_dir(&ALL);
    let out = tempfile::tempdir().unwrap();
    // A neutral file name: the family is detected from the 320 input.
    let m = tempfile::tempdir().unwrap();
    let a320 = m.path().join("model.onnx");
    std::fs::copy(model("a320.onnx"), &a320).unwrap();
    let args = [
        p(inp.path()),
        "--out",
        p(out.path()),
        "--fit",
        "--resolution",
        "1024",
        "--matte",
        p(&a320),
        "--save-masks",
        "--matte-batch",
        "3",
        "--jobs",
        "4",
    ];
    let r = prep(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["written"], 6, "{}", r.json);
    assert!(r.json["matte"].as_str().unwrap().starts_with("u2net"));
    check_unscaled(out.path(), "u2net", &ALL, "white");

    // Unchanged sources and settings: nothing is redone.
    let r = prep(&args, &[]);
    assert_eq!(
        (r.json["written"].as_u64(), r.json["unchanged"].as_u64()),
        (Some(0), Some(6))
    );

    // Another model at the same path (same contract, other weights) redoes everything.
    std::fs::copy(model("b320.onnx"), &a320).unwrap();
    let r = prep(&args, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["written"], 6, "{}", r.json);
    check_unscaled(out.path(), "u2netb", &["photo.png"], "white");
}

#[test]
fn background_colour_and_source_alpha() {
    if !have_runtime() {
        return;
    }
    let inp = input_dir(&["alpha.png"]);
    let out = tempfile::tempdir().unwrap();
    let a320 = model("a320.onnx");
    let r = prep(
        &[
            p(inp.path()),
            "--out",
            p(out.path()),
            "--fit",
            "--resolution",
            "1024",
            "--matte",
            p(&a320),
            "--save-masks",
            "--background",
            "32,64,96",
        ],
        &[],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    check_unscaled(out.path(), "u2net", &["alpha.png"], "c204060");
}

#[test]
fn isnet_and_birefnet_detected_and_match_rembg() {
    if !have_runtime() {
        return;
    }
    let images = ["photo.png", "alpha.png"];
    for (file, fam) in [("isnet-tiny.onnx", "isnet"), ("m1024.onnx", "birefnet")] {
        let inp = input_dir(&images);
        let out = tempfile::tempdir().unwrap();
        let m = model(file);
        let r = prep(
            &[
                p(inp.path()),
                "--out",
                p(out.path()),
                "--fit",
                "--resolution",
                "1024",
                "--matte",
                p(&m),
                "--save-masks",
            ],
            &[],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let desc = r.json["matte"].as_str().unwrap();
        assert!(desc.starts_with(fam), "{file}: {desc}");
        check_unscaled(out.path(), fam, &images, "white");
    }
}

/// The plan of a recorded output (bucketed: no letterbox).
fn plan_of(rec: &Value) -> OutputPlan {
    let c: Vec<f64> = serde_json::from_value(rec["crop"].clone()).unwrap();
    let size: (u32, u32) = serde_json::from_value(rec["size"].clone()).unwrap();
    OutputPlan {
        crop: Rect {
            x: c[0],
            y: c[1],
            w: c[2],
            h: c[3],
        },
        scaled: size,
        size,
        offset: (0, 0),
        bucket: size,
        tile: None,
        flip: rec["flip"].as_bool().unwrap(),
        movable: false,
    }
}

#[test]
fn buckets_flips_and_masks_follow_outputs() {
    if !have_runtime() {
        return;
    }
    let images = ["photo.png", "tall.png"];
    let inp = input_dir(&images);
    let out = tempfile::tempdir().unwrap();
    let a320 = model("a320.onnx");
    let run = |repeats: &str| {
        prep(
            &[
                p(inp.path()),
                "--out",
                p(out.path()),
                "--name",
                "ron",
                "--repeats",
                repeats,
                "--resolution",
                "256",
                "--min-bucket",
                "64",
                "--flip",
                "--matte",
                p(&a320),
                "--save-masks",
            ],
            &[],
        )
    };
    let r = run("2");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json["written"], 4, "{}", r.json);
    let recs = records(out.path());
    for name in images {
        let stem = stem_of(name);
        // Composited at source size first, then cropped and scaled like any output.
        let full = reference(&format!("u2net_{stem}_white.png")).into_rgb8();
        let full_mask = reference(&format!("u2net_{stem}_mask.png")).into_luma8();
        for rec in &recs[name] {
            let plan = plan_of(rec);
            let path = rec["path"].as_str().unwrap();
            let mask_rel = rec["mask"].as_str().unwrap();
            assert!(path.starts_with("img/2_ron/"), "{path}");
            assert_eq!(
                mask_rel,
                format!("masks/{}", path),
                "mask mirrors the image path"
            );
            let got = open_out(out.path(), &rec["path"]).into_rgb8();
            let mut want =
                resize_region(&full, plan.crop, plan.size.0, plan.size.1, Filter::Lanczos3);
            if plan.flip {
                image::imageops::flip_horizontal_in_place(&mut want);
            }
            assert_eq!(got.dimensions(), want.dimensions());
            compare(got.as_raw(), want.as_raw(), PNG_TOL, path);
            let mask = open_out(out.path(), &rec["mask"]).into_luma8();
            let want = sdkit::matte::masks::place(&full_mask, &plan, Filter::Lanczos3);
            assert_eq!(mask.dimensions(), got.dimensions(), "{mask_rel}");
            compare(mask.as_raw(), want.as_raw(), PNG_TOL, mask_rel);
        }
    }
    // A new repeat count renames the folder; the masks move with their images.
    let r = run("3");
    assert_eq!(
        (r.json["written"].as_u64(), r.json["unchanged"].as_u64()),
        (Some(0), Some(4))
    );
    let moved: Vec<_> = std::fs::read_dir(out.path().join("masks/img/3_ron"))
        .unwrap()
        .collect();
    assert_eq!(moved.len(), 4);
    assert!(!out.path().join("masks/img/2_ron").exists());
    // Deleting a mask makes its source be redone.
    let any = std::fs::read_dir(out.path().join("masks/img/3_ron"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::remove_file(&any).unwrap();
    let r = run("3");
    assert_eq!(r.json["written"], 2, "{}", r.json);
    assert!(any.is_file());
}

#[test]
fn failures_are_counted_and_runtime_errors_are_clear() {
    if !have_runtime() {
        return;
    }
    let inp = input_dir(&["photo.png"]);
    std::fs::write(
        inp.path().join("broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let a320 = model("a320.onnx");
    let base = [p(inp.path()), "--out", p(out.path()), "--matte", p(&a320)];
    let r = prep(&base, &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(r.json["written"], 1, "{}", r.json);
    let failed = r.json["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0]["source"]
            .as_str()
            .unwrap()
            .ends_with("broken.png")
    );

    // No onnxruntime: a fatal error naming where it was looked for; prep without
    // --matte does not need it.
    let out2 = tempfile::tempdir().unwrap();
    let no_ort = [("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")];
    let args = [p(inp.path()), "--out", p(out2.path()), "--matte", p(&a320)];
    let r = prep(&args, &no_ort);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("ORT_DYLIB_PATH"), "{}", r.stderr);
    let r = prep(&args[..3], &no_ort);
    assert_eq!(r.code, 1, "{}", r.stderr); // broken.png still fails
    assert_eq!(r.json["written"], 1);

    // A missing model file is fatal too, and says so.
    let missing = inp.path().join("nope.onnx");
    let r = prep(
        &[
            p(inp.path()),
            "--out",
            p(out2.path()),
            "--matte",
            p(&missing),
        ],
        &[],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("nope.onnx"), "{}", r.stderr);
}
