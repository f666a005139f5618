//! CLIP's text cleanup before BPE, as OpenAI's `simple_tokenizer` (and open_clip) do it:
//! `ftfy.fix_text`, `html.unescape` twice, strip, collapse whitespace, lower-case.
//!
//! "ftfy-lite": the ftfy steps that change real prompts are implemented exactly
//! (HTML entities, C1 controls as Windows-1252, Latin ligatures, full/half-width forms,
//! curly quotes, line breaks, terminal escapes, control characters, NFC, repeated to a
//! fixed point, per line). ftfy's mojibake repair (`fix_encoding`, heuristic re-decoding
//! of text such as `cafÃ©`) is not: such text is tokenized as it is.

use super::html;
use std::borrow::Cow;
use std::sync::OnceLock;
use unicode_normalization::{IsNormalized, UnicodeNormalization};

/// The full cleanup: `whitespace_clean(basic_clean(text)).lower()`.
pub fn clean(text: &str) -> String {
    let fixed = fix_text(text);
    let once = html::unescape(&fixed);
    let twice = html::unescape(&once);
    collapse_whitespace(&twice).to_lowercase()
}

/// Python's `str.isspace`.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\x1c'..='\x1f').contains(&c)
}

/// `" ".join(text.split())`.
pub fn collapse_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// ftfy's `fix_text` with its default configuration, less mojibake repair.
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        // ftfy turns HTML unescaping off for good once a segment contains '<'.
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

/// Plain ASCII without `&`, escapes or control characters: no ftfy step changes it.
fn untouched_by_ftfy(s: &str) -> bool {
    s.bytes()
        .all(|b| matches!(b, b' '..=b'~' | b'\t' | b'\n') && b != b'&')
}

fn fix_segment(segment: &str, unescape: bool) -> String {
    if untouched_by_ftfy(segment) {
        return segment.to_string();
    }
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = html::ftfy_unescape(&text);
        }
        text = map_chars(&text);
        text = fix_line_breaks(&text);
        text = remove_terminal_escapes(&text).into_owned();
        text = text.chars().filter(|&c| !is_removed_control(c)).collect();
        if unicode_normalization::is_nfc_quick(text.chars()) != IsNormalized::Yes {
            text = text.nfc().collect();
        }
        if text == orig {
            return text;
        }
    }
}

/// C1 controls, ligatures, character width and curly quotes: ftfy applies these one
/// after another; each maps single characters and none produces input of a later one
/// except C1 -> curly quotes, which is handled by applying the later maps to the result.
fn map_chars(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        let c = match c as u32 {
            0x80..=0x9F => html::cp1252(c as u32).unwrap_or(c),
            _ => c,
        };
        match ligature(c) {
            Some(s) => s.chars().for_each(|d| push_width_uncurled(&mut out, d)),
            None => push_width_uncurled(&mut out, c),
        }
    }
    out
}

fn push_width_uncurled(out: &mut String, c: char) {
    match width(c) {
        Some(w) => out.extend(w.chars().map(uncurl)),
        None => out.push(uncurl(c)),
    }
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// Fullwidth/halfwidth forms (U+FF01..U+FFEF) to their NFKC form; U+3000 to a space.
fn width(c: char) -> Option<String> {
    match c as u32 {
        0x3000 => Some(" ".into()),
        0xFF01..=0xFFEF => {
            let n: String = c.nfkc().collect();
            (n.chars().ne(std::iter::once(c))).then_some(n)
        }
        _ => None,
    }
}

fn uncurl(c: char) -> char {
    match c {
        'ʼ' | '\u{2018}'..='\u{201B}' => '\'',
        '\u{201C}'..='\u{201F}' => '"',
        c => c,
    }
}

fn fix_line_breaks(text: &str) -> String {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return text.to_string();
    }
    text.replace("\r\n", "\n")
        .replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn remove_terminal_escapes(text: &str) -> Cow<'_, str> {
    static RE: OnceLock<regex::Regex> = OnceLock::new();
    if !text.contains('\x1b') {
        return Cow::Borrowed(text);
    }
    RE.get_or_init(|| regex::Regex::new(r"\x1b\[[\d;]*[a-zA-Z]").expect("static regex"))
        .replace_all(text, "")
}

fn is_removed_control(c: char) -> bool {
    matches!(c as u32,
        0x00..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0x206A..=0x206F | 0xFEFF | 0xFFF9..=0xFFFC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ftfy_examples() {
        assert_eq!(
            fix_text("Broken text&hellip; it&#x2019;s ﬂubberiﬁc!"),
            "Broken text… it's flubberific!"
        );
        assert_eq!(fix_text("ＬＯＵＤ　ＮＯＩＳＥＳ"), "LOUD NOISES");
        assert_eq!(fix_text("a\r\nb\u{2028}c"), "a\nb\nc");
        assert_eq!(fix_text("\u{feff}x\u{7}y\x1b[31mz"), "xyz");
        assert_eq!(fix_text("<b>&amp;</b>"), "<b>&amp;</b>");
        assert_eq!(fix_text("\u{93}hi\u{94}"), "\"hi\"");
    }

    #[test]
    fn clean_collapses_and_lowercases() {
        assert_eq!(clean("  Hello\t\n WORLD  "), "hello world");
        assert_eq!(clean("a &amp;amp; b"), "a & b");
        assert_eq!(clean("Cafe\u{301}"), "café");
    }
}
