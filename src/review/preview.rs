//! Inline image previews for terminals that show images: the kitty graphics protocol,
//! iTerm2's inline images (also WezTerm), and sixel (foot, mlterm, xterm built with
//! sixel). Detection reads the environment only; `--preview` overrides it.

use std::path::Path;

use base64::Engine;
use image::RgbImage;

use crate::dataset::decode::{Rgb8, decode_file};

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
pub enum Protocol {
    /// Pick from the environment (TERM, TERM_PROGRAM, KITTY_WINDOW_ID, LC_TERMINAL).
    #[default]
    Auto,
    Kitty,
    Iterm,
    Sixel,
    /// Print the image path only.
    None,
}

/// The protocol the terminal described by `env` supports.
pub fn detect(env: &dyn Fn(&str) -> Option<String>) -> Protocol {
    let term = env("TERM").unwrap_or_default();
    let program = env("TERM_PROGRAM").unwrap_or_default();
    // Inside tmux/screen, escape sequences do not reach the outer terminal as is.
    if term.starts_with("screen") || term.starts_with("tmux") || env("TMUX").is_some() {
        return Protocol::None;
    }
    if env("KITTY_WINDOW_ID").is_some() || term.contains("kitty") || term.contains("ghostty") {
        return Protocol::Kitty;
    }
    if program == "iTerm.app"
        || program == "WezTerm"
        || env("LC_TERMINAL").as_deref() == Some("iTerm2")
    {
        return Protocol::Iterm;
    }
    if term.contains("sixel") || term.starts_with("foot") || term.starts_with("mlterm") {
        return Protocol::Sixel;
    }
    Protocol::None
}

/// Resolves `Auto` against the process environment.
pub fn resolve(p: Protocol) -> Protocol {
    match p {
        Protocol::Auto => detect(&|k| std::env::var(k).ok()),
        other => other,
    }
}

/// A small upright RGB thumbnail (longest side at most `max`).
pub fn thumbnail(path: &Path, max: u32) -> Result<RgbImage, String> {
    let img = decode_file(path, Rgb8::WHITE)
        .map_err(|e| e.to_string())?
        .image;
    let (w, h) = img.dimensions();
    if w <= max && h <= max {
        return Ok(img);
    }
    let s = max as f64 / w.max(h) as f64;
    let (tw, th) = (
        ((w as f64 * s) as u32).max(1),
        ((h as f64 * s) as u32).max(1),
    );
    Ok(image::imageops::thumbnail(&img, tw, th))
}

fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    let enc = image::codecs::png::PngEncoder::new(&mut out);
    // Encoding an in-memory RGB buffer into a Vec cannot fail.
    let _ = image::ImageEncoder::write_image(
        enc,
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    );
    out
}

/// The escape sequence that shows `img` with the protocol (empty for `None`/`Auto`).
pub fn encode(img: &RgbImage, p: Protocol) -> String {
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    match p {
        Protocol::Kitty => {
            let data = b64(&png(img));
            let chunks: Vec<&str> = data
                .as_bytes()
                .chunks(4096)
                .map(|c| std::str::from_utf8(c).unwrap_or_default())
                .collect();
            let mut s = String::with_capacity(data.len() + chunks.len() * 16);
            for (i, c) in chunks.iter().enumerate() {
                let more = u8::from(i + 1 < chunks.len());
                if i == 0 {
                    // q=2: no replies, so the terminal writes nothing into our input.
                    s.push_str(&format!("\x1b_Gf=100,a=T,q=2,m={more};{c}\x1b\\"));
                } else {
                    s.push_str(&format!("\x1b_Gm={more};{c}\x1b\\"));
                }
            }
            s.push('\n');
            s
        }
        Protocol::Iterm => {
            let bytes = png(img);
            format!(
                "\x1b]1337;File=inline=1;size={};preserveAspectRatio=1:{}\x07\n",
                bytes.len(),
                b64(&bytes)
            )
        }
        Protocol::Sixel => sixel(img),
        Protocol::None | Protocol::Auto => String::new(),
    }
}

/// Sixel with a fixed 6x6x6 colour cube.
pub fn sixel(img: &RgbImage) -> String {
    use std::fmt::Write;
    let (w, h) = img.dimensions();
    let level = |v: u8| (v as u32 * 5 + 127) / 255;
    let index: Vec<u8> = img
        .pixels()
        .map(|p| (level(p[0]) * 36 + level(p[1]) * 6 + level(p[2])) as u8)
        .collect();
    let mut s = String::new();
    let _ = write!(s, "\x1bPq\"1;1;{w};{h}");
    for i in 0..216u32 {
        let pct = |l: u32| l * 100 / 5;
        let _ = write!(
            s,
            "#{i};2;{};{};{}",
            pct(i / 36),
            pct(i / 6 % 6),
            pct(i % 6)
        );
    }
    for band in 0..h.div_ceil(6) {
        let y0 = band * 6;
        let mut used = [false; 216];
        for y in y0..(y0 + 6).min(h) {
            for x in 0..w {
                used[index[(y * w + x) as usize] as usize] = true;
            }
        }
        for (c, _) in used.iter().enumerate().filter(|(_, u)| **u) {
            let _ = write!(s, "#{c}");
            let mut run: Option<(char, u32)> = None;
            for x in 0..w {
                let mut bits = 0u8;
                for dy in 0..6 {
                    let y = y0 + dy;
                    if y < h && index[(y * w + x) as usize] as usize == c {
                        bits |= 1 << dy;
                    }
                }
                let ch = (63 + bits) as char;
                run = match run {
                    Some((p, n)) if p == ch => Some((p, n + 1)),
                    Some((p, n)) => {
                        push_run(&mut s, p, n);
                        Some((ch, 1))
                    }
                    None => Some((ch, 1)),
                };
            }
            if let Some((p, n)) = run {
                push_run(&mut s, p, n);
            }
            s.push('$');
        }
        s.push('-');
    }
    s.push_str("\x1b\\\n");
    s
}

fn push_run(s: &mut String, ch: char, n: u32) {
    if n > 3 {
        s.push_str(&format!("!{n}{ch}"));
    } else {
        for _ in 0..n {
            s.push(ch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| {
            pairs
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn detects_terminals_from_environment() {
        assert_eq!(
            detect(&env(&[("KITTY_WINDOW_ID", "1"), ("TERM", "xterm-kitty")])),
            Protocol::Kitty
        );
        assert_eq!(
            detect(&env(&[("TERM_PROGRAM", "iTerm.app")])),
            Protocol::Iterm
        );
        assert_eq!(
            detect(&env(&[
                ("LC_TERMINAL", "iTerm2"),
                ("TERM", "xterm-256color")
            ])),
            Protocol::Iterm
        );
        assert_eq!(detect(&env(&[("TERM", "foot")])), Protocol::Sixel);
        assert_eq!(detect(&env(&[("TERM", "xterm-256color")])), Protocol::None);
        assert_eq!(
            detect(&env(&[("TERM", "xterm-kitty"), ("TMUX", "/tmp/x")])),
            Protocol::None
        );
    }

    #[test]
    fn kitty_chunks_and_iterm_payload_decode_to_the_png() {
        let img = RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 7]));
        let k = encode(&img, Protocol::Kitty);
        assert!(k.starts_with("\x1b_Gf=100,a=T,q=2,m="));
        let payload: String = k
            .split("\x1b\\")
            .filter_map(|c| c.split_once(';').map(|(_, d)| d))
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(payload)
            .unwrap();
        let back = image::load_from_memory(&bytes).unwrap().to_rgb8();
        assert_eq!(back, img);
        let i = encode(&img, Protocol::Iterm);
        let (head, data) = i.trim_end().split_once(':').unwrap();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim_end_matches('\x07'))
            .unwrap();
        assert!(head.contains(&format!("size={}", bytes.len())));
    }

    #[test]
    fn sixel_has_one_band_per_six_rows_and_full_width_runs() {
        let img = RgbImage::from_pixel(10, 7, image::Rgb([255, 0, 0]));
        let s = sixel(&img);
        assert!(s.starts_with("\x1bPq\"1;1;10;7"));
        // Pure red is cube colour 5*36 = 180; all six bits set in band one, one bit in two.
        let bands: Vec<&str> = s
            .split("#215;2;100;100;100")
            .nth(1)
            .unwrap()
            .split('-')
            .collect();
        assert_eq!(bands[0], "#180!10~$");
        assert_eq!(bands[1], "#180!10@$");
    }
}
