//! Text to image against diffusers' StableDiffusionPipeline on the tiny SD1-like and
//! SD2-like checkpoints (tests/fixtures/gen_checkpoint_fixtures.py records its run:
//! token ids, prompt embeddings, initial latent and the decoded image).

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::clip::ClipTextModel;
use sdkit::model::loader::{self, LoadOptions};
use sdkit::model::pipeline::{Models, Request, encode_prompt, generate};
use sdkit::model::samplers::{RecordedNoise, SamplerKind};
use std::collections::HashMap;

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = common::checkpoints();
    let t =
        candle_core::safetensors::load(dir.join("sample_ref.safetensors"), &Device::Cpu).unwrap();
    let meta =
        serde_json::from_slice(&std::fs::read(dir.join("sample_ref.json")).unwrap()).unwrap();
    (t, meta)
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b, 1e-6)
}

/// Prompt embeddings against diffusers' text encoder (PyTorch CPU), f32: measured
/// 3.9e-7..5.7e-7 (177x margin; other CPUs' gemm kernels: ~1e-7 per matmul). Catches
/// a wrong token, weight (emphasis), position or layer (O(1e-2..1)).
const EMBED_TOL: f64 = 1e-4;
/// The decoded DDIM image (in [0, 1]) against diffusers' pipeline, max abs difference:
/// measured 4.0e-6..5.4e-6 (18x margin) after 3 UNet steps with CFG and the VAE;
/// summation-order differences grow through the steps but stay ~1e-6. Catches a wrong
/// timestep, guidance, scheduler step or latent scaling (O(1e-2..1)).
const IMAGE_TOL: f64 = 1e-4;

#[test]
fn prompt_conditioning_matches_diffusers_text_encoder() {
    let (r, meta) = reference();
    for (name, file) in [("sd1", "sd1_diffusers"), ("sd2", "sd2.safetensors")] {
        let mut m = loader::open(&common::checkpoints().join(file), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let kind = m.info.arch.clip_kind();
        let clip =
            ClipTextModel::load_hf(&mut m.text_encoder, kind, Some(m.info.text.heads)).unwrap();
        let ids = r[&format!("{name}.ids")].to_dtype(DType::U32).unwrap();
        let embeds = &r[&format!("{name}.embeds")];
        for (row, key) in [(0, "prompt"), (1, "negative")] {
            let c = encode_prompt(&clip, m.info.arch, meta[key].as_str().unwrap(), 1).unwrap();
            assert_eq!(c.ids.len(), 1);
            let want: Vec<u32> = ids.get(row).unwrap().to_vec1().unwrap();
            assert_eq!(c.ids[0], want, "{name} {key} ids");
            let e = rel_err(&c.hidden.squeeze(0).unwrap(), &embeds.get(row).unwrap());
            common::within(e as f64, EMBED_TOL, &format!("{name} {key} embeddings"));
        }
    }
}

/// DDIM + CFG from the recorded initial latent, against diffusers' StableDiffusionPipeline
/// (float32): SD1-like from the single file (epsilon), SD2-like from the folder (v).
#[test]
fn ddim_image_matches_diffusers_pipeline() {
    let (r, meta) = reference();
    for (name, file) in [("sd1", "sd1.safetensors"), ("sd2", "sd2_diffusers")] {
        let ck = loader::open(&common::checkpoints().join(file), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let m = Models::new(ck).unwrap();
        let req = Request {
            prompt: meta["prompt"].as_str().unwrap().into(),
            negative: meta["negative"].as_str().unwrap().into(),
            steps: meta["steps"].as_u64().unwrap() as usize,
            cfg: meta["cfg"].as_f64().unwrap(),
            sampler: SamplerKind::Ddim,
            width: meta["width"].as_u64().unwrap() as usize,
            height: meta["height"].as_u64().unwrap() as usize,
            clip_skip: 1,
        };
        let noise = &r[&format!("{name}.latents")];
        let mut none = RecordedNoise {
            items: Default::default(),
        };
        let mut steps = 0;
        let img = generate(&m, &req, noise, &mut none, &mut || steps += 1).unwrap();
        assert_eq!(steps, req.steps);
        let img = ((img / 2.0).unwrap() + 0.5)
            .unwrap()
            .clamp(0f32, 1f32)
            .unwrap();
        let want = &r[&format!("{name}.image")];
        let d = (&img - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        common::within(d as f64, IMAGE_TOL, &format!("{name} DDIM image (abs)"));
    }
}

/// `sdkit sample` end to end: PNGs named like webui's, carrying its parameters, the same
/// pixels for the same seed.
#[test]
fn cli_writes_pngs_with_parameters() {
    let model = common::checkpoints().join("sd1.safetensors");
    let out = tempfile::tempdir().unwrap();
    let run = || {
        let st = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
            .args(["sample", "--model"])
            .arg(&model)
            .args([
                "--prompt",
                "a photo of a cat, (masterpiece:1.2)",
                "--negative",
                "lowres",
            ])
            .args([
                "--steps", "3", "--width", "32", "--height", "32", "--seed", "42",
            ])
            .args(["--count", "2", "--clip-skip", "2", "--quiet", "--out"])
            .arg(out.path())
            .status()
            .unwrap();
        assert!(st.success());
    };
    run();
    run();
    let hash = sdkit::formats::png_params::short_hash(&model).unwrap();
    for (file, seed) in [
        ("00000-42.png", "42"),
        ("00001-43.png", "43"),
        ("00003-43.png", "43"),
    ] {
        let p = out.path().join(file);
        let text = sdkit::formats::png_params::read_parameters(&p)
            .unwrap()
            .unwrap();
        let t = sdkit::formats::png_params::parse(&text);
        assert_eq!(t.prompt, "a photo of a cat, (masterpiece:1.2)");
        assert_eq!(t.negative, "lowres");
        assert_eq!(t.get("Steps"), Some("3"));
        assert_eq!(t.get("Sampler"), Some("Euler a"));
        assert_eq!(t.get("Seed"), Some(seed));
        assert_eq!(t.get("Size"), Some("32x32"));
        assert_eq!(t.get("Model hash"), Some(hash.as_str()));
        assert_eq!(t.get("Model"), Some("sd1"));
        assert_eq!(t.get("Clip skip"), Some("2"));
    }
    let px = |f: &str| {
        image::open(out.path().join(f))
            .unwrap()
            .to_rgb8()
            .into_raw()
    };
    assert_eq!(px("00001-43.png"), px("00003-43.png"));
    assert_ne!(px("00000-42.png"), px("00001-43.png"));

    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(["sample", "--prompt", "x", "--model"])
        .arg(out.path().join("missing.safetensors"))
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing.safetensors"));
}
