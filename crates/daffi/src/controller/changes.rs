//! Membership changes on their way to the nodes: each recorded once, then sent to every
//! node whose view it concerns in one batch per short window, so that a mass start
//! costs the controller O(n) frames per window rather than O(n) per join.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::message::{self, Member, MembershipEvent, View};
use daffi_wire::frame::{FIXED_HEADER, LEN_PREFIX};
use daffi_wire::{Header, Kind, Outgoing};

/// How long the controller gathers membership changes before it sends them: long
/// enough that a mass start is told in few frames, short enough not to be noticed.
pub const COALESCE_WINDOW: std::time::Duration = std::time::Duration::from_millis(5);

/// One membership change, encoded once for every node it goes to.
pub struct Change {
    /// Its place in the order of changes (from 1).
    pub seq: u64,
    /// The node it is about (which ignores it).
    pub about: Arc<str>,
    /// The callback names it concerns: the node's, before and after the change.
    pub names: Vec<String>,
    /// The `MembershipEvent`, encoded.
    pub event: Bytes,
}

impl Change {
    /// The change `event` about `about`, concerning `names`.
    pub fn new(seq: u64, about: Arc<str>, names: Vec<String>, event: &MembershipEvent) -> Self {
        Change {
            seq,
            about,
            names,
            event: message::encode(event),
        }
    }
}

/// What the controller tells a node of the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeView {
    /// Everything, one event per frame: a node that predates views.
    Legacy,
    /// Every other node, in batches.
    All,
    /// The providers of these callback names, in batches.
    Names(HashSet<String>),
}

impl NodeView {
    /// The view a node asked for in its `Hello`.
    pub fn asked(view: Option<View>) -> NodeView {
        match view {
            None => NodeView::Legacy,
            Some(View::All) => NodeView::All,
            Some(View::Subscribed) => NodeView::Names(HashSet::new()),
        }
    }

    /// Whether a node serving `callbacks` is in this view.
    pub fn holds(&self, callbacks: &[String]) -> bool {
        match self {
            NodeView::Legacy | NodeView::All => true,
            NodeView::Names(names) => {
                !names.is_empty() && callbacks.iter().any(|c| names.contains(c))
            }
        }
    }

    /// Widens the view by what a `Subscribe` asks; returns the part that is new (what
    /// the node must now be told of), or `None` if nothing is.
    pub fn widen(&mut self, all: bool, names: Vec<String>) -> Option<NodeView> {
        match self {
            NodeView::Legacy | NodeView::All => None,
            NodeView::Names(_) if all => {
                *self = NodeView::All;
                Some(NodeView::All)
            }
            NodeView::Names(held) => {
                let new: HashSet<String> = names
                    .into_iter()
                    .filter(|n| held.insert(n.clone()))
                    .collect();
                (!new.is_empty()).then_some(NodeView::Names(new))
            }
        }
    }
}

/// The frames that tell a node called `node`, whose view is `view` and whose frames hold
/// at most `limit` bytes, of the `changes` it is owed; `None` if none concerns it.
pub fn frames_for(
    node: &str,
    view: &NodeView,
    limit: usize,
    changes: &[Arc<Change>],
) -> Option<Outgoing> {
    let owed = changes
        .iter()
        .filter(|c| &*c.about != node && view.holds(&c.names));
    match view {
        NodeView::Legacy => {
            let frames: Vec<Outgoing> = owed.map(|c| event_frame(c.event.clone())).collect();
            (!frames.is_empty()).then(|| Outgoing::joined(frames))
        }
        NodeView::All | NodeView::Names(_) => batch_frames(owed.map(|c| &c.event), limit),
    }
}

/// The members `members` as `joined` events, in batch frames of at most `limit` bytes;
/// `None` if there are none.
pub fn snapshot_frames(members: Vec<Member>, limit: usize) -> Option<Outgoing> {
    let events: Vec<Bytes> = members
        .into_iter()
        .map(|m| message::encode(&MembershipEvent::Joined(m)))
        .collect();
    batch_frames(events.iter(), limit)
}

/// A `Membership` frame carrying one encoded event (for a node that predates views).
fn event_frame(event: Bytes) -> Outgoing {
    Outgoing::new(&Header::control(Kind::Membership), event)
}

/// What a batch frame takes besides its events: the frame header and the array's.
const BATCH_OVERHEAD: usize = LEN_PREFIX + FIXED_HEADER + 5;

/// Encoded events as `Membership` frames holding arrays of them, each frame within
/// `limit` bytes (at least one event a frame); `None` for no events.
fn batch_frames<'a>(events: impl Iterator<Item = &'a Bytes>, limit: usize) -> Option<Outgoing> {
    let budget = limit.saturating_sub(BATCH_OVERHEAD);
    let mut pages: Vec<Vec<&Bytes>> = Vec::new();
    let mut used = 0;
    for event in events {
        match pages.last_mut() {
            Some(page) if used + event.len() <= budget => page.push(event),
            _ => {
                pages.push(vec![event]);
                used = 0;
            }
        }
        used += event.len();
    }
    if pages.is_empty() {
        return None;
    }
    let frames = pages
        .into_iter()
        .map(|page| event_frame(array_of(&page)))
        .collect();
    Some(Outgoing::joined(frames))
}

/// A MessagePack array of already encoded values.
fn array_of(values: &[&Bytes]) -> Bytes {
    let size: usize = values.iter().map(|v| v.len()).sum();
    let mut out = BytesMut::with_capacity(size + 5).writer();
    // Writing to memory cannot fail.
    let _ = rmp::encode::write_array_len(&mut out, values.len() as u32);
    let mut out = out.into_inner();
    for value in values {
        out.put_slice(value);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use daffi_wire::Frame;

    fn member(name: &str, callbacks: &[&str]) -> Member {
        Member {
            name: name.into(),
            callbacks: callbacks.iter().map(|c| c.to_string()).collect(),
        }
    }

    fn change(seq: u64, m: Member) -> Arc<Change> {
        let names = m.callbacks.clone();
        let about = Arc::from(m.name.as_str());
        Arc::new(Change::new(seq, about, names, &MembershipEvent::Joined(m)))
    }

    /// The events in joined frames, each frame checked against `limit`.
    fn events_in(out: Outgoing, limit: usize) -> (usize, Vec<MembershipEvent>) {
        let mut bytes = Vec::new();
        out.copy_to(&mut bytes);
        let mut bytes = Bytes::from(bytes);
        let (mut frames, mut events) = (0, Vec::new());
        while !bytes.is_empty() {
            let len = 4 + u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            assert!(len - 4 <= limit, "a frame of {len} bytes");
            let frame = Frame::parse(bytes.split_to(len)).expect("a frame");
            assert_eq!(frame.kind(), Kind::Membership);
            events.extend(message::decode_membership(&frame.payload()).expect("events"));
            frames += 1;
        }
        (frames, events)
    }

    #[test]
    fn a_node_is_told_only_the_changes_its_view_holds_never_its_own() {
        let changes = vec![
            change(1, member("a", &["f"])),
            change(2, member("b", &["g"])),
            change(3, member("me", &["f"])),
        ];
        let names = |n: &[&str]| NodeView::Names(n.iter().map(|s| s.to_string()).collect());
        let told = |view: &NodeView| {
            frames_for("me", view, 1 << 20, &changes)
                .map(|out| events_in(out, 1 << 20).1)
                .unwrap_or_default()
        };
        let joined = |m| MembershipEvent::Joined(m);
        assert_eq!(told(&names(&["f"])), [joined(member("a", &["f"]))]);
        assert_eq!(told(&names(&[])), []);
        assert_eq!(
            told(&NodeView::All),
            [joined(member("a", &["f"])), joined(member("b", &["g"]))]
        );
        // An older node gets one event per frame.
        let (frames, events) = events_in(
            frames_for("me", &NodeView::Legacy, 1 << 20, &changes).unwrap(),
            1 << 20,
        );
        assert_eq!((frames, events.len()), (2, 2));
    }

    #[test]
    fn batches_fit_the_frame_limit_and_keep_the_order() {
        let members: Vec<Member> = (0..500)
            .map(|i| member(&format!("node-{i}"), &["f", "g"]))
            .collect();
        let limit = 1024;
        let (frames, events) = events_in(snapshot_frames(members.clone(), limit).unwrap(), limit);
        assert!(frames > 10, "{frames} frames");
        let expected: Vec<MembershipEvent> =
            members.into_iter().map(MembershipEvent::Joined).collect();
        assert_eq!(events, expected);
        assert!(snapshot_frames(Vec::new(), limit).is_none());
    }

    #[test]
    fn a_view_widens_by_what_is_new() {
        let mut view = NodeView::asked(Some(View::Subscribed));
        assert!(!view.holds(&["f".into()]));
        assert_eq!(
            view.widen(false, vec!["f".into()]),
            Some(NodeView::Names(HashSet::from(["f".to_string()])))
        );
        assert_eq!(view.widen(false, vec!["f".into()]), None);
        assert!(view.holds(&["g".into(), "f".into()]));
        assert_eq!(view.widen(true, vec![]), Some(NodeView::All));
        assert_eq!(view.widen(true, vec![]), None);
        assert_eq!(NodeView::asked(None), NodeView::Legacy);
    }
}
