//! Textual-inversion names in token streams, as the webui finds them.
//!
//! An embedding is used by writing its name in a prompt. webui tokenizes each name (no
//! BOS/EOS) and, walking a prompt's token stream, checks at every position whether one of
//! the names' token sequences starts there (longest first among names sharing a first
//! token). A match is replaced by the embedding's `n` vectors. Here those vectors get ids
//! of their own, `vocab..vocab + total`, which the text encoder's token lookup reads from
//! its extra table (`ClipTextModel::extra_embeddings`), so the rest of the pipeline
//! (chunks, padding, emphasis) handles them like ordinary tokens.

use super::tokenizer::ClipTokenizer;
use std::collections::HashMap;

/// One registered name.
#[derive(Debug, Clone, PartialEq)]
pub struct Placeholder {
    pub name: String,
    /// The name's token ids (what a prompt must contain).
    pub tokens: Vec<u32>,
    /// Id of the first vector; the others follow.
    pub first_id: u32,
    /// Number of vectors.
    pub n: usize,
}

impl Placeholder {
    /// The ids that stand for the vectors.
    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.first_id..self.first_id + self.n as u32
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlaceholderError {
    #[error("embedding name {0:?} has no tokens (empty after the tokenizer's cleanup)")]
    EmptyName(String),
    #[error("embedding {0:?} has no vectors")]
    NoVectors(String),
    #[error(
        "embedding {name:?} has {n} vectors: more than the 75 tokens of a prompt chunk \
         (webui would cut it)"
    )]
    TooLong { name: String, n: usize },
    #[error("two embeddings are named {0:?} (names are file stems; rename one file)")]
    Duplicate(String),
}

/// The names a text encoder knows besides its vocabulary, and their vector ids.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Placeholders {
    base: u32,
    entries: Vec<Placeholder>,
    /// first token -> entry indices, longest token sequence first (webui's `ids_lookup`).
    by_first: HashMap<u32, Vec<usize>>,
}

impl Placeholders {
    /// An empty registry whose vector ids start at `vocab` (the text encoder's vocabulary
    /// size).
    pub fn new(vocab: usize) -> Self {
        Self {
            base: vocab as u32,
            ..Self::default()
        }
    }

    /// Registers `name` with `n` vectors; returns its entry. Names are matched by their
    /// tokens, so `Cat-Style` and `cat-style` are the same name (the tokenizer lowercases).
    pub fn add(
        &mut self,
        tok: &ClipTokenizer,
        name: &str,
        n: usize,
    ) -> Result<&Placeholder, PlaceholderError> {
        if n == 0 {
            return Err(PlaceholderError::NoVectors(name.into()));
        }
        if n > super::prompt::CHUNK {
            return Err(PlaceholderError::TooLong {
                name: name.into(),
                n,
            });
        }
        let tokens = tok.encode(name);
        let Some(&first) = tokens.first() else {
            return Err(PlaceholderError::EmptyName(name.into()));
        };
        if self.entries.iter().any(|e| e.tokens == tokens) {
            return Err(PlaceholderError::Duplicate(name.into()));
        }
        let entry = Placeholder {
            name: name.into(),
            tokens,
            first_id: self.base + self.total() as u32,
            n,
        };
        let idx = self.entries.len();
        self.entries.push(entry);
        let list = self.by_first.entry(first).or_default();
        list.push(idx);
        let entries = &self.entries;
        // Stable: among equal lengths the earlier registration wins, as in webui.
        list.sort_by_key(|&i| std::cmp::Reverse(entries[i].tokens.len()));
        Ok(&self.entries[idx])
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[Placeholder] {
        &self.entries
    }

    /// Total number of vectors (rows of the extra table).
    pub fn total(&self) -> usize {
        self.entries.iter().map(|e| e.n).sum()
    }

    /// The vocabulary size the ids start at.
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// The name whose tokens start at `ids[pos]`, and how many tokens it spans (webui's
    /// `find_embedding_at_position`).
    pub fn find_at(&self, ids: &[u32], pos: usize) -> Option<(&Placeholder, usize)> {
        let list = self.by_first.get(ids.get(pos)?)?;
        list.iter().map(|&i| &self.entries[i]).find_map(|e| {
            ids[pos..]
                .starts_with(&e.tokens)
                .then_some((e, e.tokens.len()))
        })
    }

    /// `ids` with every name replaced by its vector ids (no chunking: kohya's caption
    /// layout and the trainer's templates use this).
    pub fn substitute(&self, ids: &[u32]) -> Vec<u32> {
        if self.is_empty() {
            return ids.to_vec();
        }
        let mut out = Vec::with_capacity(ids.len());
        let mut pos = 0;
        while pos < ids.len() {
            match self.find_at(ids, pos) {
                Some((e, len)) => {
                    out.extend(e.ids());
                    pos += len;
                }
                None => {
                    out.push(ids[pos]);
                    pos += 1;
                }
            }
        }
        out
    }

    /// Tokenize `text` and substitute the names.
    pub fn encode(&self, tok: &ClipTokenizer, text: &str) -> Vec<u32> {
        self.substitute(&tok.encode(text))
    }

    /// Names used in `ids` (a token stream), each once, in order of first use.
    pub fn used(&self, ids: &[u32]) -> Vec<&Placeholder> {
        let mut out: Vec<&Placeholder> = Vec::new();
        let mut pos = 0;
        while pos < ids.len() {
            match self.find_at(ids, pos) {
                Some((e, len)) => {
                    if !out.iter().any(|o| o.first_id == e.first_id) {
                        out.push(e);
                    }
                    pos += len;
                }
                None => pos += 1,
            }
        }
        out
    }

    /// The names a prompt (webui syntax) uses, each once, in order of first use. Names
    /// are found within each emphasis fragment, as webui tokenizes them one by one.
    pub fn used_in_prompt(&self, tok: &ClipTokenizer, prompt: &str) -> Vec<&Placeholder> {
        let mut out: Vec<&Placeholder> = Vec::new();
        for f in super::prompt::parse_attention(prompt).unwrap_or_default() {
            for e in self.used(&tok.encode(&f.text)) {
                if !out.iter().any(|o| o.first_id == e.first_id) {
                    out.push(e);
                }
            }
        }
        out
    }

    /// Whether `prompt` uses `name` (whether webui would put an embedding of that name
    /// into it).
    pub fn mentions(tok: &ClipTokenizer, prompt: &str, name: &str) -> bool {
        let mut one = Placeholders::new(super::tokenizer::VOCAB_SIZE);
        one.add(tok, name, 1).is_ok() && !one.used_in_prompt(tok, prompt).is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::tokenizer::VOCAB_SIZE;

    #[test]
    fn longest_name_wins_and_ids_follow_the_vocabulary() {
        let tok = ClipTokenizer::shared();
        let mut p = Placeholders::new(VOCAB_SIZE);
        p.add(tok, "red", 2).unwrap();
        p.add(tok, "red panda", 3).unwrap();
        assert_eq!(p.total(), 5);
        let ids = p.encode(tok, "a red panda and a red fox");
        let v = VOCAB_SIZE as u32;
        let a = tok.encode("a")[0];
        let and = tok.encode("and")[0];
        let fox = tok.encode("fox")[0];
        assert_eq!(
            ids,
            vec![a, v + 2, v + 3, v + 4, and, a, v, v + 1, fox],
            "{ids:?}"
        );
        let used: Vec<_> = p.used(&tok.encode("red fox, red panda, red"));
        let names: Vec<_> = used.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["red", "red panda"]);
    }

    #[test]
    fn names_match_whole_tokens_only() {
        let tok = ClipTokenizer::shared();
        let mut p = Placeholders::new(VOCAB_SIZE);
        p.add(tok, "cat", 1).unwrap();
        // "cats" is another token than "cat</w>": not a use of the name.
        assert_eq!(p.encode(tok, "cats"), tok.encode("cats"));
        assert!(Placeholders::mentions(tok, "a (Cat:1.2)", "cat"));
        assert!(!Placeholders::mentions(tok, "a catalogue", "cat"));
    }

    #[test]
    fn bad_registrations_are_errors() {
        let tok = ClipTokenizer::shared();
        let mut p = Placeholders::new(VOCAB_SIZE);
        assert_eq!(
            p.add(tok, "  ", 1).unwrap_err(),
            PlaceholderError::EmptyName("  ".into())
        );
        assert!(matches!(
            p.add(tok, "x", 76),
            Err(PlaceholderError::TooLong { n: 76, .. })
        ));
        p.add(tok, "Style", 1).unwrap();
        assert!(matches!(
            p.add(tok, "style", 1),
            Err(PlaceholderError::Duplicate(_))
        ));
    }
}
