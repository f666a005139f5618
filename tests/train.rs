//! `sdkit train lora` end to end on the tiny SD1 pipeline (tests/fixtures/checkpoint):
//! the plan, the file (kohya keys, metadata, hashes), learning (loss on held-fixed noise
//! falls), exact resume, saves that survive kill -9, TensorBoard records, bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use sdkit::model::loader::{self, LoadOptions};
use sdkit::model::pipeline::Models;
use sdkit::train::rng::Rng;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn model() -> PathBuf {
    common::checkpoints().join("sd1_diffusers")
}

fn png(path: &Path, w: u32, h: u32, seed: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 4 + seed * 40) % 256) as u8,
            ((y * 4 + seed * 10) % 256) as u8,
            (((x + y) * 2) % 256) as u8,
        ])
    });
    img.save(path).unwrap();
}

/// `img/5_ohwx` with 3 captioned 64x64 images and a 96x64 one, `reg/1_cat` with 2.
fn dataset() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("img/5_ohwx");
    let reg = d.path().join("reg/1_cat");
    std::fs::create_dir_all(&img).unwrap();
    std::fs::create_dir_all(&reg).unwrap();
    for i in 0..3 {
        png(&img.join(format!("a{i}.png")), 64, 64, i);
        std::fs::write(img.join(format!("a{i}.txt")), format!("ohwx, red, tag{i}")).unwrap();
    }
    png(&img.join("wide.png"), 96, 64, 7);
    for i in 0..2 {
        png(&reg.join(format!("c{i}.png")), 64, 64, 20 + i);
    }
    d
}

/// The overfit set of the learning tests: one 64x64 image, `10_ohwx`, "ohwx, red".
fn one_image_set() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("10_ohwx");
    std::fs::create_dir_all(&img).unwrap();
    png(&img.join("a.png"), 64, 64, 3);
    std::fs::write(img.join("a.txt"), "ohwx, red").unwrap();
    d
}

const TINY: &[&str] = &[
    "--resolution",
    "64",
    "--min-bucket-reso",
    "32",
    "--max-bucket-reso",
    "128",
    "--bucket-reso-steps",
    "32",
    "--seed",
    "1",
];

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sdkit(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_sdkit"))
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn train(data: &Path, out: &Path, extra: &[&str]) -> Run {
    train_method("lora", data, out, extra)
}

/// `sdkit train METHOD` on the tiny model with the tiny buckets.
fn train_method(method: &str, data: &Path, out: &Path, extra: &[&str]) -> Run {
    let m = model();
    let mut args = vec![
        "train",
        method,
        "--model",
        m.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--output-name",
        "t",
    ];
    args.extend_from_slice(TINY);
    let dev = common::device_arg();
    args.extend_from_slice(&["--device", &dev]);
    args.extend_from_slice(extra);
    sdkit(&args)
}

fn read_lora(p: &Path) -> (BTreeMap<String, Tensor>, BTreeMap<String, String>) {
    sdkit::formats::safetensors::read_with_metadata(p).unwrap()
}

#[test]
fn dry_run_plans_repeats_reg_balance_buckets_and_steps() {
    let d = dataset();
    let out = tempfile::tempdir().unwrap();
    let r = train(
        d.path(),
        out.path(),
        &[
            "--dry-run",
            "--json",
            "--max-train-epochs",
            "3",
            "--batch-size",
            "2",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let p: Value = serde_json::from_str(&r.stdout).unwrap();
    // 4 images x 5 repeats = 20 train samples; 2 reg images balanced to 20.
    assert_eq!(p["train_samples"], 20);
    assert_eq!(p["reg_samples"], 20);
    assert_eq!(p["batches_per_epoch"], 20);
    assert_eq!(p["total_steps"], 60);
    assert_eq!(p["epochs"], 3);
    assert_eq!(p["buckets"][0][0], serde_json::json!([64, 64]));
    assert_eq!(p["unet_modules"], 48);
    assert_eq!(p["text_encoder_modules"], 12);
    assert!(p["memory_estimate_gb"].as_f64().unwrap() >= 0.0);
    assert_eq!(
        std::fs::read_dir(out.path()).unwrap().count(),
        0,
        "a dry run writes nothing"
    );
}

/// Mean loss over fixed timesteps and noise of the training images, with the LoRA file
/// merged (or none): what the model learned, free of the training noise.
fn held_out_loss(lora: Option<&Path>, data: &Path) -> f32 {
    held_out_loss_with(data, |m| {
        if let Some(p) = lora {
            let (t, _) = read_lora(p);
            let a = sdkit::adapters::lora::merge_into(&t, &mut m.unet, &mut m.clip, 1.0).unwrap();
            assert!(a.unknown.is_empty());
        }
    })
}

/// The same with any change `adapt` makes to the loaded model.
fn held_out_loss_with(data: &Path, adapt: impl FnOnce(&mut Models)) -> f32 {
    let ck = loader::open(&model(), &LoadOptions::default()).unwrap();
    let mut m = Models::new(ck).unwrap();
    adapt(&mut m);
    let ds = sdkit::train::data::load(
        data,
        None,
        &sdkit::train::data::DataOptions {
            buckets: sdkit::dataset::bucket::BucketSpec {
                resolution: (64, 64),
                min_bucket: 32,
                max_bucket: 128,
                step: 32,
                no_upscale: false,
            },
            caption_extension: ".txt".into(),
        },
    )
    .unwrap();
    let sched = sdkit::model::schedule::DdpmSchedule::default();
    let dev = Device::Cpu;
    let mut total = 0f32;
    let mut n = 0;
    for (i, item) in ds.items.iter().enumerate() {
        let img = sdkit::train::latents::load_image(item, false).unwrap();
        let x = sdkit::model::vae::image_to_tensor(&img, &dev).unwrap();
        let x0 = (m.vae.encode(&x).unwrap().mode() * 0.18215).unwrap();
        let ctx = sdkit::train::run::encode_captions(
            &m.clip,
            std::slice::from_ref(&item.caption),
            75,
            sdkit::model::pipeline::pad_for(m.info.arch),
            1,
            &dev,
        )
        .unwrap();
        for (k, t) in [100usize, 300, 500, 700, 900].into_iter().enumerate() {
            let mut r = Rng::new(1000 + (i * 10 + k) as u64);
            let noise = Tensor::from_vec(r.normals(x0.elem_count()), x0.dims(), &dev).unwrap();
            let noisy = sched.add_noise(&x0, &noise, &[t]).unwrap();
            let tt = Tensor::new(&[t as f32], &dev).unwrap();
            let pred = m.unet.forward(&noisy, &tt, &ctx).unwrap();
            let l = (pred - noise).unwrap().sqr().unwrap().mean_all().unwrap();
            total += l.to_scalar::<f32>().unwrap();
            n += 1;
        }
    }
    total / n as f32
}

/// A short run on a tiny overfit set: the file is kohya's, the loss on fixed noise falls,
/// TensorBoard records every step, epoch saves are named like kohya's.
#[test]
fn trains_a_lora_that_learns_and_loads() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let logs = out.path().join("logs");
    let prompts = d.path().join("prompts.txt");
    std::fs::write(
        &prompts,
        "# kohya format\nohwx, red --n blurry --w 32 --h 32 --s 2 --d 5\n",
    )
    .unwrap();
    let r = train(
        d.path(),
        out.path(),
        &[
            "--sample-prompts",
            prompts.to_str().unwrap(),
            "--sample-every-n-epochs",
            "3",
            "--max-train-epochs",
            "3",
            "--learning-rate",
            "3e-3",
            "--network-dim",
            "4",
            "--network-alpha",
            "4",
            "--save-every-n-epochs",
            "1",
            "--save-last-n",
            "1",
            "--logging-dir",
            logs.to_str().unwrap(),
            "--cache-latents",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rep["steps"], 30);
    // Each step's wall time, for scripts that want more than the mean.
    let times = rep["step_seconds"].as_array().unwrap();
    assert_eq!(times.len(), 30);
    assert!(times.iter().all(|t| t.as_f64().is_some_and(|t| t > 0.0)));
    // One sample image after epoch 3, kohya's name, webui's parameters.
    let samples = rep["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1, "{samples:?}");
    let sp = PathBuf::from(samples[0].as_str().unwrap());
    let sname = sp.file_name().unwrap().to_string_lossy().into_owned();
    assert!(sname.starts_with("t_e000003_00_"), "{sname}");
    assert_eq!(sp.parent().unwrap(), out.path().join("sample"));
    let info = sdkit::formats::png_params::read_parameters(&sp)
        .unwrap()
        .unwrap();
    let info = sdkit::formats::png_params::parse(&info);
    assert_eq!(info.prompt, "ohwx, red");
    assert_eq!(info.negative, "blurry");
    assert_eq!(info.get("Seed"), Some("5"));
    assert_eq!(image::open(&sp).unwrap().width(), 32);
    let final_file = out.path().join("t.safetensors");
    // Epoch saves: t-000001 then t-000002; --save-last-n 1 keeps the newest only.
    assert!(!out.path().join("t-000001.safetensors").exists());
    assert!(out.path().join("t-000002.safetensors").is_file());
    let (tensors, meta) = read_lora(&final_file);
    assert_eq!(tensors.len(), 60 * 3);
    assert!(
        tensors
            .keys()
            .all(|k| k.starts_with("lora_unet_") || k.starts_with("lora_te_text_model_"))
    );
    assert_eq!(meta["ss_network_module"], "networks.lora");
    assert_eq!(meta["ss_network_dim"], "4");
    assert_eq!(meta["ss_network_alpha"], "4.0");
    assert_eq!(meta["ss_num_train_images"], "10");
    assert_eq!(meta["ss_steps"], "30");
    assert_eq!(meta["ss_epoch"], "3");
    assert_eq!(meta["ss_seed"], "1");
    assert_eq!(meta["ss_v2"], "False");
    assert_eq!(meta["ss_base_model_version"], "sd_v1");
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1/lora");
    let freq: Value = serde_json::from_str(&meta["ss_tag_frequency"]).unwrap();
    assert_eq!(freq["10_ohwx"]["ohwx"], 1);
    // kohya's hash: sha256 of the data region of the file written with ss_* keys only.
    let ss: BTreeMap<String, String> = meta
        .iter()
        .filter(|(k, _)| k.starts_with("ss_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let list: Vec<(String, Tensor)> = tensors.clone().into_iter().collect();
    let bytes = sdkit::formats::safetensors::serialize(&list, &ss).unwrap();
    let (h, _) = sdkit::formats::kohya_lora::addnet_hashes(&bytes);
    assert_eq!(meta["sshs_model_hash"], h);

    let before = held_out_loss(None, d.path());
    let after = held_out_loss(Some(&final_file), d.path());
    eprintln!("held-out loss: base {before:.4}, with LoRA {after:.4}");
    assert!(
        after < 0.9 * before,
        "loss did not fall: {before} -> {after}"
    );

    // TensorBoard: one loss/current per step (records framed and CRC-checked by the
    // writer's own unit test; here: the count of step events).
    let run_dir = std::fs::read_dir(&logs)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let ev = std::fs::read_dir(&run_dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let bytes = std::fs::read(ev).unwrap();
    let needle = b"loss/current";
    let count = bytes.windows(needle.len()).filter(|w| w == needle).count();
    assert_eq!(count, 30);
}

/// Resuming from a mid-run state gives the same final weights as the uninterrupted run
/// (AdamW; Prodigy, whose step-size estimate is part of the state; Adafactor with kohya's
/// usual arguments and in its relative-step mode; AdamW8bit with its 8-bit moments, made
/// to cover this small model's factors by `min_8bit_size`). The file names the optimizer
/// as kohya does.
#[test]
fn resume_continues_exactly() {
    resume_case(&["--learning-rate", "1e-3"]);
    resume_case(&["--optimizer", "prodigy", "--learning-rate", "1.0"]);
    let kohya = "scale_parameter=False relative_step=False warmup_init=False";
    let mut adafactor = vec!["--optimizer", "adafactor", "--learning-rate", "1e-3"];
    adafactor.extend(["--optimizer-args"]);
    adafactor.extend(kohya.split(' '));
    let meta = resume_case(&adafactor);
    assert_eq!(
        meta["ss_optimizer"],
        format!(
            "transformers.optimization.Adafactor({})",
            kohya.replace(' ', ",")
        )
    );
    resume_case(&["--optimizer", "adafactor", "--learning-rate", "0"]);
    let meta = resume_case(&[
        "--optimizer",
        "AdamW8bit",
        "--learning-rate",
        "1e-3",
        "--optimizer-args",
        "min_8bit_size=64",
    ]);
    assert_eq!(
        meta["ss_optimizer"],
        "bitsandbytes.optim.adamw.AdamW8bit(min_8bit_size=64)"
    );
}

/// Runs six steps whole and resumed from step 3; returns the file's metadata.
fn resume_case(optimizer: &[&str]) -> BTreeMap<String, String> {
    let d = dataset();
    let a = tempfile::tempdir().unwrap();
    let mut common_args = vec![
        "--max-train-steps",
        "6",
        "--batch-size",
        "2",
        "--shuffle-caption",
        "--flip-aug",
        "--caption-tag-dropout-rate",
        "0.3",
        "--lr-scheduler",
        "cosine",
        "--network-dropout",
        "0.1",
    ];
    common_args.extend_from_slice(optimizer);
    let mut full = common_args.to_vec();
    full.extend(["--save-every-n-steps", "3", "--save-state"]);
    let r = train(d.path(), a.path(), &full);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let state = a.path().join("t-step00000003-state");
    assert!(state.join("state.json").is_file());
    let b = tempfile::tempdir().unwrap();
    let mut resumed = common_args.to_vec();
    resumed.extend(["--resume", state.to_str().unwrap()]);
    let r = train(d.path(), b.path(), &resumed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (ta, ma) = read_lora(&a.path().join("t.safetensors"));
    let (tb, mb) = read_lora(&b.path().join("t.safetensors"));
    assert_eq!(ma["ss_steps"], "6");
    assert_eq!(mb["ss_steps"], "6");
    for (k, t) in &ta {
        assert_eq!(
            common::rel_err(t, &tb[k], 1e-12),
            0.0,
            "{k} differs after resume"
        );
    }
    // A state of another network shape is refused before any work.
    let c = tempfile::tempdir().unwrap();
    let mut other = common_args.to_vec();
    other.extend(["--resume", state.to_str().unwrap(), "--network-dim", "8"]);
    let r = train(d.path(), c.path(), &other);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("network"), "{}", r.stderr);
    ma
}

/// `--mixed-precision fp16` (frozen weights in f16, adapter in f32, as kohya): the loss
/// falls as in f32; the file is f32 unless `--save-precision` says otherwise (kohya).
#[test]
fn mixed_precision_fp16_learns() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let args = [
        "--max-train-steps",
        "8",
        "--learning-rate",
        "1e-2",
        "--network-dim",
        "4",
        "--network-alpha",
        "4",
        "--mixed-precision",
        "fp16",
        "--cache-latents",
    ];
    let r = train(d.path(), out.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let file = out.path().join("t.safetensors");
    let (tensors, meta) = read_lora(&file);
    assert_eq!(meta["ss_mixed_precision"], "fp16");
    assert!(tensors.values().all(|t| t.dtype() == DType::F32));
    let before = held_out_loss(None, d.path());
    let after = held_out_loss(Some(&file), d.path());
    eprintln!("fp16 held-out loss: base {before:.4}, with LoRA {after:.4}");
    assert!(
        after < 0.9 * before,
        "loss did not fall: {before} -> {after}"
    );

    let out = tempfile::tempdir().unwrap();
    let mut half = args.to_vec();
    half.extend(["--max-train-steps", "1", "--save-precision", "fp16"]);
    let r = train(d.path(), out.path(), &half);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (tensors, _) = read_lora(&out.path().join("t.safetensors"));
    assert!(tensors.values().all(|t| t.dtype() == DType::F16));
}

/// `sdkit train hypernetwork`: the shared loop with a webui hypernetwork; the `.pt` loads
/// back with webui's keys and step, the loss on fixed noise falls with it attached, and a
/// resumed run ends on the same weights.
#[test]
fn trains_a_hypernetwork_that_learns_and_resumes() {
    let d = one_image_set();
    let hn = |data: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec!["--learning-rate", "2e-2", "--activation-func", "relu"];
        args.extend_from_slice(extra);
        let r = train_method("hypernetwork", data, out, &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let out = tempfile::tempdir().unwrap();
    hn(
        d.path(),
        out.path(),
        &[
            "--max-train-steps",
            "30",
            "--save-every-n-steps",
            "10",
            "--save-state",
        ],
    );
    let file = out.path().join("t.pt");
    let net = sdkit::adapters::hypernetwork::Hypernetwork::load(&file, &Device::Cpu).unwrap();
    assert_eq!(net.meta.name, "t");
    assert_eq!(net.meta.step, 30);
    assert!(out.path().join("t-step00000010.pt").is_file());
    // One k/v pair per attention context width of the model (the tiny one: 32 only).
    let ck = loader::open(&model(), &LoadOptions::default()).unwrap();
    let widths: Vec<usize> = net.modules.iter().map(|(w, _)| *w).collect();
    assert_eq!(
        widths,
        sdkit::adapters::hypernetwork::default_widths(&Models::new(ck).unwrap().unet.config)
    );

    // The loss on fixed noise falls with the network attached (strength 1).
    let before = held_out_loss(None, d.path());
    let after = held_out_loss_with(d.path(), |m| net.attach(&mut m.unet, 1.0));
    eprintln!("hypernetwork held-out loss: base {before:.4}, with network {after:.4}");
    assert!(
        after < 0.95 * before,
        "loss did not fall: {before} -> {after}"
    );

    // Resume from the step-10 state: the same final weights.
    let out2 = tempfile::tempdir().unwrap();
    let state = out.path().join("t-step00000010-state");
    hn(
        d.path(),
        out2.path(),
        &[
            "--max-train-steps",
            "30",
            "--resume",
            state.to_str().unwrap(),
        ],
    );
    let resumed =
        sdkit::adapters::hypernetwork::Hypernetwork::load(&out2.path().join("t.pt"), &Device::Cpu)
            .unwrap();
    let a: BTreeMap<String, Tensor> = net.tensors().unwrap().into_iter().collect();
    for (k, t) in resumed.tensors().unwrap() {
        assert_eq!(
            common::rel_err(&t, &a[&k], 1e-12),
            0.0,
            "{k} differs after resume"
        );
    }
}

/// `sdkit train textual-inversion`: the shared loop with new token vectors; the file is
/// kohya's `emb_params`, its name (the file stem) in a caption lowers the loss on fixed
/// noise, and a resumed run ends on the same vectors.
#[test]
fn trains_an_embedding_that_learns_and_resumes() {
    let d = one_image_set();
    let ti = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--output-name",
            "ohwx",
            "--learning-rate",
            "0.5",
            "--init-word",
            "red",
            "--num-vectors-per-token",
            "2",
            "--max-train-steps",
            "30",
        ];
        args.extend_from_slice(extra);
        let r = train_method("textual-inversion", d.path(), out, &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    let out = tempfile::tempdir().unwrap();
    ti(out.path(), &["--save-every-n-steps", "10", "--save-state"]);
    let file = out.path().join("ohwx.safetensors");
    let (tensors, meta) = read_lora(&file);
    assert_eq!(tensors["emb_params"].dims(), &[2, 32]);
    assert_eq!(
        meta["modelspec.architecture"],
        "stable-diffusion-v1/textual-inversion"
    );
    let emb = sdkit::adapters::embedding::Embedding::load(&file).unwrap();
    assert_eq!(emb.name, "ohwx");
    // Against the same word with its initial vectors (webui's init from "red"): the
    // trained vectors lower the loss on fixed noise. The tiny model's UNet depends little
    // on its 32-wide text states, so the gain is small but systematic.
    let with = |vectors: Option<Tensor>| {
        let mut e = emb.clone();
        held_out_loss_with(d.path(), |m| {
            if let Some(v) = vectors {
                e.vectors = v;
            } else {
                let tok = sdkit::model::tokenizer::ClipTokenizer::shared();
                let init =
                    sdkit::adapters::embedding::Embedding::init(&m.clip, tok, "red", 2, "ohwx");
                e.vectors = init.unwrap().vectors;
            }
            sdkit::adapters::embedding::attach(&mut m.clip, std::slice::from_ref(&e)).unwrap()
        })
    };
    let (before, after) = (with(None), with(Some(emb.vectors.clone())));
    eprintln!("embedding held-out loss: initial vectors {before:.4}, trained {after:.4}");
    assert!(after < before, "loss did not fall: {before} -> {after}");

    let out2 = tempfile::tempdir().unwrap();
    let state = out.path().join("ohwx-step00000010-state");
    ti(out2.path(), &["--resume", state.to_str().unwrap()]);
    let (resumed, _) = read_lora(&out2.path().join("ohwx.safetensors"));
    assert_eq!(
        common::rel_err(&resumed["emb_params"], &tensors["emb_params"], 1e-12),
        0.0,
        "resumed vectors differ"
    );
}

/// Every tensor of a checkpoint file, by component and diffusers name (f32).
fn components(p: &Path) -> [BTreeMap<String, Tensor>; 3] {
    let ck = loader::open(p, &LoadOptions::default()).unwrap();
    [ck.unet, ck.vae, ck.text_encoder].map(|w| w.snapshot().into_iter().collect())
}

/// Largest difference over the tensors two maps share (they must have the same keys).
fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f32 {
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "different tensors"
    );
    a.iter()
        .map(|(k, t)| common::max_abs_diff(t, &b[k]))
        .fold(0.0, f32::max)
}

fn dreambooth(data: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["--learning-rate", "2e-4", "--max-train-steps", "6"];
    args.extend_from_slice(extra);
    let r = train_method("dreambooth", data, out, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

/// `sdkit train dreambooth`: the UNet itself trains; the single file loads back in
/// sdkit's loader with the trained UNet, the base VAE and text encoder, lowers the loss
/// on fixed noise; a resumed run ends on the same weights.
#[test]
fn dreambooth_learns_saves_a_checkpoint_and_resumes() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    dreambooth(
        d.path(),
        out.path(),
        &["--save-every-n-steps", "3", "--save-state"],
    );
    let file = out.path().join("t.safetensors");
    let (raw, meta) = read_lora(&file);
    assert_eq!(meta["modelspec.architecture"], "stable-diffusion-v1");
    assert_eq!(meta["ss_training_method"], "dreambooth");
    assert!(
        raw.keys()
            .any(|k| k.starts_with("model.diffusion_model.input_blocks."))
    );
    assert!(
        raw.keys()
            .any(|k| k.starts_with("first_stage_model.decoder."))
    );
    assert!(
        raw.keys()
            .any(|k| k.starts_with("cond_stage_model.transformer.text_model."))
    );
    let [unet, vae, te] = components(&file);
    let base_ck = loader::open(&model(), &LoadOptions::default()).unwrap();
    let [bu, bv, bt] = [base_ck.unet, base_ck.vae, base_ck.text_encoder]
        .map(|w| w.snapshot().into_iter().collect::<BTreeMap<_, _>>());
    assert!(max_diff(&unet, &bu) > 1e-4, "the UNet did not change");
    assert_eq!(max_diff(&vae, &bv), 0.0, "the VAE changed");
    assert_eq!(max_diff(&te, &bt), 0.0, "the frozen text encoder changed");

    let before = held_out_loss(None, d.path());
    let after = held_out_loss_with(d.path(), |m| {
        *m = Models::new(loader::open(&file, &LoadOptions::default()).unwrap()).unwrap()
    });
    eprintln!("dreambooth held-out loss: base {before:.4}, trained {after:.4}");
    assert!(after < before, "loss did not fall: {before} -> {after}");

    let out2 = tempfile::tempdir().unwrap();
    let state = out.path().join("t-step00000003-state");
    dreambooth(
        d.path(),
        out2.path(),
        &["--resume", state.to_str().unwrap()],
    );
    let [u2, _, _] = components(&out2.path().join("t.safetensors"));
    assert_eq!(max_diff(&u2, &unet), 0.0, "resumed weights differ");
}

/// `--stop-text-encoder-training 2`: the text encoder trains for two steps, then stays
/// as it was while the UNet goes on.
#[test]
fn dreambooth_trains_the_text_encoder_until_told_to_stop() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    dreambooth(
        d.path(),
        out.path(),
        &[
            "--stop-text-encoder-training",
            "2",
            "--text-encoder-lr",
            "1e-3",
            "--max-train-steps",
            "4",
            "--save-every-n-steps",
            "2",
        ],
    );
    let [u2, _, te2] = components(&out.path().join("t-step00000002.safetensors"));
    let [u4, _, te4] = components(&out.path().join("t.safetensors"));
    let base = loader::open(&model(), &LoadOptions::default()).unwrap();
    let bt: BTreeMap<_, _> = base.text_encoder.snapshot().into_iter().collect();
    assert!(max_diff(&te2, &bt) > 1e-4, "the text encoder did not train");
    assert_eq!(
        max_diff(&te4, &te2),
        0.0,
        "the text encoder trained past step 2"
    );
    assert!(max_diff(&u4, &u2) > 0.0, "the UNet stopped too");
}

/// `--fused-backward-pass` (kohya's): each UNet weight is updated inside the backward.
/// Without clipping it trains the weights of the unfused step, with the staged blocks and
/// with recomputed ones (`--gradient-checkpointing`), the text encoder (outside the
/// blocks) too; with clipping, each weight's gradient is clipped on its own, as in kohya;
/// what it cannot do is a one-line error.
#[test]
fn dreambooth_fused_backward_pass() {
    let d = one_image_set();
    let run = |extra: &[&str]| {
        let out = tempfile::tempdir().unwrap();
        let mut args = vec!["--max-train-steps", "2", "--train-text-encoder"];
        args.extend_from_slice(extra);
        dreambooth(d.path(), out.path(), &args);
        let [u, _, te] = components(&out.path().join("t.safetensors"));
        (u, te)
    };
    let base = loader::open(&model(), &LoadOptions::default()).unwrap();
    let [bu, bt] = [base.unet, base.text_encoder]
        .map(|w| w.snapshot().into_iter().collect::<BTreeMap<_, _>>());
    let fused = ["--fused-backward-pass"];
    for opt in [
        &["--optimizer", "adamw", "--max-grad-norm", "0"][..],
        &["--optimizer", "adamw8bit", "--max-grad-norm", "0"],
        &["--optimizer", "adafactor", "--max-grad-norm", "0"],
    ] {
        let (u, te) = run(opt);
        let (fu, fte) = run(&[opt, &fused[..]].concat());
        assert!(max_diff(&u, &bu) > 1e-4, "{opt:?}: the UNet did not train");
        assert!(
            max_diff(&te, &bt) > 1e-6,
            "{opt:?}: the text encoder did not train"
        );
        assert_eq!(max_diff(&fu, &u), 0.0, "{opt:?}: fused UNet differs");
        assert_eq!(
            max_diff(&fte, &te),
            0.0,
            "{opt:?}: fused text encoder differs"
        );
    }
    // Recomputed blocks give the same gradients up to summation order.
    let sgd = [
        "--optimizer",
        "sgd",
        "--learning-rate",
        "1",
        "--max-grad-norm",
        "0",
    ];
    let (u, _) = run(&sgd);
    let (fu, _) = run(&[&sgd[..], &fused, &["--gradient-checkpointing"]].concat());
    let moved = max_diff(&u, &bu);
    assert!(moved > 1e-3, "SGD did not train: {moved}");
    assert!(
        max_diff(&fu, &u) < moved * 1e-4,
        "recomputed + fused differ"
    );

    // One SGD step of rate 1 clipped to 1e-3: fused, each weight moves by at most 1e-3
    // (L2), and every weight with a larger gradient by exactly that; unfused, all of
    // them together do.
    let clipped = [
        "--optimizer",
        "sgd",
        "--learning-rate",
        "1",
        "--max-grad-norm",
        "1e-3",
        "--max-train-steps",
        "1",
    ];
    let norms = |u: &BTreeMap<String, Tensor>| -> Vec<f64> {
        u.iter()
            .map(|(k, t)| {
                let d = (t - &bu[k]).unwrap().to_dtype(DType::F64).unwrap();
                d.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    .sqrt()
            })
            .collect()
    };
    let (fu, _) = run(&[&clipped[..], &fused].concat());
    let n = norms(&fu);
    assert!(n.iter().all(|&x| x < 1.001e-3), "{n:?}");
    let at_limit = n.iter().filter(|&&x| x > 0.999e-3).count();
    assert!(at_limit > 10, "{at_limit} weights at the limit: {n:?}");
    let (u, _) = run(&clipped);
    let total = norms(&u).iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(total < 1.001e-3, "unfused total {total}");

    for (extra, want) in [
        (
            &["--gradient-accumulation-steps", "2"][..],
            "--gradient-accumulation-steps",
        ),
        (
            &["--optimizer", "prodigy", "--learning-rate", "1"],
            "prodigy",
        ),
    ] {
        let out = tempfile::tempdir().unwrap();
        let r = train_method(
            "dreambooth",
            d.path(),
            out.path(),
            &[extra, &fused[..]].concat(),
        );
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert!(r.stderr.contains(want), "{}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
}

/// `--class-prompt`: the missing class images are generated into REG/1_<prompt>/ with
/// their captions, counted by `--dry-run`, trained on as regularisation images; a rerun
/// with a larger count adds only the missing ones.
#[test]
fn dreambooth_generates_class_images_once() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let class = [
        "--class-prompt",
        "a photo of a cat",
        "--class-steps",
        "2",
        "--max-train-steps",
        "1",
    ];
    let plan = train_method(
        "dreambooth",
        d.path(),
        out.path(),
        &[
            &class[..],
            &["--num-class-images", "2", "--dry-run", "--json"],
        ]
        .concat(),
    );
    assert_eq!(plan.code, 0, "{}", plan.stderr);
    let p: Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(p["class_images_to_generate"], 2);
    let dir = out.path().join("class_images/1_a photo of a cat");
    assert!(!dir.exists(), "a dry run generates nothing");

    dreambooth(
        d.path(),
        out.path(),
        &[&class[..], &["--num-class-images", "2"]].concat(),
    );
    let names = |dir: &Path| {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(&dir),
        ["000000.png", "000000.txt", "000001.png", "000001.txt"]
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("000001.txt")).unwrap(),
        "a photo of a cat"
    );
    let img = image::open(dir.join("000000.png")).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    let first = std::fs::read(dir.join("000000.png")).unwrap();

    // The reg images were part of the run: the plan of the same options counts them.
    let plan = train_method(
        "dreambooth",
        d.path(),
        out.path(),
        &[
            &class[..],
            &["--num-class-images", "2", "--dry-run", "--json"],
        ]
        .concat(),
    );
    let p: Value = serde_json::from_str(&plan.stdout).unwrap();
    assert_eq!(p["class_images_to_generate"], 0);
    assert_eq!(p["reg_samples"], 10, "{p}");

    dreambooth(
        d.path(),
        out.path(),
        &[&class[..], &["--num-class-images", "3"]].concat(),
    );
    assert_eq!(names(&dir).len(), 6);
    assert_eq!(
        std::fs::read(dir.join("000000.png")).unwrap(),
        first,
        "an existing class image was rewritten"
    );
}

/// webui's step-rate syntax: `0.05:2, 0.0:-1` trains at 0.05 for steps 1-2 and at 0
/// after (the vectors change in steps 1 and 2, then stay); `--save-format pt` writes
/// webui's `.pt` for the step saves and the final file, each with its `step`. A schedule
/// that ends stops the run there (webui), dry runs show it, and it comes from recipes
/// too; `--save-format diffusers` writes `{name: vectors}`.
#[test]
fn textual_inversion_step_rates_and_save_formats() {
    let d = one_image_set();
    let out = tempfile::tempdir().unwrap();
    let ti = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--output-name",
            "ohwx",
            "--init-word",
            "red",
            "--num-vectors-per-token",
            "2",
        ];
        args.extend_from_slice(extra);
        train_method("textual-inversion", d.path(), out, &args)
    };
    let r = ti(
        out.path(),
        &[
            "--learning-rate",
            "0.05:2, 0.0:-1",
            "--max-train-steps",
            "4",
            "--save-every-n-steps",
            "1",
            "--save-format",
            "pt",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let step_file = |s: u64| out.path().join(format!("ohwx-step{s:08}.pt"));
    let files = [
        step_file(1),
        step_file(2),
        step_file(3),
        out.path().join("ohwx.pt"),
    ];
    let mut vectors = Vec::new();
    for (i, f) in files.iter().enumerate() {
        let v = sdkit::formats::torch_pt::load(f).unwrap();
        assert_eq!(v.get_str("step").unwrap().as_int(), Some(i as i64 + 1));
        assert_eq!(
            v.get_str("name").unwrap().as_str(),
            f.file_stem().unwrap().to_str()
        );
        // The model is a diffusers folder: no file to hash, its name.
        assert!(matches!(
            v.get_str("sd_checkpoint"),
            Some(sdkit::formats::torch_pt::Value::None)
        ));
        assert_eq!(
            v.get_str("sd_checkpoint_name").unwrap().as_str(),
            Some("sd1_diffusers")
        );
        vectors.push(
            sdkit::adapters::embedding::Embedding::load(f)
                .unwrap()
                .vectors,
        );
    }
    let init = {
        let opts = LoadOptions {
            device: Device::Cpu,
            ..LoadOptions::default()
        };
        let m = Models::new(loader::open(&model(), &opts).unwrap()).unwrap();
        let tok = sdkit::model::tokenizer::ClipTokenizer::shared();
        sdkit::adapters::embedding::Embedding::init(&m.clip, tok, "red", 2, "ohwx")
            .unwrap()
            .vectors
    };
    let moved = common::max_abs_diff;
    // Adam moves each element by about the rate in its first steps.
    assert!(moved(&init, &vectors[0]) > 0.01, "step 1 did not train");
    assert!(
        moved(&vectors[0], &vectors[1]) > 0.01,
        "step 2 did not train"
    );
    assert_eq!(
        moved(&vectors[1], &vectors[2]),
        0.0,
        "step 3 trained at rate 0"
    );
    assert_eq!(
        moved(&vectors[2], &vectors[3]),
        0.0,
        "step 4 trained at rate 0"
    );

    // A schedule with an end: the run stops there (the final file says step 3), and
    // rates beyond --max-train-steps are never reached.
    let out2 = tempfile::tempdir().unwrap();
    let r = ti(
        out2.path(),
        &[
            "--learning-rate",
            "0.05:3",
            "--max-train-steps",
            "10",
            "--save-format",
            "diffusers",
            "--json",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(rep["steps"], 3);
    let (t, meta) = read_lora(&out2.path().join("ohwx.safetensors"));
    assert_eq!(t.keys().collect::<Vec<_>>(), ["ohwx"]);
    assert_eq!(t["ohwx"].dims(), &[2, 32]);
    assert!(
        meta.is_empty(),
        "diffusers' file carries no metadata: {meta:?}"
    );
    let plan = |method: &str, extra: &[&str]| {
        let mut args = vec!["--dry-run", "--json"];
        args.extend_from_slice(extra);
        let r = train_method(method, d.path(), out2.path(), &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        serde_json::from_str::<Value>(&r.stdout).unwrap()
    };
    let p = plan(
        "textual-inversion",
        &[
            "--learning-rate",
            "0.05:2, 0.01:30",
            "--max-train-steps",
            "5",
        ],
    );
    assert_eq!(p["total_steps"], 5);
    assert_eq!(
        p["learning_rate_steps"],
        serde_json::json!([[0.05, 1, 2], [0.01, 3, 5]])
    );
    // The same schedule from a recipe, for a hypernetwork.
    let recipe = out2.path().join("hn.yaml");
    std::fs::write(
        &recipe,
        "learning-rate: \"1e-5:5, 1e-6:7\"\nmax-train-steps: 100\n",
    )
    .unwrap();
    let p = plan("hypernetwork", &["--config", recipe.to_str().unwrap()]);
    assert_eq!(p["total_steps"], 7);
    assert_eq!(p["learning_rate"], "1e-5:5, 1e-6:7");
    let r = train_method(
        "textual-inversion",
        d.path(),
        out2.path(),
        &["--learning-rate", "0.05:2", "--lr-scheduler", "cosine"],
    );
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("replaces --lr-scheduler"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}

/// `--gradient-checkpointing` trains the same weights (recomputed blocks give the same
/// gradients up to float summation order) and says so in the metadata. SGD, because
/// Adam's first steps move every element by about the learning rate whatever the size of
/// its gradient: elements whose gradient is rounding noise would move either way.
#[test]
fn gradient_checkpointing_trains_the_same_weights() {
    let d = dataset();
    let args = [
        "--max-train-steps",
        "3",
        "--batch-size",
        "2",
        "--conv-dim",
        "2",
        "--network-dropout",
        "0.1",
        "--optimizer",
        "sgd",
        "--learning-rate",
        "10",
    ];
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let r = train(d.path(), a.path(), &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut with = args.to_vec();
    with.push("--gradient-checkpointing");
    let r = train(d.path(), b.path(), &with);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let (ta, ma) = read_lora(&a.path().join("t.safetensors"));
    let (tb, mb) = read_lora(&b.path().join("t.safetensors"));
    assert_eq!(ma["ss_gradient_checkpointing"], "False");
    assert_eq!(mb["ss_gradient_checkpointing"], "True");
    // Floor: with 32 norm groups of one channel, the time-embedding projections'
    // gradients are zero up to rounding (~1e-9) in both runs; compare them against 1% of
    // the largest factor value instead of their own noise.
    let largest = ta
        .values()
        .flat_map(|t| f32s(t))
        .fold(0f32, |m, v| m.max(v.abs()));
    let mut moved = 0;
    for (k, t) in &ta {
        let e = common::rel_err(&tb[k], t, largest * 1e-2);
        assert!(e < 1e-4, "{k}: rel err {e}");
        if k.ends_with("lora_up.weight") && f32s(t).iter().any(|v| *v != 0.0) {
            moved += 1;
        }
    }
    assert!(moved > 0, "training changed the up factors");
}

/// kill -9 at any moment of a run that saves every step leaves every `.safetensors` in
/// the output folder complete.
#[test]
fn kill_during_saves_leaves_complete_files() {
    let d = dataset();
    let out = tempfile::tempdir().unwrap();
    let m = model();
    let mut args: Vec<String> = [
        "train",
        "lora",
        "--model",
        m.to_str().unwrap(),
        "--data",
        d.path().to_str().unwrap(),
        "--out",
        out.path().to_str().unwrap(),
        "--output-name",
        "t",
        "--max-train-steps",
        "40",
        "--save-every-n-steps",
        "1",
        "--save-state",
        "--quiet",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(TINY.iter().map(|s| s.to_string()));
    for delay_ms in [4000u64, 6100, 8300] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sdkit"))
            .args(&args)
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        for e in std::fs::read_dir(out.path()).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") {
                let (t, meta) = read_lora(&p);
                assert!(
                    !t.is_empty() && meta.contains_key("sshs_model_hash"),
                    "{name}"
                );
            }
            if name.ends_with("-state") {
                sdkit::train::state::load(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
    }
}

#[test]
fn bad_input_is_a_one_line_error_before_any_work() {
    let d = dataset();
    let out = tempfile::tempdir().unwrap();
    let o = out.path().to_str().unwrap();
    let dd = d.path().to_str().unwrap();
    let m = model();
    let m = m.to_str().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--model", "/no/such.safetensors", "--data", dd, "--out", o],
            "/no/such.safetensors",
        ),
        (
            vec!["--model", m, "--data", "/no/such/dir", "--out", o],
            "/no/such/dir",
        ),
        (
            vec![
                "--model",
                m,
                "--data",
                dd,
                "--out",
                o,
                "--network-train-unet-only",
                "--network-train-text-encoder-only",
            ],
            "exclude each other",
        ),
        (
            vec![
                "--model",
                m,
                "--data",
                dd,
                "--out",
                o,
                "--optimizer-args",
                "foo=1",
            ],
            "unknown key",
        ),
        (
            vec![
                "--model",
                m,
                "--data",
                dd,
                "--out",
                o,
                "--mixed-precision",
                "bf16",
                "--device",
                "cpu",
            ],
            "needs --device cuda",
        ),
        (
            vec![
                "--model",
                m,
                "--data",
                dd,
                "--out",
                o,
                "--learning-rate",
                "1e-4:100, 1e-5",
            ],
            "is for textual-inversion and hypernetwork",
        ),
    ];
    for (args, want) in cases {
        let mut a = vec!["train", "lora"];
        a.extend(args);
        let r = sdkit(&a);
        assert_eq!(r.code, 2, "{a:?}: {}", r.stderr);
        assert!(r.stderr.contains(want), "{a:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    }
    let r = sdkit(&[
        "train",
        "dreambooth",
        "--model",
        m,
        "--data",
        dd,
        "--out",
        o,
        "--mixed-precision",
        "fp16",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("kept in f32"), "{}", r.stderr);

    // A value clap's parser refuses (clap's error, naming the option).
    let r = sdkit(&[
        "train",
        "lora",
        "--model",
        m,
        "--data",
        dd,
        "--out",
        o,
        "--learning-rate",
        "fast",
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("--learning-rate")
            && r.stderr.contains("\"fast\" is not a learning rate"),
        "{}",
        r.stderr
    );
    // An empty data folder.
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(empty.path().join("10_x")).unwrap();
    let r = sdkit(&[
        "train",
        "lora",
        "--model",
        m,
        "--data",
        empty.path().to_str().unwrap(),
        "--out",
        o,
    ]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("no training images"), "{}", r.stderr);
    // An unknown recipe key.
    let recipe = out.path().join("r.yaml");
    std::fs::write(&recipe, "network-dim: 8\nnetwork-rank: 4\n").unwrap();
    let r = sdkit(&[
        "train",
        "lora",
        "--config",
        recipe.to_str().unwrap(),
        "--model",
        m,
        "--data",
        dd,
        "--out",
        o,
    ]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("network-rank"), "{}", r.stderr);
    assert!(
        std::fs::read_dir(out.path()).unwrap().count() == 1,
        "nothing written"
    );
}

/// The shipped recipes parse with `train lora` (every key is an option).
#[test]
fn shipped_recipes_are_valid() {
    let d = dataset();
    let out = tempfile::tempdir().unwrap();
    for r in ["lora-character.yaml", "lora-style.yaml"] {
        let recipe = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("recipes")
            .join(r);
        let m = model();
        let res = sdkit(&[
            "train",
            "lora",
            "--config",
            recipe.to_str().unwrap(),
            "--model",
            m.to_str().unwrap(),
            "--data",
            d.path().to_str().unwrap(),
            "--out",
            out.path().to_str().unwrap(),
            "--dry-run",
            "--json",
        ]);
        assert_eq!(res.code, 0, "{r}: {}", res.stderr);
        let p: Value = serde_json::from_str(&res.stdout).unwrap();
        assert!(p["trainable_parameters"].as_u64().unwrap() > 0);
    }
}

#[allow(dead_code)]
fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
