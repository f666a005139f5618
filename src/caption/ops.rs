//! Pure edits over one caption's tag list. Each function takes the tags in file order
//! and returns the new list; the caller decides whether anything changed.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use regex::Regex;

use crate::dataset::caption_io::split_tags;

/// A tag pattern: an exact tag, or a regular expression that must match the whole tag.
#[derive(Debug, Clone)]
pub enum Pattern {
    Exact(String),
    Regex(Regex),
}

impl Pattern {
    /// `regex` selects regex matching; the expression is anchored to the whole tag.
    pub fn new(text: &str, regex: bool) -> Result<Pattern, regex::Error> {
        if regex {
            Ok(Pattern::Regex(Regex::new(&format!("^(?:{text})$"))?))
        } else {
            Ok(Pattern::Exact(text.trim().to_string()))
        }
    }

    pub fn matches(&self, tag: &str) -> bool {
        match self {
            Pattern::Exact(t) => t == tag,
            Pattern::Regex(r) => r.is_match(tag),
        }
    }
}

pub fn any_match(patterns: &[Pattern], tag: &str) -> bool {
    patterns.iter().any(|p| p.matches(tag))
}

/// Where `add` puts new tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    First,
    Last,
    /// After this many tags (0 = first); past the end means last.
    At(usize),
}

impl FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        match s {
            "first" => Ok(Position::First),
            "last" => Ok(Position::Last),
            n => n.parse().map(Position::At).map_err(|_| {
                format!("position must be first, last or a number of tags before it, not {n:?}")
            }),
        }
    }
}

/// Puts `new` at `position`. A tag already present elsewhere is moved, never doubled.
pub fn add(tags: &[String], new: &[String], position: Position) -> Vec<String> {
    let mut insert: Vec<String> = Vec::new();
    for t in new {
        if !insert.contains(t) {
            insert.push(t.clone());
        }
    }
    let mut out: Vec<String> = tags
        .iter()
        .filter(|t| !insert.contains(t))
        .cloned()
        .collect();
    let at = match position {
        Position::First => 0,
        Position::Last => out.len(),
        Position::At(n) => n.min(out.len()),
    };
    out.splice(at..at, insert);
    out
}

/// Drops every tag that matches one of `patterns`.
pub fn remove(tags: &[String], patterns: &[Pattern]) -> Vec<String> {
    tags.iter()
        .filter(|t| !any_match(patterns, t))
        .cloned()
        .collect()
}

/// Replaces each tag matching `old` by `new` (regex: `$1`-style groups expand). The
/// result may hold several comma-separated tags or none; a replacement that is already
/// present is not added twice.
pub fn replace(tags: &[String], old: &Pattern, new: &str) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for t in tags {
        if !old.matches(t) {
            out.push(t.clone());
            continue;
        }
        let replaced = match old {
            Pattern::Exact(_) => new.to_string(),
            Pattern::Regex(r) => r.replace(t, new).into_owned(),
        };
        for r in split_tags(&replaced) {
            let kept_elsewhere = tags.iter().any(|o| *o == r && !old.matches(o));
            if !kept_elsewhere && !out.contains(&r) {
                out.push(r);
            }
        }
    }
    out
}

/// Keeps the first of each repeated tag. With `subsumed`, also drops a tag when a
/// longer tag ends with it as a whole word (`shirt` next to `white shirt`).
pub fn dedupe(tags: &[String], subsumed: bool) -> Vec<String> {
    let mut seen = HashSet::new();
    let unique: Vec<String> = tags
        .iter()
        .filter(|t| seen.insert(t.as_str()))
        .cloned()
        .collect();
    if !subsumed {
        return unique;
    }
    unique
        .iter()
        .filter(|t| {
            !unique
                .iter()
                .any(|u| u.len() > t.len() && u.ends_with(t.as_str()) && is_word_end(u, t))
        })
        .cloned()
        .collect()
}

fn is_word_end(longer: &str, suffix: &str) -> bool {
    longer[..longer.len() - suffix.len()].ends_with([' ', '_'])
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum SortBy {
    /// A to Z, ignoring case.
    #[default]
    Alphabet,
    /// Most frequent in the dataset first; ties A to Z.
    Frequency,
}

/// Sorts all tags after the first `keep_first`, which stay where they are.
pub fn sort(
    tags: &[String],
    by: SortBy,
    keep_first: usize,
    freq: &HashMap<String, usize>,
) -> Vec<String> {
    let k = keep_first.min(tags.len());
    let mut rest: Vec<String> = tags[k..].to_vec();
    let alpha = |a: &String, b: &String| a.to_lowercase().cmp(&b.to_lowercase()).then(a.cmp(b));
    match by {
        SortBy::Alphabet => rest.sort_by(alpha),
        SortBy::Frequency => rest.sort_by(|a, b| {
            let fa = freq.get(a).copied().unwrap_or(0);
            let fb = freq.get(b).copied().unwrap_or(0);
            fb.cmp(&fa).then_with(|| alpha(a, b))
        }),
    }
    let mut out = tags[..k].to_vec();
    out.extend(rest);
    out
}

/// Drops the tags in `drop`, except within the first `keep_first` positions.
pub fn prune(tags: &[String], drop: &HashSet<String>, keep_first: usize) -> Vec<String> {
    tags.iter()
        .enumerate()
        .filter(|(i, t)| *i < keep_first || !drop.contains(*t))
        .map(|(_, t)| t.clone())
        .collect()
}

/// How many captions hold each tag (a tag counts once per caption).
pub fn tag_counts<'a>(lists: impl IntoIterator<Item = &'a [String]>) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for tags in lists {
        let mut seen = HashSet::new();
        for t in tags {
            if seen.insert(t.as_str()) {
                *counts.entry(t.clone()).or_default() += 1;
            }
        }
    }
    counts
}

/// The tags present in more than `above` (a share, 0..1) of `total` captions.
pub fn frequent_tags(
    counts: &HashMap<String, usize>,
    total: usize,
    above: f64,
) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = counts
        .iter()
        .filter(|(_, c)| total > 0 && (**c as f64) / (total as f64) > above)
        .map(|(t, c)| (t.clone(), *c))
        .collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Underscores {
    /// `long_hair` -> `long hair` (kaomoji such as `^_^` are kept).
    #[default]
    Space,
    /// `long hair` -> `long_hair`.
    Underscore,
    Keep,
}

#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Brackets {
    /// `(` -> `\(`: the webui reads bare brackets as emphasis.
    Escape,
    /// `\(` -> `(`: kohya reads captions literally.
    Unescape,
    #[default]
    Keep,
}

/// Emoticon tags whose underscores are part of the face.
const KAOMOJI: &[&str] = &[
    "^_^", ">_<", "o_o", "0_0", "=_=", "x_x", "u_u", "-_-", ";_;", "@_@", "+_+", "._.", "|_|",
    "(o)_(o)", "<o>_<o>", "^_^;", ">_o", "o_0", "0_o", "t_t", "q_q", "=_^",
];

fn is_kaomoji(tag: &str) -> bool {
    KAOMOJI.contains(&tag.to_lowercase().as_str())
}

/// One tag, normalized: trimmed, inner whitespace collapsed, underscores and brackets
/// converted as asked.
pub fn normalize_tag(tag: &str, underscores: Underscores, brackets: Brackets) -> String {
    let mut t = tag.split_whitespace().collect::<Vec<_>>().join(" ");
    if !is_kaomoji(&t) {
        t = match underscores {
            Underscores::Space => {
                let s = t.replace('_', " ");
                s.split_whitespace().collect::<Vec<_>>().join(" ")
            }
            Underscores::Underscore => t.replace(' ', "_"),
            Underscores::Keep => t,
        };
    }
    match brackets {
        Brackets::Keep => t,
        Brackets::Unescape => t.replace("\\(", "(").replace("\\)", ")"),
        Brackets::Escape => {
            let mut out = String::with_capacity(t.len() + 4);
            let mut prev = '\0';
            for c in t.chars() {
                if (c == '(' || c == ')') && prev != '\\' {
                    out.push('\\');
                }
                out.push(c);
                prev = c;
            }
            out
        }
    }
}

/// Every tag normalized; tags that end up empty are dropped.
pub fn normalize(tags: &[String], underscores: Underscores, brackets: Brackets) -> Vec<String> {
    tags.iter()
        .map(|t| normalize_tag(t, underscores, brackets))
        .filter(|t| !t.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        split_tags(s)
    }

    #[test]
    fn add_places_and_moves_without_doubling() {
        let t = v("a, b, c");
        assert_eq!(add(&t, &v("x"), Position::First), v("x, a, b, c"));
        assert_eq!(add(&t, &v("x"), Position::Last), v("a, b, c, x"));
        assert_eq!(add(&t, &v("x"), Position::At(1)), v("a, x, b, c"));
        assert_eq!(add(&t, &v("x"), Position::At(99)), v("a, b, c, x"));
        assert_eq!(add(&t, &v("c"), Position::First), v("c, a, b"));
        assert_eq!(add(&t, &v("x, y, x"), Position::First), v("x, y, a, b, c"));
        assert_eq!(add(&v("x, a"), &v("x"), Position::First), v("x, a"));
        assert_eq!("2".parse::<Position>(), Ok(Position::At(2)));
        assert!("top".parse::<Position>().is_err());
    }

    #[test]
    fn remove_exact_and_regex() {
        let t = v("1girl, white background, simple background, smile");
        let exact = [Pattern::new("smile", false).unwrap()];
        assert_eq!(
            remove(&t, &exact),
            v("1girl, white background, simple background")
        );
        let re = [Pattern::new(".* background", true).unwrap()];
        assert_eq!(remove(&t, &re), v("1girl, smile"));
        // Regexes match whole tags: "girl" does not remove "1girl".
        let part = [Pattern::new("girl", true).unwrap()];
        assert_eq!(remove(&t, &part), t);
        assert!(Pattern::new("(", true).is_err());
    }

    #[test]
    fn replace_exact_regex_split_and_merge() {
        let t = v("blonde hair, smile, blue eyes");
        let p = Pattern::new("blonde hair", false).unwrap();
        assert_eq!(
            replace(&t, &p, "yellow hair"),
            v("yellow hair, smile, blue eyes")
        );
        // Replacing by a tag already present does not double it.
        assert_eq!(replace(&t, &p, "smile"), v("smile, blue eyes"));
        // Replacing by nothing removes; by a list inserts several.
        assert_eq!(replace(&t, &p, ""), v("smile, blue eyes"));
        assert_eq!(
            replace(&t, &p, "hair, blonde"),
            v("hair, blonde, smile, blue eyes")
        );
        let r = Pattern::new("(.*) (hair|eyes)", true).unwrap();
        assert_eq!(
            replace(&t, &r, "$2: $1"),
            v("hair: blonde, smile, eyes: blue")
        );
    }

    #[test]
    fn dedupe_keeps_first_and_subsumed() {
        let t = v("a, b, a, shirt, white shirt, b");
        assert_eq!(dedupe(&t, false), v("a, b, shirt, white shirt"));
        assert_eq!(dedupe(&t, true), v("a, b, white shirt"));
        // Not a whole word: "tshirt" does not absorb "shirt".
        assert_eq!(dedupe(&v("shirt, tshirt"), true), v("shirt, tshirt"));
    }

    #[test]
    fn sort_alphabet_and_frequency_keeping_first() {
        let t = v("ohwx, smile, Apple, banana");
        assert_eq!(
            sort(&t, SortBy::Alphabet, 0, &HashMap::new()),
            v("Apple, banana, ohwx, smile")
        );
        assert_eq!(
            sort(&t, SortBy::Alphabet, 1, &HashMap::new()),
            v("ohwx, Apple, banana, smile")
        );
        let freq: HashMap<String, usize> = [
            ("smile".into(), 9),
            ("banana".into(), 3),
            ("Apple".into(), 3),
        ]
        .into();
        assert_eq!(
            sort(&t, SortBy::Frequency, 1, &freq),
            v("ohwx, smile, Apple, banana")
        );
        assert_eq!(sort(&t, SortBy::Frequency, 9, &freq), t);
    }

    #[test]
    fn prune_by_share_with_protected_head() {
        let lists = [v("t, a, b"), v("t, a"), v("t, a, c"), v("t, b")];
        let counts = tag_counts(lists.iter().map(|l| l.as_slice()));
        assert_eq!(counts["a"], 3);
        let freq = frequent_tags(&counts, lists.len(), 0.7);
        assert_eq!(freq, vec![("t".to_string(), 4), ("a".to_string(), 3)]);
        let drop: HashSet<String> = freq.into_iter().map(|(t, _)| t).collect();
        assert_eq!(prune(&lists[0], &drop, 0), v("b"));
        assert_eq!(prune(&lists[0], &drop, 1), v("t, b"));
        // A tag counts once per caption.
        assert_eq!(tag_counts([v("a, a").as_slice()])["a"], 1);
    }

    #[test]
    fn normalize_underscores_brackets_spaces() {
        let t = vec![
            " long_hair ".to_string(),
            "ganyu_(genshin impact)".into(),
            "^_^".into(),
            "  two   spaces ".into(),
            "_".into(),
        ];
        assert_eq!(
            normalize(&t, Underscores::Space, Brackets::Escape),
            v("long hair, ganyu \\(genshin impact\\), ^_^, two spaces")
        );
        assert_eq!(
            normalize(&v("a \\(b\\), c (d)"), Underscores::Keep, Brackets::Escape),
            v("a \\(b\\), c \\(d\\)")
        );
        assert_eq!(
            normalize(&v("a \\(b\\)"), Underscores::Underscore, Brackets::Unescape),
            v("a_(b)")
        );
    }
}
