//! Adafactor as `transformers.optimization.Adafactor` (kohya's `--optimizer_type
//! adafactor`): second moments factored into row and column means over the last two
//! dimensions for parameters of rank 2 or more (full for rank 1), the update divided by its
//! root mean square over `clip_threshold` (when above 1), an optional first moment
//! (`beta1`), weight decay scaled by the step's rate. The rate is the learning rate, or with
//! `relative_step` (the default) `min(1e-2, 1/sqrt(step))` (`1e-6 * step` under
//! `warmup_init`), times the parameter's root mean square (at least `eps2`) with
//! `scale_parameter`. In relative-step mode kohya drops the learning rates and the
//! scheduler (it logs `AdafactorSchedule`'s rates): so does this.

use super::Optimizer;
use candle_core::{D, DType, Device, Tensor};
use std::collections::BTreeMap;

/// Adafactor's settings, with transformers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorArgs {
    /// Added to the squared gradient.
    pub eps1: f64,
    /// The least parameter scale under `scale_parameter`.
    pub eps2: f64,
    pub clip_threshold: f64,
    /// The second moment's decay: `beta2 = 1 - step^decay_rate`.
    pub decay_rate: f64,
    /// First moment's decay; `None` keeps none.
    pub beta1: Option<f64>,
    pub scale_parameter: bool,
    pub relative_step: bool,
    pub warmup_init: bool,
}

impl Default for AdafactorArgs {
    fn default() -> Self {
        Self {
            eps1: 1e-30,
            eps2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta1: None,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorArgs {
    /// transformers' `_get_lr`: the rate of update `step` (1-based) for a parameter whose
    /// root mean square before the update is `rms`, with learning rate `lr`.
    pub fn lr(&self, lr: f64, step: u64, rms: f64) -> f64 {
        let rel = if self.relative_step {
            let min_step = if self.warmup_init {
                1e-6 * step as f64
            } else {
                1e-2
            };
            min_step.min(1.0 / (step as f64).sqrt())
        } else {
            lr
        };
        let scale = if self.scale_parameter {
            self.eps2.max(rms)
        } else {
            1.0
        };
        scale * rel
    }
}

/// One parameter's moments.
#[derive(Default)]
pub(super) struct State {
    pub(super) row: Option<Tensor>,
    pub(super) col: Option<Tensor>,
    sq: Option<Tensor>,
    avg: Option<Tensor>,
}

pub(super) fn factored(dims: &[usize]) -> bool {
    dims.len() >= 2
}

/// The shapes of the row and column moments of a factored parameter.
pub(super) fn factor_dims(dims: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let r = dims.len();
    let row = dims[..r - 1].to_vec();
    let mut col = dims[..r - 2].to_vec();
    col.push(dims[r - 1]);
    (row, col)
}

/// Bytes of state for one parameter.
pub(super) fn state_bytes(a: &AdafactorArgs, dims: &[usize]) -> u64 {
    let n = dims.iter().product::<usize>() as u64;
    let second = if factored(dims) {
        let (row, col) = factor_dims(dims);
        (row.iter().product::<usize>() + col.iter().product::<usize>()) as u64
    } else {
        n
    };
    4 * (second + if a.beta1.is_some() { n } else { 0 })
}

fn ema(old: Option<Tensor>, new: Tensor, beta: f64) -> candle_core::Result<Tensor> {
    let new = (new * (1.0 - beta))?;
    match old {
        Some(old) => (old * beta)? + new,
        None => Ok(new),
    }
}

fn rsqrt(t: &Tensor) -> candle_core::Result<Tensor> {
    t.sqrt()?.recip()
}

fn scalar(t: Tensor) -> candle_core::Result<f64> {
    t.to_dtype(DType::F64)?.to_scalar::<f64>()
}

/// transformers' `step` for one parameter `p` (f32) with gradient `g`, rate `lr` at update
/// `t`: the new value.
fn update(
    st: &mut State,
    a: &AdafactorArgs,
    weight_decay: f64,
    p: &Tensor,
    g: &Tensor,
    lr: f64,
    t: u64,
) -> candle_core::Result<Tensor> {
    let beta2t = 1.0 - (t as f64).powf(a.decay_rate);
    let sq = (g.sqr()? + a.eps1)?;
    let u = if factored(g.dims()) {
        let row = ema(st.row.take(), sq.mean(D::Minus1)?, beta2t)?;
        let col = ema(st.col.take(), sq.mean(D::Minus2)?, beta2t)?;
        let r = rsqrt(&row.broadcast_div(&row.mean_keepdim(D::Minus1)?)?)?.unsqueeze(row.rank())?;
        let c = rsqrt(&col.unsqueeze(col.rank() - 1)?)?;
        let u = r.broadcast_mul(&c)?.mul(g)?;
        st.row = Some(row);
        st.col = Some(col);
        u
    } else {
        let v = ema(st.sq.take(), sq, beta2t)?;
        let u = rsqrt(&v)?.mul(g)?;
        st.sq = Some(v);
        u
    };
    let rms = scalar(u.sqr()?.mean_all()?)?.sqrt();
    let u = ((u / (rms / a.clip_threshold).max(1.0))? * lr)?;
    let u = match a.beta1 {
        Some(b1) => {
            let m = ema(st.avg.take(), u, b1)?;
            st.avg = Some(m.clone());
            m
        }
        None => u,
    };
    let p = if weight_decay != 0.0 {
        (p + (p * (-weight_decay * lr))?)?
    } else {
        p.clone()
    };
    p - u
}

impl Optimizer {
    /// Adafactor's update of one parameter; `lr` is used only without `relative_step`.
    pub(super) fn update_adafactor(
        &mut self,
        gi: usize,
        vi: usize,
        grad: &Tensor,
        lr: f64,
    ) -> candle_core::Result<()> {
        let t = self.steps;
        let (a, wd) = (self.hyper.adafactor, self.hyper.weight_decay);
        let var = &self.groups[gi].vars[vi];
        // Detached: the moments must not keep a graph.
        let g = grad.detach().to_dtype(DType::F32)?;
        let dims = var.dims();
        let applied = if factored(dims) && a.beta1.is_none() && super::in_place_f32(var.as_tensor())
        {
            let (row_dims, col_dims) = factor_dims(dims);
            let rank = dims.len();
            let op = super::adafactor_cpu::InPlace {
                state: std::cell::RefCell::new(&mut self.factored[gi][vi]),
                args: a,
                weight_decay: wd,
                lr,
                t,
                shape: (
                    dims[..rank - 2].iter().product(),
                    dims[rank - 2],
                    dims[rank - 1],
                ),
                row_dims,
                col_dims,
                applied: std::cell::Cell::new(0.0),
            };
            super::update_in_place(var, &g, &op)?;
            op.applied.get()
        } else {
            let p = var.as_tensor().detach().to_dtype(DType::F32)?;
            let n = p.elem_count() as f64;
            let rms = scalar(p.sqr()?.sum_all()?)?.sqrt() / n.sqrt();
            let lr = a.lr(lr, t, rms);
            let new_p = update(&mut self.factored[gi][vi], &a, wd, &p, &g, lr, t)?;
            var.set(&new_p.to_dtype(var.dtype())?)?;
            lr
        };
        // The rate reported for a group is its first parameter's (AdafactorSchedule).
        if vi == 0
            && let Some(r) = self.adafactor_lrs.get_mut(gi)
        {
            *r = applied;
        }
        Ok(())
    }
}

const NAMES: [&str; 4] = ["exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg"];

fn slots(st: &mut State) -> [&mut Option<Tensor>; 4] {
    [&mut st.row, &mut st.col, &mut st.sq, &mut st.avg]
}

/// Appends the moments as `<group>.<index>.exp_avg_sq_row` (transformers' names).
pub(super) fn save(o: &Optimizer, out: &mut Vec<(String, Tensor)>) -> candle_core::Result<()> {
    for (gi, g) in o.groups.iter().enumerate() {
        for (vi, st) in o.factored[gi].iter().enumerate() {
            for (name, t) in NAMES.iter().zip([&st.row, &st.col, &st.sq, &st.avg]) {
                if let Some(t) = t {
                    out.push((
                        format!("{}.{vi}.{name}", g.name),
                        t.to_device(&Device::Cpu)?,
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Restores what [`save`] wrote; shapes must fit the parameters.
pub(super) fn load(o: &mut Optimizer, tensors: &BTreeMap<String, Tensor>) -> Result<(), String> {
    for (gi, g) in o.groups.iter().enumerate() {
        for (vi, var) in g.vars.iter().enumerate() {
            let dims = var.dims();
            let (row, col) = if factored(dims) {
                factor_dims(dims)
            } else {
                (vec![], vec![])
            };
            let want = [row, col, dims.to_vec(), dims.to_vec()];
            let st = &mut o.factored[gi][vi];
            for ((name, want), slot) in NAMES.iter().zip(want).zip(slots(st)) {
                let key = format!("{}.{vi}.{name}", g.name);
                *slot = match tensors.get(&key) {
                    None => None,
                    Some(t) if t.dims() != want => {
                        return Err(format!(
                            "optimizer state {key} has shape {:?}, the parameter {dims:?} needs {want:?}",
                            t.dims()
                        ));
                    }
                    Some(t) => Some(
                        t.to_dtype(DType::F32)
                            .and_then(|t| t.to_device(var.device()))
                            .map_err(|e| e.to_string())?,
                    ),
                };
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testdata::{self as td, SHAPES};
    use super::super::{Hyper, Optimizer, OptimizerKind};
    use std::collections::BTreeMap;

    /// The fixture's keyword arguments as `--optimizer-args` (through the parser) and the
    /// learning rate (0 when the case gives none: relative-step mode ignores it).
    fn hyper(args: &serde_json::Value) -> (Hyper, f64) {
        let mut list = vec![];
        let mut lr = 0.0;
        for (k, v) in args.as_object().unwrap() {
            match (k.as_str(), v) {
                ("lr", v) => lr = v.as_f64().unwrap(),
                (_, serde_json::Value::Array(a)) => list.push(format!("{k}=({},{})", a[0], a[1])),
                (_, serde_json::Value::Bool(b)) => {
                    list.push(format!("{k}={}", if *b { "True" } else { "False" }))
                }
                (_, v) => list.push(format!("{k}={v}")),
            }
        }
        let h = Hyper::defaults(OptimizerKind::Adafactor)
            .with_args(&list)
            .unwrap();
        (h, lr)
    }

    /// The in-place CPU update (taken for f32 parameters) against the tensor version (taken
    /// for f64 ones, computed in f32 all the same) over three updates with weight decay, in
    /// both of its settings, on both sides of its split by matrix count: a [16, 8, 3, 3]
    /// kernel (128 matrices of 3x3), a [300, 70] matrix and 300 matrices of 4x7 (parallel
    /// tasks starting inside a matrix). Only sums add up in another
    /// order, so the values agree to f32 rounding.
    #[test]
    fn in_place_update_matches_tensor_version() {
        use candle_core::{DType, Device, Tensor, Var};
        // [300, 4, 7]: tasks of 585 rows start inside a matrix of four rows.
        let shapes: [&[usize]; 3] = [&[16, 8, 3, 3], &[300, 70], &[300, 4, 7]];
        let wave = |n: usize, a: f64, b: f64| -> Vec<f32> {
            (0..n)
                .map(|k| (0.05 * (a * k as f64 + b).sin()) as f32)
                .collect()
        };
        for args in [
            vec!["weight_decay=0.1".to_string()],
            vec![
                "scale_parameter=False".into(),
                "relative_step=False".into(),
                "weight_decay=0.1".into(),
            ],
        ] {
            let h = Hyper::defaults(OptimizerKind::Adafactor)
                .with_args(&args)
                .unwrap();
            let run = |dtype: DType| -> Vec<Vec<f32>> {
                let vars: Vec<Var> = shapes
                    .iter()
                    .map(|&d| {
                        let n = d.iter().product();
                        let t = Tensor::from_vec(wave(n, 0.7, 0.3), d, &Device::Cpu).unwrap();
                        Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
                    })
                    .collect();
                let group = super::super::Group {
                    name: "unet".into(),
                    vars: vars.clone(),
                };
                let mut o = Optimizer::new(h, vec![group]);
                for t in 1..=3 {
                    let grads = shapes
                        .iter()
                        .map(|&d| {
                            let n = d.iter().product();
                            let g = wave(n, 0.37, 1.3 * t as f64);
                            let g = Tensor::from_vec(g, d, &Device::Cpu).unwrap();
                            g.to_dtype(dtype).unwrap()
                        })
                        .collect();
                    o.step(&[grads], &[1e-2]).unwrap();
                }
                vars.iter()
                    .map(|v| {
                        let t = v.as_tensor().to_dtype(DType::F32).unwrap();
                        t.flatten_all().unwrap().to_vec1().unwrap()
                    })
                    .collect()
            };
            let (fused, tensors) = (run(DType::F32), run(DType::F64));
            for ((a, b), d) in fused.iter().zip(&tensors).zip(shapes) {
                let e = td::max_rel(a, b, 1e-2);
                assert!(e < 2e-6, "{args:?} {d:?}: off by {e:e}");
                assert!(a != &wave(a.len(), 0.7, 0.3), "{d:?} did not move");
            }
        }
    }

    /// transformers' Adafactor in four settings (tests/fixtures/gen_optim8_fixtures.py):
    /// six updates of two groups (rank 2, 1, 4 and a zero-initialised rank 2); values
    /// within f32 rounding of the reference, and AdafactorSchedule's reported rates.
    #[test]
    fn adafactor_matches_transformers() {
        let fx: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/optim/adafactor.json"))
                .unwrap();
        for (case, c) in fx.as_object().unwrap() {
            let (h, lr) = hyper(&c["args"]);
            let (vars, groups) = td::setup();
            let mut o = Optimizer::new(h, groups);
            let mut worst = 0f32;
            for (i, st) in c["steps"].as_array().unwrap().iter().enumerate() {
                o.step(&td::grads(i + 1), &[lr, lr]).unwrap();
                for (j, (name, _)) in SHAPES.iter().enumerate() {
                    if let Some(want) = st.get(*name) {
                        let e = td::max_rel(&td::values(&vars[j]), &td::f32s(want), 1e-2);
                        assert!(e < 2e-6, "{case} step {} {name}: off by {e:e}", i + 1);
                        worst = worst.max(e);
                    }
                }
                let got = o.applied_lrs(&[lr, lr]);
                for (g, w) in got.iter().zip(st["lrs"].as_array().unwrap()) {
                    let w = w.as_f64().unwrap();
                    assert!(
                        (g - w).abs() <= 1e-6 * w,
                        "{case} step {}: lr {g} vs {w}",
                        i + 1
                    );
                }
            }
            eprintln!("{case}: worst relative difference {worst:e}");
        }
    }

    /// Saved after two updates (through a safetensors file) and loaded into a fresh
    /// optimizer, the run goes on to the same bits as one never interrupted.
    #[test]
    fn adafactor_resume_is_exact() {
        let fx: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/optim/adafactor.json"))
                .unwrap();
        for case in ["kohya", "warmup"] {
            let (h, lr) = hyper(&fx[case]["args"]);
            let (whole, groups) = td::setup();
            let mut o = Optimizer::new(h, groups);
            for t in 1..=6 {
                o.step(&td::grads(t), &[lr, lr]).unwrap();
            }
            let (first, groups) = td::setup();
            let mut a = Optimizer::new(h, groups);
            for t in 1..=2 {
                a.step(&td::grads(t), &[lr, lr]).unwrap();
            }
            let saved = super::super::tests::through_file(a.state_tensors().unwrap());
            assert!(saved.keys().any(|k| k.ends_with("exp_avg_sq_row")));
            let (resumed, groups) = td::setup();
            for (r, f) in resumed.iter().zip(&first) {
                r.set(f.as_tensor()).unwrap();
            }
            let mut b = Optimizer::new(h, groups);
            b.load_state(&saved, a.steps).unwrap();
            for t in 3..=6 {
                b.step(&td::grads(t), &[lr, lr]).unwrap();
            }
            for (x, y) in whole.iter().zip(&resumed) {
                assert_eq!(td::values(x), td::values(y), "{case}");
            }
            let mut bad: BTreeMap<_, _> = saved.clone();
            let row = bad
                .keys()
                .find(|k| k.ends_with("exp_avg_sq_row"))
                .unwrap()
                .clone();
            bad.insert(
                row,
                candle_core::Tensor::zeros(3, candle_core::DType::F32, &candle_core::Device::Cpu)
                    .unwrap(),
            );
            let (_, groups) = td::setup();
            let e = Optimizer::new(h, groups).load_state(&bad, 2).unwrap_err();
            assert!(e.contains("exp_avg_sq_row has shape [3]"), "{e}");
        }
    }

    #[test]
    fn kohya_args_parse() {
        let args = |s: &[&str]| {
            Hyper::defaults(OptimizerKind::Adafactor)
                .with_args(&s.iter().map(|s| s.to_string()).collect::<Vec<_>>())
        };
        let h = args(&[
            "scale_parameter=False",
            "relative_step=False",
            "warmup_init=False",
        ])
        .unwrap();
        let a = h.adafactor;
        assert!(!a.scale_parameter && !a.relative_step && !a.warmup_init && a.beta1.is_none());
        // kohya turns relative_step on for warmup_init.
        let h = args(&["relative_step=False", "warmup_init=True"]).unwrap();
        assert!(h.adafactor.relative_step);
        let h = args(&[
            "beta1=0.9",
            "eps=(1e-30,1e-2)",
            "clip_threshold=0.5",
            "decay_rate=-0.5",
        ])
        .unwrap();
        assert_eq!(h.adafactor.beta1, Some(0.9));
        assert_eq!((h.adafactor.eps1, h.adafactor.eps2), (1e-30, 1e-2));
        let e = args(&["relative_step=maybe"]).unwrap_err();
        assert!(e.contains("not True or False"), "{e}");
        let e = args(&["betas=0.9,0.99"]).unwrap_err();
        assert!(e.contains("accepted: eps, clip_threshold"), "{e}");
    }
}
