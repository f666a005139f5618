//! DreamBooth: the base model's own weights train (the whole UNet, optionally the text
//! encoder), on the same loop as the adapters, with prior preservation from class images
//! and a single-file checkpoint as the output.
//!
//! Class images: `--class-prompt P --num-class-images N` fills `REG/1_<P>/` up to N
//! images with the frozen model before training (each image and its caption written
//! atomically, numbered, seeded by its number), so a killed run continues where it
//! stopped and a finished folder is left alone.

use super::metadata::{RunFacts, modelspec};
use super::method::{Method, Size, VarGroup};
use super::options::DreamBoothOptions;
use super::samples::{SamplePrompt, render_one};
use crate::adapters::restore_var;
use crate::formats::sd_checkpoint::{self, CheckpointTensors};
use crate::model::loader::ModelInfo;
use crate::model::pipeline::Models;
use crate::model::samplers::SamplerKind;
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The frozen tensors a checkpoint save needs besides the trained ones (diffusers
/// names; `passthrough` in LDM names), shared with the model (no copies).
#[derive(Default)]
pub struct Frozen {
    pub vae: Vec<(String, Tensor)>,
    pub text_encoder: Vec<(String, Tensor)>,
    pub passthrough: Vec<(String, Tensor)>,
}

pub struct DreamBoothMethod<'a> {
    pub o: &'a DreamBoothOptions,
    pub info: ModelInfo,
    pub unet: Vec<(String, Var)>,
    pub text_encoder: Vec<(String, Var)>,
    pub frozen: Frozen,
}

fn as_tensors(vars: &[(String, Var)], dtype: DType) -> candle_core::Result<Vec<(String, Tensor)>> {
    vars.iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().detach().to_dtype(dtype)?)))
        .collect()
}

impl DreamBoothMethod<'_> {
    /// Every tensor of the model as it is now: trained ones from the variables.
    fn checkpoint(&self, dtype: DType) -> candle_core::Result<CheckpointTensors> {
        let text_encoder = if self.text_encoder.is_empty() {
            self.frozen.text_encoder.clone()
        } else {
            let mut t = as_tensors(&self.text_encoder, dtype)?;
            let trained: std::collections::HashSet<&str> =
                self.text_encoder.iter().map(|(k, _)| k.as_str()).collect();
            t.extend(
                self.frozen
                    .text_encoder
                    .iter()
                    .filter(|(k, _)| !trained.contains(k.as_str()))
                    .cloned(),
            );
            t
        };
        Ok(CheckpointTensors {
            unet: as_tensors(&self.unet, dtype)?,
            vae: self.frozen.vae.clone(),
            text_encoder,
            passthrough: self.frozen.passthrough.clone(),
        })
    }

    fn metadata(&self, facts: &RunFacts) -> BTreeMap<String, String> {
        let (w, h) = self.o.resolution().unwrap_or((512, 512));
        let mut m = modelspec(
            None,
            &self.o.output_name,
            (facts.arch, facts.prediction),
            (w as usize, h as usize),
            facts.finished,
        );
        for (k, v) in [
            ("ss_training_method", "dreambooth".to_string()),
            ("ss_steps", facts.steps.to_string()),
            ("ss_epoch", facts.epoch.to_string()),
            ("ss_seed", facts.seed.to_string()),
            ("ss_learning_rate", self.o.learning_rate.to_string()),
            (
                "ss_text_encoder_trained",
                (!self.text_encoder.is_empty()).to_string(),
            ),
        ] {
            m.insert(k.into(), v);
        }
        m
    }
}

impl Method for DreamBoothMethod<'_> {
    fn kind(&self) -> &'static str {
        "dreambooth"
    }
    fn trains_base_weights(&self) -> bool {
        true
    }
    fn fused_backward_pass(&self) -> bool {
        self.o.fused_backward_pass
    }

    fn grid_columns(&self) -> super::grid::Columns {
        super::grid::Columns::Model
    }

    fn groups(&self) -> Vec<VarGroup> {
        let vars = |v: &[(String, Var)]| v.iter().map(|(_, v)| v.clone()).collect();
        let mut g = vec![VarGroup {
            name: "unet".into(),
            vars: vars(&self.unet),
            lr: self.o.learning_rate.base(),
            until: None,
        }];
        if !self.text_encoder.is_empty() {
            g.push(VarGroup {
                name: "text_encoder".into(),
                vars: vars(&self.text_encoder),
                lr: self
                    .o
                    .text_encoder_lr
                    .unwrap_or(self.o.learning_rate.base()),
                until: self.o.stop_text_encoder_training,
            });
        }
        g
    }

    fn size(&self) -> Size {
        let n = |v: &[(String, Var)]| v.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
        // Modules: distinct parents of the weights (`...to_q.weight` -> `...to_q`).
        let modules = |v: &[(String, Var)]| {
            let set: std::collections::HashSet<&str> = v
                .iter()
                .map(|(k, _)| k.rsplit_once('.').map_or(k.as_str(), |(m, _)| m))
                .collect();
            set.len()
        };
        Size {
            unet_modules: modules(&self.unet),
            text_encoder_modules: modules(&self.text_encoder),
            parameters: n(&self.unet) + n(&self.text_encoder),
        }
    }

    fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "unet": self.unet.len(),
            "text_encoder": self.text_encoder.len(),
        })
    }

    fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut v = Vec::new();
        for (prefix, vars) in [("unet.", &self.unet), ("text_encoder.", &self.text_encoder)] {
            for (k, t) in as_tensors(vars, DType::F32)? {
                v.push((format!("{prefix}{k}"), t));
            }
        }
        Ok(v)
    }

    fn load_state(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        for (prefix, vars) in [("unet.", &self.unet), ("text_encoder.", &self.text_encoder)] {
            for (k, var) in vars {
                restore_var(var, tensors, &format!("{prefix}{k}"), "another model")?;
            }
        }
        Ok(())
    }

    fn save(&self, path: &Path, facts: &RunFacts, dtype: DType) -> Result<(), String> {
        let t = self.checkpoint(dtype).map_err(|e| e.to_string())?;
        sd_checkpoint::write_single_file(path, &self.info, &t, dtype, &self.metadata(facts))?;
        sd_checkpoint::copy_sidecar(&self.o.model, path)
    }

    fn finish(&self, path: &Path, _facts: &RunFacts, dtype: DType) -> Result<(), String> {
        if !self.o.save_diffusers {
            return Ok(());
        }
        let t = self.checkpoint(dtype).map_err(|e| e.to_string())?;
        sd_checkpoint::write_diffusers(&path.with_extension(""), &self.info, &t, dtype)
    }
}

/// The folder the class images of `prompt` go to: `REG/1_<prompt>` with characters
/// folder names cannot hold replaced.
pub fn class_dir(reg: &Path, prompt: &str) -> PathBuf {
    let name: String = prompt
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | ',' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    reg.join(format!("1_{}", name.trim()))
}

/// Numbers of the class images already in `dir` (`000042.png`).
fn existing(dir: &Path) -> Vec<usize> {
    let mut v: Vec<usize> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let f = e.file_name().into_string().ok()?;
                    f.strip_suffix(".png")?.parse().ok()
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// How many class images are still to be made in `dir` for `n` in all (any image file
/// counts, as the data loader will train on it).
pub fn missing(dir: &Path, n: usize) -> usize {
    let images = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter(|e| crate::dataset::scan::is_image_path(&e.path()))
                .count()
        })
        .unwrap_or(0);
    n.saturating_sub(images)
}

/// What to generate: `n` images of `prompt` in `dir` at `size`.
pub struct ClassImages<'a> {
    pub dir: &'a Path,
    pub prompt: &'a str,
    pub n: usize,
    pub size: (usize, usize),
    pub steps: usize,
    pub sampler: SamplerKind,
    pub seed: u64,
    pub caption_extension: &'a str,
}

/// Generate the missing class images (`NNNNNN.png` and its caption file with the
/// prompt); `tick` after each. Returns how many were made.
pub fn generate_class_images(
    models: &Models,
    c: &ClassImages,
    tick: &mut dyn FnMut(),
) -> Result<usize, String> {
    let dir = c.dir;
    crate::util::atomic::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let todo = missing(dir, c.n);
    let taken = existing(dir);
    let mut next = 0usize;
    let p = SamplePrompt {
        prompt: c.prompt.to_string(),
        negative: String::new(),
        width: c.size.0,
        height: c.size.1,
        seed: None,
        cfg: 7.5,
        steps: c.steps,
    };
    for _ in 0..todo {
        while taken.binary_search(&next).is_ok() {
            next += 1;
        }
        let s = c.seed.wrapping_add(next as u64) % 4_294_967_295;
        let (rgb, params) = render_one(models, &p, c.sampler, 1, s)?;
        let path = dir.join(format!("{next:06}.png"));
        let cap = crate::dataset::caption_io::caption_path(&path, c.caption_extension);
        crate::util::atomic::write_atomic(&cap, c.prompt.as_bytes())
            .map_err(|e| format!("{}: {e}", cap.display()))?;
        crate::formats::png_params::write_png(
            &path,
            &rgb,
            p.width as u32,
            p.height as u32,
            &params.to_infotext(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        next += 1;
        tick();
    }
    Ok(todo)
}
