//! Grid axes: `KIND=VALUES` as the user writes them (`lora=out/ron-*.safetensors,none`,
//! `weight=0.4-1.0 [4]`, `steps=10-30 (+10)`, `prompt=red,blue`), parsed and checked before
//! anything renders.
//!
//! Values are comma separated (a value holding a comma is written in double quotes, as in
//! webui's X/Y/Z plot). Numeric axes take webui's ranges: `1-5` (every integer),
//! `1-5 (+2)` (a step; `(-2)` counts down), `0.4-1.0 [4]` (that many evenly spaced values,
//! ends included); float ranges with a step include the end when the step lands on it.

use crate::model::samplers::SamplerKind;
use regex::Regex;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// What an axis varies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AxisKind {
    /// LoRA / LoCon files (`none` = the reference without an adapter).
    Lora,
    /// The adapter's weight (webui's `<lora:name:WEIGHT>`).
    Weight,
    /// Prompt search / replace: the first value is searched, each value replaces it.
    Prompt,
    Cfg,
    Steps,
    Sampler,
    Seed,
    ClipSkip,
    /// Checkpoints (a DreamBooth run's saves, or other base models): loaded per value.
    Model,
    /// Textual-inversion files attached under the name the prompt uses (`none` = the
    /// reference without it).
    Embedding,
    /// webui hypernetworks (`none` = the reference without one).
    Hypernetwork,
}

impl AxisKind {
    pub const ALL: [AxisKind; 11] = [
        Self::Lora,
        Self::Weight,
        Self::Prompt,
        Self::Cfg,
        Self::Steps,
        Self::Sampler,
        Self::Seed,
        Self::ClipSkip,
        Self::Model,
        Self::Embedding,
        Self::Hypernetwork,
    ];

    /// The name written before `=`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "lora",
            Self::Weight => "weight",
            Self::Prompt => "prompt",
            Self::Cfg => "cfg",
            Self::Steps => "steps",
            Self::Sampler => "sampler",
            Self::Seed => "seed",
            Self::ClipSkip => "clip_skip",
            Self::Model => "model",
            Self::Embedding => "embedding",
            Self::Hypernetwork => "hypernetwork",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        let s = match s.as_str() {
            "sr" | "s/r" | "prompt_sr" => "prompt",
            "clipskip" => "clip_skip",
            "checkpoint" => "model",
            "cfg_scale" => "cfg",
            "ti" | "textual_inversion" | "embeddings" => "embedding",
            "hypernet" | "hn" => "hypernetwork",
            other => other,
        }
        .to_string();
        Self::ALL.into_iter().find(|k| k.name() == s)
    }
}

/// One value of an axis.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum Value {
    /// A file (lora, model, embedding, hypernetwork); `None` for the `none` reference.
    File(Option<PathBuf>),
    Float(f64),
    Int(u64),
    Text(String),
    Sampler(SamplerKind),
}

/// A parsed axis.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Axis {
    pub kind: AxisKind,
    pub values: Vec<Value>,
}

impl Axis {
    /// The label of value `i` drawn on the grid (`lora: ron-000004`, `cfg: 7`).
    pub fn label(&self, i: usize) -> String {
        let v = match &self.values[i] {
            Value::File(None) => "none".to_string(),
            Value::File(Some(p)) => p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string()),
            Value::Float(x) => fmt_float(*x),
            Value::Int(n) => n.to_string(),
            Value::Text(t) => return t.clone(),
            Value::Sampler(s) => s.a1111_name().to_string(),
        };
        format!("{}: {v}", self.kind.name())
    }
}

/// A float the way a person writes it (`0.4`, `7`, not `0.39999999`).
pub fn fmt_float(x: f64) -> String {
    let r = (x * 1e6).round() / 1e6;
    if r.fract() == 0.0 && r.abs() < 1e15 {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

/// Parse `KIND=VALUES`. Files are only listed here (globs expanded); they are checked
/// when the plan is resolved.
pub fn parse_axis(spec: &str) -> Result<Axis, String> {
    let Some((kind, values)) = spec.split_once('=') else {
        return Err(format!(
            "{spec:?}: an axis is KIND=VALUES (kinds: {})",
            kinds()
        ));
    };
    let Some(kind) = AxisKind::parse(kind) else {
        return Err(format!(
            "{spec:?}: unknown axis `{}` (kinds: {})",
            kind.trim(),
            kinds()
        ));
    };
    let items = split_values(values).map_err(|e| format!("{spec:?}: {e}"))?;
    if items.is_empty() {
        return Err(format!("{spec:?}: no values"));
    }
    let err = |e: String| format!("{spec:?}: {e}");
    let values = match kind {
        AxisKind::Lora | AxisKind::Model | AxisKind::Embedding | AxisKind::Hypernetwork => {
            let mut out = Vec::new();
            for it in &items {
                if kind != AxisKind::Model && it.eq_ignore_ascii_case("none") {
                    out.push(Value::File(None));
                } else {
                    out.extend(
                        expand_glob(it)
                            .map_err(err)?
                            .into_iter()
                            .map(Some)
                            .map(Value::File),
                    );
                }
            }
            out
        }
        AxisKind::Weight | AxisKind::Cfg => expand_floats(&items)
            .map_err(err)?
            .into_iter()
            .map(Value::Float)
            .collect(),
        AxisKind::Steps | AxisKind::Seed | AxisKind::ClipSkip => {
            let v = expand_ints(&items).map_err(err)?;
            if kind != AxisKind::Seed && v.contains(&0) {
                return Err(format!("{spec:?}: {} must be at least 1", kind.name()));
            }
            v.into_iter().map(Value::Int).collect()
        }
        AxisKind::Sampler => items
            .iter()
            .map(|s| parse_sampler(s).map(Value::Sampler))
            .collect::<Result<_, _>>()
            .map_err(err)?,
        AxisKind::Prompt => items.into_iter().map(Value::Text).collect(),
    };
    Ok(Axis { kind, values })
}

fn kinds() -> String {
    AxisKind::ALL.map(|k| k.name()).join(", ")
}

/// A sampler by webui's name or sdkit's flag value (`euler-a`, `dpm++2m-karras`).
pub fn parse_sampler(s: &str) -> Result<SamplerKind, String> {
    if let Some(k) = SamplerKind::parse(s) {
        return Ok(k);
    }
    match s.trim().to_ascii_lowercase().as_str() {
        "dpm++2m-karras" | "dpm++2m_karras" => Ok(SamplerKind::DpmPp2mKarras),
        _ => Err(format!(
            "unknown sampler `{s}` (DDIM, Euler a, DPM++ 2M Karras)"
        )),
    }
}

/// Comma-separated values; a double-quoted value may hold commas (`""` is a quote).
pub fn split_values(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    let mut quoted = false;
    let mut was_quoted = false;
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                chars.next();
                cur.push('"');
            }
            '"' if quoted => quoted = false,
            '"' if cur.trim().is_empty() => {
                cur.clear();
                quoted = true;
                was_quoted = true;
            }
            ',' if !quoted => {
                push_value(&mut out, &mut cur, was_quoted);
                was_quoted = false;
            }
            c => cur.push(c),
        }
    }
    if quoted {
        return Err("unclosed double quote".into());
    }
    push_value(&mut out, &mut cur, was_quoted);
    Ok(out)
}

fn push_value(out: &mut Vec<String>, cur: &mut String, quoted: bool) {
    let v = if quoted {
        std::mem::take(cur)
    } else {
        let t = cur.trim().to_string();
        cur.clear();
        t
    };
    if quoted || !v.is_empty() {
        out.push(v);
    }
}

const NUM: &str = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?";

fn re_range() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(&format!(
            r"^\s*({NUM})\s*-\s*({NUM})\s*(?:\(\s*([+-]\s*{NUM})\s*\)|\[\s*(\d+)\s*\])?\s*$"
        ))
        .expect("valid")
    })
}

/// A range item: (start, end, step, count).
fn range_parts(item: &str) -> Option<(f64, f64, Option<f64>, Option<usize>)> {
    let c = re_range().captures(item)?;
    let num = |s: &str| s.replace(' ', "").parse::<f64>().ok();
    let a = num(&c[1])?;
    let b = num(&c[2])?;
    let step = c.get(3).and_then(|m| num(m.as_str()));
    let count = c.get(4).and_then(|m| m.as_str().parse().ok());
    Some((a, b, step, count))
}

/// Integers: `3`, `1-5`, `1-9 (+2)`, `10-1 (-3)`, `1-10 [4]` (rounded down like webui).
pub fn expand_ints(items: &[String]) -> Result<Vec<u64>, String> {
    let mut out = Vec::new();
    for it in items {
        if let Ok(n) = it.trim().parse::<u64>() {
            out.push(n);
            continue;
        }
        let Some((a, b, step, count)) = range_parts(it) else {
            return Err(format!(
                "`{it}` is not a whole number or a range (1-5, 1-5 (+2), 1-9 [3])"
            ));
        };
        let whole = |x: f64| x.fract() == 0.0 && x >= 0.0;
        if !whole(a) || !whole(b) || step.is_some_and(|s| s.fract() != 0.0) {
            return Err(format!("`{it}`: whole numbers expected"));
        }
        let (a, b) = (a as i64, b as i64);
        if let Some(n) = count {
            out.extend(
                linspace(a as f64, b as f64, n)?
                    .into_iter()
                    .map(|x| x.floor() as u64),
            );
            continue;
        }
        let step = step
            .map(|s| s as i64)
            .unwrap_or(if b >= a { 1 } else { -1 });
        if step == 0 || (b - a).signum() * step.signum() < 0 {
            return Err(format!("`{it}`: the step never reaches the end"));
        }
        let mut x = a;
        while (step > 0 && x <= b) || (step < 0 && x >= b) {
            out.push(x as u64);
            x += step;
        }
    }
    check_len(&out)?;
    Ok(out)
}

/// Numbers: `0.7`, `0.4-1.0 [4]`, `0-1 (+0.25)`.
pub fn expand_floats(items: &[String]) -> Result<Vec<f64>, String> {
    let mut out = Vec::new();
    for it in items {
        if let Ok(x) = it.trim().parse::<f64>()
            && x.is_finite()
        {
            out.push(x);
            continue;
        }
        let Some((a, b, step, count)) = range_parts(it) else {
            return Err(format!(
                "`{it}` is not a number or a range (0.4-1.0 [4], 0-1 (+0.25))"
            ));
        };
        if let Some(n) = count {
            out.extend(linspace(a, b, n)?);
            continue;
        }
        let step = step.unwrap_or(if b >= a { 1.0 } else { -1.0 });
        if step == 0.0 || (b - a) * step < 0.0 {
            return Err(format!("`{it}`: the step never reaches the end"));
        }
        let n = ((b - a) / step + 1e-9).floor() as usize;
        if n > MAX_VALUES {
            return Err(format!("`{it}`: more than {MAX_VALUES} values"));
        }
        // a + i * step, not repeated addition: no drift, `0-1 (+0.1)` ends at 1.
        out.extend((0..=n).map(|i| round12(a + i as f64 * step)));
    }
    check_len(&out)?;
    Ok(out)
}

/// Cut float noise (`0.30000000000000004` -> `0.3`) without changing real values.
fn round12(x: f64) -> f64 {
    (x * 1e12).round() / 1e12
}

const MAX_VALUES: usize = 10_000;

fn check_len<T>(v: &[T]) -> Result<(), String> {
    if v.len() > MAX_VALUES {
        return Err(format!("more than {MAX_VALUES} values"));
    }
    Ok(())
}

fn linspace(a: f64, b: f64, n: usize) -> Result<Vec<f64>, String> {
    match n {
        0 => Err("a count of 0 values".into()),
        1 => Ok(vec![a]),
        n if n > MAX_VALUES => Err(format!("more than {MAX_VALUES} values")),
        n => Ok((0..n)
            .map(|i| round12(a + (b - a) * i as f64 / (n - 1) as f64))
            .collect()),
    }
}

/// Paths of a value: the value itself, or the sorted matches of `*` / `?` in its file
/// name (the folder part is taken as written). No match is an error.
pub fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>, String> {
    let p = Path::new(pattern);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        return Ok(vec![p.to_path_buf()]);
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(format!("`{pattern}`: wildcards only in the file name"));
    }
    let rd = std::fs::read_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            !n.starts_with(crate::util::atomic::TEMP_PREFIX) && wildcard(&name, &n)
        })
        .map(|e| dir.join(e.file_name()))
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(format!("`{pattern}` matches no file"));
    }
    Ok(out)
}

/// `*` (any run) and `?` (one character) matching of a whole name.
fn wildcard(pat: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pat.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn floats(s: &str) -> Vec<f64> {
        expand_floats(&split_values(s).unwrap()).unwrap()
    }

    fn ints(s: &str) -> Vec<u64> {
        expand_ints(&split_values(s).unwrap()).unwrap()
    }

    #[test]
    fn webui_ranges() {
        assert_eq!(ints("1-5"), [1, 2, 3, 4, 5]);
        assert_eq!(ints("1-5 (+2)"), [1, 3, 5]);
        assert_eq!(ints("10-1 (-3)"), [10, 7, 4, 1]);
        assert_eq!(ints("5-3"), [5, 4, 3]);
        assert_eq!(ints("1-10 [4]"), [1, 4, 7, 10]);
        assert_eq!(ints("1, 3-4, 9"), [1, 3, 4, 9]);
        assert_eq!(floats("0.4-1.0 [4]"), [0.4, 0.6, 0.8, 1.0]);
        assert_eq!(floats("0-1 (+0.25)"), [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(floats("0-1 (+0.1)").last(), Some(&1.0));
        assert_eq!(floats("0-1 (+0.1)").len(), 11);
        assert_eq!(floats("0.5, 7, 1e-1"), [0.5, 7.0, 0.1]);
        assert_eq!(floats("1-0 (-0.5)"), [1.0, 0.5, 0.0]);
    }

    #[test]
    fn bad_values_say_which() {
        let e = expand_ints(&["1-5 (-1)".into()]).unwrap_err();
        assert!(e.contains("never reaches"), "{e}");
        let e = expand_floats(&["0.4-abc".into()]).unwrap_err();
        assert!(e.contains("`0.4-abc`"), "{e}");
        let e = expand_ints(&["1.5".into()]).unwrap_err();
        assert!(e.contains("`1.5`"), "{e}");
        assert!(parse_axis("steps=0,10").unwrap_err().contains("at least 1"));
        assert!(
            parse_axis("colour=1")
                .unwrap_err()
                .contains("unknown axis `colour`")
        );
        assert!(parse_axis("cfg").unwrap_err().contains("KIND=VALUES"));
        assert!(
            parse_axis("sampler=heun")
                .unwrap_err()
                .contains("unknown sampler")
        );
        assert!(parse_axis("cfg=").unwrap_err().contains("no values"));
    }

    #[test]
    fn quoted_values_keep_commas() {
        assert_eq!(
            split_values(r#"red hair, "red hair, blue eyes", "say ""hi""""#).unwrap(),
            ["red hair", "red hair, blue eyes", "say \"hi\""]
        );
        assert!(split_values("\"open").is_err());
    }

    #[test]
    fn axis_kinds_and_labels() {
        let a = parse_axis("Sampler=Euler a,dpm++2m-karras,ddim").unwrap();
        assert_eq!(a.kind, AxisKind::Sampler);
        assert_eq!(a.label(1), "sampler: DPM++ 2M Karras");
        let a = parse_axis("cfg=4-8 (+2)").unwrap();
        assert_eq!(a.label(2), "cfg: 8");
        let a = parse_axis("prompt=red,blue").unwrap();
        assert_eq!(a.kind, AxisKind::Prompt);
        assert_eq!(a.label(1), "blue");
        let a = parse_axis("weight=0.4-1 [4]").unwrap();
        assert_eq!(a.label(1), "weight: 0.6");
    }

    #[test]
    fn globs_sorted_and_none() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "ron-000002.safetensors",
            "ron-000001.safetensors",
            "ron.txt",
            "x.safetensors",
        ] {
            std::fs::write(d.path().join(n), b"").unwrap();
        }
        let spec = format!("lora=none,{}/ron-*.safetensors", d.path().display());
        let a = parse_axis(&spec).unwrap();
        let labels: Vec<String> = (0..a.values.len()).map(|i| a.label(i)).collect();
        assert_eq!(
            labels,
            ["lora: none", "lora: ron-000001", "lora: ron-000002"]
        );
        let a = parse_axis(&format!("hn=none,{}/ron-000001.*", d.path().display())).unwrap();
        assert_eq!(a.kind, AxisKind::Hypernetwork);
        assert_eq!(a.label(0), "hypernetwork: none");
        assert_eq!(a.label(1), "hypernetwork: ron-000001");
        let a = parse_axis(&format!("TI=None,{}/x.*", d.path().display())).unwrap();
        assert_eq!(a.kind, AxisKind::Embedding);
        assert_eq!(a.values[0], Value::File(None));
        assert_eq!(a.label(1), "embedding: x");
        // a model axis has no `none`: it is a file name there
        let a = parse_axis("model=none").unwrap();
        assert_eq!(a.values[0], Value::File(Some("none".into())));
        let e = parse_axis(&format!("lora={}/nope-*", d.path().display())).unwrap_err();
        assert!(e.contains("matches no file"), "{e}");
        assert!(wildcard("a?c*", "abcdef"));
        assert!(!wildcard("a*z", "abc"));
    }
}
