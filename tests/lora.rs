//! LoRA / LoCon against kohya's naming rule and PyTorch, with the fixtures of
//! tests/fixtures/gen_lora_fixtures.py:
//! - module names and factor shapes of the real SD1.5 / SD2.1 architectures (kohya's
//!   `create_modules` over diffusers / transformers modules);
//! - one training step on the tiny SD1 pipeline with a hand-written kohya LoRAModule
//!   around every UNet (LoCon) and text-encoder target: gradients of every factor;
//! - diffusers' `load_lora_weights` of a kohya file: the UNet and text-encoder outputs.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::adapters::lora::{self, LoraNetwork, LoraShape, Part};
use sdkit::model::loader::{self, Format, LoadOptions};
use sdkit::model::nn::checkpoint::Checkpointing;
use sdkit::model::pipeline::Models;
use sdkit::train::rng::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

fn load(name: &str) -> BTreeMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(name), &common::device())
        .unwrap()
        .into_iter()
        .collect()
}

/// The real SD1.5 / SD2.1 models with lazily broadcast zero weights (shapes only).
fn real_models(name: &str) -> Models {
    let gz = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint/real_keys.json.gz"),
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_reader(flate2::read::GzDecoder::new(gz)).unwrap();
    let table: Vec<(String, Vec<usize>)> =
        serde_json::from_value(json[name]["ldm"].clone()).unwrap();
    let scalar = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let tensors: HashMap<String, Tensor> = table
        .into_iter()
        .map(|(k, shape)| (k, scalar.broadcast_as(shape).unwrap()))
        .collect();
    let path = PathBuf::from(format!("{name}.safetensors"));
    let ck =
        loader::from_tensors(&path, tensors, Format::Safetensors, &LoadOptions::default()).unwrap();
    Models::new(ck).unwrap()
}

type Table = Vec<(String, Vec<usize>, Vec<usize>)>;

fn table(v: &serde_json::Value) -> Table {
    let dims = |x: &serde_json::Value| -> Vec<usize> {
        x.as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect()
    };
    let mut t: Table = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().to_string(), dims(&e[1]), dims(&e[2])))
        .collect();
    t.sort();
    t
}

fn ours(net: &LoraNetwork, part: Part) -> Table {
    let mut t: Table = net
        .modules
        .iter()
        .filter(|m| m.part == part)
        .map(|m| (m.name.clone(), m.down.dims().to_vec(), m.up.dims().to_vec()))
        .collect();
    t.sort();
    t
}

#[test]
fn module_names_and_shapes_equal_kohyas_for_sd15_and_sd21() {
    let want: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("modules.json")).unwrap()).unwrap();
    for (name, json, te_count) in [("sd15", "sd15", 72), ("sd21", "sd21", 138)] {
        for (conv, key, unet_count) in [(None, "unet", 192), (Some(8), "unet_conv", 278)] {
            let mut m = real_models(name);
            let shape = LoraShape {
                dim: 4,
                alpha: 1.0,
                conv_dim: conv,
                conv_alpha: 1.0,
                dropout: 0.0,
            };
            let net = LoraNetwork::create(
                Some(&mut m.unet),
                Some(&mut m.clip),
                &shape,
                &mut Rng::new(1),
                &Device::Cpu,
            )
            .unwrap();
            let u = ours(&net, Part::Unet);
            assert_eq!(u.len(), unet_count, "{name} {key}");
            assert_eq!(u, table(&want[json][key]), "{name} {key}");
            let te = ours(&net, Part::TextEncoder);
            assert_eq!(te.len(), te_count, "{name} te");
            assert_eq!(te, table(&want[json]["te"]), "{name} te");
        }
    }
}

/// The tiny SD1 pipeline with the UNet config of the fixtures (8 norm groups).
fn tiny() -> Models {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let src = common::checkpoints().join("sd1_diffusers");
        for e in walkdir::WalkDir::new(&src) {
            let e = e.unwrap();
            let out = d.path().join(e.path().strip_prefix(&src).unwrap());
            if e.file_type().is_dir() {
                std::fs::create_dir_all(&out).unwrap();
            } else {
                std::fs::copy(e.path(), &out).unwrap();
            }
        }
        std::fs::copy(
            fixtures().join("unet_config.json"),
            d.path().join("unet/config.json"),
        )
        .unwrap();
        d
    });
    let opts = LoadOptions {
        device: common::device(),
        ..LoadOptions::default()
    };
    let ck = loader::open(dir.path(), &opts).unwrap();
    Models::new(ck).unwrap()
}

const TINY_SHAPE: LoraShape = LoraShape {
    dim: 4,
    alpha: 2.0,
    conv_dim: Some(2),
    conv_alpha: 1.0,
    dropout: 0.0,
};

/// The tiny pipeline with a network of `shape` attached (factors from Rng seed 1).
fn tiny_with(shape: LoraShape) -> (Models, LoraNetwork) {
    let mut m = tiny();
    let net = LoraNetwork::create(
        Some(&mut m.unet),
        Some(&mut m.clip),
        &shape,
        &mut Rng::new(1),
        &common::device(),
    )
    .unwrap();
    (m, net)
}

#[test]
fn init_is_kaiming_uniform_down_and_zero_up() {
    let mut m = tiny();
    let net = LoraNetwork::create(
        Some(&mut m.unet),
        Some(&mut m.clip),
        &TINY_SHAPE,
        &mut Rng::new(3),
        &common::device(),
    )
    .unwrap();
    for md in &net.modules {
        let up: Vec<f32> = md.up.flatten_all().unwrap().to_vec1().unwrap();
        assert!(up.iter().all(|&v| v == 0.0), "{}", md.name);
        let d = md.down.dims();
        let fan_in: usize = d[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        let down: Vec<f32> = md.down.flatten_all().unwrap().to_vec1().unwrap();
        assert!(down.iter().all(|v| v.abs() <= bound), "{}", md.name);
        assert!(down.iter().any(|v| v.abs() > bound / 2.0), "{}", md.name);
    }
}

/// One step through CLIP and the UNet with LoRA on every target: gradients of every
/// lora_down / lora_up equal PyTorch's (computed in f64) within 1e-4 relative to each
/// tensor's largest value. f32 rounding through two text layers, the UNet and its
/// backward gives ~1e-6 here on any CPU; a wrong scale, a missing path (e.g. a frozen add
/// that drops the time-embedding gradient) or a transposed factor gives >= 1e-2.
#[test]
fn gradients_of_every_factor_match_pytorch() {
    check_gradients_against_pytorch(false);
}

/// The same with `--gradient-checkpointing`: blocks recomputed in the backward give the
/// same gradients (UNet factors through the sidecar, text-encoder factors through the
/// recomputed blocks' context gradient).
#[test]
fn gradients_with_checkpointing_match_pytorch() {
    check_gradients_against_pytorch(true);
}

fn check_gradients_against_pytorch(checkpointing: bool) {
    let (mut m, net) = tiny_with(TINY_SHAPE);
    let file = load("tiny_lora.safetensors");
    net.load_tensors(&file).unwrap();
    let ck = checkpointing.then(|| Checkpointing::new(net.vars(Part::Unet)));
    m.unet.checkpointing = ck.clone();
    let exp = load("tiny_expected.safetensors");
    let ids = exp["ids"].to_dtype(DType::U32).unwrap();
    let ctx = m.clip.encode(&ids, 1).unwrap();
    let e = common::rel_err(&ctx, &exp["ctx"], 1e-6);
    assert!(e < 1e-5, "text encoder output with LoRA: rel err {e}");
    let pred = m.unet.forward(&exp["noisy"], &exp["t"], &ctx).unwrap();
    let e = common::rel_err(&pred, &exp["pred"], 1e-6);
    assert!(e < 1e-5, "UNet output with LoRA: rel err {e}");
    let loss = (&pred - &exp["target"])
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let want = exp["loss"].to_scalar::<f32>().unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - want).abs() < 1e-5 * want, "loss {got} vs {want}");
    let grads = loss.backward().unwrap();
    let mut checked = 0;
    let mut bad = vec![];
    for md in &net.modules {
        for (suffix, var) in [("lora_down.weight", &md.down), ("lora_up.weight", &md.up)] {
            let key = format!("grad.{}.{suffix}", md.name);
            let outer = grads.get(var.as_tensor()).cloned();
            let inner = ck.as_ref().and_then(|c| c.take(var).unwrap());
            let in_block = md.name.contains("_resnets_") || md.name.contains("_attentions_");
            if ck.is_some() && md.name.starts_with("lora_unet_") && in_block {
                // Factors inside a checkpointed resnet or transformer.
                assert!(outer.is_none(), "{key}: recorded outside the checkpoint");
            }
            let g = match (outer, inner) {
                (Some(a), Some(b)) => (a + b).unwrap(),
                (Some(g), None) | (None, Some(g)) => g,
                (None, None) => panic!("no gradient for {key}"),
            };
            let e = common::rel_err(&g, &exp[&key], 1e-8);
            if e >= 1e-4 {
                bad.push(format!("{key}: rel err {e}"));
            }
            checked += 1;
        }
    }
    assert!(bad.is_empty(), "{}", bad.join("\n"));
    assert_eq!(checked, 2 * 90, "every module of the fixture");
}

/// sdkit writes the tensors kohya writes: same keys, shapes, values, 0-dim alpha.
#[test]
fn saved_tensors_equal_kohyas_file() {
    let (_m, net) = tiny_with(TINY_SHAPE);
    let file = load("tiny_lora.safetensors");
    net.load_tensors(&file).unwrap();
    let ours: BTreeMap<String, Tensor> = net.tensors(DType::F32).unwrap().into_iter().collect();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        file.keys().collect::<Vec<_>>()
    );
    for (k, t) in &ours {
        assert_eq!(t.dims(), file[k].dims(), "{k}");
        assert_eq!(common::rel_err(t, &file[k], 1e-12), 0.0, "{k}");
    }
    // A network of another shape refuses the file, naming why.
    let (_, other) = tiny_with(LoraShape {
        dim: 8,
        ..TINY_SHAPE
    });
    let e = other.load_tensors(&file).unwrap_err();
    assert!(e.contains("network-dim"), "{e}");
}

/// A kohya file merged by sdkit gives the outputs diffusers' `load_lora_weights` gives.
#[test]
fn merged_file_matches_diffusers_loader() {
    let mut m = tiny();
    let file = load("tiny_lora_linear.safetensors");
    let applied = lora::merge_into(&file, &mut m.unet, &mut m.clip, 1.0).unwrap();
    assert_eq!(applied.modules, 48 + 12);
    assert!(applied.unknown.is_empty(), "{:?}", applied.unknown);
    let exp = load("tiny_expected.safetensors");
    let ids = exp["ids"].to_dtype(DType::U32).unwrap();
    let ctx = m.clip.encode(&ids, 1).unwrap();
    let e = common::rel_err(&ctx, &exp["diffusers.te_out"], 1e-6);
    assert!(e < 1e-5, "text encoder: rel err {e}");
    let pred = m.unet.forward(&exp["noisy"], &exp["t"], &ctx).unwrap();
    let e = common::rel_err(&pred, &exp["diffusers.unet_out"], 1e-6);
    assert!(e < 1e-5, "UNet: rel err {e}");
}

#[test]
fn unknown_keys_are_listed_not_ignored() {
    let mut m = tiny();
    let mut file = load("tiny_lora_linear.safetensors");
    let t = Tensor::zeros((4, 4), DType::F32, &common::device()).unwrap();
    file.insert("lora_unet_no_such_layer.lora_down.weight".into(), t.clone());
    file.insert("lora_unet_no_such_layer.lora_up.weight".into(), t.clone());
    file.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a".into(),
        t,
    );
    let applied = lora::merge_into(&file, &mut m.unet, &mut m.clip, 1.0).unwrap();
    assert_eq!(
        applied.unknown,
        vec![
            "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a".to_string(),
            "lora_unet_no_such_layer.lora_down.weight".into(),
            "lora_unet_no_such_layer.lora_up.weight".into(),
        ]
    );
}

/// `sdkit sample --lora FILE:0.7` gives diffusers' image (`load_lora_weights` +
/// `set_adapters([0.7])`, DDIM, same seed) to within one 8-bit level, and records the
/// LoRA in webui's `Lora hashes`.
#[test]
fn sample_with_lora_equals_diffusers_image() {
    let meta: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::checkpoints().join("sample_ref.json")).unwrap(),
    )
    .unwrap();
    let out = tempfile::tempdir().unwrap();
    let lora = fixtures().join("tiny_lora_linear.safetensors");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(["sample", "--model"])
        .arg(common::checkpoints().join("sd1_diffusers"))
        .args(["--prompt", meta["prompt"].as_str().unwrap()])
        .args(["--negative", meta["negative"].as_str().unwrap()])
        .args([
            "--steps",
            "4",
            "--cfg",
            "7.5",
            "--sampler",
            "ddim",
            "--seed",
            "1234",
        ])
        .args([
            "--width", "32", "--height", "32", "--quiet", "--json", "--out",
        ])
        .arg(out.path())
        .arg("--lora")
        .arg(format!("{}:0.7", lora.display()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rep: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(rep["loras"][0]["modules"], 60);
    assert_eq!(rep["loras"][0]["weight"], 0.7);
    let png = std::path::PathBuf::from(rep["images"][0].as_str().unwrap());
    let got = image::open(&png).unwrap().to_rgb8();
    let exp = load("tiny_expected.safetensors");
    let want = (&exp["ddim.image"] * 255.0).unwrap();
    let want: Vec<f32> = want.flatten_all().unwrap().to_vec1().unwrap();
    let (w, h) = got.dimensions();
    let mut max = 0f32;
    for y in 0..h {
        for x in 0..w {
            for c in 0..3 {
                let g = got.get_pixel(x, y)[c] as f32;
                let r = want[(c * h as usize + y as usize) * w as usize + x as usize];
                max = max.max((g - r).abs());
            }
        }
    }
    eprintln!("sample --lora vs diffusers: max diff {max:.3} levels");
    assert!(max <= 1.0, "max diff {max} levels");
    let text = sdkit::formats::png_params::read_parameters(&png)
        .unwrap()
        .unwrap();
    let t = sdkit::formats::png_params::parse(&text);
    assert!(
        t.get("Lora hashes")
            .unwrap()
            .starts_with("tiny_lora_linear: ")
    );
    // diffusers' image without the LoRA differs: the file changes the model.
    let base = candle_core::safetensors::load(
        common::checkpoints().join("sample_ref.safetensors"),
        &common::device(),
    )
    .unwrap();
    let d = (&base["sd1.image"] - &exp["ddim.image"])
        .unwrap()
        .abs()
        .unwrap();
    let d = d.max_all().unwrap().to_scalar::<f32>().unwrap() * 255.0;
    assert!(d > 5.0, "the LoRA changes the image by only {d} levels");
}

/// kohya's network_dropout: masks follow the key (same key, same output; another key,
/// another output), key 0 (inference) is the plain LoRA.
#[test]
fn network_dropout_follows_its_key() {
    let (m, net) = tiny_with(LoraShape {
        dropout: 0.5,
        ..TINY_SHAPE
    });
    net.load_tensors(&load("tiny_lora.safetensors")).unwrap();
    let exp = load("tiny_expected.safetensors");
    let ids = exp["ids"].to_dtype(DType::U32).unwrap();
    let run = |key: u64| {
        net.set_dropout_key(key);
        let ctx = m.clip.encode(&ids, 1).unwrap();
        m.unet.forward(&exp["noisy"], &exp["t"], &ctx).unwrap()
    };
    let plain = run(0);
    assert!(
        common::rel_err(&plain, &exp["pred"], 1e-6) < 1e-5,
        "key 0 is no dropout"
    );
    let a = run(7);
    let b = run(7);
    let c = run(8);
    assert_eq!(common::rel_err(&a, &b, 1e-6), 0.0, "same key, same masks");
    assert!(
        common::rel_err(&a, &plain, 1e-6) > 1e-3,
        "dropout changes the output"
    );
    assert!(
        common::rel_err(&a, &c, 1e-6) > 1e-3,
        "another key, other masks"
    );
}

/// Recomputation draws the dropout masks of the first forward (same key): with
/// `--network-dropout` the checkpointed gradients equal the plain ones.
#[test]
fn checkpointing_recomputes_the_same_dropout_masks() {
    let grads = |checkpointing: bool| {
        let (mut m, net) = tiny_with(LoraShape {
            dropout: 0.5,
            ..TINY_SHAPE
        });
        net.load_tensors(&load("tiny_lora.safetensors")).unwrap();
        let ck = checkpointing.then(|| Checkpointing::new(net.vars(Part::Unet)));
        m.unet.checkpointing = ck.clone();
        let exp = load("tiny_expected.safetensors");
        net.set_dropout_key(11);
        let ctx = m
            .clip
            .encode(&exp["ids"].to_dtype(DType::U32).unwrap(), 1)
            .unwrap();
        let pred = m.unet.forward(&exp["noisy"], &exp["t"], &ctx).unwrap();
        let g = pred.sqr().unwrap().mean_all().unwrap().backward().unwrap();
        let mut out = vec![];
        for md in net
            .modules
            .iter()
            .filter(|m| m.name.starts_with("lora_unet_"))
        {
            let outer = g.get(md.down.as_tensor()).cloned();
            let t = match ck.as_ref().and_then(|c| c.take(&md.down).unwrap()) {
                Some(inner) => {
                    assert!(outer.is_none(), "{}: counted twice", md.name);
                    inner
                }
                None => outer.unwrap(),
            };
            out.push(t);
        }
        out
    };
    let (plain, ck) = (grads(false), grads(true));
    for (a, b) in plain.iter().zip(&ck) {
        let e = common::rel_err(b, a, 1e-8);
        assert!(e < 1e-5, "rel err {e}");
    }
}
