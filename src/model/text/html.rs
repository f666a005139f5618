//! HTML character references, decoded the two ways CLIP's text cleanup does:
//! Python's `html.unescape` (named references with and without `;`, numeric ones with
//! the HTML5 replacement rules) and ftfy's stricter `unescape_html` (only complete
//! `&name;` / `&#n;` references, plus upper-cased names such as `&EACUTE;`).
//! The entity list is the WHATWG one (`html_entities.tsv`, from
//! `scripts/gen_html_entities.py`).

use std::collections::HashMap;
use std::sync::OnceLock;

const TABLE: &str = include_str!("html_entities.tsv");

/// name (without `&`, with `;` where the standard has it) -> characters.
fn html5() -> &'static HashMap<&'static str, String> {
    static MAP: OnceLock<HashMap<&'static str, String>> = OnceLock::new();
    MAP.get_or_init(|| {
        TABLE
            .lines()
            .filter_map(|line| {
                let (name, cps) = line.split_once('\t')?;
                let value = cps
                    .split(' ')
                    .filter_map(|h| u32::from_str_radix(h, 16).ok())
                    .filter_map(char::from_u32)
                    .collect();
                Some((name, value))
            })
            .collect()
    })
}

/// The characters `&#128;`..`&#159;` stand for (Windows-1252), per the HTML5 rules;
/// `None` where the byte is undefined there (the control character itself is used).
pub(crate) fn cp1252(b: u32) -> Option<char> {
    const HI: [u32; 32] = [
        0x20AC, 0, 0x201A, 0x0192, 0x201E, 0x2026, 0x2020, 0x2021, 0x02C6, 0x2030, 0x0160, 0x2039,
        0x0152, 0, 0x017D, 0, 0, 0x2018, 0x2019, 0x201C, 0x201D, 0x2022, 0x2013, 0x2014, 0x02DC,
        0x2122, 0x0161, 0x203A, 0x0153, 0, 0x017E, 0x0178,
    ];
    match b {
        0x80..=0x9F => match HI[(b - 0x80) as usize] {
            0 => None,
            c => char::from_u32(c),
        },
        _ => None,
    }
}

fn numeric_ref(num: u64) -> String {
    match num {
        0 => "\u{FFFD}".into(),
        0x0D => "\r".into(),
        0x80..=0x9F => cp1252(num as u32)
            .unwrap_or_else(|| char::from_u32(num as u32).unwrap_or('\u{FFFD}'))
            .to_string(),
        0xD800..=0xDFFF => "\u{FFFD}".into(),
        n if n > 0x10FFFF => "\u{FFFD}".into(),
        0x01..=0x08 | 0x0B | 0x0E..=0x1F | 0x7F | 0xFDD0..=0xFDEF => String::new(),
        n if n & 0xFFFE == 0xFFFE => String::new(),
        n => char::from_u32(n as u32)
            .map(String::from)
            .unwrap_or_default(),
    }
}

fn parse_num(digits: &str, radix: u32) -> u64 {
    digits.chars().fold(0u64, |acc, c| {
        acc.saturating_mul(radix as u64)
            .saturating_add(c.to_digit(radix).unwrap_or(0) as u64)
    })
}

/// Python's `html.unescape`.
pub fn unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '&' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        match reference_at(&chars, i + 1) {
            Some((replacement, end)) => {
                out.push_str(&replacement);
                i = end;
            }
            None => {
                out.push('&');
                i += 1;
            }
        }
    }
    out
}

/// Decodes the reference whose body starts at `start` (just after `&`); returns the
/// replacement and the index after the reference.
fn reference_at(chars: &[char], start: usize) -> Option<(String, usize)> {
    let at = |k: usize| chars.get(k).copied();
    if at(start) == Some('#') {
        let (radix, from) = match at(start + 1) {
            Some('x' | 'X') => (16, start + 2),
            _ => (10, start + 1),
        };
        let mut end = from;
        while at(end).is_some_and(|c| c.is_ascii() && c.is_digit(radix)) {
            end += 1;
        }
        if end == from {
            return None;
        }
        let digits: String = chars[from..end].iter().collect();
        if at(end) == Some(';') {
            end += 1;
        }
        return Some((numeric_ref(parse_num(&digits, radix)), end));
    }
    let stop = |c: char| matches!(c, '\t' | '\n' | '\x0C' | ' ' | '<' | '&' | '#' | ';');
    let mut end = start;
    while end - start < 32 && at(end).is_some_and(|c| !stop(c)) {
        end += 1;
    }
    if end == start {
        return None;
    }
    if at(end) == Some(';') {
        end += 1;
    }
    let name: String = chars[start..end].iter().collect();
    let table = html5();
    if let Some(v) = table.get(name.as_str()) {
        return Some((v.clone(), end));
    }
    // The longest prefix (at least two characters) that is a known name.
    let n = end - start;
    for x in (2..n).rev() {
        let prefix: String = chars[start..start + x].iter().collect();
        if let Some(v) = table.get(prefix.as_str()) {
            let rest: String = chars[start + x..end].iter().collect();
            return Some((format!("{v}{rest}"), end));
        }
    }
    Some((format!("&{name}"), end))
}

/// ftfy's entity table: `&name;` for every `;` name, plus the upper-cased form of
/// lower-case names where that form is not itself decodable.
fn ftfy_entities() -> &'static HashMap<String, String> {
    static MAP: OnceLock<HashMap<String, String>> = OnceLock::new();
    MAP.get_or_init(|| {
        let mut m = HashMap::new();
        for (name, value) in html5() {
            if !name.ends_with(';') {
                continue;
            }
            m.insert(format!("&{name}"), value.clone());
        }
        for (name, value) in html5() {
            if name.ends_with(';') && *name == name.to_lowercase() {
                let upper = format!("&{}", name.to_uppercase());
                if unescape(&upper) == upper {
                    m.insert(upper, value.to_uppercase());
                }
            }
        }
        m
    })
}

/// ftfy's `unescape_html`: replaces complete references `&#?[0-9A-Za-z]{1,24};`.
pub fn ftfy_unescape(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'&' {
            i += 1;
            continue;
        }
        if let Some(end) = complete_ref_end(b, i) {
            let text = &s[i..end];
            let rep = if let Some(v) = ftfy_entities().get(text) {
                Some(v.clone())
            } else if text.starts_with("&#") {
                let u = unescape(text);
                (!u.contains(';')).then_some(u)
            } else {
                None
            };
            if let Some(rep) = rep {
                out.push_str(&s[last..i]);
                out.push_str(&rep);
                last = end;
            }
            i = end;
        } else {
            i += 1;
        }
    }
    out.push_str(&s[last..]);
    out
}

/// End of a `&#?[0-9A-Za-z]{1,24};` match starting at `i`.
fn complete_ref_end(b: &[u8], i: usize) -> Option<usize> {
    let run = |from: usize| {
        let mut k = from;
        while k < b.len() && k - from < 24 && b[k].is_ascii_alphanumeric() {
            k += 1;
        }
        (k > from && b.get(k) == Some(&b';')).then_some(k + 1)
    };
    if b.get(i + 1) == Some(&b'#') {
        run(i + 2)
    } else {
        run(i + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_unescape_rules() {
        assert_eq!(unescape("a &amp; b"), "a & b");
        assert_eq!(unescape("&amp"), "&");
        assert_eq!(unescape("&ampx"), "&x");
        assert_eq!(unescape("&notit;"), "¬it;");
        assert_eq!(unescape("&#39;&#x27;&#X27"), "'''");
        assert_eq!(unescape("&#150;&#0;&#1;"), "–\u{FFFD}");
        assert_eq!(unescape("&#99999999999;"), "\u{FFFD}");
        assert_eq!(unescape("&bogus; &#; &"), "&bogus; &#; &");
        assert_eq!(unescape("&amp;amp;"), "&amp;");
    }

    #[test]
    fn ftfy_unescape_rules() {
        assert_eq!(ftfy_unescape("fish &amp; chips"), "fish & chips");
        assert_eq!(ftfy_unescape("this&not that"), "this&not that");
        assert_eq!(ftfy_unescape("&EACUTE;t&eacute;"), "Été");
        assert_eq!(ftfy_unescape("&#59;"), "&#59;");
        assert_eq!(ftfy_unescape("&#x2019;s"), "\u{2019}s");
        assert_eq!(ftfy_unescape("&amp;amp;"), "&amp;");
    }
}
