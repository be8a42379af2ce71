//! The threads that serve the controller: every connection, accepted or in-process, on
//! the shards; its listener, joins, leaves and the updates telling of them on the
//! membership thread.
//!
//! A shard is a thread of its own running a single-threaded tokio runtime, with its own
//! I/O driver and timers. There is one per two processors (at least one): the nodes of
//! a mesh often share their controller's machine, and keep the rest. Connections are
//! dealt to the shards in turn. A frame read on one shard is written to its
//! destination's socket from there (`daffi_wire::channel` writes inline on an idle
//! connection), so a call crosses no thread inside the controller unless a queue forms.
//!
//! Why not the runtime the controller was started on: on a single-threaded runtime a
//! round trip's frames cost the controller about a seventh fewer instructions than on
//! a multi-threaded one (less of the scheduler's own work around each task). And
//! on its own threads the controller keeps serving the other nodes while its host's
//! runtime is busy or blocked (a `current_thread` runtime running a long callback).
//! BENCHMARKS.md, "The controller on threads of its own", has the figures.
//!
//! Membership changes (joins, leaves, new callback lists), the updates that tell the
//! nodes of them, and the accepting of connections run on one more thread,
//! `daffi-ctl-members`: their work grows with what peers the controller cannot choose
//! send it (a node with tens of thousands of names, thousands of connections a
//! second), and there it costs the forwarding of other nodes' calls only a share of the
//! processors, not a turn of their thread.
//!
//! A stopping controller's shards keep running until their sessions have said goodbye,
//! up to [`FAREWELL`], then drop what is left; the membership thread until every shard's
//! sessions have (their leaves run there).

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{watch, Notify};

use super::linger::Linger;
use crate::transport::Incoming;

/// How long a shard waits, once the controller stops, for its sessions to end: the
/// writers' drain (one second) with room to spare.
pub const FAREWELL: Duration = Duration::from_secs(2);

/// The shards of one controller, and its membership thread.
pub struct Shards {
    shards: Vec<Shard>,
    /// The shard the next connection goes to (modulo their number).
    next: AtomicUsize,
    membership: Membership,
}

/// The thread membership changes run on (and the accept loop, and the updates that
/// tell the nodes of the changes).
#[derive(Clone)]
pub struct Membership(Handle);

impl Membership {
    /// Runs `change` there and returns its output, or `None` if the thread has stopped
    /// (the controller is stopping: the change no longer matters).
    pub async fn run<F>(&self, change: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.0.spawn(change).await.ok()
    }

    /// Runs `task` there, to its end.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.0.spawn(task);
    }
}

struct Shard {
    runtime: Handle,
    sessions: Arc<Sessions>,
}

impl Shards {
    /// Starts one shard per two processors (at least one): the controller's nodes often
    /// share its machine, and leave it the rest. Each lingers up to `linger` after a
    /// reply (see [`super::linger`]). They stop once `stop` turns true (or its sender is
    /// dropped) and their sessions have ended.
    pub fn start(stop: &watch::Receiver<bool>, linger: Duration) -> std::io::Result<Shards> {
        let processors = std::thread::available_parallelism().map_or(1, |n| n.get());
        let count = (processors / 2).max(1);
        // On one processor a lingering shard would only hold up the caller it waits for.
        let linger = if processors > 1 {
            linger
        } else {
            Duration::ZERO
        };
        let shards: Vec<Shard> = (0..count)
            .map(|i| Shard::start(format!("daffi-ctl-{i}"), stop.clone(), Vec::new(), linger))
            .collect::<std::io::Result<_>>()?;
        let every_shards_sessions = shards.iter().map(|s| s.sessions.clone()).collect();
        let membership = Shard::start(
            "daffi-ctl-members".into(),
            stop.clone(),
            every_shards_sessions,
            Duration::ZERO,
        )?;
        tracing::debug!(shards = count, ?linger, "controller shards started");
        Ok(Shards {
            shards,
            next: AtomicUsize::new(0),
            membership: Membership(membership.runtime),
        })
    }

    /// The thread membership changes run on.
    pub fn membership(&self) -> Membership {
        self.membership.clone()
    }

    /// Serves `incoming` on the next shard: `serve` gets it registered with that
    /// shard's runtime. A connection whose socket cannot move there is closed (logged).
    pub fn serve<F, Fut>(&self, incoming: Incoming, serve: F)
    where
        F: FnOnce(Incoming) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.shards.len();
        let shard = &self.shards[i];
        let session = Session::begin(&shard.sessions);
        shard.runtime.spawn(async move {
            let _session = session;
            let peer = incoming.peer().to_string();
            match incoming.register_here() {
                Ok(incoming) => serve(incoming).await,
                Err(e) => tracing::warn!(%peer, error = %e, "closed a connection: could not register its socket with a controller shard"),
            }
        });
    }
}

impl Shard {
    /// A thread called `name`, which ends once `stop` turns true and its own sessions
    /// and every one of `also_outlive` have ended (or [`FAREWELL`] passed).
    fn start(
        name: String,
        mut stop: watch::Receiver<bool>,
        also_outlive: Vec<Arc<Sessions>>,
        linger: Duration,
    ) -> std::io::Result<Shard> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let sessions = Arc::new(Sessions::default());
        let serving = sessions.clone();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                runtime.block_on(async {
                    match Linger::here(linger) {
                        Some(lingering) => tokio::select! {
                            _ = lingering => {}
                            _ = stop.wait_for(|stopped| *stopped) => {}
                        },
                        None => {
                            let _ = stop.wait_for(|stopped| *stopped).await;
                        }
                    }
                    let all_ended = async {
                        serving.ended().await;
                        for sessions in &also_outlive {
                            sessions.ended().await;
                        }
                    };
                    if tokio::time::timeout(FAREWELL, all_ended).await.is_err() {
                        tracing::debug!(
                            thread = %name,
                            "a controller thread stopped with sessions still saying goodbye"
                        );
                    }
                });
            })?;
        Ok(Shard {
            runtime: handle,
            sessions,
        })
    }
}

/// The sessions a shard serves now, and a wake-up when the count reaches zero.
#[derive(Default)]
struct Sessions {
    live: AtomicUsize,
    none_left: Notify,
}

impl Sessions {
    /// Returns once no session is left.
    async fn ended(&self) {
        loop {
            let none_left = self.none_left.notified();
            if self.live.load(Ordering::Acquire) == 0 {
                return;
            }
            none_left.await;
        }
    }
}

/// One live session of a shard: counted from before its task is spawned until the
/// task ends (or is dropped).
struct Session(Arc<Sessions>);

impl Session {
    fn begin(sessions: &Arc<Sessions>) -> Session {
        sessions.live.fetch_add(1, Ordering::AcqRel);
        Session(sessions.clone())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.none_left.notify_waiters();
        }
    }
}
