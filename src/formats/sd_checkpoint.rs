//! Writing Stable Diffusion 1.x / 2.x checkpoints: the single-file LDM `.safetensors`
//! that webui (and diffusers' `from_single_file`) load, and a diffusers folder.
//!
//! Single file: the key layout of the released SD files, the inverse of the loader's
//! renames (`model::io::keymap`): `model.diffusion_model.` (UNet), `first_stage_model.`
//! (VAE; the mid-block attention weights as 1x1 convs), and `cond_stage_model.` (SD1:
//! `transformer.text_model.`; SD2: OpenCLIP names with `attn.in_proj_*` holding q, k and v).
//! SD2 tensors that only a single file has (the last OpenCLIP block, which the
//! conditioning does not use, `text_projection`, `logit_scale`) are written back when the
//! source checkpoint had them; from a diffusers SD2 folder (which keeps only the 23 blocks
//! that condition) the last block is written as zeros, so the file has the released
//! layout and every loader's rule for dropping the unused block keeps the right ones.
//!
//! Diffusers folder: `model_index.json`, `unet/`, `vae/`, `text_encoder/` (configs and
//! safetensors), `scheduler/` (PNDM, the SD release's, with the prediction type) and
//! `tokenizer/` (CLIP's vocabulary and merges), so `from_pretrained(dir)` works offline.

use crate::model::arch::{Arch, Prediction};
use crate::model::io::keymap::{self, LDM_CLIP_SD1, LDM_CLIP_SD2, LDM_UNET, LDM_VAE};
use crate::model::loader::ModelInfo;
use candle_core::{DType, Tensor};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;

/// Every tensor of a model: components in diffusers / HF names, `passthrough` in LDM names.
#[derive(Default)]
pub struct CheckpointTensors {
    pub unet: Vec<(String, Tensor)>,
    pub vae: Vec<(String, Tensor)>,
    pub text_encoder: Vec<(String, Tensor)>,
    pub passthrough: Vec<(String, Tensor)>,
}

/// The tensors under their single-file (LDM) names.
pub fn ldm_tensors(
    info: &ModelInfo,
    t: &CheckpointTensors,
) -> Result<Vec<(String, Tensor)>, String> {
    let unknown = |what: &str, k: &str| format!("{what} tensor `{k}` has no single-file name");
    let up_attention: Vec<bool> = info.unet.cross_attention.iter().rev().copied().collect();
    let mut out = Vec::with_capacity(t.unet.len() + t.vae.len() + t.text_encoder.len());
    for (k, v) in &t.unet {
        let n = keymap::unet_to_ldm(k, info.unet.layers_per_block, &up_attention)
            .ok_or_else(|| unknown("UNet", k))?;
        out.push((format!("{LDM_UNET}{n}"), v.clone()));
    }
    let n_blocks = info.vae.block_out_channels.len();
    for (k, v) in &t.vae {
        let n = keymap::vae_to_ldm(k, n_blocks).ok_or_else(|| unknown("VAE", k))?;
        let v = if keymap::vae_ldm_is_conv1x1(&n) && v.rank() == 2 {
            let (o, i) = v.dims2().map_err(|e| e.to_string())?;
            v.reshape((o, i, 1, 1)).map_err(|e| e.to_string())?
        } else {
            v.clone()
        };
        out.push((format!("{LDM_VAE}{n}"), v));
    }
    match info.arch {
        Arch::Sd1 => {
            for (k, v) in &t.text_encoder {
                if !k.starts_with("text_model.") {
                    return Err(unknown("text encoder", k));
                }
                out.push((format!("{LDM_CLIP_SD1}{k}"), v.clone()));
            }
        }
        Arch::Sd2 => {
            let tower = open_clip_tensors(&t.text_encoder)?;
            out.extend(unused_last_block(&tower, &t.passthrough)?);
            out.extend(tower);
        }
    }
    let have: std::collections::HashSet<String> = out.iter().map(|(k, _)| k.clone()).collect();
    out.extend(
        t.passthrough
            .iter()
            .filter(|(k, _)| !have.contains(k))
            .cloned(),
    );
    Ok(out)
}

/// SD2's last OpenCLIP block as zeros when the source had none (a diffusers folder keeps
/// only the blocks the conditioning uses): released files hold it, and loaders drop the
/// last block of a file's tower (sdkit) or the 24th (diffusers, webui never runs it), so
/// without it they would lose a block that conditions.
fn unused_last_block(
    tower: &[(String, Tensor)],
    passthrough: &[(String, Tensor)],
) -> Result<Vec<(String, Tensor)>, String> {
    let blocks = format!("{LDM_CLIP_SD2}transformer.resblocks.");
    let index =
        |k: &str| -> Option<usize> { k.strip_prefix(&blocks)?.split('.').next()?.parse().ok() };
    let Some(last) = tower.iter().filter_map(|(k, _)| index(k)).max() else {
        return Ok(vec![]);
    };
    if passthrough.iter().any(|(k, _)| index(k) == Some(last + 1)) {
        return Ok(vec![]);
    }
    let from = format!("{blocks}{last}.");
    let to = format!("{blocks}{}.", last + 1);
    tower
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(&from).map(|rest| (rest, t)))
        .map(|(rest, t)| {
            Ok((
                format!("{to}{rest}"),
                t.zeros_like().map_err(|e| e.to_string())?,
            ))
        })
        .collect()
}

/// HF CLIP text-model tensors of SD2 under OpenCLIP's single-file names (the inverse of
/// `clip::map_open_clip_keys`): q, k and v are concatenated into `attn.in_proj_*`.
fn open_clip_tensors(te: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>, String> {
    let p = LDM_CLIP_SD2;
    let mut out = Vec::new();
    let mut fused: BTreeMap<String, [Option<Tensor>; 3]> = BTreeMap::new();
    for (k, v) in te {
        let rest = k
            .strip_prefix("text_model.")
            .ok_or_else(|| format!("text encoder tensor `{k}` has no single-file name"))?;
        let name = match rest {
            "embeddings.token_embedding.weight" => "token_embedding.weight".to_string(),
            "embeddings.position_embedding.weight" => "positional_embedding".to_string(),
            r if r.starts_with("final_layer_norm.") => {
                format!("ln_final.{}", &r["final_layer_norm.".len()..])
            }
            r => {
                let s = r
                    .strip_prefix("encoder.layers.")
                    .ok_or_else(|| format!("text encoder tensor `{k}` has no single-file name"))?;
                let (i, t) = s.split_once('.').ok_or_else(|| format!("bad key `{k}`"))?;
                let block = format!("transformer.resblocks.{i}.");
                let qkv = [
                    ("self_attn.q_proj.", 0),
                    ("self_attn.k_proj.", 1),
                    ("self_attn.v_proj.", 2),
                ];
                if let Some((suffix, j)) = qkv
                    .iter()
                    .find_map(|(pre, j)| t.strip_prefix(pre).map(|s| (s, *j)))
                {
                    let slot = fused
                        .entry(format!("{block}attn.in_proj_{suffix}"))
                        .or_default();
                    slot[j] = Some(v.clone());
                    continue;
                }
                let t = [
                    ("layer_norm1.", "ln_1."),
                    ("layer_norm2.", "ln_2."),
                    ("mlp.fc1.", "mlp.c_fc."),
                    ("mlp.fc2.", "mlp.c_proj."),
                    ("self_attn.out_proj.", "attn.out_proj."),
                ]
                .iter()
                .find_map(|(from, to)| t.strip_prefix(from).map(|s| format!("{to}{s}")))
                .ok_or_else(|| format!("text encoder tensor `{k}` has no single-file name"))?;
                format!("{block}{t}")
            }
        };
        out.push((format!("{p}{name}"), v.clone()));
    }
    for (name, parts) in fused {
        let parts: Vec<Tensor> = parts
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| format!("text encoder: q, k or v of `{name}` missing"))?;
        let cat = Tensor::cat(&parts, 0).map_err(|e| e.to_string())?;
        out.push((format!("{p}{name}"), cat));
    }
    Ok(out)
}

/// Write the single-file checkpoint at `path` (atomically, one tensor at a time) with
/// every tensor in `dtype` and string `metadata`.
pub fn write_single_file(
    path: &Path,
    info: &ModelInfo,
    t: &CheckpointTensors,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<(), String> {
    let tensors = ldm_tensors(info, t).map_err(|e| format!("{}: {e}", path.display()))?;
    super::safetensors::write_streaming(path, &tensors, Some(dtype), metadata)
}

/// Copy the LDM config sidecar of a single-file `source` (`model.yaml` beside
/// `model.safetensors`, which webui and sdkit read for what the weights cannot tell:
/// heads, v-prediction) beside `out`, when there is one.
pub fn copy_sidecar(source: &Path, out: &Path) -> Result<(), String> {
    if !source.is_file() {
        return Ok(());
    }
    let side = source.with_extension("yaml");
    let Ok(bytes) = std::fs::read(&side) else {
        return Ok(());
    };
    let dst = out.with_extension("yaml");
    crate::util::atomic::write_atomic(&dst, &bytes).map_err(|e| format!("{}: {e}", dst.display()))
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), String> {
    let text = serde_json::to_string_pretty(v).map_err(|e| e.to_string())?;
    crate::util::atomic::write_atomic(path, text.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The diffusers configs of `info`: (unet, vae, text_encoder, scheduler).
fn configs(info: &ModelInfo) -> [serde_json::Value; 4] {
    let u = &info.unet;
    let down: Vec<&str> = u
        .cross_attention
        .iter()
        .map(|&a| {
            if a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up: Vec<&str> = u
        .cross_attention
        .iter()
        .rev()
        .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
        .collect();
    let v_pred = info.prediction == Prediction::VPrediction;
    let sample = if info.arch == Arch::Sd2 && v_pred {
        96
    } else {
        64
    };
    let unet = json!({
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": u.heads,
        "block_out_channels": u.block_out_channels,
        "center_input_sample": false,
        "cross_attention_dim": u.cross_attention_dim,
        "down_block_types": down,
        "downsample_padding": 1,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "in_channels": u.in_channels,
        "layers_per_block": u.layers_per_block,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": u.norm_groups,
        "out_channels": u.out_channels,
        "sample_size": sample,
        "up_block_types": up,
        "use_linear_projection": u.use_linear_projection,
    });
    let v = &info.vae;
    let n = v.block_out_channels.len();
    let vae = json!({
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": v.block_out_channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "in_channels": v.in_channels,
        "out_channels": v.out_channels,
        "latent_channels": v.latent_channels,
        "layers_per_block": v.layers_per_block,
        "norm_num_groups": v.norm_groups,
        "sample_size": sample * 8,
        "scaling_factor": v.scaling_factor,
    });
    let t = &info.text;
    let text = json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "hidden_size": t.width,
        "intermediate_size": t.intermediate,
        "num_attention_heads": t.heads,
        "num_hidden_layers": t.layers,
        "max_position_embeddings": t.max_positions,
        "vocab_size": t.vocab,
        "hidden_act": if info.arch == Arch::Sd1 { "quick_gelu" } else { "gelu" },
        "layer_norm_eps": 1e-5,
        "projection_dim": if info.arch == Arch::Sd1 { 768 } else { 512 },
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "torch_dtype": "float32",
    });
    let sched = json!({
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "prediction_type": if v_pred { "v_prediction" } else { "epsilon" },
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "clip_sample": false,
        "timestep_spacing": "leading",
    });
    [unet, vae, text, sched]
}

/// Write a diffusers folder at `dir` (each file atomically; a folder that is there is
/// updated in place).
pub fn write_diffusers(
    dir: &Path,
    info: &ModelInfo,
    t: &CheckpointTensors,
    dtype: DType,
) -> Result<(), String> {
    let mkdir = |d: &Path| {
        crate::util::atomic::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))
    };
    let none = BTreeMap::new();
    let [unet_cfg, vae_cfg, text_cfg, sched_cfg] = configs(info);
    for (name, cfg, tensors, file) in [
        (
            "unet",
            &unet_cfg,
            &t.unet,
            "diffusion_pytorch_model.safetensors",
        ),
        (
            "vae",
            &vae_cfg,
            &t.vae,
            "diffusion_pytorch_model.safetensors",
        ),
        (
            "text_encoder",
            &text_cfg,
            &t.text_encoder,
            "model.safetensors",
        ),
    ] {
        let d = dir.join(name);
        mkdir(&d)?;
        write_json(&d.join("config.json"), cfg)?;
        super::safetensors::write_streaming(&d.join(file), tensors, Some(dtype), &none)?;
    }
    let d = dir.join("scheduler");
    mkdir(&d)?;
    write_json(&d.join("scheduler_config.json"), &sched_cfg)?;
    let d = dir.join("tokenizer");
    mkdir(&d)?;
    let (vocab, merges) = crate::model::tokenizer::ClipTokenizer::shared().hf_files();
    for (f, text) in [("vocab.json", vocab), ("merges.txt", merges)] {
        let p = d.join(f);
        crate::util::atomic::write_atomic(&p, text.as_bytes())
            .map_err(|e| format!("{}: {e}", p.display()))?;
    }
    let pad = if info.arch == Arch::Sd1 {
        "<|endoftext|>"
    } else {
        "!"
    };
    write_json(
        &d.join("special_tokens_map.json"),
        &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": pad, "unk_token": "<|endoftext|>"}),
    )?;
    write_json(
        &d.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                "do_lower_case": true, "errors": "replace",
                "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "pad_token": pad, "unk_token": "<|endoftext|>"}),
    )?;
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "PNDMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
        }),
    )
}
