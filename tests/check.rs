//! `sdkit check` end to end: a generated kohya dataset with each problem planted once
//! must give exactly the planted findings; a clean one must give none; the step
//! arithmetic must be kohya's. Plus the perceptual hash against Python's imagehash.

use image::{Rgb, RgbImage};
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

/// A smooth seeded picture: blobs on a gradient, distinct per seed.
fn picture(w: u32, h: u32, seed: u64) -> RgbImage {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x2545_F491_4F6C_DD1D);
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as f64 / (1u64 << 31) as f64
    };
    let blobs: Vec<(f64, f64, f64, f64)> = (0..6)
        .map(|_| (next(), next(), 0.05 + 0.2 * next(), next()))
        .collect();
    let (gx, gy) = (next(), next());
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f64 / w as f64, y as f64 / h as f64);
        let mut v = 60.0 * (gx * fx + gy * fy);
        for &(bx, by, r, a) in &blobs {
            let d2 = (fx - bx).powi(2) + (fy - by).powi(2);
            v += 190.0 * a * (-d2 / (r * r)).exp();
        }
        let v = v.clamp(0.0, 255.0) as u8;
        Rgb([v, 255 - v, v / 2 + 60])
    })
}

fn put(path: &Path, img: &RgbImage, caption: Option<&[u8]>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    img.save(path).unwrap();
    if let Some(c) = caption {
        std::fs::write(path.with_extension("txt"), c).unwrap();
    }
}

fn sdkit(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .arg("check")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> (i32, Value) {
    let mut a = args.to_vec();
    a.push("--json");
    let (code, out, err) = sdkit(&a);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v)
}

/// (code, folder, files) of every finding.
fn found(report: &Value) -> BTreeSet<(String, String, Vec<String>)> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let mut files: Vec<String> = f["files"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect();
            files.sort();
            (
                f["code"].as_str().unwrap().to_string(),
                f["folder"].as_str().unwrap().to_string(),
                files,
            )
        })
        .collect()
}

fn severity_of(report: &Value, code: &str) -> String {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == code)
        .map(|f| f["severity"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

/// The planted dataset. Returns its root.
fn problem_set(root: &Path) {
    let c = root.join("img/10_ohwx");
    let cap = |extra: &str| format!("ohwx, 1girl, {extra}").into_bytes();
    for i in 0..12 {
        put(
            &c.join(format!("good{i:02}.png")),
            &picture(512, 512, i),
            Some(&cap(&format!("pose {i}, outfit {i}"))),
        );
    }
    // Unreadable: a PNG cut in half.
    let mut png = Vec::new();
    picture(512, 512, 100)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    std::fs::write(c.join("broken.png"), &png[..png.len() / 2]).unwrap();
    std::fs::write(c.join("broken.txt"), cap("broken")).unwrap();
    // Below its bucket: 200x200 in a 512x512 bucket (2.56x upscale).
    put(
        &c.join("small.png"),
        &picture(200, 200, 101),
        Some(&cap("small")),
    );
    put(&c.join("nocap.png"), &picture(512, 512, 102), None);
    put(&c.join("empty.png"), &picture(512, 512, 103), Some(b""));
    put(
        &c.join("badutf.png"),
        &picture(512, 512, 104),
        Some(b"ohwx, \xff\xfe"),
    );
    let long: Vec<String> = (0..30).map(|i| format!("very detailed tag {i}")).collect();
    put(
        &c.join("long.png"),
        &picture(512, 512, 105),
        Some(&cap(&long.join(", "))),
    );
    put(
        &c.join("notrig.png"),
        &picture(512, 512, 106),
        Some(b"1girl, no trigger here"),
    );
    // Near duplicates: the same picture, downscaled and saved as JPEG.
    let dup = picture(640, 640, 107);
    put(&c.join("dup_a.png"), &dup, Some(&cap("dup a")));
    let small_dup = image::imageops::resize(&dup, 560, 560, image::imageops::FilterType::Triangle);
    put(&c.join("dup_b.jpg"), &small_dup, Some(&cap("dup b")));
    // The only 2:1 picture: alone in bucket 704x320.
    put(
        &c.join("wide.png"),
        &picture(1024, 512, 108),
        Some(&cap("wide")),
    );
    // kohya does not read .gif.
    picture(64, 64, 109).save(c.join("extra.gif")).unwrap();
    // Two images, one caption file.
    put(
        &c.join("twin.png"),
        &picture(512, 512, 110),
        Some(&cap("twin")),
    );
    put(&c.join("twin.jpg"), &picture(512, 512, 111), None);

    // A second concept with too few images (trigger "stylz" opens every caption).
    for i in 0..5 {
        put(
            &root.join(format!("img/2_style/s{i}.png")),
            &picture(512, 512, 200 + i),
            Some(format!("stylz, scene {i}").as_bytes()),
        );
    }
    put(
        &root.join("img/misc/m.png"),
        &picture(512, 512, 300),
        Some(b"ohwx"),
    );
    put(
        &root.join("img/0_off/o.png"),
        &picture(512, 512, 301),
        Some(b"ohwx"),
    );
    std::fs::create_dir_all(root.join("img/3_empty")).unwrap();
    // Three reg images for 240 training samples; one caption holds the trigger.
    for i in 0..3 {
        let text = if i == 1 { "woman, ohwx" } else { "woman" };
        put(
            &root.join(format!("reg/1_woman/r{i}.png")),
            &picture(512, 512, 400 + i),
            Some(text.as_bytes()),
        );
    }
}

fn clean_set(root: &Path) {
    for i in 0..16 {
        put(
            &root.join(format!("img/2_ohwx/a{i:02}.png")),
            &picture(512, 512, 1000 + i),
            Some(format!("ohwx, look {i}, place {i}").as_bytes()),
        );
        put(
            &root.join(format!("reg/2_woman/r{i:02}.jpg")),
            &picture(576, 576, 2000 + i),
            Some(format!("woman, scene {i}").as_bytes()),
        );
    }
}

fn v(files: &[&str]) -> Vec<String> {
    files.iter().map(|s| s.to_string()).collect()
}

#[test]
fn planted_problems_are_each_found_and_nothing_else() {
    let d = tempfile::tempdir().unwrap();
    problem_set(d.path());
    let dir = d.path().to_str().unwrap();
    let (code, r) = json(&[dir, "--epochs", "10", "--batch-size", "2", "--quiet"]);
    assert_eq!(code, 0, "no --strict: exit 0 despite errors");
    let t = "img/10_ohwx";
    let expect: BTreeSet<(String, String, Vec<String>)> = [
        ("unreadable-image", t, v(&["img/10_ohwx/broken.png"])),
        ("small-image", t, v(&["img/10_ohwx/small.png"])),
        ("missing-caption", t, v(&["img/10_ohwx/nocap.png"])),
        ("empty-caption", t, v(&["img/10_ohwx/empty.png"])),
        ("unreadable-caption", t, v(&["img/10_ohwx/badutf.png"])),
        ("long-caption", t, v(&["img/10_ohwx/long.png"])),
        ("trigger-missing", t, v(&["img/10_ohwx/notrig.png"])),
        (
            "near-duplicate",
            t,
            v(&["img/10_ohwx/dup_a.png", "img/10_ohwx/dup_b.jpg"]),
        ),
        ("tag-in-every-caption", t, v(&[])),
        ("tiny-bucket", t, v(&["img/10_ohwx/wide.png"])),
        ("ignored-file", t, v(&["img/10_ohwx/extra.gif"])),
        (
            "shared-caption",
            t,
            v(&["img/10_ohwx/twin.jpg", "img/10_ohwx/twin.png"]),
        ),
        ("few-images", "img/2_style", v(&[])),
        ("not-a-concept-folder", "img/misc", v(&[])),
        ("zero-repeats", "img/0_off", v(&[])),
        ("no-images", "img/3_empty", v(&[])),
        ("reg-balance", "reg/1_woman", v(&[])),
        ("trigger-in-reg", "reg/1_woman", v(&["reg/1_woman/r1.png"])),
    ]
    .into_iter()
    .map(|(c, f, files)| (c.to_string(), f.to_string(), files))
    .collect();
    let got = found(&r);
    let missing: Vec<_> = expect.difference(&got).collect();
    let extra: Vec<_> = got.difference(&expect).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:#?}\nunexpected {extra:#?}"
    );
    for (code, sev) in [
        ("unreadable-image", "error"),
        ("empty-caption", "error"),
        ("unreadable-caption", "error"),
        ("zero-repeats", "error"),
        ("small-image", "warn"),
        ("tiny-bucket", "warn"),
        ("tag-in-every-caption", "info"),
        ("reg-balance", "info"),
    ] {
        assert_eq!(severity_of(&r, code), sev, "{code}");
    }
    let every = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["code"] == "tag-in-every-caption")
        .unwrap();
    assert!(every["message"].as_str().unwrap().contains("\"1girl\""));
    assert!(
        r["findings"]
            .as_array()
            .unwrap()
            .iter()
            .all(|f| !f["suggestion"].as_str().unwrap().is_empty())
    );

    // kohya's arithmetic. Training: 23 readable images x 10 + 5 x 2 = 240 samples.
    // Reg: 3 images registered, then raised round-robin to 240. Buckets: 704x320 holds
    // wide.png (10 samples), 512x512 the rest (220 + 10 + 240 reg) at batch 2:
    // ceil(10/2) + ceil(470/2) = 5 + 235 = 240 batches; 10 epochs = 2400 steps.
    let p = &r["plan"];
    assert_eq!(p["train_samples"], 240);
    assert_eq!(p["reg_samples_on_disk"], 3);
    assert_eq!(p["reg_samples"], 240);
    assert_eq!(p["batches"], 240);
    assert_eq!(p["total_steps"], 2400);
    assert_eq!(p["buckets"]["704x320"], 10);
    assert_eq!(p["buckets"]["512x512"], 470);
    let ohwx = r["folders"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["folder"] == t)
        .unwrap();
    assert_eq!(ohwx["images"], 24);
    assert_eq!(ohwx["unreadable"], 1);
    assert_eq!(ohwx["samples"], 230);
    assert_eq!(ohwx["steps"], 1150);
    assert_eq!(ohwx["trigger"], "ohwx");
    assert_eq!(ohwx["trigger_source"], "folder-name");

    // --strict turns errors into exit 1; the human report groups by folder.
    let (code, out, _) = sdkit(&[dir, "--strict", "--epochs", "10", "--batch-size", "2"]);
    assert_eq!(code, 1);
    assert!(out.contains("img/10_ohwx [train]"), "{out}");
    assert!(out.contains("near-duplicate"), "{out}");
    assert!(
        out.contains("plan: 240 training + 240 reg samples"),
        "{out}"
    );
}

#[test]
fn clean_set_has_no_findings() {
    let d = tempfile::tempdir().unwrap();
    clean_set(d.path());
    let dir = d.path().to_str().unwrap();
    let (code, r) = json(&[dir, "--epochs", "10", "--batch-size", "2", "--strict"]);
    assert_eq!(code, 0);
    assert_eq!(r["findings"], Value::Array(vec![]), "{:#}", r["findings"]);
    assert_eq!(r["layout"], "kohya");
    // 16 x 2 = 32 training samples, 16 reg x 2 = 32 (exactly balanced), one bucket:
    // 64 samples / batch 2 = 32 batches per epoch, 320 steps in 10 epochs.
    let p = &r["plan"];
    assert_eq!(
        (p["train_samples"].as_u64(), p["reg_samples"].as_u64()),
        (Some(32), Some(32))
    );
    assert_eq!(
        (p["batches"].as_u64(), p["total_steps"].as_u64()),
        (Some(32), Some(320))
    );
    // Without --epochs: kohya's default 1600 steps = 50 epochs of 32 batches.
    let (_, r) = json(&[dir, "--batch-size", "2"]);
    assert_eq!(r["plan"]["epochs"], 50);
    assert_eq!(r["plan"]["epochs_from_default_steps"], true);
    // One concept folder given directly.
    let (_, r) = json(&[&format!("{dir}/img/2_ohwx")]);
    assert_eq!(r["layout"], "single");
    assert_eq!(r["findings"], Value::Array(vec![]));
    assert_eq!(r["plan"]["batches"], 32);
}

#[test]
fn missing_folder_is_fatal() {
    let (code, _, err) = sdkit(&["/nonexistent/sdkit-check"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/sdkit-check"), "{err}");
}

#[test]
fn phash_matches_python_imagehash() {
    use sdkit::check::phash;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/phash");
    let reference: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("phash.json")).unwrap()).unwrap();
    assert_eq!(reference.len(), 20);
    for (file, r) in &reference {
        let theirs = u64::from_str_radix(r["phash"].as_str().unwrap(), 16).unwrap();
        let thumb: Vec<u8> = r["thumb"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        // DCT, median and bit order: exact on Pillow's own thumbnail.
        assert_eq!(
            phash::hash_thumbnail(&thumb),
            theirs,
            "{file}: hash of Pillow's thumbnail"
        );
        // Greyscale + Lanczos: within one level of Pillow's.
        let img = image::open(dir.join(file)).unwrap().into_rgb8();
        let ours = phash::grey_thumbnail(&img);
        let worst = ours
            .iter()
            .zip(&thumb)
            .map(|(a, b)| (*a as i32 - *b as i32).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "{file}: thumbnail differs by {worst} levels");
        // End to end: rounding moves coefficients that sit at the median (these smooth
        // test pictures have many), so a few bits may flip; distinct pictures are ~32
        // apart and the near-duplicate default is 8.
        let d = phash::distance(phash::phash(&img), theirs);
        assert!(d <= 6, "{file}: {d} bits from imagehash");
    }
}
