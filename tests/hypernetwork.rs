//! A1111 hypernetworks against a PyTorch implementation of webui's module, with the
//! fixtures of tests/fixtures/gen_hypernetwork_fixtures.py:
//! - webui's file written by torch.save (int width keys, tuples of state dicts) is read;
//! - on the tiny SD1 UNet (cross- and self-attention of width 32) the output and the
//!   gradient of every weight equal PyTorch's (f64 reference), with and without gradient
//!   checkpointing;
//! - every activation's module output and weight gradients equal torch's;
//! - the `.pt` sdkit writes loads with `torch.load(weights_only=True)` and into webui's
//!   module (scripts/check_torch_pt.py, when a Python with torch is available).

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::adapters::hypernetwork::file::PtMeta;
use sdkit::adapters::hypernetwork::{
    Activation, HnModule, Hypernetwork, HypernetworkShape, WeightInit,
};
use sdkit::formats::torch_pt::{self, Value};
use sdkit::model::loader::{self, LoadOptions};
use sdkit::model::nn::checkpoint::Checkpointing;
use sdkit::model::pipeline::Models;
use sdkit::train::rng::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hypernetwork")
}

fn load(name: &str) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &common::device())
        .unwrap()
        .into_iter()
        .collect()
}

fn tiny() -> Models {
    let opts = LoadOptions {
        device: common::device(),
        ..LoadOptions::default()
    };
    let ck = loader::open(&common::checkpoints().join("sd1_diffusers"), &opts).unwrap();
    Models::new(ck).unwrap()
}

fn webui_net() -> Hypernetwork {
    Hypernetwork::load(&fixtures().join("webui_tiny.pt"), &common::device()).unwrap()
}

#[test]
fn reads_webuis_file_written_by_torch() {
    let hn = webui_net();
    let s = &hn.shape;
    assert_eq!(s.layer_structure, vec![1.0, 2.0, 1.5, 1.0]);
    assert_eq!(s.activation_func, Activation::Mish);
    assert!(s.layer_norm && !s.activate_output && s.uses_dropout());
    assert_eq!(s.dropout(), vec![0.0, 0.3, 0.0, 0.0]);
    let widths: Vec<usize> = hn.modules.iter().map(|(w, _)| *w).collect();
    assert_eq!(widths, [32, 16]);
    assert_eq!(
        hn.meta,
        PtMeta {
            name: "tiny".into(),
            step: 1234,
            sd_checkpoint: Some("0123abcd".into()),
            sd_checkpoint_name: Some("tiny-sd1".into()),
            optional_info: None,
        }
    );
    // Linear 32->64, Mish, LayerNorm, Dropout, Linear 64->48, Mish, LayerNorm,
    // Linear 48->32, LayerNorm: weights at 0, 2, 4, 5, 7, 8.
    let names: Vec<String> = hn.modules[0].1[0]
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names.len(), 12);
    assert_eq!(names[4], "linear.4.weight");
    assert_eq!(names[10], "linear.8.weight");
    // The weights are the file's: the reader's raw value gives the same tensor.
    let raw = torch_pt::load(&fixtures().join("webui_tiny.pt")).unwrap();
    let Some(Value::Tensor(w)) =
        raw.get(&Value::Int(16)).unwrap().items().unwrap()[1].get_str("linear.7.weight")
    else {
        panic!("no tensor")
    };
    let ours = hn.modules[1].1[1].named_vars()[8].1.as_tensor().clone();
    assert_eq!(common::rel_err(&ours, w, 1e-12), 0.0);
}

/// One step through the tiny UNet with the hypernetwork on width 32 (every attn1 and
/// attn2): output within 1e-5 and every weight's gradient within 1e-4 of PyTorch's f64
/// values, relative to the tensor's largest value. f32 rounding gives ~1e-6; a missed
/// self-attention hook, a LayerNorm without its weight gradient, k and v swapped or a
/// wrong layer order give >= 1e-2.
fn check_unet_step(checkpointing: bool) {
    let mut m = tiny();
    let hn = webui_net();
    hn.attach(&mut m.unet, 1.0);
    let ck = checkpointing.then(|| Checkpointing::new(hn.vars()));
    m.unet.checkpointing = ck.clone();
    let exp = load("tiny_expected.safetensors");
    let pred = m
        .unet
        .forward(&exp["noisy"], &exp["t"], &exp["ctx"])
        .unwrap();
    let e = common::rel_err(&pred, &exp["pred"], 1e-6);
    common::within(e as f64, 1e-5, "UNet output with the hypernetwork");
    let loss = (&pred - &exp["target"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let absmax = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let scale = exp
        .iter()
        .filter(|(k, _)| k.starts_with("grad."))
        .map(|(_, t)| absmax(t))
        .fold(0f32, f32::max);
    let mut worst = 0f32;
    let mut checked = 0;
    for (name, var) in hn.named_vars() {
        let outer = grads.get(var.as_tensor()).cloned();
        let inner = ck.as_ref().and_then(|c| c.take(&var).unwrap());
        let g = match (outer, inner) {
            (Some(a), Some(b)) => Some((a + b).unwrap()),
            (a, b) => a.or(b),
        };
        let key = format!("grad.{name}");
        match (g, exp.get(&key)) {
            (Some(g), Some(want)) if absmax(want) < 1e-12 => {
                // The keys' last bias: a constant added to every key shifts each query's
                // logits equally and softmax ignores it, so the exact gradient is 0 and
                // both sides hold rounding noise (PyTorch's f64 ~1e-19).
                assert!(name.starts_with("32.k."), "{key}: zero in PyTorch");
                assert!(absmax(&g) < 1e-5 * scale, "{key}: {} not ~0", absmax(&g));
                checked += 1;
            }
            (Some(g), Some(want)) => {
                let e = common::rel_err(&g, want, 1e-8);
                assert!(e < 1e-4, "{key}: rel err {e}");
                worst = worst.max(e);
                checked += 1;
            }
            // Width 16: no attention of that width, no gradient in either.
            (None, None) => assert!(name.starts_with("16."), "{name}: no gradient"),
            (g, w) => panic!("{key}: ours {:?}, PyTorch's {:?}", g.is_some(), w.is_some()),
        }
    }
    assert_eq!(checked, 2 * 12, "every weight of width 32");
    common::within(worst as f64, 1e-4, "hypernetwork weight gradients");
}

#[test]
fn unet_output_and_weight_gradients_match_pytorch() {
    check_unet_step(false);
}

#[test]
fn gradients_with_checkpointing_match_pytorch() {
    check_unet_step(true);
}

/// Each activation (LayerNorm on every other one) at strength 0.7 against torch's
/// modules: output and every weight gradient of sum(out * r).
#[test]
fn every_activation_matches_torch() {
    let exp = load("activations.safetensors");
    let key = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    for (i, a) in Activation::ALL.into_iter().enumerate() {
        let shape = HypernetworkShape {
            activation_func: a,
            layer_norm: i % 2 == 1,
            activate_output: true,
            ..Default::default()
        };
        let dev = common::device();
        let m = HnModule::create(8, &shape, &mut Rng::new(0), &key, 0, &dev).unwrap();
        for (n, v) in m.named_vars() {
            v.set(&exp[&format!("{}.{n}", a.name())]).unwrap();
        }
        let x = &exp["x"];
        let y = m.forward(x, 0.7).unwrap();
        let e = common::rel_err(&y, &exp[&format!("{}.out", a.name())], 1e-6);
        common::within(e as f64, 1e-5, &format!("{} output", a.name()));
        let g = (&y * &exp["r"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (n, v) in m.named_vars() {
            let want = &exp[&format!("{}.grad.{n}", a.name())];
            let e = common::rel_err(g.get(v.as_tensor()).unwrap(), want, 1e-8);
            assert!(e < 1e-4, "{} {n}: gradient rel err {e}", a.name());
        }
    }
}

/// Strength 0 is the plain UNet, strength 1 changes the output; detach restores it.
#[test]
fn strength_scales_the_change_and_detach_removes_it() {
    let mut m = tiny();
    let exp = load("tiny_expected.safetensors");
    let run = |m: &Models| {
        m.unet
            .forward(&exp["noisy"], &exp["t"], &exp["ctx"])
            .unwrap()
    };
    let plain = run(&m);
    let hn = webui_net();
    hn.attach(&mut m.unet, 0.0);
    assert_eq!(common::rel_err(&run(&m), &plain, 1e-6), 0.0);
    hn.attach(&mut m.unet, 1.0);
    assert!(common::rel_err(&run(&m), &plain, 1e-6) > 1e-2);
    hn.detach(&mut m.unet);
    assert_eq!(common::rel_err(&run(&m), &plain, 1e-6), 0.0);
}

#[test]
fn dropout_follows_its_key() {
    let hn = webui_net(); // dropout 0.3 after the first layer
    let x = Tensor::randn(0f32, 1.0, (2, 5, 32), &common::device()).unwrap();
    let m = &hn.modules[0].1[0];
    let off = m.forward(&x, 1.0).unwrap();
    hn.set_dropout_key(7);
    let a = m.forward(&x, 1.0).unwrap();
    let b = m.forward(&x, 1.0).unwrap();
    hn.set_dropout_key(8);
    let c = m.forward(&x, 1.0).unwrap();
    hn.set_dropout_key(0);
    let back = m.forward(&x, 1.0).unwrap();
    assert_eq!(common::rel_err(&a, &b, 1e-6), 0.0, "same key, same masks");
    assert!(
        common::rel_err(&a, &c, 1e-6) > 1e-3,
        "another key, other masks"
    );
    assert!(common::rel_err(&a, &off, 1e-6) > 1e-3, "dropout on");
    assert_eq!(common::rel_err(&back, &off, 1e-6), 0.0, "key 0: off");
}

/// Normal init: weights N(0, 0.01), biases 0; seeded, so the same seed gives the same
/// network; SD1's widths get webui's layer sizes.
#[test]
fn create_draws_webuis_init_reproducibly() {
    let shape = HypernetworkShape::default();
    let widths = [768, 320, 640, 1280];
    let a = Hypernetwork::create(&shape, &widths, &mut Rng::new(4), &Device::Cpu).unwrap();
    let b = Hypernetwork::create(&shape, &widths, &mut Rng::new(4), &Device::Cpu).unwrap();
    let (ta, tb) = (a.tensors().unwrap(), b.tensors().unwrap());
    assert_eq!(ta.len(), 4 * 2 * 4);
    for ((n, x), (_, y)) in ta.iter().zip(&tb) {
        assert_eq!(common::rel_err(x, y, 1e-12), 0.0, "{n}");
    }
    let w = &ta
        .iter()
        .find(|(n, _)| n == "320.k.linear.0.weight")
        .unwrap()
        .1;
    assert_eq!(w.dims(), &[640, 320]);
    let v: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    assert!((std - 0.01).abs() < 0.0005, "std {std}");
    let bias = &ta
        .iter()
        .find(|(n, _)| n == "1280.v.linear.1.bias")
        .unwrap()
        .1;
    assert_eq!(
        bias.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    assert_eq!(
        a.num_params(),
        2 * widths.iter().map(|d| 4 * d * d + 3 * d).sum::<usize>()
    );
    let x = Hypernetwork::create(
        &HypernetworkShape {
            weight_init: WeightInit::XavierUniform,
            ..shape
        },
        &[8],
        &mut Rng::new(1),
        &Device::Cpu,
    )
    .unwrap();
    let w: Vec<f32> = x.named_vars()[0]
        .1
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let bound = (6.0f32 / 24.0).sqrt();
    assert!(w.iter().all(|v| v.abs() <= bound) && w.iter().any(|v| v.abs() > bound / 2.0));
}

#[test]
fn state_tensors_round_trip_and_reject_other_shapes() {
    let hn = webui_net();
    let t: BTreeMap<String, Tensor> = hn.tensors().unwrap().into_iter().collect();
    let other =
        Hypernetwork::create(&hn.shape, &[32, 16], &mut Rng::new(9), &common::device()).unwrap();
    other.load_tensors(&t).unwrap();
    for ((n, a), (_, b)) in hn.tensors().unwrap().iter().zip(other.tensors().unwrap()) {
        assert_eq!(common::rel_err(a, &b, 1e-12), 0.0, "{n}");
    }
    let small = Hypernetwork::create(
        &HypernetworkShape::default(),
        &[32, 16],
        &mut Rng::new(9),
        &common::device(),
    )
    .unwrap();
    let e = small.load_tensors(&t).unwrap_err();
    assert!(e.contains("shape") || e.contains("does not have"), "{e}");
}

const WEBUI_KEYS: [&str; 13] = [
    "step",
    "name",
    "layer_structure",
    "activation_func",
    "is_layer_norm",
    "weight_initialization",
    "sd_checkpoint",
    "sd_checkpoint_name",
    "activate_output",
    "use_dropout",
    "dropout_structure",
    "last_layer_dropout",
    "optional_info",
];

/// What sdkit writes: every key webui writes, in its order, read back equal by sdkit;
/// `torch.load(weights_only=True)` accepts it and webui's module (strict
/// load_state_dict, built from the file's own shape) computes what sdkit computes.
#[test]
fn written_pt_loads_in_torch_and_webuis_module() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("style.pt");
    let shape = HypernetworkShape {
        layer_structure: vec![1.0, 1.5, 1.0],
        activation_func: Activation::Swish,
        layer_norm: true,
        use_dropout: true,
        ..Default::default()
    };
    let hn = Hypernetwork::create(&shape, &[24, 8], &mut Rng::new(2), &Device::Cpu).unwrap();
    // Non-trivial weights: the init's zero biases would hide a bias mix-up.
    for (i, (_, v)) in hn.named_vars().into_iter().enumerate() {
        let t = Tensor::randn(0f32, 0.3, v.dims(), &Device::Cpu).unwrap();
        v.set(&(t + i as f64 * 0.01).unwrap()).unwrap();
    }
    let meta = PtMeta {
        name: "style".into(),
        step: 500,
        sd_checkpoint: Some("e1441589a6".into()),
        sd_checkpoint_name: Some("v1-5-pruned".into()),
        optional_info: None,
    };
    hn.save_pt(&path, &meta).unwrap();

    let raw = torch_pt::load(&path).unwrap();
    let keys: Vec<String> = raw
        .entries()
        .iter()
        .map(|(k, _)| match k {
            Value::Int(i) => i.to_string(),
            Value::Str(s) => s.clone(),
            _ => panic!("key {k:?}"),
        })
        .collect();
    let mut want = vec!["24".to_string(), "8".to_string()];
    want.extend(WEBUI_KEYS.iter().map(|s| s.to_string()));
    assert_eq!(keys, want);
    let back = Hypernetwork::load(&path, &Device::Cpu).unwrap();
    assert_eq!(back.meta, meta);
    assert_eq!(back.shape.dropout(), vec![0.0, 0.3, 0.0]);
    assert!(back.shape.last_layer_dropout && back.shape.use_dropout);
    for ((n, a), (_, b)) in hn.tensors().unwrap().iter().zip(back.tensors().unwrap()) {
        assert_eq!(common::rel_err(a, &b, 1e-12), 0.0, "{n}");
    }

    let Some(py) = common::python_with_torch() else {
        eprintln!("skipped the torch.load check: no Python with torch ($REFPY or python3)");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_torch_pt.py");
    let out = std::process::Command::new(&py)
        .arg(&script)
        .arg(&path)
        .arg("--hypernetwork")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "torch.load / webui module rejected the file:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let res: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let entries = res["value"]["dict"].as_array().unwrap();
    let key_names: Vec<&str> = entries.iter().map(|e| e[0].as_str().unwrap()).collect();
    let mut want = vec!["int:24".to_string(), "int:8".to_string()];
    want.extend(WEBUI_KEYS.iter().map(|s| format!("str:{s}")));
    assert_eq!(key_names, want);
    let get = |k: &str| &entries.iter().find(|e| e[0] == k).unwrap()[1];
    assert_eq!(get("str:layer_structure")["list"][1]["float"], 1.5);
    assert_eq!(get("str:activation_func")["str"], "swish");
    assert_eq!(get("str:is_layer_norm")["bool"], true);
    assert_eq!(get("str:step")["int"], 500);
    assert_eq!(get("str:optional_info")["none"], serde_json::Value::Null);
    let sd = &get("int:24")["tuple"][1]["ordered_dict"][0];
    assert_eq!(sd[0], "str:linear.0.weight");
    assert_eq!(sd[1]["tensor"], "float32");
    assert_eq!(sd[1]["shape"], serde_json::json!([36, 24]));
    // webui's module on x = linspace(-1, 1) computes what ours computes.
    for (w, kv) in &hn.modules {
        let x = Tensor::arange(0u32, 3 * *w as u32, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .affine(2.0 / (3 * w - 1) as f64, -1.0)
            .unwrap()
            .reshape((1, 3, *w))
            .unwrap();
        for (j, m) in kv.iter().enumerate() {
            let ours = m.forward(&x, 1.0).unwrap().sum_all().unwrap();
            let ours = ours.to_scalar::<f32>().unwrap() as f64;
            let theirs = res["outputs"][w.to_string()][j].as_f64().unwrap();
            assert!(
                (ours - theirs).abs() < 1e-4 * theirs.abs().max(1.0),
                "width {w} module {j}: {ours} vs webui's {theirs}"
            );
        }
    }
}

fn sample(out: &Path, extra: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(["sample", "--model"])
        .arg(common::checkpoints().join("sd1_diffusers"))
        .args([
            "--prompt",
            "a photo of a cat",
            "--steps",
            "3",
            "--seed",
            "7",
        ])
        .args([
            "--width", "32", "--height", "32", "--quiet", "--json", "--out",
        ])
        .arg(out)
        .args(extra)
        .output()
        .unwrap()
}

/// `sdkit sample --hypernetwork FILE[:STRENGTH]`: strength 0 gives the image without
/// it, 1 another one; the PNG carries webui's `Hypernet` / `Hypernet hash` /
/// `Hypernet strength`; a file for other widths or a broken file is a one-line error.
#[test]
fn sample_applies_a_webui_hypernetwork() {
    let out = tempfile::tempdir().unwrap();
    let file = fixtures().join("webui_tiny.pt");
    let image = |extra: &[&str]| {
        let o = sample(out.path(), extra);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let png = PathBuf::from(rep["images"][0].as_str().unwrap());
        (image::open(&png).unwrap().to_rgb8().into_raw(), png, rep)
    };
    let (plain, _, _) = image(&[]);
    let zero = format!("{}:0", file.display());
    let (at0, png0, rep) = image(&["--hypernetwork", &zero]);
    assert_eq!(rep["hypernetwork"]["widths"], serde_json::json!([32]));
    assert_eq!(plain, at0, "strength 0 changes the image");
    let one = file.display().to_string();
    let (at1, png1, _) = image(&["--hypernetwork", &one]);
    let diff = plain
        .iter()
        .zip(&at1)
        .map(|(a, b)| (*a as i32 - *b as i32).abs())
        .max()
        .unwrap();
    assert!(
        diff > 5,
        "the hypernetwork changes the image by only {diff} levels"
    );
    let hash = sdkit::formats::png_params::short_hash(&file).unwrap();
    let params = |p: &Path| {
        let text = sdkit::formats::png_params::read_parameters(p)
            .unwrap()
            .unwrap();
        sdkit::formats::png_params::parse(&text)
    };
    let t0 = params(&png0);
    assert_eq!(t0.get("Hypernet"), Some("webui_tiny"));
    assert_eq!(t0.get("Hypernet hash"), Some(hash.as_str()));
    assert_eq!(t0.get("Hypernet strength"), Some("0.0"));
    let t1 = params(&png1);
    assert_eq!(t1.get("Hypernet"), Some("webui_tiny"));
    assert_eq!(t1.get("Hypernet strength"), None, "webui omits strength 1");

    // A network for other widths (an SD2 file on SD1, say) is refused, naming the file.
    let other = out.path().join("other.pt");
    Hypernetwork::create(
        &HypernetworkShape::default(),
        &[24],
        &mut Rng::new(1),
        &Device::Cpu,
    )
    .unwrap()
    .save_pt(&other, &PtMeta::default())
    .unwrap();
    let broken = out.path().join("broken.pt");
    std::fs::write(&broken, b"not a torch file").unwrap();
    for (f, why) in [
        (&other, "no context width"),
        (&broken, "not a torch zip file"),
    ] {
        let o = sample(out.path(), &["--hypernetwork", f.to_str().unwrap()]);
        assert!(!o.status.success());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains(f.to_str().unwrap()) && err.contains(why),
            "{err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
