//! Redaction of secret values from every text the operator captures from a run (result,
//! transcript, error messages, events, logs): a model can echo any value it was given,
//! and the texts carry it encoded as well as plain: JSON-escaped in a stream-json
//! transcript (a quote, a backslash, a newline), percent-encoded in a URL or a form.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

/// What JavaScript's `encodeURIComponent` leaves as it is; every other byte is escaped.
const URI_COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'!')
    .remove(b'~')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// Replaces each known secret value, and each of its encoded forms, with a fixed marker.
/// Values are matched longest first, so a secret that contains another is not
/// half-replaced.
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
    /// it too, and so is each form [`encodings`] gives.
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut values: Vec<String> = values
            .into_iter()
            .flat_map(|value| {
                let trimmed = value.trim().to_string();
                [value, trimmed]
            })
            .filter(|value| !value.trim().is_empty())
            .flat_map(|value| encodings(&value))
            .collect();
        values.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        values.dedup();
        Redactor { values }
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether any value (in any of its forms) occurs in `bytes`, text or not.
    pub fn occurs_in(&self, bytes: &[u8]) -> bool {
        self.values.iter().any(|value| {
            let value = value.as_bytes();
            !value.is_empty() && bytes.windows(value.len()).any(|window| window == value)
        })
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

/// A value as it appears plain, inside a JSON string (as serde and `JSON.stringify`
/// escape it, and with non-ASCII escaped too, as Python's `json.dumps` does), and
/// percent-encoded (strictly, as `encodeURIComponent` does, and as a form field).
pub fn encodings(value: &str) -> Vec<String> {
    let json = serde_json::to_string(value).expect("a string serializes");
    let json = json[1..json.len() - 1].to_string();
    let ascii_json: String = json
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                let mut units = [0u16; 2];
                c.encode_utf16(&mut units)
                    .iter()
                    .map(|unit| format!("\\u{unit:04x}"))
                    .collect()
            }
        })
        .collect();
    let strict = utf8_percent_encode(value, NON_ALPHANUMERIC).to_string();
    let component = utf8_percent_encode(value, URI_COMPONENT).to_string();
    let form = value
        .split(' ')
        .map(|part| utf8_percent_encode(part, URI_COMPONENT).to_string())
        .collect::<Vec<_>>()
        .join("+");
    let mut forms = vec![value.to_string(), json, ascii_json, strict, component, form];
    forms.sort();
    forms.dedup();
    forms
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

    #[test]
    fn json_escaped_forms_are_replaced() {
        let value = "pa\"ss\\wo\nrd\u{1}é";
        let redactor = Redactor::new([value.to_string()]);
        let transcript =
            serde_json::json!({"type": "result", "result": format!("it is {value}")}).to_string();
        assert!(
            !transcript.contains(value),
            "the value appears escaped only"
        );
        let redacted = redactor.redact(&transcript);
        assert_eq!(redacted, r#"{"result":"it is [redacted]","type":"result"}"#);
        // Python's json.dumps escapes non-ASCII characters as well.
        assert_eq!(
            redactor.redact(r#"{"v": "pa\"ss\\wo\nrd\u0001\u00e9"}"#),
            r#"{"v": "[redacted]"}"#
        );
    }

    #[test]
    fn percent_encoded_forms_are_replaced() {
        let redactor = Redactor::new(["a b/c?d=e&f'g".to_string()]);
        for encoded in [
            "https://x.test/?token=a%20b%2Fc%3Fd%3De%26f'g",
            "https://x.test/?token=a%20b%2Fc%3Fd%3De%26f%27g",
            "token=a+b%2Fc%3Fd%3De%26f'g",
        ] {
            let redacted = redactor.redact(encoded);
            assert!(redacted.contains(MARKER), "{encoded} → {redacted}");
            assert!(!redacted.contains("%2Fc%3Fd"), "{encoded} → {redacted}");
        }
    }
}
