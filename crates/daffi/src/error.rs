//! The one error type of daffi.
//!
//! Every failure a caller may want to handle differently has its own variant, and each
//! message says what to do about it. Where a failure has a cause (an I/O or TLS error,
//! a decoding error), the message includes its text and
//! [`source`](std::error::Error::source) gives the cause itself, e.g. to read an
//! [`std::io::ErrorKind`].

use std::time::Duration;

/// Result alias used throughout daffi.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The cause an [`Error`] keeps as its `source`.
pub(crate) type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in daffi.
///
/// The enum is `#[non_exhaustive]`: match the variants you handle and keep a `_` arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No connected node (other than the caller) serves this callback name.
    #[error(
        "no node serves callback `{callback}`{}; check the name, or wait for it with `wait_function`",
        on.as_ref().map(|p| format!(" on process `{p}`")).unwrap_or_default()
    )]
    NoProvider {
        /// The callback that was called.
        callback: String,
        /// The process the call was pinned to with `.on(..)`, if any.
        on: Option<String>,
    },

    /// The process named with `.on(..)` is not connected to the controller.
    #[error(
        "process `{process}` is not connected; check the name, or wait for it with `wait_process`"
    )]
    UnknownProcess {
        /// The process name that was asked for.
        process: String,
    },

    /// The node serving the call disconnected before it answered.
    #[error("process `{process}` disconnected while serving `{callback}`; the call may or may not have run there")]
    PeerDisconnected {
        /// The node that went away.
        process: String,
        /// The callback that was in flight.
        callback: String,
    },

    /// The node serving the call stopped (gracefully) before it answered, or is stopping
    /// and took no new calls.
    #[error("process `{process}` stopped before serving `{callback}`; call another node or retry once it is back")]
    PeerStopped {
        /// The node that stopped.
        process: String,
        /// The callback that was called.
        callback: String,
    },

    /// `stream()` was called on a callback that returns one value (or served by a node
    /// too old to stream), or `fg`/`bg` on one that streams.
    #[error("process `{process}` serves `{callback}` {reason}")]
    NotAStream {
        /// The node that answered.
        process: String,
        /// The callback that was called.
        callback: String,
        /// What it serves instead, and which call to use.
        reason: String,
    },

    /// The caller gave up on a call (dropped its future or stream, or its `timeout`
    /// passed) while the callee still read the arguments it streamed: the callee's
    /// [`Incoming`](crate::Incoming) ends with this.
    #[error("process `{process}` gave up on its call to `{callback}` before its stream of arguments ended")]
    Cancelled {
        /// The caller.
        process: String,
        /// The callback that was called.
        callback: String,
    },

    /// The callee already runs as many callbacks of this kind as it allows
    /// (`max_sync_callbacks` for sync ones, `max_concurrent_callbacks` for async ones).
    #[error("process `{process}` is overloaded and refused `{callback}`; retry later, add nodes, or raise its `max_sync_callbacks` (sync callbacks) or `max_concurrent_callbacks` (async ones)")]
    Overloaded {
        /// The busy node.
        process: String,
        /// The callback that was refused.
        callback: String,
    },

    /// The node the call went to reads too little of what is sent to it (it may be
    /// paused, or slower than its callers): the controller already holds as much for it
    /// as it holds for one node (`max_queue_bytes`), so the call was not delivered and
    /// did not run. A node that reads nothing for the controller's `stall_timeout` is
    /// disconnected (its calls in flight then get [`Error::PeerDisconnected`]). Over
    /// NATS: that node has not taken the 1,024 requests this node sent it last, within
    /// the call's timeout (or `stall_timeout`), so this call was not sent.
    #[error("process `{process}` is not reading what is sent to it (it may be paused, or slower than its callers), so the call to `{callback}` was not delivered; retry later, call another node, or check that process")]
    SlowConsumer {
        /// The node that is not reading.
        process: String,
        /// The callback that was called.
        callback: String,
    },

    /// No answer came within the allowed time.
    #[error(
        "`{what}` did not complete within {after:?}; raise the timeout or check the remote node"
    )]
    Timeout {
        /// What was being waited for: a callback name, or a `wait_*` target.
        what: String,
        /// The timeout that expired.
        after: Duration,
    },

    /// The local node was stopped (by `stop()` or by dropping the last `Global`).
    #[error("the local daffi node was stopped; start a new `Global` to make calls")]
    Stopped,

    /// The controller cannot be reached, or the connection to it was lost.
    #[error("the controller at {address} is unreachable: {reason}; check that it runs and that host, port or socket path match")]
    ControllerUnreachable {
        /// Where the node looked for the controller.
        address: String,
        /// Why it failed.
        reason: String,
        /// The I/O error behind it, if there was one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The remote callback returned an error or panicked.
    #[error("callback `{callback}` on process `{process}` failed: {message}")]
    Remote {
        /// The node that ran the callback.
        process: String,
        /// The callback that failed.
        callback: String,
        /// The error's text, or the panic message.
        message: String,
        /// Whether the callback panicked (rather than returned `Err`).
        panicked: bool,
    },

    /// The callee could not decode the arguments into the callback's parameters.
    #[error("callback `{callback}` on process `{process}` rejected its arguments: {message}")]
    BadArguments {
        /// The node that rejected the call.
        process: String,
        /// The callback's name and, where known, its signature.
        callback: String,
        /// What the decoder expected and found.
        message: String,
    },

    /// The result did not decode into the type the caller asked for.
    #[error("the result of `{callback}` {message}")]
    BadResult {
        /// The callback that was called.
        callback: String,
        /// The Rust type the caller asked for, as `std::any::type_name` gives it.
        expected: &'static str,
        /// What was found, in the caller's terms: "is an integer, not a `String`", or
        /// "does not decode as `Vec<Point>`, at \[2\].x: expected an integer, got a string".
        message: String,
        /// The decoder's own error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    /// Arguments could not be serialized: a `Serialize` impl failed, or the value nests
    /// deeper than 1023 levels (as deep as a receiver decodes).
    #[error("could not encode the arguments of `{callback}`: {message}")]
    Encode {
        /// The callback that was called.
        callback: String,
        /// The serializer's message.
        message: String,
    },

    /// The encoded call is larger than the frame size limit; nothing was sent.
    #[error("the call to `{callback}` is {size} bytes, over the frame limit of {limit} bytes; send less or raise `max_frame_size` on every node and the controller")]
    PayloadTooLarge {
        /// The callback that was called.
        callback: String,
        /// Size of the frame that would have been sent.
        size: usize,
        /// The configured limit.
        limit: usize,
    },

    /// Another connected node already uses this process name.
    #[error("process name `{process}` is already taken by a connected node; choose another `process_name`")]
    DuplicateProcessName {
        /// The name that was refused.
        process: String,
    },

    /// A callback with this name is already registered on this node.
    #[error("callback `{callback}` is already registered on this node; pick another name")]
    DuplicateCallback {
        /// The name that was refused.
        callback: String,
    },

    /// This node's callback names together would take more than one node may announce:
    /// 1 MiB, each name counting its length plus 4 bytes, or less when this node's or the
    /// controller's `max_frame_size` is under 1 MiB + 512 bytes (every frame that carries
    /// the list must fit). Nothing was registered (at `start`: the node did not start).
    #[error("this node's callback names would take {size} bytes (each name counts its length plus 4), over the limit of {limit} bytes; serve fewer or shorter names, or spread them over several processes")]
    CallbackListTooLarge {
        /// What the names would take.
        size: usize,
        /// What they may take.
        limit: usize,
    },

    /// The controller (or NATS server) refused this node: it sent no token or a wrong
    /// one, or NATS credentials it does not trust (an unknown account, an expired or
    /// revoked user). Not retried: the credentials will not change by themselves.
    #[error(
        "authentication failed: the controller at {address} refused this node ({reason}); {remedy}"
    )]
    AuthenticationFailed {
        /// The controller's address.
        address: String,
        /// The controller's explanation: no token, or a wrong one.
        reason: String,
        /// What would let the node in, for what it sent.
        remedy: String,
    },

    /// TLS between this node and the controller failed: the controller's certificate is
    /// not trusted or not valid for the name, a client certificate is missing or
    /// refused, or one side uses TLS and the other does not. Not retried at start.
    #[error("TLS with the controller at {address} failed: {message}")]
    Tls {
        /// The controller's address.
        address: String,
        /// What went wrong and what to do about it.
        message: String,
        /// The TLS or I/O error behind it, when it happened here (not when the
        /// controller reported it).
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// A Unix socket that another user could control: the socket, its directory, or
    /// the process listening on it belongs to another user (neither this one nor root),
    /// or the directory is a symbolic link. On a shared temp directory, that user could
    /// receive this node's calls and arguments (a node refuses to connect), or replace a
    /// controller's socket (a controller refuses to listen). Not retried at start.
    #[error("refused the Unix socket {}: {message}", path.display())]
    UnsafeSocket {
        /// The socket path.
        path: std::path::PathBuf,
        /// Who owns what, and what to do about it.
        message: String,
    },

    /// The controller refused the connection for a reason other than the above.
    #[error("the controller refused this node: {reason}")]
    Refused {
        /// The controller's explanation.
        reason: String,
    },

    /// The peer speaks another protocol version, or not the daffi protocol at all.
    #[error("protocol error with {peer}: {message}")]
    Protocol {
        /// Who sent the bad data.
        peer: String,
        /// What was wrong.
        message: String,
        /// The decoding error behind it, if there was one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// Some nodes of a broadcast failed; `succeeded` lists the ones that answered.
    /// [`Call::broadcast_results`](crate::Call::broadcast_results) gives every value and error.
    #[error("broadcast of `{callback}`: {} of {} nodes failed: {}", failed.len(), failed.len() + succeeded.len(), describe_failures(failed))]
    Broadcast {
        /// The callback broadcast.
        callback: String,
        /// Nodes that answered.
        succeeded: Vec<String>,
        /// Nodes that did not, each with its error.
        failed: Vec<(String, Error)>,
    },

    /// No scheduled task has this id: it finished or was cancelled.
    #[error("no scheduled task {task_id}: it finished or was cancelled; list tasks with `scheduled_tasks()`")]
    TaskNotFound {
        /// The id asked for.
        task_id: u64,
    },

    /// An instance of this callback group is already registered in this process.
    #[error("an instance of `{type_name}` is already registered; callback groups are singletons (two would serve the same names)")]
    DuplicateInstance {
        /// The group's type.
        type_name: &'static str,
    },

    /// A schedule cannot be kept: a time in the past, an empty list, a zero interval, or
    /// a duration that does not parse.
    #[error("invalid schedule: {0}")]
    InvalidPeriod(String),

    /// A builder option or argument is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),

    /// A blocking method was called on a thread that drives a single-threaded runtime.
    #[error("`{method}` blocks, and this thread drives a current-thread tokio runtime; use `{method}_async` (or its async twin) instead")]
    BlockingInAsync {
        /// The blocking method that was called.
        method: &'static str,
    },

    /// What was asked is not available with this backend (yet): for example the
    /// call counters of the controller (`controller_stats`), asked of a node on a NATS
    /// cluster, where no process sees every call.
    #[error("{what} is not available {reason}")]
    Unsupported {
        /// What was asked.
        what: String,
        /// Why not, and where it is available.
        reason: String,
    },

    /// This `Global` runs only a controller (`init_node(false)`), so it cannot call or serve.
    #[error("this Global runs no node (`init_node(false)`); calls and callbacks need a node")]
    NoNode,

    /// Binding the controller's listening socket failed.
    #[error("the controller could not listen on {address}: {source}")]
    Bind {
        /// The address it tried.
        address: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// An I/O error outside a call (setting up the runtime, the socket directory, ...).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The remedy of [`Error::AuthenticationFailed`] for a node that authenticates with a token.
pub(crate) const TOKEN_REMEDY: &str =
    "give the node the controller's token with `auth_token` or the DAFFI_AUTH_TOKEN environment variable";

impl Error {
    pub(crate) fn timeout(what: impl Into<String>, after: Duration) -> Self {
        Error::Timeout {
            what: what.into(),
            after,
        }
    }

    /// [`Error::ControllerUnreachable`], for a `reason` with no error behind it.
    pub(crate) fn unreachable(address: impl ToString, reason: impl Into<String>) -> Self {
        Error::ControllerUnreachable {
            address: address.to_string(),
            reason: reason.into(),
            source: None,
        }
    }

    /// [`Error::ControllerUnreachable`] because of `cause`: `reason` and its text.
    pub(crate) fn unreachable_by(
        address: impl ToString,
        reason: &str,
        cause: impl Into<Cause> + std::fmt::Display,
    ) -> Self {
        Error::ControllerUnreachable {
            address: address.to_string(),
            reason: format!("{reason}{cause}"),
            source: Some(cause.into()),
        }
    }

    /// [`Error::Protocol`]: `peer` sent something that does not decode as `what`.
    pub(crate) fn undecodable(
        peer: impl Into<String>,
        what: &str,
        cause: impl Into<Cause> + std::fmt::Display,
    ) -> Self {
        Error::Protocol {
            peer: peer.into(),
            message: format!("undecodable {what}: {cause}"),
            source: Some(cause.into()),
        }
    }

    /// [`Error::Protocol`] with no error behind it.
    pub(crate) fn protocol(peer: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Protocol {
            peer: peer.into(),
            message: message.into(),
            source: None,
        }
    }
}

fn describe_failures(failed: &[(String, Error)]) -> String {
    failed
        .iter()
        .map(|(node, e)| format!("`{node}`: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}
