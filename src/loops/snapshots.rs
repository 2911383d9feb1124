//! The snapshots loop: every `snapshots.interval`, each active rental's home is
//! snapshotted if it changed since the last snapshot ([`crate::snapshots::take`]), a few
//! at a time. A snapshot that fails is retried at the next pass; the rental keeps its
//! last whole one.
//!
//! One rental's snapshot never holds another's: each is a task of its own, ended at
//! `snapshots.deadline`; a pass waits for its snapshots only until the next pass is due,
//! and the next pass skips a rental whose snapshot still runs but takes every other.

use std::collections::HashSet;
use std::future::Future;
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use futures::StreamExt;

use super::{Next, Pass};
use crate::context::Context;
use crate::snapshots::{self, Taken};

/// Name of this loop in logs and on the status endpoint.
pub const LOOP: &str = "snapshots";

/// What the loop keeps between passes: the rentals whose snapshot is still running (past
/// the pass that started it), so that it is started again only once it ended.
#[derive(Debug, Default)]
pub struct State {
    running: Mutex<HashSet<String>>,
}

impl State {
    /// Marks the rental's snapshot running until the guard is dropped; `None` if it
    /// already was.
    fn start(self: &Arc<Self>, rental_id: &str) -> Option<Running> {
        let mut running = self.running.lock().expect("snapshot state poisoned");
        running.insert(rental_id.to_owned()).then(|| Running {
            state: self.clone(),
            rental_id: rental_id.to_owned(),
        })
    }
}

/// A rental's snapshot in progress: no longer running once dropped, however it ended.
struct Running {
    state: Arc<State>,
    rental_id: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(mut running) = self.state.running.lock() {
            running.remove(&self.rental_id);
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotSummary {
    /// Homes snapshotted (they changed).
    pub stored: usize,
    /// Bytes stored, compressed.
    pub bytes: u64,
    /// Homes unchanged since their last snapshot.
    pub unchanged: usize,
    /// Homes over `snapshots.max_bytes`.
    pub too_big: usize,
    /// Bytes received of homes then refused as over the cap: 0 when each was measured
    /// before anything was sent.
    pub too_big_streamed: u64,
    /// Snapshots that failed (retried next pass).
    pub failed: usize,
    /// Snapshots still running when the pass stopped waiting (they go on, each until its
    /// deadline), or started by an earlier pass and not started again.
    pub running: usize,
    /// When the next pass runs: one interval after this one started, however long it
    /// waited for its snapshots.
    pub next: Next,
}

impl Pass for SnapshotSummary {
    fn next(&self) -> Next {
        self.next
    }
}

impl SnapshotSummary {
    fn add(&mut self, taken: &Taken) {
        match taken {
            Taken::Stored(bytes) => {
                self.stored += 1;
                self.bytes += bytes;
            }
            Taken::Unchanged | Taken::Superseded => self.unchanged += 1,
            Taken::TooBig { streamed } => {
                self.too_big += 1;
                self.too_big_streamed += streamed;
            }
        }
    }
}

/// One pass over every active rental; also drops the snapshots of rentals that ended.
/// Waits for the snapshots it starts until `snapshots.interval` after its start (tests
/// with a long interval see them all done); those still running then go on by
/// themselves, each ended at `snapshots.deadline`.
pub async fn snapshot_pass(ctx: &Context, state: &Arc<State>) -> anyhow::Result<SnapshotSummary> {
    let started = tokio::time::Instant::now();
    let due = started + ctx.config.snapshots.interval;
    ctx.store
        .purge_snapshots()
        .await
        .context("Failed to drop the snapshots of ended rentals")?;
    let jobs = ctx
        .store
        .snapshot_jobs()
        .await
        .context("Failed to list the homes to snapshot")?;
    let mut summary = SnapshotSummary::default();
    let mut started_jobs = 0usize;
    // Each job is started (and marked running) only when a slot frees, so a job the
    // pass never reached is left to the next pass, not marked running forever.
    let mut taken = futures::stream::iter(jobs)
        .map(|job| {
            let running = state.start(&job.rental_id);
            let task = running.map(|running| {
                started_jobs += 1;
                let job_ctx = ctx.clone();
                ctx.tasks.spawn(async move {
                    let result = snapshots::take(&job_ctx, &job, false).await;
                    drop(running);
                    match &result {
                        Ok(taken) => {
                            if let Taken::Stored(bytes) = taken {
                                metrics::counter!(crate::metrics::names::SNAPSHOT_BYTES)
                                    .increment(*bytes);
                            }
                        }
                        Err(e) => tracing::warn!(rental_id = %job.rental_id,
                            error = format!("{e:#}"),
                            "snapshot failed; the last one is kept, retried next pass"),
                    }
                    result
                })
            });
            async move {
                match task {
                    Some(task) => Some(task.await),
                    None => None,
                }
            }
        })
        .buffer_unordered(ctx.config.snapshots.concurrency);
    let mut done = 0usize;
    loop {
        tokio::select! {
            next = taken.next() => match next {
                Some(None) => summary.running += 1,
                Some(Some(Ok(Ok(taken)))) => {
                    done += 1;
                    summary.add(&taken);
                }
                Some(Some(Ok(Err(_)))) => {
                    // Said by the job itself, which may end after the pass.
                    done += 1;
                    summary.failed += 1;
                }
                Some(Some(Err(e))) => {
                    done += 1;
                    summary.failed += 1;
                    tracing::error!(error = %e, "a snapshot job panicked");
                }
                None => break,
            },
            () = tokio::time::sleep_until(due) => break,
        }
    }
    drop(taken);
    summary.running += started_jobs - done;
    summary.next = Next::After(due.saturating_duration_since(tokio::time::Instant::now()));
    Ok(summary)
}

/// Runs snapshot passes every `snapshots.interval` until `shutdown` resolves.
pub async fn run(ctx: Context, state: Arc<State>, shutdown: impl Future<Output = ()>) {
    let interval = ctx.config.snapshots.interval;
    super::run_loop(
        LOOP,
        &ctx.loops,
        &ctx.leader,
        interval,
        None,
        shutdown,
        || {
            let (ctx, state) = (ctx.clone(), state.clone());
            async move {
                let summary = snapshot_pass(&ctx, &state).await?;
                if summary.stored + summary.failed + summary.too_big + summary.running > 0 {
                    tracing::info!(?summary, "snapshot pass");
                }
                Ok(summary)
            }
        },
    )
    .await;
}
