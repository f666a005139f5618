//! The header metadata kohya sd-scripts writes into a LoRA (`ss_*` with `str(v)` values,
//! `modelspec.*` from `library/sai_model_spec.py`), so webui's and kohya's readers show
//! our files as they show kohya's.

use super::data::Dataset;
use super::options::LoraOptions;
use crate::model::arch::Arch;
use crate::model::schedule::Prediction;
use serde_json::json;
use std::collections::BTreeMap;

/// Facts of a run that the options alone do not give.
pub struct RunFacts<'a> {
    pub arch: Arch,
    pub prediction: Prediction,
    pub seed: u64,
    pub epoch: u64,
    pub steps: u64,
    pub total_steps: u64,
    pub epochs: u64,
    pub batches_per_epoch: u64,
    pub warmup_steps: u64,
    pub clip_skip: usize,
    pub started: u64,
    pub finished: u64,
    pub session_id: u64,
    pub dataset: &'a Dataset,
}

/// Python's `str()` of a bool.
fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.into()
}

fn py_opt<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "None".into())
}

/// Python's `str()` of a float (`1e-04` style for small values, `0.0001` above 1e-4).
pub fn py_float(v: f64) -> String {
    if v == 0.0 {
        return "0.0".into();
    }
    let a = v.abs();
    if !(1e-4..1e16).contains(&a) {
        // Python: 1e-05, 2.5e-06.
        let s = format!("{v:e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let e: i32 = e.parse().unwrap_or(0);
        let sign = if e < 0 { "-" } else { "+" };
        return format!("{m}e{sign}{:02}", e.abs());
    }
    let s = format!("{v}");
    if s.contains('.') { s } else { format!("{s}.0") }
}

fn base_model_version(arch: Arch, p: Prediction) -> &'static str {
    match (arch, p) {
        (Arch::Sd1, _) => "sd_v1",
        (Arch::Sd2, Prediction::VPrediction) => "sd_v2_v",
        (Arch::Sd2, Prediction::Epsilon) => "sd_v2",
    }
}

/// The SAI model spec (`library/sai_model_spec.py`) of a file: `kind` is `lora`,
/// `textual-inversion`, ... or `None` for a whole checkpoint.
pub fn modelspec(
    kind: Option<&str>,
    title: &str,
    (arch, prediction): (Arch, Prediction),
    (w, h): (usize, usize),
    unix_time: u64,
) -> BTreeMap<String, String> {
    let base = match (arch, prediction) {
        (Arch::Sd1, _) => "stable-diffusion-v1",
        (Arch::Sd2, Prediction::VPrediction) => "stable-diffusion-v2-768-v",
        (Arch::Sd2, Prediction::Epsilon) => "stable-diffusion-v2-512",
    };
    let architecture = match kind {
        Some(k) => format!("{base}/{k}"),
        None => base.to_string(),
    };
    let prediction = match prediction {
        Prediction::Epsilon => "epsilon",
        Prediction::VPrediction => "v",
    };
    [
        ("modelspec.sai_model_spec", "1.0.1".to_string()),
        ("modelspec.architecture", architecture),
        ("modelspec.implementation", "diffusers".into()),
        ("modelspec.title", title.into()),
        ("modelspec.resolution", format!("{w}x{h}")),
        ("modelspec.date", iso_date(unix_time)),
        ("modelspec.prediction_type", prediction.into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// ISO date of a unix time (UTC), for `modelspec.date`.
pub fn iso_date(t: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(t);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}")
}

/// (year, month, day, hour, minute, second) of a unix time, UTC.
pub fn civil(t: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (t / 86_400) as i64;
    let secs = t % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = if m <= 2 { y + 1 } else { y };
    (
        y,
        m,
        d,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
    )
}

/// The metadata of a LoRA file.
pub fn lora_metadata(o: &LoraOptions, f: &RunFacts) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    let ds = f.dataset;
    let (w, h) = o.resolution().unwrap_or((512, 512));
    let unet_lr = o.unet_lr.unwrap_or(o.learning_rate.base());
    let te_lr = o.text_encoder_lr.unwrap_or(o.learning_rate.base());
    put("ss_session_id", f.session_id.to_string());
    put("ss_training_started_at", f.started.to_string());
    put("ss_training_finished_at", f.finished.to_string());
    put("ss_output_name", o.output_name.clone());
    put("ss_learning_rate", py_float(o.learning_rate.base()));
    put("ss_unet_lr", py_float(unet_lr));
    put("ss_text_encoder_lr", py_float(te_lr));
    put("ss_num_train_images", ds.train_samples.to_string());
    put("ss_num_reg_images", ds.reg_samples.to_string());
    put("ss_num_batches_per_epoch", f.batches_per_epoch.to_string());
    put("ss_num_epochs", f.epochs.to_string());
    put("ss_epoch", f.epoch.to_string());
    put("ss_steps", f.steps.to_string());
    put("ss_max_train_steps", f.total_steps.to_string());
    put(
        "ss_gradient_checkpointing",
        py_bool(o.gradient_checkpointing),
    );
    put(
        "ss_gradient_accumulation_steps",
        o.gradient_accumulation_steps.to_string(),
    );
    put("ss_lr_warmup_steps", f.warmup_steps.to_string());
    put("ss_lr_scheduler", o.lr_scheduler.name().into());
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", o.network_dim.to_string());
    put("ss_network_alpha", py_float(o.network_alpha));
    let args = match o.conv_dim {
        Some(c) => json!({"conv_dim": c.to_string(), "conv_alpha": py_float(o.conv_alpha)}),
        None => json!({}),
    };
    put("ss_network_args", args.to_string());
    put(
        "ss_network_dropout",
        py_opt(o.network_dropout.map(py_float)),
    );
    put(
        "ss_mixed_precision",
        format!("{:?}", o.mixed_precision).to_lowercase(),
    );
    put("ss_full_fp16", py_bool(false));
    put("ss_v2", py_bool(f.arch == Arch::Sd2));
    put(
        "ss_base_model_version",
        base_model_version(f.arch, f.prediction).into(),
    );
    put("ss_clip_skip", f.clip_skip.to_string());
    put("ss_max_token_length", o.max_token_length.to_string());
    put(
        "ss_cache_latents",
        py_bool(o.cache_latents || o.cache_latents_to_disk),
    );
    put("ss_seed", f.seed.to_string());
    put("ss_lowram", py_bool(false));
    put("ss_noise_offset", py_float(o.noise_offset));
    put("ss_multires_noise_iterations", "None".into());
    put("ss_multires_noise_discount", "0.3".into());
    put("ss_adaptive_noise_scale", "None".into());
    put("ss_zero_terminal_snr", py_bool(false));
    put("ss_training_comment", "trained with sdkit".into());
    put("ss_sd_scripts_commit_hash", "(unknown)".into());
    put("ss_max_grad_norm", py_float(o.max_grad_norm));
    put("ss_caption_dropout_rate", py_float(o.caption_dropout_rate));
    put("ss_caption_dropout_every_n_epochs", "0".into());
    put(
        "ss_caption_tag_dropout_rate",
        py_float(o.caption_tag_dropout_rate),
    );
    put("ss_face_crop_aug_range", "None".into());
    put("ss_prior_loss_weight", py_float(o.prior_loss_weight));
    put("ss_min_snr_gamma", py_opt(o.min_snr_gamma.map(py_float)));
    put("ss_scale_weight_norms", "None".into());
    put("ss_ip_noise_gamma", "None".into());
    put("ss_debiased_estimation", py_bool(false));
    put("ss_noise_offset_random_strength", py_bool(false));
    put("ss_ip_noise_gamma_random_strength", py_bool(false));
    put("ss_loss_type", format!("{:?}", o.loss_type).to_lowercase());
    put(
        "ss_huber_schedule",
        format!("{:?}", o.huber_schedule).to_lowercase(),
    );
    put("ss_huber_c", py_float(o.huber_c));
    put("ss_optimizer", {
        let mut s = o.optimizer.kohya_name().to_string();
        if !o.optimizer_args.is_empty() {
            s.push('(');
            s.push_str(&o.optimizer_args.join(","));
            s.push(')');
        }
        s
    });
    put("ss_batch_size_per_device", o.batch_size.to_string());
    put(
        "ss_total_batch_size",
        (o.batch_size as u64 * o.gradient_accumulation_steps).to_string(),
    );
    put("ss_resolution", format!("({w}, {h})"));
    put("ss_color_aug", py_bool(false));
    put("ss_flip_aug", py_bool(o.flip_aug));
    put("ss_random_crop", py_bool(false));
    put("ss_shuffle_caption", py_bool(o.shuffle_caption));
    put("ss_enable_bucket", py_bool(true));
    put("ss_bucket_no_upscale", py_bool(o.bucket_no_upscale));
    put("ss_min_bucket_reso", o.min_bucket_reso.to_string());
    put("ss_max_bucket_reso", o.max_bucket_reso.to_string());
    put("ss_keep_tokens", o.keep_tokens.to_string());
    let mut buckets = serde_json::Map::new();
    let mut hist = serde_json::Map::new();
    for (i, ((bw, bh), n)) in ds.bucket_counts().into_iter().enumerate() {
        buckets.insert(i.to_string(), json!({"resolution": [bw, bh], "count": n}));
        hist.insert(format!("{bw}x{bh}"), json!(n));
    }
    put(
        "ss_bucket_info",
        json!({"buckets": buckets, "mean_img_ar_error": 0.0}).to_string(),
    );
    let mut dirs = serde_json::Map::new();
    let mut reg_dirs = serde_json::Map::new();
    let mut freq = serde_json::Map::new();
    for (si, s) in ds.subsets.iter().enumerate() {
        let name = s
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let entry = json!({"n_repeats": s.repeats, "img_count": s.images});
        if s.is_reg {
            reg_dirs.insert(name.clone(), entry);
        } else {
            dirs.insert(name.clone(), entry);
            let mut tags: BTreeMap<String, u64> = BTreeMap::new();
            for it in ds.items.iter().filter(|i| i.subset == si) {
                for t in it.caption.split(',') {
                    let t = t.trim();
                    if !t.is_empty() {
                        *tags.entry(t.to_string()).or_default() += 1;
                    }
                }
            }
            freq.insert(name, json!(tags));
        }
    }
    put(
        "ss_dataset_dirs",
        serde_json::Value::Object(dirs).to_string(),
    );
    put(
        "ss_reg_dataset_dirs",
        serde_json::Value::Object(reg_dirs).to_string(),
    );
    put(
        "ss_tag_frequency",
        serde_json::Value::Object(freq).to_string(),
    );
    let model_name = o
        .model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    put("ss_sd_model_name", model_name);
    put("ss_sd_model_hash", "".into());
    put("ss_new_sd_model_hash", "".into());
    put("ss_vae_name", "None".into());
    // modelspec (sai_model_spec.py).
    m.extend(modelspec(
        Some("lora"),
        &o.output_name,
        (f.arch, f.prediction),
        (w as usize, h as usize),
        f.finished,
    ));
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        assert_eq!(py_float(1e-4), "0.0001");
        assert_eq!(py_float(1e-5), "1e-05");
        assert_eq!(py_float(2.5e-6), "2.5e-06");
        assert_eq!(py_float(16.0), "16.0");
        assert_eq!(py_float(0.0), "0.0");
        assert_eq!(py_float(0.05), "0.05");
    }

    #[test]
    fn civil_dates() {
        assert_eq!(iso_date(0), "1970-01-01T00:00:00");
        assert_eq!(iso_date(1_796_083_200), "2026-12-01T00:00:00");
    }
}
