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

    /// The token in [`AUTH_TOKEN_ENV`], if the variable is set. Set but empty (say, from
    /// a shell variable that was not set) or not UTF-8 is an error, never "no token": a
    /// typo must not turn authentication off.
    pub fn from_env() -> Result<Option<AuthToken>, String> {
        match std::env::var(AUTH_TOKEN_ENV) {
            Ok(t) if t.is_empty() => Err(format!(
                "{AUTH_TOKEN_ENV} is set but empty; unset it, or set it to the token"
            )),
            Ok(t) => Ok(Some(AuthToken::new(&t))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => {
                Err(format!("{AUTH_TOKEN_ENV} is not valid UTF-8"))
            }
        }
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
