//! The parameters and gradients of tests/fixtures/gen_optim8_fixtures.py (closed formulas,
//! the same in both), and readers for its base64 arrays.

use super::Group;
use base64::Engine;
use candle_core::{Device, Tensor, Var};

/// Names and shapes: a rank-2 tensor over 4096 elements (8-bit moments, a short last
/// block), a rank-1 one, a rank-4 one (a conv kernel) and a zero-initialised one.
pub const SHAPES: [(&str, &[usize]); 4] = [
    ("a", &[48, 90]),
    ("b", &[7]),
    ("c", &[6, 4, 3, 3]),
    ("z", &[16, 8]),
];

fn numel(j: usize) -> usize {
    SHAPES[j].1.iter().product()
}

pub fn init(j: usize) -> Vec<f32> {
    (0..numel(j))
        .map(|k| {
            if SHAPES[j].0 == "z" {
                return 0.0;
            }
            let k = k as f64;
            (0.05 * (0.7 * k + 0.3 + j as f64).sin() + 0.01 * (0.05 * k).cos()) as f32
        })
        .collect()
}

/// The gradient of tensor `j` at update `t` (1-based): magnitudes that change by decades
/// from one block of 256 to the next.
pub fn grad(j: usize, t: usize) -> Tensor {
    let v: Vec<f32> = (0..numel(j))
        .map(|k| {
            let mag = 10f64.powf(-(((k / 256) % 4) as f64));
            let (k, t) = (k as f64, t as f64);
            (0.1 * (0.37 * k + 1.3 * t + j as f64).sin() * mag + 0.02 * (0.11 * k * t).cos()) as f32
        })
        .collect();
    Tensor::from_vec(v, SHAPES[j].1, &Device::Cpu).unwrap()
}

/// Fresh variables and the fixture's two groups: [a, b] and [c, z].
pub fn setup() -> (Vec<Var>, Vec<Group>) {
    let vars: Vec<Var> = (0..4)
        .map(|j| Var::from_vec(init(j), SHAPES[j].1, &Device::Cpu).unwrap())
        .collect();
    let groups = vec![
        Group {
            name: "g0".into(),
            vars: vec![vars[0].clone(), vars[1].clone()],
        },
        Group {
            name: "g1".into(),
            vars: vec![vars[2].clone(), vars[3].clone()],
        },
    ];
    (vars, groups)
}

/// The gradients of update `t` in group order.
pub fn grads(t: usize) -> Vec<Vec<Tensor>> {
    vec![vec![grad(0, t), grad(1, t)], vec![grad(2, t), grad(3, t)]]
}

fn bytes(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

pub fn f32s(v: &serde_json::Value) -> Vec<f32> {
    bytes(v.as_str().unwrap())
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn u8s(v: &serde_json::Value) -> Vec<u8> {
    bytes(v.as_str().unwrap())
}

pub fn values(v: &Var) -> Vec<f32> {
    v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
}

/// Largest |a - b| / (|b| + floor) over the elements.
pub fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (y.abs() + floor))
        .fold(0.0, f32::max)
}

/// Largest |a - b| over the elements.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
