//! Text to image against diffusers' StableDiffusionPipeline on the tiny SD1-like and
//! SD2-like checkpoints (tests/fixtures/gen_checkpoint_fixtures.py records its run:
//! token ids, prompt embeddings, initial latent and the decoded image).

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::clip::ClipTextModel;
use sdkit::model::loader::{self, LoadOptions};
use sdkit::model::pipeline::encode_prompt;
use std::collections::HashMap;

fn reference() -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = common::checkpoints();
    let t = candle_core::safetensors::load(dir.join("sample_ref.safetensors"), &Device::Cpu).unwrap();
    let meta = serde_json::from_slice(&std::fs::read(dir.join("sample_ref.json")).unwrap()).unwrap();
    (t, meta)
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    d / s
}

#[test]
fn prompt_conditioning_matches_diffusers_text_encoder() {
    let (r, meta) = reference();
    for (name, file) in [("sd1", "sd1_diffusers"), ("sd2", "sd2.safetensors")] {
        let mut m = loader::open(&common::checkpoints().join(file), &LoadOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let kind = m.info.arch.clip_kind();
        let clip = ClipTextModel::load_hf(&mut m.text_encoder, kind, Some(m.info.text.heads)).unwrap();
        let ids = r[&format!("{name}.ids")].to_dtype(DType::U32).unwrap();
        let embeds = &r[&format!("{name}.embeds")];
        for (row, key) in [(0, "prompt"), (1, "negative")] {
            let c = encode_prompt(&clip, m.info.arch, meta[key].as_str().unwrap(), 1).unwrap();
            assert_eq!(c.ids.len(), 1);
            let want: Vec<u32> = ids.get(row).unwrap().to_vec1().unwrap();
            assert_eq!(c.ids[0], want, "{name} {key} ids");
            let e = rel_err(&c.hidden.squeeze(0).unwrap(), &embeds.get(row).unwrap());
            assert!(e < 1e-4, "{name} {key}: rel err {e}");
        }
    }
}
