//! The CLIP byte-level BPE tokenizer (OpenAI's `simple_tokenizer`, equal to open_clip's
//! `SimpleTokenizer` and transformers' `CLIPTokenizer` on ordinary prompts).
//!
//! Text is cleaned (`clean.rs`), split by CLIP's pattern, each piece's UTF-8 bytes are
//! mapped to printable characters (`bytes_to_unicode`), and the merges are applied
//! lowest rank first; the last symbol of a piece carries `</w>`. Vocabulary: 256 byte
//! symbols, the same with `</w>`, one symbol per merge (id 512 + rank), then
//! `<|startoftext|>` 49406 and `<|endoftext|>` 49407. The merge list is embedded.
//!
//! Speed: pieces are cached (bounded), and merging uses a heap over a linked list, so a
//! piece of n bytes costs O(n log n), never O(n²).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::io::BufRead;
use std::sync::{OnceLock, RwLock};

use super::clean;

pub const BOS: u32 = 49406;
pub const EOS: u32 = 49407;
pub const VOCAB_SIZE: usize = 49408;
/// Id of `,</w>`: A1111 breaks long prompts at commas.
pub const COMMA: u32 = 267;
const NUM_MERGES: usize = 48894;
const START_TEXT: &str = "<|startoftext|>";
const END_TEXT: &str = "<|endoftext|>";
const CACHE_LIMIT: usize = 200_000;

static MERGES_GZ: &[u8] = include_bytes!("../../../models/clip/bpe_simple_vocab_16e6.txt.gz");

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("CLIP merge list: {0}")]
    Merges(String),
}

pub struct ClipTokenizer {
    /// byte -> symbol id.
    byte_sym: [u32; 256],
    /// symbol id -> byte (for ids < 256 and their `</w>` twins).
    sym_byte: [u8; 256],
    /// (left id, right id) -> rank; the merged symbol's id is 512 + rank.
    ranks: HashMap<(u32, u32), u32>,
    vocab: Vec<String>,
    pattern: regex::Regex,
    cache: RwLock<HashMap<String, Vec<u32>>>,
}

/// OpenAI's `bytes_to_unicode`: printable Latin-1 bytes keep their character, the others
/// get 256, 257, ... in byte order. Returns the characters in vocabulary order (byte, char).
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut out: Vec<(u8, char)> = (0u32..256)
        .filter(|&b| printable(b))
        .map(|b| (b as u8, char::from_u32(b).unwrap_or('?')))
        .collect();
    let mut n = 0;
    for b in 0u32..256 {
        if !printable(b) {
            out.push((b as u8, char::from_u32(256 + n).unwrap_or('?')));
            n += 1;
        }
    }
    out
}

impl ClipTokenizer {
    /// The tokenizer with the embedded merge list, built once per process.
    pub fn shared() -> &'static ClipTokenizer {
        static TOK: OnceLock<ClipTokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            ClipTokenizer::from_gz(MERGES_GZ).expect("embedded CLIP merges are valid")
        })
    }

    /// Hugging Face's `vocab.json` (token -> id) and `merges.txt` (`#version: 0.2`, then
    /// the merges by rank) of this vocabulary, what `CLIPTokenizer.from_pretrained` reads.
    pub fn hf_files(&self) -> (String, String) {
        let vocab: serde_json::Map<String, serde_json::Value> = self
            .vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), serde_json::Value::from(i)))
            .collect();
        let mut merges: Vec<(&u32, &(u32, u32))> = self.ranks.iter().map(|(p, r)| (r, p)).collect();
        merges.sort();
        let mut text = String::from("#version: 0.2\n");
        for (_, (a, b)) in merges {
            text.push_str(&self.vocab[*a as usize]);
            text.push(' ');
            text.push_str(&self.vocab[*b as usize]);
            text.push('\n');
        }
        (serde_json::Value::Object(vocab).to_string(), text)
    }

    /// Builds from a gzip-compressed `bpe_simple_vocab_16e6.txt`. Only the header and
    /// the merges CLIP uses are decompressed (the file holds many more).
    pub fn from_gz(gz: &[u8]) -> Result<ClipTokenizer, TokenizerError> {
        let mut reader = std::io::BufReader::new(flate2::read::GzDecoder::new(gz));
        let mut text = String::with_capacity(600_000);
        for _ in 0..=NUM_MERGES {
            if reader
                .read_line(&mut text)
                .map_err(|e| TokenizerError::Merges(e.to_string()))?
                == 0
            {
                break;
            }
        }
        ClipTokenizer::from_merges(&text)
    }

    /// Builds from the merge list text (header line, then `a b` per line).
    pub fn from_merges(text: &str) -> Result<ClipTokenizer, TokenizerError> {
        let b2u = bytes_to_unicode();
        let mut byte_sym = [0u32; 256];
        let mut sym_byte = [0u8; 256];
        let mut vocab: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        for (i, &(b, c)) in b2u.iter().enumerate() {
            byte_sym[b as usize] = i as u32;
            sym_byte[i] = b;
            vocab.push(c.to_string());
        }
        for (_, c) in &b2u {
            vocab.push(format!("{c}</w>"));
        }
        let mut ids: HashMap<String, u32> = vocab
            .iter()
            .enumerate()
            .map(|(i, s)| (s.clone(), i as u32))
            .collect();
        let mut ranks = HashMap::with_capacity(NUM_MERGES);
        for (rank, line) in text.lines().skip(1).take(NUM_MERGES).enumerate() {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| TokenizerError::Merges(format!("line {}: {line:?}", rank + 2)))?;
            let (Some(&ia), Some(&ib)) = (ids.get(a), ids.get(b)) else {
                return Err(TokenizerError::Merges(format!(
                    "line {}: unknown symbol in {line:?}",
                    rank + 2
                )));
            };
            ranks.insert((ia, ib), rank as u32);
            let merged = format!("{a}{b}");
            ids.insert(merged.clone(), vocab.len() as u32);
            vocab.push(merged);
        }
        if ranks.len() != NUM_MERGES {
            return Err(TokenizerError::Merges(format!(
                "{} merges, expected {NUM_MERGES}",
                ranks.len()
            )));
        }
        vocab.push(START_TEXT.into());
        vocab.push(END_TEXT.into());
        let pattern = regex::Regex::new(
            r"(?i)<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+",
        )
        .map_err(|e| TokenizerError::Merges(e.to_string()))?;
        Ok(ClipTokenizer {
            byte_sym,
            sym_byte,
            ranks,
            vocab,
            pattern,
            cache: RwLock::new(HashMap::new()),
        })
    }

    /// Token ids of `text`, without BOS/EOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let cleaned = clean::clean(text);
        let mut out = Vec::with_capacity(cleaned.len() / 3 + 1);
        for m in self.pattern.find_iter(&cleaned) {
            self.encode_piece(m.as_str(), &mut out);
        }
        out
    }

    /// Number of tokens of `text` (without BOS/EOS).
    pub fn count(&self, text: &str) -> usize {
        self.encode(text).len()
    }

    fn encode_piece(&self, piece: &str, out: &mut Vec<u32>) {
        match piece {
            START_TEXT => return out.push(BOS),
            END_TEXT => return out.push(EOS),
            _ => {}
        }
        if let Ok(c) = self.cache.read()
            && let Some(ids) = c.get(piece)
        {
            out.extend_from_slice(ids);
            return;
        }
        let ids = self.bpe(piece.as_bytes());
        out.extend_from_slice(&ids);
        if let Ok(mut c) = self.cache.write() {
            if c.len() >= CACHE_LIMIT {
                c.clear();
            }
            c.insert(piece.to_string(), ids);
        }
    }

    fn rank(&self, a: u32, b: u32) -> Option<u32> {
        self.ranks.get(&(a, b)).copied()
    }

    /// Byte-pair merges of one piece: repeatedly the lowest-ranked adjacent pair, every
    /// occurrence left to right (a heap of (rank, position) over a linked list).
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let n = bytes.len();
        if n == 0 {
            return Vec::new();
        }
        let mut sym: Vec<u32> = bytes.iter().map(|&b| self.byte_sym[b as usize]).collect();
        sym[n - 1] += 256;
        const NONE: usize = usize::MAX;
        let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
        let mut alive = vec![true; n];
        let mut heap = BinaryHeap::new();
        for i in 0..n - 1 {
            if let Some(r) = self.rank(sym[i], sym[i + 1]) {
                heap.push(Reverse((r, i)));
            }
        }
        while let Some(Reverse((r, i))) = heap.pop() {
            let j = next[i];
            if !alive[i] || j == NONE || self.rank(sym[i], sym[j]) != Some(r) {
                continue;
            }
            sym[i] = 512 + r;
            alive[j] = false;
            next[i] = next[j];
            if next[j] != NONE {
                prev[next[j]] = i;
            }
            if prev[i] != NONE
                && let Some(r2) = self.rank(sym[prev[i]], sym[i])
            {
                heap.push(Reverse((r2, prev[i])));
            }
            if next[i] != NONE
                && let Some(r2) = self.rank(sym[i], sym[next[i]])
            {
                heap.push(Reverse((r2, i)));
            }
        }
        (0..n).filter(|&i| alive[i]).map(|i| sym[i]).collect()
    }

    /// The vocabulary entry of `id` (byte-level characters, `</w>` ending words).
    pub fn piece(&self, id: u32) -> &str {
        self.vocab
            .get(id as usize)
            .map(String::as_str)
            .unwrap_or("<unk>")
    }

    /// Text of `ids`: bytes restored, `</w>` read as a space (like `SimpleTokenizer.decode`).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            match id {
                BOS | EOS => bytes.extend_from_slice(self.piece(id).as_bytes()),
                _ => {
                    let piece = self.piece(id);
                    let (body, end) = match piece.strip_suffix("</w>") {
                        Some(b) => (b, true),
                        None => (piece, false),
                    };
                    for c in body.chars() {
                        bytes.push(self.char_byte(c));
                    }
                    if end {
                        bytes.push(b' ');
                    }
                }
            }
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }

    fn char_byte(&self, c: char) -> u8 {
        let mut buf = [0u8; 4];
        let s = c.encode_utf8(&mut buf);
        self.vocab[..256]
            .iter()
            .position(|v| v == s)
            .map(|i| self.sym_byte[i])
            .unwrap_or(b'?')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_ids() {
        let t = ClipTokenizer::shared();
        assert_eq!(t.vocab.len(), VOCAB_SIZE);
        assert_eq!(t.piece(0), "!");
        assert_eq!(t.piece(265), "*</w>");
        assert_eq!(t.piece(COMMA), ",</w>");
        assert_eq!(t.encode("!"), vec![256]);
        assert_eq!(t.encode(","), vec![COMMA]);
        assert_eq!(t.encode("<|endoftext|>"), vec![EOS]);
    }

    #[test]
    fn long_piece_is_linear_enough_and_decodes() {
        let t = ClipTokenizer::shared();
        let word = "ab".repeat(20_000);
        let ids = t.encode(&word);
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids).trim_end(), word);
        assert_eq!(t.decode(&t.encode("héllo wörld")), "héllo wörld ");
    }
}
