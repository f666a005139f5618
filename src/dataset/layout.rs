//! kohya folder layout (`img/<repeats>_<name>`, `reg/<repeats>_<class>`), stable
//! unique output names, and kohya's regularisation balance.

/// A name safe for file systems: letters (any script), digits, `-`, `_`, `.` and
/// spaces kept; everything else becomes `_`. Never empty.
pub fn safe_stem(stem: &str) -> String {
    let s: String = stem
        .chars()
        .map(|c| {
            if c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | ' ') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let s = s.trim_matches(|c: char| c == '.' || c == ' ').to_string();
    let s: String = s.chars().take(80).collect();
    if s.is_empty() { "image".to_string() } else { s }
}

/// Output base name of a source: its stem plus six hex digits of a hash of its
/// relative path, so `a.jpg` and `a.png` (or two `a.jpg` in different folders) never
/// share a caption file, and the name stays the same on every run.
pub fn output_base(rel: &str) -> String {
    let stem = rel.rsplit('/').next().unwrap_or(rel);
    let stem = stem.rsplit_once('.').map(|(s, _)| s).unwrap_or(stem);
    let h = blake3::hash(rel.as_bytes()).to_hex();
    format!("{}-{}", safe_stem(stem), &h[..6])
}

/// kohya's concept folder name.
pub fn concept_dir(repeats: u32, name: &str) -> String {
    format!("{repeats}_{name}")
}

/// Repeats for a regularisation folder of `reg_images` so that reg samples per epoch
/// reach the `train_samples` (training images x repeats): kohya registers reg images
/// round-robin until their count reaches the training count and ignores the rest, so
/// `ceil(T / R)` repeats use every reg image and balance the two.
pub fn reg_repeats(train_samples: u64, reg_images: u64) -> u32 {
    if reg_images == 0 {
        return 1;
    }
    train_samples.div_ceil(reg_images).max(1) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_unique_and_stable() {
        assert_eq!(safe_stem("my photo: 1/2?"), "my photo_ 1_2_");
        assert_eq!(safe_stem("貓咪"), "貓咪");
        assert_eq!(safe_stem("..."), "image");
        let a = output_base("in/a.jpg");
        let b = output_base("in/a.png");
        assert_ne!(a, b);
        assert!(a.starts_with("a-") && a.len() == 8);
        assert_eq!(a, output_base("in/a.jpg"));
    }

    #[test]
    fn reg_balance_follows_kohya() {
        // 15 training images x 10 repeats = 150 samples; 700 reg images -> 1 repeat.
        assert_eq!(reg_repeats(150, 700), 1);
        // 20 x 10 = 200 samples; 60 reg images -> 4 repeats (240 >= 200).
        assert_eq!(reg_repeats(200, 60), 4);
        assert_eq!(reg_repeats(200, 50), 4);
        assert_eq!(reg_repeats(0, 5), 1);
    }
}
