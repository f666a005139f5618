//! JPEG decoding is bit-identical to Pillow (libjpeg-turbo), full size and with DCT
//! scaling (`draft`), over the layouts photos come in: 4:2:0, 4:2:2, 4:4:4, progressive,
//! restart markers, greyscale, odd sizes. Fixtures: tests/fixtures/gen_jpeg_fixtures.py.
//! Tagger inputs therefore match the Python reference exactly, and `sdkit prep`'s
//! reduced decode equals PIL's `draft()`.

use sdkit::dataset::decode::decode_file_any;
use sdkit::dataset::jpeg::{Jpeg, decode};
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/jpeg")
}

fn cases() -> Vec<String> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("cases.json")).unwrap()).unwrap();
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect()
}

fn png(name: &str) -> image::RgbImage {
    image::open(dir().join(name)).unwrap().into_rgb8()
}

fn assert_same(got: &image::RgbImage, want: &image::RgbImage, what: &str) {
    assert_eq!(got.dimensions(), want.dimensions(), "{what}: size");
    let differ = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "{what}: {differ} of {} values differ", got.len());
}

#[test]
fn full_decode_matches_pillow() {
    let names = cases();
    assert_eq!(names.len(), 6);
    for name in names {
        let got = decode_file_any(&dir().join(format!("{name}.jpg")))
            .unwrap()
            .image
            .into_rgb8();
        assert_same(&got, &png(&format!("{name}.png")), &name);
    }
}

#[test]
fn dct_scaled_decode_matches_pillow_draft() {
    for name in cases() {
        let bytes = std::fs::read(dir().join(format!("{name}.jpg"))).unwrap();
        for scale in [2u8, 4, 8] {
            let Jpeg::Image(img) = decode(&bytes, 8 / scale).unwrap() else {
                panic!("{name}: unsupported")
            };
            let want = png(&format!("{name}_draft{scale}.png"));
            assert_same(&img.into_rgb8(), &want, &format!("{name} 1/{scale}"));
        }
    }
}

#[test]
fn truncated_and_garbage_are_errors_not_panics() {
    let bytes = std::fs::read(dir().join("truncated.jpg")).unwrap();
    let err = decode(&bytes, 8).err().expect("truncated file must fail");
    assert!(err.contains("truncated"), "{err}");
    let err = decode_file_any(&dir().join("truncated.jpg")).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");
    let mut garbage = bytes[..200].to_vec();
    garbage.extend(std::iter::repeat_n(0x5a, 500));
    assert!(decode(&garbage, 8).is_err());
    assert!(decode(&[0xFF, 0xD8, 0xFF], 8).is_err());
}
