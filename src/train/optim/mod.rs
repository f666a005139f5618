//! Optimizers with state that saves and loads (candle's AdamW keeps its moments private):
//! AdamW (torch's), Lion (lion-pytorch), SGD (torch's, with momentum), Prodigy
//! (prodigyopt), Adafactor (transformers', in `adafactor`) and AdamW8bit (bitsandbytes',
//! in `adamw8bit`); parameter groups with their own learning rates (kohya's `unet_lr` /
//! `text_encoder_lr`); gradient clipping by global norm (torch's `clip_grad_norm_`).

mod adafactor;
mod adafactor_cpu;
mod adamw8bit;
mod adamw_cpu;
#[cfg(test)]
mod testdata;

pub use adafactor::AdafactorArgs;
pub use adamw8bit::dynamic_map;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    #[value(name = "adamw", alias = "AdamW")]
    AdamW,
    #[value(name = "lion", alias = "Lion")]
    Lion,
    #[value(name = "sgd", alias = "SGD")]
    Sgd,
    /// Prodigy (prodigyopt): AdamW whose step size `d` is estimated as it goes; run it
    /// with learning rate 1.0.
    #[value(name = "prodigy", alias = "Prodigy")]
    Prodigy,
    /// Adafactor (transformers'): factored second moments; by default it sets its own
    /// step size (relative_step), or takes the learning rate with `relative_step=False`.
    #[value(name = "adafactor", alias = "Adafactor")]
    Adafactor,
    /// AdamW8bit (bitsandbytes'): AdamW with both moments kept in 8 bits per block of 256.
    #[value(name = "adamw8bit", alias = "AdamW8bit")]
    AdamW8bit,
}

impl OptimizerKind {
    /// The name kohya writes in `ss_optimizer`.
    pub fn kohya_name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "torch.optim.adamw.AdamW",
            OptimizerKind::Lion => "lion_pytorch.lion_pytorch.Lion",
            OptimizerKind::Sgd => "torch.optim.sgd.SGD",
            OptimizerKind::Prodigy => "prodigyopt.prodigy.Prodigy",
            OptimizerKind::Adafactor => "transformers.optimization.Adafactor",
            OptimizerKind::AdamW8bit => "bitsandbytes.optim.adamw.AdamW8bit",
        }
    }

    /// The `--optimizer-args` keys this optimizer takes.
    fn arg_keys(self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Adafactor => &[
                "eps",
                "clip_threshold",
                "decay_rate",
                "beta1",
                "weight_decay",
                "scale_parameter",
                "relative_step",
                "warmup_init",
            ],
            OptimizerKind::AdamW8bit => &["betas", "weight_decay", "eps", "min_8bit_size"],
            _ => &["betas", "weight_decay", "eps", "momentum", "d0", "d_coef"],
        }
    }
}

/// Hyper-parameters, with each optimizer's reference defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hyper {
    pub kind: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    /// Prodigy: initial step size estimate and its multiplier.
    pub d0: f64,
    pub d_coef: f64,
    /// Adafactor's own settings (its `eps` pair lives here too).
    pub adafactor: AdafactorArgs,
    /// AdamW8bit: parameters with fewer elements keep 32-bit moments.
    pub min_8bit_size: usize,
}

impl Hyper {
    pub fn defaults(kind: OptimizerKind) -> Self {
        let (beta1, beta2, weight_decay) = match kind {
            OptimizerKind::AdamW => (0.9, 0.999, 0.01),
            OptimizerKind::Lion => (0.9, 0.99, 0.0),
            OptimizerKind::Sgd => (0.0, 0.0, 0.0),
            OptimizerKind::Prodigy => (0.9, 0.999, 0.0),
            OptimizerKind::Adafactor => (0.0, 0.0, 0.0),
            OptimizerKind::AdamW8bit => (0.9, 0.999, 0.01),
        };
        Self {
            kind,
            beta1,
            beta2,
            eps: 1e-8,
            weight_decay,
            momentum: 0.0,
            d0: 1e-6,
            d_coef: 1.0,
            adafactor: AdafactorArgs::default(),
            min_8bit_size: 4096,
        }
    }

    /// kohya's `--optimizer_args`: `betas=0.9,0.99`, `weight_decay=0.1`, `eps=1e-6`,
    /// `momentum=0.9`; Adafactor's `scale_parameter=False relative_step=False
    /// warmup_init=False`, `beta1=None`, `eps=(1e-30,1e-3)`, `clip_threshold`, `decay_rate`;
    /// AdamW8bit's `min_8bit_size`. Keys the optimizer does not take are an error naming
    /// the accepted ones. As kohya, `warmup_init=True` turns `relative_step` on.
    pub fn with_args(mut self, args: &[String]) -> Result<Self, String> {
        let kind = self.kind;
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| format!("--optimizer-args {a:?}: expected key=value"))?;
            let num = |s: &str| {
                s.trim()
                    .parse::<f64>()
                    .map_err(|_| format!("--optimizer-args {a:?}: {s:?} is not a number"))
            };
            let pair = |v: &str| -> Result<(f64, f64), String> {
                let v = v
                    .trim()
                    .trim_matches(|c| c == '(' || c == ')' || c == '[' || c == ']');
                match v.split(',').collect::<Vec<_>>()[..] {
                    [x, y] => Ok((num(x)?, num(y)?)),
                    _ => Err(format!("--optimizer-args {a:?}: takes two numbers")),
                }
            };
            let flag = |v: &str| match v.trim() {
                "True" | "true" => Ok(true),
                "False" | "false" => Ok(false),
                s => Err(format!(
                    "--optimizer-args {a:?}: {s:?} is not True or False"
                )),
            };
            let key = k.trim();
            if !kind.arg_keys().contains(&key) {
                return Err(format!(
                    "--optimizer-args: unknown key {key:?} for --optimizer {} (accepted: {})",
                    kind.cli_name(),
                    kind.arg_keys().join(", ")
                ));
            }
            let af = &mut self.adafactor;
            match key {
                "betas" => (self.beta1, self.beta2) = pair(v)?,
                "weight_decay" => self.weight_decay = num(v)?,
                "eps" if kind == OptimizerKind::Adafactor => (af.eps1, af.eps2) = pair(v)?,
                "eps" => self.eps = num(v)?,
                "momentum" => self.momentum = num(v)?,
                "d0" => self.d0 = num(v)?,
                "d_coef" => self.d_coef = num(v)?,
                "clip_threshold" => af.clip_threshold = num(v)?,
                "decay_rate" => af.decay_rate = num(v)?,
                "beta1" => {
                    af.beta1 = match v.trim() {
                        "None" | "none" => None,
                        s => Some(num(s)?),
                    }
                }
                "scale_parameter" => af.scale_parameter = flag(v)?,
                "relative_step" => af.relative_step = flag(v)?,
                "warmup_init" => af.warmup_init = flag(v)?,
                "min_8bit_size" => {
                    self.min_8bit_size = v.trim().parse().map_err(|_| {
                        format!("--optimizer-args {a:?}: {v:?} is not a whole number")
                    })?
                }
                _ => unreachable!("every accepted key is handled"),
            }
        }
        if self.adafactor.warmup_init {
            self.adafactor.relative_step = true;
        }
        Ok(self)
    }

    /// Bytes of optimizer state for parameters of these shapes (f32 moments, or
    /// AdamW8bit's one byte per moment plus a f32 maximum per block of 256).
    pub fn state_bytes(&self, shapes: &[Vec<usize>]) -> u64 {
        shapes
            .iter()
            .map(|dims| {
                let n = dims.iter().product::<usize>() as u64;
                match self.kind {
                    OptimizerKind::AdamW => 8 * n,
                    OptimizerKind::Lion => 4 * n,
                    OptimizerKind::Sgd => 4 * n * (self.momentum != 0.0) as u64,
                    OptimizerKind::Prodigy => 16 * n,
                    OptimizerKind::Adafactor => adafactor::state_bytes(&self.adafactor, dims),
                    OptimizerKind::AdamW8bit => adamw8bit::state_bytes(self.min_8bit_size, n),
                }
            })
            .sum()
    }
}

impl OptimizerKind {
    /// The `--optimizer` value.
    pub fn cli_name(self) -> String {
        use clap::ValueEnum;
        self.to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }
}

/// An optimizer's update of one contiguous f32 parameter on the CPU, in the parameter's own
/// storage: no copy of it or of its gradient.
trait UpdateF32 {
    const NAME: &'static str;
    fn update(&self, p: &mut [f32], g: &[f32]) -> candle_core::Result<()>;
}

/// Runs `u` on `var` with gradient `g` through a candle in-place op (which takes the
/// storage locks); the caller checks that `var` is contiguous f32 on the CPU.
fn update_in_place<U: UpdateF32>(var: &Var, g: &Tensor, u: &U) -> candle_core::Result<()> {
    struct Op<'a, U>(&'a U);
    impl<U: UpdateF32> candle_core::InplaceOp2 for Op<'_, U> {
        fn name(&self) -> &'static str {
            U::NAME
        }

        fn cpu_fwd(
            &self,
            s1: &mut candle_core::CpuStorage,
            l1: &candle_core::Layout,
            s2: &candle_core::CpuStorage,
            l2: &candle_core::Layout,
        ) -> candle_core::Result<()> {
            use candle_core::CpuStorage::F32;
            let (F32(p), F32(g)) = (s1, s2) else {
                candle_core::bail!("{} in place: f32 parameter and gradient only", U::NAME)
            };
            let (Some((p0, p1)), Some((g0, g1))) =
                (l1.contiguous_offsets(), l2.contiguous_offsets())
            else {
                candle_core::bail!("{} in place: contiguous parameter and gradient", U::NAME)
            };
            if p1 - p0 != g1 - g0 {
                candle_core::bail!(
                    "{}: gradient of {} elements for {}",
                    U::NAME,
                    g1 - g0,
                    p1 - p0
                )
            }
            self.0.update(&mut p[p0..p1], &g[g0..g1])
        }
    }
    var.as_tensor().inplace_op2(&g.contiguous()?, &Op(u))
}

/// Whether `t` is a contiguous f32 CPU tensor (updated in place by the fused CPU ops).
pub(super) fn in_place_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

/// Parameters sharing a learning rate.
#[derive(Clone, Debug)]
pub struct Group {
    pub name: String,
    pub vars: Vec<Var>,
}

pub struct Optimizer {
    pub hyper: Hyper,
    pub groups: Vec<Group>,
    /// Per group, per var: (first moment or momentum buffer, second moment).
    state: Vec<Vec<(Option<Tensor>, Option<Tensor>)>>,
    /// Prodigy, per group, per var: (s, the initial value p0).
    prodigy_state: Vec<Vec<(Option<Tensor>, Option<Tensor>)>>,
    /// Prodigy's step size estimate, its maximum and the running numerator.
    pub d: f64,
    pub d_max: f64,
    pub d_numerator: f64,
    /// Adafactor's moments, per group, per var.
    factored: Vec<Vec<adafactor::State>>,
    /// AdamW8bit's 8-bit moments (kept on the CPU), per group, per var.
    quantized: Vec<Vec<Option<adamw8bit::Quantized>>>,
    /// Adafactor: the rate each group's first parameter took at the last step.
    adafactor_lrs: Vec<f64>,
    /// Updates done so far.
    pub steps: u64,
}

impl Optimizer {
    pub fn new(hyper: Hyper, groups: Vec<Group>) -> Self {
        let state: Vec<Vec<_>> = groups
            .iter()
            .map(|g| vec![(None, None); g.vars.len()])
            .collect();
        Self {
            factored: groups
                .iter()
                .map(|g| g.vars.iter().map(|_| Default::default()).collect())
                .collect(),
            quantized: groups
                .iter()
                .map(|g| g.vars.iter().map(|_| None).collect())
                .collect(),
            adafactor_lrs: Vec::new(),
            hyper,
            groups,
            prodigy_state: state.clone(),
            state,
            d: hyper.d0,
            d_max: hyper.d0,
            d_numerator: 0.0,
            steps: 0,
        }
    }

    /// One update with `grads[g][i]` for `groups[g].vars[i]` and `lrs[g]`.
    pub fn step(&mut self, grads: &[Vec<Tensor>], lrs: &[f64]) -> candle_core::Result<()> {
        if self.hyper.kind == OptimizerKind::Prodigy {
            return self.step_prodigy(grads, lrs);
        }
        self.begin_step();
        for (gi, gs) in grads.iter().enumerate() {
            for (vi, g) in gs.iter().enumerate() {
                self.update_one(gi, vi, g, lrs[gi])?;
            }
        }
        Ok(())
    }

    /// Starts an update made of [`Self::update_one`] calls, one per parameter, in any
    /// order (the fused backward pass); [`Self::step`] is this and every parameter.
    pub fn begin_step(&mut self) {
        self.steps += 1;
        if self.hyper.kind == OptimizerKind::Adafactor {
            self.adafactor_lrs = vec![0.0; self.groups.len()];
        }
    }

    /// Updates `groups[gi].vars[vi]` with its gradient `grad` at rate `lr`, as part of the
    /// update [`Self::begin_step`] started (not for Prodigy).
    pub fn update_one(
        &mut self,
        gi: usize,
        vi: usize,
        grad: &Tensor,
        lr: f64,
    ) -> candle_core::Result<()> {
        match self.hyper.kind {
            OptimizerKind::Prodigy => {
                return Err(candle_core::Error::Msg(
                    "prodigy updates every parameter at once".into(),
                ));
            }
            OptimizerKind::Adafactor => return self.update_adafactor(gi, vi, grad, lr),
            OptimizerKind::AdamW8bit => return self.update_adamw8bit(gi, vi, grad, lr),
            _ => {}
        }
        let h = self.hyper;
        let t = self.steps as i32;
        let var = &self.groups[gi].vars[vi];
        // Detached: neither the update nor the moments may hold a graph.
        let g = grad.detach().to_dtype(DType::F32)?;
        let (m, v) = &mut self.state[gi][vi];
        if matches!(h.kind, OptimizerKind::AdamW | OptimizerKind::Lion)
            && in_place_f32(var.as_tensor())
        {
            return adamw_cpu::step(h, var, &g, (m, v), lr, t);
        }
        let p = var.as_tensor().detach().to_dtype(DType::F32)?;
        let new_p = match h.kind {
            OptimizerKind::AdamW => {
                let p = (&p * (1.0 - lr * h.weight_decay))?;
                let m1 = match m.take() {
                    Some(m) => ((m * h.beta1)? + (&g * (1.0 - h.beta1))?)?,
                    None => (&g * (1.0 - h.beta1))?,
                };
                let g2 = g.sqr()?;
                let v1 = match v.take() {
                    Some(v) => ((v * h.beta2)? + (g2 * (1.0 - h.beta2))?)?,
                    None => (g2 * (1.0 - h.beta2))?,
                };
                let bc1 = 1.0 - h.beta1.powi(t);
                let bc2 = 1.0 - h.beta2.powi(t);
                let denom = ((v1.sqrt()? / bc2.sqrt())? + h.eps)?;
                let upd = (m1.div(&denom)? * (lr / bc1))?;
                *m = Some(m1);
                *v = Some(v1);
                (p - upd)?
            }
            OptimizerKind::Lion => {
                let p = (&p * (1.0 - lr * h.weight_decay))?;
                let m0 = match m.take() {
                    Some(m) => m,
                    None => g.zeros_like()?,
                };
                let c = ((&m0 * h.beta1)? + (&g * (1.0 - h.beta1))?)?;
                let upd = (c.sign()? * lr)?;
                *m = Some(((m0 * h.beta2)? + (&g * (1.0 - h.beta2))?)?);
                (p - upd)?
            }
            OptimizerKind::Prodigy | OptimizerKind::Adafactor | OptimizerKind::AdamW8bit => {
                unreachable!("their own step")
            }
            OptimizerKind::Sgd => {
                let g = if h.weight_decay != 0.0 {
                    (&g + (&p * h.weight_decay)?)?
                } else {
                    g
                };
                let d = if h.momentum != 0.0 {
                    let b = match m.take() {
                        Some(b) => ((b * h.momentum)? + &g)?,
                        None => g,
                    };
                    *m = Some(b.clone());
                    b
                } else {
                    g
                };
                (p - (d * lr)?)?
            }
        };
        var.set(&new_p.to_dtype(var.dtype())?)?;
        Ok(())
    }

    /// The rate per group the last step applied, for the logs: `lrs` (the schedule's),
    /// except Adafactor's, which reports what `AdafactorSchedule` does: its own rate for
    /// each group's first parameter.
    pub fn applied_lrs(&self, lrs: &[f64]) -> Vec<f64> {
        if self.hyper.kind == OptimizerKind::Adafactor && self.adafactor_lrs.len() == lrs.len() {
            self.adafactor_lrs.clone()
        } else {
            lrs.to_vec()
        }
    }

    /// Prodigy's update (prodigyopt 1.1): the numerator and denominator of the step size
    /// estimate accumulate over every parameter with the current `d`, `d` grows to the
    /// estimate, then each parameter takes an Adam step of size `d * lr` (the `d` before
    /// the update) with decoupled weight decay. Groups share one rate (or 0).
    fn step_prodigy(&mut self, grads: &[Vec<Tensor>], lrs: &[f64]) -> candle_core::Result<()> {
        let h = self.hyper;
        let lr = lrs.iter().copied().fold(0.0, f64::max);
        let beta3 = h.beta2.sqrt();
        let d = self.d;
        let dlr = d * lr;
        let mut numerator = self.d_numerator * beta3;
        let mut denom = 0.0;
        let scalar =
            |t: Tensor| -> candle_core::Result<f64> { t.to_dtype(DType::F64)?.to_scalar::<f64>() };
        for (gi, group) in self.groups.iter().enumerate() {
            if lrs[gi] <= 0.0 {
                continue;
            }
            for (vi, var) in group.vars.iter().enumerate() {
                let g = grads[gi][vi].detach().to_dtype(DType::F32)?;
                let p = var.as_tensor().detach().to_dtype(DType::F32)?;
                let (s_state, p0) = &mut self.prodigy_state[gi][vi];
                let p0 = p0.get_or_insert_with(|| p.copy().unwrap_or_else(|_| p.clone()));
                numerator += (d / h.d0) * dlr * scalar((&g * (&*p0 - &p)?)?.sum_all()?)?;
                let (m, v) = &mut self.state[gi][vi];
                let m1 = match m.take() {
                    Some(m) => ((m * h.beta1)? + (&g * (d * (1.0 - h.beta1)))?)?,
                    None => (&g * (d * (1.0 - h.beta1)))?,
                };
                let g2 = g.sqr()?;
                let v1 = match v.take() {
                    Some(v) => ((v * h.beta2)? + (g2 * (d * d * (1.0 - h.beta2)))?)?,
                    None => (g2 * (d * d * (1.0 - h.beta2)))?,
                };
                let s1 = match s_state.take() {
                    Some(s) => ((s * beta3)? + (&g * ((d / h.d0) * dlr))?)?,
                    None => (&g * ((d / h.d0) * dlr))?,
                };
                denom += scalar(s1.abs()?.sum_all()?)?;
                *m = Some(m1);
                *v = Some(v1);
                *s_state = Some(s1);
            }
        }
        if denom == 0.0 {
            return Ok(());
        }
        self.steps += 1;
        let mut d_new = d;
        if lr > 0.0 {
            let d_hat = h.d_coef * numerator / denom;
            if d == h.d0 {
                d_new = d.max(d_hat);
            }
            self.d_max = self.d_max.max(d_hat);
            // growth_rate is unbounded: min(d_max, d * inf) is d_max.
            d_new = if d_new > 0.0 { self.d_max } else { d_new };
        }
        self.d_numerator = numerator;
        self.d = d_new;
        for (gi, group) in self.groups.iter().enumerate() {
            for (vi, var) in group.vars.iter().enumerate() {
                let (m, v) = &self.state[gi][vi];
                let (Some(m), Some(v)) = (m, v) else { continue };
                let p = var.as_tensor().detach().to_dtype(DType::F32)?;
                let p = if h.weight_decay != 0.0 {
                    (&p * (1.0 - h.weight_decay * dlr))?
                } else {
                    p
                };
                let den = (v.sqrt()? + d_new * h.eps)?;
                let new_p = (p - (m.div(&den)? * dlr)?)?;
                var.set(&new_p.to_dtype(var.dtype())?)?;
            }
        }
        Ok(())
    }

    /// The moments as named tensors (`<group>.<index>.m` / `.v`) and the step count.
    pub fn state_tensors(&self) -> candle_core::Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        for (gi, g) in self.groups.iter().enumerate() {
            for (vi, (m, v)) in self.state[gi].iter().enumerate() {
                let cpu = |t: &Tensor| t.to_device(&candle_core::Device::Cpu);
                if let Some(m) = m {
                    out.push((format!("{}.{vi}.m", g.name), cpu(m)?));
                }
                if let Some(v) = v {
                    out.push((format!("{}.{vi}.v", g.name), cpu(v)?));
                }
                let (s, p0) = &self.prodigy_state[gi][vi];
                if let Some(s) = s {
                    out.push((format!("{}.{vi}.s", g.name), cpu(s)?));
                }
                if let Some(p0) = p0 {
                    out.push((format!("{}.{vi}.p0", g.name), cpu(p0)?));
                }
            }
        }
        adafactor::save(self, &mut out)?;
        adamw8bit::save(self, &mut out)?;
        if self.hyper.kind == OptimizerKind::Prodigy {
            let dev = candle_core::Device::Cpu;
            for (k, x) in [
                ("prodigy.d", self.d),
                ("prodigy.d_max", self.d_max),
                ("prodigy.d_numerator", self.d_numerator),
            ] {
                out.push((k.to_string(), Tensor::new(x, &dev)?));
            }
        }
        Ok(out)
    }

    /// Restore moments saved by [`Self::state_tensors`] after `steps` updates.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        steps: u64,
    ) -> Result<(), String> {
        self.steps = steps;
        for (gi, g) in self.groups.iter().enumerate() {
            for (vi, var) in g.vars.iter().enumerate() {
                let get = |s: &str| -> Result<Option<Tensor>, String> {
                    match tensors.get(&format!("{}.{vi}.{s}", g.name)) {
                        None => Ok(None),
                        Some(t) if t.dims() != var.dims() => Err(format!(
                            "optimizer state {}.{vi}.{s} has shape {:?}, the parameter {:?}",
                            g.name,
                            t.dims(),
                            var.dims()
                        )),
                        Some(t) => t
                            .to_dtype(DType::F32)
                            .and_then(|t| t.to_device(var.device()))
                            .map(Some)
                            .map_err(|e| e.to_string()),
                    }
                };
                self.state[gi][vi] = (get("m")?, get("v")?);
                self.prodigy_state[gi][vi] = (get("s")?, get("p0")?);
            }
        }
        adafactor::load(self, tensors)?;
        adamw8bit::load(self, tensors)?;
        let f = |k: &str| -> Result<Option<f64>, String> {
            tensors
                .get(k)
                .map(|t| t.to_dtype(DType::F64).and_then(|t| t.to_scalar::<f64>()))
                .transpose()
                .map_err(|e| e.to_string())
        };
        if let Some(d) = f("prodigy.d")? {
            self.d = d;
        }
        if let Some(d) = f("prodigy.d_max")? {
            self.d_max = d;
        }
        if let Some(n) = f("prodigy.d_numerator")? {
            self.d_numerator = n;
        }
        Ok(())
    }
}

/// torch's `clip_grad_norm_` over every gradient: scales them in place when the global
/// L2 norm exceeds `max_norm`; returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Vec<Tensor>], max_norm: f64) -> candle_core::Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter().flatten() {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = sq.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Saved state written to a safetensors file and read back, as --resume does.
    pub(super) fn through_file(state: Vec<(String, Tensor)>) -> BTreeMap<String, Tensor> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("optimizer.safetensors");
        let bytes = crate::formats::safetensors::serialize(&state, &BTreeMap::new()).unwrap();
        std::fs::write(&p, bytes).unwrap();
        crate::formats::safetensors::read_with_metadata(&p)
            .unwrap()
            .0
    }

    fn run(kind: OptimizerKind, steps: usize) -> Vec<f32> {
        let var = Var::from_vec(vec![1.0f32, -2.0, 0.5], 3, &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(
            Hyper::defaults(kind),
            vec![Group {
                name: "g".into(),
                vars: vec![var.clone()],
            }],
        );
        for s in 0..steps {
            // Gradient of sum(p^2 * (s+1)).
            let g = (var.as_tensor() * (2.0 * (s as f64 + 1.0))).unwrap();
            opt.step(&[vec![g]], &[0.1]).unwrap();
        }
        var.as_tensor().to_vec1().unwrap()
    }

    #[test]
    fn adamw_matches_torch() {
        // torch.optim.AdamW(lr=0.1) (betas 0.9/0.999, eps 1e-8, weight_decay 0.01), three
        // steps of the gradient above, values computed by the formula in f64.
        let got = run(OptimizerKind::AdamW, 3);
        let mut want = vec![];
        for p0 in [1.0f64, -2.0, 0.5] {
            let (mut p, mut m, mut v) = (p0, 0.0, 0.0);
            for s in 0..3 {
                let g = p * 2.0 * (s as f64 + 1.0);
                p *= 1.0 - 0.1 * 0.01;
                m = 0.9 * m + 0.1 * g;
                v = 0.999 * v + 0.001 * g * g;
                let t = s + 1;
                let denom = (v.sqrt() / (1.0 - 0.999f64.powi(t)).sqrt()) + 1e-8;
                p -= 0.1 / (1.0 - 0.9f64.powi(t)) * m / denom;
            }
            want.push(p as f32);
        }
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn lion_moves_by_lr_sign() {
        let got = run(OptimizerKind::Lion, 1);
        for (a, b) in got.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((a - b).abs() < 1e-6, "{got:?}");
        }
    }

    #[test]
    fn state_round_trips() {
        let var = Var::from_vec(vec![1.0f32, 2.0], 2, &Device::Cpu).unwrap();
        let groups = vec![Group {
            name: "unet".into(),
            vars: vec![var.clone()],
        }];
        let mut a = Optimizer::new(Hyper::defaults(OptimizerKind::AdamW), groups.clone());
        a.step(
            &[vec![Tensor::new(&[0.5f32, -1.0], &Device::Cpu).unwrap()]],
            &[0.1],
        )
        .unwrap();
        let saved: BTreeMap<String, Tensor> = a.state_tensors().unwrap().into_iter().collect();
        assert_eq!(saved.len(), 2);
        let mut b = Optimizer::new(Hyper::defaults(OptimizerKind::AdamW), groups);
        b.load_state(&saved, a.steps).unwrap();
        assert_eq!(b.state_tensors().unwrap().len(), 2);
        assert_eq!(b.steps, 1);
    }

    /// A gradient computed from tracked tensors carries their graph; the moments must
    /// not keep it (they live for the whole run: every step's activations would stay).
    #[test]
    fn state_holds_no_graph() {
        let var = Var::from_vec(vec![1.0f32, 2.0], 2, &Device::Cpu).unwrap();
        let tracked_grad = (var.as_tensor() * 3.0).unwrap();
        assert!(tracked_grad.track_op());
        for kind in [
            OptimizerKind::AdamW,
            OptimizerKind::Lion,
            OptimizerKind::Adafactor,
            OptimizerKind::AdamW8bit,
        ] {
            let mut o = Optimizer::new(
                Hyper::defaults(kind),
                vec![Group {
                    name: "g".into(),
                    vars: vec![var.clone()],
                }],
            );
            o.step(&[vec![tracked_grad.clone()]], &[0.1]).unwrap();
            for (k, t) in o.state_tensors().unwrap() {
                assert!(!t.track_op(), "{kind:?} {k} keeps a graph");
            }
        }
    }

    /// Prodigy against the prodigyopt package (tests/fixtures/gen_optim_fixtures.py): two
    /// groups (one starting at zero), weight decay, six steps; values within f32 rounding.
    #[test]
    fn prodigy_matches_prodigyopt() {
        let fx: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/optim/prodigy.json"))
                .unwrap();
        let v = |x: &serde_json::Value| -> Vec<f32> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|f| f.as_f64().unwrap() as f32)
                .collect()
        };
        let a = Var::from_vec(v(&fx["a0"]), 5, &Device::Cpu).unwrap();
        let b = Var::from_vec(v(&fx["b0"]), 3, &Device::Cpu).unwrap();
        let mut h = Hyper::defaults(OptimizerKind::Prodigy);
        h.weight_decay = 0.01;
        h.d0 = 1e-2;
        let mut o = Optimizer::new(
            h,
            vec![
                Group {
                    name: "a".into(),
                    vars: vec![a.clone()],
                },
                Group {
                    name: "b".into(),
                    vars: vec![b.clone()],
                },
            ],
        );
        for (i, st) in fx["steps"].as_array().unwrap().iter().enumerate() {
            let ga = Tensor::from_vec(v(&st["ga"]), 5, &Device::Cpu).unwrap();
            let gb = Tensor::from_vec(v(&st["gb"]), 3, &Device::Cpu).unwrap();
            o.step(&[vec![ga], vec![gb]], &[1.0, 1.0]).unwrap();
            let want_d = st["d"].as_f64().unwrap();
            assert!(
                (o.d - want_d).abs() <= 1e-4 * want_d,
                "step {i}: d {} vs {want_d}",
                o.d
            );
            for (var, key) in [(&a, "a"), (&b, "b")] {
                let got: Vec<f32> = var.as_tensor().to_vec1().unwrap();
                for (x, y) in got.iter().zip(v(&st[key])) {
                    assert!(
                        (x - y).abs() <= 1e-5 * y.abs().max(1e-3),
                        "step {i} {key}: {got:?} vs {:?}",
                        v(&st[key])
                    );
                }
            }
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let mut g = vec![vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()]];
        let n = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((n - 5.0).abs() < 1e-9);
        let v: Vec<f32> = g[0][0].to_vec1().unwrap();
        assert!((v[0] - 0.6).abs() < 1e-6 && (v[1] - 0.8).abs() < 1e-6);
    }
}
