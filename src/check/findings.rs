//! The findings model: what was found, where, how bad, and what to do about it.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing; training works.
    Info,
    /// Training works but the result likely suffers.
    Warn,
    /// kohya stops, or the data is unusable as it is.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warn => "warn",
            Severity::Error => "error",
        }
    }
}

/// Stable identifiers for scripts (`--json`) and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Code {
    NoImages,
    NotAConceptFolder,
    ZeroRepeats,
    IgnoredFile,
    UnreadableImage,
    SmallImage,
    MissingCaption,
    EmptyCaption,
    UnreadableCaption,
    SharedCaption,
    LongCaption,
    TriggerMissing,
    NoTrigger,
    TriggerInReg,
    TagInEveryCaption,
    NearDuplicate,
    FewImages,
    ManyImages,
    RegBalance,
    TinyBucket,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::NoImages => "no-images",
            Code::NotAConceptFolder => "not-a-concept-folder",
            Code::ZeroRepeats => "zero-repeats",
            Code::IgnoredFile => "ignored-file",
            Code::UnreadableImage => "unreadable-image",
            Code::SmallImage => "small-image",
            Code::MissingCaption => "missing-caption",
            Code::EmptyCaption => "empty-caption",
            Code::UnreadableCaption => "unreadable-caption",
            Code::SharedCaption => "shared-caption",
            Code::LongCaption => "long-caption",
            Code::TriggerMissing => "trigger-missing",
            Code::NoTrigger => "no-trigger",
            Code::TriggerInReg => "trigger-in-reg",
            Code::TagInEveryCaption => "tag-in-every-caption",
            Code::NearDuplicate => "near-duplicate",
            Code::FewImages => "few-images",
            Code::ManyImages => "many-images",
            Code::RegBalance => "reg-balance",
            Code::TinyBucket => "tiny-bucket",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: Code,
    /// The concept folder, relative to the checked folder (`.` for itself).
    pub folder: String,
    /// Files concerned, relative to the checked folder (may be empty).
    pub files: Vec<String>,
    pub message: String,
    /// What to do about it, concretely.
    pub suggestion: String,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub error: usize,
    pub warn: usize,
    pub info: usize,
}

impl Counts {
    pub fn of(findings: &[Finding]) -> Counts {
        let mut c = Counts::default();
        for f in findings {
            match f.severity {
                Severity::Error => c.error += 1,
                Severity::Warn => c.warn += 1,
                Severity::Info => c.info += 1,
            }
        }
        c
    }
}

/// Gathers findings; [`Collector::finish`] orders them by folder, then severity
/// (errors first), then code, keeping the order found within those.
#[derive(Debug, Default)]
pub struct Collector {
    items: Vec<Finding>,
}

impl Collector {
    pub fn push(
        &mut self,
        severity: Severity,
        code: Code,
        folder: String,
        files: Vec<String>,
        message: String,
        suggestion: String,
    ) {
        self.items.push(Finding {
            severity,
            code,
            folder,
            files,
            message,
            suggestion,
        });
    }

    pub fn finish(mut self) -> Vec<Finding> {
        self.items.sort_by(|a, b| {
            a.folder
                .cmp(&b.folder)
                .then(b.severity.cmp(&a.severity))
                .then(a.code.cmp(&b.code))
        });
        self.items
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_as_their_names() {
        for c in [
            Code::NearDuplicate,
            Code::TagInEveryCaption,
            Code::NotAConceptFolder,
        ] {
            assert_eq!(serde_json::to_value(c).unwrap(), c.as_str());
        }
        assert_eq!(serde_json::to_value(Severity::Warn).unwrap(), "warn");
    }

    #[test]
    fn sorted_by_folder_then_severity() {
        let mut c = Collector::default();
        let s = String::new;
        c.push(
            Severity::Info,
            Code::FewImages,
            "b".into(),
            vec![],
            s(),
            s(),
        );
        c.push(
            Severity::Warn,
            Code::MissingCaption,
            "a".into(),
            vec![],
            s(),
            s(),
        );
        c.push(
            Severity::Error,
            Code::UnreadableImage,
            "a".into(),
            vec![],
            s(),
            s(),
        );
        let f = c.finish();
        let got: Vec<_> = f.iter().map(|f| (f.folder.as_str(), f.severity)).collect();
        assert_eq!(
            got,
            [
                ("a", Severity::Error),
                ("a", Severity::Warn),
                ("b", Severity::Info)
            ]
        );
        assert_eq!(
            Counts::of(&f),
            Counts {
                error: 1,
                warn: 1,
                info: 1
            }
        );
    }
}
