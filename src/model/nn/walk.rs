//! The named-layer walk: every `Linear` / `Conv2d` of the UNet and the text encoder with
//! its diffusers / HF path and the module it sits in. Adapters attach, save and load
//! through this one mapping (kohya's LoRA key is `lora_unet_` / `lora_te_` + the path with
//! `.` -> `_`), so there is no second table of names to drift.

use super::{Conv2d, Linear};
use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet::resnet::ResnetBlock2D;
use crate::model::unet::transformer::{Attention, Proj, Transformer2DModel};

/// The module class a layer belongs to (kohya picks LoRA targets by these names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parent {
    /// Inside a UNet `Transformer2DModel`.
    Transformer,
    /// Inside a UNet `ResnetBlock2D`.
    Resnet,
    /// A UNet `Downsample2D` (`downsamplers.0.conv`).
    Downsample,
    /// A UNet `Upsample2D` (`upsamplers.0.conv`).
    Upsample,
    /// A text encoder `CLIPAttention`.
    ClipAttention,
    /// A text encoder `CLIPMLP`.
    ClipMlp,
    /// Anything else (`conv_in`, `time_embedding`, `conv_out`).
    Other,
}

/// A layer reached by the walk.
pub enum LayerMut<'a> {
    Linear(&'a mut Linear),
    Conv(&'a mut Conv2d),
}

impl LayerMut<'_> {
    /// (out, in, kernel) of the layer's weight; kernel 1 for a Linear.
    pub fn shape(&self) -> (usize, usize, usize) {
        let dims = |d: &[usize]| (d[0], d[1], d.get(2).copied().unwrap_or(1));
        match self {
            LayerMut::Linear(l) => dims(l.weight.tensor().dims()),
            LayerMut::Conv(c) => dims(c.weight.tensor().dims()),
        }
    }
}

/// The callback of a walk: (path, parent module, layer).
pub type Visit<'f> = dyn FnMut(&str, Parent, LayerMut) + 'f;

fn attention(a: &mut Attention, path: &str, f: &mut Visit) {
    let p = Parent::Transformer;
    f(&format!("{path}.to_q"), p, LayerMut::Linear(&mut a.to_q));
    f(&format!("{path}.to_k"), p, LayerMut::Linear(&mut a.to_k));
    f(&format!("{path}.to_v"), p, LayerMut::Linear(&mut a.to_v));
    f(
        &format!("{path}.to_out.0"),
        p,
        LayerMut::Linear(&mut a.to_out),
    );
}

fn proj<'a>(p: &'a mut Proj) -> LayerMut<'a> {
    match p {
        Proj::Conv(c) => LayerMut::Conv(c),
        Proj::Linear(l) => LayerMut::Linear(l),
    }
}

fn transformer(t: &mut Transformer2DModel, path: &str, f: &mut Visit) {
    let p = Parent::Transformer;
    f(&format!("{path}.proj_in"), p, proj(&mut t.proj_in));
    for (i, b) in t.transformer_blocks.iter_mut().enumerate() {
        let bp = format!("{path}.transformer_blocks.{i}");
        attention(&mut b.attn1, &format!("{bp}.attn1"), f);
        attention(&mut b.attn2, &format!("{bp}.attn2"), f);
        f(
            &format!("{bp}.ff.net.0.proj"),
            p,
            LayerMut::Linear(&mut b.ff.proj),
        );
        f(
            &format!("{bp}.ff.net.2"),
            p,
            LayerMut::Linear(&mut b.ff.out),
        );
    }
    f(&format!("{path}.proj_out"), p, proj(&mut t.proj_out));
}

fn resnet(r: &mut ResnetBlock2D, path: &str, f: &mut Visit) {
    let p = Parent::Resnet;
    f(&format!("{path}.conv1"), p, LayerMut::Conv(&mut r.conv1));
    f(
        &format!("{path}.time_emb_proj"),
        p,
        LayerMut::Linear(&mut r.time_emb_proj),
    );
    f(&format!("{path}.conv2"), p, LayerMut::Conv(&mut r.conv2));
    if let Some(c) = &mut r.conv_shortcut {
        f(&format!("{path}.conv_shortcut"), p, LayerMut::Conv(c));
    }
}

fn blocks(
    path: &str,
    resnets: &mut [ResnetBlock2D],
    attentions: &mut [Transformer2DModel],
    f: &mut Visit,
) {
    for (i, r) in resnets.iter_mut().enumerate() {
        resnet(r, &format!("{path}.resnets.{i}"), f);
    }
    for (i, t) in attentions.iter_mut().enumerate() {
        transformer(t, &format!("{path}.attentions.{i}"), f);
    }
}

impl UNet2DConditionModel {
    /// Visit every Linear and Conv2d with its diffusers path, in diffusers' module order.
    pub fn walk_mut(&mut self, f: &mut Visit) {
        let o = Parent::Other;
        f("conv_in", o, LayerMut::Conv(&mut self.conv_in));
        let te = &mut self.time_embedding;
        f(
            "time_embedding.linear_1",
            o,
            LayerMut::Linear(&mut te.linear_1),
        );
        f(
            "time_embedding.linear_2",
            o,
            LayerMut::Linear(&mut te.linear_2),
        );
        for (i, b) in self.down_blocks.iter_mut().enumerate() {
            let path = format!("down_blocks.{i}");
            blocks(&path, &mut b.resnets, &mut b.attentions, f);
            if let Some(c) = &mut b.downsampler {
                f(
                    &format!("{path}.downsamplers.0.conv"),
                    Parent::Downsample,
                    LayerMut::Conv(c),
                );
            }
        }
        for (i, b) in self.up_blocks.iter_mut().enumerate() {
            let path = format!("up_blocks.{i}");
            blocks(&path, &mut b.resnets, &mut b.attentions, f);
            if let Some(c) = &mut b.upsampler {
                f(
                    &format!("{path}.upsamplers.0.conv"),
                    Parent::Upsample,
                    LayerMut::Conv(c),
                );
            }
        }
        let m = &mut self.mid_block;
        blocks("mid_block", &mut m.resnets, &mut m.attentions, f);
        f("conv_out", o, LayerMut::Conv(&mut self.conv_out));
    }
}

impl ClipTextModel {
    /// Visit every Linear of the encoder layers with its HF path
    /// (`text_model.encoder.layers.N.self_attn.q_proj`, `...mlp.fc1`).
    pub fn walk_mut(&mut self, f: &mut Visit) {
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = format!("text_model.encoder.layers.{i}");
            let a = &mut l.self_attn;
            let pa = Parent::ClipAttention;
            f(
                &format!("{p}.self_attn.q_proj"),
                pa,
                LayerMut::Linear(&mut a.q_proj),
            );
            f(
                &format!("{p}.self_attn.k_proj"),
                pa,
                LayerMut::Linear(&mut a.k_proj),
            );
            f(
                &format!("{p}.self_attn.v_proj"),
                pa,
                LayerMut::Linear(&mut a.v_proj),
            );
            f(
                &format!("{p}.self_attn.out_proj"),
                pa,
                LayerMut::Linear(&mut a.out_proj),
            );
            f(
                &format!("{p}.mlp.fc1"),
                Parent::ClipMlp,
                LayerMut::Linear(&mut l.fc1),
            );
            f(
                &format!("{p}.mlp.fc2"),
                Parent::ClipMlp,
                LayerMut::Linear(&mut l.fc2),
            );
        }
    }
}
