//! Context transforms for attention keys and values (A1111 hypernetworks), held as data.
//!
//! An attention layer computes `k = to_k(hook_k(ctx))`, `v = to_v(hook_v(ctx))` when a
//! transform is registered for the width of its context `ctx`, and `to_k(ctx)`, `to_v(ctx)`
//! otherwise. As in webui (`context = default(context, x)` before `apply_hypernetworks`),
//! this holds for self-attention too, whose context is the hidden states themselves: a
//! hypernetwork with sizes 768, 320, 640, 1280 changes `attn2` everywhere (768 = CLIP
//! width) and `attn1` in every block. Register only the context width (768 / 1024) to touch
//! cross-attention alone.

use super::super::Result;
use candle_core::Tensor;
use std::collections::BTreeMap;
use std::sync::Arc;

/// A differentiable map [B, L, C] -> [B, L, C]; it may close over trainable `Var`s.
pub type ContextFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The transforms for one context width: one for keys, one for values.
#[derive(Clone)]
pub struct KvTransform {
    pub k: ContextFn,
    pub v: ContextFn,
}

/// Transforms by context width (the last dimension of the attention context).
#[derive(Clone, Default)]
pub struct ContextHooks {
    by_width: BTreeMap<usize, KvTransform>,
}

impl std::fmt::Debug for ContextHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ContextHooks")
            .field("widths", &self.by_width.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ContextHooks {
    /// Register (or replace) the transforms for contexts `width` wide.
    pub fn insert(&mut self, width: usize, k: ContextFn, v: ContextFn) {
        self.by_width.insert(width, KvTransform { k, v });
    }

    pub fn remove(&mut self, width: usize) -> Option<KvTransform> {
        self.by_width.remove(&width)
    }

    pub fn clear(&mut self) {
        self.by_width.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.by_width.is_empty()
    }

    /// The key and value inputs for context `ctx` [B, L, C].
    pub fn apply(&self, ctx: &Tensor) -> Result<(Tensor, Tensor)> {
        let width = ctx.dims().last().copied().unwrap_or(0);
        match self.by_width.get(&width) {
            None => Ok((ctx.clone(), ctx.clone())),
            Some(t) => Ok(((t.k)(ctx)?, (t.v)(ctx)?)),
        }
    }
}
