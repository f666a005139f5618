//! Generation parameters in a PNG text chunk named `parameters`, the way the
//! AUTOMATIC1111 webui writes them (its PNG Info tab, and most image sites, read them).
//!
//! webui (`modules/processing.py` `create_infotext`, `modules/infotext_utils.py`):
//! `prompt` + (`"\nNegative prompt: " + negative` when the negative is not empty) + `"\n"`
//! + `"Key: value, Key: value"` where empty (None) values are left out and a value
//! holding `,`, `:` or a newline is written as a JSON string. `Clip skip` is written only
//! above 1. `Model hash` is the "short hash": the first 10 hex digits of the SHA-256 of
//! the checkpoint file. The chunk is tEXt (Latin-1) when the text fits, else iTXt (UTF-8),
//! as PIL's `PngInfo.add_text` does. Reading follows `parse_generation_parameters`.

use crate::util::atomic::write_atomic_with;
use regex::Regex;
use sha2::{Digest, Sha256};
use std::io::{self, Read};
use std::path::Path;
use std::sync::OnceLock;

pub const KEY: &str = "parameters";

/// What one generated image was made with.
#[derive(Clone, Debug, PartialEq)]
pub struct GenParams {
    pub prompt: String,
    pub negative: String,
    pub steps: usize,
    /// webui's sampler name: "Euler a", "DDIM", "DPM++ 2M Karras".
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model_hash: Option<String>,
    pub model: Option<String>,
    pub clip_skip: usize,
    /// Further `Key: value` pairs, written after the standard ones.
    pub extra: Vec<(String, String)>,
}

/// webui's `quote`: JSON-quote values that would break the `k: v, k: v` line.
pub fn quote(v: &str) -> String {
    if v.contains([',', '\n', ':']) {
        serde_json::to_string(v).expect("strings serialize")
    } else {
        v.to_string()
    }
}

/// webui's `unquote`.
pub fn unquote(v: &str) -> String {
    if v.len() >= 2 && v.starts_with('"') && v.ends_with('"') {
        if let Ok(s) = serde_json::from_str::<String>(v) {
            return s;
        }
    }
    v.to_string()
}

/// A number as Python prints it, without a trailing `.0` (webui shows "CFG scale: 7").
fn num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

impl GenParams {
    /// The `parameters` text.
    pub fn to_infotext(&self) -> String {
        let mut kv: Vec<(String, String)> = vec![
            ("Steps".into(), self.steps.to_string()),
            ("Sampler".into(), self.sampler.clone()),
            ("CFG scale".into(), num(self.cfg_scale)),
            ("Seed".into(), self.seed.to_string()),
            ("Size".into(), format!("{}x{}", self.width, self.height)),
        ];
        if let Some(h) = &self.model_hash {
            kv.push(("Model hash".into(), h.clone()));
        }
        if let Some(m) = &self.model {
            kv.push(("Model".into(), m.clone()));
        }
        if self.clip_skip > 1 {
            kv.push(("Clip skip".into(), self.clip_skip.to_string()));
        }
        kv.extend(self.extra.iter().cloned());
        let line = kv
            .iter()
            .map(|(k, v)| {
                if k == v {
                    k.clone()
                } else {
                    format!("{k}: {}", quote(v))
                }
            })
            .collect::<Vec<_>>()
            .join(", ");
        let neg = if self.negative.is_empty() {
            String::new()
        } else {
            format!("\nNegative prompt: {}", self.negative)
        };
        format!("{}{neg}\n{line}", self.prompt).trim().to_string()
    }
}

/// A parsed `parameters` text: prompt, negative prompt and the `Key: value` pairs in order.
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Infotext {
    pub prompt: String,
    pub negative: String,
    pub params: Vec<(String, String)>,
}

impl Infotext {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

fn re_param() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r#"\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)"#).expect("valid")
    })
}

/// webui's `parse_generation_parameters` (the text part, without its defaults).
pub fn parse(text: &str) -> Infotext {
    let mut lines: Vec<&str> = text.trim().split('\n').collect();
    let mut last = lines.pop().unwrap_or("");
    if re_param().captures_iter(last).count() < 3 {
        lines.push(last);
        last = "";
    }
    let mut out = Infotext::default();
    let mut in_negative = false;
    for line in lines {
        let mut line = line.trim();
        if let Some(rest) = line.strip_prefix("Negative prompt:") {
            in_negative = true;
            line = rest.trim();
        }
        let target = if in_negative {
            &mut out.negative
        } else {
            &mut out.prompt
        };
        if !target.is_empty() {
            target.push('\n');
        }
        target.push_str(line);
    }
    for c in re_param().captures_iter(last) {
        out.params
            .push((c[1].trim().to_string(), unquote(c[2].trim())));
    }
    out
}

/// First 10 hex digits of the SHA-256 of a file (webui's "Model hash").
pub fn short_hash(path: &Path) -> io::Result<String> {
    Ok(sha256_hex(path)?[..10].to_string())
}

/// The SHA-256 of a file, 64 hex digits (read in 1 MiB pieces).
pub fn sha256_hex(path: &Path) -> io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Write an 8-bit RGB image with a `parameters` text chunk, atomically.
pub fn write_png(path: &Path, rgb: &[u8], width: u32, height: u32, text: &str) -> io::Result<()> {
    write_png_with(path, rgb, width, height, &[(KEY, text)])
}

/// Write an 8-bit RGB image with text chunks (`(keyword, text)`, in order), atomically.
pub fn write_png_with(
    path: &Path,
    rgb: &[u8],
    width: u32,
    height: u32,
    texts: &[(&str, &str)],
) -> io::Result<()> {
    if rgb.len() != width as usize * height as usize * 3 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "pixel buffer does not match the image size",
        ));
    }
    write_atomic_with(path, |w| {
        let mut enc = png::Encoder::new(w, width, height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, text) in texts {
            let latin1 = text.chars().all(|c| (c as u32) < 256);
            let r = if latin1 {
                enc.add_text_chunk(key.to_string(), text.to_string())
            } else {
                enc.add_itxt_chunk(key.to_string(), text.to_string())
            };
            r.map_err(io::Error::other)?;
        }
        let mut wr = enc.write_header().map_err(io::Error::other)?;
        wr.write_image_data(rgb).map_err(io::Error::other)?;
        wr.finish().map_err(io::Error::other)
    })
}

/// The `parameters` text of a PNG, if it has one (tEXt, zTXt or iTXt).
pub fn read_parameters(path: &Path) -> io::Result<Option<String>> {
    read_text(path, KEY)
}

/// The text chunk `key` of a PNG, if it has one (tEXt, zTXt or iTXt).
pub fn read_text(path: &Path, key: &str) -> io::Result<Option<String>> {
    let file = io::BufReader::new(std::fs::File::open(path)?);
    let dec = png::Decoder::new(file);
    let reader = dec.read_info().map_err(io::Error::other)?;
    let info = reader.info();
    if let Some(t) = info
        .uncompressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
    {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info
        .compressed_latin1_text
        .iter()
        .find(|t| t.keyword == key)
    {
        return t.get_text().map(Some).map_err(io::Error::other);
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == key) {
        return t.get_text().map(Some).map_err(io::Error::other);
    }
    Ok(None)
}

/// webui's "Model hash" (short SHA-256 of a checkpoint file; none for a diffusers folder)
/// and "Model" (the file or folder name without extension).
pub fn model_hash_and_name(path: &Path) -> io::Result<(Option<String>, String)> {
    let name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let hash = if path.is_dir() {
        None
    } else {
        Some(short_hash(path)?)
    };
    Ok((hash, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> GenParams {
        GenParams {
            prompt: "masterpiece, 1girl, (smile:1.2)".into(),
            negative: "lowres, bad hands".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.0,
            seed: 1,
            width: 512,
            height: 768,
            model_hash: Some("6ce0161689".into()),
            model: Some("v1-5-pruned-emaonly".into()),
            clip_skip: 2,
            extra: vec![],
        }
    }

    #[test]
    fn infotext_matches_webui_layout() {
        assert_eq!(
            sample().to_infotext(),
            "masterpiece, 1girl, (smile:1.2)\nNegative prompt: lowres, bad hands\n\
             Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, \
             Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2"
        );
        let mut p = sample();
        p.negative.clear();
        p.clip_skip = 1;
        p.cfg_scale = 7.5;
        p.model_hash = None;
        p.model = Some("odd, name: x".into());
        assert_eq!(
            p.to_infotext(),
            "masterpiece, 1girl, (smile:1.2)\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, \
             Seed: 1, Size: 512x768, Model: \"odd, name: x\""
        );
    }

    #[test]
    fn parse_round_trips() {
        let mut p = sample();
        p.prompt = "line one\nline two".into();
        p.negative = "neg a\nneg b".into();
        p.model = Some("quote \"me\", please".into());
        let t = parse(&p.to_infotext());
        assert_eq!(t.prompt, "line one\nline two");
        assert_eq!(t.negative, "neg a\nneg b");
        assert_eq!(t.get("Steps"), Some("20"));
        assert_eq!(t.get("Sampler"), Some("Euler a"));
        assert_eq!(t.get("Size"), Some("512x768"));
        assert_eq!(t.get("Model"), Some("quote \"me\", please"));
        assert_eq!(t.get("Clip skip"), Some("2"));
        // a prompt alone (no parameter line) stays the prompt
        assert_eq!(parse("just a prompt").prompt, "just a prompt");
    }

    #[test]
    fn png_chunk_round_trips_latin1_and_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let rgb: Vec<u8> = (0..4 * 3 * 3).map(|i| i as u8).collect();
        for text in [
            "café, 1girl\nSteps: 1, Sampler: DDIM, CFG scale: 7",
            "猫, 1girl\nSteps: 1",
        ] {
            let path = dir.path().join("a.png");
            write_png(&path, &rgb, 4, 3, text).unwrap();
            assert_eq!(read_parameters(&path).unwrap().as_deref(), Some(text));
            let img = image::open(&path).unwrap().to_rgb8();
            assert_eq!(img.as_raw(), &rgb);
        }
        assert!(write_png(&dir.path().join("b.png"), &rgb, 5, 3, "x").is_err());
    }

    #[test]
    fn short_hash_is_sha256_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, b"abc").unwrap();
        // sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
        assert_eq!(short_hash(&path).unwrap(), "ba7816bf8f");
    }
}
