//! sdkit side of bench/unet (run by bench/unet/run.sh): a full-size SD1.5-config UNet from a
//! random-weight safetensors file, batch 1, f32 on CPU.
//!
//!   cargo run --release --example bench_unet -- fwd WEIGHTS [N] [SIZE]
//!   cargo run --release --example bench_unet -- bwd WEIGHTS [N] [SIZE]
//!   cargo run --release --example bench_unet -- profile WEIGHTS [SIZE]
//!   cargo run --release --example bench_unet -- graph WEIGHTS [N] [SIZE]
//!   cargo run --release --example bench_unet -- lora WEIGHTS [N] [SIZE]
//!   cargo run --release --example bench_unet -- gemm [M]
//!   cargo run --release --example bench_unet -- conv [REPS]
//!   cargo run --release --example bench_unet -- layout [REPS]
//!   cargo run --release --example bench_unet -- vae DIR [N]
//!   cargo run --release --example bench_unet -- optim adamw8bit|adafactor|adamw [MILLIONS]
//!
//! `WINOGRAD=off|2|4` picks direct 3x3 convolutions or the Winograd output tile for any mode.
//! `fwd` times N forwards (with `AB=winograd`, alternating direct and Winograd 3x3
//! convolutions), `bwd` N forward+backward passes of sum(out * r) with the weights
//! frozen (the gradient w.r.t. the latent only; frozen layers compute no weight gradient). `lora` attaches kohya's
//! LoRA (dim 32) and times forward+backward for the LoRA factors' gradient. `graph` counts the nodes of
//! one forward's autograd graph and the bytes it holds for the backward. `profile` times each top-level block of one forward and a few
//! single ops at SD1.5's largest sizes. SIZE is the latent side (64 = 512 px). `gemm` times an
//! f32 M x M x M matmul (candle's GEMM, the `gemm` crate), best of 5. `conv` times
//! SD1.5's convolution shapes: candle's conv2d, sdkit's `Conv2d` forward, and its forward +
//! input gradient. `vae` decodes one 4x64x64 latent (`torch.randn` with seed 1) N times with
//! the diffusers AutoencoderKL that bench/vae/decode_py.py saved in DIR and compares the
//! image with diffusers' (`DIR/decoded_py.safetensors`). `optim` times four updates of an
//! optimizer over MILLIONS (default 64) million f32 parameters in four tensors (two linear,
//! two 3x3 conv kernels) and prints
//! the time per parameter (DreamBooth's UNet has 860 million, kohya's LoRA dim 32 19).
//! `conv` also compares the direct 3x3 path with Winograd F(2x2, 3x3) and F(4x4, 3x3);
//! `layout` times one 64x64 transformer's head and image moves, candle's view ops against
//! `model::nn::layout`.

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor, Var};
use sdkit::model::Weights;
use sdkit::model::attention::attention;
use sdkit::model::grad::mul_frozen;
use sdkit::model::nn::group_norm;
use sdkit::model::unet::blocks::BlockInput;
use sdkit::model::unet::embeddings::timestep_embedding;
use sdkit::model::unet::{UNet2DConditionModel, UNetConfig};
use std::path::Path;
use std::time::Instant;

// The allocator and its options as in src/main.rs (the sdkit binary), so the timings are
// the binary's.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
#[cfg(not(target_env = "msvc"))]
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8; 75] = sdkit::util::alloc::JEMALLOC_CONF;

fn peak_rss_gb() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1e6)
        .unwrap_or(f64::NAN)
}

fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 3.4 - 1.7
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Nodes of the autograd graph behind `t` and the bytes of their distinct storages (what
/// the graph keeps alive until backward; frozen weights are not nodes).
fn graph_size(t: &Tensor) -> (usize, usize) {
    let nodes = t.sorted_nodes();
    let mut seen = std::collections::HashSet::new();
    let mut bytes = 0;
    for n in &nodes {
        let (s, _) = n.storage_and_layout();
        if seen.insert(&*s as *const _ as usize) {
            bytes += n.elem_count() * n.dtype().size_in_bytes();
        }
    }
    (nodes.len(), bytes)
}

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let s = Instant::now();
    let v = f()?;
    Ok((v, s.elapsed().as_secs_f64()))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // WINOGRAD=off|2|4: direct 3x3 convolutions, or Winograd with that output tile.
    match std::env::var("WINOGRAD").as_deref() {
        Ok("off") => sdkit::model::nn::winograd_cpu::set_enabled(false),
        Ok(m) => sdkit::model::nn::winograd_cpu::set_tile(m.parse()?),
        Err(_) => {}
    }
    if args.len() < 2 {
        bail!(
            "usage: bench_unet fwd|bwd|profile|graph|lora WEIGHTS [N] [SIZE] | vae DIR [N] | optim KIND [MILLIONS] | conv|attn|layout [REPS] | gemm [M]"
        );
    }
    if args.first().map(String::as_str) == Some("conv") {
        return conv(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3));
    }
    if args.first().map(String::as_str) == Some("layout") {
        return layout(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(10));
    }
    if args.first().map(String::as_str) == Some("attn") {
        return attn(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(3));
    }
    if args.first().map(String::as_str) == Some("vae") {
        return vae(
            Path::new(&args[1]),
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(3),
        );
    }
    if args.first().map(String::as_str) == Some("optim") {
        return optim(
            &args[1],
            args.get(2).and_then(|s| s.parse().ok()).unwrap_or(64),
        );
    }
    if args.first().map(String::as_str) == Some("gemm") {
        return gemm(args.get(1).and_then(|s| s.parse().ok()).unwrap_or(4096));
    }
    let (mode, path) = (args[0].as_str(), Path::new(&args[1]));
    let num = |i: usize, d: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(d);
    let (n, size) = if mode == "profile" {
        (1, num(2, 64))
    } else {
        (num(2, 1), num(3, 64))
    };
    let (model, load_s) = timed(|| {
        let mut w = Weights::from_safetensors(path, DType::F32, &Device::Cpu)
            .with_context(|| format!("{}", path.display()))?;
        Ok(UNet2DConditionModel::load(&mut w, &UNetConfig::sd15())?)
    })?;
    eprintln!(
        "loaded in {load_s:.1} s, RSS peak so far {:.2} GB",
        peak_rss_gb()
    );
    let x = randn(&[1, 4, size, size], 1)?;
    let t = Tensor::new(&[500f32], &Device::Cpu)?;
    let ctx = randn(&[1, 77, 768], 2)?;
    let r = randn(&[1, 4, size, size], 3)?;
    let mut times = Vec::new();
    match mode {
        "fwd" => {
            for i in 0..n {
                ab_switch(i);
                times.push(timed(|| Ok(model.forward(&x, &t, &ctx)?))?.1);
            }
        }
        "fwdg" => {
            // The forward with its graph recorded (latent tracked), no backward: against
            // `fwd`, what recording costs.
            let xv = Var::from_tensor(&x)?;
            for _ in 0..n {
                times.push(timed(|| Ok(model.forward(xv.as_tensor(), &t, &ctx)?))?.1);
            }
        }
        "bwd" => {
            for _ in 0..n {
                let xv = Var::from_tensor(&x)?;
                let (g, s) = timed(|| {
                    let (out, f) = timed(|| Ok(model.forward(xv.as_tensor(), &t, &ctx)?))?;
                    let (g, b) = timed(|| Ok(mul_frozen(&out, &r)?.sum_all()?.backward()?))?;
                    eprintln!("  forward (graph recorded) {f:.2} s, backward {b:.2} s");
                    Ok(g)
                })?;
                anyhow::ensure!(
                    g.get(xv.as_tensor()).is_some(),
                    "no gradient for the latent"
                );
                times.push(s);
            }
        }
        "lora" => {
            // kohya's LoRA (dim 32, alpha 16) on the UNet; the gradient of sum(out * r)
            // w.r.t. the LoRA factors only (latent untracked), as a LoRA training step.
            struct Fixed;
            impl sdkit::adapters::lora::UniformSource for Fixed {
                fn uniform(&mut self, n: usize, bound: f32) -> Vec<f32> {
                    (0..n)
                        .map(|i| bound * ((i % 17) as f32 / 8.0 - 1.0))
                        .collect()
                }
            }
            let mut model = model;
            let shape = sdkit::adapters::lora::LoraShape {
                dim: 32,
                alpha: 16.0,
                conv_dim: None,
                conv_alpha: 1.0,
                dropout: 0.0,
            };
            let net = sdkit::adapters::lora::LoraNetwork::create(
                Some(&mut model),
                None,
                &shape,
                &mut Fixed,
                &Device::Cpu,
            )?;
            let vars = net.vars(sdkit::adapters::lora::Part::Unet);
            for i in 0..n {
                ab_switch(i);
                let (g, s) = timed(|| {
                    let (out, f) = timed(|| Ok(model.forward(&x, &t, &ctx)?))?;
                    let (g, b) = timed(|| Ok(mul_frozen(&out, &r)?.sum_all()?.backward()?))?;
                    eprintln!("  forward (graph recorded) {f:.2} s, backward {b:.2} s");
                    Ok(g)
                })?;
                anyhow::ensure!(
                    vars.iter().all(|v| g.get(v.as_tensor()).is_some()),
                    "a LoRA factor got no gradient"
                );
                times.push(s);
            }
        }
        "profile" => return profile(&model, &x, &t, &ctx),
        "graph" => {
            let xv = Var::from_tensor(&x)?;
            let out = model.forward(xv.as_tensor(), &t, &ctx)?;
            let (nodes, bytes) = graph_size(&out);
            println!(
                "sdkit forward graph: {nodes} nodes, {:.2} GB of tensors held for the backward, latent {size}x{size}",
                bytes as f64 / 1e9
            );
            return Ok(());
        }
        m => bail!("unknown mode {m}"),
    }
    if ab() {
        let best = |odd: usize| {
            times
                .iter()
                .skip(odd)
                .step_by(2)
                .cloned()
                .fold(f64::INFINITY, f64::min)
        };
        println!(
            "{mode}, AB=winograd: direct convolutions best {:.2} s, Winograd best {:.2} s ({} runs each)",
            best(0),
            best(1),
            n / 2
        );
        return Ok(());
    }
    let best = times.iter().cloned().fold(f64::INFINITY, f64::min);
    let label = if mode == "fwd" {
        "forward"
    } else if mode == "fwdg" {
        "forward (graph recorded)"
    } else if mode == "lora" {
        "LoRA dim 32 forward+backward (grad: LoRA factors)"
    } else {
        "forward+backward (grad: latent)"
    };
    println!(
        "sdkit {label}: best {best:.2} s of {n}, peak RSS {:.2} GB, latent {size}x{size}",
        peak_rss_gb()
    );
    Ok(())
}

/// Time each top-level block of one forward, then single ops at SD1.5's largest sizes.
fn profile(model: &UNet2DConditionModel, x: &Tensor, t: &Tensor, ctx: &Tensor) -> Result<()> {
    let c = &model.config;
    let (temb_act, s) = timed(|| {
        let e = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)?;
        Ok(model.time_embedding.forward(&e)?.silu()?)
    })?;
    println!("time embedding        {s:7.3} s");
    let inp = BlockInput {
        temb_act: &temb_act,
        ctx,
        hooks: &model.hooks,
        checkpointing: None,
    };
    let (mut h, s) = timed(|| Ok(model.conv_in.forward(x)?))?;
    println!("conv_in               {s:7.3} s");
    let mut skips = vec![h.clone()];
    for (i, b) in model.down_blocks.iter().enumerate() {
        let (y, s) = timed(|| Ok(b.forward(&h, &inp, &mut skips)?))?;
        println!("down_blocks.{i}         {s:7.3} s");
        h = y;
    }
    let (y, s) = timed(|| Ok(model.mid_block.forward(&h, &inp)?))?;
    println!("mid_block             {s:7.3} s");
    h = y;
    for (i, b) in model.up_blocks.iter().enumerate() {
        let (y, s) = timed(|| Ok(b.forward(&h, &inp, &mut skips)?))?;
        println!("up_blocks.{i}           {s:7.3} s");
        h = y;
    }
    let (_, s) = timed(|| {
        Ok(model
            .conv_out
            .forward(&model.conv_norm_out.forward(&h)?.silu()?)?)
    })?;
    println!("conv_norm_out+conv_out {s:6.3} s");

    println!("-- single ops, f32 --");
    let a = randn(&[1, 320, 64, 64], 4)?;
    let k = randn(&[320, 320, 3, 3], 5)?;
    let (_, s) = timed(|| Ok(a.conv2d(&k, 1, 1, 1, 1)?))?;
    let flop = 2.0 * 320.0 * 320.0 * 9.0 * 4096.0;
    println!(
        "conv 3x3 320->320 @64x64  {s:7.3} s  {:6.1} GFLOP/s",
        flop / s / 1e9
    );
    let av = Var::from_tensor(&a)?;
    let (_, s) = timed(|| {
        Ok(av
            .as_tensor()
            .conv2d(&k, 1, 1, 1, 1)?
            .sum_all()?
            .backward()?)
    })?;
    println!("  same, fwd+bwd           {s:7.3} s  (candle's backward, both gradients)");
    let frozen = sdkit::model::nn::Conv2d {
        weight: sdkit::model::weights::Param::Frozen(k.clone()),
        bias: None,
        delta: None,
        stride: 1,
        padding: 1,
    };
    let (_, s) = timed(|| Ok(frozen.forward(av.as_tensor())?.sum_all()?.backward()?))?;
    println!("  same, fwd+bwd           {s:7.3} s  (sdkit frozen Conv2d, input gradient)");
    let (q, kk, v) = (
        randn(&[8, 4096, 40], 6)?,
        randn(&[8, 4096, 40], 7)?,
        randn(&[8, 4096, 40], 8)?,
    );
    let (_, s) = timed(|| Ok(attention(&q, &kk, &v, 40f64.powf(-0.5))?))?;
    let flop = 4.0 * 8.0 * 4096.0 * 4096.0 * 40.0;
    println!(
        "attention 8x4096x4096x40  {s:7.3} s  {:6.1} GFLOP/s",
        flop / s / 1e9
    );
    let qv = Var::from_tensor(&q)?;
    let (_, s) = timed(|| {
        Ok(attention(qv.as_tensor(), &kk, &v, 40f64.powf(-0.5))?
            .sum_all()?
            .backward()?)
    })?;
    println!("  same, fwd+bwd           {s:7.3} s");
    let wgt = randn(&[320, 320], 9)?;
    let seq = randn(&[1, 4096, 320], 10)?;
    let (_, s) = timed(|| Ok(seq.broadcast_matmul(&wgt.t()?)?))?;
    let flop = 2.0 * 4096.0 * 320.0 * 320.0;
    println!(
        "linear 4096x320x320       {s:7.3} s  {:6.1} GFLOP/s",
        flop / s / 1e9
    );
    let (g, b) = (randn(&[320], 11)?, randn(&[320], 12)?);
    let (_, s) = timed(|| Ok(group_norm(&a, 32, &g, &b, 1e-5)?))?;
    println!("group_norm 320x64x64      {s:7.3} s");
    let big = randn(&[4096, 4096], 13)?;
    let (_, s) = timed(|| Ok(big.matmul(&big)?))?;
    println!(
        "sgemm 4096^3              {s:7.3} s  {:6.1} GFLOP/s",
        2.0 * 4096f64.powi(3) / s / 1e9
    );
    Ok(())
}

/// SD1.5's attention shapes at 512 px (8 heads), f32: forward, and forward + backward with
/// q, k, v all tracked (self-attention under LoRA) or only q (cross-attention over a frozen
/// text encoder); best of `reps`.
/// `AB=winograd`: `fwd` and `lora` alternate direct (even runs) and Winograd (odd runs)
/// 3x3 convolutions in this one process.
fn ab() -> bool {
    std::env::var("AB").is_ok_and(|v| v == "winograd")
}

fn ab_switch(i: usize) {
    if ab() {
        sdkit::model::nn::winograd_cpu::set_enabled(i % 2 == 1);
    }
}

/// The layout moves of one 64x64-level transformer (SD1.5: 320 channels, 8 heads, 4096
/// tokens), forward + backward: q, k, v split into heads and merged back, the image to
/// tokens and back. candle's view ops against `model::nn::layout`, alternating, best of REPS.
fn layout(reps: usize) -> Result<()> {
    use sdkit::model::nn::layout::{merge_heads, split_heads, to_image, to_tokens};
    let (l, c, heads, side) = (4096, 320, 8, 64);
    let xs = [
        randn(&[1, l, c], 30)?,
        randn(&[1, l, c], 31)?,
        randn(&[1, l, c], 32)?,
    ];
    let img = randn(&[1, c, side, side], 33)?;
    let (r_seq, r_img) = (randn(&[1, l, c], 34)?, randn(&[1, c, side, side], 35)?);
    // 0: candle views, 1: layout ops, 2: no layout move (the loss alone).
    let run = |mode: u8| -> Result<f64> {
        let ours = mode == 1;
        let vars: Vec<Var> = xs
            .iter()
            .map(Var::from_tensor)
            .collect::<candle_core::Result<_>>()?;
        let iv = Var::from_tensor(&img)?;
        Ok(timed(|| {
            let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu)?;
            for v in &vars {
                let t = v.as_tensor();
                let m = if mode == 2 {
                    t.clone()
                } else if ours {
                    merge_heads(&split_heads(t, heads)?, 1)?
                } else {
                    let s = t
                        .reshape((1, l, heads, c / heads))?
                        .transpose(1, 2)?
                        .reshape((heads, l, c / heads))?;
                    s.reshape((1, heads, l, c / heads))?
                        .transpose(1, 2)?
                        .reshape((1, l, c))?
                };
                loss = (loss + (m * &r_seq)?.sum_all()?)?;
            }
            let t = iv.as_tensor();
            let back = if mode == 2 {
                t.clone()
            } else if ours {
                to_image(&to_tokens(t)?, side, side)?
            } else {
                t.permute((0, 2, 3, 1))?
                    .reshape((1, l, c))?
                    .reshape((1, side, side, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?
            };
            loss = (loss + (back * &r_img)?.sum_all()?)?;
            Ok(loss.backward()?)
        })?
        .1)
    };
    let (mut views, mut ops, mut none) = (f64::INFINITY, f64::INFINITY, f64::INFINITY);
    for _ in 0..reps {
        views = views.min(run(0)?);
        ops = ops.min(run(1)?);
        none = none.min(run(2)?);
    }
    println!(
        "layout moves of one 64x64 transformer, forward+backward: candle views {:.1} ms, layout ops {:.1} ms (the loss alone {:.1} ms)",
        views * 1e3,
        ops * 1e3,
        none * 1e3
    );
    Ok(())
}

fn attn(reps: usize) -> Result<()> {
    println!("attention (heads x queries x keys x head dim): fwd | fwd+bwd, s (GFLOP/s)");
    for (i, &(lq, lk, d)) in [
        (4096, 4096, 40),
        (1024, 1024, 80),
        (256, 256, 160),
        (4096, 77, 40),
        (9216, 9216, 40),
    ]
    .iter()
    .enumerate()
    {
        let s = i as u64 * 3;
        let (q, k, v) = (
            randn(&[8, lq, d], 20 + s)?,
            randn(&[8, lk, d], 21 + s)?,
            randn(&[8, lk, d], 22 + s)?,
        );
        let scale = (d as f64).powf(-0.5);
        let (mut f, mut b) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..reps {
            f = f.min(timed(|| Ok(attention(&q, &k, &v, scale)?))?.1);
            let (qv, kv, vv) = (
                Var::from_tensor(&q)?,
                Var::from_tensor(&k)?,
                Var::from_tensor(&v)?,
            );
            let frozen_kv = lk == 77;
            b = b.min(
                timed(|| {
                    let (kt, vt) = if frozen_kv {
                        (k.clone(), v.clone())
                    } else {
                        (kv.as_tensor().clone(), vv.as_tensor().clone())
                    };
                    Ok(attention(qv.as_tensor(), &kt, &vt, scale)?
                        .sum_all()?
                        .backward()?)
                })?
                .1,
            );
        }
        let flop = 4.0 * 8.0 * (lq * lk * d) as f64;
        let bflop = flop * if lk == 77 { 2.0 } else { 3.5 };
        println!(
            "8x{lq}x{lk}x{d}: {f:.3} s ({:.0}) | {b:.3} s ({:.0})",
            flop / f / 1e9,
            bflop / b / 1e9
        );
    }
    Ok(())
}

/// SD1.5's convolution shapes, f32: candle's `conv2d` against sdkit's `Conv2d` (frozen
/// weights) forward, and sdkit's forward + input gradient; best of `reps`, interleaved.
fn conv(reps: usize) -> Result<()> {
    use sdkit::model::nn::Conv2d;
    use sdkit::model::weights::Param;
    // (cin, cout, k, side)
    let shapes = [
        (320, 320, 3, 64),
        (640, 320, 3, 64),
        (640, 640, 3, 32),
        (1280, 1280, 3, 16),
        (1280, 1280, 3, 8),
        (2560, 1280, 3, 8),
        (320, 320, 1, 64),
        (960, 320, 1, 64),
        (4, 320, 3, 64),
        // The VAE decoder's: 512 channels at 64 and 128 px, 256 at 256 px, 128 at 512 px.
        (512, 512, 3, 64),
        (512, 512, 3, 128),
        (256, 256, 3, 256),
        (128, 128, 3, 512),
    ];
    use sdkit::model::nn::winograd_cpu::{set_enabled, set_tile};
    // 0: direct (tap GEMMs / im2col), 1: Winograd F(2x2, 3x3), 2: F(4x4, 3x3).
    let path = |j: usize| {
        set_enabled(j > 0);
        set_tile(if j == 2 { 4 } else { 2 });
    };
    println!(
        "conv (cin->cout kxk @side): candle fwd | sdkit fwd direct / F(2x2,3x3) / F(4x4,3x3) | fwd+input grad the same | fwd+kernel grad the same, s"
    );
    for (i, &(cin, cout, k, side)) in shapes.iter().enumerate() {
        let x = randn(&[1, cin, side, side], 20 + i as u64)?;
        let w = randn(&[cout, cin, k, k], 40 + i as u64)?;
        let layer = Conv2d {
            weight: Param::Frozen(w.clone()),
            bias: None,
            delta: None,
            stride: 1,
            padding: k / 2,
        };
        let xv = Var::from_tensor(&x)?;
        // The same layer with its kernel trained (DreamBooth, LoCon): the kernel gradient.
        let trained = Conv2d {
            weight: Param::Trainable(Var::from_tensor(&w)?),
            ..layer.clone()
        };
        let mut a = f64::INFINITY;
        let (mut b, mut c, mut d) = ([f64::INFINITY; 3], [f64::INFINITY; 3], [f64::INFINITY; 3]);
        for _ in 0..reps {
            if side <= 64 {
                a = a.min(timed(|| Ok(x.conv2d(&w, k / 2, 1, 1, 1)?))?.1);
            }
            for j in 0..3 {
                path(j);
                b[j] = b[j].min(timed(|| Ok(layer.forward(&x)?))?.1);
                c[j] = c[j]
                    .min(timed(|| Ok(layer.forward(xv.as_tensor())?.sum_all()?.backward()?))?.1);
                d[j] = d[j].min(timed(|| Ok(trained.forward(&x)?.sum_all()?.backward()?))?.1);
            }
        }
        path(0);
        let direct = layer.forward(&x)?;
        let kernel_grad = |trained: &Conv2d| -> Result<Tensor> {
            let g = (trained.forward(&x)? * &x.narrow(1, 0, 1)?.broadcast_as(direct.shape())?)?
                .sum_all()?
                .backward()?;
            let Param::Trainable(v) = &trained.weight else {
                bail!("frozen")
            };
            Ok(g.get(v.as_tensor()).context("no kernel gradient")?.clone())
        };
        let direct_kg = kernel_grad(&trained)?;
        let (mut errs, mut kg_errs) = ([0f32; 2], [0f32; 2]);
        for j in 0..2 {
            path(j + 1);
            errs[j] = rel_err(&layer.forward(&x)?, &direct)?;
            kg_errs[j] = rel_err(&kernel_grad(&trained)?, &direct_kg)?;
        }
        path(1);
        println!(
            "{cin:5}->{cout:<5} {k}x{k} @{side:<3} {a:7.4} | {:7.4} / {:7.4} / {:7.4} | {:7.4} / {:7.4} / {:7.4} | {:7.4} / {:7.4} / {:7.4}   (rel diff fwd {:.1e} / {:.1e}, kernel grad {:.1e} / {:.1e})",
            b[0],
            b[1],
            b[2],
            c[0],
            c[1],
            c[2],
            d[0],
            d[1],
            d[2],
            errs[0],
            errs[1],
            kg_errs[0],
            kg_errs[1]
        );
    }
    Ok(())
}

/// 512x512 VAE decode (bench/vae/run.sh), timed in this binary so that the allocator is the
/// `sdkit` binary's, as in `sdkit sample`.
fn vae(dir: &Path, runs: usize) -> Result<()> {
    use sdkit::model::vae::{AutoencoderKL, VaeConfig};
    let vae = AutoencoderKL::from_diffusers(dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("{}", dir.display()))?;
    anyhow::ensure!(vae.config == VaeConfig::sd(), "not the SD VAE config");
    let z = sdkit::model::rng::randn(1, &[1, 4, 64, 64], &Device::Cpu)?;
    let mut times = Vec::new();
    let mut img = None;
    for _ in 0..runs.max(1) {
        let (y, s) = timed(|| Ok(vae.decode(&z)?))?;
        times.push(s);
        img = Some(y);
    }
    let path = dir.join("decoded_py.safetensors");
    let file = candle_core::safetensors::load(&path, &Device::Cpu)
        .with_context(|| format!("{}", path.display()))?;
    let want = file.get("image").context("no `image` tensor")?;
    let img = img.context("no run")?;
    let err = rel_err(&img, want)?;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "sdkit decode 512x512: best {best:.2} s, runs {times:.2?}, rel err vs diffusers {err:.1e}, peak RSS {:.2} GB",
        peak_rss_gb()
    );
    anyhow::ensure!(err < 1e-3, "decode differs from diffusers: rel err {err}");
    let x = file.get("input").context("no `input` tensor")?;
    let mut times = Vec::new();
    let mut mean = None;
    for _ in 0..runs.max(1) {
        let (m, s) = timed(|| Ok(vae.encode(x)?.mean))?;
        times.push(s);
        mean = Some(m);
    }
    let want = file.get("latent_mean").context("no `latent_mean` tensor")?;
    let mean = mean.context("no run")?;
    let err = rel_err(&mean, want)?;
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "sdkit encode 512x512: best {best:.2} s, runs {times:.2?}, rel err vs diffusers {err:.1e}"
    );
    anyhow::ensure!(err < 1e-3, "encode differs from diffusers: rel err {err}");
    // Each decoder Upsample2D both ways, at the sizes a 512x512 decode gives it.
    let mut size = 64;
    for stage in &vae.decoder.up_blocks {
        let Some(conv) = stage.resample.as_ref().filter(|_| stage.up) else {
            continue;
        };
        let c = conv.weight.value().dim(1)?;
        let x = randn(&[1, c, size, size], 5)?;
        let (mut phase, mut plain) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..runs.max(1) {
            phase = phase.min(timed(|| Ok(conv.forward_upsampled(&x, 2 * size, 2 * size)?))?.1);
            let up = |x: &Tensor| sdkit::model::nn::upsample_nearest(x, 2 * size, 2 * size);
            plain = plain.min(timed(|| Ok(conv.forward(&up(&x)?)?))?.1);
        }
        println!(
            "  upsampler {c} ch {size}->{}: forward_upsampled (phase kernels where Winograd F(4x4) does not apply) {phase:.3} s, upsample + conv {plain:.3} s ({:.2}x)",
            2 * size,
            phase / plain
        );
        size *= 2;
    }
    Ok(())
}

/// Largest absolute difference relative to the largest magnitude of `want` (at least 1e-3).
fn rel_err(got: &Tensor, want: &Tensor) -> Result<f32> {
    Ok((got - want)?.abs()?.max_all()?.to_scalar::<f32>()?
        / want.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3))
}

/// Four updates of `kind` over `millions` million parameters (four equal tensors).
fn optim(kind: &str, millions: usize) -> Result<()> {
    use sdkit::train::optim::{Group, Hyper, Optimizer, OptimizerKind};
    let kind = <OptimizerKind as clap::ValueEnum>::from_str(kind, true)
        .map_err(|e| anyhow::anyhow!("optimizer {kind}: {e}"))?;
    // Two linear-like [rows, 1024] and two conv-like [out, 1024, 3, 3] tensors.
    let rows = (millions << 20) / 4 / 9216 * 9;
    let shape = |i: u64| -> Vec<usize> {
        if i < 2 {
            vec![rows, 1024]
        } else {
            vec![rows / 9, 1024, 3, 3]
        }
    };
    let n = 4 * rows * 1024;
    let vars = (0..4)
        .map(|i| Ok(Var::from_tensor(&(randn(&shape(i), 60 + i)? * 0.02)?)?))
        .collect::<Result<Vec<_>>>()?;
    let grads = (0..4)
        .map(|i| Ok((randn(&shape(i), 70 + i)? * 1e-3)?))
        .collect::<Result<Vec<_>>>()?;
    let group = Group {
        name: "unet".into(),
        vars,
    };
    let mut opt = Optimizer::new(Hyper::defaults(kind), vec![group]);
    let mut times = Vec::new();
    for _ in 0..4 {
        times.push(timed(|| Ok(opt.step(&[grads.clone()], &[1e-4])?))?.1);
    }
    let best = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "sdkit {kind:?} update of {:.1} M parameters: best {best:.3} s ({:.1} ns / parameter), first {:.3} s",
        n as f64 / 1e6,
        best * 1e9 / n as f64,
        times[0]
    );
    Ok(())
}

/// Best of 5 f32 M^3 matmuls through candle (the `gemm` crate, x86-v4 kernels enabled).
fn gemm(m: usize) -> Result<()> {
    let a = randn(&[m, m], 1)?;
    let b = randn(&[m, m], 2)?;
    let _ = a.matmul(&b)?;
    let best = (0..5)
        .map(|_| timed(|| Ok(a.matmul(&b)?)).map(|(_, s)| s))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .fold(f64::INFINITY, f64::min);
    let flop = 2.0 * (m as f64).powi(3);
    println!(
        "sdkit (candle gemm) sgemm {m}^3: best {best:.3} s, {:.1} GFLOP/s",
        flop / best / 1e9
    );
    Ok(())
}
