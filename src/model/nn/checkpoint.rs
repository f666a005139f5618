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
//!
//! [`Checkpointing::keep`] is the same machinery without the recompute (a staged
//! backward): each block's graph is built once in the forward, kept apart from the outer
//! graph inside the block's op, and dropped as soon as that op's backward has run. candle
//! frees nothing during a backward (every activation stays reachable from the loss until
//! the gradient store is done), so without stages the peak holds all activations *and*
//! all gradients; with them the activations of the blocks already done are freed while
//! the gradients grow, as PyTorch's autograd does. That matters when the gradients are
//! large (DreamBooth: one per UNet weight, 3.4 GB for SD1.5).

use super::grad::{Handover, no_grad, with_grad};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// A recomputable block with two inputs.
pub type Block2 = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// What the fused backward pass does with a weight's gradient as soon as a block's
/// backward has produced it (update the weight, then drop the gradient).
pub type FusedUpdate = Box<dyn FnMut(&Var, Tensor) -> Result<()> + Send>;

/// The trainable variables and the gradients of theirs that checkpointed blocks produced.
pub struct Checkpointing {
    vars: Vec<Var>,
    grads: Mutex<HashMap<TensorId, Tensor>>,
    /// Keep each block's graph (staged backward) instead of recomputing it.
    keep: bool,
    /// The fused backward pass: the update each block gradient goes to instead of
    /// `grads`, and the variables it has updated this step.
    fused: Mutex<(Option<FusedUpdate>, HashSet<TensorId>)>,
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
            keep: false,
            fused: Mutex::default(),
        })
    }

    /// Staged backward: blocks run once and keep their own graph until their backward
    /// (see the module docs); same gradients as the plain graph, no recompute.
    pub fn keep(vars: Vec<Var>) -> Arc<Self> {
        Arc::new(Self {
            vars,
            grads: Mutex::new(HashMap::new()),
            keep: true,
            fused: Mutex::default(),
        })
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
        self.grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpointing: poisoned".into()))
    }

    /// Removes and returns `v`'s gradient collected from blocks with their own graph
    /// (recomputed or staged).
    pub fn take(&self, v: &Var) -> Result<Option<Tensor>> {
        Ok(self.lock()?.remove(&v.as_tensor().id()))
    }

    /// Forgets every collected gradient (a step that failed midway) and which variables
    /// the fused update has seen.
    pub fn clear(&self) -> Result<()> {
        self.lock()?.clear();
        self.lock_fused()?.1.clear();
        Ok(())
    }

    fn lock_fused(
        &self,
    ) -> Result<std::sync::MutexGuard<'_, (Option<FusedUpdate>, HashSet<TensorId>)>> {
        self.fused
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpointing: poisoned".into()))
    }

    /// The fused backward pass (kohya's `--fused_backward_pass`): from now on each
    /// block's weight gradients go to `update` as soon as that block's backward has run,
    /// instead of being collected; `None` turns it off (and drops `update`). A weight
    /// read by two blocks, or by a block and the outer graph, would be updated from part
    /// of its gradient: the second block reports it as an error, and [`Self::fused_done`]
    /// tells the caller which weights not to update again.
    pub fn fuse(&self, update: Option<FusedUpdate>) -> Result<()> {
        self.lock_fused()?.0 = update;
        Ok(())
    }

    /// Whether the fused update has already taken `v`'s gradient this step.
    pub fn fused_done(&self, v: &Var) -> Result<bool> {
        Ok(self.lock_fused()?.1.contains(&v.as_tensor().id()))
    }

    /// `f(a, b)`, checkpointed. Without tracking (inference, or inside another
    /// checkpointed block's first forward) it is plain `f(a, b)`.
    pub fn run2(self: &Arc<Self>, a: &Tensor, b: &Tensor, f: Block2) -> Result<Tensor> {
        if !super::grad::tracking() {
            return f(a, b);
        }
        if self.keep {
            return self.staged(a, b, &f);
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
        let op = BlockOp {
            out: Handover::new(y),
            sink: self.clone(),
            backward: Backward::Recompute {
                f,
                a_needed: !forced,
            },
        };
        a_in.apply_op2(b, op)
    }

    /// `f(a, b)` built on fresh leaves, its graph held by one op on `(a, b)` until that
    /// op's backward. A block whose inputs are both untracked stays in the outer graph
    /// (nothing before it needs a gradient, so nothing is gained by a stage).
    fn staged(self: &Arc<Self>, a: &Tensor, b: &Tensor, f: &Block2) -> Result<Tensor> {
        let (need_a, need_b) = (a.track_op(), b.track_op());
        if !need_a && !need_b {
            return f(a, b);
        }
        let (la, lb) = (leaf(a, need_a)?, leaf(b, need_b)?);
        let y = f(&la, &lb)?;
        let op = BlockOp {
            out: Handover::new(y.detach()),
            sink: self.clone(),
            backward: Backward::Staged {
                graph: Mutex::new(Some((la, lb, y))),
                need: (need_a, need_b),
            },
        };
        a.apply_op2(b, op)
    }

    fn collect(&self, grads: &candle_core::backprop::GradStore) -> Result<()> {
        let mut fused = self.lock_fused()?;
        let (update, done) = &mut *fused;
        if let Some(update) = update {
            for v in &self.vars {
                if let Some(g) = grads.get(v.as_tensor()) {
                    if !done.insert(v.as_tensor().id()) {
                        return Err(candle_core::Error::Msg(
                            "fused backward pass: a weight is read by two blocks (its gradient would be split)".into(),
                        ));
                    }
                    update(v, g.detach())?;
                }
            }
            return Ok(());
        }
        drop(fused);
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

/// How a block's backward gets its graph.
enum Backward {
    /// Runs the block again (`a_needed`: false when `a` was made a leaf only to put the
    /// op into the graph).
    Recompute { f: Block2, a_needed: bool },
    /// The graph kept from the forward (leaves and tracked output), taken and dropped by
    /// the backward; `need`: which inputs want a gradient.
    Staged {
        graph: Mutex<Option<(Tensor, Tensor, Tensor)>>,
        need: (bool, bool),
    },
}

/// The op standing for a block in the outer graph: its forward hands over the block's
/// output, its backward runs the block's own graph and returns the inputs' gradients.
struct BlockOp {
    out: Handover,
    sink: Arc<Checkpointing>,
    backward: Backward,
}

impl CustomOp2 for BlockOp {
    fn name(&self) -> &'static str {
        match self.backward {
            Backward::Recompute { .. } => "checkpoint",
            Backward::Staged { .. } => "staged-block",
        }
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
        let ((la, lb), (need_a, need_b), grads) = match &self.backward {
            Backward::Recompute { f, a_needed } => {
                let need = (*a_needed && a.track_op(), b.track_op());
                let (la, lb) = (leaf(a, need.0)?, leaf(b, need.1)?);
                let grads = with_grad(|| -> Result<_> {
                    let y = f(&la, &lb)?;
                    if !y.track_op() {
                        return Ok(None);
                    }
                    Ok(Some((y * grad.detach())?.sum_all()?.backward()?))
                })?;
                let Some(grads) = grads else {
                    return Ok((None, None));
                };
                ((la, lb), need, grads)
            }
            Backward::Staged { graph, need } => {
                let (la, lb, y) = graph
                    .lock()
                    .map_err(|_| candle_core::Error::Msg("staged block: poisoned".into()))?
                    .take()
                    .ok_or_else(|| {
                        candle_core::Error::Msg("staged block: backward run twice".into())
                    })?;
                let grads = (y * grad.detach())?.sum_all()?.backward()?;
                ((la, lb), *need, grads)
            }
        };
        self.sink.collect(&grads)?;
        let pick =
            |t: &Tensor, need: bool| need.then(|| grads.get(t).map(|g| g.detach())).flatten();
        Ok((pick(&la, need_a), pick(&lb, need_b)))
    }
}

/// A block input as the root of the block's own graph: a fresh variable (a copy) when a
/// gradient is needed for it, else a detached view.
fn leaf(t: &Tensor, need: bool) -> Result<Tensor> {
    if need {
        Ok(Var::from_tensor(&t.detach())?.into_inner())
    } else {
        Ok(t.detach())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A weight `w`, an input `x0` and the block `exp(tanh(x w) * c)` reading `w`.
    fn tanh_block() -> (Device, Var, Var, Block2) {
        let dev = Device::Cpu;
        let w =
            Var::from_tensor(&Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev).unwrap()).unwrap();
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, -1.0]], &dev).unwrap()).unwrap();
        let wv = w.clone();
        let f: Block2 = Arc::new(move |x: &Tensor, c: &Tensor| {
            let h = x.matmul(&super::super::grad::param(&wv))?.tanh()?;
            (h * c)?.exp()
        });
        (dev, w, x0, f)
    }

    /// A two-input block with a trainable weight inside: gradients of both inputs and of
    /// the weight equal the un-checkpointed graph's, and the checkpointed output carries
    /// one op, not the block's graph.
    #[test]
    fn same_gradients_as_the_plain_graph() {
        let (dev, w, x0, f) = tanh_block();
        let c = Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &dev).unwrap();
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

    /// Staged (kept) blocks give the plain graph's gradients, for a parameter used both
    /// inside and outside the block too.
    #[test]
    fn staged_blocks_give_the_plain_gradients() {
        let (dev, w, x0, f) = tanh_block();
        let c0 =
            Var::from_tensor(&Tensor::new(&[[0.1f32, 0.2], [0.3, 0.4]], &dev).unwrap()).unwrap();
        let run = |ck: Option<&Arc<Checkpointing>>| {
            let x = x0.as_tensor().matmul(w.as_tensor()).unwrap();
            let c = (c0.as_tensor() * 3.0).unwrap();
            let y = match ck {
                Some(ck) => ck.run2(&x, &c, f.clone()).unwrap(),
                None => f(&x, &c).unwrap(),
            };
            let y = match ck {
                Some(ck) => ck.run2(&y, &c, f.clone()).unwrap(),
                None => f(&y, &c).unwrap(),
            };
            (y.sqr().unwrap() * 0.5)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        };
        let plain = run(None);
        let ck = Checkpointing::keep(vec![w.clone()]);
        let ours = run(Some(&ck));
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let close = |a: Vec<f32>, b: Vec<f32>| {
            assert_eq!(a.len(), b.len());
            for (p, q) in a.iter().zip(&b) {
                assert!((p - q).abs() <= 1e-5 * q.abs().max(1.0), "{a:?} vs {b:?}");
            }
        };
        // The weight: its use outside the blocks through the outer graph, inside them
        // through the sidecar.
        let inner = ck.take(&w).unwrap().unwrap();
        let outer = ours.get(w.as_tensor()).unwrap();
        close(
            v(&(outer + inner).unwrap()),
            v(plain.get(w.as_tensor()).unwrap()),
        );
        for t in [&x0, &c0] {
            close(
                v(ours.get(t.as_tensor()).unwrap()),
                v(plain.get(t.as_tensor()).unwrap()),
            );
        }
    }

    static PROBES_ALIVE: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

    /// An identity op that counts how many of its instances a graph still holds.
    struct Probe;
    impl Probe {
        fn new() -> Self {
            PROBES_ALIVE.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Probe
        }
    }
    impl Drop for Probe {
        fn drop(&mut self) {
            PROBES_ALIVE.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    impl candle_core::CustomOp1 for Probe {
        fn name(&self) -> &'static str {
            "probe"
        }
        fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
            let CpuStorage::F32(v) = s else {
                unreachable!()
            };
            let (a, b) = l.contiguous_offsets().unwrap();
            Ok((CpuStorage::F32(v[a..b].to_vec()), l.shape().clone()))
        }
        fn bwd(&self, _: &Tensor, _: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
            Ok(Some(g.clone()))
        }
    }

    /// A staged block's graph is freed once its backward has run, while the loss (and
    /// with it the outer graph) is still alive; a plain graph holds it until the loss goes.
    #[test]
    fn staged_block_graph_is_freed_by_its_backward() {
        let dev = Device::Cpu;
        let w = Var::from_tensor(&Tensor::new(&[1.5f32, -0.5], &dev).unwrap()).unwrap();
        let wv = w.clone();
        let f: Block2 = Arc::new(move |x: &Tensor, c: &Tensor| {
            let h = x.broadcast_mul(&super::super::grad::param(&wv))?;
            h.apply_op1(Probe::new())?.broadcast_add(c)
        });
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap()).unwrap();
        let c = Tensor::new(&[0.5f32, 0.5], &dev).unwrap();
        let alive = || PROBES_ALIVE.load(std::sync::atomic::Ordering::SeqCst);
        for keep in [true, false] {
            let ck = Checkpointing::keep(vec![w.clone()]);
            let x = (x0.as_tensor() * 1.0).unwrap();
            let y = match keep {
                true => ck.run2(&x, &c, f.clone()).unwrap(),
                false => f(&x, &c).unwrap(),
            };
            let loss = y.sum_all().unwrap();
            assert_eq!(alive(), 1);
            let g = loss.backward().unwrap();
            assert_eq!(alive(), if keep { 0 } else { 1 }, "keep {keep}");
            let wg = match keep {
                true => ck.take(&w).unwrap().unwrap(),
                false => g.get(w.as_tensor()).unwrap().clone(),
            };
            assert_eq!(wg.to_vec1::<f32>().unwrap(), vec![4.0, 6.0]);
            drop((loss, y));
            assert_eq!(alive(), 0);
        }
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

    /// The fused backward pass: each block's weight gradient reaches the update once,
    /// equal to the plain graph's, while the backward runs; updating the weight there
    /// leaves the gradients of everything before the block as they were (the block's own
    /// backward is done with the weight); a weight read by two blocks is an error.
    #[test]
    fn fused_update_takes_each_block_gradient_once() {
        let dev = Device::Cpu;
        let var = |v: &[f32]| Var::from_tensor(&Tensor::new(v, &dev).unwrap()).unwrap();
        let block = |w: &Var| -> Block2 {
            let w = w.clone();
            Arc::new(move |x: &Tensor, c: &Tensor| {
                x.broadcast_mul(&super::super::grad::param(&w))?
                    .tanh()?
                    .broadcast_add(c)
            })
        };
        let (w1, w2) = (var(&[1.5, -0.5]), var(&[0.25, 2.0]));
        let x0 =
            Var::from_tensor(&Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap()).unwrap();
        let c = Tensor::new(&[0.5f32, -0.5], &dev).unwrap();
        let loss = |y: Tensor| y.sqr().unwrap().sum_all().unwrap();
        let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let x = (x0.as_tensor() * 1.0).unwrap();
        let plain = loss(block(&w2)(&block(&w1)(&x, &c).unwrap(), &c).unwrap())
            .backward()
            .unwrap();
        for staged in [true, false] {
            let ck = match staged {
                true => Checkpointing::keep(vec![w1.clone(), w2.clone()]),
                false => Checkpointing::new(vec![w1.clone(), w2.clone()]),
            };
            let seen: Arc<Mutex<Vec<(TensorId, Vec<f32>)>>> = Arc::default();
            let log = seen.clone();
            ck.fuse(Some(Box::new(move |w: &Var, g: Tensor| {
                log.lock().unwrap().push((w.as_tensor().id(), v(&g)));
                w.set(&w.as_tensor().zeros_like()?)
            })))
            .unwrap();
            let (w1_0, w2_0) = (
                w1.as_tensor().copy().unwrap(),
                w2.as_tensor().copy().unwrap(),
            );
            let x = (x0.as_tensor() * 1.0).unwrap();
            let h = ck.run2(&x, &c, block(&w1)).unwrap();
            let g = loss(ck.run2(&h, &c, block(&w2)).unwrap())
                .backward()
                .unwrap();
            let seen = seen.lock().unwrap().clone();
            let ids: Vec<_> = seen.iter().map(|s| s.0).collect();
            assert_eq!(
                ids,
                [w2.as_tensor().id(), w1.as_tensor().id()],
                "staged {staged}"
            );
            assert_eq!(seen[0].1, v(plain.get(w2.as_tensor()).unwrap()));
            assert_eq!(seen[1].1, v(plain.get(w1.as_tensor()).unwrap()));
            assert_eq!(
                v(g.get(x0.as_tensor()).unwrap()),
                v(plain.get(x0.as_tensor()).unwrap())
            );
            assert!(ck.take(&w1).unwrap().is_none());
            assert!(ck.fused_done(&w1).unwrap() && ck.fused_done(&w2).unwrap());
            assert_eq!(v(w1.as_tensor()), [0.0, 0.0]);
            ck.clear().unwrap();
            assert!(!ck.fused_done(&w1).unwrap());
            w1.set(&w1_0).unwrap();
            w2.set(&w2_0).unwrap();

            // One weight in two blocks: the second one to see it refuses.
            let x = (x0.as_tensor() * 1.0).unwrap();
            let h = ck.run2(&x, &c, block(&w1)).unwrap();
            let err = loss(ck.run2(&h, &c, block(&w1)).unwrap())
                .backward()
                .unwrap_err();
            assert!(err.to_string().contains("read by two blocks"), "{err}");
            w1.set(&w1_0).unwrap();
        }
    }
}
