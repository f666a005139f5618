//! Memory-efficient attention against PyTorch `scaled_dot_product_attention`
//! (fixture: tests/fixtures/gen_attention_fixtures.py): output and q/k/v gradients.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use sdkit::model::attention::{attention_naive, attention_tiled};

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    common::rel_err(a, b, 0.0)
}

#[test]
fn tiled_attention_matches_pytorch_sdpa() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/attention/sdpa.safetensors"
    );
    let f = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    let scale = 1.0 / 4.0;
    // (bq, bk): one tile each way, uneven tiles, and one-row tiles.
    for (bq, bk) in [(256, 1024), (16, 10), (1, 7)] {
        let q = Var::from_tensor(&f["q"]).unwrap();
        let k = Var::from_tensor(&f["k"]).unwrap();
        let v = Var::from_tensor(&f["v"]).unwrap();
        let out =
            attention_tiled(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale, bq, bk).unwrap();
        let e = rel_err(&out, &f["out"]);
        assert!(e < 1e-5, "tiles {bq}x{bk}: output rel err {e}");
        let grads = (out * &f["r"])
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
            let e = rel_err(grads.get(x.as_tensor()).unwrap(), &f[name]);
            assert!(e < 1e-4, "tiles {bq}x{bk}: {name} rel err {e}");
        }
    }
    let naive = attention_naive(&f["q"], &f["k"], &f["v"], scale).unwrap();
    assert!(rel_err(&naive, &f["out"]) < 1e-5);
    assert_eq!(naive.dtype(), DType::F32);
}
