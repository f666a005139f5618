//! Segmentation model family manifests (`models/u2net.yaml`, `isnet.yaml`,
//! `birefnet.yaml`, embedded at build time): the numbers of each family's rembg
//! contract, which the matting code reads rather than hard-codes, and the rules
//! `--matte-kind auto` uses to recognise a model.

/// A segmentation model family.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    U2net,
    Isnet,
    Birefnet,
}

impl Family {
    pub const ALL: [Family; 3] = [Family::Birefnet, Family::Isnet, Family::U2net];

    pub fn name(self) -> &'static str {
        match self {
            Family::U2net => "u2net",
            Family::Isnet => "isnet",
            Family::Birefnet => "birefnet",
        }
    }
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub family: Family,
    pub detect: Detect,
    pub input: Input,
    pub output: Output,
}

/// How `--matte-kind auto` recognises the family.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Detect {
    /// Substrings of the model file name (case-insensitive).
    #[serde(default)]
    pub file_names: Vec<String>,
    /// Exact output tensor names.
    #[serde(default)]
    pub output_names: Vec<String>,
    /// Square input side.
    pub input_size: u32,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Input {
    /// Square input side when the model's shape does not fix it.
    pub size: u32,
    /// Only `pillow-lanczos` (Pillow `Image.resize(..., LANCZOS)`) is defined.
    pub resize: String,
    pub divide_by_max: bool,
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Activation {
    None,
    Sigmoid,
}

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Output {
    /// Which model output holds the mask (channel 0 of it).
    pub index: usize,
    pub activation: Activation,
    /// Only `min-max` is defined.
    pub normalise: String,
    pub clip: bool,
    /// Only `pillow-lanczos` is defined.
    pub resize: String,
}

const U2NET: &str = include_str!("../../models/u2net.yaml");
const ISNET: &str = include_str!("../../models/isnet.yaml");
const BIREFNET: &str = include_str!("../../models/birefnet.yaml");

/// The manifest of a family.
pub fn manifest(f: Family) -> Manifest {
    let text = match f {
        Family::U2net => U2NET,
        Family::Isnet => ISNET,
        Family::Birefnet => BIREFNET,
    };
    // The files are part of the build and checked by a unit test.
    serde_yaml::from_str(text).expect("embedded models/*.yaml is valid")
}

/// `--matte-kind auto`: the model file name first, then output tensor names, then the
/// input size (320 is U^2-Net, 1024 is IS-Net unless named like BiRefNet). `None` when
/// nothing matches.
pub fn detect(file_name: &str, output_names: &[String], input_size: Option<u32>) -> Option<Family> {
    let lower = file_name.to_lowercase();
    let all: Vec<Manifest> = Family::ALL.iter().map(|f| manifest(*f)).collect();
    if let Some(m) = all.iter().find(|m| {
        m.detect
            .file_names
            .iter()
            .any(|n| lower.contains(&n.to_lowercase()))
    }) {
        return Some(m.family);
    }
    if let Some(m) = all.iter().find(|m| {
        m.detect
            .output_names
            .iter()
            .any(|n| output_names.iter().any(|o| o == n))
    }) {
        return Some(m.family);
    }
    let size = input_size?;
    // Families without name rules are the default for their size.
    all.iter()
        .filter(|m| m.detect.input_size == size)
        .min_by_key(|m| m.detect.output_names.len())
        .map(|m| m.family)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_parse_and_hold_rembg_numbers() {
        let u = manifest(Family::U2net);
        assert_eq!(u.family, Family::U2net);
        assert_eq!(u.input.size, 320);
        assert_eq!(u.input.mean, [0.485, 0.456, 0.406]);
        assert!(u.output.clip);
        let i = manifest(Family::Isnet);
        assert_eq!((i.input.size, i.input.std), (1024, [1.0; 3]));
        let b = manifest(Family::Birefnet);
        assert_eq!(b.output.activation, Activation::Sigmoid);
        for f in Family::ALL {
            let m = manifest(f);
            assert_eq!(m.family, f);
            assert_eq!(m.input.resize, "pillow-lanczos");
            assert_eq!(m.output.resize, "pillow-lanczos");
            assert_eq!(m.output.normalise, "min-max");
        }
    }

    #[test]
    fn detection_order() {
        let none: Vec<String> = vec![];
        assert_eq!(detect("u2netp.onnx", &none, Some(320)), Some(Family::U2net));
        assert_eq!(detect("silueta.onnx", &none, None), Some(Family::U2net));
        assert_eq!(
            detect("isnet-general-use.onnx", &none, Some(1024)),
            Some(Family::Isnet)
        );
        assert_eq!(
            detect("BiRefNet-general-epoch_244.onnx", &none, Some(1024)),
            Some(Family::Birefnet)
        );
        let out = vec!["output_image".to_string()];
        assert_eq!(
            detect("model.onnx", &out, Some(1024)),
            Some(Family::Birefnet)
        );
        assert_eq!(detect("model.onnx", &none, Some(1024)), Some(Family::Isnet));
        assert_eq!(detect("model.onnx", &none, Some(320)), Some(Family::U2net));
        assert_eq!(detect("model.onnx", &none, Some(512)), None);
        assert_eq!(detect("model.onnx", &none, None), None);
    }
}
