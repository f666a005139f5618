//! Checkpoint loading: a diffusers folder, a single-file LDM `.safetensors` and a torch
//! `.ckpt` of the same tiny SD1-like / SD2-like pipelines must give identical tensors per
//! diffusers name. The single files were written by tests/fixtures/gen_checkpoint_fixtures.py
//! and checked there with diffusers' own single-file loader, so agreement with the folder
//! means sdkit maps LDM names the way diffusers does.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::Weights;
use sdkit::model::arch::{Arch, Prediction};
use sdkit::model::loader::{self, Checkpoint, Format, LoadOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    common::checkpoints().join(name)
}

fn open(path: &Path) -> Checkpoint {
    loader::open(path, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn open_err(path: &Path) -> String {
    match loader::open(path, &LoadOptions::default()) {
        Ok(_) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

fn keys(w: &Weights) -> Vec<String> {
    let mut k: Vec<String> = w.keys().cloned().collect();
    k.sort();
    k
}

/// Same names, and bit-identical values (fp16 files read to f32).
fn assert_same(a: &Weights, b: &Weights, what: &str) {
    assert_eq!(keys(a), keys(b), "{what}: key sets differ");
    for k in keys(a) {
        let (x, y) = (a.raw(&k).unwrap(), b.raw(&k).unwrap());
        assert_eq!(x.dims(), y.dims(), "{what}: {k}");
        assert_eq!(x.dtype(), DType::F32);
        let d = (x - y).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0, "{what}: {k} differs");
    }
}

fn assert_same_model(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.info.arch, b.info.arch);
    assert_eq!(a.info.unet, b.info.unet);
    assert_eq!(a.info.vae, b.info.vae);
    assert_eq!(a.info.text, b.info.text);
    assert_same(&a.unet, &b.unet, "unet");
    assert_same(&a.vae, &b.vae, "vae");
    assert_same(&a.text_encoder, &b.text_encoder, "text encoder");
}

#[test]
fn sd1_folder_single_file_and_ckpt_agree() {
    let folder = open(&fixture("sd1_diffusers"));
    let single = open(&fixture("sd1.safetensors"));
    let ckpt = open(&fixture("sd1.ckpt"));
    assert_eq!(folder.info.format, Format::Diffusers);
    assert_eq!(single.info.format, Format::Safetensors);
    assert_eq!(ckpt.info.format, Format::Ckpt);
    assert_same_model(&folder, &single);
    assert_same_model(&folder, &ckpt);
    let i = &single.info;
    assert_eq!(i.arch, Arch::Sd1);
    assert_eq!(i.prediction, Prediction::Epsilon);
    assert_eq!(i.unet.block_out_channels, vec![32, 32]);
    assert_eq!(i.unet.layers_per_block, 1);
    assert_eq!(i.unet.cross_attention, vec![true, false]);
    assert_eq!(i.unet.cross_attention_dim, 32);
    assert_eq!(i.unet.heads, vec![8, 8]);
    assert!(!i.unet.use_linear_projection);
    assert_eq!(i.vae.block_out_channels, vec![32, 32]);
    assert_eq!(i.vae.scale_factor(), 2);
    assert_eq!(i.vae.scaling_factor, 0.18215);
    assert_eq!((i.text.width, i.text.layers, i.text.vocab), (32, 2, 49408));
    // the VAE mid-attention 1x1 convs became linear weights
    let q = single
        .vae
        .shape_of("decoder.mid_block.attentions.0.to_q.weight")
        .unwrap();
    assert_eq!(q, vec![32, 32]);
}

#[test]
fn sd2_folder_and_single_file_agree() {
    let folder = open(&fixture("sd2_diffusers"));
    let single = open(&fixture("sd2.safetensors"));
    assert_same_model(&folder, &single);
    let i = &single.info;
    assert_eq!(i.arch, Arch::Sd2);
    assert_eq!(folder.info.prediction, Prediction::VPrediction);
    assert_eq!(i.prediction, Prediction::VPrediction);
    assert!(i.unet.use_linear_projection);
    assert_eq!(i.unet.heads, vec![2, 2]);
    // the OpenCLIP tower lost its last (unused) block, like diffusers' SD2 text encoder
    assert_eq!(i.text.layers, 2);
}

#[test]
fn dtype_follows_the_request() {
    let f32m = open(&fixture("sd1.safetensors"));
    for dtype in [DType::F16, DType::BF16] {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let m = loader::open(&fixture("sd1.safetensors"), &opts).unwrap();
        let k = "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight";
        let t = m.unet.raw(k).unwrap();
        assert_eq!(t.dtype(), dtype);
        let back = t.to_dtype(DType::F32).unwrap();
        let want = f32m
            .unet
            .raw(k)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_dtype(DType::F32);
        let d = (back - want.unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert_eq!(d.to_scalar::<f32>().unwrap(), 0.0);
    }
}

#[test]
fn prediction_from_sidecar_default_and_override() {
    let dir = tempfile::tempdir().unwrap();
    // no sidecar: SD2 defaults to v-prediction (as diffusers' single-file loader), heads
    // follow SD2's 64-wide rule (at least one)
    let lone = dir.path().join("sd2-no-yaml.safetensors");
    std::fs::copy(fixture("sd2.safetensors"), &lone).unwrap();
    let m = open(&lone);
    assert_eq!(m.info.prediction, Prediction::VPrediction);
    assert_eq!(m.info.unet.heads, vec![1, 1]);
    let opts = LoadOptions {
        prediction: Some(Prediction::Epsilon),
        ..LoadOptions::default()
    };
    assert_eq!(
        loader::open(&lone, &opts).unwrap().info.prediction,
        Prediction::Epsilon
    );
    // a sidecar saying `parameterization: "v"` makes an SD1-like file v-prediction
    let v1 = dir.path().join("sd1-v.safetensors");
    std::fs::copy(fixture("sd1.safetensors"), &v1).unwrap();
    let yaml = std::fs::read_to_string(fixture("sd1.yaml")).unwrap();
    let yaml = yaml.replacen("\n  params:\n", "\n  params:\n    parameterization: v\n", 1);
    std::fs::write(dir.path().join("sd1-v.yaml"), yaml).unwrap();
    assert_eq!(open(&v1).info.prediction, Prediction::VPrediction);
}

fn read_st(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn write_st(path: &Path, t: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(t, path).unwrap();
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = read_st(&fixture("sd1.safetensors"));
    t.remove("model.diffusion_model.input_blocks.1.1.proj_in.weight")
        .unwrap();
    let p = dir.path().join("missing.safetensors");
    write_st(&p, &t);
    let e = open_err(&p);
    assert!(e.contains("missing.safetensors"), "{e}");
    assert!(
        e.contains("1 missing: down_blocks.0.attentions.0.proj_in.weight"),
        "{e}"
    );

    let mut t = read_st(&fixture("sd1.safetensors"));
    let extra = Tensor::zeros(3, DType::F16, &Device::Cpu).unwrap();
    t.insert(
        "model.diffusion_model.input_blocks.1.1.extra.weight".into(),
        extra.clone(),
    );
    t.insert("something_else".into(), extra);
    let p = dir.path().join("extra.safetensors");
    write_st(&p, &t);
    let e = open_err(&p);
    assert!(e.contains("unexpected"), "{e}");
    assert!(e.contains("something_else"), "{e}");
}

#[test]
fn sdxl_and_foreign_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let z = Tensor::zeros(2, DType::F16, &Device::Cpu).unwrap();
    let mut t = HashMap::new();
    t.insert(
        "model.diffusion_model.input_blocks.0.0.weight".to_string(),
        z.clone(),
    );
    t.insert(
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias".to_string(),
        z.clone(),
    );
    let p = dir.path().join("xl.safetensors");
    write_st(&p, &t);
    let e = open_err(&p);
    assert!(e.contains("xl.safetensors") && e.contains("SDXL"), "{e}");

    let mut t = HashMap::new();
    t.insert(
        "double_blocks.0.img_attn.norm.key_norm.scale".to_string(),
        z,
    );
    let p = dir.path().join("flux.safetensors");
    write_st(&p, &t);
    assert!(open_err(&p).contains("not a Stable Diffusion 1.x/2.x checkpoint"));

    let xl = dir.path().join("xl_diffusers");
    std::fs::create_dir(&xl).unwrap();
    std::fs::write(
        xl.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLPipeline", "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"]}"#,
    )
    .unwrap();
    assert!(open_err(&xl).contains("SDXL"));

    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "hi").unwrap();
    assert!(open_err(&p).contains("not a checkpoint"));
    let p = dir.path().join("broken.ckpt");
    std::fs::write(&p, "not a zip").unwrap();
    assert!(open_err(&p).contains("cannot read torch checkpoint"));
}

type Table = Vec<(String, Vec<usize>)>;

fn table(v: &serde_json::Value) -> Table {
    serde_json::from_value(v.clone()).unwrap()
}

fn shapes(w: &Weights) -> Table {
    let mut t: Table = w
        .keys()
        .map(|k| (k.clone(), w.shape_of(k).unwrap()))
        .collect();
    t.sort();
    t
}

/// The real SD1.5 and SD2.1 layouts (key tables with shapes, no weights): every LDM key of
/// a single file maps to exactly the diffusers parameters diffusers' converters produce,
/// and the configs inferred from the shapes are the published ones.
#[test]
fn real_sd15_and_sd21_layouts() {
    let gz = std::fs::File::open(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/checkpoint/real_keys.json.gz"),
    )
    .unwrap();
    let json: serde_json::Value =
        serde_json::from_reader(flate2::read::GzDecoder::new(gz)).unwrap();
    let opts = LoadOptions {
        dtype: DType::F16,
        ..LoadOptions::default()
    };
    let scalar = Tensor::zeros((), DType::F16, &Device::Cpu).unwrap();
    for name in ["sd15", "sd21"] {
        let t = &json[name];
        // lazily broadcast zeros: the shapes without the memory
        let tensors: HashMap<String, Tensor> = table(&t["ldm"])
            .into_iter()
            .map(|(k, s)| (k, scalar.broadcast_as(s).unwrap()))
            .collect();
        let path = PathBuf::from(format!("{name}.safetensors"));
        let m = loader::from_tensors(&path, tensors, Format::Safetensors, &opts)
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(shapes(&m.unet), table(&t["unet"]), "{name} unet");
        assert_eq!(shapes(&m.vae), table(&t["vae"]), "{name} vae");
        assert_eq!(
            shapes(&m.text_encoder),
            table(&t["text"]),
            "{name} text encoder"
        );
        let i = &m.info;
        assert_eq!(i.unet.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(i.unet.layers_per_block, 2);
        assert_eq!(i.unet.cross_attention, vec![true, true, true, false]);
        assert_eq!(i.vae.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!(i.vae.scale_factor(), 8);
        if name == "sd15" {
            assert_eq!(i.arch, Arch::Sd1);
            assert_eq!(i.prediction, Prediction::Epsilon);
            assert_eq!(i.unet.heads, vec![8; 4]);
            assert_eq!(i.unet.cross_attention_dim, 768);
            assert!(!i.unet.use_linear_projection);
            assert_eq!((i.text.width, i.text.layers, i.text.heads), (768, 12, 12));
        } else {
            assert_eq!(i.arch, Arch::Sd2);
            assert_eq!(i.prediction, Prediction::VPrediction);
            assert_eq!(i.unet.heads, vec![5, 10, 20, 20]);
            assert_eq!(i.unet.cross_attention_dim, 1024);
            assert!(i.unet.use_linear_projection);
            assert_eq!((i.text.width, i.text.layers, i.text.heads), (1024, 23, 16));
        }
    }
}

/// The text encoder's width read without loading (`sdkit grid` checks embeddings with
/// it before rendering): from a folder's config, a single file's header and a `.ckpt`'s
/// pickle, for both families' key names.
#[test]
fn text_width_without_loading() {
    for name in [
        "sd1_diffusers",
        "sd1.safetensors",
        "sd1.ckpt",
        "sd2_diffusers",
        "sd2.safetensors",
    ] {
        let p = fixture(name);
        assert_eq!(
            loader::text_width(&p),
            Some(open(&p).info.text.width),
            "{name}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for (key, width) in [
        (
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
            768,
        ),
        ("cond_stage_model.model.token_embedding.weight", 1024),
    ] {
        let p = dir.path().join("m.safetensors");
        let t = Tensor::zeros((2, width), DType::F16, &Device::Cpu).unwrap();
        write_st(&p, &HashMap::from([(key.to_string(), t)]));
        assert_eq!(loader::text_width(&p), Some(width), "{key}");
    }
    let p = dir.path().join("notes.safetensors");
    std::fs::write(&p, b"not a model").unwrap();
    assert_eq!(loader::text_width(&p), None);
}
