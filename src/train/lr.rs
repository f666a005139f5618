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

/// webui's textual-inversion / hypernetwork learning-rate syntax: `"0.005:100, 1e-3:1000,
/// 1e-5"` is 0.005 until step 100, 1e-3 until step 1000, then 1e-5 to the end. A rate
/// with step -1 or no step runs to the end; when the last rate has a step, training ends
/// there (webui stops).
#[derive(Debug, Clone, PartialEq)]
pub struct StepRates {
    /// (rate, end step; None = to the end), ends increasing.
    rates: Vec<(f64, Option<u64>)>,
}

impl StepRates {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: String| {
            format!(
                "learning rate {text:?}: {why} (a number, or e.g. \"0.005:100, 1e-3:1000, 1e-5\": \
                 0.005 until step 100, 1e-3 until 1000, then 1e-5)"
            )
        };
        let mut rates: Vec<(f64, Option<u64>)> = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if rates.last().is_some_and(|r| r.1.is_none()) {
                return Err(bad(format!("{part:?} follows a rate that runs to the end")));
            }
            let (rate, step) = match part.split_once(':') {
                Some((r, s)) => (r.trim(), Some(s.trim())),
                None => (part, None),
            };
            let rate: f64 = rate
                .parse()
                .ok()
                .filter(|r: &f64| r.is_finite() && *r >= 0.0)
                .ok_or_else(|| bad(format!("{rate:?} is not a learning rate")))?;
            let end = match step {
                None | Some("-1") => None,
                Some(s) => Some(
                    s.parse::<u64>()
                        .map_err(|_| bad(format!("{s:?} is not a step number")))?,
                ),
            };
            if let (Some(e), Some((_, Some(prev)))) = (end, rates.last())
                && e <= *prev
            {
                return Err(bad(format!("step {e} does not come after step {prev}")));
            }
            rates.push((rate, end));
        }
        if rates.is_empty() {
            return Err(bad("no rate".into()));
        }
        Ok(Self { rates })
    }

    /// The rate for step `step` (0-based, steps done so far); None once the schedule
    /// has ended.
    pub fn at(&self, step: u64) -> Option<f64> {
        self.rates
            .iter()
            .find(|(_, end)| end.is_none_or(|e| step < e))
            .map(|(r, _)| *r)
    }

    /// The step where the schedule ends (None: it runs as long as training does).
    pub fn end(&self) -> Option<u64> {
        self.rates.last().and_then(|r| r.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn webui_rate_syntax() {
        let r = StepRates::parse("0.005:100, 1e-3:1000, 1e-5").unwrap();
        assert_eq!(r.at(0), Some(0.005));
        assert_eq!(r.at(99), Some(0.005));
        assert_eq!(r.at(100), Some(1e-3));
        assert_eq!(r.at(999), Some(1e-3));
        assert_eq!(r.at(1000), Some(1e-5));
        assert_eq!(r.at(1_000_000), Some(1e-5));
        assert_eq!(r.end(), None);
        let r = StepRates::parse(" 0.1:10,0.01:20 ").unwrap();
        assert_eq!((r.at(19), r.at(20), r.end()), (Some(0.01), None, Some(20)));
        assert_eq!(StepRates::parse("0.005").unwrap().at(5), Some(0.005));
        assert_eq!(StepRates::parse("0.5:-1").unwrap().at(5), Some(0.5));
        for bad in [
            "",
            "abc",
            "0.1:x",
            "0.1:10.5",
            "0.1, 0.2",
            "0.1:20, 0.2:10",
            "-1",
        ] {
            let e = StepRates::parse(bad).unwrap_err();
            assert!(e.contains("learning rate"), "{bad}: {e}");
        }
    }

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
