//! The wire protocol: frames, control messages, and the framed reader and batching writer.
//! See `docs/PROTOCOL.md`.

pub mod frame;
pub mod io;
pub mod message;
pub mod payload;

pub use frame::{Frame, FrameError, Header, Kind};
pub use payload::Payload;

/// First bytes a node sends on a new connection: magic, then the protocol version.
pub const MAGIC: [u8; 4] = *b"DAFI";
/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// Default limit on one frame (prefix excluded): 128 MiB.
pub const DEFAULT_MAX_FRAME_SIZE: usize = 128 * 1024 * 1024;
/// Largest `Hello` frame (prefix excluded) a controller accepts, whatever its frame
/// limit: a peer that has not authenticated cannot make it buffer more. A node whose
/// callback list would not fit sends it in an `Announce` right after `Welcome`.
pub const MAX_HELLO_SIZE: usize = 1024 * 1024;
/// Longest process name the header can carry.
pub const MAX_PROCESS_NAME: usize = u8::MAX as usize;
/// Longest callback name the header can carry.
pub const MAX_CALLBACK_NAME: usize = u16::MAX as usize;

/// What a name names, for [`check_name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A node's process name.
    Process,
    /// A callback's name.
    Callback,
}

impl NameKind {
    fn noun(self) -> &'static str {
        match self {
            NameKind::Process => "process name",
            NameKind::Callback => "callback name",
        }
    }

    fn max_len(self) -> usize {
        match self {
            NameKind::Process => MAX_PROCESS_NAME,
            NameKind::Callback => MAX_CALLBACK_NAME,
        }
    }
}

/// Checks a process or callback name: 1 to its maximum bytes, and no control character
/// (nor a Unicode line or paragraph separator), since a newline in a name would forge a
/// line of every log that prints it. The one check of names, made by the builder and by
/// the controller; the error names the problem, with the name escaped.
pub fn check_name(kind: NameKind, name: &str) -> Result<(), String> {
    let noun = kind.noun();
    if name.is_empty() || name.len() > kind.max_len() {
        return Err(format!(
            "{noun}s must be 1 to {} bytes, got {}",
            kind.max_len(),
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'))
    {
        Some(c) => Err(format!(
            "the {noun} {name:?} contains the control character {c:?}; names must be printable"
        )),
        None => Ok(()),
    }
}

/// [`check_name`] for each of a node's callback names.
pub fn check_callback_names(names: &[String]) -> Result<(), String> {
    names
        .iter()
        .try_for_each(|n| check_name(NameKind::Callback, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_refused_for_control_characters_and_length() {
        assert_eq!(check_name(NameKind::Process, "calc-1.é"), Ok(()));
        let forged = check_name(NameKind::Process, "a\nINFO controller: forged").unwrap_err();
        assert!(
            forged.contains(r#""a\nINFO controller: forged""#),
            "escaped: {forged}"
        );
        assert!(!forged.contains('\n'));
        for bad in ["tab\there", "nul\0", "del\u{7f}", "c1\u{85}", "ls\u{2028}"] {
            assert!(check_name(NameKind::Callback, bad).is_err(), "{bad:?}");
        }
        assert!(check_name(NameKind::Callback, "").is_err());
        assert!(check_name(NameKind::Process, &"x".repeat(MAX_PROCESS_NAME + 1)).is_err());
        assert_eq!(
            check_name(NameKind::Process, &"x".repeat(MAX_PROCESS_NAME)),
            Ok(())
        );
        assert!(check_callback_names(&["ok".into(), "bad\r".into()]).is_err());
    }
}
