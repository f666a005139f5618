//! From one image's scores to its ordered, formatted tag list.
//!
//! Order of operations: threshold (or MCut) per category, exclusions, sort, character
//! tags first, `max_tags`, rating tag, always-first tags, then display formatting
//! (underscores to spaces except kaomoji, bracket escaping).

use super::labels::{Category, Label};

/// Kaomoji tags whose underscores are part of the face (SmilingWolf's list); kohya also
/// keeps underscores of every tag of 3 characters or fewer.
pub const KAOMOJI: &[&str] = &[
    "0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9", ">_o",
    "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||",
];

/// Where the rating tag goes, if anywhere.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum RatingPos {
    #[default]
    Off,
    First,
    Last,
}

/// Tag order before the front-placement rules.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum SortBy {
    /// Highest score first.
    Score,
    /// By tag name (as in the label file).
    Alphabet,
    /// The label file's order.
    Model,
}

/// Resolved selection settings (per-kind defaults already applied).
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub general_threshold: f32,
    pub character_threshold: f32,
    pub mcut: bool,
    pub rating: RatingPos,
    pub exclude: Vec<String>,
    pub always_first: Vec<String>,
    pub character_first: bool,
    pub underscores_to_spaces: bool,
    /// Keep the underscores of kaomoji (WD14 taggers) or replace them too (webui's
    /// DeepDanbooru replaces every underscore).
    pub keep_kaomoji: bool,
    pub escape_brackets: bool,
    pub sort: SortBy,
    pub max_tags: Option<usize>,
}

/// One chosen tag.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Picked {
    /// Display form written to the caption.
    pub tag: String,
    pub score: f32,
    pub category: Category,
    /// Index in the label file.
    #[serde(skip)]
    pub index: usize,
}

/// MCut (SmilingWolf's demo): the midpoint of the largest gap between consecutive
/// scores sorted descending. Fewer than two scores: 0 (keep all).
pub fn mcut_threshold(scores: &[f32]) -> f32 {
    if scores.len() < 2 {
        return 0.0;
    }
    let mut s = scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let mut t = 0;
    let mut best = f32::NEG_INFINITY;
    for i in 0..s.len() - 1 {
        let d = s[i] - s[i + 1];
        if d > best {
            best = d;
            t = i;
        }
    }
    (s[t] + s[t + 1]) / 2.0
}

/// Display form of a label name.
pub fn format_tag(name: &str, sel: &Selection) -> String {
    let mut t = if sel.underscores_to_spaces && !(sel.keep_kaomoji && is_kaomoji(name)) {
        name.replace('_', " ")
    } else {
        name.to_string()
    };
    if sel.escape_brackets {
        t = escape_brackets(&t);
    }
    t
}

pub fn is_kaomoji(name: &str) -> bool {
    name.chars().count() <= 3 || KAOMOJI.contains(&name)
}

/// `\`, `(` and `)` get a backslash, as webui does for prompts.
pub fn escape_brackets(t: &str) -> String {
    let mut o = String::with_capacity(t.len() + 4);
    for c in t.chars() {
        if matches!(c, '\\' | '(' | ')') {
            o.push('\\');
        }
        o.push(c);
    }
    o
}

/// Whether `name` (label spelling) is named by a user list entry. Entries match the
/// label spelling or the spaced spelling, so `long hair` and `long_hair` both work.
fn listed(list: &[String], name: &str) -> bool {
    list.iter()
        .any(|e| e == name || e.replace(' ', "_") == name.replace(' ', "_"))
}

/// Chooses and orders the tags for one image. `scores.len() == labels.len()`.
pub fn select(labels: &[Label], scores: &[f32], sel: &Selection) -> Vec<Picked> {
    let of = |cat: Category| -> Vec<f32> {
        labels
            .iter()
            .zip(scores)
            .filter(|(l, _)| l.category == cat)
            .map(|(_, &s)| s)
            .collect()
    };
    let (gt, ct) = if sel.mcut {
        (
            mcut_threshold(&of(Category::General)),
            mcut_threshold(&of(Category::Character)).max(0.15),
        )
    } else {
        (sel.general_threshold, sel.character_threshold)
    };
    let mut picked: Vec<Picked> = Vec::new();
    for (i, (l, &p)) in labels.iter().zip(scores).enumerate() {
        let keep = match l.category {
            Category::General => p >= gt,
            Category::Character => p >= ct,
            Category::Rating => false,
        };
        if keep && !listed(&sel.exclude, &l.name) {
            picked.push(Picked {
                tag: l.name.clone(),
                score: p,
                category: l.category,
                index: i,
            });
        }
    }
    match sel.sort {
        SortBy::Score => picked.sort_by(|a, b| b.score.total_cmp(&a.score)),
        SortBy::Alphabet => picked.sort_by(|a, b| a.tag.cmp(&b.tag)),
        SortBy::Model => {}
    }
    if sel.character_first {
        picked.sort_by_key(|p| p.category != Category::Character);
        if sel.sort == SortBy::Model {
            // kohya inserts each character tag at the front as it meets it, which leaves
            // them in reverse label order; do the same so captions match.
            let n = picked
                .iter()
                .take_while(|p| p.category == Category::Character)
                .count();
            picked[..n].reverse();
        }
    }
    if let Some(n) = sel.max_tags {
        picked.truncate(n);
    }
    if sel.rating != RatingPos::Off {
        let best = labels
            .iter()
            .zip(scores)
            .enumerate()
            .filter(|(_, (l, _))| l.category == Category::Rating)
            .fold(None::<(usize, f32)>, |b, (i, (_, &s))| match b {
                Some((_, bs)) if bs >= s => b,
                _ => Some((i, s)),
            });
        if let Some((i, s)) = best
            && !listed(&sel.exclude, &labels[i].name)
        {
            let r = Picked {
                tag: labels[i].name.clone(),
                score: s,
                category: Category::Rating,
                index: i,
            };
            match sel.rating {
                RatingPos::First => picked.insert(0, r),
                _ => picked.push(r),
            }
        }
    }
    for (k, want) in sel.always_first.iter().enumerate() {
        let want = std::slice::from_ref(want);
        if let Some(pos) = picked.iter().position(|p| listed(want, &p.tag))
            && pos >= k
        {
            let p = picked.remove(pos);
            picked.insert(k.min(picked.len()), p);
        }
    }
    for p in picked.iter_mut() {
        p.tag = format_tag(&p.tag, sel);
    }
    picked
}

/// Tags of a new caption: `trigger` first, then `existing` (per `mode`) and `predicted`,
/// duplicates removed keeping the first occurrence.
pub fn merge(
    existing: &[String],
    predicted: &[String],
    trigger: &[String],
    prepend: bool,
) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let (a, b) = if prepend {
        (predicted, existing)
    } else {
        (existing, predicted)
    };
    for t in trigger.iter().chain(a).chain(b) {
        let t = t.trim();
        if !t.is_empty() && !out.iter().any(|o| o == t) {
            out.push(t.to_string());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel() -> Selection {
        Selection {
            general_threshold: 0.35,
            character_threshold: 0.35,
            mcut: false,
            rating: RatingPos::Off,
            exclude: vec![],
            always_first: vec![],
            character_first: false,
            underscores_to_spaces: true,
            keep_kaomoji: true,
            escape_brackets: false,
            sort: SortBy::Model,
            max_tags: None,
        }
    }

    fn lab(n: &str, c: Category) -> Label {
        Label {
            name: n.into(),
            category: c,
        }
    }

    #[test]
    fn mcut_splits_at_largest_gap() {
        assert!((mcut_threshold(&[0.9, 0.8, 0.2, 0.1]) - 0.5).abs() < 1e-6);
        assert_eq!(mcut_threshold(&[0.3]), 0.0);
    }

    #[test]
    fn formatting_keeps_kaomoji_and_escapes() {
        let mut s = sel();
        assert_eq!(format_tag("long_hair", &s), "long hair");
        assert_eq!(format_tag("^_^", &s), "^_^");
        assert_eq!(format_tag("(o)_(o)", &s), "(o)_(o)");
        s.escape_brackets = true;
        assert_eq!(format_tag("star_(symbol)", &s), "star \\(symbol\\)");
        s.keep_kaomoji = false;
        assert_eq!(format_tag("^_^", &s), "^ ^");
    }

    #[test]
    fn order_rules() {
        let labels = vec![
            lab("general", Category::Rating),
            lab("explicit", Category::Rating),
            lab("smile", Category::General),
            lab("long_hair", Category::General),
            lab("blue_eyes", Category::General),
            lab("miku", Category::Character),
        ];
        let scores = [0.7, 0.2, 0.5, 0.9, 0.1, 0.8];
        let mut s = sel();
        let tags = |s: &Selection| -> Vec<String> {
            select(&labels, &scores, s)
                .into_iter()
                .map(|p| p.tag)
                .collect()
        };
        assert_eq!(tags(&s), ["smile", "long hair", "miku"]);
        s.sort = SortBy::Score;
        s.character_first = true;
        s.rating = RatingPos::Last;
        assert_eq!(tags(&s), ["miku", "long hair", "smile", "general"]);
        s.always_first = vec!["smile".into()];
        s.exclude = vec!["long hair".into()];
        assert_eq!(tags(&s), ["smile", "miku", "general"]);
        s.max_tags = Some(1);
        s.always_first.clear();
        assert_eq!(tags(&s), ["miku", "general"]);
    }

    #[test]
    fn merge_dedups_with_trigger_first() {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let m = merge(&v(&["a", "b"]), &v(&["b", "c"]), &v(&["ohwx"]), false);
        assert_eq!(m, v(&["ohwx", "a", "b", "c"]));
        let m = merge(&v(&["a", "b"]), &v(&["b", "c"]), &[], true);
        assert_eq!(m, v(&["b", "c", "a"]));
    }
}
