//! Adapters swapped in and out of a loaded model without reloading it: the layer weights
//! are remembered once (shared tensors, no copy) and put back exactly after a merged
//! adapter, so the next one starts from the checkpoint's own bytes, not from `w + d - d`.

use crate::model::clip::ClipTextModel;
use crate::model::nn::walk::LayerMut;
use crate::model::unet::UNet2DConditionModel;
use crate::model::weights::Param;

/// Takes every adapter off a model in place: the low-rank delta of each Linear / Conv2d
/// (LoRA / LoCon), the attention context hooks (hypernetworks), the extra token vectors
/// (textual inversion) and gradient checkpointing. Layer weights are left as they are.
pub fn bare(unet: &mut UNet2DConditionModel, te: &mut ClipTextModel) -> crate::model::Result<()> {
    let mut clear = |_: &str, _, l: LayerMut| match l {
        LayerMut::Linear(l) => l.delta = None,
        LayerMut::Conv(c) => c.delta = None,
    };
    unet.walk_mut(&mut clear);
    te.walk_mut(&mut clear);
    unet.hooks.clear();
    unet.checkpointing = None;
    let vocab = te.config.vocab;
    te.set_extra(crate::model::placeholders::Placeholders::new(vocab), None)
}

/// Every Linear / Conv2d weight of a UNet and text encoder, in walk order.
pub struct WeightSnapshot {
    unet: Vec<Param>,
    te: Vec<Param>,
}

fn weight(layer: LayerMut) -> Param {
    match layer {
        LayerMut::Linear(l) => l.weight.clone(),
        LayerMut::Conv(c) => c.weight.clone(),
    }
}

fn put(layer: LayerMut, p: &Param) {
    match layer {
        LayerMut::Linear(l) => l.weight = p.clone(),
        LayerMut::Conv(c) => c.weight = p.clone(),
    }
}

impl WeightSnapshot {
    /// Remember the current weights (candle tensors share storage: this copies nothing).
    pub fn take(unet: &mut UNet2DConditionModel, te: &mut ClipTextModel) -> Self {
        let (mut u, mut t) = (Vec::new(), Vec::new());
        unet.walk_mut(&mut |_, _, l| u.push(weight(l)));
        te.walk_mut(&mut |_, _, l| t.push(weight(l)));
        Self { unet: u, te: t }
    }

    /// Put the remembered weights back (the models must be the ones it was taken from).
    pub fn restore(&self, unet: &mut UNet2DConditionModel, te: &mut ClipTextModel) {
        let mut i = 0;
        unet.walk_mut(&mut |_, _, l| {
            if let Some(p) = self.unet.get(i) {
                put(l, p);
            }
            i += 1;
        });
        let mut i = 0;
        te.walk_mut(&mut |_, _, l| {
            if let Some(p) = self.te.get(i) {
                put(l, p);
            }
            i += 1;
        });
    }
}
