//! Caption rules as pure functions over tag lists: which tag is the trigger, which
//! captions lack it, which tags every caption holds, and the image-count ranges.

use std::collections::HashMap;

/// Fewer training images than this is a warning (too little variety).
pub const FEW_IMAGES_WARN: usize = 10;
/// Fewer than this is a note: character/person LoRAs usually use 15-50 varied images.
pub const FEW_IMAGES_NOTE: usize = 15;
/// More than this is a note (fine for styles; mind the steps per epoch).
pub const MANY_IMAGES_NOTE: usize = 200;
/// Tags held by every caption are reported only from this many captions on.
pub const EVERY_CAPTION_MIN: usize = 5;

/// Where a folder's trigger tag came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TriggerSource {
    /// `--trigger`.
    Option,
    /// The folder's class tokens (`10_<name>`) appear as a tag.
    FolderName,
    /// The first tag of most captions.
    Captions,
}

/// The trigger of a folder: explicit, else its class tokens when some caption holds them
/// as a tag, else a tag held by most captions that opens most of the captions holding
/// it (trigger tags are put first so that kohya's `keep_tokens` keeps them in place).
pub fn find_trigger(
    explicit: Option<&str>,
    folder_name: &str,
    captions: &[Vec<String>],
) -> Option<(String, TriggerSource)> {
    if let Some(t) = explicit {
        return Some((t.to_string(), TriggerSource::Option));
    }
    let name = folder_name.trim();
    if !name.is_empty() && captions.iter().any(|c| c.iter().any(|t| t == name)) {
        return Some((name.to_string(), TriggerSource::FolderName));
    }
    // (captions holding the tag, captions it opens)
    let mut seen: HashMap<&str, (usize, usize)> = HashMap::new();
    for c in captions {
        let mut dedup: Vec<&str> = Vec::new();
        for (i, t) in c.iter().enumerate() {
            if dedup.contains(&t.as_str()) {
                continue;
            }
            dedup.push(t);
            let e = seen.entry(t.as_str()).or_default();
            e.0 += 1;
            if i == 0 {
                e.1 += 1;
            }
        }
    }
    let n = captions.len();
    seen.into_iter()
        .filter(|(_, (held, opens))| n >= 2 && held * 2 > n && opens * 2 > *held)
        .max_by(|a, b| {
            (a.1.1, a.1.0)
                .cmp(&(b.1.1, b.1.0))
                .then_with(|| b.0.cmp(a.0))
        })
        .map(|(t, _)| (t.to_string(), TriggerSource::Captions))
}

/// Indices of the captions that do not hold `trigger` as a tag.
pub fn missing_trigger(trigger: &str, captions: &[Vec<String>]) -> Vec<usize> {
    captions
        .iter()
        .enumerate()
        .filter(|(_, c)| !c.iter().any(|t| t == trigger))
        .map(|(i, _)| i)
        .collect()
}

/// Tags held by every caption (at least [`EVERY_CAPTION_MIN`] of them), except those
/// in `except`, in the order of the first caption.
pub fn in_every_caption(captions: &[Vec<String>], except: &[&str]) -> Vec<String> {
    if captions.len() < EVERY_CAPTION_MIN {
        return Vec::new();
    }
    let mut out: Vec<String> = Vec::new();
    for t in &captions[0] {
        if except.contains(&t.as_str()) || out.contains(t) {
            continue;
        }
        if captions[1..].iter().all(|c| c.contains(t)) {
            out.push(t.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(list: &[&str]) -> Vec<Vec<String>> {
        list.iter()
            .map(|c| crate::dataset::caption_io::split_tags(c))
            .collect()
    }

    #[test]
    fn trigger_from_option_folder_or_first_tags() {
        let c = caps(&["ohwx, smile", "ohwx, hat", "smile, ohwx", "hat"]);
        assert_eq!(
            find_trigger(Some("sks"), "ohwx", &c),
            Some(("sks".into(), TriggerSource::Option))
        );
        assert_eq!(
            find_trigger(None, "ohwx", &c),
            Some(("ohwx".into(), TriggerSource::FolderName))
        );
        assert_eq!(
            find_trigger(None, "ron", &c),
            Some(("ohwx".into(), TriggerSource::Captions))
        );
        // x is in most captions but never first: not a trigger.
        let c2 = caps(&["a, x", "b, x", "c, x", "a"]);
        assert_eq!(find_trigger(None, "ron", &c2), None);
        assert_eq!(missing_trigger("ohwx", &c), vec![3]);
    }

    #[test]
    fn tags_in_every_caption_skip_trigger_and_small_sets() {
        let c = caps(&[
            "ohwx, 1girl, smile",
            "ohwx, 1girl, hat",
            "1girl, ohwx",
            "ohwx, 1girl",
            "1girl, ohwx, 1girl",
        ]);
        assert_eq!(in_every_caption(&c, &["ohwx"]), vec!["1girl".to_string()]);
        assert_eq!(in_every_caption(&c, &[]), vec!["ohwx", "1girl"]);
        assert!(in_every_caption(&c[..4], &[]).is_empty());
    }
}
