//! Prompts the way the AUTOMATIC1111 webui and kohya sd-scripts turn them into tokens.
//!
//! **A1111** (`parse_attention` + `a1111_chunks`): emphasis `(x)` ×1.1, `[x]` ÷1.1,
//! `(x:1.3)` ×1.3, `\(` `\)` `\[` `\]` `\\` literal, brackets left open apply to the rest
//! of the prompt, `BREAK` (upper case, a word of its own) starts a new chunk. Each
//! fragment is tokenized on its own; tokens go into chunks of 75. When a chunk is full
//! and a comma lies within the last `comma_backtrack` (webui default 20) tokens, the
//! tokens after that comma move to the next chunk. Each chunk is BOS + 75 + EOS: SD1
//! pads with EOS (49407), SD2 (open_clip) keeps the first EOS and pads with 0. Every
//! token carries the product of its brackets' weights. The prompt becomes as many
//! 77-token chunks as it needs; the text encoder's outputs are concatenated.
//!
//! **kohya** (`kohya_chunks`): the caption is tokenized as plain text (no emphasis, no
//! BREAK, no comma rule) and truncated to `max_token_length` (75, 150 or 225) tokens;
//! 150/225 are then cut into exactly 2/3 chunks of BOS + 75 + EOS, empty ones included.
//! A caption longer than the limit loses its tail silently; A1111 would open a chunk.

use super::placeholders::Placeholders;
use super::tokenizer::{BOS, COMMA, ClipTokenizer, EOS};
use std::sync::OnceLock;

pub const CHUNK: usize = 75;

/// A piece of prompt text and its weight. A1111 marks `BREAK` as text "BREAK" with
/// weight -1; `is_break` tells it apart from the word.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Fragment {
    pub text: String,
    pub weight: f64,
}

impl Fragment {
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PromptError {
    #[error("emphasis weight {0:?} is not a number")]
    BadWeight(String),
}

/// How chunks are padded after EOS.
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
pub enum Pad {
    /// SD1 (transformers CLIPTokenizer): EOS 49407.
    #[default]
    Sd1,
    /// SD2 (open_clip): 0.
    Sd2,
}

impl Pad {
    pub fn id(self) -> u32 {
        match self {
            Pad::Sd1 => EOS,
            Pad::Sd2 => 0,
        }
    }
}

/// One 77-token chunk with a weight per token.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Chunk {
    pub tokens: Vec<u32>,
    pub weights: Vec<f64>,
    /// Prompt tokens in it (not counting BOS, EOS, padding).
    pub used: usize,
}

/// One lexical token of A1111's attention syntax.
enum Tok<'a> {
    Escaped(&'a str),
    Open,
    OpenSquare,
    Weight(&'a str),
    Close,
    CloseSquare,
    Text,
}

/// Next token at byte `i` of `s`, and where it ends; alternatives in A1111's order.
fn next_tok(s: &str, i: usize) -> (Tok<'_>, usize) {
    let rest = &s[i..];
    let mut chars = rest.chars();
    let c = chars.next().unwrap_or('\0');
    match c {
        '\\' => match chars.next() {
            Some(d @ ('(' | ')' | '[' | ']' | '\\')) => {
                (Tok::Escaped(&rest[1..2]), i + 1 + d.len_utf8())
            }
            _ => (Tok::Escaped(""), i + 1),
        },
        '(' => (Tok::Open, i + 1),
        '[' => (Tok::OpenSquare, i + 1),
        ')' => (Tok::Close, i + 1),
        ']' => (Tok::CloseSquare, i + 1),
        ':' => {
            static RE: OnceLock<regex::Regex> = OnceLock::new();
            let re =
                RE.get_or_init(|| regex::Regex::new(r"^:([+-]?[.\d]+)\)").expect("static regex"));
            match re.captures(rest) {
                Some(m) => {
                    let end = m.get(0).map_or(1, |g| g.end());
                    (Tok::Weight(m.get(1).map_or("", |g| g.as_str())), i + end)
                }
                None => (Tok::Text, i + 1),
            }
        }
        _ => {
            let len = rest
                .find(['\\', '(', ')', '[', ']', ':'])
                .unwrap_or(rest.len());
            (Tok::Text, i + len)
        }
    }
}

fn parse_weight(w: &str) -> Result<f64, PromptError> {
    if !w.is_ascii() {
        return Err(PromptError::BadWeight(w.into()));
    }
    w.parse::<f64>()
        .map_err(|_| PromptError::BadWeight(w.into()))
}

/// A1111's `parse_prompt_attention`: the prompt as (text, weight) runs, equal
/// neighbouring weights merged. Errors only where A1111 fails too (`(x:1.2.3)`).
pub fn parse_attention(text: &str) -> Result<Vec<Fragment>, PromptError> {
    static BREAK: OnceLock<regex::Regex> = OnceLock::new();
    let re_break =
        BREAK.get_or_init(|| regex::Regex::new(r"(?s)\s*\bBREAK\b\s*").expect("static regex"));
    let mut res: Vec<Fragment> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let round_mult = 1.1f64;
    let square_mult = 1.0f64 / 1.1;
    let multiply = |res: &mut Vec<Fragment>, from: usize, m: f64| {
        for f in &mut res[from..] {
            f.weight *= m;
        }
    };
    let mut i = 0;
    while i < text.len() {
        let (tok, end) = next_tok(text, i);
        let literal = &text[i..end];
        i = end;
        match tok {
            Tok::Escaped(t) => res.push(Fragment {
                text: t.into(),
                weight: 1.0,
            }),
            Tok::Open => round.push(res.len()),
            Tok::OpenSquare => square.push(res.len()),
            Tok::Weight(w) if !round.is_empty() => {
                let w = parse_weight(w)?;
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, w);
            }
            Tok::Close if !round.is_empty() => {
                let from = round.pop().unwrap_or(0);
                multiply(&mut res, from, round_mult);
            }
            Tok::CloseSquare if !square.is_empty() => {
                let from = square.pop().unwrap_or(0);
                multiply(&mut res, from, square_mult);
            }
            Tok::Weight(_) | Tok::Close | Tok::CloseSquare | Tok::Text => {
                for (k, part) in re_break.split(literal).enumerate() {
                    if k > 0 {
                        res.push(Fragment {
                            text: "BREAK".into(),
                            weight: -1.0,
                        });
                    }
                    res.push(Fragment {
                        text: part.into(),
                        weight: 1.0,
                    });
                }
            }
        }
    }
    for from in round {
        multiply(&mut res, from, round_mult);
    }
    for from in square {
        multiply(&mut res, from, square_mult);
    }
    if res.is_empty() {
        res.push(Fragment {
            text: String::new(),
            weight: 1.0,
        });
    }
    let mut merged: Vec<Fragment> = Vec::with_capacity(res.len());
    for f in res {
        match merged.last_mut() {
            Some(last) if last.weight == f.weight => last.text.push_str(&f.text),
            _ => merged.push(f),
        }
    }
    Ok(merged)
}

/// Options of A1111's chunking.
#[derive(Debug, Clone, Copy)]
pub struct ChunkOptions {
    pub pad: Pad,
    /// "Prompt word wrap length limit" (webui default 20; 0 turns the comma rule off).
    pub comma_backtrack: usize,
}

impl Default for ChunkOptions {
    fn default() -> Self {
        ChunkOptions {
            pad: Pad::Sd1,
            comma_backtrack: 20,
        }
    }
}

/// A1111's chunks for parsed fragments, and its token count (75 per chunk before the
/// last, plus the tokens of the last): the number the webui shows as "N/75".
pub fn a1111_chunks(
    tok: &ClipTokenizer,
    fragments: &[Fragment],
    opts: ChunkOptions,
) -> (Vec<Chunk>, usize) {
    a1111_chunks_with(tok, fragments, opts, &Placeholders::default())
}

/// [`a1111_chunks`] with textual-inversion names: where a name's tokens start, its `n`
/// vector ids go in instead (webui's `tokenize_line`): when they do not fit in the
/// current chunk, the chunk is closed first, so an embedding never straddles two chunks;
/// the vectors take the weight of the text around them and count as `n` tokens. (webui
/// leaves an embedding behind when the comma rule moves the tokens after a comma to the
/// next chunk; here its vectors move with them.)
pub fn a1111_chunks_with(
    tok: &ClipTokenizer,
    fragments: &[Fragment],
    opts: ChunkOptions,
    names: &Placeholders,
) -> (Vec<Chunk>, usize) {
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut cur_t: Vec<u32> = Vec::new();
    let mut cur_w: Vec<f64> = Vec::new();
    let mut token_count = 0usize;
    let mut last_comma: Option<usize> = None;

    let finish = |t: &mut Vec<u32>,
                  w: &mut Vec<f64>,
                  is_last: bool,
                  count: &mut usize,
                  chunks: &mut Vec<Chunk>| {
        *count += if is_last { t.len() } else { CHUNK };
        let used = t.len();
        let mut tokens = Vec::with_capacity(CHUNK + 2);
        let mut weights = Vec::with_capacity(CHUNK + 2);
        tokens.push(BOS);
        weights.push(1.0);
        tokens.append(t);
        weights.append(w);
        tokens.resize(CHUNK + 2, EOS);
        weights.resize(CHUNK + 2, 1.0);
        if opts.pad == Pad::Sd2
            && let Some(first_eos) = tokens.iter().position(|&x| x == EOS)
        {
            for x in &mut tokens[first_eos + 1..] {
                *x = 0;
            }
        }
        chunks.push(Chunk {
            tokens,
            weights,
            used: used.min(CHUNK),
        });
    };

    for frag in fragments {
        if frag.is_break() {
            finish(&mut cur_t, &mut cur_w, false, &mut token_count, &mut chunks);
            last_comma = None;
            continue;
        }
        let ids = tok.encode(&frag.text);
        let mut pos = 0;
        while pos < ids.len() {
            let id = ids[pos];
            if id == COMMA {
                last_comma = Some(cur_t.len());
            } else if let Some(lc) = last_comma
                && opts.comma_backtrack != 0
                && cur_t.len() == CHUNK
                && cur_t.len() - lc <= opts.comma_backtrack
            {
                // Full chunk, comma close enough: the tokens after it move on.
                let reloc_t = cur_t.split_off(lc + 1);
                let reloc_w = cur_w.split_off(lc + 1);
                finish(&mut cur_t, &mut cur_w, false, &mut token_count, &mut chunks);
                last_comma = None;
                cur_t = reloc_t;
                cur_w = reloc_w;
            }
            if cur_t.len() == CHUNK {
                finish(&mut cur_t, &mut cur_w, false, &mut token_count, &mut chunks);
                last_comma = None;
            }
            if let Some((e, len)) = names.find_at(&ids, pos) {
                if cur_t.len() + e.n > CHUNK {
                    finish(&mut cur_t, &mut cur_w, false, &mut token_count, &mut chunks);
                    last_comma = None;
                }
                cur_t.extend(e.ids());
                cur_w.extend(std::iter::repeat_n(frag.weight, e.n));
                pos += len;
                continue;
            }
            cur_t.push(id);
            cur_w.push(frag.weight);
            pos += 1;
        }
    }
    if !cur_t.is_empty() || chunks.is_empty() {
        finish(&mut cur_t, &mut cur_w, true, &mut token_count, &mut chunks);
    }
    (chunks, token_count)
}

/// Parses and chunks a prompt the A1111 way.
pub fn a1111_prompt(
    tok: &ClipTokenizer,
    prompt: &str,
    opts: ChunkOptions,
) -> Result<(Vec<Chunk>, usize), PromptError> {
    a1111_prompt_with(tok, prompt, opts, &Placeholders::default())
}

/// [`a1111_prompt`] with textual-inversion names (see [`a1111_chunks_with`]).
pub fn a1111_prompt_with(
    tok: &ClipTokenizer,
    prompt: &str,
    opts: ChunkOptions,
    names: &Placeholders,
) -> Result<(Vec<Chunk>, usize), PromptError> {
    let fragments = parse_attention(prompt)?;
    Ok(a1111_chunks_with(tok, &fragments, opts, names))
}

/// kohya sd-scripts' token layout for a caption: `max_token_length` 75, 150 or 225
/// (other values are rounded up to a multiple of 75) -> 1, 2 or 3 chunks of 77.
pub fn kohya_chunks(
    tok: &ClipTokenizer,
    caption: &str,
    max_token_length: usize,
    pad: Pad,
) -> Vec<Vec<u32>> {
    kohya_chunks_with(
        tok,
        caption,
        max_token_length,
        pad,
        &Placeholders::default(),
    )
}

/// [`kohya_chunks`] with textual-inversion names replaced by their vector ids before
/// the truncation (a name's vectors count as tokens, as in webui).
pub fn kohya_chunks_with(
    tok: &ClipTokenizer,
    caption: &str,
    max_token_length: usize,
    pad: Pad,
    names: &Placeholders,
) -> Vec<Vec<u32>> {
    let max = max_token_length.max(1).div_ceil(CHUNK) * CHUNK;
    let ids = names.encode(tok, caption);
    let len = max + 2;
    let mut full = Vec::with_capacity(len);
    full.push(BOS);
    full.extend(ids.iter().take(max));
    full.push(EOS);
    full.resize(len, pad.id());
    if max == CHUNK {
        return vec![full];
    }
    let last = full[len - 1];
    (1..len - (CHUNK + 2) + 2)
        .step_by(CHUNK)
        .map(|i| {
            let mut c = Vec::with_capacity(CHUNK + 2);
            c.push(full[0]);
            c.extend_from_slice(&full[i..i + CHUNK]);
            c.push(last);
            if pad == Pad::Sd2 {
                let pad_id = pad.id();
                if c[CHUNK] != EOS && c[CHUNK] != pad_id {
                    c[CHUNK + 1] = EOS;
                }
                if c[1] == pad_id {
                    c[1] = EOS;
                }
            }
            c
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frags(v: &[(&str, f64)]) -> Vec<Fragment> {
        v.iter()
            .map(|&(t, w)| Fragment {
                text: t.into(),
                weight: w,
            })
            .collect()
    }

    #[test]
    fn a1111_doc_examples() {
        assert_eq!(
            parse_attention("normal text").unwrap(),
            frags(&[("normal text", 1.0)])
        );
        assert_eq!(
            parse_attention("an (important) word").unwrap(),
            frags(&[("an ", 1.0), ("important", 1.1), (" word", 1.0)])
        );
        assert_eq!(
            parse_attention("(unbalanced").unwrap(),
            frags(&[("unbalanced", 1.1)])
        );
        assert_eq!(
            parse_attention(r"\(literal\]").unwrap(),
            frags(&[("(literal]", 1.0)])
        );
        assert_eq!(
            parse_attention("(unnecessary)(parens)").unwrap(),
            frags(&[("unnecessaryparens", 1.1)])
        );
        assert_eq!(
            parse_attention("a BREAK b").unwrap(),
            frags(&[("a", 1.0), ("BREAK", -1.0), ("b", 1.0)])
        );
        assert!(parse_attention("(x:1.2.3)").is_err());
        assert_eq!(
            parse_attention("x:1.2.3)").unwrap(),
            frags(&[("x:1.2.3)", 1.0)])
        );
    }

    #[test]
    fn kohya_layouts() {
        let tok = ClipTokenizer::shared();
        let one = kohya_chunks(tok, "a cat", 75, Pad::Sd1);
        assert_eq!(one.len(), 1);
        assert_eq!(&one[0][..4], &[BOS, 320, 2368, EOS]);
        assert!(one[0][4..].iter().all(|&x| x == EOS));
        let three = kohya_chunks(tok, "a cat", 225, Pad::Sd2);
        assert_eq!(three.len(), 3);
        assert_eq!(&three[0][..5], &[BOS, 320, 2368, EOS, 0]);
        assert_eq!(&three[1][..3], &[BOS, EOS, 0]);
        assert!(three.iter().all(|c| c.len() == 77));
    }
}
