//! What a training method adds to the one training loop (`run`): its trainable variables
//! (attached to the model), their learning rates, how captions become prompts, the
//! identity a resume state must match, and the file it writes. LoRA is [`LoraMethod`];
//! DreamBooth, Textual Inversion and hypernetworks implement the same trait.

use super::metadata::{RunFacts, lora_metadata};
use super::options::{EmbeddingFormat, HypernetworkOptions, LoraOptions, TextualInversionOptions};
use super::rng::Rng;
use crate::adapters::embedding::{
    FileFormat, PtMeta as EmbeddingPtMeta, TrainableEmbedding, kohya_metadata,
};
use crate::adapters::hypernetwork::{Hypernetwork, file::PtMeta};
use crate::adapters::lora::{LoraNetwork, Part};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;
use std::path::Path;

/// One optimizer parameter group: a name (`unet`, `text_encoder`, `embedding`, ...; also
/// the TensorBoard `lr/` tag), its variables and base learning rate.
pub struct VarGroup {
    pub name: String,
    pub vars: Vec<Var>,
    pub lr: f64,
    /// The group stops training after this many steps (rate 0, no gradients).
    pub until: Option<u64>,
}

/// Counts `--dry-run` prints.
#[derive(Debug, Clone, Copy, Default)]
pub struct Size {
    pub unet_modules: usize,
    pub text_encoder_modules: usize,
    pub parameters: usize,
}

pub trait Method {
    /// `lora`, `dreambooth`, `textual_inversion`, `hypernetwork` (recorded in states).
    fn kind(&self) -> &'static str;
    /// What the columns of the run's `--grid-prompt` grid vary (its saves).
    fn grid_columns(&self) -> super::grid::Columns;
    /// Output file extension with the dot (`.safetensors`, `.pt`).
    fn extension(&self) -> &'static str {
        ".safetensors"
    }
    fn groups(&self) -> Vec<VarGroup>;
    fn size(&self) -> Size;
    /// Whether the trained tensors are the model's own weights (already in memory once),
    /// not new adapter tensors beside them: the memory estimate counts them differently,
    /// and the trainer stages the UNet's backward (their gradients are as large as the model).
    fn trains_base_weights(&self) -> bool {
        false
    }
    /// Whether the optimizer updates each weight inside the backward (the fused backward
    /// pass, see `train::fused`).
    fn fused_backward_pass(&self) -> bool {
        false
    }
    /// What a resume state must have been trained with (shape of the trainable part).
    fn identity(&self) -> serde_json::Value;
    /// The key of this step's dropout masks (0: off).
    fn set_dropout_key(&self, _key: u64) {}
    /// The training prompt of a sample's caption (after shuffling and dropout).
    fn prompt(&self, caption: String, _rng: &mut Rng) -> String {
        caption
    }
    /// Trainable tensors in f32 by name, for resume states.
    fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>>;
    fn load_state(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String>;
    /// Write the output file at `path` (atomically), `dtype` from `--save-precision`.
    fn save(&self, path: &Path, facts: &RunFacts, dtype: DType) -> Result<(), String>;
    /// After the final save at `path`: extra outputs of the final model only.
    fn finish(&self, _path: &Path, _facts: &RunFacts, _dtype: DType) -> Result<(), String> {
        Ok(())
    }
}

/// LoRA / LoCon in kohya's format.
pub struct LoraMethod<'a> {
    pub o: &'a LoraOptions,
    pub net: LoraNetwork,
}

impl Method for LoraMethod<'_> {
    fn kind(&self) -> &'static str {
        "lora"
    }

    fn grid_columns(&self) -> super::grid::Columns {
        super::grid::Columns::Lora
    }

    fn groups(&self) -> Vec<VarGroup> {
        let o = self.o;
        [
            (Part::TextEncoder, "text_encoder", o.text_encoder_lr),
            (Part::Unet, "unet", o.unet_lr),
        ]
        .into_iter()
        .filter_map(|(part, name, lr)| {
            let vars = self.net.vars(part);
            (!vars.is_empty()).then(|| VarGroup {
                name: name.into(),
                vars,
                lr: lr.unwrap_or(o.learning_rate.base()),
                until: None,
            })
        })
        .collect()
    }

    fn size(&self) -> Size {
        let count = |p: Part| self.net.modules.iter().filter(|m| m.part == p).count();
        Size {
            unet_modules: count(Part::Unet),
            text_encoder_modules: count(Part::TextEncoder),
            parameters: self.net.num_params(),
        }
    }

    fn identity(&self) -> serde_json::Value {
        let o = self.o;
        serde_json::json!({
            "dim": o.network_dim,
            "alpha": o.network_alpha,
            "conv_dim": o.conv_dim,
            "conv_alpha": o.conv_alpha,
            "dropout": o.network_dropout,
            "unet": !o.network_train_text_encoder_only,
            "text_encoder": !o.network_train_unet_only,
        })
    }

    fn set_dropout_key(&self, key: u64) {
        self.net.set_dropout_key(key);
    }

    fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        Ok(self.net.tensors(DType::F32)?)
    }

    fn load_state(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        self.net.load_tensors(tensors).map_err(|e| e.to_string())
    }

    fn save(&self, path: &Path, facts: &RunFacts, dtype: DType) -> Result<(), String> {
        let tensors = self.net.tensors(dtype).map_err(|e| e.to_string())?;
        let meta = lora_metadata(self.o, facts);
        crate::formats::kohya_lora::save(path, &tensors, &meta).map_err(|e| e.to_string())
    }
}

/// A webui hypernetwork on the UNet's attention contexts, saved as webui's `.pt`.
pub struct HypernetworkMethod<'a> {
    pub o: &'a HypernetworkOptions,
    pub net: Hypernetwork,
    /// webui's `sd_checkpoint` (short hash) and `sd_checkpoint_name` of the base model.
    pub checkpoint: (Option<String>, String),
}

impl Method for HypernetworkMethod<'_> {
    fn kind(&self) -> &'static str {
        "hypernetwork"
    }

    fn grid_columns(&self) -> super::grid::Columns {
        super::grid::Columns::Hypernetwork
    }

    fn extension(&self) -> &'static str {
        ".pt"
    }

    fn groups(&self) -> Vec<VarGroup> {
        vec![VarGroup {
            name: "hypernetwork".into(),
            vars: self.net.vars(),
            lr: self.o.learning_rate.base(),
            until: None,
        }]
    }

    fn size(&self) -> Size {
        Size {
            unet_modules: 2 * self.net.modules.len(),
            text_encoder_modules: 0,
            parameters: self.net.num_params(),
        }
    }

    fn identity(&self) -> serde_json::Value {
        self.net.identity()
    }

    fn set_dropout_key(&self, key: u64) {
        self.net.set_dropout_key(key);
    }

    fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        Ok(self.net.tensors()?)
    }

    fn load_state(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        self.net.load_tensors(tensors)
    }

    /// Always f32, as webui writes them (`--save-precision` does not apply).
    fn save(&self, path: &Path, facts: &RunFacts, _dtype: DType) -> Result<(), String> {
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let meta = PtMeta {
            name,
            step: facts.steps as i64,
            sd_checkpoint: self.checkpoint.0.clone(),
            sd_checkpoint_name: Some(self.checkpoint.1.clone()),
            optional_info: None,
        };
        self.net.save_pt(path, &meta)
    }
}

/// Textual inversion: new token vectors, saved as kohya's `emb_params` file, webui's
/// `.pt` or diffusers' file (`--save-format`).
pub struct EmbeddingMethod<'a> {
    pub o: &'a TextualInversionOptions,
    /// webui's `sd_checkpoint` (short hash) and `sd_checkpoint_name` of the base model
    /// (written into `.pt` files).
    pub checkpoint: (Option<String>, String),
    pub te: TrainableEmbedding,
    /// The word that calls it (in training prompts too).
    pub name: String,
    /// Template lines (`[name]`, `[filewords]`), or none: the captions.
    pub template: Option<Vec<String>>,
    pub resolution: (usize, usize),
}

impl Method for EmbeddingMethod<'_> {
    fn kind(&self) -> &'static str {
        "textual_inversion"
    }

    fn grid_columns(&self) -> super::grid::Columns {
        super::grid::Columns::Embedding(self.name.clone())
    }

    fn extension(&self) -> &'static str {
        match self.o.save_format {
            EmbeddingFormat::Pt => ".pt",
            EmbeddingFormat::Safetensors | EmbeddingFormat::Diffusers => ".safetensors",
        }
    }

    fn groups(&self) -> Vec<VarGroup> {
        vec![VarGroup {
            name: "embedding".into(),
            vars: self.te.vars(),
            lr: self.o.learning_rate.base(),
            until: None,
        }]
    }

    fn size(&self) -> Size {
        Size {
            unet_modules: 0,
            text_encoder_modules: 1,
            parameters: self.te.vars().iter().map(|v| v.elem_count()).sum(),
        }
    }

    fn identity(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "vectors": self.o.num_vectors_per_token,
        })
    }

    fn prompt(&self, caption: String, rng: &mut Rng) -> String {
        match (&self.template, &self.o.trigger) {
            (Some(lines), _) => {
                super::templates::template_caption(lines, &self.name, &caption, rng)
            }
            (None, Some(t)) => super::templates::replace_trigger(&caption, t, &self.name),
            (None, None) => caption,
        }
    }

    fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        self.te.tensors()
    }

    fn load_state(&self, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
        self.te.load_tensors(tensors)
    }

    /// `--save-precision` applies to the safetensors formats; `.pt` files are f32, as
    /// webui writes them.
    fn save(&self, path: &Path, facts: &RunFacts, dtype: DType) -> Result<(), String> {
        let done = match self.o.save_format {
            EmbeddingFormat::Safetensors => {
                let meta = kohya_metadata(
                    &self.name,
                    facts.arch,
                    facts.prediction,
                    self.resolution,
                    facts.finished,
                );
                self.te.save(path, FileFormat::Kohya, dtype, &meta)
            }
            EmbeddingFormat::Diffusers => {
                self.te
                    .save(path, FileFormat::Diffusers, dtype, &BTreeMap::new())
            }
            EmbeddingFormat::Pt => {
                let meta = EmbeddingPtMeta {
                    name: path
                        .file_stem()
                        .map(|s| s.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    step: facts.steps as i64,
                    sd_checkpoint: self.checkpoint.0.clone(),
                    sd_checkpoint_name: Some(self.checkpoint.1.clone()),
                };
                self.te.save_pt(path, &meta)
            }
        };
        done.map_err(|e| e.to_string())
    }
}
