//! The review session as plain data: the images under review, the position, the
//! working copy of the current caption, and the remembered position. No terminal here;
//! the front end (`ui`) turns keys into these calls and performs the saves it asks for.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::caption::select::{Dataset, Filter, relative};
use crate::dataset::caption_io::{Caption, join_tags, split_tags};

/// One image under review.
#[derive(Debug, Clone)]
pub struct ReviewItem {
    pub image: PathBuf,
    pub caption_path: PathBuf,
    /// Image path relative to the dataset folder.
    pub rel: String,
    /// The caption as on disk (after the last save); `None`: no caption file.
    pub saved: Option<Caption>,
}

impl ReviewItem {
    pub fn saved_tags(&self) -> Vec<String> {
        self.saved.as_ref().map(Caption::tags).unwrap_or_default()
    }
}

/// Which images a review walks.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub filter: Filter,
    /// Only images without a caption file.
    pub missing_only: bool,
}

/// Where the user wants to go next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Nav {
    Next,
    Back,
    /// 0-based index.
    Jump(usize),
}

/// A caption file the front end must write before the session moves on.
#[derive(Debug, Clone, PartialEq)]
pub struct Save {
    pub path: PathBuf,
    pub caption: Caption,
}

#[derive(Debug)]
pub struct Session {
    pub items: Vec<ReviewItem>,
    pos: usize,
    /// The working copy of the current item's tags.
    tags: Vec<String>,
    /// Captions saved during this session.
    pub saves: usize,
}

/// Builds the list of images to review. Unreadable captions are left out and returned
/// as error lines.
pub fn select(ds: &Dataset, sel: &Selection) -> (Vec<ReviewItem>, Vec<String>) {
    let mut items = Vec::new();
    let mut errors = Vec::new();
    for it in &ds.items {
        let saved = match &it.caption {
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
            Ok(c) => c.clone(),
        };
        if sel.missing_only && saved.is_some() {
            continue;
        }
        let tags = saved.as_ref().map(Caption::tags).unwrap_or_default();
        if !sel.filter.matches(&tags) {
            continue;
        }
        items.push(ReviewItem {
            image: it.image.clone(),
            caption_path: it.caption_path.clone(),
            rel: relative(&ds.root, &it.image),
            saved,
        });
    }
    (items, errors)
}

impl Session {
    /// A session at `start` (clamped). `items` must not be empty.
    pub fn new(items: Vec<ReviewItem>, start: usize) -> Session {
        let mut s = Session {
            items,
            pos: 0,
            tags: Vec::new(),
            saves: 0,
        };
        s.enter(start);
        s
    }

    fn enter(&mut self, pos: usize) {
        self.pos = pos.min(self.items.len().saturating_sub(1));
        self.tags = self
            .items
            .get(self.pos)
            .map(ReviewItem::saved_tags)
            .unwrap_or_default();
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn current(&self) -> &ReviewItem {
        &self.items[self.pos]
    }

    pub fn tags(&self) -> &[String] {
        &self.tags
    }

    /// Whether the working copy differs from the saved caption.
    pub fn is_dirty(&self) -> bool {
        self.tags != self.current().saved_tags()
    }

    /// Removes the tags at these indices of the working copy.
    pub fn remove(&mut self, indices: &[usize]) {
        let mut i = 0;
        self.tags.retain(|_| {
            i += 1;
            !indices.contains(&(i - 1))
        });
    }

    /// Appends tags (a comma-separated list is split); tags already present are kept
    /// where they are.
    pub fn add(&mut self, text: &str) {
        for t in split_tags(text) {
            if !self.tags.contains(&t) {
                self.tags.push(t);
            }
        }
    }

    /// Puts the tags in this order (a permutation of indices, as the sort prompt gives).
    pub fn reorder(&mut self, order: &[usize]) {
        let mut sorted = order.to_vec();
        sorted.sort_unstable();
        if sorted != (0..self.tags.len()).collect::<Vec<_>>() {
            return;
        }
        self.tags = order.iter().map(|&i| self.tags[i].clone()).collect();
    }

    /// Replaces the whole caption text.
    pub fn set_text(&mut self, text: &str) {
        self.tags = split_tags(text);
    }

    /// Drops the pending edits of the current item.
    pub fn revert(&mut self) {
        self.tags = self.current().saved_tags();
    }

    /// The write needed before leaving the current item, if it has pending edits. The
    /// caption keeps the file's BOM, line ends and extra lines.
    pub fn pending_save(&self) -> Option<Save> {
        if !self.is_dirty() {
            return None;
        }
        let item = self.current();
        let mut caption = item.saved.clone().unwrap_or_default();
        caption.text = join_tags(&self.tags);
        Some(Save {
            path: item.caption_path.clone(),
            caption,
        })
    }

    /// Call after the front end wrote `pending_save()`.
    pub fn mark_saved(&mut self, save: Save) {
        self.items[self.pos].saved = Some(save.caption);
        self.saves += 1;
    }

    /// Moves, dropping any pending edits (save them first to keep them). Returns false
    /// when `Next` is pressed on the last item: the review is finished.
    pub fn go(&mut self, nav: Nav) -> bool {
        let target = match nav {
            Nav::Next if self.pos + 1 >= self.items.len() => return false,
            Nav::Next => self.pos + 1,
            Nav::Back => self.pos.saturating_sub(1),
            Nav::Jump(i) => i,
        };
        self.enter(target);
        true
    }

    /// Resolves a jump target typed by the user: a 1-based number, or part of a file
    /// path (first match after the current position, wrapping around).
    pub fn find(&self, query: &str) -> Option<usize> {
        let q = query.trim();
        if q.is_empty() {
            return None;
        }
        if let Ok(n) = q.parse::<usize>() {
            return (1..=self.items.len()).contains(&n).then(|| n - 1);
        }
        let n = self.items.len();
        (1..=n)
            .map(|k| (self.pos + k) % n)
            .find(|&i| self.items[i].rel.contains(q))
    }
}

/// The remembered position, `DIR/.sdkit/review.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Remembered {
    /// Image path relative to the dataset folder.
    pub image: String,
    pub position: usize,
}

pub fn remembered_path(root: &Path) -> PathBuf {
    root.join(".sdkit").join("review.json")
}

/// Reads the remembered position; a missing or damaged file means none.
pub fn load_position(root: &Path) -> Option<Remembered> {
    let bytes = std::fs::read(remembered_path(root)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn save_position(root: &Path, session: &Session) -> std::io::Result<()> {
    let path = remembered_path(root);
    if let Some(dir) = path.parent() {
        crate::util::atomic::create_dir_all(dir)?;
    }
    let r = Remembered {
        image: session.current().rel.clone(),
        position: session.position(),
    };
    let json = serde_json::to_vec_pretty(&r).map_err(std::io::Error::other)?;
    crate::util::write_atomic(&path, &json)
}

/// Where to start: the remembered image if it is still in the list, else the
/// remembered index, else the first image.
pub fn start_position(items: &[ReviewItem], remembered: Option<&Remembered>) -> usize {
    let Some(r) = remembered else { return 0 };
    items
        .iter()
        .position(|i| i.rel == r.image)
        .unwrap_or(r.position.min(items.len().saturating_sub(1)))
}

/// Completes the last comma-separated entry of `input` with the first vocabulary tag
/// (most frequent first) that starts with it and is not already typed.
pub fn complete(vocab: &[String], input: &str) -> Option<String> {
    let (head, last) = match input.rfind(',') {
        Some(i) => (&input[..=i], &input[i + 1..]),
        None => ("", input),
    };
    let prefix = last.trim_start();
    if prefix.is_empty() {
        return None;
    }
    let typed = split_tags(head);
    let found = vocab
        .iter()
        .find(|t| t.starts_with(prefix) && t.as_str() != prefix && !typed.contains(t))?;
    let sep = if head.is_empty() { "" } else { " " };
    Some(format!("{head}{sep}{found}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(rel: &str, caption: Option<&str>) -> ReviewItem {
        ReviewItem {
            image: PathBuf::from(rel),
            caption_path: PathBuf::from(rel).with_extension("txt"),
            rel: rel.into(),
            saved: caption.map(Caption::parse),
        }
    }

    fn session() -> Session {
        Session::new(
            vec![
                item("a.png", Some("\u{feff}ohwx, smile, hat\r\nnote\r\n")),
                item("b.png", None),
                item("sub/c.png", Some("x")),
            ],
            0,
        )
    }

    #[test]
    fn edits_build_a_save_that_keeps_file_style() {
        let mut s = session();
        assert!(!s.is_dirty() && s.pending_save().is_none());
        s.remove(&[1]);
        s.add("red hair, ohwx,  blue eyes ");
        assert_eq!(s.tags(), ["ohwx", "hat", "red hair", "blue eyes"]);
        s.reorder(&[2, 0, 1, 3]);
        assert_eq!(s.tags(), ["red hair", "ohwx", "hat", "blue eyes"]);
        s.reorder(&[0, 0, 1, 2]); // not a permutation: ignored
        assert_eq!(s.tags()[0], "red hair");
        let save = s.pending_save().unwrap();
        assert_eq!(save.path, PathBuf::from("a.txt"));
        assert_eq!(
            save.caption.render(),
            "\u{feff}red hair, ohwx, hat, blue eyes\r\nnote\r\n"
        );
        s.mark_saved(save);
        assert!(!s.is_dirty());
        assert_eq!(s.saves, 1);
        s.set_text("a,b");
        s.revert();
        assert_eq!(s.tags(), ["red hair", "ohwx", "hat", "blue eyes"]);
    }

    #[test]
    fn navigation_drops_unsaved_edits_and_ends_after_last() {
        let mut s = session();
        s.add("zzz");
        assert!(s.go(Nav::Next));
        assert_eq!(s.position(), 1);
        assert!(s.tags().is_empty());
        s.add("new");
        assert_eq!(s.pending_save().unwrap().caption.render(), "new");
        assert!(s.go(Nav::Back));
        assert_eq!(s.tags(), ["ohwx", "smile", "hat"]);
        assert!(s.go(Nav::Back));
        assert_eq!(s.position(), 0);
        assert!(s.go(Nav::Jump(99)));
        assert_eq!(s.position(), 2);
        assert!(!s.go(Nav::Next));
        assert_eq!(s.find("2"), Some(1));
        assert_eq!(s.find("9"), None);
        assert_eq!(s.find("sub/"), Some(2));
        assert_eq!(s.find("png"), Some(0));
    }

    #[test]
    fn selection_filters_and_start_position() {
        let d = tempfile::tempdir().unwrap();
        for (n, c) in [
            ("a", Some(&b"ohwx, smile"[..])),
            ("b", None),
            ("c", Some(b"\xff")),
        ] {
            std::fs::write(d.path().join(format!("{n}.png")), b"x").unwrap();
            if let Some(c) = c {
                std::fs::write(d.path().join(format!("{n}.txt")), c).unwrap();
            }
        }
        let ds = crate::caption::select::load(d.path(), "txt", &|| {}).unwrap();
        let (all, errors) = select(&ds, &Selection::default());
        assert_eq!(all.len(), 2);
        assert_eq!(errors.len(), 1);
        let missing = Selection {
            missing_only: true,
            ..Selection::default()
        };
        assert_eq!(select(&ds, &missing).0[0].rel, "b.png");
        let smile = Selection {
            filter: Filter::new(&["smile".into()], &[], false).unwrap(),
            ..Selection::default()
        };
        assert_eq!(select(&ds, &smile).0.len(), 1);

        let mut s = Session::new(all.clone(), 0);
        s.go(Nav::Next);
        save_position(d.path(), &s).unwrap();
        let r = load_position(d.path()).unwrap();
        assert_eq!(r.image, "b.png");
        assert_eq!(start_position(&all, Some(&r)), 1);
        let gone = Remembered {
            image: "deleted.png".into(),
            position: 7,
        };
        assert_eq!(start_position(&all, Some(&gone)), 1);
        assert_eq!(start_position(&all, None), 0);
    }

    #[test]
    fn completion_uses_vocabulary_order() {
        let vocab: Vec<String> = ["long hair", "looking at viewer", "smile"]
            .map(String::from)
            .to_vec();
        assert_eq!(complete(&vocab, "lo").as_deref(), Some("long hair"));
        assert_eq!(
            complete(&vocab, "smile, lo").as_deref(),
            Some("smile, long hair")
        );
        assert_eq!(
            complete(&vocab, "long hair, lo").as_deref(),
            Some("long hair, looking at viewer")
        );
        assert_eq!(complete(&vocab, "x"), None);
        assert_eq!(complete(&vocab, "a, "), None);
    }
}
