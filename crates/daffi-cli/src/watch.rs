//! `daffi watch`: membership changes as they happen, and per-callback call counts.
//!
//! Membership comes from this command's own node: the controller tells every node when
//! another joins or leaves, in the same order for all, so nothing is polled and nothing
//! is missed. Call counts are the controller's counters, polled every `--interval`: one
//! line per callback whose count moved, and one for the calls of every other name
//! (names no connected node serves any more, and those left out of a large answer).

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use clap::Args;
use daffi::Global;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::client::{self, ClientOptions, Failure};

/// The arguments of `daffi watch`.
#[derive(Args)]
pub struct WatchArgs {
    /// Print one JSON object per line instead of text.
    #[arg(long)]
    pub json: bool,
    /// Also show the nodes of other `daffi` commands (named daffi-cli-*) coming and going.
    #[arg(long)]
    pub all: bool,
    /// How often to ask the controller for its call counts.
    #[arg(
        long,
        default_value = "1s",
        value_name = "DURATION",
        value_parser = client::parse_interval
    )]
    pub interval: Duration,
    #[command(flatten)]
    pub client: ClientOptions,
}

/// What this command's node saw, sent by the lifecycle hooks.
enum Seen {
    Joined(String),
    Left(String),
    Connected,
    Disconnected,
}

/// Runs `daffi watch` until Ctrl-C or SIGTERM.
pub async fn run(args: WatchArgs) -> Result<(), Failure> {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let send = |make: fn(String) -> Seen| {
        let tx = tx.clone();
        move |_: &Global, name: &str| {
            let _ = tx.send(make(name.to_string()));
        }
    };
    let g = args
        .client
        .builder()
        .on_member_added(send(Seen::Joined))
        .on_member_removed(send(Seen::Left))
        .on_node_connect(send(|_| Seen::Connected))
        .on_node_disconnect(send(|_| Seen::Disconnected))
        .start_async()
        .await?;
    drop(tx);
    let mut out = Printer { json: args.json };
    let mut view = View {
        all: args.all,
        address: args.client.mesh_address(&g),
        ..View::default()
    };
    let result = watch(&g, &mut view, &mut out, &mut seen, args.interval).await;
    g.stop();
    result
}

async fn watch(
    g: &Global,
    view: &mut View,
    out: &mut Printer,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    interval: Duration,
) -> Result<(), Failure> {
    let ready = out.print(
        "watching",
        json!({ "controller": view.address, "node": g.process_name() }),
        &format!(
            "watching {} as {} (Ctrl-C to stop)",
            view.address,
            g.process_name()
        ),
    );
    if !ready {
        return Ok(());
    }
    // Nodes already connected. The hooks report them too (as this node's first view):
    // those reports are skipped below, since `view` already has them.
    for m in g.members() {
        if !view.shows(&m.name) {
            continue;
        }
        if !out.member("member", &m.name, &m.callbacks) {
            return Ok(());
        }
        view.nodes.insert(m.name, m.callbacks);
    }
    let mut first_connect = true;
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let open = tokio::select! {
            _ = &mut stop => return Ok(()),
            event = seen.recv() => match event {
                Some(event) => view.on_event(g, out, event, &mut first_connect),
                None => return Ok(()),
            },
            // A slow controller must not delay Ctrl-C.
            _ = ticks.tick() => tokio::select! {
                _ = &mut stop => return Ok(()),
                open = view.on_tick(g, out) => open,
            },
        };
        if !open {
            return Ok(()); // stdout closed
        }
    }
}

/// What the watch has printed so far: the nodes and their callbacks, the call counts.
#[derive(Default)]
struct View {
    /// Show the nodes of `daffi` commands too.
    all: bool,
    /// Where the mesh is: the controller's address, or the NATS servers.
    address: String,
    /// The mesh has no call counts (a NATS cluster has no controller to count them).
    no_counts: bool,
    nodes: BTreeMap<String, Vec<String>>,
    calls: HashMap<String, u64>,
    /// The controller's count of calls to names it did not list.
    other_calls: u64,
}

impl View {
    fn shows(&self, node: &str) -> bool {
        self.all || !client::is_cli_node(node)
    }

    /// Prints a membership event. `false` once stdout is closed.
    fn on_event(&mut self, g: &Global, out: &mut Printer, event: Seen, first: &mut bool) -> bool {
        match event {
            Seen::Joined(name) => {
                if self.nodes.contains_key(&name) || !self.shows(&name) {
                    return true;
                }
                // The callbacks as known now (empty if it left again meanwhile).
                let callbacks = g
                    .members()
                    .into_iter()
                    .find(|m| m.name == name)
                    .map(|m| m.callbacks)
                    .unwrap_or_default();
                let open = out.member("joined", &name, &callbacks);
                self.nodes.insert(name, callbacks);
                open
            }
            Seen::Left(name) => {
                if self.nodes.remove(&name).is_none() {
                    return true;
                }
                out.print("left", json!({ "node": name }), &format!("left     {name}"))
            }
            Seen::Connected if std::mem::take(first) => true,
            Seen::Connected => out.print(
                "connected",
                json!({ "controller": self.address }),
                &format!("connected to {} again", self.address),
            ),
            Seen::Disconnected => out.print(
                "disconnected",
                json!({ "controller": self.address }),
                &format!("lost the connection to {}; reconnecting", self.address),
            ),
        }
    }

    /// Prints callback changes of known nodes and new call counts.
    async fn on_tick(&mut self, g: &Global, out: &mut Printer) -> bool {
        for m in g.members() {
            if let Some(known) = self.nodes.get_mut(&m.name) {
                if *known != m.callbacks {
                    *known = m.callbacks;
                    if !out.member("updated", &m.name, known) {
                        return false;
                    }
                }
            }
        }
        if self.no_counts {
            return true;
        }
        let stats = match g.controller_stats_async().await {
            Ok(stats) => stats,
            Err(e @ daffi::Error::Unsupported { .. }) => {
                tracing::info!(error = %e, "no call counts to show");
                self.no_counts = true;
                return true;
            }
            Err(e) => {
                tracing::debug!(error = %e, "no call counts this time");
                return true;
            }
        };
        let mut changed: Vec<(&String, u64)> = stats
            .calls
            .iter()
            .filter(|(name, total)| self.calls.get(*name) != Some(total))
            .map(|(name, total)| (name, *total))
            .collect();
        changed.sort();
        for (name, total) in changed {
            let before = self.calls.insert(name.clone(), total).unwrap_or(0);
            let new = growth(before, total);
            let open = out.print(
                "calls",
                json!({ "callback": name, "total": total, "new": new }),
                &format!("calls    {name}  {total} (+{new})"),
            );
            if !open {
                return false;
            }
        }
        let total = stats.other_calls;
        if total == self.other_calls {
            return true;
        }
        let new = growth(std::mem::replace(&mut self.other_calls, total), total);
        out.print(
            "other_calls",
            json!({ "total": total, "new": new, "omitted_names": stats.omitted_names }),
            &format!("calls    (other names)  {total} (+{new})"),
        )
    }
}

/// How much a count grew from `before` to `total`. Fewer than before: the controller
/// restarted and counts from zero.
fn growth(before: u64, total: u64) -> u64 {
    total.checked_sub(before).unwrap_or(total)
}

/// Prints events as text or JSON lines, each with the time.
struct Printer {
    json: bool,
}

impl Printer {
    /// Prints one event. `false` once stdout is closed.
    fn print(&mut self, event: &str, mut fields: Value, text: &str) -> bool {
        let now = utc_timestamp(SystemTime::now());
        let line = if self.json {
            if let Value::Object(map) = &mut fields {
                map.insert("event".into(), event.into());
                map.insert("time".into(), now.into());
            }
            fields.to_string()
        } else {
            // HH:MM:SS of `YYYY-MM-DDTHH:MM:SS.mmmZ`.
            format!("{}  {text}", now.get(11..19).unwrap_or(&now))
        };
        client::print_line(&line)
    }

    fn member(&mut self, event: &str, name: &str, callbacks: &[String]) -> bool {
        let listed = if callbacks.is_empty() {
            "-".to_string()
        } else {
            callbacks.join(", ")
        };
        self.print(
            event,
            json!({ "node": name, "callbacks": callbacks }),
            &format!("{event:8} {name}  {listed}"),
        )
    }
}

/// `2026-11-23T23:01:23.123Z`.
fn utc_timestamp(t: SystemTime) -> String {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_993_283_123);
        assert_eq!(utc_timestamp(t), "2026-11-29T23:01:23.123Z");
        assert_eq!(
            utc_timestamp(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_timestamp(leap), "2000-02-29T00:00:00.000Z");
    }
}
