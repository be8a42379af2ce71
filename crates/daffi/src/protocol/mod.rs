//! The wire protocol: frames, control messages, and the framed reader and batching writer.
//! See `docs/PROTOCOL.md`.

#[cfg(test)]
mod golden;
pub mod message;

use daffi_wire::frame::{MAX_CALLBACK_NAME, MAX_PROCESS_NAME};
use daffi_wire::{preamble, Kind, PROTOCOL_VERSION};
/// Largest `Hello` frame (prefix excluded) a controller accepts, whatever its frame
/// limit: 4 KiB. Until a peer has shown the auth token, the controller buffers no more
/// than this (and the preamble) for it.
pub const MAX_HELLO_SIZE: usize = 4 * 1024;
/// Longest auth token, in bytes: with the longest process name, it leaves a `Hello` far
/// under [`MAX_HELLO_SIZE`].
pub const MAX_AUTH_TOKEN: usize = 1024;
/// The most a node's callback names may take together, each name counting its length
/// plus 4 bytes ([`callback_list_size`]): 1 MiB. A frame limit under 1 MiB + 512 bytes
/// lowers it ([`callback_list_limit`]).
pub const MAX_CALLBACK_LIST: usize = 1024 * 1024;
/// What a frame carrying one member (a `Membership` event, an `Announce`) needs beyond
/// its callback list: header, keys, the process name. The frame limit leaves this much.
pub const MEMBER_OVERHEAD: usize = 512;
/// What a frame carrying one scheduled task (a `Schedule` event, a `Welcome` page, a
/// `Restore`) needs beyond the task's entry ([`TaskEntry::size_bound`]): header, keys,
/// the sender's name. A schedule whose entry would not leave this much of the frame
/// limit is refused.
///
/// [`TaskEntry::size_bound`]: message::TaskEntry::size_bound
pub const TASK_OVERHEAD: usize = 512;
/// Largest task id: ids are random from 1 to 2^53 - 1, so that JSON numbers (and Python
/// floats) carry them exactly.
pub const MAX_TASK_ID: u64 = (1 << 53) - 1;

/// What a node sends first, in one write: the preamble, its `Hello`, and the `Announce`
/// of `callbacks`. The controller reads the `Announce` only once the `Hello` checked
/// out, and the node joins with its callbacks at once (no round trip more).
pub fn opening(hello: &message::Hello, callbacks: Vec<String>) -> Vec<u8> {
    let hello = message::control_frame(Kind::Hello, hello);
    let announce = message::control_frame(Kind::Announce, &message::Announce { callbacks });
    let preamble = preamble(PROTOCOL_VERSION);
    let mut bytes = Vec::with_capacity(preamble.len() + hello.len() + announce.len());
    bytes.extend_from_slice(&preamble);
    hello.copy_to(&mut bytes);
    announce.copy_to(&mut bytes);
    bytes
}

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

/// What a node's callback names take against [`MAX_CALLBACK_LIST`]: each name's length
/// plus 4 bytes (more than MessagePack adds to each, so that the list always fits).
pub fn callback_list_size<S: AsRef<str>>(names: &[S]) -> usize {
    names.iter().map(|n| n.as_ref().len() + 4).sum()
}

/// The most a node's callback names may take with frames of up to `max_frame_size`:
/// [`MAX_CALLBACK_LIST`], or less, so that every frame carrying them fits.
pub fn callback_list_limit(max_frame_size: usize) -> usize {
    MAX_CALLBACK_LIST.min(max_frame_size.saturating_sub(MEMBER_OVERHEAD))
}

/// A node's callback names take more than [`callback_list_limit`] allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallbackListTooLarge {
    /// What the names take ([`callback_list_size`]).
    pub size: usize,
    /// What they may take.
    pub limit: usize,
}

impl std::fmt::Display for CallbackListTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the callback names take {} bytes (each name counts its length plus 4), over the limit of {} bytes",
            self.size, self.limit
        )
    }
}

/// Checks that `names` fit [`callback_list_limit`] for `max_frame_size`.
pub fn check_callback_list<S: AsRef<str>>(
    names: &[S],
    max_frame_size: usize,
) -> Result<(), CallbackListTooLarge> {
    let size = callback_list_size(names);
    let limit = callback_list_limit(max_frame_size);
    match size <= limit {
        true => Ok(()),
        false => Err(CallbackListTooLarge { size, limit }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use daffi_wire::frame::LEN_PREFIX;
    use daffi_wire::Header;

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

    /// The frames that carry one member's callbacks fit the frame limit whenever the
    /// list fits its limit: the longest process name, names of every length class.
    #[test]
    fn a_member_within_the_callback_list_limit_fits_a_frame() {
        use message::{Announce, Member, MembershipEvent};
        for max_frame_size in [1024, 64 * 1024, 2 * 1024 * 1024] {
            let limit = callback_list_limit(max_frame_size);
            let mut callbacks = Vec::new();
            let lengths = [1, 31, 32, 255, 256, MAX_CALLBACK_NAME];
            for len in lengths.iter().cycle() {
                let name = "x".repeat(*len);
                if callback_list_size(&callbacks) + len + 4 > limit {
                    break;
                }
                callbacks.push(name);
            }
            let full = callback_list_size(&callbacks);
            callbacks.extend((full..limit).step_by(5).map(|_| "a".to_string()));
            while callback_list_size(&callbacks) > limit {
                callbacks.pop();
            }
            assert_eq!(check_callback_list(&callbacks, max_frame_size), Ok(()));
            let member = Member {
                name: "p".repeat(MAX_PROCESS_NAME),
                callbacks: callbacks.clone(),
            };
            let frame_size = |kind: Kind, body: bytes::Bytes| {
                Header::control(kind).frame_len(body.len()) - LEN_PREFIX
            };
            let joined = message::encode(&MembershipEvent::Joined(member));
            assert!(frame_size(Kind::Membership, joined) <= max_frame_size);
            let announce = message::encode(&Announce { callbacks });
            assert!(frame_size(Kind::Announce, announce) <= max_frame_size);
        }
        let over = vec!["y".repeat(100); 20];
        assert_eq!(
            check_callback_list(&over, 2560),
            Err(CallbackListTooLarge {
                size: 2080,
                limit: 2048
            })
        );
    }
}
