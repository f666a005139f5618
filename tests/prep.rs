//! End-to-end tests of `sdkit prep` on images the tests generate.

use image::{ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn sdkit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sdkit"))
}

struct Run {
    code: i32,
    json: Value,
    stderr: String,
}

fn prep(args: &[&str]) -> Run {
    let out = sdkit()
        .arg("prep")
        .args(args)
        .args(["--json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_str(&stdout).unwrap_or(Value::Null);
    Run {
        code: out.status.code().unwrap_or(-1),
        json,
        stderr,
    }
}

fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// An upright test card: quadrants red (top left), green (top right), blue (bottom
/// left), white (bottom right).
fn card(w: u32, h: u32) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| match (x < w / 2, y < h / 2) {
        (true, true) => Rgb([255, 0, 0]),
        (false, true) => Rgb([0, 255, 0]),
        (true, false) => Rgb([0, 0, 255]),
        (false, false) => Rgb([255, 255, 255]),
    })
}

fn assert_upright(img: &RgbImage, what: &str) {
    let (w, h) = img.dimensions();
    let at = |fx: f32, fy: f32| {
        img.get_pixel((w as f32 * fx) as u32, (h as f32 * fy) as u32)
            .0
    };
    let close = |a: [u8; 3], b: [u8; 3]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (*x as i32 - y as i32).abs() < 40)
    };
    assert!(
        close(at(0.25, 0.25), [255, 0, 0]),
        "{what}: top left is {:?}",
        at(0.25, 0.25)
    );
    assert!(
        close(at(0.75, 0.25), [0, 255, 0]),
        "{what}: top right is {:?}",
        at(0.75, 0.25)
    );
    assert!(
        close(at(0.25, 0.75), [0, 0, 255]),
        "{what}: bottom left is {:?}",
        at(0.25, 0.75)
    );
    assert!(
        close(at(0.75, 0.75), [255, 255, 255]),
        "{what}: bottom right is {:?}",
        at(0.75, 0.75)
    );
}

/// Minimal big-endian TIFF/EXIF block holding only the Orientation tag.
fn exif_orientation(o: u16) -> Vec<u8> {
    let mut v = b"MM\0\x2a\0\0\0\x08".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0x0112u16.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&o.to_be_bytes());
    v.extend_from_slice(&[0, 0]);
    v.extend_from_slice(&0u32.to_be_bytes());
    v
}

/// The stored pixels that display as `upright` under EXIF orientation `o`.
fn stored_for(upright: &RgbImage, o: u16) -> RgbImage {
    use image::imageops::*;
    match o {
        1 => upright.clone(),
        2 => flip_horizontal(upright),
        3 => rotate180(upright),
        4 => flip_vertical(upright),
        5 => flip_horizontal(&rotate90(upright)),
        6 => rotate270(upright),
        7 => flip_horizontal(&rotate270(upright)),
        8 => rotate90(upright),
        _ => unreachable!(),
    }
}

fn write_jpeg(path: &Path, img: &RgbImage, exif: Option<Vec<u8>>) {
    let mut buf = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, 95);
    if let Some(e) = exif {
        enc.set_exif_metadata(e).unwrap();
    }
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    std::fs::write(path, buf).unwrap();
}

fn hash_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path().to_path_buf(),
                blake3::hash(&std::fs::read(e.path()).unwrap())
                    .to_hex()
                    .to_string(),
            )
        })
        .collect()
}

fn outputs(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == ext))
        .map(|e| e.into_path())
        .collect();
    v.sort();
    v
}

fn find_output(dir: &Path, stem_prefix: &str) -> PathBuf {
    outputs(dir, "png")
        .into_iter()
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(stem_prefix)
        })
        .unwrap_or_else(|| panic!("no output starting with {stem_prefix} in {}", dir.display()))
}

#[test]
fn exif_orientations_come_out_upright() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // A wide upright card: orientations 5-8 store it tall.
    let upright = card(256, 128);
    for o in 1..=8u16 {
        write_jpeg(
            &src.join(format!("o{o}.jpg")),
            &stored_for(&upright, o),
            Some(exif_orientation(o)),
        );
    }
    // PNG carries orientation in an eXIf chunk.
    let mut buf = Vec::new();
    let mut enc = image::codecs::png::PngEncoder::new(&mut buf);
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    let stored = stored_for(&upright, 6);
    enc.write_image(
        stored.as_raw(),
        stored.width(),
        stored.height(),
        image::ExtendedColorType::Rgb8,
    )
    .unwrap();
    std::fs::write(src.join("p6.png"), buf).unwrap();

    let out = t.path().join("out");
    let r = prep(&[p(&src), "--out", p(&out), "--fit", "--resolution", "512"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for o in 1..=8u16 {
        let img = image::open(find_output(&out, &format!("o{o}-")))
            .unwrap()
            .to_rgb8();
        assert_eq!(img.dimensions(), (256, 128), "orientation {o}");
        assert_upright(&img, &format!("orientation {o}"));
    }
    let img = image::open(find_output(&out, "p6-")).unwrap().to_rgb8();
    assert_upright(&img, "png orientation 6");
}

#[test]
fn every_format_and_colour_type_becomes_rgb_with_64_multiples() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let base = card(300, 200);
    let dynimg = image::DynamicImage::ImageRgb8(base.clone());
    for ext in ["png", "bmp", "gif", "tiff", "webp"] {
        dynimg.save(src.join(format!("fmt.{ext}"))).unwrap();
    }
    write_jpeg(&src.join("fmt.jpeg"), &base, None);
    // Greyscale and 16-bit.
    image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(200, 300, image::Luma([90])))
        .save(src.join("grey.png"))
        .unwrap();
    let rgb16 =
        image::ImageBuffer::<Rgb<u16>, Vec<u16>>::from_pixel(320, 240, Rgb([65535, 32768, 0]));
    image::DynamicImage::ImageRgb16(rgb16)
        .save(src.join("deep16.png"))
        .unwrap();
    // 16-bit with alpha: fully transparent left half, opaque red right half.
    let rgba16 = image::ImageBuffer::<Rgba<u16>, Vec<u16>>::from_fn(256, 256, |x, _| {
        if x < 128 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([65535, 0, 0, 65535])
        }
    });
    image::DynamicImage::ImageRgba16(rgba16)
        .save(src.join("alpha16.png"))
        .unwrap();
    // Palette PNG.
    {
        let f = std::fs::File::create(src.join("palette.png")).unwrap();
        let mut e = png::Encoder::new(std::io::BufWriter::new(f), 128, 128);
        e.set_color(png::ColorType::Indexed);
        e.set_depth(png::BitDepth::Eight);
        e.set_palette(vec![255, 0, 0, 0, 0, 255]);
        let mut w = e.write_header().unwrap();
        let data: Vec<u8> = (0..128 * 128).map(|i| ((i % 128) >= 64) as u8).collect();
        w.write_image_data(&data).unwrap();
    }
    // CMYK JPEG (as from print workflows): pure cyan.
    {
        let mut buf = Vec::new();
        let enc = jpeg_encoder::Encoder::new(&mut buf, 95);
        let px: Vec<u8> = (0..128 * 128).flat_map(|_| [255u8, 0, 0, 0]).collect();
        enc.encode(&px, 128, 128, jpeg_encoder::ColorType::Cmyk)
            .unwrap();
        std::fs::write(src.join("cmyk.jpg"), buf).unwrap();
    }
    // A PNG with a .jpg name still decodes (content sniffing).
    std::fs::copy(src.join("fmt.png"), src.join("misnamed.jpg")).unwrap();

    let out = t.path().join("out");
    let r = prep(&[p(&src), "--out", p(&out), "--keep-duplicates"]);
    assert_eq!(r.code, 0, "{}\n{}", r.stderr, r.json);
    let files = outputs(&out, "png");
    assert_eq!(files.len(), 12, "{files:?}");
    for f in &files {
        let img = image::open(f).unwrap();
        assert_eq!(img.color(), image::ColorType::Rgb8, "{}", f.display());
        assert!(
            img.width() % 64 == 0 && img.height() % 64 == 0,
            "{}: {:?}",
            f.display(),
            (img.width(), img.height())
        );
    }
    let px = |stem: &str, x: u32, y: u32| {
        image::open(find_output(&out, stem))
            .unwrap()
            .to_rgb8()
            .get_pixel(x, y)
            .0
    };
    assert_eq!(px("grey-", 10, 10), [90, 90, 90]);
    assert_eq!(px("deep16-", 10, 10), [255, 128, 0]);
    assert_eq!(
        px("alpha16-", 5, 100),
        [255, 255, 255],
        "transparent goes to white"
    );
    assert_eq!(px("alpha16-", 400, 100), [255, 0, 0]);
    assert_eq!(px("palette-", 5, 5), [255, 0, 0]);
    assert_eq!(px("palette-", 400, 5), [0, 0, 255]);
    let c = px("cmyk-", 64, 64);
    assert!(
        c[0] < 60 && c[1] > 200 && c[2] > 200,
        "cyan CMYK decoded as {c:?}"
    );
    // The bucket each image landed in is reported.
    assert!(r.json["buckets"].as_object().unwrap().len() >= 2);
}

#[test]
fn bad_files_are_reported_and_the_batch_goes_on() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_jpeg(&src.join("good.jpg"), &card(640, 480), None);
    std::fs::write(src.join("empty.png"), b"").unwrap();
    std::fs::write(src.join("notes.md"), b"# not an image").unwrap();
    std::fs::write(src.join("garbage.jpg"), b"this is not a jpeg at all").unwrap();
    let mut full = Vec::new();
    image::DynamicImage::ImageRgb8(card(640, 480))
        .write_to(
            &mut std::io::Cursor::new(&mut full),
            image::ImageFormat::Png,
        )
        .unwrap();
    std::fs::write(src.join("truncated.png"), &full[..full.len() / 2]).unwrap();
    image::DynamicImage::ImageRgb8(card(40, 30))
        .save(src.join("tiny.png"))
        .unwrap();

    let out = t.path().join("out");
    let r = prep(&[p(&src), "--out", p(&out), "--min-size", "64"]);
    assert_eq!(r.code, 1, "failures give exit 1");
    let failed: Vec<String> = r.json["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["source"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(failed.len(), 3, "{failed:?}");
    for name in ["empty.png", "garbage.jpg", "truncated.png"] {
        assert!(
            failed.iter().any(|f| f.ends_with(name)),
            "{name} not in {failed:?}"
        );
    }
    for f in r.json["failed"].as_array().unwrap() {
        assert!(!f["reason"].as_str().unwrap().is_empty());
    }
    let skipped = r.json["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1);
    assert!(skipped[0]["reason"].as_str().unwrap().contains("too small"));
    assert_eq!(r.json["non_images"], 1);
    assert_eq!(outputs(&out, "png").len(), 1);

    // --keep-going: same failures, exit 0; --allow-upscale keeps the tiny image.
    let r = prep(&[
        p(&src),
        "--out",
        p(&out),
        "--min-size",
        "64",
        "--keep-going",
        "--allow-upscale",
    ]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json["failed"].as_array().unwrap().len(), 3);
    assert_eq!(outputs(&out, "png").len(), 2);
}

#[test]
fn inputs_untouched_rerun_idempotent_captions_carried() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("photos");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    write_jpeg(&src.join("a.jpg"), &card(1200, 800), None);
    image::DynamicImage::ImageRgb8(card(800, 1200))
        .save(src.join("a.png"))
        .unwrap();
    write_jpeg(&src.join("sub/b.jpg"), &card(1000, 1000), None);
    std::fs::copy(src.join("sub/b.jpg"), src.join("sub/b_copy.jpg")).unwrap();
    std::fs::write(src.join("a.txt"), "\u{feff}red, green\r\n").unwrap();
    std::fs::write(src.join("sub/b.caption"), "square card").unwrap();
    let before = hash_tree(&src);

    let out = t.path().join("set");
    let args = [
        p(&src),
        "--out",
        p(&out),
        "--name",
        "card",
        "--repeats",
        "10",
        "--flip",
    ];
    let r = prep(&args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(hash_tree(&src), before, "inputs must not change");
    let dir = out.join("img/10_card");
    let imgs = outputs(&dir, "png");
    assert_eq!(
        imgs.len(),
        6,
        "3 sources (one duplicate skipped) x 2 with flips: {imgs:?}"
    );
    assert_eq!(
        r.json["skipped"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("duplicate"),
        true
    );
    // a.jpg and a.png do not share a caption: only a.jpg has one (a.txt belongs to both
    // stems in the source folder, so both outputs carry it), each under its own name.
    let caps = outputs(&dir, "txt");
    assert_eq!(caps.len(), 6, "{caps:?}");
    let a_caps: Vec<_> = caps
        .iter()
        .filter(|c| c.file_name().unwrap().to_string_lossy().starts_with("a-"))
        .collect();
    assert_eq!(a_caps.len(), 4);
    for c in &a_caps {
        assert_eq!(
            std::fs::read_to_string(c).unwrap(),
            "\u{feff}red, green\r\n",
            "caption copied verbatim"
        );
    }
    let b_cap = caps
        .iter()
        .find(|c| c.file_name().unwrap().to_string_lossy().starts_with("b-"))
        .unwrap();
    assert_eq!(std::fs::read_to_string(b_cap).unwrap(), "square card");
    // Flipped copy is the mirror image.
    let plain_path = outputs(&dir, "png")
        .into_iter()
        .find(|f| {
            f.file_name().unwrap().to_string_lossy().starts_with("b-")
                && !f.to_string_lossy().contains("-flip")
        })
        .unwrap();
    let plain = image::open(&plain_path).unwrap().to_rgb8();
    let flipped = image::open(dir.join(plain_flip_name(&plain_path)))
        .unwrap()
        .to_rgb8();
    assert_eq!(image::imageops::flip_horizontal(&plain), flipped);
    assert_eq!(r.json["train_samples"], 60);

    // Re-run: nothing rewritten, outputs byte-identical, manifest lists everything.
    let out_before = hash_tree(&out);
    let mtimes: Vec<_> = imgs
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().modified().unwrap())
        .collect();
    let r2 = prep(&args);
    assert_eq!(r2.code, 0);
    assert_eq!(r2.json["written"], 0);
    assert_eq!(r2.json["unchanged"], 6);
    assert_eq!(hash_tree(&out), out_before);
    let mtimes2: Vec<_> = imgs
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().modified().unwrap())
        .collect();
    assert_eq!(mtimes, mtimes2);
    let manifest = std::fs::read_to_string(out.join("sdkit-prep.jsonl")).unwrap();
    assert_eq!(manifest.lines().count(), 3);
    let rec: Value = serde_json::from_str(manifest.lines().next().unwrap()).unwrap();
    for key in [
        "source",
        "source_bytes",
        "source_hash",
        "source_size",
        "outputs",
    ] {
        assert!(!rec[key].is_null(), "manifest lacks {key}");
    }
    for key in ["path", "size", "bucket", "crop", "flip"] {
        assert!(
            !rec["outputs"][0][key].is_null(),
            "manifest output lacks {key}"
        );
    }

    // An edited caption travels on re-run; a changed repeat count renames the folder.
    std::fs::write(src.join("sub/b.caption"), "square card, edited").unwrap();
    let before = hash_tree(&src);
    let r3 = prep(&[
        p(&src),
        "--out",
        p(&out),
        "--name",
        "card",
        "--repeats",
        "3",
        "--flip",
    ]);
    assert_eq!(r3.code, 0);
    assert_eq!(r3.json["written"], 0);
    assert!(!out.join("img/10_card").exists());
    let caps = outputs(&out.join("img/3_card"), "txt");
    let b_cap = caps
        .iter()
        .find(|c| c.file_name().unwrap().to_string_lossy().starts_with("b-"))
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(b_cap).unwrap(),
        "square card, edited"
    );

    // --force redoes everything; changed settings redo and drop stale outputs.
    let r4 = prep(&[
        p(&src),
        "--out",
        p(&out),
        "--name",
        "card",
        "--repeats",
        "3",
        "--force",
    ]);
    assert_eq!(r4.json["written"], 3);
    assert_eq!(
        outputs(&out.join("img/3_card"), "png").len(),
        3,
        "flip copies of the old settings removed"
    );
    assert_eq!(hash_tree(&src), before, "inputs must not change");
}

fn plain_flip_name(plain: &Path) -> String {
    let stem = plain.file_stem().unwrap().to_string_lossy();
    format!("{stem}-flip.png")
}

#[test]
fn reg_folder_is_balanced_like_kohya() {
    let t = tempfile::tempdir().unwrap();
    let train = t.path().join("train");
    let reg = t.path().join("reg");
    std::fs::create_dir_all(&train).unwrap();
    std::fs::create_dir_all(&reg).unwrap();
    for i in 0..5u32 {
        write_jpeg(
            &train.join(format!("t{i}.jpg")),
            &card(512 + i * 8, 512),
            None,
        );
    }
    for i in 0..7u32 {
        write_jpeg(
            &reg.join(format!("r{i}.jpg")),
            &card(600, 512 + i * 8),
            None,
        );
    }
    let out = t.path().join("set");
    let r = prep(&[
        p(&train),
        "--out",
        p(&out),
        "--name",
        "ron",
        "--repeats",
        "10",
        "--reg",
        p(&reg),
        "--class",
        "cat",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // 5 x 10 = 50 training samples; 7 reg images need ceil(50/7) = 8 repeats.
    assert_eq!(r.json["train_samples"], 50);
    assert_eq!(r.json["reg"]["repeats"], 8);
    assert_eq!(outputs(&out.join("img/10_ron"), "png").len(), 5);
    assert_eq!(outputs(&out.join("reg/8_cat"), "png").len(), 7);
    // Text summary states the balance.
    let o = sdkit()
        .args([
            "prep",
            p(&train),
            "--out",
            p(&out),
            "--name",
            "ron",
            "--reg",
            p(&reg),
            "--class",
            "cat",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("7 images x 8 repeats = 56 samples"), "{text}");
}

#[test]
fn sizing_modes_and_focal_crop() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // Detail (a checkerboard) on the right third of a flat image.
    let img = RgbImage::from_fn(1500, 500, |x, y| {
        if x > 1000 && ((x / 20) + (y / 20)) % 2 == 0 {
            Rgb([0, 0, 0])
        } else {
            Rgb([200, 200, 200])
        }
    });
    write_jpeg(&src.join("wide.jpg"), &img, None);
    let rgba = RgbaImage::from_fn(300, 200, |_, _| Rgba([10, 20, 30, 255]));
    image::DynamicImage::ImageRgba8(rgba)
        .save(src.join("small.png"))
        .unwrap();

    let run = |mode: &[&str], dir: &str| -> PathBuf {
        let out = t.path().join(dir);
        let mut a = vec![p(&src), "--out", p(&out)];
        a.extend_from_slice(mode);
        let a: Vec<String> = a.into_iter().map(String::from).collect();
        let a: Vec<&str> = a.iter().map(|s| s.as_str()).collect();
        let r = prep(&a);
        assert_eq!(r.code, 0, "{mode:?}: {}", r.stderr);
        out
    };
    let out = run(&["--crop", "512x512", "--focus", "focal"], "crop");
    let w = image::open(find_output(&out, "wide-")).unwrap().to_rgb8();
    assert_eq!(w.dimensions(), (512, 512));
    let dark = w.pixels().filter(|p| p.0[0] < 100).count();
    assert!(
        dark > 512 * 512 / 4,
        "focal crop should land on the checkerboard ({dark} dark pixels)"
    );
    let out = run(&["--crop", "512x512"], "centre");
    let w = image::open(find_output(&out, "wide-")).unwrap().to_rgb8();
    assert!(
        w.pixels().filter(|p| p.0[0] < 100).count() < 512 * 512 / 10,
        "centre crop misses the right third"
    );

    let out = run(&["--pad", "512x512", "--background", "#00ff00"], "pad");
    let w = image::open(find_output(&out, "wide-")).unwrap().to_rgb8();
    assert_eq!(w.dimensions(), (512, 512));
    assert_eq!(w.get_pixel(256, 5).0, [0, 255, 0], "letterbox band");

    let out = run(&["--fit", "--resolution", "1024"], "fit");
    let w = image::open(find_output(&out, "wide-")).unwrap().to_rgb8();
    assert_eq!(w.dimensions(), (1024, 320), "1024x341 trimmed to 64s");
    let s = image::open(find_output(&out, "small-")).unwrap().to_rgb8();
    assert_eq!(s.dimensions(), (256, 192), "fit never upscales");

    let out = run(&["--crop", "512x512", "--split-oversized"], "split");
    let tiles: Vec<_> = outputs(&out, "png")
        .into_iter()
        .filter(|f| f.to_string_lossy().contains("wide-"))
        .collect();
    assert_eq!(
        tiles.len(),
        4,
        "A1111: ceil((1536 - 102.4) / 409.6) = 4 tiles: {tiles:?}"
    );

    let out = run(&["--no-upscale"], "noup");
    let s = image::open(find_output(&out, "small-")).unwrap().to_rgb8();
    assert_eq!(s.dimensions(), (256, 192), "kohya bucket_no_upscale");

    let out = run(&["--format", "jpg", "--quality", "80"], "jpg");
    assert_eq!(outputs(&out, "jpg").len(), 2);
    let out = run(&["--format", "webp"], "webp");
    assert_eq!(outputs(&out, "webp").len(), 2);
}

#[test]
fn safety_refusals_and_dry_run() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_jpeg(&src.join("a.jpg"), &card(640, 480), None);
    let r = prep(&[p(&src), "--out", p(&src.join("out"))]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("inside input"), "{}", r.stderr);
    let r = prep(&[p(&src), "--out", p(t.path())]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("inside output"), "{}", r.stderr);
    let r = prep(&[
        p(&src),
        "--out",
        p(&t.path().join("o")),
        "--crop",
        "500x500",
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("multiples of 64"), "{}", r.stderr);

    let out = t.path().join("dry");
    let r = prep(&[p(&src), "--out", p(&out), "--dry-run"]);
    assert_eq!(r.code, 0);
    assert_eq!(r.json["written"], 1);
    assert_eq!(r.json["buckets"]["576x448"], 1);
    assert!(!out.exists(), "dry run writes nothing");
}

#[test]
fn unicode_and_non_utf8_names() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_jpeg(&src.join("貓 café.jpg"), &card(512, 512), None);
    std::fs::write(src.join("貓 café.txt"), "cat").unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"bad\xffname.jpg");
        write_jpeg(&src.join(name), &card(512, 512 + 64), None);
    }
    let out = t.path().join("out");
    let r = prep(&[p(&src), "--out", p(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let names: Vec<String> = outputs(&out, "png")
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().any(|n| n.starts_with("貓 café-")), "{names:?}");
    #[cfg(unix)]
    assert_eq!(names.len(), 2, "{names:?}");
    assert_eq!(outputs(&out, "txt").len(), 1);
}

#[test]
fn recipe_yaml_uses_flag_names() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    write_jpeg(&src.join("a.jpg"), &card(640, 480), None);
    let recipe = t.path().join("r.yaml");
    std::fs::write(&recipe, "name: ron\nrepeats: 4\nflip: true\nformat: jpg\n").unwrap();
    let out = t.path().join("out");
    let r = prep(&[
        p(&src),
        "--out",
        p(&out),
        "--config",
        p(&recipe),
        "--repeats",
        "6",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        outputs(&out.join("img/6_ron"), "jpg").len(),
        2,
        "command line overrides the recipe"
    );
    std::fs::write(&recipe, "nmae: ron\n").unwrap();
    let r = prep(&[p(&src), "--out", p(&out), "--config", p(&recipe)]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("unknown option 'nmae'"), "{}", r.stderr);
}

#[test]
fn very_large_images_under_a_small_memory_budget() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..2 {
        write_jpeg(&src.join(format!("big{i}.jpg")), &card(8000, 6000), None);
    }
    let out = t.path().join("out");
    let r = prep(&[
        p(&src),
        "--out",
        p(&out),
        "--memory-limit",
        "64",
        "--jobs",
        "2",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in outputs(&out, "png") {
        let img = image::open(&f).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (576, 448));
        assert_upright(&img, "big");
    }
}

#[test]
fn killed_run_leaves_only_whole_images_and_resumes() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    for i in 0..40u32 {
        write_jpeg(
            &src.join(format!("p{i:02}.jpg")),
            &card(1600 + i * 8, 1200),
            None,
        );
    }
    let out = t.path().join("out");
    let mut child = sdkit()
        .args(["prep", p(&src), "--out", p(&out), "--quiet", "--jobs", "2"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let _ = child.kill();
    let _ = child.wait();
    // Whatever exists under a final name decodes completely.
    for f in outputs(&out, "png") {
        image::open(&f).unwrap_or_else(|e| panic!("{} is not a whole image: {e}", f.display()));
    }
    let r = prep(&[p(&src), "--out", p(&out)]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let done = r.json["written"].as_u64().unwrap() + r.json["unchanged"].as_u64().unwrap();
    assert_eq!(done, 40);
    assert_eq!(outputs(&out, "png").len(), 40);
    let temps = walkdir::WalkDir::new(&out)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name().to_string_lossy().starts_with(".sdkit-tmp-") && e.file_type().is_file()
        })
        .count();
    // A kill may leave temp files from that run; the finished run leaves none of its own.
    assert!(temps <= 2, "{temps} temp files");
}
