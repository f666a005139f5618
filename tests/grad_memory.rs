//! Backward through a frozen model keeps only the gradients that were asked for.
//!
//! candle's own matmul / conv / broadcast ops compute and keep a gradient for a frozen
//! weight or bias as well (3.4 GB of weight gradients for SD1.5's UNet, plus one
//! activation-sized tensor per frozen bias and norm); sdkit's layers must not. A counting
//! allocator measures what the gradient store holds after backward. (This file holds one
//! test so that no other test allocates concurrently.)

use candle_core::{DType, Device, Tensor, Var};
use sdkit::model::Weights;
use sdkit::model::grad::mul_frozen;
use sdkit::model::unet::{UNet2DConditionModel, UNetConfig};
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::SeqCst);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::SeqCst);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::SeqCst);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static A: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::SeqCst)
}

#[test]
fn frozen_unet_backward_keeps_only_the_latent_gradient() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/sd1_tiny");
    let exp = candle_core::safetensors::load(
        dir.parent().unwrap().join("sd1_tiny_expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let cfg = UNetConfig::from_file(&dir.join("config.json")).unwrap();
    let file = dir.join("diffusion_pytorch_model.safetensors");
    let before_load = live();
    let mut w = Weights::from_safetensors(&file, DType::F32, &Device::Cpu).unwrap();
    let model = UNet2DConditionModel::load(&mut w, &cfg).unwrap();
    drop(w);
    let weight_bytes = live() - before_load;

    let sample = Var::from_tensor(&exp["sample"]).unwrap();
    let (t, ctx, r) = (&exp["timestep"], &exp["encoder_hidden_states"], &exp["r"]);
    let latent_bytes = (sample.elem_count() * 4) as isize;
    // Warm-up: thread-local scratch buffers (gemm's workspace) stay allocated afterwards.
    for _ in 0..2 {
        let out = model.forward(sample.as_tensor(), t, ctx).unwrap();
        let _ = mul_frozen(&out, r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
    }
    let before = live();
    let fwd_only = {
        let out = model.forward(sample.as_tensor(), t, ctx).unwrap();
        let _ = out.sum_all().unwrap();
        live() - before
    };
    eprintln!(
        "forward graph {fwd_only} B, after drop {} B",
        live() - before
    );
    let before = live();
    let grads = {
        let out = model.forward(sample.as_tensor(), t, ctx).unwrap();
        mul_frozen(&out, r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap()
    };
    let held = live() - before;
    let g: &Tensor = grads.get(sample.as_tensor()).expect("latent gradient");
    let want = &exp["grad.sample"];
    let e = (g - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let rel = e.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap();
    eprintln!(
        "weights {weight_bytes} B, latent {latent_bytes} B, held after backward {held} B, rel err {rel:.2e}"
    );
    assert!(rel < 5e-5, "latent gradient rel err {rel}");
    // The latent's gradient and the loss weight's (same size), plus map overhead; a single
    // stray weight gradient or frozen-bias activation gradient is far bigger than the slack.
    assert!(
        held <= 2 * latent_bytes + 16 * 1024,
        "the gradient store holds {held} bytes after backward (weights: {weight_bytes} B, \
         latent gradient: {latent_bytes} B)"
    );
}
