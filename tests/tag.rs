//! `sdkit tag` against the reference taggers, with the fixtures made by
//! tests/fixtures/gen_tag_fixtures.py (webui DeepDanbooru and kohya WD14 preprocessing
//! with Pillow/OpenCV, tiny ONNX models with the real input/output contracts, and the
//! reference captions).
//!
//! Preprocessing tolerance: none. The 8-bit model input equals the reference exactly,
//! for the JPEG source too (decoded by libjpeg-turbo, like Pillow; tests/jpeg.rs).
//! Scores within [`SCORE_TOL`] of onnxruntime's on the reference inputs. Captions:
//! exact text, which holds on every CPU only because every threshold, MCut and order
//! decision the captions take is clear of the cross-CPU score error by a margin
//! ([`reference_scores_keep_caption_decisions_clear`] checks the fixtures for it); the
//! one that is not (a rating argmax two ulps apart) accepts either rating.
//!
//! The inference tests need ONNX Runtime (see docs/tag.md, "ONNX Runtime"). Without it
//! they print a notice and pass locally; under CI (`CI` set) they fail instead.

use sdkit::dataset::caption_io;
use sdkit::dataset::decode::decode_file_any;
use sdkit::tag::labels::Category;
use sdkit::tag::preprocess::{Kind, prepare};
use sdkit::tag::select::{RatingPos, SortBy, mcut_threshold};
use sdkit::tag::{Existing, KindArg, TagOptions};
use std::path::{Path, PathBuf};

const IMAGES: [&str; 5] = ["alpha.png", "grey.png", "wide.jpg", "tall.png", "tiny.png"];

// Cross-CPU numerics of the tiny taggers: a score is sigmoid(logit), the logit a
// 48-term dot product of 4x4-pooled means over 112^2..128^2 pixels. ONNX Runtime
// kernels for other ISAs sum those pixels in another order: ~sqrt(n) * eps = 1e-5
// relative on a mean, ~1e-4 on a logit (sum of |terms| ~80..100). Measured: scores
// bit-identical to the fixtures' on an AVX-512 Xeon (fixtures made without AVX-512),
// with graph optimisations on or off, 1 or 4 threads, batch 1 or 5.

/// Logit difference allowed between CPUs: 10x the summation-order estimate above.
const LOGIT_TOL: f64 = 1e-3;
/// Rounding difference allowed in a score: sigmoid kernels (MLAS' rational
/// approximation, with or without FMA) may round the last bit or two differently,
/// which near 1.0, where the float32 spacing is 6e-8, is most of the difference left
/// between saturated scores.
const SCORE_ULPS: u32 = 4;
/// Scores in the JSONL against the reference: allows a logit error of 8e-3 (8x
/// [`LOGIT_TOL`]; sigmoid' <= 1/4). Catches any wrong model input: RGB fed as BGR
/// moves scores by up to 0.97..0.9996, and even every input value one level off (of
/// 255) moves the DeepDanbooru scores by up to 0.06 (measured with onnxruntime).
const SCORE_TOL: f64 = 2e-3;

fn logit(s: f32) -> f64 {
    let s = s as f64;
    (s / (1.0 - s)).ln()
}

/// Whether `a` and `b` compare the same way on every CPU: `both` when both are scores
/// (each may move), else `b` is a fixed threshold. Returns the logit gap and the
/// float32 distance in ulps, or `None` when that is within the cross-CPU error.
fn clear(a: f32, b: f32, both: bool) -> Option<(f64, u32)> {
    let k = if both { 2 } else { 1 };
    let gap = (logit(a) - logit(b)).abs();
    // Both in [0, 1]: the bit patterns order like the values.
    let ulps = a.to_bits().abs_diff(b.to_bits());
    // Two saturated 1.0 scores give NaN: not clear.
    (gap > k as f64 * LOGIT_TOL && ulps > k * SCORE_ULPS).then_some((gap, ulps))
}

/// The two best-scoring ratings of the WD14 reference scores of image `i` when their
/// order is not clear across CPUs (either may then be the caption's rating).
fn unclear_rating(exp: &serde_json::Value, i: usize) -> Option<(&'static str, &'static str)> {
    const RATINGS: [&str; 4] = ["general", "sensitive", "questionable", "explicit"];
    let s: Vec<f32> = (0..4)
        .map(|k| exp["wd14_scores"][i][k].as_f64().unwrap() as f32)
        .collect();
    let mut idx: Vec<usize> = (0..4).collect();
    idx.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
    match clear(s[idx[0]], s[idx[1]], true) {
        Some(_) => None,
        None => Some((RATINGS[idx[0]], RATINGS[idx[1]])),
    }
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tag")
}

fn expected() -> serde_json::Value {
    let t = std::fs::read_to_string(fixtures().join("expected.json")).unwrap();
    serde_json::from_str(&t).unwrap()
}

fn check_preprocessing(kind: Kind, size: u32, prefix: &str) {
    for name in IMAGES {
        let img = decode_file_any(&fixtures().join("images").join(name)).unwrap();
        let got = prepare(kind, img.image, size);
        let stem = name.split('.').next().unwrap();
        let want = image::open(fixtures().join(format!("ref/{prefix}_{stem}.png")))
            .unwrap()
            .into_rgb8();
        assert_eq!((got.w, got.h), (size as usize, size as usize), "{name}");
        let (mut max, mut differ, mut sum) = (0u8, 0usize, 0u64);
        for (a, b) in got.data.iter().zip(want.as_raw()) {
            let d = a.abs_diff(*b);
            max = max.max(d);
            differ += (d != 0) as usize;
            sum += d as u64;
        }
        let n = got.data.len() as f64;
        let (frac, mean) = (differ as f64 / n, sum as f64 / n);
        let msg = format!(
            "{prefix} {name}: max diff {max}, {:.3}% differ, mean {mean:.4}",
            frac * 100.0
        );
        // PNG and JPEG alike (JPEG is decoded by libjpeg-turbo, as in Pillow): the
        // resamplers are bit-exact, so the model input is identical.
        assert_eq!(differ, 0, "{msg}");
    }
}

#[test]
fn deepdanbooru_preprocessing_matches_webui() {
    check_preprocessing(Kind::DeepDanbooru, 512, "dd");
}

#[test]
fn wd14_preprocessing_matches_kohya() {
    check_preprocessing(Kind::Wd14, 448, "wd14");
}

/// Whether onnxruntime can be found; in CI its absence is a failure.
fn have_runtime() -> bool {
    match sdkit::tag::runtime::find_dylib() {
        Ok(_) => true,
        Err(e) => {
            if std::env::var_os("CI").is_some() {
                panic!("CI must run the tagging tests: {e}");
            }
            eprintln!("NOTICE: skipping ONNX Runtime tests: {e}");
            false
        }
    }
}

/// A temp folder with copies of the test images.
fn image_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for n in IMAGES {
        std::fs::copy(fixtures().join("images").join(n), d.path().join(n)).unwrap();
    }
    d
}

fn opts(dir: &Path, family: &str) -> TagOptions {
    TagOptions {
        dir: dir.to_path_buf(),
        model_dir: Some(fixtures().join(family)),
        quiet: true,
        batch_size: 2,
        ..TagOptions::default()
    }
}

fn caption_of(dir: &Path, image: &str) -> String {
    let p = caption_io::caption_path(&dir.join(image), ".txt");
    caption_io::read_caption(&p).unwrap().unwrap().text
}

fn assert_captions(dir: &Path, want: &serde_json::Value, what: &str) {
    for (i, name) in IMAGES.iter().enumerate() {
        assert_eq!(
            caption_of(dir, name),
            want[i].as_str().unwrap(),
            "{what}: {name}"
        );
    }
}

fn run_ok(o: &TagOptions) -> sdkit::tag::Report {
    let r = sdkit::tag::run(o).unwrap();
    assert_eq!(r.failed, 0, "{:?}", r.failures);
    r
}

#[test]
fn deepdanbooru_captions_match_webui() {
    if !have_runtime() {
        return;
    }
    let exp = expected();
    let d = image_dir();
    let mut o = opts(d.path(), "dd");
    o.jsonl = Some(d.path().join("scores.jsonl"));
    let r = run_ok(&o);
    assert_eq!((r.tagged, r.images), (5, 5));
    assert!(r.contract.starts_with("deepdanbooru"), "{}", r.contract);
    assert_captions(d.path(), &exp["dd_captions"]["default"], "dd default");
    // Scores in the JSONL agree with onnxruntime on the reference inputs.
    let lines = std::fs::read_to_string(d.path().join("scores.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5);
    let tags: Vec<&str> = include_str!("fixtures/tag/dd/tags.txt").lines().collect();
    let mut max_diff = 0f64;
    for l in &lines {
        let file = Path::new(l["image"].as_str().unwrap()).file_name().unwrap();
        let i = IMAGES.iter().position(|n| file == *n).unwrap();
        assert_eq!(l["caption"], exp["dd_captions"]["default"][i]);
        for t in l["tags"].as_array().unwrap() {
            let tag = t["tag"].as_str().unwrap();
            let idx = tags
                .iter()
                .position(|x| sdkit::tag::select::escape_brackets(&x.replace('_', " ")) == tag)
                .unwrap();
            let want = exp["dd_scores"][i][idx].as_f64().unwrap();
            let got = t["score"].as_f64().unwrap();
            assert!((want - got).abs() < SCORE_TOL, "{tag}: {got} vs {want}");
            max_diff = max_diff.max((want - got).abs());
        }
    }
    eprintln!("DeepDanbooru scores: max diff {max_diff:e} from the reference");
    let d = image_dir();
    let mut o = opts(d.path(), "dd");
    o.sort = Some(SortBy::Score);
    o.exclude = vec!["solo".into()];
    run_ok(&o);
    assert_captions(
        d.path(),
        &exp["dd_captions"]["sort-score-exclude-solo"],
        "dd by score",
    );
}

#[test]
fn wd14_captions_match_kohya_and_mcut() {
    if !have_runtime() {
        return;
    }
    let exp = expected();
    let d = image_dir();
    let r = run_ok(&opts(d.path(), "wd14"));
    assert!(
        r.contract.starts_with("wd14: [N, 448, 448, 3]"),
        "{}",
        r.contract
    );
    assert_captions(d.path(), &exp["wd14_captions"]["default"], "wd14 default");

    let d = image_dir();
    let mut o = opts(d.path(), "wd14");
    o.rating = RatingPos::First;
    o.character_first = true;
    o.general_threshold = Some(0.5);
    o.batch_size = 8;
    run_ok(&o);
    // A rating argmax that is not clear across CPUs may pick either of the two.
    let want = &exp["wd14_captions"]["rating-first-character-first-general-0.5"];
    for (i, name) in IMAGES.iter().enumerate() {
        let got = caption_of(d.path(), name);
        let want = want[i].as_str().unwrap();
        let alt = unclear_rating(&exp, i).map(|(first, second)| {
            let rest = want
                .strip_prefix(first)
                .expect("the caption starts with the rating");
            format!("{second}{rest}")
        });
        assert!(
            got == want || alt.as_deref() == Some(got.as_str()),
            "wd14 rating/character first: {name}: {got:?} vs {want:?} (or {alt:?})"
        );
    }

    let d = image_dir();
    let mut o = opts(d.path(), "wd14");
    o.mcut = true;
    o.sort = Some(SortBy::Score);
    o.escape = Some(true);
    o.exclude = vec![
        "hatsune_miku,kirisame_marisa".into(),
        "hakurei reimu".into(),
    ];
    o.batch_size = 1;
    run_ok(&o);
    assert_captions(
        d.path(),
        &exp["wd14_captions"]["mcut-score-escape-no-characters"],
        "wd14 mcut",
    );
}

#[test]
fn existing_captions_modes_and_trigger() {
    if !have_runtime() {
        return;
    }
    let exp = expected();
    let want0 = exp["wd14_captions"]["default"][0].as_str().unwrap();
    let d = image_dir();
    let cap = d.path().join("alpha.txt");
    // skip (default): an existing caption is left byte for byte.
    std::fs::write(&cap, "\u{feff}mine, solo\r\nsecond line\r\n").unwrap();
    let r = run_ok(&opts(d.path(), "wd14"));
    assert_eq!((r.skipped, r.tagged), (1, 4));
    assert_eq!(
        std::fs::read_to_string(&cap).unwrap(),
        "\u{feff}mine, solo\r\nsecond line\r\n"
    );
    // append: existing tags first, no duplicates, BOM/CRLF/rest kept.
    let mut o = opts(d.path(), "wd14");
    o.existing = Existing::Append;
    o.trigger = vec!["ohwx".into()];
    run_ok(&o);
    let new: Vec<&str> = want0.split(", ").filter(|t| *t != "solo").collect();
    let text = format!("ohwx, mine, solo, {}", new.join(", "));
    assert_eq!(
        std::fs::read_to_string(&cap).unwrap(),
        format!("\u{feff}{text}\r\nsecond line\r\n")
    );
    // prepend: new tags first; overwrite: only the new tags.
    std::fs::write(&cap, "mine").unwrap();
    o.existing = Existing::Prepend;
    o.trigger.clear();
    run_ok(&o);
    assert_eq!(caption_of(d.path(), "alpha.png"), format!("{want0}, mine"));
    o.existing = Existing::Overwrite;
    run_ok(&o);
    assert_eq!(caption_of(d.path(), "alpha.png"), want0);
    // --out-dir leaves the image folder alone.
    let out = tempfile::tempdir().unwrap();
    let d2 = image_dir();
    let mut o = opts(d2.path(), "wd14");
    o.out_dir = Some(out.path().join("caps"));
    run_ok(&o);
    assert_eq!(std::fs::read_dir(d2.path()).unwrap().count(), 5);
    assert_eq!(caption_of(&out.path().join("caps"), "alpha.png"), want0);
}

#[test]
fn corrupt_images_are_reported_and_skipped() {
    if !have_runtime() {
        return;
    }
    let d = image_dir();
    std::fs::write(d.path().join("broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::write(d.path().join("empty.jpg"), b"").unwrap();
    let r = sdkit::tag::run(&opts(d.path(), "dd")).unwrap();
    assert_eq!((r.tagged, r.failed, r.images), (5, 2, 7));
    assert!(r.failures[0].file.ends_with("broken.png"));
    assert!(!d.path().join("broken.txt").exists());
    // The binary exits 1 and names the file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args([
            "tag",
            "--quiet",
            "--json",
            "--existing",
            "overwrite",
            "--model-dir",
        ])
        .arg(fixtures().join("dd"))
        .arg(d.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("empty.jpg: empty file"), "{err}");
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["tagged"], 5);
}

#[test]
fn wrong_labels_and_shapes_are_clear_errors() {
    if !have_runtime() {
        return;
    }
    let d = image_dir();
    // DeepDanbooru labels with the WD14 model: counts differ.
    let mut o = opts(d.path(), "wd14");
    o.model_dir = None;
    o.model = Some(fixtures().join("wd14/model.onnx"));
    o.labels = Some(fixtures().join("dd/tags.txt"));
    o.kind = KindArg::Wd14;
    let e = sdkit::tag::run(&o).unwrap_err().to_string();
    assert!(e.contains("14 labels but the model"), "{e}");
    assert!(e.contains("outputs 19 scores"), "{e}");
    // A file that is not an ONNX model.
    let bad = d.path().join("bad.onnx");
    std::fs::write(&bad, b"nope").unwrap();
    o.model = Some(bad);
    o.labels = Some(fixtures().join("wd14/selected_tags.csv"));
    let e = sdkit::tag::run(&o).unwrap_err().to_string();
    assert!(e.contains("bad.onnx: cannot load model"), "{e}");
    // CUDA asked for but not available (CPU onnxruntime, or built without `cuda`).
    let mut o = opts(d.path(), "wd14");
    o.device = sdkit::tag::runtime::Device::Cuda;
    let e = sdkit::tag::run(&o).unwrap_err().to_string();
    assert!(e.contains("CUDA execution provider unavailable"), "{e}");
    // Nothing was written.
    assert!(!d.path().join("alpha.txt").exists());
}

/// The captions are compared as exact text, so every decision they take on the
/// reference scores must come out the same on every CPU: each score clear of the
/// thresholds (0.5 DeepDanbooru; 0.35 and 0.5 WD14) and of the MCut threshold, the
/// largest MCut gap clear of the next, and scores sorted by score clear of their
/// neighbours, all by more than [`LOGIT_TOL`] and [`SCORE_ULPS`] (see [`clear`]).
/// Fails if the fixtures are remade with a score too close to a decision. Rating
/// argmaxes that are not clear are reported; the caption test accepts either rating.
#[test]
fn reference_scores_keep_caption_decisions_clear() {
    let exp = expected();
    let dd = sdkit::tag::labels::read_labels(&fixtures().join("dd/tags.txt")).unwrap();
    let wd = sdkit::tag::labels::read_labels(&fixtures().join("wd14/selected_tags.csv")).unwrap();
    let scores = |key: &str, i: usize| -> Vec<f32> {
        exp[key][i]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect()
    };
    // Smallest (logit gap, ulps) per kind of decision, for the report.
    let mut least: std::collections::BTreeMap<&str, (f64, u32)> = Default::default();
    let mut least_gap = f64::INFINITY;
    let mut check = |what: &'static str, image: &str, a: f32, b: f32, both: bool| {
        let Some((gap, ulps)) = clear(a, b, both) else {
            panic!("{image}: {what}: {a} vs {b} is within the cross-CPU error");
        };
        let e = least.entry(what).or_insert((f64::INFINITY, u32::MAX));
        *e = (e.0.min(gap), e.1.min(ulps));
    };
    let by_score = |mut v: Vec<f32>| {
        v.sort_by(|a, b| b.total_cmp(a));
        v
    };
    for (i, image) in IMAGES.iter().enumerate() {
        let p = scores("dd_scores", i);
        let tags: Vec<f32> = dd
            .iter()
            .zip(&p)
            .filter(|(l, _)| l.category != Category::Rating)
            .map(|(_, &s)| s)
            .collect();
        for &s in &tags {
            check("DeepDanbooru threshold 0.5", image, s, 0.5, false);
        }
        let kept = by_score(tags.into_iter().filter(|&s| s >= 0.5).collect());
        for w in kept.windows(2) {
            check("DeepDanbooru order by score", image, w[0], w[1], true);
        }

        let p = scores("wd14_scores", i);
        let of = |c: Category| -> Vec<f32> {
            wd.iter()
                .zip(&p)
                .filter(|(l, _)| l.category == c)
                .map(|(_, &s)| s)
                .collect()
        };
        let (general, characters) = (of(Category::General), of(Category::Character));
        for &s in general.iter().chain(&characters) {
            check("WD14 threshold 0.35", image, s, 0.35, false);
            check("WD14 threshold 0.5", image, s, 0.5, false);
        }
        let cut = mcut_threshold(&general);
        for &s in &general {
            check("WD14 MCut threshold", image, s, cut, true);
        }
        let sorted = by_score(general.clone());
        let mut gaps: Vec<f32> = sorted.windows(2).map(|w| w[0] - w[1]).collect();
        gaps.sort_by(|a, b| b.total_cmp(a));
        // Four scores each within sigmoid' * LOGIT_TOL <= LOGIT_TOL / 4.
        let gap_margin = (gaps[0] - gaps[1]) as f64;
        assert!(gap_margin > LOGIT_TOL, "{image}: MCut gap not unique");
        least_gap = least_gap.min(gap_margin);
        let kept: Vec<f32> = sorted.into_iter().filter(|&s| s > cut).collect();
        for w in kept.windows(2) {
            check("WD14 order by score (MCut)", image, w[0], w[1], true);
        }
        if let Some((a, b)) = unclear_rating(&exp, i) {
            eprintln!("{image}: WD14 rating {a} vs {b} is within the cross-CPU error");
        }
    }
    for (what, (gap, ulps)) in &least {
        eprintln!("{what}: least logit margin {gap:.4}, least distance {ulps} ulps");
    }
    eprintln!("WD14 MCut largest gap: ahead of the next by at least {least_gap:.4}");
}
