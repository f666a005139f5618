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
                Some(s) => Some(s.parse::<u64>().ok().filter(|&e| e > 0).ok_or_else(|| {
                    bad(format!("{s:?} is not a step number (1 or more, or -1)"))
                })?),
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

    /// The steps a run of at most `max_steps` trains, as webui's `LearnRateScheduler`:
    /// the schedule's end when it comes first (training stops there), else `max_steps`
    /// (rates past it are never reached).
    pub fn steps_within(&self, max_steps: u64) -> u64 {
        self.end().map_or(max_steps, |e| e.min(max_steps))
    }

    /// The rates a run of `total` steps uses: (rate, first step, last step), 1-based
    /// steps as the progress shows them, spans past `total` left out.
    pub fn spans(&self, total: u64) -> Vec<(f64, u64, u64)> {
        let mut out = Vec::new();
        let mut from = 0;
        for &(rate, end) in &self.rates {
            let to = end.unwrap_or(u64::MAX).min(total);
            if to > from {
                out.push((rate, from + 1, to));
            }
            from = to;
        }
        out
    }
}

/// `--learning-rate`: a number, or (textual inversion and hypernetworks) webui's
/// step-rate schedule `"0.005:100, 1e-3:1000, 1e-5"` (see [`StepRates`]). The same text
/// on the command line and in a recipe (`learning-rate: 1e-4` or
/// `learning-rate: "0.005:100, 1e-5"`); kept as given for the file's metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct LearningRate {
    text: String,
    steps: Option<StepRates>,
    base: f64,
}

impl LearningRate {
    /// Parses a number (`1e-4`) or webui's schedule; a one-line error naming the option.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if let Ok(v) = t.parse::<f64>() {
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "learning rate {text:?}: must be a finite number, 0 or more"
                ));
            }
            return Ok(Self {
                text: t.to_string(),
                steps: None,
                base: v,
            });
        }
        let steps = StepRates::parse(t)?;
        let base = steps.at(0).unwrap_or(0.0);
        Ok(Self {
            text: t.to_string(),
            steps: Some(steps),
            base,
        })
    }

    /// The rate as a number: the number given, or the schedule's first rate.
    pub fn base(&self) -> f64 {
        self.base
    }

    /// webui's schedule, when given in step syntax.
    pub fn steps(&self) -> Option<&StepRates> {
        self.steps.as_ref()
    }

    /// The text as given (trimmed).
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Display for LearningRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for LearningRate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::parse(s)
    }
}

impl From<f64> for LearningRate {
    fn from(v: f64) -> Self {
        Self {
            text: v.to_string(),
            steps: None,
            base: v,
        }
    }
}

/// A number stays a number; a schedule is its text.
impl Serialize for LearningRate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.steps {
            None => s.serialize_f64(self.base),
            Some(_) => s.serialize_str(&self.text),
        }
    }
}

impl<'de> Deserialize<'de> for LearningRate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(v) => Self::parse(&v.to_string()),
            Raw::Text(t) => Self::parse(&t),
        }
        .map_err(serde::de::Error::custom)
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

    #[test]
    fn webui_schedule_stops_at_its_end_or_max_steps() {
        // webui's LearnRateScheduler: rates clamped to the max steps, training stops at
        // the last rate's step.
        let r = StepRates::parse("0.05:2, 0.01:6").unwrap();
        assert_eq!(r.steps_within(4), 4);
        assert_eq!(r.steps_within(10), 6);
        assert_eq!(r.spans(4), vec![(0.05, 1, 2), (0.01, 3, 4)]);
        assert_eq!(r.spans(10), vec![(0.05, 1, 2), (0.01, 3, 6)]);
        let open = StepRates::parse("0.05:2, 0.0:-1").unwrap();
        assert_eq!(open.steps_within(4), 4);
        assert_eq!(open.spans(4), vec![(0.05, 1, 2), (0.0, 3, 4)]);
        assert_eq!(open.spans(1), vec![(0.05, 1, 1)]);
        let e = StepRates::parse("0.1:0").unwrap_err();
        assert!(e.contains("\"0\" is not a step number"), "{e}");
    }

    #[test]
    fn learning_rate_is_a_number_or_a_schedule_in_flags_and_recipes() {
        let n = LearningRate::parse("1e-4").unwrap();
        assert_eq!((n.base(), n.steps(), n.text()), (1e-4, None, "1e-4"));
        let s = LearningRate::parse("0.005:100, 1e-5").unwrap();
        assert_eq!(s.base(), 0.005);
        assert_eq!(s.steps().unwrap().at(100), Some(1e-5));
        assert_eq!(s.to_string(), "0.005:100, 1e-5");
        assert!(LearningRate::parse("-1").unwrap_err().contains("0 or more"));
        assert!(LearningRate::parse("inf").is_err());
        assert!(
            LearningRate::parse("fast")
                .unwrap_err()
                .contains("learning rate")
        );
        // YAML numbers and strings deserialize alike; numbers serialize as numbers.
        let y: LearningRate = serde_yaml::from_str("0.0001").unwrap();
        assert_eq!(y.base(), 1e-4);
        let y: LearningRate = serde_yaml::from_str("\"0.05:2, 0.0:-1\"").unwrap();
        assert_eq!(y.steps().unwrap().end(), None);
        assert!(serde_yaml::from_str::<LearningRate>("\"0.1:x\"").is_err());
        assert_eq!(serde_json::to_string(&n).unwrap(), "0.0001");
        assert_eq!(serde_json::to_string(&s).unwrap(), "\"0.005:100, 1e-5\"");
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
