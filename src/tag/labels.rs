//! Label files: DeepDanbooru `tags.txt` (one tag per line) and WD14
//! `selected_tags.csv` (`tag_id,name,category,count`; category 9 = rating,
//! 0 = general, 4 = character).

use std::path::{Path, PathBuf};

/// What a tag is, for thresholds and ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    General,
    Character,
    Rating,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The tag as the model's label file spells it (underscores kept).
    pub name: String,
    pub category: Category,
}

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error("{}: cannot read labels: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: line {line}: {reason}", path.display())]
    Bad {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no labels in file", path.display())]
    Empty { path: PathBuf },
}

/// Reads `tags.txt` or `selected_tags.csv`, chosen by the extension (`.csv` = WD14).
pub fn read_labels(path: &Path) -> Result<Vec<Label>, LabelError> {
    let text = std::fs::read_to_string(path).map_err(|source| LabelError::Read {
        path: path.into(),
        source,
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let is_csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    let labels = if is_csv {
        parse_csv(text).map_err(|(line, reason)| LabelError::Bad {
            path: path.into(),
            line,
            reason,
        })?
    } else {
        parse_txt(text)
    };
    if labels.is_empty() {
        return Err(LabelError::Empty { path: path.into() });
    }
    Ok(labels)
}

/// `tags.txt`: one tag per line, blank lines skipped; `rating:*` tags are ratings.
pub fn parse_txt(text: &str) -> Vec<Label> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| Label {
            name: l.to_string(),
            category: if l.starts_with("rating:") {
                Category::Rating
            } else {
                Category::General
            },
        })
        .collect()
}

/// `selected_tags.csv` with a header naming `name` and `category` columns.
pub fn parse_csv(text: &str) -> Result<Vec<Label>, (usize, String)> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines.next().ok_or((1, "empty file".to_string()))?;
    let header = split_csv(header);
    let col = |name: &str| header.iter().position(|h| h.trim() == name);
    let (Some(ni), Some(ci)) = (col("name"), col("category")) else {
        return Err((
            1,
            format!(
                "header must have `name` and `category` columns (tag_id,name,category,count), found {:?}",
                header
            ),
        ));
    };
    let mut out = Vec::new();
    for (i, line) in lines {
        let f = split_csv(line);
        let (Some(name), Some(cat)) = (f.get(ni), f.get(ci)) else {
            return Err((i + 1, format!("expected {} columns", header.len())));
        };
        let category = match cat.trim() {
            "9" => Category::Rating,
            "4" => Category::Character,
            c if c.parse::<i64>().is_ok() => Category::General,
            c => return Err((i + 1, format!("category '{c}' is not a number"))),
        };
        out.push(Label {
            name: name.clone(),
            category,
        });
    }
    Ok(out)
}

/// Splits one CSV record; double-quoted fields may hold commas and `""` quotes.
fn split_csv(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', true) => quoted = false,
            ('"', false) if cur.is_empty() => quoted = true,
            (',', false) => fields.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    fields.push(cur);
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_categories_and_quotes() {
        let t =
            "tag_id,name,category,count\r\n1,general,9,10\r\n2,\"a,b\",0,5\n3,hatsune_miku,4,3\n";
        let l = parse_csv(t).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].category, Category::Rating);
        assert_eq!(l[1].name, "a,b");
        assert_eq!(l[2].category, Category::Character);
        assert!(parse_csv("id,tag\n1,x\n").is_err());
        assert_eq!(parse_csv("name,category\nx,zz\n").unwrap_err().0, 2);
    }

    #[test]
    fn txt_ratings() {
        let l = parse_txt("1girl\n\nrating:safe\nsolo\n");
        assert_eq!(l.len(), 3);
        assert_eq!(l[1].category, Category::Rating);
    }
}
