//! Learning-rate schedules as kohya runs them (diffusers' `get_scheduler`): a factor of the
//! base rate for optimizer step `s` (0-based: the first update uses `factor(0)`).

use serde::{Deserialize, Serialize};
use std::f64::consts::PI;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    Constant,
    #[value(name = "constant_with_warmup")]
    ConstantWithWarmup,
    Linear,
    Cosine,
    #[value(name = "cosine_with_restarts")]
    CosineWithRestarts,
    Polynomial,
}

impl LrScheduler {
    pub fn name(self) -> &'static str {
        match self {
            LrScheduler::Constant => "constant",
            LrScheduler::ConstantWithWarmup => "constant_with_warmup",
            LrScheduler::Linear => "linear",
            LrScheduler::Cosine => "cosine",
            LrScheduler::CosineWithRestarts => "cosine_with_restarts",
            LrScheduler::Polynomial => "polynomial",
        }
    }
}

/// A schedule over a run of `total` optimizer steps.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub kind: LrScheduler,
    pub warmup: u64,
    pub total: u64,
    /// cosine_with_restarts: number of hard restarts (kohya's `lr_scheduler_num_cycles`).
    pub num_cycles: f64,
    /// polynomial: power (kohya's `lr_scheduler_power`).
    pub power: f64,
}

/// kohya's `lr_warmup_steps`: a count, or a ratio of the total steps when below 1.
pub fn warmup_steps(value: f64, total: u64) -> u64 {
    if value < 1.0 {
        (value * total as f64) as u64
    } else {
        value as u64
    }
}

impl Schedule {
    /// The learning rate for optimizer step `s` with base rate `lr`.
    pub fn lr(&self, lr: f64, s: u64) -> f64 {
        if self.kind == LrScheduler::Polynomial {
            return self.polynomial(lr, s);
        }
        lr * self.factor(s)
    }

    fn factor(&self, s: u64) -> f64 {
        let (s, w, t) = (s as f64, self.warmup as f64, self.total as f64);
        let warm = || s / w.max(1.0);
        let progress = || (s - w) / (t - w).max(1.0);
        match self.kind {
            LrScheduler::Constant => 1.0,
            LrScheduler::ConstantWithWarmup if s < w => warm(),
            LrScheduler::ConstantWithWarmup => 1.0,
            _ if s < w => warm(),
            LrScheduler::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            LrScheduler::Cosine => (0.5 * (1.0 + (PI * 0.5 * 2.0 * progress()).cos())).max(0.0),
            LrScheduler::CosineWithRestarts => {
                let p = progress();
                if p >= 1.0 {
                    0.0
                } else {
                    (0.5 * (1.0 + (PI * ((self.num_cycles * p) % 1.0)).cos())).max(0.0)
                }
            }
            LrScheduler::Polynomial => unreachable!("handled in lr()"),
        }
    }

    fn polynomial(&self, lr: f64, s: u64) -> f64 {
        const LR_END: f64 = 1e-7;
        if s < self.warmup {
            return lr * s as f64 / (self.warmup as f64).max(1.0);
        }
        if s > self.total || lr <= LR_END {
            return LR_END.min(lr);
        }
        let decay_steps = (self.total - self.warmup) as f64;
        let remaining = 1.0 - (s - self.warmup) as f64 / decay_steps.max(1.0);
        (lr - LR_END) * remaining.powf(self.power) + LR_END
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(kind: LrScheduler, warmup: u64) -> Schedule {
        Schedule {
            kind,
            warmup,
            total: 100,
            num_cycles: 1.0,
            power: 1.0,
        }
    }

    #[test]
    fn diffusers_values() {
        // Values of diffusers' schedulers (lr 1, 100 steps) at chosen steps.
        let c = sched(LrScheduler::Cosine, 10);
        assert_eq!(c.lr(1.0, 0), 0.0);
        assert!((c.lr(1.0, 5) - 0.5).abs() < 1e-12);
        assert!((c.lr(1.0, 10) - 1.0).abs() < 1e-12);
        assert!((c.lr(1.0, 55) - 0.5).abs() < 1e-12);
        let l = sched(LrScheduler::Linear, 0);
        assert!((l.lr(2.0, 25) - 1.5).abs() < 1e-12);
        let mut r = sched(LrScheduler::CosineWithRestarts, 0);
        r.num_cycles = 2.0;
        assert!((r.lr(1.0, 50) - 1.0).abs() < 1e-12, "restart at half way");
        assert!((r.lr(1.0, 25) - 0.5).abs() < 1e-12);
        let p = sched(LrScheduler::Polynomial, 0);
        assert!((p.lr(1e-4, 50) - ((1e-4 - 1e-7) * 0.5 + 1e-7)).abs() < 1e-15);
        let cw = sched(LrScheduler::ConstantWithWarmup, 4);
        assert_eq!(cw.lr(1.0, 2), 0.5);
        assert_eq!(cw.lr(1.0, 99), 1.0);
    }

    #[test]
    fn warmup_ratio() {
        assert_eq!(warmup_steps(0.1, 250), 25);
        assert_eq!(warmup_steps(30.0, 250), 30);
    }
}
