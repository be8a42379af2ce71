//! The `Welcome` a joining node gets: the other members and the scheduled tasks, in
//! pages that each fit the node's frame limit.

use crate::protocol::message::{self, Member, TaskEntry, Welcome};
use crate::protocol::{callback_list_size, TASK_OVERHEAD};
use daffi_wire::{Kind, Outgoing};

/// What a joining node is told.
pub struct WelcomeContent {
    /// The other members.
    pub members: Vec<Member>,
    /// The scheduled tasks, timed from now.
    pub tasks: Vec<TaskEntry>,
    /// The controller's instance id.
    pub instance: u64,
    /// The node asked for a view (and gets batches).
    pub views: bool,
}

/// What a page of `Welcome` needs besides its members and tasks: frame header, keys,
/// the limit, the flag, the instance.
const PAGE_OVERHEAD: usize = 128;
/// What a member adds to a page besides its process name and callback list: keys and
/// headers.
const MEMBER_ENTRY: usize = 32;

/// One member or task on a page.
enum Item {
    Member(Member),
    Task(TaskEntry),
}

impl Item {
    /// At least what the item takes on a page.
    fn size(&self) -> usize {
        match self {
            Item::Member(m) => m.name.len() + callback_list_size(&m.callbacks) + MEMBER_ENTRY,
            Item::Task(t) => t.size_bound(),
        }
    }
}

/// The `Welcome` frames for a joining node, joined into one: the members, then the
/// tasks, in pages of at most `page_limit` bytes each (`more` on all but the last). A
/// page holds at least one item; a member admitted under the same frame limit always
/// fits (its callbacks are within
/// [`callback_list_limit`](crate::protocol::callback_list_limit)), and so does a task
/// (its entry leaves [`TASK_OVERHEAD`] of the controller's limit). A task that does not
/// fit a node whose own limit is smaller is left out of its book (and logged).
pub fn welcome_pages(
    content: WelcomeContent,
    max_frame_size: usize,
    page_limit: usize,
) -> Outgoing {
    let WelcomeContent {
        members,
        tasks,
        instance,
        views,
    } = content;
    let task_count = tasks.len();
    let tasks: Vec<TaskEntry> = tasks
        .into_iter()
        .filter(|t| t.size_bound() + TASK_OVERHEAD <= page_limit)
        .collect();
    if tasks.len() < task_count {
        tracing::warn!(
            left_out = task_count - tasks.len(),
            page_limit,
            "a joining node's frame limit is too small for some scheduled tasks: they are left out of its schedule book (use the same max_frame_size everywhere)"
        );
    }
    let items = members
        .into_iter()
        .map(Item::Member)
        .chain(tasks.into_iter().map(Item::Task));
    let pages = cut_pages(items, page_limit.saturating_sub(PAGE_OVERHEAD));
    let last = pages.len() - 1;
    let frames = pages
        .into_iter()
        .enumerate()
        .map(|(i, items)| {
            let mut page = Welcome {
                members: Vec::new(),
                max_frame_size: max_frame_size as u64,
                more: i < last,
                instance,
                tasks: Vec::new(),
                views,
            };
            for item in items {
                match item {
                    Item::Member(m) => page.members.push(m),
                    Item::Task(t) => page.tasks.push(t),
                }
            }
            message::control_frame(Kind::Welcome, &page)
        })
        .collect();
    Outgoing::joined(frames)
}

/// Cuts `items` into pages of at most `budget` bytes each, at least one page and at
/// least one item on each.
fn cut_pages(items: impl Iterator<Item = Item>, budget: usize) -> Vec<Vec<Item>> {
    let mut pages = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let size = item.size();
        if pages.last().is_some_and(|p| !p.is_empty()) && used + size > budget {
            pages.push(Vec::new());
            used = 0;
        }
        used += size;
        if let Some(page) = pages.last_mut() {
            page.push(item);
        }
    }
    pages
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::callback_list_limit;
    use crate::protocol::message::{self, Timing};
    use bytes::{Buf, Bytes};
    use daffi_wire::frame::MAX_PROCESS_NAME;
    use daffi_wire::Frame;

    /// Splits joined frames into their frames.
    fn frames(out: Outgoing) -> Vec<Frame> {
        let mut bytes = Vec::new();
        out.copy_to(&mut bytes);
        let mut bytes = Bytes::from(bytes);
        let mut frames = Vec::new();
        while bytes.has_remaining() {
            let len = 4 + u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
            frames.push(Frame::parse(bytes.split_to(len)).expect("a frame"));
        }
        frames
    }

    fn content(members: Vec<Member>, tasks: Vec<TaskEntry>) -> WelcomeContent {
        WelcomeContent {
            members,
            tasks,
            instance: 77,
            views: true,
        }
    }

    /// A task whose entry takes `args` bytes of arguments and the longest names.
    fn task(id: u64, args: usize) -> TaskEntry {
        TaskEntry {
            task_id: id,
            callback: "c".repeat(300),
            args: Bytes::from(vec![0xc4; args]),
            on: Some("o".repeat(MAX_PROCESS_NAME)),
            created_by: "p".repeat(MAX_PROCESS_NAME),
            timing: Timing::At {
                delays_ms: vec![u64::MAX; 20],
            },
        }
    }

    /// Checks the pages: each within `limit`, `more` on all but the last, the instance
    /// on each; returns what they hold, in order.
    fn read_pages(pages: &[Frame], limit: usize) -> (Vec<Member>, Vec<TaskEntry>) {
        let (mut members, mut tasks) = (Vec::new(), Vec::new());
        for (i, page) in pages.iter().enumerate() {
            assert_eq!(page.kind(), Kind::Welcome);
            let size = page.raw().len() - 4;
            assert!(size <= limit, "page {i}: {size} bytes");
            let welcome: Welcome = message::decode(&page.payload()).expect("a Welcome");
            assert_eq!(welcome.more, i + 1 < pages.len());
            assert_eq!(welcome.instance, 77);
            members.extend(welcome.members);
            tasks.extend(welcome.tasks);
        }
        (members, tasks)
    }

    #[test]
    fn welcome_pages_fit_the_limit_and_hold_every_member_once() {
        let limit = 64 * 1024;
        // Members as large as one may be, and small ones between them.
        let big = |i: usize| Member {
            name: format!("{i:p>width$}", width = MAX_PROCESS_NAME),
            callbacks: (0..)
                .map(|j| format!("{i}-{j:x>1000}"))
                .scan(0, |size, name| {
                    *size += name.len() + 4;
                    (*size <= callback_list_limit(limit)).then_some(name)
                })
                .collect(),
        };
        let small = |i: usize| Member {
            name: format!("small-{i}"),
            callbacks: vec!["f".into()],
        };
        let members: Vec<Member> = (0..10).flat_map(|i| [big(i), small(i)]).collect();
        let pages = frames(welcome_pages(
            content(members.clone(), vec![]),
            limit * 2,
            limit,
        ));
        assert!(pages.len() >= 10, "{} pages", pages.len());
        let welcome: Welcome = message::decode(&pages[0].payload()).expect("a Welcome");
        assert_eq!(welcome.max_frame_size, limit as u64 * 2);
        assert_eq!(read_pages(&pages, limit), (members, vec![]));

        // Nobody else connected, no task: one page, empty, the last.
        let pages = frames(welcome_pages(content(vec![], vec![]), limit, limit));
        let welcome: Welcome = message::decode(&pages[0].payload()).expect("a Welcome");
        assert_eq!(
            (pages.len(), welcome.members.len(), welcome.more),
            (1, 0, false)
        );
    }

    /// A task as large as a schedule may be gets a page of its own; small ones share.
    #[test]
    fn welcome_pages_carry_every_task_that_fits_each_within_the_limit() {
        let limit = 16 * 1024;
        let largest = limit - TASK_OVERHEAD - task(1, 0).size_bound();
        let tasks: Vec<TaskEntry> = (1..=6)
            .flat_map(|i| [task(i, largest), task(100 + i, 10)])
            .collect();
        let members = vec![Member {
            name: "m".into(),
            callbacks: vec!["f".into()],
        }];
        let pages = frames(welcome_pages(
            content(members.clone(), tasks.clone()),
            limit,
            limit,
        ));
        assert!(pages.len() >= 6, "{} pages", pages.len());
        assert_eq!(read_pages(&pages, limit), (members.clone(), tasks.clone()));

        // A node whose limit is smaller gets the tasks it can read, in pages it can read.
        let small_limit = limit / 2;
        let pages = frames(welcome_pages(
            content(members.clone(), tasks.clone()),
            limit,
            small_limit,
        ));
        let small: Vec<TaskEntry> = tasks.into_iter().filter(|t| t.args.len() == 10).collect();
        assert_eq!(read_pages(&pages, small_limit), (members, small));
    }

    /// The bound on an entry's size holds for what the entry encodes to, alone and as a
    /// `Schedule` event.
    #[test]
    fn a_task_entry_never_takes_more_than_its_size_bound() {
        let every = |first_ms| TaskEntry {
            timing: Timing::Every {
                interval_ms: u64::MAX,
                first_ms,
            },
            ..task(crate::protocol::MAX_TASK_ID, 70_000)
        };
        for entry in [
            task(u64::MAX, 0),
            task(1, 70_000),
            every(None),
            every(Some(u64::MAX)),
        ] {
            let alone = message::encode(&entry).len();
            let event = message::encode(&message::ScheduleEvent::Added(entry.clone())).len();
            assert!(
                alone.max(event) <= entry.size_bound(),
                "{alone} {event} {}",
                entry.size_bound()
            );
        }
    }
}
