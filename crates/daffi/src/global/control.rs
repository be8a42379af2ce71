//! What a `Global` asks the controller: its counters, the scheduled tasks, and the
//! cancelling of one.

use std::time::{Duration, SystemTime};

use super::Global;
use crate::blocking;
use crate::call::unexpected_answer;
use crate::error::Result;
use crate::info::ControllerStats;
use crate::period::ScheduledTaskInfo;
use crate::protocol::message::{ControlAnswer, ControlRequest};

impl Global {
    /// The controller's counters: how many requests it forwarded for each callback.
    /// Over NATS, [`Error::Unsupported`](crate::Error::Unsupported): calls go from node
    /// to node, and no process sees them all.
    ///
    /// ```no_run
    /// # fn demo(g: &daffi::Global) -> daffi::Result<()> {
    /// let stats = g.controller_stats()?;
    /// println!("add was called {} times", stats.calls.get("add").copied().unwrap_or(0));
    /// # Ok(()) }
    /// ```
    pub fn controller_stats(&self) -> Result<ControllerStats> {
        blocking::wait(
            self.runtime(),
            "controller_stats",
            self.controller_stats_async(),
        )?
    }

    /// Async twin of [`controller_stats`](Self::controller_stats).
    pub async fn controller_stats_async(&self) -> Result<ControllerStats> {
        let node = self.node()?.clone();
        match node
            .control(ControlRequest::Stats, "controller_stats")
            .await?
        {
            ControlAnswer::Stats {
                calls,
                other_calls,
                omitted_names,
            } => Ok(ControllerStats {
                calls,
                other_calls,
                omitted_names,
            }),
            other => Err(unexpected_answer(other)),
        }
    }

    /// The tasks the controller (or, over NATS, the schedules bucket) keeps for PERIOD
    /// calls made by any node, soonest first.
    /// The controller answers in pages that each fit a frame; this asks for every page.
    pub fn scheduled_tasks(&self) -> Result<Vec<ScheduledTaskInfo>> {
        blocking::wait(
            self.runtime(),
            "scheduled_tasks",
            self.scheduled_tasks_async(),
        )?
    }

    /// Async twin of [`scheduled_tasks`](Self::scheduled_tasks).
    pub async fn scheduled_tasks_async(&self) -> Result<Vec<ScheduledTaskInfo>> {
        let node = self.node()?;
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let now = SystemTime::now();
            let request = ControlRequest::ListTasks { after };
            let (tasks, omitted_tasks) =
                match node.clone().control(request, "scheduled_tasks").await? {
                    ControlAnswer::Tasks {
                        tasks,
                        omitted_tasks,
                    } => (tasks, omitted_tasks),
                    other => return Err(unexpected_answer(other)),
                };
            let Some(last) = tasks.last().map(|t| t.task_id) else {
                break;
            };
            all.extend(tasks.into_iter().map(|t| ScheduledTaskInfo {
                id: t.task_id,
                callback: t.callback,
                on: t.on,
                created_by: t.created_by,
                next_run: now + Duration::from_millis(t.next_run_in_ms),
                interval: t.interval_ms.map(Duration::from_millis),
                remaining_runs: t.remaining_runs,
                runs: t.runs,
                restored_by: t.restored_by,
            }));
            if omitted_tasks == 0 || last <= after {
                break;
            }
            after = last;
        }
        all.sort_by_key(|t| t.next_run);
        Ok(all)
    }

    /// Ends the scheduled task `id` (whoever created it). [`Error::TaskNotFound`](crate::Error::TaskNotFound) if
    /// there is none.
    pub fn cancel_scheduled_task(&self, id: u64) -> Result<()> {
        blocking::wait(
            self.runtime(),
            "cancel_scheduled_task",
            self.cancel_scheduled_task_async(id),
        )?
    }

    /// Async twin of [`cancel_scheduled_task`](Self::cancel_scheduled_task).
    pub async fn cancel_scheduled_task_async(&self, id: u64) -> Result<()> {
        let node = self.node()?.clone();
        match node
            .control(
                ControlRequest::Cancel { task_id: id },
                "cancel_scheduled_task",
            )
            .await?
        {
            ControlAnswer::Cancelled => Ok(()),
            other => Err(unexpected_answer(other)),
        }
    }
}
