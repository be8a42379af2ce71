//! The subjects and KV keys of one mesh on a NATS cluster, and the escaping that turns
//! any process or callback name into one valid subject token (and KV key).
//!
//! - `<ns>.node.<process>.<callback>`: requests to one node (random choice, `.on`,
//!   broadcast); each node subscribes to `<ns>.node.<itself>.*`.
//! - `<ns>.node.<process>.~streams`: the messages of streams in progress to one node
//!   (credit, cancel, probes; see `streams`).
//! - `<ns>.alive.<process>.<instance>`: each run of a node answers probes there.
//! - `<ns>.lease`: the holder of the scheduler lease announces it there.
//! - `<ns>.lease.holder`: the holder of the scheduler lease answers probes there.
//! - KV bucket `<ns>-alive`: key = the escaped process name (its claim and heartbeat).
//! - KV bucket `<ns>-nodes`: `n.<process>` (a node and its callbacks) and
//!   `c.<callback>.<process>` (one provider of a callback), names escaped.

use std::borrow::Cow;
use std::fmt::Write;

/// The last token of the subject where a node takes the messages of its streams in
/// progress: never an escaped name, since [`escape`] escapes `~`.
pub const STREAMS_TOKEN: &str = "~streams";

/// The byte that starts an escape (`=XX`, two upper-case hex digits); valid in subject
/// tokens and in KV keys alike.
const ESCAPE: u8 = b'=';

/// Escapes `name` into one subject token that is also a valid KV key: ASCII letters,
/// digits, `-` and `_` stay; every other byte (dots, spaces, `*`, `>`, `=`, non-ASCII)
/// becomes `=XX`. Reversible with [`unescape`]; the empty name becomes `=`.
pub fn escape(name: &str) -> String {
    if name.is_empty() {
        return "=".into();
    }
    let mut token = String::with_capacity(name.len());
    for &b in name.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            token.push(char::from(b));
        } else {
            let _ = write!(token, "={b:02X}");
        }
    }
    token
}

/// The name [`escape`] made `token` from; `None` if `token` is no escaped name.
pub fn unescape(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    let bytes = token.as_bytes();
    let mut name = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == ESCAPE {
            let hex = token.get(i + 1..i + 3)?;
            name.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            name.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(name).ok()
}

/// Checks a namespace: it names subjects and a KV bucket, so it is one token of ASCII
/// letters, digits, `-` and `_`.
pub fn check_namespace(namespace: &str) -> Result<(), String> {
    let valid = !namespace.is_empty()
        && namespace
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(format!(
            "namespace `{namespace}` must be non-empty ASCII letters, digits, `-` or `_` (it names NATS subjects and a KV bucket)"
        ))
    }
}

/// The subjects of one mesh (one namespace).
#[derive(Debug, Clone)]
pub struct Subjects {
    namespace: String,
}

impl Subjects {
    /// The subjects of the mesh `namespace` (checked with [`check_namespace`]).
    pub fn new(namespace: &str) -> Subjects {
        Subjects {
            namespace: namespace.to_string(),
        }
    }

    /// Where requests for `callback` on `process` go.
    pub fn node_call(&self, process: &str, callback: &str) -> String {
        format!(
            "{}.node.{}.{}",
            self.namespace,
            escape(process),
            escape(callback)
        )
    }

    /// Where the messages of streams in progress to `process` go (see [`STREAMS_TOKEN`]).
    pub fn node_streams(&self, process: &str) -> String {
        format!(
            "{}.node.{}.{STREAMS_TOKEN}",
            self.namespace,
            escape(process)
        )
    }

    /// What `process` subscribes to for the requests sent to it.
    pub fn node_inbox(&self, process: &str) -> String {
        format!("{}.node.{}.*", self.namespace, escape(process))
    }

    /// Where the run `instance` of `process` answers probes: whether anybody listens
    /// there tells whether that run is alive.
    pub fn node_alive(&self, process: &str, instance: u64) -> String {
        format!("{}.alive.{}.{instance}", self.namespace, escape(process))
    }

    /// The inbox of `process` under `inbox` (unique to the node): replies and acks to
    /// its calls come to `<inbox>.<escaped process>.<token>`, which names the caller
    /// without a header.
    pub fn reply_inbox(inbox: &str, process: &str) -> String {
        format!("{inbox}.{}", escape(process))
    }

    /// The process whose call awaits its reply (or ack) on `reply` (a subject under a
    /// [`Subjects::reply_inbox`]).
    pub fn caller_of(reply: &str) -> Option<String> {
        unescape(reply.rsplit('.').nth(1)?)
    }

    /// The name a token of a subject stands for: the token itself when it has no
    /// escapes (a request's callback, per call: no copy), else [`unescape`]d.
    pub fn name_of(token: &str) -> Option<Cow<'_, str>> {
        if token.as_bytes().contains(&ESCAPE) {
            unescape(token).map(Cow::Owned)
        } else {
            Some(Cow::Borrowed(token))
        }
    }

    /// Where the holder of the scheduler lease announces its renewals and release
    /// (see `schedules`).
    pub fn lease(&self) -> String {
        format!("{}.lease", self.namespace)
    }

    /// Where the holder of the scheduler lease (only it) answers probes: whether
    /// anybody listens there tells whether the lease has a living holder.
    pub fn lease_holder(&self) -> String {
        format!("{}.lease.holder", self.namespace)
    }

    /// The KV bucket of the nodes' claims on their names, renewed by their heartbeats.
    pub fn alive_bucket(&self) -> String {
        format!("{}-alive", self.namespace)
    }

    /// The KV bucket of the nodes and the providers of each callback.
    pub fn nodes_bucket(&self) -> String {
        format!("{}-nodes", self.namespace)
    }
}

/// The key of `process`'s entry in the nodes bucket.
pub fn node_key(process: &str) -> String {
    format!("n.{}", escape(process))
}

/// The key that says `process` serves `callback`, in the nodes bucket.
pub fn provider_key(callback: &str, process: &str) -> String {
    format!("c.{}.{}", escape(callback), escape(process))
}

/// The keys of the nodes bucket that hold every node.
pub const EVERY_NODE: &str = "n.*";

/// The keys of the nodes bucket that hold the providers of `callback`.
pub fn providers_of(callback: &str) -> String {
    format!("c.{}.*", escape(callback))
}

/// What a key of the nodes bucket names.
#[derive(Debug, PartialEq, Eq)]
pub enum NodesKey {
    /// `n.<process>`.
    Node(String),
    /// `c.<callback>.<process>`.
    Provider { callback: String, process: String },
}

/// The names in a key of the nodes bucket; `None` for a key no node wrote.
pub fn parse_nodes_key(key: &str) -> Option<NodesKey> {
    let mut tokens = key.split('.');
    let parsed = match (tokens.next()?, tokens.next()?, tokens.next()) {
        ("n", process, None) => NodesKey::Node(unescape(process)?),
        ("c", callback, Some(process)) => NodesKey::Provider {
            callback: unescape(callback)?,
            process: unescape(process)?,
        },
        _ => return None,
    };
    tokens.next().is_none().then_some(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_one_valid_token(token: &str) -> bool {
        !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_graphic() && !matches!(b, b'.' | b'*' | b'>'))
    }

    #[test]
    fn every_name_escapes_into_one_valid_token_and_back() {
        let names = [
            "plain",
            "with.dots.in",
            "with space",
            "star*",
            "gt>",
            "=already=",
            "ünïcødé 名前",
            "",
            "a-b_c",
            "tab\tand\nnewline",
        ];
        for name in names {
            let token = escape(name);
            assert!(is_one_valid_token(&token), "{name:?} -> {token:?}");
            assert_eq!(unescape(&token).as_deref(), Some(name), "{token:?}");
        }
        assert_eq!(escape("a-b_c"), "a-b_c", "safe names stay readable");
        assert_ne!(escape("a.b"), escape("a=2Eb"), "escapes never collide");
    }

    #[test]
    fn tokens_that_no_name_escapes_to_are_refused() {
        for token in ["=", "=4", "=ZZ", "=FF"] {
            let back = unescape(token);
            assert!(token == "=" || back.is_none(), "{token:?} -> {back:?}");
        }
    }

    #[test]
    fn a_request_subject_names_its_callback() {
        let s = Subjects::new("daffi");
        let subject = s.node_call("w.1", "f*.g");
        assert_eq!(subject, "daffi.node.w=2E1.f=2A=2Eg");
        let token = subject.rsplit('.').next().expect("a token");
        assert_eq!(Subjects::name_of(token).as_deref(), Some("f*.g"));
        assert!(matches!(
            Subjects::name_of("plain_name"),
            Some(Cow::Borrowed("plain_name"))
        ));
        assert_eq!(s.node_inbox("w.1"), "daffi.node.w=2E1.*");
        assert_eq!(s.node_streams("w.1"), "daffi.node.w=2E1.~streams");
        assert_ne!(
            escape(STREAMS_TOKEN),
            STREAMS_TOKEN,
            "no callback takes its token"
        );
        assert_eq!(s.node_alive("w.1", 7), "daffi.alive.w=2E1.7");
        let inbox = Subjects::reply_inbox("_INBOX.abc", "c a.1");
        assert_eq!(inbox, "_INBOX.abc.c=20a=2E1");
        assert_eq!(
            Subjects::caller_of(&format!("{inbox}.17")).as_deref(),
            Some("c a.1")
        );
    }

    #[test]
    fn nodes_bucket_keys_name_their_process_and_callback() {
        assert_eq!(node_key("w.1"), "n.w=2E1");
        assert_eq!(provider_key("f*", "w.1"), "c.f=2A.w=2E1");
        assert_eq!(
            parse_nodes_key(&node_key("w.1")),
            Some(NodesKey::Node("w.1".into()))
        );
        assert_eq!(
            parse_nodes_key(&provider_key("f.g", "w 1")),
            Some(NodesKey::Provider {
                callback: "f.g".into(),
                process: "w 1".into()
            })
        );
        for bad in ["x.a", "n.a.b", "c.a", "c.a.b.c", "n.=ZZ"] {
            assert_eq!(parse_nodes_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn namespaces_are_single_safe_tokens() {
        assert!(check_namespace("daffi-test_1").is_ok());
        for bad in ["", "a.b", "a b", "*", "ns>"] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
    }
}
