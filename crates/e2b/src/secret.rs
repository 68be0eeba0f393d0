//! A string that must never reach logs, `Debug` output or error messages.

use std::fmt;

/// Holds an API key or an access token. `Debug` and `Display` print a placeholder, so a
/// config or client can be logged whole without leaking it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The raw value, for the one place that puts it on the wire.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Replaces every occurrence of the secret in text that came from elsewhere (a server
    /// might echo a key back in an error message).
    pub fn scrub(&self, text: &str) -> String {
        if self.0.is_empty() {
            text.to_owned()
        } else {
            text.replace(&self.0, "<redacted>")
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Secret(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed_and_scrubbed_from_echoes() {
        let key = Secret::new("e2b_0123456789");
        assert_eq!(format!("{key:?} {key}"), "<redacted> <redacted>");
        assert_eq!(
            key.scrub("bad key e2b_0123456789 given"),
            "bad key <redacted> given"
        );
        assert_eq!(Secret::new("").scrub("as is"), "as is");
    }
}
