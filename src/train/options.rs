//! Options of `sdkit train <method>` with kohya sd-scripts' names and defaults (flags and
//! recipe keys are the same: `--network-dim` / `network-dim:` / `network_dim:`).

use super::lr::{LearningRate, LrScheduler};
use super::objective::{HuberSchedule, LossType};
use super::optim::OptimizerKind;
use crate::model::schedule::Prediction;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Weights' compute precision (kohya `--mixed_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    No,
    Fp16,
    Bf16,
}

/// Precision of saved files (kohya `--save_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SavePrecision {
    #[value(name = "fp32", alias = "float")]
    Fp32,
    Fp16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

/// Sampler of the sample images during training (kohya `--sample_sampler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SampleSampler {
    Ddim,
    #[value(name = "euler_a", alias = "k_euler_a", alias = "euler-a")]
    EulerA,
    #[value(name = "dpm++2m-karras", alias = "k_dpm_2m_karras")]
    DpmPp2mKarras,
}

/// Options every training method shares (kohya's names and defaults). Each method's
/// options flatten these, so `--data` means the same in `train lora` and the others.
#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
pub struct TrainOptions {
    /// Checkpoint: diffusers folder, single-file .safetensors or .ckpt (SD 1.x / 2.x), or
    /// from the Hugging Face hub: owner/repo (diffusers), owner/repo:file.safetensors, sd15.
    #[arg(long, value_name = "CKPT", alias = "pretrained-model-name-or-path")]
    pub model: PathBuf,
    /// Training images: kohya `<repeats>_<name>` folders, or `sdkit prep` output.
    #[arg(long, value_name = "DIR", alias = "train-data-dir")]
    pub data: PathBuf,
    /// Regularisation images (`<repeats>_<class>` folders), besides a `reg/` inside DATA.
    #[arg(long, value_name = "DIR", alias = "reg-data-dir")]
    pub reg: Option<PathBuf>,
    /// Output folder.
    #[arg(long, value_name = "DIR", alias = "output-dir")]
    pub out: PathBuf,
    /// File name of the output without extension.
    #[arg(long, default_value = "last")]
    pub output_name: String,
    /// Training resolution: `512` or `WIDTH,HEIGHT`; its area sets the buckets.
    #[arg(long, default_value = "512")]
    pub resolution: String,
    #[arg(long, default_value_t = 256)]
    pub min_bucket_reso: u32,
    #[arg(long, default_value_t = 1024)]
    pub max_bucket_reso: u32,
    #[arg(long, default_value_t = 64)]
    pub bucket_reso_steps: u32,
    #[arg(long)]
    pub bucket_no_upscale: bool,
    /// Caption files next to the images (what `sdkit prep` writes; kohya's own default is
    /// .caption).
    #[arg(long, default_value = ".txt")]
    pub caption_extension: String,
    #[arg(long, default_value_t = 1, alias = "train-batch-size")]
    pub batch_size: usize,
    /// Total optimizer steps (ignored when --max-train-epochs is given).
    #[arg(long, default_value_t = 1600)]
    pub max_train_steps: u64,
    /// Epochs to train; sets the steps from the data.
    #[arg(long)]
    pub max_train_epochs: Option<u64>,
    /// Random seed (random when not given; written into the file's metadata).
    #[arg(long)]
    pub seed: Option<u64>,

    /// Base learning rate (kohya's default 2e-6; LoRA is usually trained at 1e-4).
    /// textual-inversion and hypernetwork also take webui's schedule "0.005:100, 1e-5"
    /// (each rate until its step; training ends at the last rate's step, if it has one).
    #[arg(long, default_value = "2e-6", value_parser = LearningRate::parse)]
    pub learning_rate: LearningRate,
    #[arg(long, value_enum, default_value_t = OptimizerKind::AdamW, alias = "optimizer-type")]
    pub optimizer: OptimizerKind,
    /// `key=value` optimizer arguments: betas=0.9,0.99 weight_decay=0.01 eps=1e-8 momentum=0.9;
    /// adafactor: scale_parameter=False relative_step=False warmup_init=False beta1=None.
    #[arg(long, num_args = 1..)]
    #[serde(default)]
    pub optimizer_args: Vec<String>,
    #[arg(long, value_enum, default_value_t = LrScheduler::Constant)]
    pub lr_scheduler: LrScheduler,
    /// Warmup: a step count, or a ratio of the total steps when below 1.
    #[arg(long, default_value_t = 0.0)]
    pub lr_warmup_steps: f64,
    /// Restarts of cosine_with_restarts.
    #[arg(long, default_value_t = 1.0)]
    pub lr_scheduler_num_cycles: f64,
    /// Power of the polynomial schedule.
    #[arg(long, default_value_t = 1.0)]
    pub lr_scheduler_power: f64,
    /// Clip gradients to this global L2 norm (0 = off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    #[arg(long, default_value_t = 1)]
    pub gradient_accumulation_steps: u64,

    /// Condition on the n-th last text-encoder layer (default: the model's own).
    #[arg(long)]
    pub clip_skip: Option<usize>,
    /// Caption tokens: 75, 150 or 225 (77-token chunks, as kohya).
    #[arg(long, default_value_t = 75, value_parser = crate::cli::parse_max_token_length)]
    pub max_token_length: usize,
    /// Train v-prediction (default: the model's own prediction type).
    #[arg(long)]
    pub v_parameterization: bool,
    #[arg(long, default_value_t = 0.0)]
    pub noise_offset: f64,
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Loss weight of regularisation images.
    #[arg(long, default_value_t = 1.0)]
    pub prior_loss_weight: f64,
    #[arg(long, value_enum, default_value_t = LossType::L2)]
    pub loss_type: LossType,
    #[arg(long, default_value_t = 0.1)]
    pub huber_c: f64,
    #[arg(long, value_enum, default_value_t = HuberSchedule::Snr)]
    pub huber_schedule: HuberSchedule,

    /// Tags at the start of a caption kept in place by shuffling and tag dropout.
    #[arg(long, default_value_t = 0)]
    pub keep_tokens: usize,
    #[arg(long)]
    pub shuffle_caption: bool,
    /// Probability of training a sample with an empty caption.
    #[arg(long, default_value_t = 0.0)]
    pub caption_dropout_rate: f64,
    /// Probability of dropping each (non-kept) tag.
    #[arg(long, default_value_t = 0.0)]
    pub caption_tag_dropout_rate: f64,
    /// Random horizontal flips.
    #[arg(long)]
    pub flip_aug: bool,
    /// Encode every image once and keep the latents in memory.
    #[arg(long)]
    pub cache_latents: bool,
    /// Also keep them on disk (OUT/.sdkit-cache/latents), reused by later runs.
    #[arg(long)]
    pub cache_latents_to_disk: bool,
    /// Recompute each UNet resnet and transformer in the backward instead of keeping its
    /// activations: less memory (about a third of the step's peak), ~30% more time.
    #[arg(long)]
    pub gradient_checkpointing: bool,

    /// Frozen model weights in fp16 / bf16, the adapter in f32 (as kohya). Saves memory;
    /// on the CPU fp16 is slower than `no` (no native f16 matrix product) and bf16 needs
    /// `--device cuda`.
    #[arg(long, value_enum, default_value_t = MixedPrecision::No)]
    pub mixed_precision: MixedPrecision,
    /// Precision of saved files (default fp32, the adapter's own precision, as kohya).
    #[arg(long, value_enum)]
    pub save_precision: Option<SavePrecision>,
    #[arg(long)]
    pub save_every_n_epochs: Option<u64>,
    #[arg(long)]
    pub save_every_n_steps: Option<u64>,
    /// Keep only the newest N periodic saves.
    #[arg(long, alias = "save-last-n-epochs")]
    pub save_last_n: Option<usize>,
    /// Also save the training state (OUT/NAME-state/) for --resume.
    #[arg(long)]
    pub save_state: bool,
    /// Continue from a state folder written with --save-state.
    #[arg(long, value_name = "STATE_DIR")]
    pub resume: Option<PathBuf>,
    /// TensorBoard logs go to LOGGING_DIR/<prefix><YYYYmmddHHMMSS>/.
    #[arg(long)]
    pub logging_dir: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub log_prefix: String,
    /// kohya prompt file for sample images (`prompt --n neg --w 512 --h 512 --d seed
    /// --l cfg --s steps`).
    #[arg(long)]
    pub sample_prompts: Option<PathBuf>,
    #[arg(long)]
    pub sample_every_n_epochs: Option<u64>,
    #[arg(long)]
    pub sample_every_n_steps: Option<u64>,
    #[arg(long, value_enum, default_value_t = SampleSampler::Ddim)]
    pub sample_sampler: SampleSampler,
    /// When the run ends, render a grid of its saves with this prompt into OUT/grid/ (the
    /// files `sdkit grid` writes): columns = none and every save, rows = --grid-weights.
    #[arg(long)]
    pub grid_prompt: Option<String>,
    /// Negative prompt of the grid.
    #[arg(long)]
    pub grid_negative: Option<String>,
    /// Rows: the LoRA's weights or the hypernetwork's strengths (webui ranges allowed)
    /// [default: 0.4,0.7,1.0]; textual inversion and DreamBooth have one row.
    #[arg(long, value_name = "WEIGHTS")]
    pub grid_weights: Option<String>,
    /// Seed of every grid cell [default: the run's seed].
    #[arg(long)]
    pub grid_seed: Option<u64>,
    /// Sampling steps of each grid cell [default: 20].
    #[arg(long)]
    pub grid_steps: Option<usize>,
    /// Guidance scale of the grid [default: 7].
    #[arg(long)]
    pub grid_cfg: Option<f64>,
    /// Sampler of the grid [default: euler_a].
    #[arg(long, value_enum)]
    pub grid_sampler: Option<SampleSampler>,
    /// Grid cell width [default: the training resolution's].
    #[arg(long)]
    pub grid_width: Option<usize>,
    /// Grid cell height [default: the training resolution's].
    #[arg(long)]
    pub grid_height: Option<usize>,

    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Print the plan (images, repeats, buckets, steps, parameters, memory) and stop.
    #[arg(long)]
    pub dry_run: bool,
    /// Machine-readable summary on stdout.
    #[arg(long)]
    pub json: bool,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

impl TrainOptions {
    /// Refuses webui's step schedule for methods that take a plain number.
    pub fn number_learning_rate(&self, method: &str) -> Result<(), String> {
        match self.learning_rate.steps() {
            Some(_) => Err(format!(
                "--learning-rate {:?}: webui's step schedule is for textual-inversion and hypernetwork; {method} takes a number (schedules: --lr-scheduler)",
                self.learning_rate.text()
            )),
            None => Ok(()),
        }
    }

    /// The training resolution as (width, height).
    pub fn resolution(&self) -> Result<(u32, u32), String> {
        let parse = |s: &str| {
            s.trim()
                .parse::<u32>()
                .ok()
                .filter(|&v| v >= 64)
                .ok_or_else(|| {
                    format!(
                        "--resolution {:?}: expected 512 or 512,768",
                        self.resolution
                    )
                })
        };
        match self.resolution.split_once(',') {
            Some((w, h)) => Ok((parse(w)?, parse(h)?)),
            None => {
                let v = parse(&self.resolution)?;
                Ok((v, v))
            }
        }
    }

    /// Contradictions and out-of-range values, as one-line errors naming the option.
    pub fn validate(&self) -> Result<(), String> {
        self.resolution()?;
        if self.batch_size == 0 {
            return Err("--batch-size must be at least 1".into());
        }
        if self.gradient_accumulation_steps == 0 {
            return Err("--gradient-accumulation-steps must be at least 1".into());
        }
        for (name, v) in [
            ("--caption-dropout-rate", self.caption_dropout_rate),
            ("--caption-tag-dropout-rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(format!("{name} {v}: a probability between 0 and 1"));
            }
        }
        if self.max_train_epochs == Some(0)
            || (self.max_train_epochs.is_none() && self.max_train_steps == 0)
        {
            return Err("nothing to train: --max-train-steps / --max-train-epochs is 0".into());
        }
        if self.min_snr_gamma.is_some_and(|g| g <= 0.0) {
            return Err("--min-snr-gamma must be positive".into());
        }
        if self.lr_warmup_steps < 0.0 {
            return Err("--lr-warmup-steps must not be negative".into());
        }
        if self.learning_rate.steps().is_some() {
            let lr = self.learning_rate.text();
            if self.lr_scheduler != LrScheduler::Constant {
                return Err(format!(
                    "--learning-rate {lr:?} is a step schedule, which replaces --lr-scheduler {}: give one of the two",
                    self.lr_scheduler.name()
                ));
            }
            if self.lr_warmup_steps != 0.0 {
                return Err(format!(
                    "--learning-rate {lr:?} is a step schedule, which has no warmup: leave --lr-warmup-steps out"
                ));
            }
        }
        if self.mixed_precision == MixedPrecision::Bf16 && self.device == DeviceArg::Cpu {
            return Err(
                "--mixed-precision bf16 needs --device cuda: candle has no bf16 matrix product on the CPU (use no, or fp16)"
                    .into(),
            );
        }
        super::grid::check(self)?;
        if self.output_name.is_empty() || self.output_name.contains(['/', '\\']) {
            return Err(format!(
                "--output-name {:?}: a file name without folders",
                self.output_name
            ));
        }
        Ok(())
    }

    pub fn prediction_override(&self) -> Option<Prediction> {
        self.v_parameterization.then_some(Prediction::VPrediction)
    }
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(after_help = "Examples:\n  \
    sdkit train lora --model v1-5-pruned-emaonly.safetensors --data train/ --out lora/ \\\n    \
    --output-name ron --network-dim 32 --network-alpha 16 --learning-rate 1e-4 --max-train-epochs 10\n  \
    sdkit train lora --config recipes/lora-character.yaml --data train/ --out lora/ --dry-run\n\n\
DATA is a kohya train_data_dir (<repeats>_<name> folders) or the folder `sdkit prep` wrote\n\
(its img/ and reg/ are both used). Files: OUT/NAME.safetensors, OUT/NAME-000004.safetensors\n\
per saved epoch, OUT/NAME-state/ with --save-state.")]
pub struct LoraOptions {
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainOptions,

    /// LoRA rank of linear and 1x1 conv layers.
    #[arg(long, default_value_t = 4)]
    pub network_dim: usize,
    /// Scale = alpha / dim.
    #[arg(long, default_value_t = 1.0)]
    pub network_alpha: f64,
    /// LoCon: rank of the 3x3 convs in resnets and resamplers (off when not given).
    #[arg(long)]
    pub conv_dim: Option<usize>,
    #[arg(long, default_value_t = 1.0)]
    pub conv_alpha: f64,
    /// Dropout on the LoRA's down output while training (kohya's network_dropout).
    #[arg(long)]
    pub network_dropout: Option<f64>,
    #[arg(long)]
    pub network_train_unet_only: bool,
    #[arg(long)]
    pub network_train_text_encoder_only: bool,

    /// Learning rate of the UNet modules (default: --learning-rate).
    #[arg(long)]
    pub unet_lr: Option<f64>,
    /// Learning rate of the text-encoder modules (default: --learning-rate).
    #[arg(long)]
    pub text_encoder_lr: Option<f64>,
}

impl std::ops::Deref for LoraOptions {
    type Target = TrainOptions;
    fn deref(&self) -> &TrainOptions {
        &self.train
    }
}

impl LoraOptions {
    pub fn validate(&self) -> Result<(), String> {
        self.train.validate()?;
        self.train.number_learning_rate("a LoRA")?;
        if self.network_train_unet_only && self.network_train_text_encoder_only {
            return Err(
                "--network-train-unet-only and --network-train-text-encoder-only exclude each other"
                    .into(),
            );
        }
        if self.network_dim == 0 {
            return Err("--network-dim must be at least 1".into());
        }
        if let Some(p) = self.network_dropout
            && !(0.0..1.0).contains(&p)
        {
            return Err(format!("--network-dropout {p}: a probability in [0, 1)"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(after_help = "Examples:\n  \
    sdkit train hypernetwork --model v1-5-pruned-emaonly.safetensors --data train/ --out hn/ \\\n    \
    --output-name ink --layer-structure 1,2,1 --activation-func relu --learning-rate 5e-6 --max-train-steps 2000\n\n\
Files: OUT/NAME.pt (webui's hypernetwork format: models/hypernetworks/), OUT/NAME-000004.pt\n\
per saved epoch, OUT/NAME-state/ with --save-state.\n\
--learning-rate also takes webui's schedule, e.g. \"5e-5:100, 5e-6:1500, 5e-7\".")]
pub struct HypernetworkOptions {
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainOptions,
    #[command(flatten)]
    #[serde(flatten)]
    pub shape: crate::adapters::hypernetwork::HypernetworkShape,
}

impl std::ops::Deref for HypernetworkOptions {
    type Target = TrainOptions;
    fn deref(&self) -> &TrainOptions {
        &self.train
    }
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(after_help = "Examples:\n  \
    sdkit train textual-inversion --model v1-5-pruned-emaonly.safetensors --data train/ --out emb/ \\\n    \
    --output-name mycat --init-word cat --num-vectors-per-token 4 --template subject --learning-rate 5e-3\n\n\
Files: OUT/NAME.safetensors (kohya's emb_params, which webui reads from models/embeddings/;\n\
write NAME in a prompt to use it; OUT/NAME.pt with --save-format pt), OUT/NAME-000004.safetensors\n\
per saved epoch, OUT/NAME-state/ with --save-state.\n\
--learning-rate also takes webui's schedule, e.g. \"0.005:100, 1e-3:1000, 1e-5\".")]
pub struct TextualInversionOptions {
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainOptions,
    /// The word that calls the embedding in prompts (default: --output-name).
    #[arg(long)]
    pub token_string: Option<String>,
    /// Start from this word's token embeddings (webui's rule; empty: zeros).
    #[arg(long, default_value = "*")]
    pub init_word: String,
    /// Vectors (tokens) the embedding takes in a prompt.
    #[arg(long, default_value_t = 1)]
    pub num_vectors_per_token: usize,
    /// Training prompts: `subject`, `style` or a template FILE (lines with [name] and
    /// [filewords]); without it the captions are used, with --trigger replaced.
    #[arg(long, value_name = "subject|style|FILE")]
    pub template: Option<String>,
    /// Without --template: this word in the captions becomes the embedding's name.
    #[arg(long)]
    pub trigger: Option<String>,
    /// File format: safetensors (kohya's emb_params), pt (webui's embedding .pt) or
    /// diffusers ({name: vectors}, learned_embeds.safetensors).
    #[arg(long, value_enum, default_value_t = EmbeddingFormat::Safetensors)]
    #[serde(default)]
    pub save_format: EmbeddingFormat,
}

/// `--save-format` of textual inversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddingFormat {
    /// kohya's `{"emb_params": [n, w]}` with the SAI model spec.
    #[default]
    Safetensors,
    /// webui's `.pt` (`string_to_param`, `step`, `sd_checkpoint`, ...).
    Pt,
    /// diffusers' `{name: [n, w]}` (`learned_embeds.safetensors`).
    Diffusers,
}

impl std::ops::Deref for TextualInversionOptions {
    type Target = TrainOptions;
    fn deref(&self) -> &TrainOptions {
        &self.train
    }
}

impl TextualInversionOptions {
    /// The embedding's name (the word that calls it).
    pub fn name(&self) -> String {
        self.token_string
            .clone()
            .unwrap_or_else(|| self.output_name.clone())
    }
}

#[derive(Debug, Clone, clap::Args, Serialize, Deserialize)]
#[command(after_help = "Examples:\n  \
    sdkit train dreambooth --model v1-5-pruned-emaonly.safetensors --data train/ --out db/ \\\n    \
    --output-name ohwx-dog --learning-rate 1e-6 --max-train-steps 800 --gradient-checkpointing \\\n    \
    --class-prompt \"a photo of a dog\" --num-class-images 200 --prior-loss-weight 1.0\n\n\
DATA holds the instance images (<repeats>_<name> folders); class (regularisation) images come\n\
from --reg or DATA/reg. With --class-prompt, the missing class images are generated first into\n\
REG/1_<class prompt>/ (REG defaults to OUT/class_images), resumably.\n\
Files: OUT/NAME.safetensors, a single-file checkpoint (webui's models/Stable-diffusion/),\n\
OUT/NAME-000004.safetensors per saved epoch, OUT/NAME/ (diffusers folder) with --save-diffusers,\n\
OUT/NAME-state/ with --save-state.")]
pub struct DreamBoothOptions {
    #[command(flatten)]
    #[serde(flatten)]
    pub train: TrainOptions,
    /// Also train the text encoder (kohya trains it unless --stop-text-encoder-training
    /// is negative; diffusers only with this flag).
    #[arg(long)]
    pub train_text_encoder: bool,
    /// Stop training the text encoder after this many steps (implies
    /// --train-text-encoder).
    #[arg(long)]
    pub stop_text_encoder_training: Option<u64>,
    /// Learning rate of the text encoder (default: --learning-rate).
    #[arg(long, alias = "learning-rate-te")]
    pub text_encoder_lr: Option<f64>,
    /// Generate missing class images with this prompt (the frozen model) before training.
    #[arg(long)]
    pub class_prompt: Option<String>,
    /// How many class images the class folder should hold (with --class-prompt).
    #[arg(long, default_value_t = 100)]
    pub num_class_images: usize,
    /// Sampling steps of each generated class image (sampler: --sample-sampler).
    #[arg(long, default_value_t = 30)]
    pub class_steps: usize,
    /// Also write the final model as a diffusers folder OUT/NAME/.
    #[arg(long)]
    pub save_diffusers: bool,
    /// Update each UNet weight as soon as its gradient exists, during the backward
    /// (kohya's --fused_backward_pass): the step never holds every gradient at once (3.4 GB
    /// for SD1.5). --max-grad-norm then clips each weight's gradient on its own, as in
    /// kohya. Not with --gradient-accumulation-steps above 1 or --optimizer prodigy.
    #[arg(long)]
    pub fused_backward_pass: bool,
}

impl std::ops::Deref for DreamBoothOptions {
    type Target = TrainOptions;
    fn deref(&self) -> &TrainOptions {
        &self.train
    }
}

impl DreamBoothOptions {
    pub fn validate(&self) -> Result<(), String> {
        self.train.validate()?;
        self.train.number_learning_rate("DreamBooth")?;
        if self.mixed_precision != MixedPrecision::No {
            let mp = if self.mixed_precision == MixedPrecision::Fp16 {
                "fp16"
            } else {
                "bf16"
            };
            return Err(format!(
                "--mixed-precision {mp} with dreambooth: the trained weights are kept in f32 (half-precision weights lose small updates); use --mixed-precision no"
            ));
        }
        if self.class_prompt.is_some() && self.num_class_images == 0 {
            return Err("--class-prompt needs --num-class-images of at least 1".into());
        }
        if self.class_steps == 0 {
            return Err("--class-steps must be at least 1".into());
        }
        if self.fused_backward_pass {
            if self.gradient_accumulation_steps > 1 {
                return Err("--fused-backward-pass updates the weights in each backward: it does not work with --gradient-accumulation-steps above 1".into());
            }
            if self.optimizer == super::optim::OptimizerKind::Prodigy {
                return Err("--fused-backward-pass updates each weight on its own: --optimizer prodigy needs every gradient at once for its step size; use adafactor, adamw, adamw8bit, lion or sgd".into());
            }
        }
        Ok(())
    }

    /// Whether the text encoder trains (at all).
    pub fn trains_text_encoder(&self) -> bool {
        self.train_text_encoder || self.stop_text_encoder_training.is_some_and(|n| n > 0)
    }
}
