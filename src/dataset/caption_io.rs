//! Caption files as users have them: `<image stem>.txt` (or `.caption`), UTF-8 with or
//! without a BOM, LF or CRLF line ends. kohya reads the first line; sdkit edits the
//! first line and keeps the rest of the file, the BOM and the line-end style as found.
//! Invalid UTF-8 is an error and the file is left untouched.

use std::path::{Path, PathBuf};

const BOM: &str = "\u{feff}";

#[derive(Debug, thiserror::Error)]
pub enum CaptionError {
    #[error("{}: cannot read caption: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: caption is not valid UTF-8 (byte {offset}); left untouched", path.display())]
    InvalidUtf8 { path: PathBuf, offset: usize },
    #[error("{}: cannot write caption: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A caption file's content split into the caption line and what surrounds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caption {
    /// The first line, without its line end.
    pub text: String,
    /// Everything after the first line end, verbatim (usually empty).
    pub rest: String,
    pub bom: bool,
    pub crlf: bool,
}

impl Caption {
    pub fn new(text: impl Into<String>) -> Caption {
        Caption {
            text: text.into(),
            ..Caption::default()
        }
    }

    /// Parses file content.
    pub fn parse(content: &str) -> Caption {
        let (bom, body) = match content.strip_prefix(BOM) {
            Some(b) => (true, b),
            None => (false, content),
        };
        let (first, rest) = match body.find('\n') {
            Some(i) => (&body[..i], &body[i + 1..]),
            None => (body, ""),
        };
        let crlf = first.ends_with('\r');
        let text = first.strip_suffix('\r').unwrap_or(first);
        Caption {
            text: text.to_string(),
            rest: rest.to_string(),
            bom,
            crlf,
        }
    }

    /// File content: BOM and line-end style as read; a single line gets no newline.
    pub fn render(&self) -> String {
        let mut s = String::with_capacity(self.text.len() + self.rest.len() + 5);
        if self.bom {
            s.push_str(BOM);
        }
        s.push_str(&self.text);
        if !self.rest.is_empty() {
            s.push_str(if self.crlf { "\r\n" } else { "\n" });
            s.push_str(&self.rest);
        }
        s
    }

    /// The caption's tags: split on `,`, trimmed, empty ones dropped.
    pub fn tags(&self) -> Vec<String> {
        split_tags(&self.text)
    }

    pub fn set_tags(&mut self, tags: &[String]) {
        self.text = join_tags(tags);
    }
}

pub fn split_tags(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .collect()
}

pub fn join_tags(tags: &[String]) -> String {
    tags.join(", ")
}

/// Reads a caption file; `Ok(None)` when it does not exist.
pub fn read_caption(path: &Path) -> Result<Option<Caption>, CaptionError> {
    Ok(read_caption_text(path)?.map(|s| Caption::parse(&s)))
}

/// Reads a caption file's exact text (BOM included); `Ok(None)` when it does not exist.
pub fn read_caption_text(path: &Path) -> Result<Option<String>, CaptionError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CaptionError::Read {
                path: path.into(),
                source,
            });
        }
    };
    match String::from_utf8(bytes) {
        Ok(s) => Ok(Some(s)),
        Err(e) => Err(CaptionError::InvalidUtf8 {
            path: path.into(),
            offset: e.utf8_error().valid_up_to(),
        }),
    }
}

/// Writes a caption atomically.
pub fn write_caption(path: &Path, caption: &Caption) -> Result<(), CaptionError> {
    crate::util::write_atomic(path, caption.render().as_bytes()).map_err(|source| {
        CaptionError::Write {
            path: path.into(),
            source,
        }
    })
}

/// The caption path for an image: its extension replaced by `ext` (`.txt`, `caption`).
pub fn caption_path(image: &Path, ext: &str) -> PathBuf {
    image.with_extension(ext.trim_start_matches('.'))
}

/// The first existing sidecar caption of `image` among `exts`, in order.
pub fn find_sidecar(image: &Path, exts: &[String]) -> Option<PathBuf> {
    exts.iter()
        .map(|e| caption_path(image, e))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_bom_crlf_and_extra_lines() {
        for content in [
            "a, b",
            "\u{feff}a, b",
            "a, b\r\nsecond\r\n",
            "a,b\nmore",
            "",
            "x\n",
        ] {
            let c = Caption::parse(content);
            let mut expect = content.to_string();
            // A lone trailing newline after one line is not kept.
            if expect == "x\n" {
                expect = "x".into();
            }
            assert_eq!(c.render(), expect, "{content:?}");
        }
        let c = Caption::parse("\u{feff}red hair ,  smile,,\r\n");
        assert!(c.bom && c.crlf);
        assert_eq!(c.tags(), vec!["red hair", "smile"]);
    }

    #[test]
    fn invalid_utf8_is_reported_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.txt");
        std::fs::write(&p, b"ok, \xff\xfe bad").unwrap();
        let e = read_caption(&p).unwrap_err();
        assert!(e.to_string().contains("not valid UTF-8"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"ok, \xff\xfe bad");
        assert!(
            read_caption(&dir.path().join("missing.txt"))
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn sidecar_lookup_follows_order() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.jpg");
        std::fs::write(dir.path().join("a.caption"), "c").unwrap();
        let exts = vec![".txt".to_string(), ".caption".to_string()];
        assert_eq!(
            find_sidecar(&img, &exts),
            Some(dir.path().join("a.caption"))
        );
        std::fs::write(dir.path().join("a.txt"), "t").unwrap();
        assert_eq!(find_sidecar(&img, &exts), Some(dir.path().join("a.txt")));
    }
}
