//! Textual-inversion training prompts: template files of lines with `[name]` (the
//! embedding's name) and `[filewords]` (the image's caption); each sample takes a random
//! line (webui's rule). The project's own `subject` and `style` files are built in.
//! Without a template, captions are used as they are with the trigger word replaced by
//! the embedding's name.

use super::rng::Rng;
use std::path::Path;

/// Lines for photos of one subject.
pub const SUBJECT: &str = include_str!("../../templates/subject.txt");
/// Lines for an art style.
pub const STYLE: &str = include_str!("../../templates/style.txt");

/// The non-empty lines of a template text, trimmed.
pub fn template_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// `subject`, `style` or a template file's path -> its lines. Errors name the file.
pub fn load_template(spec: &str) -> Result<Vec<String>, String> {
    let lines = match spec {
        "subject" => template_lines(SUBJECT),
        "style" => template_lines(STYLE),
        path => {
            let text = std::fs::read_to_string(Path::new(path)).map_err(|e| {
                format!("--template {path}: cannot read ({e}); use subject, style or a file")
            })?;
            template_lines(&text)
        }
    };
    if lines.is_empty() {
        return Err(format!("--template {spec}: no lines"));
    }
    if !lines.iter().any(|l| l.contains("[name]")) {
        return Err(format!(
            "--template {spec}: no line has [name], so the embedding would never be trained"
        ));
    }
    Ok(lines)
}

/// A training prompt: a random line with `[name]` and `[filewords]` filled in.
pub fn template_caption(lines: &[String], name: &str, filewords: &str, rng: &mut Rng) -> String {
    if lines.is_empty() {
        return filewords.to_string();
    }
    let line = &lines[rng.below(lines.len() as u64) as usize];
    line.replace("[filewords]", filewords)
        .replace("[name]", name)
}

/// `caption` with every whole-word `trigger` (case-insensitive) replaced by `name`.
pub fn replace_trigger(caption: &str, trigger: &str, name: &str) -> String {
    if trigger.is_empty() {
        return caption.to_string();
    }
    let re = regex::Regex::new(&format!(
        r"(?i)(^|[^\w]){}($|[^\w])",
        regex::escape(trigger)
    ))
    .expect("escaped pattern");
    // Twice: adjacent matches share a separator, which the first pass consumes.
    let once = re.replace_all(caption, |c: &regex::Captures| {
        format!("{}{name}{}", &c[1], &c[2])
    });
    re.replace_all(&once, |c: &regex::Captures| {
        format!("{}{name}{}", &c[1], &c[2])
    })
    .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_templates_name_the_embedding_on_every_line() {
        for (t, words) in [(SUBJECT, true), (STYLE, true)] {
            let lines = template_lines(t);
            assert!(lines.len() >= 15);
            assert!(lines.iter().all(|l| l.contains("[name]")));
            assert_eq!(lines.iter().all(|l| l.contains("[filewords]")), words);
        }
        assert!(load_template("subject").is_ok());
        let e = load_template("/no/such/template.txt").unwrap_err();
        assert!(e.contains("/no/such/template.txt"), "{e}");
    }

    #[test]
    fn captions_fill_both_fields_and_vary_with_the_rng() {
        let lines = template_lines("a photo of [name], [filewords]\n[filewords] by [name]\n");
        let mut rng = Rng::new(3);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..40 {
            let c = template_caption(&lines, "myemb", "red hat", &mut rng);
            assert!(
                c == "a photo of myemb, red hat" || c == "red hat by myemb",
                "{c}"
            );
            seen.insert(c);
        }
        assert_eq!(seen.len(), 2);
    }

    #[test]
    fn trigger_replaced_as_a_whole_word() {
        assert_eq!(
            replace_trigger("ohwx, Ohwx man, ohwxy, ohwx ohwx", "ohwx", "myemb"),
            "myemb, myemb man, ohwxy, myemb myemb"
        );
    }
}
