//! Dataset caption statistics: tag frequency per folder and overall, images without a
//! caption file, empty captions, unreadable captions.

use std::collections::BTreeMap;

use serde::Serialize;

use super::ops::tag_counts;
use super::select::{Dataset, Filter, relative};

#[derive(Debug, Serialize, PartialEq)]
pub struct TagCount {
    pub tag: String,
    pub count: usize,
    /// Share of the captioned images of the folder (or dataset) that hold the tag.
    pub share: f64,
}

#[derive(Debug, Serialize)]
pub struct FolderStats {
    /// Relative to the dataset folder; `.` for the folder itself.
    pub folder: String,
    pub images: usize,
    pub captioned: usize,
    pub tags: Vec<TagCount>,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub images: usize,
    pub captioned: usize,
    pub missing: Vec<String>,
    pub empty: Vec<String>,
    pub invalid: Vec<String>,
    /// Images whose caption file another image already uses (`a.jpg` + `a.png`).
    pub shared_caption: Vec<String>,
    pub distinct_tags: usize,
    pub tags: Vec<TagCount>,
    pub folders: Vec<FolderStats>,
}

fn counted(lists: &[Vec<String>]) -> Vec<TagCount> {
    let counts = tag_counts(lists.iter().map(|l| l.as_slice()));
    let n = lists.len().max(1) as f64;
    let mut v: Vec<TagCount> = counts
        .into_iter()
        .map(|(tag, count)| TagCount {
            tag,
            count,
            share: count as f64 / n,
        })
        .collect();
    v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tag.cmp(&b.tag)));
    v
}

/// Statistics over the images that pass `filter` (images without a readable caption
/// pass only an empty filter).
pub fn compute(ds: &Dataset, filter: &Filter) -> Stats {
    let mut folders: BTreeMap<String, (usize, Vec<Vec<String>>)> = BTreeMap::new();
    let mut all = Vec::new();
    let (mut missing, mut empty, mut invalid) = (Vec::new(), Vec::new(), Vec::new());
    let mut images = 0;
    for item in &ds.items {
        let tags = item.tags();
        if !filter.matches(&tags) {
            continue;
        }
        images += 1;
        let rel = relative(&ds.root, &item.image);
        let folder = item
            .image
            .parent()
            .map(|p| relative(&ds.root, p))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| ".".into());
        let slot = folders.entry(folder).or_default();
        slot.0 += 1;
        match &item.caption {
            Ok(None) => missing.push(rel),
            Err(_) => invalid.push(rel),
            Ok(Some(_)) => {
                if tags.is_empty() {
                    empty.push(rel);
                }
                slot.1.push(tags.clone());
                all.push(tags);
            }
        }
    }
    let tags = counted(&all);
    Stats {
        images,
        captioned: all.len(),
        missing,
        empty,
        invalid,
        shared_caption: ds
            .shared_caption
            .iter()
            .map(|p| relative(&ds.root, p))
            .collect(),
        distinct_tags: tags.len(),
        tags,
        folders: folders
            .into_iter()
            .map(|(folder, (images, lists))| FolderStats {
                folder,
                images,
                captioned: lists.len(),
                tags: counted(&lists),
            })
            .collect(),
    }
}

/// Human-readable report, `top` tags per folder and overall.
pub fn render(s: &Stats, top: usize) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{} images, {} captioned, {} without caption, {} empty, {} invalid, {} distinct tags",
        s.images,
        s.captioned,
        s.missing.len(),
        s.empty.len(),
        s.invalid.len(),
        s.distinct_tags
    );
    let list = |o: &mut String, tags: &[TagCount]| {
        for t in tags.iter().take(top) {
            let _ = writeln!(o, "  {:>6}  {:>5.1}%  {}", t.count, t.share * 100.0, t.tag);
        }
        if tags.len() > top {
            let _ = writeln!(o, "  ... {} more", tags.len() - top);
        }
    };
    if s.folders.len() > 1 {
        for f in &s.folders {
            let _ = writeln!(
                o,
                "\n{}: {} images, {} captioned",
                f.folder, f.images, f.captioned
            );
            list(&mut o, &f.tags);
        }
        let _ = writeln!(o, "\nall folders:");
    } else {
        let _ = writeln!(o);
    }
    list(&mut o, &s.tags);
    for (what, v) in [
        ("without a caption file", &s.missing),
        ("with an empty caption", &s.empty),
        ("with an unreadable caption", &s.invalid),
        ("sharing another image's caption file", &s.shared_caption),
    ] {
        if !v.is_empty() {
            let _ = writeln!(o, "\n{} image(s) {what}:", v.len());
            for p in v.iter().take(top) {
                let _ = writeln!(o, "  {p}");
            }
            if v.len() > top {
                let _ = writeln!(o, "  ... {} more", v.len() - top);
            }
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::select::load;

    #[test]
    fn counts_per_folder_missing_empty_invalid() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("10_a"), d.path().join("5_b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        for (dir, name, cap) in [
            (&a, "1", Some(&b"ohwx, smile"[..])),
            (&a, "2", Some(b"ohwx, smile, smile")),
            (&a, "3", Some(b"ohwx")),
            (&b, "1", Some(b" , ")),
            (&b, "2", None),
            (&b, "3", Some(b"\xff")),
        ] {
            std::fs::write(dir.join(format!("{name}.png")), b"x").unwrap();
            if let Some(c) = cap {
                std::fs::write(dir.join(format!("{name}.txt")), c).unwrap();
            }
        }
        let ds = load(d.path(), "txt", &|| {}).unwrap();
        let s = compute(&ds, &Filter::default());
        assert_eq!((s.images, s.captioned), (6, 4));
        assert_eq!(s.missing, ["5_b/2.png"]);
        assert_eq!(s.empty, ["5_b/1.png"]);
        assert_eq!(s.invalid, ["5_b/3.png"]);
        assert_eq!(s.folders[0].folder, "10_a");
        assert_eq!(
            s.folders[0].tags[0],
            TagCount {
                tag: "ohwx".into(),
                count: 3,
                share: 1.0
            }
        );
        assert_eq!(s.folders[0].tags[1].count, 2);
        assert_eq!(s.tags[0].count, 3);
        assert!((s.tags[0].share - 0.75).abs() < 1e-9);
        let text = render(&s, 10);
        assert!(
            text.contains("6 images, 4 captioned, 1 without caption"),
            "{text}"
        );
        let f = Filter::new(&["smile".into()], &[], false).unwrap();
        assert_eq!(compute(&ds, &f).images, 2);
    }
}
