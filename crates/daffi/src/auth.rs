//! The shared secret a node presents in its `Hello`, and the controller's check of it.
//!
//! The controller compares tokens in constant time: how long the check takes depends on
//! the length of the controller's own token only, never on how much of a guess matched.

use std::fmt;
use std::sync::Arc;

/// The environment variable read when no token is given to the builder or the CLI.
pub const AUTH_TOKEN_ENV: &str = "DAFFI_AUTH_TOKEN";

/// A shared secret. Its `Debug` output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken(Arc<str>);

impl AuthToken {
    /// A token. An empty one protects nothing: [`AuthToken::is_empty`] lets the builder
    /// refuse it.
    pub fn new(token: &str) -> AuthToken {
        AuthToken(Arc::from(token))
    }

    /// Whether the token is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The token in [`AUTH_TOKEN_ENV`], if set and not empty.
    pub fn from_env() -> Option<AuthToken> {
        std::env::var(AUTH_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| AuthToken::new(&t))
    }

    /// The secret, to put in a `Hello`.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `given` is this token, in constant time. A missing token never matches.
    pub fn matches(&self, given: Option<&str>) -> bool {
        match given {
            Some(given) => constant_time_eq(given.as_bytes(), self.0.as_bytes()),
            None => false,
        }
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

/// Compares `given` with `expected` without an early exit: every byte of `expected` is
/// looked at whatever `given` holds, and differences (lengths included) are OR-folded.
/// The time taken depends on `expected.len()` alone.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, e) in expected.iter().enumerate() {
        // Which branch `get` takes depends on the length of the guess, which the peer
        // knows anyway, never on the secret's content.
        let g = given.get(i).copied().unwrap_or(0);
        diff |= usize::from(g ^ e);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_tokens_match() {
        assert!(constant_time_eq(b"s3cret", b"s3cret"));
        assert!(AuthToken::new("s3cret").matches(Some("s3cret")));
    }

    #[test]
    fn different_content_length_or_absence_do_not_match() {
        assert!(!constant_time_eq(b"s3creT", b"s3cret"));
        assert!(!constant_time_eq(b"s3cre", b"s3cret"));
        assert!(!constant_time_eq(b"s3crett", b"s3cret"));
        assert!(!constant_time_eq(b"", b"s3cret"));
        // A guess that is the secret followed by zero bytes must not match either.
        assert!(!constant_time_eq(b"s3cret\0", b"s3cret"));
        let t = AuthToken::new("s3cret");
        assert!(!t.matches(None));
        assert!(!t.matches(Some("")));
    }

    #[test]
    fn empty_tokens_are_flagged_and_debug_hides_the_secret() {
        assert!(AuthToken::new("").is_empty());
        let t = AuthToken::new("hunter2");
        assert!(!t.is_empty());
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
