//! Writing checkpoints (`formats::sd_checkpoint`, what `sdkit train dreambooth` saves):
//! the single file has the key names and shapes of the released SD1.5 / SD2.1 files, and
//! both the single file and the diffusers folder load back to the same tensors. That
//! diffusers' own loaders read them is checked by scripts/check_sd_checkpoint.py.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::formats::sd_checkpoint::{self, CheckpointTensors};
use sdkit::model::Weights;
use sdkit::model::keymap;
use sdkit::model::loader::{self, Checkpoint, Format, LoadOptions};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn tensors_of(ck: &Checkpoint) -> CheckpointTensors {
    CheckpointTensors {
        unet: ck.unet.snapshot(),
        vae: ck.vae.snapshot(),
        text_encoder: ck.text_encoder.snapshot(),
        passthrough: ck
            .passthrough
            .iter()
            .map(|(k, t)| (k.clone(), t.clone()))
            .collect(),
    }
}

type Table = Vec<(String, Vec<usize>)>;

/// The real SD1.5 and SD2.1 layouts (tests/fixtures/checkpoint/real_keys.json.gz, key
/// tables with shapes): loaded and written back, every key of the released file is there
/// with its shape, except the ones nothing uses (the training schedule's buffers, EMA
/// copies, CLIP's position ids).
#[test]
fn written_single_files_have_the_released_layouts() {
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
        let real: Table = serde_json::from_value(json[name]["ldm"].clone()).unwrap();
        let tensors: HashMap<String, Tensor> = real
            .iter()
            .map(|(k, s)| (k.clone(), scalar.broadcast_as(s.as_slice()).unwrap()))
            .collect();
        let path = PathBuf::from(format!("{name}.safetensors"));
        let ck = loader::from_tensors(&path, tensors, Format::Safetensors, &opts).unwrap();
        let written = sd_checkpoint::ldm_tensors(&ck.info, &tensors_of(&ck)).unwrap();
        let mut got: Table = written
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        got.sort();
        let mut want: Table = real
            .into_iter()
            .filter(|(k, _)| !keymap::ignored(k) || ck.passthrough.contains_key(k))
            .collect();
        want.sort();
        assert_eq!(got.len(), want.len(), "{name}: key count");
        assert_eq!(got, want, "{name}");

        // From a diffusers folder (its tables in diffusers names, no single-file extras):
        // the same layout, less what only a single file carries (SD2's projection head).
        let part = |p: &str| -> Vec<(String, Tensor)> {
            let t: Table = serde_json::from_value(json[name][p].clone()).unwrap();
            t.into_iter()
                .map(|(k, s)| (k, scalar.broadcast_as(s.as_slice()).unwrap()))
                .collect()
        };
        let folder = CheckpointTensors {
            unet: part("unet"),
            vae: part("vae"),
            text_encoder: part("text"),
            passthrough: vec![],
        };
        let mut got: Table = sd_checkpoint::ldm_tensors(&ck.info, &folder)
            .unwrap()
            .iter()
            .map(|(k, t)| (k.clone(), t.dims().to_vec()))
            .collect();
        got.sort();
        let want: Table = want
            .into_iter()
            .filter(|(k, _)| !k.ends_with("text_projection") && !k.ends_with("logit_scale"))
            .collect();
        assert_eq!(got, want, "{name} from diffusers names");
    }
}

fn open(p: &Path) -> Checkpoint {
    loader::open(p, &LoadOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

fn max_diff(a: &Weights, b: &Weights) -> f32 {
    let (ka, kb): (Vec<_>, Vec<_>) = (a.snapshot(), b.snapshot());
    assert_eq!(
        ka.iter().map(|p| &p.0).collect::<Vec<_>>(),
        kb.iter().map(|p| &p.0).collect::<Vec<_>>()
    );
    ka.iter()
        .zip(&kb)
        .map(|((k, x), (_, y))| {
            assert_eq!(x.dims(), y.dims(), "{k}");
            common::max_abs_diff(x, y)
        })
        .fold(0.0, f32::max)
}

fn same_model(a: &Checkpoint, b: &Checkpoint) -> f32 {
    assert_eq!(a.info.arch, b.info.arch);
    assert_eq!(a.info.unet, b.info.unet);
    assert_eq!(a.info.vae, b.info.vae);
    assert_eq!(a.info.text, b.info.text);
    max_diff(&a.unet, &b.unet)
        .max(max_diff(&a.vae, &b.vae))
        .max(max_diff(&a.text_encoder, &b.text_encoder))
}

/// Each tiny fixture (SD1 / SD2, single file / diffusers folder) written as a single file
/// and as a diffusers folder loads back to the same tensors and configuration; the SD2
/// single file keeps the tensors only it has byte for byte; an fp16 save holds the values
/// rounded to f16.
#[test]
fn written_checkpoints_load_back_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let none = BTreeMap::new();
    for src in [
        "sd1.safetensors",
        "sd2.safetensors",
        "sd1_diffusers",
        "sd2_diffusers",
    ] {
        let ck = open(&common::checkpoints().join(src));
        let t = tensors_of(&ck);
        let file = dir.path().join(format!("{src}-out.safetensors"));
        sd_checkpoint::write_single_file(&file, &ck.info, &t, DType::F32, &none).unwrap();
        // What the weights cannot tell (the tiny SD2's heads) comes from the LDM config
        // sidecar, as for any single file: the model's own (the fixtures' sd1/sd2.yaml).
        let family = &src[..3];
        let side = common::checkpoints().join(format!("{family}.safetensors"));
        sd_checkpoint::copy_sidecar(&side, &file).unwrap();
        let back = open(&file);
        assert_eq!(same_model(&ck, &back), 0.0, "{src}: single file");
        assert_eq!(back.info.prediction, ck.info.prediction, "{src}");
        let folder = dir.path().join(format!("{src}-diffusers"));
        sd_checkpoint::write_diffusers(&folder, &ck.info, &t, DType::F32).unwrap();
        let back = open(&folder);
        assert_eq!(same_model(&ck, &back), 0.0, "{src}: diffusers folder");
        assert_eq!(back.info.prediction, ck.info.prediction, "{src}");
        if src == "sd2.safetensors" {
            assert!(
                ck.passthrough.keys().any(|k| k.contains("resblocks.")),
                "the last OpenCLIP block is kept"
            );
            let (raw, _) = sdkit::formats::safetensors::read_with_metadata(&file).unwrap();
            let (orig, _) =
                sdkit::formats::safetensors::read_with_metadata(&common::checkpoints().join(src))
                    .unwrap();
            for k in ck.passthrough.keys() {
                assert_eq!(common::max_abs_diff(&raw[k], &orig[k]), 0.0, "{k}");
            }
        }
    }
    // fp16: the file holds f16; loaded to f32 it equals the f32 values rounded to f16.
    let ck = open(&common::checkpoints().join("sd1_diffusers"));
    let mut t = tensors_of(&ck);
    let bump = |v: &mut Vec<(String, Tensor)>| {
        for (_, x) in v.iter_mut() {
            *x = (&*x * 1.0001).unwrap();
        }
    };
    bump(&mut t.unet);
    let file = dir.path().join("half.safetensors");
    let meta = BTreeMap::from([("modelspec.title".to_string(), "half".to_string())]);
    sd_checkpoint::write_single_file(&file, &ck.info, &t, DType::F16, &meta).unwrap();
    let (raw, m) = sdkit::formats::safetensors::read_with_metadata(&file).unwrap();
    assert_eq!(m["modelspec.title"], "half");
    assert!(raw.values().all(|x| x.dtype() == DType::F16));
    let back = open(&file);
    for (k, x) in &t.unet {
        let want = x
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let got = back.unet.raw(k).unwrap();
        assert_eq!(common::max_abs_diff(&got, &want), 0.0, "{k}");
    }
}

/// A Python with torch and diffusers (`$REFPY` from ../shared/scripts/refenv.sh, or
/// python3 if it has them).
fn python_with_diffusers() -> Option<String> {
    let py = common::python_with_torch()?;
    std::process::Command::new(&py)
        .args(["-c", "import diffusers, transformers"])
        .output()
        .is_ok_and(|o| o.status.success())
        .then_some(py)
}

/// diffusers reads what sdkit writes (scripts/check_sd_checkpoint.py): the single file
/// through its single-file loaders with the model's LDM config, the folder through
/// `StableDiffusionPipeline.from_pretrained` offline; both hold exactly the source model's
/// tensors and give the same outputs. Runs where a Python with diffusers exists.
#[test]
fn written_checkpoints_load_in_diffusers() {
    let Some(py) = python_with_diffusers() else {
        eprintln!("skipped the diffusers check: no Python with torch and diffusers ($REFPY)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/check_sd_checkpoint.py");
    for family in ["sd1", "sd2"] {
        let base = common::checkpoints().join(format!("{family}_diffusers"));
        let ck = open(&base);
        let t = tensors_of(&ck);
        let file = dir.path().join(format!("{family}.safetensors"));
        sd_checkpoint::write_single_file(&file, &ck.info, &t, DType::F32, &BTreeMap::new())
            .unwrap();
        let folder = dir.path().join(format!("{family}-diffusers"));
        sd_checkpoint::write_diffusers(&folder, &ck.info, &t, DType::F32).unwrap();
        let yaml = common::checkpoints().join(format!("{family}.yaml"));
        let out = std::process::Command::new(&py)
            .arg(&script)
            .arg("--file")
            .arg(&file)
            .arg("--yaml")
            .arg(&yaml)
            .arg("--base")
            .arg(&base)
            .arg("--folder")
            .arg(&folder)
            .arg("--same-as")
            .arg(&base)
            .env("HF_HUB_OFFLINE", "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{family}: diffusers did not load the files as expected:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout.matches("\nok ").count() + 1,
            9,
            "{family}:\n{stdout}"
        );
    }
}
