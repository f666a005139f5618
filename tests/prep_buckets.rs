//! sdkit's bucket choice equals kohya's on a table computed from kohya's definition
//! (tests/fixtures/gen_bucket_cases.py), both the bucket list and the per-image choice.

use sdkit::dataset::bucket::BucketSpec;
use serde_json::Value;

fn spec(v: &Value) -> BucketSpec {
    let r = v["resolution"].as_array().unwrap();
    BucketSpec {
        resolution: (r[0].as_u64().unwrap() as u32, r[1].as_u64().unwrap() as u32),
        min_bucket: v["min_bucket"].as_u64().unwrap() as u32,
        max_bucket: v["max_bucket"].as_u64().unwrap() as u32,
        step: v["step"].as_u64().unwrap() as u32,
        no_upscale: v["no_upscale"].as_bool().unwrap(),
    }
}

fn pair(v: &Value) -> (u32, u32) {
    (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32)
}

#[test]
fn bucket_lists_and_choices_match_kohya() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/prep/bucket_cases.json"
    ))
    .unwrap();
    let doc: Value = serde_json::from_str(&text).unwrap();
    for b in doc["buckets"].as_array().unwrap() {
        let s = spec(&b["spec"]);
        let expect: Vec<(u32, u32)> = b["resos"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(s.buckets(), expect, "bucket list for {s:?}");
    }
    let cases = doc["cases"].as_array().unwrap();
    assert!(cases.len() > 500);
    for c in cases {
        let s = spec(&c["spec"]);
        let (w, h) = pair(&c["size"]);
        let got = s
            .select(w, h, &s.buckets())
            .unwrap_or_else(|| panic!("no bucket for {w}x{h} {s:?}"));
        assert_eq!(
            got.bucket,
            pair(&c["bucket"]),
            "bucket of {w}x{h} with {s:?}"
        );
        assert_eq!(
            got.resized,
            pair(&c["resized"]),
            "resized size of {w}x{h} with {s:?}"
        );
        assert!(got.bucket.0 % s.step == 0 && got.bucket.1 % s.step == 0);
    }
}
