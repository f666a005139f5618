//! Ops with frozen operands whose backward produces only the input gradient.
//!
//! candle's backprop computes a gradient for *both* operands of a matmul, conv or binary op
//! and keeps it in the `GradStore` until the store is dropped, even when the other operand
//! is a frozen weight that nobody asked about (a plain tensor, not a `Var`). For a frozen
//! SD1.5 UNet that is 3.4 GB of weight gradients plus one output-sized tensor for every
//! frozen bias, norm scale or time-embedding add — and the FLOPs to compute them.
//!
//! [`input_grad_only`] runs `f(x)` and records a single custom op on `x` whose backward
//! is the given `dx = bwd(dy)`; the frozen operands live inside the closures, invisible
//! to backprop. When `x` is not tracked (inference, or layers before the first trainable
//! one) it is plain `f(x)`: no copy, no graph.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, Var};
use std::cell::Cell;
use std::sync::Mutex;

thread_local! {
    static NO_GRAD: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with trainable parameters read as plain tensors ([`param`]): nothing `f`
/// computes is recorded for backprop (candle has no global no-grad mode; our layers read
/// every `Var` through [`param`]). Gradient checkpointing runs its first forward this way.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    set_tracking(false, f)
}

/// Runs `f` with parameters tracked again (inside a [`no_grad`] region too).
pub fn with_grad<R>(f: impl FnOnce() -> R) -> R {
    set_tracking(true, f)
}

fn set_tracking<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            NO_GRAD.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(NO_GRAD.with(|c| c.replace(!on)));
    f()
}

/// Whether parameters are tracked on this thread (false inside [`no_grad`]).
pub fn tracking() -> bool {
    !NO_GRAD.with(|c| c.get())
}

/// A trainable parameter's value for a forward: the `Var` itself, or a detached view of
/// it inside [`no_grad`].
pub fn param(v: &Var) -> Tensor {
    if tracking() {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    }
}

type Bwd = Box<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// `f(x)` with backward `dx = bwd(dy)`; the operands captured by `f` and `bwd` get no
/// gradient. `bwd` must be the exact derivative of `f` with respect to `x`.
pub fn input_grad_only(
    x: &Tensor,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Tensor>,
    bwd: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    if !x.track_op() {
        return f(x);
    }
    let y = f(&x.detach())?;
    let op = Precomputed {
        out: Handover::new(y),
        bwd: Box::new(bwd),
    };
    x.apply_op1(op)
}

type CpuFwd =
    Box<dyn FnOnce(&CpuStorage, &Layout) -> candle_core::Result<(CpuStorage, Shape)> + Send>;

/// [`input_grad_only`] for a CPU `x` whose forward writes its result straight into a fresh
/// storage (`fwd` gets `x`'s contiguous storage): no hand-over copy of the output, and the
/// same one op whether or not `x` is tracked (untracked: nothing recorded).
pub fn input_grad_only_cpu(
    x: &Tensor,
    fwd: impl FnOnce(&CpuStorage, &Layout) -> candle_core::Result<(CpuStorage, Shape)> + Send + 'static,
    bwd: impl Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync + 'static,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(ComputedOnCpu {
        fwd: Mutex::new(Some(Box::new(fwd))),
        bwd: Box::new(bwd),
    })
}

/// The op of [`input_grad_only_cpu`].
struct ComputedOnCpu {
    fwd: Mutex<Option<CpuFwd>>,
    bwd: Bwd,
}

impl CustomOp1 for ComputedOnCpu {
    fn name(&self) -> &'static str {
        "input-grad-only-cpu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let f = self
            .fwd
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op: forward run twice".into()))?;
        f(s, l)
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad)?))
    }
}

/// `x + c` (broadcast) where `c` gets no gradient unless it is itself tracked.
pub fn add_frozen(x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    if c.track_op() {
        return x.broadcast_add(c);
    }
    input_grad_only(x, |x| x.broadcast_add(c), |g| Ok(g.clone()))
}

/// `x * c` (broadcast) where `c` gets no gradient unless tracked. With candle's `mul`, the
/// constant's gradient `dy * x` stays in the `GradStore` and, through `x`, keeps the whole
/// forward graph alive until the store is dropped (a loss weight or mask does exactly this).
pub fn mul_frozen(x: &Tensor, c: &Tensor) -> candle_core::Result<Tensor> {
    if c.track_op() {
        return x.broadcast_mul(c);
    }
    let c2 = c.clone();
    input_grad_only(x, |x| x.broadcast_mul(c), move |g| g.broadcast_mul(&c2))
}

/// `x * w + b` with `w`, `b` broadcast to `x` (a norm's affine tail); `w` and `b` get no
/// gradient unless tracked.
pub fn scale_shift_frozen(x: &Tensor, w: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if w.track_op() || b.track_op() {
        return x.broadcast_mul(w)?.broadcast_add(b);
    }
    let w2 = w.clone();
    input_grad_only(
        x,
        |x| x.broadcast_mul(w)?.broadcast_add(b),
        move |g| g.broadcast_mul(&w2),
    )
}

type Bwd2 = Box<
    dyn Fn(
            &Tensor,
            &Tensor,
            &Tensor,
            bool,
            bool,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
        + Send
        + Sync,
>;

/// `f(a, b)` with a hand-written backward `bwd(a, b, dy, need_a, need_b) -> (da, db)`
/// (operands detached; a gradient is asked for only where its operand is tracked).
pub fn with_backward2(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
    bwd: impl Fn(
        &Tensor,
        &Tensor,
        &Tensor,
        bool,
        bool,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)>
    + Send
    + Sync
    + 'static,
) -> candle_core::Result<Tensor> {
    if !a.track_op() && !b.track_op() {
        return f(a, b);
    }
    let y = f(&a.detach(), &b.detach())?;
    let op = Precomputed2 {
        out: Handover::new(y),
        bwd: Box::new(bwd),
    };
    a.apply_op2(b, op)
}

struct Precomputed2 {
    out: Handover,
    bwd: Bwd2,
}

impl candle_core::CustomOp2 for Precomputed2 {
    fn name(&self) -> &'static str {
        "with-backward2"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        (self.bwd)(&a.detach(), &b.detach(), grad, a.track_op(), b.track_op())
    }
}

/// A result computed outside candle's op machinery, handed over once as a custom op's
/// forward output (taken, so it is held once).
pub(crate) struct Handover(Mutex<Option<Tensor>>);

impl Handover {
    pub(crate) fn new(t: Tensor) -> Self {
        Self(Mutex::new(Some(t)))
    }

    fn take(&self) -> candle_core::Result<Tensor> {
        let t = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("custom op: poisoned".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("custom op: forward run twice".into()))?;
        // A fresh buffer holding exactly the elements, at offset 0.
        if t.is_contiguous() && t.layout().start_offset() == 0 {
            Ok(t)
        } else {
            t.contiguous()?.affine(1.0, 0.0)
        }
    }

    pub(crate) fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_storage(&self.take()?)
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let t = self.take()?;
        let (s, l) = t.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => Err(candle_core::Error::Msg(
                "custom op: result not on the CUDA device".into(),
            )),
        }
    }
}

/// The op recorded in the graph: its forward hands over the result computed outside,
/// its backward calls `bwd`.
struct Precomputed {
    out: Handover,
    bwd: Bwd,
}

impl CustomOp1 for Precomputed {
    fn name(&self) -> &'static str {
        "input-grad-only"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some((self.bwd)(grad)?))
    }
}

/// A CPU tensor's elements as a fresh storage (for a custom op's forward result).
pub(crate) fn cpu_storage(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        return Err(candle_core::Error::Msg(
            "custom op: result not on the CPU".into(),
        ));
    };
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("custom op: non-contiguous result".into()))?;
    let out = match c {
        CpuStorage::F32(v) => CpuStorage::F32(v[a..b].to_vec()),
        CpuStorage::F64(v) => CpuStorage::F64(v[a..b].to_vec()),
        CpuStorage::F16(v) => CpuStorage::F16(v[a..b].to_vec()),
        CpuStorage::BF16(v) => CpuStorage::BF16(v[a..b].to_vec()),
        _ => {
            return Err(candle_core::Error::Msg(format!(
                "custom op: unsupported dtype {:?}",
                t.dtype()
            )));
        }
    };
    Ok((out, l.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    /// Same values and input gradient as candle's own ops, and the frozen operand has no
    /// gradient entry.
    #[test]
    fn frozen_operands_get_no_gradient_and_input_gradient_is_unchanged() {
        let x = Var::from_tensor(&t(&[1., -2., 3., 0.5, 4., -1.], &[2, 3])).unwrap();
        let w = t(&[2., 3., -1.], &[3]);
        let b = t(&[0.1, 0.2, 0.3], &[3]);
        let r = t(&[1., 2., 3., 4., 5., 6.], &[2, 3]);
        let plain = x
            .as_tensor()
            .broadcast_mul(&w)
            .unwrap()
            .broadcast_add(&b)
            .unwrap();
        let ours = scale_shift_frozen(x.as_tensor(), &w, &b).unwrap();
        let diff = (&plain - &ours).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
        let g_plain = (plain * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let g_ours = (ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
        let (a, c) = (
            g_plain.get(x.as_tensor()).unwrap(),
            g_ours.get(x.as_tensor()).unwrap(),
        );
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            c.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert!(g_ours.get(&w).is_none() && g_ours.get(&b).is_none());

        let y = add_frozen(x.as_tensor(), &b).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(x.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap(),
            r.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }

    /// Untracked input: plain evaluation, nothing recorded.
    #[test]
    fn untracked_input_is_plain() {
        let x = t(&[1., 2.], &[2]);
        let y = add_frozen(&x, &t(&[1., 1.], &[2])).unwrap();
        assert!(!y.track_op());
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![2., 3.]);
    }
}
