//! Payloads of control frames, MessagePack-encoded with field names.
//!
//! Only these payloads are ever decoded by the controller; request and reply payloads
//! pass through it untouched.

use std::collections::HashMap;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use daffi_wire::{Header, Kind, Outgoing};

/// `Hello`: who the node is. Small and bounded ([`MAX_HELLO_SIZE`]): what the node
/// serves follows in an `Announce`, which the controller reads only once the token
/// matched.
///
/// [`MAX_HELLO_SIZE`]: super::MAX_HELLO_SIZE
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    /// The node's unique process name.
    pub process_name: String,
    /// The shared secret, when the controller requires one.
    #[serde(default)]
    pub auth_token: Option<String>,
    /// The node's own frame limit: the controller sizes the `Welcome` pages and `stats`
    /// answers it sends this node to fit it. 0: not said (the controller's own limit).
    #[serde(default)]
    pub max_frame_size: u64,
    /// What the node asks to be told of the other nodes. Absent (a node that predates
    /// views): everything, one `Membership` event per frame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub view: Option<View>,
}

/// What a node's membership view holds, as it asks in its `Hello`: the controller sends
/// it the changes to that part only, batched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum View {
    /// Every other node (for `members()`, `wait_process`, the hooks).
    All,
    /// Only the providers of the callback names the node subscribes to
    /// (`ControlRequest::Subscribe`); nothing at first.
    Subscribed,
}

/// A node and the callbacks it serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Process name.
    pub name: String,
    /// Callback names.
    pub callbacks: Vec<String>,
}

/// `Welcome`: the handshake succeeded. The members and the scheduled tasks come in
/// pages that each fit a frame: `Welcome` frames with `more` set, then one without.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Welcome {
    /// Other connected nodes: this page's share (all of them, once the pages are put
    /// together).
    pub members: Vec<Member>,
    /// The controller's frame size limit, so that nodes can check before sending.
    pub max_frame_size: u64,
    /// More `Welcome` pages follow; the node is in once it has read the last.
    #[serde(default)]
    pub more: bool,
    /// Drawn at random when the controller starts: a node that finds another instance
    /// than its last controller's knows the controller restarted (and restores its
    /// schedule book). The same in every page.
    #[serde(default)]
    pub instance: u64,
    /// The scheduled tasks: this page's share. Timings are delays from when the page
    /// was sent.
    #[serde(default)]
    pub tasks: Vec<TaskEntry>,
    /// The controller keeps the view the node asked for in its `Hello`, and sends
    /// `Membership` frames as batches (arrays of events). Absent (a controller that
    /// predates views): every node is told everything, one event per frame.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub views: bool,
}

/// Why the controller refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseCode {
    /// The process name is taken by a connected node.
    DuplicateName,
    /// The process name, or a callback name, is empty, too long, or holds a control
    /// character.
    InvalidName,
    /// The node speaks another protocol version.
    Version,
    /// The auth token is missing or wrong.
    Auth,
    /// The first frame was not a valid `Hello`.
    BadHello,
    /// The controller requires TLS and the node connected in plaintext.
    TlsRequired,
    /// The node's callback names take more than one node may announce
    /// ([`callback_list_limit`](crate::protocol::callback_list_limit)).
    CallbackListTooLarge,
}

/// `Refused`: the handshake failed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    /// Machine-readable reason.
    pub code: RefuseCode,
    /// Human-readable explanation.
    pub message: String,
}

/// `Announce`: the full list of callbacks a node serves from now on. The first one
/// follows the `Hello` at once; the node joins with it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Announce {
    /// Callback names.
    pub callbacks: Vec<String>,
}

/// `Membership`: a change in who is connected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum MembershipEvent {
    /// A node connected.
    Joined(Member),
    /// A node changed the callbacks it serves.
    Updated(Member),
    /// A node is stopping: call it no more; calls in flight to it may still finish.
    Leaving {
        /// Its process name.
        name: String,
    },
    /// A node disconnected.
    Left {
        /// Its process name.
        name: String,
    },
}

impl MembershipEvent {
    /// The node the event is about.
    pub fn about(&self) -> &str {
        match self {
            MembershipEvent::Joined(m) | MembershipEvent::Updated(m) => &m.name,
            MembershipEvent::Leaving { name } | MembershipEvent::Left { name } => name,
        }
    }
}

/// A scheduled task as every node's schedule book holds it: all it takes to run it
/// again on a restarted controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEntry {
    /// The task's id: random, from 1 to [`MAX_TASK_ID`](crate::protocol::MAX_TASK_ID).
    pub task_id: u64,
    /// The callback it runs.
    pub callback: String,
    /// Encoded arguments (a MessagePack `bin`), sent unchanged at each run.
    pub args: bytes::Bytes,
    /// The node the runs are pinned to, if any.
    pub on: Option<String>,
    /// The node that created it.
    pub created_by: String,
    /// When it runs next, as delays from when the frame carrying it was sent.
    pub timing: Timing,
}

impl TaskEntry {
    /// At least what the entry takes encoded (its MessagePack map, keys included), for
    /// cutting pages without encoding anything twice.
    pub fn size_bound(&self) -> usize {
        let names =
            self.callback.len() + self.on.as_ref().map_or(0, String::len) + self.created_by.len();
        let delays = match &self.timing {
            Timing::Every { .. } => 0,
            Timing::At { delays_ms } => delays_ms.len() * 9,
        };
        // Keys, string, bin and array headers, the id, the interval, and the tag of a
        // `Schedule` event around it: under 192.
        self.args.len() + names + delays + 192
    }
}

/// `Schedule`: a change in the scheduled tasks, sent to every node (the creator of a
/// task too) so that each keeps its schedule book current.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum ScheduleEvent {
    /// A task was created, or restored after a controller restart.
    Added(TaskEntry),
    /// A task ended: cancelled, finished (its last time passed), or refused for good.
    Ended {
        /// The task's id.
        task_id: u64,
    },
}

/// Why a request could not be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UndeliverableCode {
    /// The destination process is not connected.
    UnknownProcess,
    /// The destination process is stopping and takes no new requests.
    Stopping,
    /// The destination process reads too little of what is sent to it: as much as the
    /// controller holds for one node is waiting for it already.
    SlowConsumer,
}

/// `Undeliverable`: the controller could not deliver a request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Undeliverable {
    /// Machine-readable reason.
    pub code: UndeliverableCode,
}

/// What kind of failure an error reply reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RemoteErrorKind {
    /// The callback returned `Err`.
    Failed,
    /// The callback panicked.
    Panicked,
    /// The arguments did not decode into the callback's parameters.
    BadArguments,
    /// The callee does not serve this name (any more).
    NotFound,
    /// The callee runs as many callbacks as it allows; it refused this one.
    Overloaded,
    /// The callee is stopping and takes no new calls.
    Stopping,
    /// A stream was asked of a callback that returns one value.
    NotAStream,
}

/// Payload of a `Reply` with the error flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteError {
    /// What went wrong.
    pub kind: RemoteErrorKind,
    /// The callback's message.
    pub message: String,
}

/// Encodes a control payload. Control types are plain data, so this cannot fail.
pub fn encode<T: Serialize>(value: &T) -> bytes::Bytes {
    rmp_serde::to_vec_named(value)
        .map(bytes::Bytes::from)
        .unwrap_or_default()
}

/// A control frame (no routing fields) carrying `payload`.
pub fn control_frame<T: Serialize>(kind: Kind, payload: &T) -> Outgoing {
    Outgoing::new(&Header::control(kind), encode(payload))
}

/// Decodes a `Membership` payload: one event (a map, from a controller that predates
/// views) or a batch of them (an array).
pub fn decode_membership(payload: &[u8]) -> Result<Vec<MembershipEvent>, rmp_serde::decode::Error> {
    match payload.first() {
        Some(0x90..=0x9f | 0xdc | 0xdd) => decode(payload),
        _ => decode(payload).map(|event| vec![event]),
    }
}

/// Decodes a control payload.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(payload)
}

/// When a scheduled task runs. Times travel as delays from the moment the request is
/// sent, never as clock readings, so clock skew between machines does not matter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "timing", rename_all = "snake_case")]
pub enum Timing {
    /// Every `interval_ms`, until cancelled; the first run `first_ms` from now (by
    /// default one interval).
    Every {
        /// The interval in milliseconds (> 0).
        interval_ms: u64,
        /// The first run this long from now: a restored task keeps its cadence.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_ms: Option<u64>,
    },
    /// Once after each of these delays (milliseconds from now).
    At {
        /// The delays, in any order (each > 0).
        delays_ms: Vec<u64>,
    },
}

/// `ControlRequest`: something the controller itself does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Keep a schedule: run `callback` with `args` per `timing`, on `on` or a random
    /// provider chosen at each run.
    Schedule {
        /// The callback to run.
        callback: String,
        /// Encoded arguments (a MessagePack `bin`), sent unchanged at each run.
        args: bytes::Bytes,
        /// The node to pin the runs to.
        on: Option<String>,
        /// When to run.
        timing: Timing,
    },
    /// End a scheduled task.
    Cancel {
        /// The task's id.
        task_id: u64,
    },
    /// List the scheduled tasks, by id, in pages that fit the answer's budget.
    ListTasks {
        /// Only the tasks with a larger id (0: from the first).
        #[serde(default)]
        after: u64,
    },
    /// Give a restarted controller the tasks of a node's schedule book that it does not
    /// list, and the ids of tasks the node knows ended. It keeps the tombstones, adds the
    /// tasks whose id it neither holds nor knows ended, and ends the tasks it holds
    /// whose id is among the tombstones. Sent in several requests when it would not fit
    /// one frame: the tombstones first.
    Restore {
        /// Tasks to add back, timed from when the request is sent.
        #[serde(default)]
        tasks: Vec<TaskEntry>,
        /// Ids of tasks that ended, oldest first.
        #[serde(default)]
        tombstones: Vec<u64>,
    },
    /// Report the controller's counters.
    Stats,
    /// Keep this node's view current on more: every node (`all`), or the providers of
    /// `names` too. The controller first sends what it owes the node, then the members
    /// now in the added part (as `joined` events), then the answer, `subscribed`.
    Subscribe {
        /// The whole membership from now on.
        #[serde(default)]
        all: bool,
        /// Callback names whose providers the node wants to know.
        #[serde(default)]
        names: Vec<String>,
    },
}

/// A scheduled task as the controller reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInfo {
    /// The task's id: random, kept across controller restarts.
    pub task_id: u64,
    /// The callback it runs.
    pub callback: String,
    /// The node it is pinned to, if any.
    pub on: Option<String>,
    /// The node that created it.
    pub created_by: String,
    /// Milliseconds until the next run.
    pub next_run_in_ms: u64,
    /// The interval, for repeating tasks.
    pub interval_ms: Option<u64>,
    /// Runs still to come, for `at` tasks.
    pub remaining_runs: Option<u64>,
    /// How many runs this controller sent so far.
    pub runs: u64,
    /// The node that gave this task back to this controller after a restart, if it was
    /// restored.
    #[serde(default)]
    pub restored_by: Option<String>,
}

/// Successful `ControlReply` payloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum ControlAnswer {
    /// A `Subscribe` was carried out: the view it asked for came before this answer.
    Subscribed,
    /// A schedule was created.
    Scheduled {
        /// Its id.
        task_id: u64,
    },
    /// A task was cancelled.
    Cancelled,
    /// The scheduled tasks: a page of them, by id.
    Tasks {
        /// One entry per task.
        tasks: Vec<TaskInfo>,
        /// Tasks with larger ids left out to keep the answer small: ask again with
        /// `after` set to the last id of this page.
        #[serde(default)]
        omitted_tasks: u64,
    },
    /// A `Restore` was carried out.
    Restored {
        /// Tasks added back.
        restored: u64,
        /// Tasks refused: they ended (a tombstone), or are invalid. The node forgets them.
        refused: Vec<u64>,
    },
    /// The controller's counters.
    Stats {
        /// `Request` frames forwarded since the controller started, by callback name:
        /// names some connected node serves, the most called first, as many as fit the
        /// answer's budget.
        calls: HashMap<String, u64>,
        /// Requests for every other name: names no connected node serves (any more),
        /// names beyond those the controller keeps, and the `omitted_names`.
        #[serde(default)]
        other_calls: u64,
        /// Names left out of `calls` to keep the answer small (the least called);
        /// their requests are in `other_calls`.
        #[serde(default)]
        omitted_names: u64,
    },
}

/// Why a control request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlErrorCode {
    /// No task has this id (it finished or was cancelled).
    TaskNotFound,
    /// The request is malformed or out of range.
    Invalid,
}

/// `ControlReply` payload with the error flag.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlError {
    /// Machine-readable reason.
    pub code: ControlErrorCode,
    /// The task concerned, if any.
    #[serde(default)]
    pub task_id: Option<u64>,
    /// Human-readable explanation.
    pub message: String,
}
