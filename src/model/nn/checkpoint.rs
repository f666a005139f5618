//! Gradient checkpointing: run a block without keeping its activations, and recompute
//! them in the backward (diffusers' `gradient_checkpointing`, per resnet and transformer).
//!
//! candle records every op whose inputs are tracked and keeps the whole graph until the
//! gradient store is dropped. [`Checkpointing::run2`] evaluates `f(a, b)` inside
//! [`no_grad`] (trainable `Var`s read as plain tensors, so nothing is recorded) and puts a
//! single custom op on `(a, b)` into the graph: the activations inside `f` are freed as soon
//! as the forward moves on. Its backward runs `f` again with the inputs as fresh leaves,
//! backpropagates the incoming gradient through that small graph, returns the gradients
//! of `a` and `b`, and adds the gradients of the trainable `Var`s used inside `f` to this
//! sidecar (a custom op can only return gradients for its own inputs). The trainer adds
//! the sidecar to the outer gradients ([`Checkpointing::take`]).
//!
//! `f` must compute the same function both times: dropout masks come from a key fixed for
//! the step (see `layers::Dropout`), so the recomputation draws the same masks.

use super::grad::{Handover, no_grad, with_grad};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// A recomputable block with two inputs.
pub type Block2 = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// The trainable variables and the gradients of theirs that checkpointed blocks produced.
pub struct Checkpointing {
    vars: Vec<Var>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl std::fmt::Debug for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointing")
            .field("vars", &self.vars.len())
            .finish()
    }
}

impl Checkpointing {
    /// `vars`: every trainable variable a checkpointed block may read.
    pub fn new(vars: Vec<Var>) -> Arc<Self> {
        Arc::new(Self {
            vars,
            grads: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
        self.grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpointing: poisoned".into()))
    }

    /// Removes and returns `v`'s gradient collected from recomputed blocks.
    pub fn take(&self, v: &Var) -> Result<Option<Tensor>> {
        Ok(self.lock()?.remove(&v.as_tensor().id()))
    }

    /// Forgets every collected gradient (a step that failed midway).
    pub fn clear(&self) -> Result<()> {
        self.lock()?.clear();
        Ok(())
    }

    /// `f(a, b)`, checkpointed. Without tracking (inference, or inside another
    /// checkpointed block's first forward) it is plain `f(a, b)`.
    pub fn run2(self: &Arc<Self>, a: &Tensor, b: &Tensor, f: Block2) -> Result<Tensor> {
        if !super::grad::tracking() {
            return f(a, b);
        }
        let y = no_grad(|| f(&a.detach(), &b.detach()))?;
        // The op must be in the graph even when neither input is tracked (the first block
        // after frozen layers): its trainable parameters still need their gradients.
        let forced = !a.track_op() && !b.track_op();
        let a_in = if forced {
            Var::from_tensor(&a.detach())?.into_inner()
        } else {
            a.clone()
        };
        let op = Recompute {
            out: Handover::new(y),
            f,
            sink: self.clone(),
            a_needed: !forced,
        };
        a_in.apply_op2(b, op)
    }

    fn collect(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let mut map = self.lock()?;
        for v in &self.vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.detach();
                let id = v.as_tensor().id();
                let sum = match map.remove(&id) {
                    Some(prev) => (prev + g)?,
                    None => g,
                };
                map.insert(id, sum);
            }
        }
        Ok(())
    }
}

struct Recompute {
    out: Handover,
    f: Block2,
    sink: Arc<Checkpointing>,
    a_needed: bool,
}

impl CustomOp2 for Recompute {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let need_a = self.a_needed && a.track_op();
        let need_b = b.track_op();
        let leaf = |t: &Tensor, need: bool| -> Result<Tensor> {
            if need {
                Ok(Var::from_tensor(&t.detach())?.into_inner())
            } else {
                Ok(t.detach())
            }
        };
        let (la, lb) = (leaf(a, need_a)?, leaf(b, need_b)?);
        let grads = with_grad(|| -> Result<_> {
            let y = (self.f)(&la, &lb)?;
            if !y.track_op() {
                return Ok(None);
            }
            Ok(Some((y * grad.detach())?.sum_all()?.backward()?))
        })?;
        let Some(grads) = grads else {
            return Ok((None, None));
        };
        self.sink.collect(&grads)?;
        let pick =
            |t: &Tensor, need: bool| need.then(|| grads.get(t).map(|g| g.detach())).flatten();
        Ok((pick(&la, need_a), pick(&lb, need_b)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A two-input block with a trainable weight inside: gradients of both inputs and of
    /// the weight equal the un-checkpointed graph's, and the checkpointed output carries
    /// one op, not the block's graph.
    #[test]
    fn same_gradients_as_the_plain_graph() {
        let dev = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, -1.0]], &dev).unwrap()).unwrap();
        let c = Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &dev).unwrap();
        let wv = w.clone();
        let f: Block2 = Arc::new(move |x: &Tensor, c: &Tensor| {
            let h = x.matmul(&super::super::grad::param(&wv))?.tanh()?;
            (h * c)?.exp()
        });
        let loss = |y: Tensor| (y.sqr().unwrap() * 0.5).unwrap().sum_all().unwrap();

        let x = (x0.as_tensor() * 2.0).unwrap();
        let plain = loss(f(&x, &c).unwrap()).backward().unwrap();

        let ck = Checkpointing::new(vec![w.clone()]);
        let x = (x0.as_tensor() * 2.0).unwrap();
        let y = ck.run2(&x, &c, f.clone()).unwrap();
        let ours = loss(y).backward().unwrap();
        let wg = ck.take(&w).unwrap().unwrap();
        assert!(ours.get(w.as_tensor()).is_none());
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v(&wg), v(plain.get(w.as_tensor()).unwrap()));
        assert_eq!(
            v(ours.get(x0.as_tensor()).unwrap()),
            v(plain.get(x0.as_tensor()).unwrap())
        );
        assert!(ck.take(&w).unwrap().is_none());
    }

    /// Untracked inputs (the first block after frozen layers): the op is still recorded,
    /// so the parameters inside get their gradient; the second input's gradient flows
    /// when it is tracked.
    #[test]
    fn parameters_inside_get_gradients_when_inputs_are_frozen() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.5f32, -0.5], &dev).unwrap()).unwrap();
        let wv = w.clone();
        let f: Block2 = Arc::new(move |x: &Tensor, c: &Tensor| {
            x.broadcast_mul(&super::super::grad::param(&wv))?
                .broadcast_add(c)
        });
        let x = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let c0 = Var::from_tensor(&Tensor::new(&[0.5f32, 0.5], &dev).unwrap()).unwrap();
        let ck = Checkpointing::new(vec![w.clone()]);
        let y = ck.run2(&x, c0.as_tensor(), f.clone()).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let wg = ck.take(&w).unwrap().unwrap();
        assert_eq!(wg.to_vec1::<f32>().unwrap(), vec![4.0, 6.0]);
        assert_eq!(
            g.get(c0.as_tensor()).unwrap().to_vec1::<f32>().unwrap(),
            vec![2.0, 2.0]
        );
        // No tracking at all (inference): plain evaluation, no op.
        let y = no_grad(|| ck.run2(&x, &c0.as_tensor().detach(), f.clone())).unwrap();
        assert!(!y.track_op());
    }
}
