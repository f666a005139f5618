//! One webui `HypernetworkModule`: a `torch.nn.Sequential` of Linear, activation,
//! LayerNorm and Dropout entries, applied as `x + layers(x) * strength`.

use super::shape::{Activation, HypernetworkShape, WeightInit};
use crate::model::Result;
use crate::model::grad::{mul_frozen, param};
use crate::model::nn::Dropout;
use crate::train::rng::Rng;
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

/// One entry of the Sequential; its index is its position (`linear.<index>.weight`).
#[derive(Clone, Debug)]
pub enum Layer {
    Linear { weight: Var, bias: Var },
    Act(Activation),
    LayerNorm { weight: Var, bias: Var },
    Dropout(Dropout),
}

/// The Sequential of one module (keys or values of one context width).
#[derive(Clone, Debug)]
pub struct HnModule {
    pub layers: Vec<Layer>,
}

/// torch's LayerNorm default.
const LN_EPS: f64 = 1e-5;

fn init_linear(
    (out, inp): (usize, usize),
    init: WeightInit,
    rng: &mut Rng,
    device: &Device,
) -> Result<(Var, Var)> {
    let n = out * inp;
    let (fi, fo) = (inp as f64, out as f64);
    let uniform = |rng: &mut Rng, bound: f64| -> Vec<f32> {
        (0..n)
            .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
            .collect()
    };
    let normal = |rng: &mut Rng, std: f64| -> Vec<f32> {
        rng.normals(n).into_iter().map(|x| x * std as f32).collect()
    };
    // Kaiming with nonlinearity relu, or leaky_relu with torch's default slope 0: gain
    // sqrt(2) either way, fan_in mode.
    let w = match init {
        WeightInit::Normal => normal(rng, 0.01),
        WeightInit::XavierUniform => uniform(rng, (6.0 / (fi + fo)).sqrt()),
        WeightInit::XavierNormal => normal(rng, (2.0 / (fi + fo)).sqrt()),
        WeightInit::KaimingUniform => uniform(rng, (2.0f64).sqrt() * (3.0 / fi).sqrt()),
        WeightInit::KaimingNormal => normal(rng, (2.0 / fi).sqrt()),
    };
    let w = Var::from_tensor(&Tensor::from_vec(w, (out, inp), device)?)?;
    // Biases: webui's `normal_(b, std=0)` for Normal and `zeros_` otherwise — zero.
    let b = Var::zeros(out, DType::F32, device)?;
    Ok((w, b))
}

impl HnModule {
    /// webui's module for context width `dim` with new weights drawn from `rng`.
    /// `salt` makes this module's dropout masks differ from the others'.
    pub fn create(
        dim: usize,
        shape: &HypernetworkShape,
        rng: &mut Rng,
        key: &Arc<AtomicU64>,
        salt: u64,
        device: &Device,
    ) -> Result<Self> {
        let widths = shape.widths(dim);
        let dropout = shape.dropout();
        let n = widths.len() - 1;
        let mut layers = Vec::new();
        for i in 0..n {
            let (weight, bias) =
                init_linear((widths[i + 1], widths[i]), shape.weight_init, rng, device)?;
            layers.push(Layer::Linear { weight, bias });
            let last = i + 1 == n;
            if shape.activation_func != Activation::Linear && (!last || shape.activate_output) {
                layers.push(Layer::Act(shape.activation_func));
            }
            if shape.layer_norm {
                // LayerNorm weights are N(0, 0.01) whatever the init (webui), biases 0.
                let w = rng
                    .normals(widths[i + 1])
                    .into_iter()
                    .map(|x| x * 0.01)
                    .collect::<Vec<_>>();
                layers.push(Layer::LayerNorm {
                    weight: Var::from_tensor(&Tensor::from_vec(w, widths[i + 1], device)?)?,
                    bias: Var::zeros(widths[i + 1], DType::F32, device)?,
                });
            }
            if dropout[i + 1] > 0.0 {
                layers.push(Layer::Dropout(Dropout {
                    p: dropout[i + 1],
                    key: key.clone(),
                    salt: salt * 64 + i as u64 + 1,
                }));
            }
        }
        Ok(Self { layers })
    }

    /// `(key suffix, var)` of every parameter in state-dict order
    /// (`linear.0.weight`, `linear.0.bias`, ...).
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            if let Layer::Linear { weight, bias } | Layer::LayerNorm { weight, bias } = l {
                out.push((format!("linear.{i}.weight"), weight));
                out.push((format!("linear.{i}.bias"), bias));
            }
        }
        out
    }

    /// `layers(x)` in `x`'s dtype (the f32 parameters are cast to it).
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let p = |v: &Var| param(v).to_dtype(dt);
        let mut h = x.clone();
        for l in &self.layers {
            h = match l {
                Layer::Linear { weight, bias } => h
                    .broadcast_matmul(&p(weight)?.t()?)?
                    .broadcast_add(&p(bias)?)?,
                Layer::Act(a) => activate(&h, *a)?,
                Layer::LayerNorm { weight, bias } => {
                    crate::model::nn::layer_norm(&h, &p(weight)?, &p(bias)?, LN_EPS)?
                }
                Layer::Dropout(d) => d.apply(&h)?,
            };
        }
        Ok(h)
    }

    /// webui's forward: `x + layers(x) * strength`.
    pub fn forward(&self, x: &Tensor, strength: f64) -> Result<Tensor> {
        let d = self.delta(x)?;
        Ok((x + (d * strength)?)?)
    }
}

/// A 0/1 mask of `cond(x)` in `x`'s dtype; a constant for backprop.
fn mask(x: &Tensor, m: Tensor) -> Result<Tensor> {
    Ok(m.to_dtype(x.dtype())?.detach())
}

/// torch's activation modules, built from ops with a backward (piecewise ones through
/// constant masks: exact away from the kinks, where torch picks one side too).
pub fn activate(x: &Tensor, a: Activation) -> Result<Tensor> {
    Ok(match a {
        Activation::Linear => x.clone(),
        Activation::Relu => x.relu()?,
        Activation::Leakyrelu => {
            let pos = mask(x, x.gt(0.0)?)?;
            // slope 1 where x > 0, 0.01 elsewhere (torch's default negative_slope)
            let slope = ((pos * 0.99)? + 0.01)?;
            mul_frozen(x, &slope)?
        }
        Activation::Elu => {
            // x for x > 0, exp(x) - 1 otherwise (alpha 1)
            let pos = mask(x, x.gt(0.0)?)?;
            let neg = mask(x, x.le(0.0)?)?;
            let e = (mul_frozen(x, &neg)?.exp()? - 1.0)?;
            (mul_frozen(x, &pos)? + mul_frozen(&e, &neg)?)?
        }
        Activation::Swish => {
            // Hardswish: 0 below -3, x above 3, x (x + 3) / 6 between.
            let hi = mask(x, x.gt(3.0)?)?;
            let mid = mask(x, (x.ge(-3.0)? * x.le(3.0)?)?)?;
            let q = ((x * (x + 3.0)?)? / 6.0)?;
            (mul_frozen(x, &hi)? + mul_frozen(&q, &mid)?)?
        }
        Activation::Tanh => x.tanh()?,
        Activation::Sigmoid => candle_nn::ops::sigmoid(x)?,
        Activation::Gelu => x.gelu_erf()?,
        Activation::Mish => {
            // x tanh(softplus(x)), softplus(x) = relu(x) + ln(1 + exp(-|x|)) (no overflow)
            let sp = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
            (x * sp.tanh()?)?
        }
        Activation::Silu => x.silu()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vals(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    /// Each activation against its closed form, and its gradient against finite
    /// differences (points away from the kinks).
    #[test]
    fn activations_match_torch_definitions_and_their_gradients() {
        let xs: Vec<f32> = vec![-5.0, -2.5, -1.0, -0.3, 0.2, 0.7, 1.5, 2.9, 4.0];
        let reference = |a: Activation, x: f64| -> f64 {
            let sp = (1.0 + x.exp()).ln();
            let erf = |z: f64| {
                // Abramowitz-Stegun 7.1.26 is too coarse; integrate instead.
                let n = 20000;
                let h = z / n as f64;
                (0..n)
                    .map(|i| {
                        let t = (i as f64 + 0.5) * h;
                        (-t * t).exp()
                    })
                    .sum::<f64>()
                    * h
                    * 2.0
                    / std::f64::consts::PI.sqrt()
            };
            match a {
                Activation::Linear => x,
                Activation::Relu => x.max(0.0),
                Activation::Leakyrelu => {
                    if x > 0.0 {
                        x
                    } else {
                        0.01 * x
                    }
                }
                Activation::Elu => {
                    if x > 0.0 {
                        x
                    } else {
                        x.exp() - 1.0
                    }
                }
                Activation::Swish => x * (x + 3.0).clamp(0.0, 6.0) / 6.0,
                Activation::Tanh => x.tanh(),
                Activation::Sigmoid => 1.0 / (1.0 + (-x).exp()),
                Activation::Gelu => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
                Activation::Mish => x * sp.tanh(),
                Activation::Silu => x / (1.0 + (-x).exp()),
            }
        };
        for a in Activation::ALL {
            let v = Var::from_vec(xs.clone(), xs.len(), &Device::Cpu).unwrap();
            let y = activate(v.as_tensor(), a).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            let got = vals(&y);
            let grad = g.get(v.as_tensor()).map(vals);
            for (i, &x) in xs.iter().enumerate() {
                let x = x as f64;
                let want = reference(a, x);
                assert!(
                    (got[i] as f64 - want).abs() < 1e-5,
                    "{a:?}({x}) = {} not {want}",
                    got[i]
                );
                let e = 1e-4;
                let fd = (reference(a, x + e) - reference(a, x - e)) / (2.0 * e);
                let gi = grad.as_ref().map(|g| g[i] as f64).unwrap_or(0.0);
                if a == Activation::Linear {
                    continue; // identity: no op recorded, the caller's graph passes through
                }
                assert!((gi - fd).abs() < 1e-3, "{a:?}'({x}) = {gi} not {fd}");
            }
        }
    }

    #[test]
    fn sequential_indices_follow_webui() {
        let key = Arc::new(AtomicU64::new(0));
        let mut rng = Rng::new(1);
        let shape = HypernetworkShape {
            activation_func: Activation::Relu,
            layer_norm: true,
            use_dropout: true,
            ..Default::default()
        };
        let m = HnModule::create(8, &shape, &mut rng, &key, 0, &Device::Cpu).unwrap();
        // Linear, ReLU, LayerNorm, Dropout(0.3), Linear, LayerNorm
        let names: Vec<String> = m.named_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "linear.0.weight",
                "linear.0.bias",
                "linear.2.weight",
                "linear.2.bias",
                "linear.4.weight",
                "linear.4.bias",
                "linear.5.weight",
                "linear.5.bias"
            ]
        );
        assert!(matches!(&m.layers[3], Layer::Dropout(d) if d.p == 0.3));
        let plain = HnModule::create(
            8,
            &HypernetworkShape {
                activation_func: Activation::Relu,
                activate_output: true,
                ..Default::default()
            },
            &mut rng,
            &key,
            0,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(plain.layers.len(), 4); // Linear, ReLU, Linear, ReLU
    }
}
