//! CLIP text encoders against the reference implementations (transformers CLIPTextModel for
//! SD1, open_clip TextTransformer for SD2). Fixtures: tests/fixtures/gen_clip_fixtures.py.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::Weights;
use sdkit::model::clip::{ClipKind, ClipTextModel, detect};
use sdkit::model::weights::Param;
use std::collections::HashMap;
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/clip")
        .join(name)
}

fn expected(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name), &Device::Cpu).unwrap()
}

/// max |a - b| / max(max |b|, 1e-3): one relative error for a whole tensor.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b, 1e-3)
}

/// f32 hidden states and outputs against the reference (PyTorch CPU): measured
/// 3.3e-7..6.4e-7 (16x margin; other CPUs' gemm kernels sum in other orders, ~1e-7 per
/// matmul at these widths). Catches any wrong op, weight, mask or clip_skip layer, and
/// half precision anywhere (the f16 run is 1.6e-3 off).
const OUT_TOL: f64 = 1e-5;
/// f32 weight gradients: measured 2.2e-7..1.2e-6 (86x margin).
const GRAD_TOL: f64 = 1e-4;
/// f16 and bf16 weights against the f32 reference: measured f16 1.6e-3, bf16 2.5e-2
/// (2x margin), the rounding of weights and activations (bf16 unit roundoff 3.9e-3).
/// bf16 matmuls widen to f32, so a CPU changes only which few values round the other
/// way (one bf16 ulp each); f16 on aarch64 with FP16 accumulates in f16, <= ~3e-3
/// per matmul at these widths (K <= 128, numpy estimate). Catches a model that is not computed at all
/// in the right precision (NaN, overflow) or with the wrong weights.
const HALF_TOL: f64 = 5e-2;

fn ids(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

const TRAINED: [&str; 6] = [
    "text_model.embeddings.token_embedding.weight",
    "text_model.encoder.layers.0.self_attn.q_proj.weight",
    "text_model.encoder.layers.0.self_attn.v_proj.bias",
    "text_model.encoder.layers.1.layer_norm1.weight",
    "text_model.encoder.layers.0.mlp.fc1.bias",
    "text_model.final_layer_norm.weight",
];

fn load(file: &str, dtype: DType) -> (ClipTextModel, Weights) {
    let mut w = Weights::from_safetensors(&fixture(file), dtype, &Device::Cpu)
        .unwrap()
        .with_trainable(|k| TRAINED.contains(&k));
    let m = ClipTextModel::load(&mut w, Some(4)).unwrap();
    (m, w)
}

/// Hidden states, clip_skip 1/2 outputs and weight gradients agree with the reference.
fn check_against_reference(file: &str, exp_file: &str, kind: ClipKind) {
    let exp = expected(exp_file);
    let (model, w) = load(file, DType::F32);
    assert_eq!(model.config.kind, kind);
    assert_eq!(model.config.layers, 3);
    let ids = ids(&exp["ids"]);

    let hs = model.hidden_states(&ids).unwrap();
    assert_eq!(hs.len(), 4);
    for (i, h) in hs.iter().enumerate() {
        let e = rel_err(h, &exp[&format!("hidden.{i}")]);
        common::within(e as f64, OUT_TOL, &format!("{file}: hidden state {i}"));
    }
    let mut checked = 0;
    for skip in [1, 2] {
        let out = model.encode(&ids, skip).unwrap();
        let e = rel_err(&out, &exp[&format!("final.{skip}")]);
        common::within(e as f64, OUT_TOL, &format!("{file}: clip_skip {skip}"));
        let loss = (out * &exp[&format!("r.{skip}")])
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in w.vars() {
            let key = format!("grad.{skip}.{name}");
            let Some(want) = exp.get(&key) else { continue };
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{file}: no gradient for {name}"));
            let e = rel_err(got, want);
            let what = format!("{file}: clip_skip {skip} gradient of {name}");
            common::within(e as f64, GRAD_TOL, &what);
            checked += 1;
        }
    }
    assert!(checked >= 8, "{file}: only {checked} gradients compared");
}

#[test]
fn sd1_matches_transformers_clip_text_model() {
    check_against_reference(
        "sd1_tiny.safetensors",
        "sd1_tiny_expected.safetensors",
        ClipKind::Sd1,
    );
}

#[test]
fn sd2_single_file_matches_open_clip() {
    check_against_reference(
        "sd2_tiny.safetensors",
        "sd2_tiny_expected.safetensors",
        ClipKind::Sd2,
    );
}

/// clip_skip 2 stops before the last layer: its weights get no gradient, earlier ones do.
#[test]
fn clip_skip_stops_early() {
    let exp = expected("sd1_tiny_expected.safetensors");
    let last = "text_model.encoder.layers.2.mlp.fc2.weight";
    let first = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    for (skip, last_has_grad) in [(1, true), (2, false)] {
        let mut w =
            Weights::from_safetensors(&fixture("sd1_tiny.safetensors"), DType::F32, &Device::Cpu)
                .unwrap()
                .with_trainable(move |k| k == last || k == first);
        let model = ClipTextModel::load(&mut w, Some(4)).unwrap();
        let out = model.encode(&ids(&exp["ids"]), skip).unwrap();
        let grads = out.sum_all().unwrap().backward().unwrap();
        let var = |name: &str| w.vars().iter().find(|(n, _)| n == name).unwrap().1.clone();
        assert!(grads.get(var(first).as_tensor()).is_some());
        assert_eq!(
            grads.get(var(last).as_tensor()).is_some(),
            last_has_grad,
            "clip_skip {skip}"
        );
    }
}

/// Textual inversion: extra rows for ids >= vocab give the same output and row gradients as
/// the reference model with an enlarged token table.
#[test]
fn extra_embedding_rows_match_enlarged_table() {
    let exp = expected("sd1_tiny_expected.safetensors");
    let (mut model, _) = load("sd1_tiny.safetensors", DType::F32);
    let extra = candle_core::Var::from_tensor(&exp["ti.extra"]).unwrap();
    model.extra_embeddings = Some(Param::Trainable(extra.clone()));
    let out = model.encode(&ids(&exp["ti.ids"]), 1).unwrap();
    let e = rel_err(&out, &exp["ti.final"]);
    common::within(e as f64, OUT_TOL, "extra rows: output");
    let grads = (out * &exp["r.1"])
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let e = rel_err(grads.get(extra.as_tensor()).unwrap(), &exp["ti.grad"]);
    common::within(e as f64, GRAD_TOL, "extra rows: gradient");
}

/// The same files load in f16 and bf16 and stay close to the f32 reference.
#[test]
fn half_precision_loads_and_stays_close() {
    let exp = expected("sd1_tiny_expected.safetensors");
    for dt in [DType::F16, DType::BF16] {
        let (model, _) = load("sd1_tiny.safetensors", dt);
        let out = model.encode(&ids(&exp["ids"]), 1).unwrap();
        assert_eq!(out.dtype(), dt);
        let e = rel_err(&out, &exp["final.1"]);
        common::within(e as f64, HALF_TOL, &format!("{dt:?} output"));
    }
}

#[test]
fn missing_and_misshapen_tensors_are_named() {
    let mut map =
        candle_core::safetensors::load(fixture("sd1_tiny.safetensors"), &Device::Cpu).unwrap();
    map.remove("text_model.encoder.layers.2.mlp.fc2.bias");
    let mut w = Weights::new("tiny.safetensors", map.clone(), DType::F32, &Device::Cpu);
    assert_eq!(detect(&w), Some(ClipKind::Sd1));
    let err = ClipTextModel::load(&mut w, Some(4))
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("tiny.safetensors") && err.contains("layers.2.mlp.fc2.bias"),
        "{err}"
    );

    let key = "text_model.encoder.layers.0.self_attn.k_proj.weight";
    map.insert(
        key.into(),
        Tensor::zeros((8, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    let mut w = Weights::new("tiny.safetensors", map, DType::F32, &Device::Cpu);
    let err = ClipTextModel::load(&mut w, Some(4))
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(key) && err.contains("[8, 32]"), "{err}");

    let mut w = Weights::new("vae.safetensors", HashMap::new(), DType::F32, &Device::Cpu);
    assert!(ClipTextModel::load(&mut w, None).is_err());
}
