//! Redaction of secret values from every text the operator captures from a run (result,
//! transcript, error messages, events, logs): a model can echo any value it was given.

/// Replaces each known secret value with a fixed marker. Values are matched longest
/// first, so a secret that contains another is not half-replaced.
#[derive(Clone, Debug, Default)]
pub struct Redactor {
    values: Vec<String>,
}

/// What a redacted value reads as.
pub const MARKER: &str = "[redacted]";

impl Redactor {
    /// Every value with a visible character counts, however short: over-redacting a
    /// common word is a nuisance, leaking a short secret is not acceptable. Surrounding
    /// whitespace (a trailing newline in a Secret created from a file) is matched without
    /// it too.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values
            .into_iter()
            .flat_map(|value| {
                let trimmed = value.trim().to_string();
                [value, trimmed]
            })
            .filter(|value| !value.trim().is_empty())
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Redactor { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    pub fn redact(&self, text: &str) -> String {
        let mut redacted = text.to_string();
        for value in &self.values {
            if redacted.contains(value.as_str()) {
                redacted = redacted.replace(value.as_str(), MARKER);
            }
        }
        redacted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_occurrence_of_every_value_is_replaced() {
        let redactor = Redactor::new(["sk-live-123".to_string(), "hunter2\n".to_string()]);
        assert_eq!(
            redactor.redact("key sk-live-123 and sk-live-123, password hunter2!"),
            "key [redacted] and [redacted], password [redacted]!"
        );
    }

    #[test]
    fn longer_values_win_over_their_substrings() {
        let redactor = Redactor::new(["abc".to_string(), "abcdef".to_string()]);
        assert_eq!(redactor.redact("xabcdefx abc"), "x[redacted]x [redacted]");
    }

    #[test]
    fn empty_values_are_ignored() {
        let redactor = Redactor::new([String::new(), "  ".to_string()]);
        assert!(redactor.is_empty());
        assert_eq!(redactor.redact("nothing to hide"), "nothing to hide");
    }
}
