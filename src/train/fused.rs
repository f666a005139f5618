//! The fused backward pass (kohya's `--fused_backward_pass`): each UNet weight is updated
//! as soon as the backward of its block has produced its gradient, and the gradient is
//! dropped at once, so a step never holds the gradients of every weight together (3.4 GB
//! for SD1.5's UNet). The blocks' own graphs (the staged backward, or the recomputed
//! ones with gradient checkpointing) hand each gradient to the optimizer through
//! [`Checkpointing::fuse`]; the weights outside the blocks (the UNet's first and last
//! layers, the time embedding, the text encoder) are updated after the backward.
//!
//! The optimizer updates each parameter from its own gradient (all but Prodigy), so the
//! result is the unfused step's, except for gradient clipping, which becomes per weight
//! (each gradient scaled to at most `--max-grad-norm`), as in kohya.

use super::optim::{Group, Optimizer, clip_grad_norm};
use crate::model::nn::checkpoint::{Checkpointing, FusedUpdate};
use candle_core::{Result, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where each trained variable sits in the optimizer (group, index), and the blocks'
/// gradient handover.
pub struct Fused {
    ck: Arc<Checkpointing>,
    index: Arc<HashMap<TensorId, (usize, usize)>>,
    vars: Vec<Vec<Var>>,
}

fn err(msg: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!("fused backward pass: {msg}"))
}

/// `g` scaled to an L2 norm of at most `max_norm` (0: as it is).
fn clip(g: Tensor, max_norm: f64) -> Result<Tensor> {
    if max_norm <= 0.0 {
        return Ok(g);
    }
    let mut one = [vec![g]];
    clip_grad_norm(&mut one, max_norm)?;
    let [mut v] = one;
    v.pop().ok_or_else(|| err("no gradient"))
}

impl Fused {
    pub fn new(ck: Arc<Checkpointing>, groups: &[Group]) -> Self {
        let mut index = HashMap::new();
        for (gi, g) in groups.iter().enumerate() {
            for (vi, v) in g.vars.iter().enumerate() {
                index.insert(v.as_tensor().id(), (gi, vi));
            }
        }
        Self {
            ck,
            index: Arc::new(index),
            vars: groups.iter().map(|g| g.vars.clone()).collect(),
        }
    }

    /// The backward of `loss` with one optimizer step inside it, at the rates `lrs` (one
    /// per group); clipping per weight to `max_norm`.
    pub fn step(
        &self,
        opt: &mut Optimizer,
        loss: &Tensor,
        lrs: &[f64],
        max_norm: f64,
    ) -> Result<()> {
        opt.begin_step();
        // The update runs inside the backward, which holds it in the blocks' sidecar: the
        // optimizer is lent to it for the step and taken back after.
        let placeholder = Optimizer::new(opt.hyper, Vec::new());
        let shared = Arc::new(Mutex::new(std::mem::replace(opt, placeholder)));
        let result = self.backward(&shared, loss, lrs, max_norm);
        let off = self.ck.fuse(None);
        let back = Arc::try_unwrap(shared)
            .map_err(|_| err("the optimizer is still lent"))?
            .into_inner()
            .map_err(|_| err("poisoned"))?;
        *opt = back;
        result.and(off)
    }

    fn backward(
        &self,
        opt: &Arc<Mutex<Optimizer>>,
        loss: &Tensor,
        lrs: &[f64],
        max_norm: f64,
    ) -> Result<()> {
        let lock = || opt.lock().map_err(|_| err("poisoned"));
        let (index, shared, rates) = (self.index.clone(), opt.clone(), lrs.to_vec());
        let update: FusedUpdate = Box::new(move |v: &Var, g: Tensor| {
            let &(gi, vi) = index
                .get(&v.as_tensor().id())
                .ok_or_else(|| err("a block weight the optimizer does not hold"))?;
            let g = clip(g, max_norm)?;
            let mut o = shared.lock().map_err(|_| err("poisoned"))?;
            o.update_one(gi, vi, &g, rates[gi])
        });
        self.ck.fuse(Some(update))?;
        let grads = loss.backward()?;
        self.ck.fuse(None)?;
        // The weights no block read: their gradients are complete now.
        for (gi, vars) in self.vars.iter().enumerate() {
            for (vi, v) in vars.iter().enumerate() {
                let g = grads.get(v.as_tensor()).map(|g| g.detach());
                if self.ck.fused_done(v)? {
                    if g.is_some() {
                        return Err(err("a weight is read inside and outside the blocks"));
                    }
                    continue;
                }
                // As the unfused step: a weight without a gradient still takes its step
                // (weight decay, moments) with a zero one.
                let g = match g {
                    Some(g) => clip(g, max_norm)?,
                    None => v.as_tensor().zeros_like()?,
                };
                lock()?.update_one(gi, vi, &g, lrs[gi])?;
            }
        }
        Ok(())
    }
}
