//! Memory-efficient attention against PyTorch `scaled_dot_product_attention`
//! (fixture: tests/fixtures/gen_attention_fixtures.py): output and q/k/v gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use sdkit::model::attention::{attention_naive, attention_recompute, attention_tiled};

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b, 0.0)
}

/// Output against PyTorch SDPA (CPU), f32: measured 1.8e-7..2.6e-7 (38x margin) for
/// every tiling. Tiles change the summation order (online softmax), as other CPUs'
/// kernels do: ~1e-7 here. Catches a wrong scale, mask, rescaling of the running
/// softmax or tile boundary (each O(1e-2..1)).
const OUT_TOL: f64 = 1e-5;
/// q/k/v gradients: measured 1.1e-7..2.7e-7 (376x margin).
const GRAD_TOL: f64 = 1e-4;

type Attn = fn(&Tensor, &Tensor, &Tensor, f64, usize, usize) -> sdkit::model::Result<Tensor>;

fn recompute(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bq: usize,
    bk: usize,
) -> sdkit::model::Result<Tensor> {
    Ok(attention_recompute(q, k, v, scale, bq, bk)?)
}

#[test]
fn tiled_attention_matches_pytorch_sdpa() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/attention/sdpa.safetensors"
    );
    let f = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let scale = 1.0 / 4.0;
    // (bq, bk): one tile each way, uneven tiles, and one-row tiles; the CPU's fused f32
    // kernels and the tensor-op tiles with recompute that CUDA runs.
    let paths: [(&str, Attn); 2] = [("fused", attention_tiled), ("recompute", recompute)];
    for ((bq, bk), (path, attend)) in [(256, 1024), (16, 10), (1, 7)]
        .into_iter()
        .flat_map(|t| paths.map(|p| (t, p)))
    {
        let q = Var::from_tensor(&f["q"]).unwrap();
        let k = Var::from_tensor(&f["k"]).unwrap();
        let v = Var::from_tensor(&f["v"]).unwrap();
        let out = attend(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, bq, bk).unwrap();
        let e = rel_err(&out, &f["out"]);
        common::within(
            e as f64,
            OUT_TOL,
            &format!("{path} tiles {bq}x{bk}: output"),
        );
        let grads = (out * &f["r"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            let e = rel_err(grads.get(x.as_tensor()).unwrap(), &f[name]);
            common::within(
                e as f64,
                GRAD_TOL,
                &format!("{path} tiles {bq}x{bk}: {name}"),
            );
        }
    }
    let naive = attention_naive(&f["q"], &f["k"], &f["v"], scale).unwrap();
    let e = rel_err(&naive, &f["out"]);
    common::within(e as f64, OUT_TOL, "naive attention output");
    assert_eq!(naive.dtype(), DType::F32);
}
