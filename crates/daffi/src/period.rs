//! PERIOD: schedules the controller keeps, and durations written as text.

use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::global::Global;

/// When a scheduled call runs. Give it to [`Call::period`](crate::Call::period).
///
/// ```
/// use daffi::{parse_duration, Period};
/// use std::time::{Duration, SystemTime};
///
/// let every = Period::every(Duration::from_secs(5));
/// let parsed = Period::every(parse_duration("1m24s")?);
/// let soon = SystemTime::now() + Duration::from_secs(3);
/// let twice = Period::at(vec![soon, soon + Duration::from_secs(7)]);
/// # Ok::<(), daffi::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Period {
    /// Every interval, the first run one interval from now, until cancelled.
    Every(Duration),
    /// Once at each of these (UTC) times, which must be in the future.
    At(Vec<SystemTime>),
}

impl Period {
    /// Runs every `interval` until cancelled.
    pub fn every(interval: Duration) -> Period {
        Period::Every(interval)
    }

    /// Runs once at each time in `times`.
    pub fn at(times: Vec<SystemTime>) -> Period {
        Period::At(times)
    }
}

/// Parses a duration written as text: a number and a unit, or several (`"5s"`,
/// `"1m24s"`, `"1.2 minutes"`, `"250ms"`, `"2h 30m"`). A bare number is seconds.
///
/// Units: `ms`/`msec`/`millisecond(s)`, `s`/`sec`/`second(s)`, `m`/`min`/`minute(s)`,
/// `h`/`hr`/`hour(s)`, `d`/`day(s)`.
///
/// ```
/// use daffi::parse_duration;
/// use std::time::Duration;
/// assert_eq!(parse_duration("1m24s")?, Duration::from_secs(84));
/// assert_eq!(parse_duration("1.2 minutes")?, Duration::from_secs(72));
/// assert!(parse_duration("soon").is_err());
/// # Ok::<(), daffi::Error>(())
/// ```
pub fn parse_duration(text: &str) -> Result<Duration> {
    let invalid =
        |why: &str| Error::InvalidPeriod(format!("cannot read `{text}` as a duration: {why}"));
    let mut rest = text.trim();
    if rest.is_empty() {
        return Err(invalid("it is empty"));
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if number_len == 0 {
            return Err(invalid("expected a number"));
        }
        let number: f64 = rest[..number_len]
            .parse()
            .map_err(|_| invalid("bad number"))?;
        rest = rest[number_len..].trim_start();
        let unit_len = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let seconds_per_unit = match &rest[..unit_len] {
            "" if rest.is_empty() && total == 0.0 => 1.0,
            "ms" | "msec" | "msecs" | "millisecond" | "milliseconds" => 0.001,
            "s" | "sec" | "secs" | "second" | "seconds" => 1.0,
            "m" | "min" | "mins" | "minute" | "minutes" => 60.0,
            "h" | "hr" | "hrs" | "hour" | "hours" => 3600.0,
            "d" | "day" | "days" => 86400.0,
            "" => return Err(invalid("a number without a unit")),
            _ => return Err(invalid("unknown unit")),
        };
        total += number * seconds_per_unit;
        rest = rest[unit_len..].trim_start();
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid("out of range"))
}

/// A schedule the controller keeps (and every node keeps a copy of, to give back to a
/// controller that restarts). Dropping it does not cancel it: the schedule outlives its
/// creator, on purpose. End it with [`cancel`](Self::cancel); the handle stays valid
/// across controller restarts.
#[derive(Debug, Clone)]
#[must_use = "the schedule runs until cancelled; keep the ScheduledTask (or its id) to cancel it"]
pub struct ScheduledTask {
    pub(crate) id: u64,
    pub(crate) global: Global,
}

impl ScheduledTask {
    /// The task's id: random, from 1 to 2^53 - 1 (exact in JSON), and the same after the
    /// controller restarts.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Ends the schedule, and tells every node it ended. [`Error::TaskNotFound`] if it
    /// already ended, or if a restarted controller has not got it back yet (no node that
    /// knew it has reconnected): then it stays ended, the controller refuses it when a
    /// node gives it back.
    pub fn cancel(&self) -> Result<()> {
        self.global.cancel_scheduled_task(self.id)
    }

    /// Async twin of [`cancel`](Self::cancel).
    pub async fn cancel_async(&self) -> Result<()> {
        self.global.cancel_scheduled_task_async(self.id).await
    }
}

/// A scheduled task as the controller reports it ([`Global::scheduled_tasks`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduledTaskInfo {
    /// The task's id.
    pub id: u64,
    /// The callback it runs.
    pub callback: String,
    /// The node it is pinned to, if any (otherwise a provider is chosen at each run).
    pub on: Option<String>,
    /// The node that created it.
    pub created_by: String,
    /// When it runs next (by this machine's clock).
    pub next_run: SystemTime,
    /// The interval, for repeating tasks.
    pub interval: Option<Duration>,
    /// Runs still to come, for tasks with a list of times.
    pub remaining_runs: Option<u64>,
    /// Runs sent so far, by the controller running now (a restarted controller counts
    /// from zero); over NATS, by every node that sent them.
    pub runs: u64,
    /// The node that gave this task back to the controller after it restarted, if one
    /// did (see "Schedules survive a controller restart" in the README); never over NATS.
    pub restored_by: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_python_daffi_forms() {
        let cases = [
            ("5s", 5_000),
            ("1m24s", 84_000),
            ("1.2 minutes", 72_000),
            ("250ms", 250),
            ("2h 30m", 9_000_000),
            ("3", 3_000),
            ("1 day", 86_400_000),
        ];
        for (text, ms) in cases {
            assert_eq!(
                parse_duration(text).expect(text),
                Duration::from_millis(ms),
                "{text}"
            );
        }
    }

    #[test]
    fn rejects_nonsense() {
        for text in ["", "soon", "5 parsecs", "1m 5", "-3s", "1..2s"] {
            assert!(
                matches!(parse_duration(text), Err(Error::InvalidPeriod(_))),
                "{text}"
            );
        }
    }
}
